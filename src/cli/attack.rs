//! `bida attack`: behave like a hostile or broken client against a broker,
//! to see that its limits hold (docs/RELIABILITY.md, "Hostile clients").
//! Run it beside `bida bench` to measure what well-behaved clients keep.
//!
//! Every kind opens `--connections` raw TCP connections and runs for
//! `--duration-s`, then reports how many the broker closed, after how
//! long, and with which ERROR codes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use bida::protocol::body::{ErrorBody, Fetch, Hello};
use bida::protocol::frame::{self, FRAME_BYTES_MAX, FRAME_HEADER_LEN, VERSION};
use bida::protocol::Opcode;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// Announce a frame, then trickle its bytes one every --interval-ms.
    Slowloris,
    /// HELLO, then nothing: hold the connection open.
    Idle,
    /// Pipeline FETCH requests for --topic (one group per connection) and
    /// never read a reply.
    NoRead,
    /// Announce a 16 MiB frame, send --send-bytes of it, then stall.
    Huge,
    /// Connect, PING, close, again, as fast as possible on every connection.
    Flood,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The broker to attack.
    #[arg(long, default_value = "127.0.0.1:7650")]
    broker: SocketAddr,
    #[command(flatten)]
    pub client: super::ClientArgs,
    #[arg(long, value_enum)]
    kind: Kind,
    /// Connections (for flood: concurrent connect loops).
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// How long the attack lasts.
    #[arg(long, default_value_t = 10)]
    duration_s: u64,
    /// slowloris: delay between trickled bytes.
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// huge: bytes of the announced frame sent before stalling.
    #[arg(long, default_value_t = 1 << 20)]
    send_bytes: usize,
    /// no-read: the topic to fetch from (it should hold data).
    #[arg(long, default_value = "attack")]
    topic: String,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// What the attack saw.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub kind: Option<Kind>,
    /// Connections opened (flood: connects that succeeded).
    pub connections: u64,
    /// Connections the broker closed before the attack ended.
    pub closed_by_broker: u64,
    /// Median time from connect to the broker's close, ms.
    pub close_after_ms_p50: Option<u64>,
    /// ERROR frames received, by code.
    pub errors: BTreeMap<u16, u64>,
    /// Bytes the attacker wrote.
    pub bytes_sent: u64,
    /// flood: PINGs answered.
    pub pings_answered: u64,
}

/// How one connection ended.
#[derive(Default)]
struct Outcome {
    opened: u64,
    closed_after: Vec<Duration>,
    errors: Vec<u16>,
    bytes_sent: u64,
    pings: u64,
}

pub fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(attack(&args));
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "bida attack {:?}: {} connections, {} closed by the broker (p50 after {} ms), errors {:?}, {} bytes sent, {} pings answered",
            args.kind,
            report.connections,
            report.closed_by_broker,
            report.close_after_ms_p50.map_or("-".into(), |v| v.to_string()),
            report.errors,
            report.bytes_sent,
            report.pings_answered,
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn attack(args: &Args) -> Report {
    super::serve::raise_fd_limit();
    let end = Instant::now() + Duration::from_secs(args.duration_s);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.connections {
        let (broker, kind, topic) = (args.broker, args.kind, args.topic.clone());
        let (interval, send_bytes) = (Duration::from_millis(args.interval_ms), args.send_bytes);
        tasks.spawn(async move {
            let run = async {
                match kind {
                    Kind::Flood => flood(broker, end).await,
                    _ => match TcpStream::connect(broker).await {
                        Ok(s) => one(s, kind, i, &topic, interval, send_bytes, end).await,
                        Err(_) => Outcome::default(),
                    },
                }
            };
            // Nothing outlives the attack by more than a moment.
            tokio::time::timeout_at((end + Duration::from_secs(2)).into(), run)
                .await
                .unwrap_or_default()
        });
        // Opened in steps of 100, except the flood, which is all speed.
        if args.kind != Kind::Flood && i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let mut report = Report {
        kind: Some(args.kind),
        ..Report::default()
    };
    let mut closes = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let o = r.unwrap_or_default();
        report.connections += o.opened;
        report.closed_by_broker += o.closed_after.len() as u64;
        closes.extend(o.closed_after);
        for e in o.errors {
            *report.errors.entry(e).or_default() += 1;
        }
        report.bytes_sent += o.bytes_sent;
        report.pings_answered += o.pings;
    }
    closes.sort();
    report.close_after_ms_p50 = closes.get(closes.len() / 2).map(|d| d.as_millis() as u64);
    report
}

