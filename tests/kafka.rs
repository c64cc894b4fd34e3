//! The Kafka-protocol listener against real Kafka clients and a real
//! `bida serve --kafka-listen`:
//!
//! - kcat (librdkafka) produces 100,000 keyed lines, reads them back,
//!   reads them in a consumer group, and bida's own client reads them too,
//!   keys intact; what a bida producer sends (key, headers) kcat reads back;
//! - kafka-python: a producer with acks=all, a group of two consumers on four
//!   partitions that rebalances when one leaves, and committed offsets that
//!   survive a broker restart (`tests/kafka/python_group.py`);
//! - confluent-kafka: an idempotent producer through a proxy that cuts the
//!   connection instead of passing on some produce responses stores every
//!   message exactly once, in order; lz4 and zstd batches read back intact
//!   (`tests/kafka/confluent_idempotent.py`);
//! - kcat over TLS with SASL/PLAIN carrying the broker's token: served with
//!   the token, refused with another password or without TLS;
//! - malformed and truncated requests, unknown keys and versions close the
//!   connection; other clients are unaffected (no client library needed).
//!
//! The clients: Debian's `kcat`, and `kafka-python` and `confluent-kafka`
//! from PyPI in the virtual environment `.ci/run` makes (`.venv-kafka/`,
//! or `BIDA_KAFKA_PYTHON`). A test whose client is missing says so and
//! passes, unless `BIDA_REQUIRE_KAFKA_CLIENTS=1` (CI), where it fails.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bida::client::{Client, Consumer, ConsumerOptions, OutgoingMessage, Producer, ProducerOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::broker::BrokerProcess;
use support::certs::make_certificates;

fn required() -> bool {
    std::env::var("BIDA_REQUIRE_KAFKA_CLIENTS").as_deref() == Ok("1")
}