/// One connection of every kind but flood: write the kind's bytes while
/// reading whatever the broker sends, until the broker closes or `end`.
async fn one(
    stream: TcpStream,
    kind: Kind,
    index: usize,
    topic: &str,
    interval: Duration,
    send_bytes: usize,
    end: Instant,
) -> Outcome {
    let start = Instant::now();
    let mut out = Outcome {
        opened: 1,
        ..Outcome::default()
    };
    let (mut rd, mut wr) = stream.into_split();
    let mut sent = 0u64;
    let write = async {
        let mut w = |bytes: Vec<u8>| {
            sent += bytes.len() as u64;
            bytes
        };
        match kind {
            Kind::Idle => {
                wr.write_all(&w(hello())).await?;
                std::future::pending::<()>().await;
            }
            Kind::Slowloris => {
                let mut f = Vec::new();
                frame::encode_header(&mut f, Opcode::Ping, 0, 1, 1000);
                for b in f.into_iter().chain(std::iter::repeat(0u8)) {
                    wr.write_all(&w(vec![b])).await?;
                    tokio::time::sleep(interval).await;
                }
            }
            Kind::Huge => {
                let mut f = Vec::new();
                frame::encode_header(
                    &mut f,
                    Opcode::Ping,
                    0,
                    1,
                    FRAME_BYTES_MAX - FRAME_HEADER_LEN + 4,
                );
                f.resize(FRAME_HEADER_LEN + send_bytes, 0);
                wr.write_all(&w(f)).await?;
                std::future::pending::<()>().await;
            }
            Kind::NoRead => {
                let mut body = Vec::new();
                Fetch {
                    topic: topic.to_owned(),
                    partition: 0,
                    group: format!("attack-{index}"),
                    max_messages: 100_000,
                    max_bytes: 8 << 20,
                    max_wait_ms: 0,
                }
                .encode(&mut body);
                wr.write_all(&w(hello())).await?;
                // 256 requests per write: the attacker's own CPU is not
                // the point.
                let mut id = 2u64;
                loop {
                    let mut chunk = Vec::new();
                    for _ in 0..256 {
                        chunk.extend_from_slice(&frame::encode(Opcode::Fetch, 0, id, &body));
                        id += 1;
                    }
                    wr.write_all(&w(chunk)).await?;
                }
            }
            Kind::Flood => unreachable!("flood has its own loop"),
        }
        Ok::<(), std::io::Error>(())
    };
    // A reader that reports each ERROR frame and the close; no-read never
    // reads, so the broker's replies pile up against it.
    let read = async {
        if kind == Kind::NoRead {
            return std::future::pending::<Vec<u16>>().await;
        }
        read_until_close(&mut rd).await
    };
    tokio::select! {
        r = write => {
            // A write failed: the broker closed the connection.
            if r.is_err() {
                out.closed_after.push(start.elapsed());
            }
        }
        codes = read => {
            out.closed_after.push(start.elapsed());
            out.errors = codes;
        }
        _ = tokio::time::sleep_until(end.into()) => {}
    }
    out.bytes_sent = sent;
    out
}

/// Reads one whole frame; `None` once the connection is closed or sends
/// something that is not a frame.
async fn read_frame(rd: &mut (impl AsyncReadExt + Unpin)) -> Option<(Opcode, Vec<u8>)> {
    let mut head = [0u8; FRAME_HEADER_LEN];
    rd.read_exact(&mut head).await.ok()?;
    let h = frame::decode_header(&head).ok()??;
    let mut body = vec![0u8; h.body_len];
    rd.read_exact(&mut body).await.ok()?;
    Some((h.opcode, body))
}

/// The code of an ERROR frame's body.
fn error_code(opcode: Opcode, body: &[u8]) -> Option<u16> {
    (opcode == Opcode::Error)
        .then(|| ErrorBody::decode(body).ok().map(|e| e.code))
        .flatten()
}

/// Reads frames until the connection closes; returns the ERROR codes seen.
async fn read_until_close(rd: &mut (impl AsyncReadExt + Unpin)) -> Vec<u16> {
    let mut codes = Vec::new();
    while let Some((opcode, body)) = read_frame(rd).await {
        codes.extend(error_code(opcode, &body));
    }
    codes
}

/// Connect, PING, read the answer, close; again until `end`.
async fn flood(broker: SocketAddr, end: Instant) -> Outcome {
    let mut out = Outcome::default();
    let ping = frame::encode(Opcode::Ping, 0, 1, &[]);
    while Instant::now() < end {
        let Ok(mut s) = TcpStream::connect(broker).await else {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        out.opened += 1;
        if s.write_all(&ping).await.is_err() {
            continue;
        }
        out.bytes_sent += ping.len() as u64;
        match read_frame(&mut s).await {
            Some((Opcode::Error, body)) => out.errors.extend(error_code(Opcode::Error, &body)),
            Some(_) => out.pings += 1,
            None => {}
        }
    }
    out
}

fn hello() -> Vec<u8> {
    let mut body = Vec::new();
    Hello {
        version_min: VERSION,
        version_max: VERSION,
        client: "bida-attack".into(),
        token: super::token().map(str::to_owned),
    }
    .encode(&mut body);
    frame::encode(Opcode::Hello, 0, 1, &body)
}