fn kcat() -> Option<PathBuf> {
    let found = ["/usr/bin/kcat", "/usr/local/bin/kcat"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    if found.is_none() {
        assert!(
            !required(),
            "BIDA_REQUIRE_KAFKA_CLIENTS=1 but kcat is not installed"
        );
        eprintln!("SKIPPED: kcat is not installed (apt-get install kcat)");
    }
    found
}

fn python() -> Option<PathBuf> {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv-kafka/bin/python");
    let found = std::env::var_os("BIDA_KAFKA_PYTHON")
        .map(PathBuf::from)
        .or(Some(venv))
        .filter(|p| p.exists());
    if found.is_none() {
        assert!(
            !required(),
            "BIDA_REQUIRE_KAFKA_CLIENTS=1 but no Python with kafka-python and confluent-kafka (.venv-kafka)"
        );
        eprintln!(
            "SKIPPED: no .venv-kafka with kafka-python and confluent-kafka (.ci/run makes it)"
        );
    }
    found
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/kafka")
        .join(name)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd` with `input` on its standard input; it must succeed.
fn feed(cmd: &mut Command, input: &str) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn kafka_broker(data: &std::path::Path) -> (BrokerProcess, SocketAddr) {
    let broker = BrokerProcess::start(data, &["--kafka-listen", "127.0.0.1:0"]);
    let kafka = broker.kafka.unwrap();
    (broker, kafka)
}

const LINES: usize = 100_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kcat_produces_and_consumes_and_bida_reads_the_same_store() {
    let Some(kcat) = kcat() else { return };
    let data = tempfile::tempdir().unwrap();
    let (broker, kafka) = kafka_broker(data.path());
    let bootstrap = kafka.to_string();
    let input: String = (0..LINES).map(|i| format!("key-{i}:line {i}\n")).collect();
    feed(
        Command::new(&kcat).args(["-b", &bootstrap, "-t", "lines", "-P", "-K:"]),
        &input,
    );

    let back = run(Command::new(&kcat).args([
        "-b", &bootstrap, "-t", "lines", "-C", "-e", "-q", "-f", "%k:%s\n",
    ]));
    assert_eq!(
        back, input,
        "kcat -C reads back every line, in order, keys intact"
    );

    let grouped = run(Command::new(&kcat).args([
        "-b",
        &bootstrap,
        "-G",
        "kcat-group",
        "-c",
        &LINES.to_string(),
        "-q",
        "-f",
        "%k:%s\n",
        "-X",
        "auto.offset.reset=earliest",
        "lines",
    ]));
    assert_eq!(grouped, input, "a kcat consumer group reads them all");

    // bida's own client reads what kcat wrote: payloads, keys, and the
    // Kafka timestamp as a header.
    let client = Client::connect(broker.addr).await.unwrap();
    let consumer = Consumer::new(
        Arc::clone(&client),
        "lines",
        "native",
        ConsumerOptions {
            max_wait: Duration::from_millis(100),
            ..ConsumerOptions::default()
        },
    );
    let mut got = 0usize;
    let deadline = Instant::now() + Duration::from_secs(60);
    while got < LINES {
        assert!(Instant::now() < deadline, "bida read {got} lines");
        let batch = consumer.fetch().await.unwrap();
        for d in &batch {
            let i = d.offset as usize;
            assert_eq!(&d.payload[..], format!("line {i}").as_bytes());
            assert_eq!(d.key.as_deref(), Some(format!("key-{i}").as_bytes()));
            let ts = bida::log::record::HeaderIter::new(&d.headers)
                .flatten()
                .find(|(name, _)| *name == b"kafka.timestamp")
                .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
                .expect("the Kafka timestamp travels as a header");
            assert!(ts.parse::<u64>().unwrap() > 1_600_000_000_000, "{ts}");
        }
        got += batch.len();
        consumer
            .ack(&batch.iter().collect::<Vec<_>>())
            .await
            .unwrap();
    }

    // The other way: a bida producer's key and headers reach kcat.
    let producer = Producer::new(client.clone(), "from-bida", ProducerOptions::default())
        .await
        .unwrap();
    producer
        .send(
            OutgoingMessage::new(&b"hello kafka"[..])
                .with_key("order-7")
                .with_header("source", "bida"),
        )
        .await
        .unwrap();
    let seen = run(Command::new(&kcat).args([
        "-b",
        &bootstrap,
        "-t",
        "from-bida",
        "-C",
        "-e",
        "-q",
        "-f",
        "%k|%h|%s|%T\n",
    ]));
    let fields: Vec<&str> = seen.trim_end().split('|').collect();
    assert_eq!(
        fields[..3],
        ["order-7", "source=bida", "hello kafka"],
        "{seen}"
    );
    assert!(
        fields[3].parse::<u64>().unwrap() > 1_600_000_000_000,
        "{seen}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_python_group_rebalances_and_commits_survive_a_restart() {
    let Some(python) = python() else { return };
    let data = tempfile::tempdir().unwrap();
    let (mut broker, kafka) = kafka_broker(data.path());
    let bootstrap = kafka.to_string();
    let py = script("python_group.py");
    run(Command::new(&python).args([
        py.to_str().unwrap(),
        "produce",
        &bootstrap,
        "groups",
        "4000",
    ]));
    run(Command::new(&python).args([
        py.to_str().unwrap(),
        "consume",
        &bootstrap,
        "groups",
        "pygroup",
        "4000",
    ]));
    assert!(broker.terminate().success());
    let listen = format!("127.0.0.1:{}", kafka.port());
    let broker = BrokerProcess::start(data.path(), &["--kafka-listen", &listen]);
    assert_eq!(broker.kafka, Some(kafka));
    run(Command::new(&python).args([
        py.to_str().unwrap(),
        "resume",
        &bootstrap,
        "groups",
        "pygroup",
        "25",
    ]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kcat_is_served_over_tls_with_the_token_as_its_sasl_password_and_no_one_else() {
    let Some(kcat) = kcat() else { return };
    let data = tempfile::tempdir().unwrap();
    let certs = tempfile::tempdir().unwrap();
    make_certificates(certs.path(), "bida kafka test CA");
    let file = |name: &str| certs.path().join(name).to_str().unwrap().to_owned();
    let broker = BrokerProcess::start(
        data.path(),
        &[
            "--kafka-listen",
            "127.0.0.1:0",
            "--auth-token",
            "s3cret",
            "--tls-cert",
            &file("cert.pem"),
            "--tls-key",
            &file("key.pem"),
        ],
    );
    let bootstrap = broker.kafka.unwrap().to_string();
    let ca = format!("ssl.ca.location={}", file("ca.pem"));
    let kcat_with = |protocol: &str, password: &str, rest: &[&str]| {
        let mut cmd = Command::new(&kcat);
        cmd.args(["-b", &bootstrap, "-m", "5", "-X"])
            .arg(format!("security.protocol={protocol}"))
            .args([
                "-X",
                &ca,
                "-X",
                "sasl.mechanisms=PLAIN",
                "-X",
                "sasl.username=anyone",
            ])
            .arg("-X")
            .arg(format!("sasl.password={password}"))
            .args(rest)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    };
    let input: String = (0..100).map(|i| format!("secret line {i}\n")).collect();
    feed(
        &mut kcat_with("SASL_SSL", "s3cret", &["-t", "private", "-P"]),
        &input,
    );
    let back = run(&mut kcat_with(
        "SASL_SSL",
        "s3cret",
        &["-t", "private", "-C", "-e", "-q"],
    ));
    assert_eq!(back, input, "read back over TLS with the token");

    // Another password: authentication fails, no metadata.
    let wrong = kcat_with("SASL_SSL", "guess", &["-L", "-t", "private"])
        .output()
        .unwrap();
    assert!(
        !wrong.status.success(),
        "a wrong password must not be served: {}",
        String::from_utf8_lossy(&wrong.stdout)
    );
    // Plain TCP to the TLS listener: not served either.
    let plain = kcat_with("SASL_PLAINTEXT", "s3cret", &["-L", "-t", "private"])
        .output()
        .unwrap();
    assert!(
        !plain.status.success(),
        "plain TCP must not be served: {}",
        String::from_utf8_lossy(&plain.stdout)
    );
}

/// A proxy that passes bytes both ways but, every `cut_every`-th produce
/// response, cuts the connection instead of passing it on: the broker
/// stored the batch, the producer never hears so and sends it again.
fn lossy_kafka_proxy(listener: TcpListener, broker: SocketAddr, cut_every: u64) {
    let produced = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let produced = Arc::clone(&produced);
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(broker).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let produce_ids = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
                let ids = Arc::clone(&produce_ids);
                // Client to broker: note which correlation ids are produces.
                tokio::spawn(async move {
                    loop {
                        let mut size = [0u8; 4];
                        if cr.read_exact(&mut size).await.is_err() {
                            return;
                        }
                        let mut body = vec![0u8; i32::from_be_bytes(size).max(0) as usize];
                        if cr.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        if body.len() >= 8 && body[..2] == [0, 0] {
                            let id = i32::from_be_bytes(body[4..8].try_into().unwrap());
                            ids.lock().unwrap().insert(id);
                        }
                        if sw.write_all(&size).await.is_err() || sw.write_all(&body).await.is_err()
                        {
                            return;
                        }
                    }
                });
                loop {
                    let mut size = [0u8; 4];
                    if sr.read_exact(&mut size).await.is_err() {
                        return;
                    }
                    let mut body = vec![0u8; i32::from_be_bytes(size).max(0) as usize];
                    if sr.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let id = i32::from_be_bytes(body[..4].try_into().unwrap());
                    if produce_ids.lock().unwrap().remove(&id)
                        && produced.fetch_add(1, Ordering::Relaxed) % cut_every == cut_every - 1
                    {
                        return; // both halves dropped: the connection is cut
                    }
                    if cw.write_all(&size).await.is_err() || cw.write_all(&body).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_producer_stores_every_message_once_through_a_lossy_proxy() {
    let Some(python) = python() else { return };
    let data = tempfile::tempdir().unwrap();
    // The broker advertises the proxy, so every request after bootstrap
    // goes through it too (Metadata names where to produce).
    let proxy_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = proxy_listener.local_addr().unwrap();
    let broker = BrokerProcess::start(
        data.path(),
        &[
            "--kafka-listen",
            "127.0.0.1:0",
            "--kafka-advertise",
            &proxy.to_string(),
        ],
    );
    let kafka = broker.kafka.unwrap();
    lossy_kafka_proxy(proxy_listener, kafka, 7);
    let out = run(Command::new(&python).args([
        script("confluent_idempotent.py").to_str().unwrap(),
        &proxy.to_string(),
        &kafka.to_string(),
        "idem",
        "30000",
    ]));
    assert!(out.contains("exactly once"), "{out}");
    assert!(
        out.contains("lz4: 2000") && out.contains("zstd: 2000"),
        "{out}"
    );
}

/// An ApiVersions request: size, key 18, `version`, `correlation`, client
/// id "t".
fn api_versions(version: i16, correlation: i32) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&18i16.to_be_bytes());
    body.extend_from_slice(&version.to_be_bytes());
    body.extend_from_slice(&correlation.to_be_bytes());
    body.extend_from_slice(&1i16.to_be_bytes());
    body.push(b't');
    let mut frame = (body.len() as i32).to_be_bytes().to_vec();
    frame.extend(body);
    frame
}

/// Sends ApiVersions v0 on `good` and checks that it is answered.
async fn ask(good: &mut TcpStream, correlation: i32) {
    good.write_all(&api_versions(0, correlation)).await.unwrap();
    let mut size = [0u8; 4];
    good.read_exact(&mut size).await.unwrap();
    let mut body = vec![0u8; i32::from_be_bytes(size) as usize];
    good.read_exact(&mut body).await.unwrap();
    assert_eq!(
        i32::from_be_bytes(body[..4].try_into().unwrap()),
        correlation
    );
    assert_eq!(&body[4..6], &[0, 0], "error code NONE");
}

/// Raw bytes at the Kafka listener: each bad request closes its connection
/// (the broker writes nothing back, or only what the spec names), and a
/// client on another connection keeps being answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_close_only_their_connection() {
    let data = tempfile::tempdir().unwrap();
    let (_broker, kafka) = kafka_broker(data.path());
    let mut good = TcpStream::connect(kafka).await.unwrap();
    ask(&mut good, 1).await;
    let mut unknown_key = api_versions(0, 2);
    unknown_key[4..6].copy_from_slice(&999i16.to_be_bytes());
    let mut produce_v1 = api_versions(0, 3);
    produce_v1[4..8].copy_from_slice(&[0, 0, 0, 1]);
    let huge = (i32::MAX).to_be_bytes().to_vec();
    let negative = (-5i32).to_be_bytes().to_vec();
    let mut truncated = api_versions(0, 4);
    truncated.truncate(truncated.len() - 2);
    let mut garbage_metadata = vec![0, 0, 0, 12, 0, 3, 0, 9, 0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff];
    garbage_metadata.extend([0xff; 8]);
    garbage_metadata[3] = (garbage_metadata.len() - 4) as u8;
    for (what, bytes) in [
        ("an unknown API key", unknown_key),
        ("a Produce v1 without its body", produce_v1),
        ("a frame of 2 GiB", huge),
        ("a negative size", negative),
        ("a Metadata request of garbage", garbage_metadata),
    ] {
        let mut s = TcpStream::connect(kafka).await.unwrap();
        s.write_all(&bytes).await.unwrap();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{what}: the connection stayed open"));
        assert!(matches!(read, Ok(0) | Err(_)), "{what}: answered {read:?}");
        ask(&mut good, 5).await;
    }
    // A frame cut short: the broker waits for the rest (nothing to answer),
    // and the client's close ends it.
    let mut s = TcpStream::connect(kafka).await.unwrap();
    s.write_all(&truncated).await.unwrap();
    drop(s);
    // ApiVersions at a version above those served: answered at version 0
    // with UNSUPPORTED_VERSION (35) and the versions served.
    let mut s = TcpStream::connect(kafka).await.unwrap();
    s.write_all(&api_versions(99, 6)).await.unwrap();
    let mut size = [0u8; 4];
    s.read_exact(&mut size).await.unwrap();
    let mut body = vec![0u8; i32::from_be_bytes(size) as usize];
    s.read_exact(&mut body).await.unwrap();
    assert_eq!(&body[4..6], &35i16.to_be_bytes());
    ask(&mut good, 8).await;
    // Produce v0-2 (announced from 0 for old librdkafka, message format
    // v0/v1 not stored): every partition answered UNSUPPORTED_VERSION (35).
    let mut v1 = Vec::new();
    v1.extend_from_slice(&1i16.to_be_bytes()); // acks
    v1.extend_from_slice(&1000i32.to_be_bytes()); // timeout
    v1.extend_from_slice(&1i32.to_be_bytes()); // one topic
    v1.extend_from_slice(&1i16.to_be_bytes());
    v1.push(b't');
    v1.extend_from_slice(&1i32.to_be_bytes()); // one partition
    v1.extend_from_slice(&0i32.to_be_bytes()); // partition 0
    v1.extend_from_slice(&0i32.to_be_bytes()); // an empty message set
    for (version, len) in [(0i16, 29usize), (1, 33), (2, 41)] {
        let mut s = TcpStream::connect(kafka).await.unwrap();
        s.write_all(&request_frame(0, version, 10, &v1))
            .await
            .unwrap();
        let body = answer(&mut s).await.expect("an answer to Produce v0-2");
        // correlation, 1 topic, "t", 1 partition, index 0, error code,
        // offset -1, [v2: append time], [v1+: throttle]
        assert_eq!(body.len(), len, "Produce v{version} answer");
        assert_eq!(&body[..4], &10i32.to_be_bytes());
        assert_eq!(&body[4..11], &[0, 0, 0, 1, 0, 1, b't']);
        assert_eq!(&body[11..19], &[0, 0, 0, 1, 0, 0, 0, 0]);
        assert_eq!(&body[19..21], &35i16.to_be_bytes(), "UNSUPPORTED_VERSION");
        assert_eq!(&body[21..29], &(-1i64).to_be_bytes());
        ask(&mut s, 11).await;
    }
}

/// A request frame (header v1: key, version, correlation, client id "t").
fn request_frame(key: i16, version: i16, correlation: i32, body: &[u8]) -> Vec<u8> {
    let mut frame = api_versions(version, correlation);
    frame[4..6].copy_from_slice(&key.to_be_bytes());
    frame.extend_from_slice(body);
    let len = (frame.len() - 4) as i32;
    frame[..4].copy_from_slice(&len.to_be_bytes());
    frame
}

/// Reads one size-prefixed answer, or `None` once the broker closed.
async fn answer(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut size = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut size))
        .await
        .expect("an answer or a close within 10 s")
        .ok()?;
    let mut body = vec![0u8; i32::from_be_bytes(size) as usize];
    s.read_exact(&mut body).await.ok()?;
    Some(body)
}

/// SaslHandshake v0 (clients before KIP-152): the token follows as a bare
/// size-prefixed frame, answered by an empty one, or the connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_handshake_v0_takes_the_bare_token_and_closes_on_a_wrong_one() {
    let data = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(
        data.path(),
        &["--kafka-listen", "127.0.0.1:0", "--auth-token", "s3cret"],
    );
    let kafka = broker.kafka.unwrap();
    let plain = [&5i16.to_be_bytes()[..], b"PLAIN"].concat();
    let metadata_v0 = request_frame(3, 0, 9, &0i32.to_be_bytes());
    let token = |password: &str| {
        let token = format!("\0user\0{password}").into_bytes();
        [&(token.len() as i32).to_be_bytes()[..], &token].concat()
    };

    // Before authentication only ApiVersions and the SASL pair are served.
    let mut s = TcpStream::connect(kafka).await.unwrap();
    ask(&mut s, 1).await;
    s.write_all(&metadata_v0).await.unwrap();
    assert_eq!(answer(&mut s).await, None, "metadata before SASL closes");

    for (password, served) in [("s3cret", true), ("guess", false)] {
        let mut s = TcpStream::connect(kafka).await.unwrap();
        s.write_all(&request_frame(17, 0, 2, &plain)).await.unwrap();
        let handshake = answer(&mut s).await.expect("a handshake answer");
        assert_eq!(&handshake[..4], &2i32.to_be_bytes());
        assert_eq!(&handshake[4..6], &[0, 0], "PLAIN accepted");
        s.write_all(&token(password)).await.unwrap();
        let reply = answer(&mut s).await;
        if served {
            assert_eq!(reply, Some(Vec::new()), "an empty answer: authenticated");
            s.write_all(&metadata_v0).await.unwrap();
            let metadata = answer(&mut s).await.expect("metadata once authenticated");
            assert_eq!(&metadata[..4], &9i32.to_be_bytes());
        } else {
            assert_eq!(reply, None, "a wrong password closes the connection");
        }
    }
}
