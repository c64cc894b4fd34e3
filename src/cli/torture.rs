//! `bida torture`: SIGKILLs a real `bida serve --flush sync` at random
//! moments while a producer and a consumer group work against it, restarts
//! it on the same address, and after every restart checks the promise:
//!
//! - every inner-msg-id acked to the producer before the kill is stored,
//!   exactly once;
//! - offsets are contiguous (a verification group reads every new offset,
//!   with no gap and no repeat);
//! - the consumer group does not skip a message it had not acked (its
//!   committed position never passes an offset the consumer did not ack);
//! - nothing rolled back is visible, and every transaction whose commit
//!   was acknowledged is (a transactional producer commits two in three
//!   and rolls back the rest, answering check-backs from its own record).
//!
//! Exits 1 with the first violation. Producer and consumer retry across
//! the kills as any client would (same ids on resend).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bida::client::txn::{Decision, RetryOptions, TransactionalProducer};
use bida::client::{
    Client, Consumer, ConsumerOptions, OutgoingMessage, Producer, ProducerOptions, RetryBackoff,
};
use bida::log::InnerMsgId;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Kill-and-restart cycles.
    #[arg(long, default_value_t = 20)]
    cycles: u32,
    /// Data directory (created; must not exist).
    #[arg(long, default_value = "./bida-torture-data")]
    data: PathBuf,
    /// Keep the data directory afterwards.
    #[arg(long)]
    keep_data: bool,
    /// The broker runs at most this long between kills (random below it).
    #[arg(long, default_value_t = 400)]
    max_run_ms: u64,
    /// Random seed (default: from the clock); printed for reproduction.
    #[arg(long)]
    seed: Option<u64>,
    /// Simulate a power cut at each kill, not just a process crash: every
    /// segment loses what was written past its last flush (the broker
    /// records its flushes in a journal): zeroed, or torn with garbage.
    #[arg(long)]
    power_loss: bool,
    /// The broker's flush mode. Under async, with --power-loss, acked
    /// messages may be lost, but only those acked within the flush
    /// window before the cut (100 ms, plus ASYNC_SLACK_MS for the flush
    /// itself); the run reports how many and how old.
    #[arg(long, value_enum, default_value_t = super::FlushArg::Sync)]
    flush: super::FlushArg,
    /// The broker's segment size (default: its own). Small segments roll
    /// many times per cycle, so kills land in rolls and background seals.
    #[arg(long)]
    segment_bytes: Option<u64>,
    /// The broker's dedup window by age (default: its own, 10 minutes). A
    /// window of a few seconds with small segments makes every restart
    /// rebuild a window that sealed segments older than it precede: the
    /// path where a retried message was once stored twice.
    #[arg(long)]
    dedup_window_ms: Option<u64>,
    /// For testing the checker itself: after the kill in this cycle, zero
    /// 64 KiB in the middle of the stored data (acked records), as a disk
    /// that lost them would. The run must then fail.
    #[arg(long, hide = true)]
    sabotage_cycle: Option<u32>,
}

/// Zeroes 64 KiB in the middle of the data of the torture topic's
/// largest segment: records acked long before the kill (the tail may
/// still be in flight, unacked, on a loaded machine).
fn sabotage(data: &std::path::Path) -> Result<(), String> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let dir = data.join("topics").join(TOPIC).join("0");
    let largest = std::fs::read_dir(&dir)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .max_by_key(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .ok_or("no segment to damage")?;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&largest)
        .map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    let end = bytes.iter().rposition(|b| *b != 0).ok_or("empty segment")? + 1;
    let from = end / 2;
    let to = (from + (64 << 10)).min(end);
    f.seek(SeekFrom::Start(from as u64))
        .map_err(|e| e.to_string())?;
    f.write_all(&vec![0u8; to - from])
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// What a power cut does to the data directory: every segment file loses
/// what lies past its last durable position in `journal` (0 if it was
/// never flushed): zeroed (the pages never reached the disk), or the
/// first part garbled (a torn write) and the rest zeroed. Returns the
/// bytes lost.
fn power_cut(
    data: &std::path::Path,
    journal: &std::path::Path,
    rng: &mut Rng,
) -> Result<u64, String> {
    use std::io::{Seek, SeekFrom, Write};
    let text = std::fs::read_to_string(journal).unwrap_or_default();
    let mut durable: HashMap<PathBuf, u64> = HashMap::new();
    for line in text.lines() {
        let Some((path, end)) = line.rsplit_once(' ') else {
            continue; // a line cut by the kill
        };
        let Ok(end) = end.parse::<u64>() else {
            continue;
        };
        let e = durable.entry(PathBuf::from(path)).or_default();
        *e = (*e).max(end);
    }
    let mut lost = 0u64;
    let mut dirs = vec![data.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))? {
            let path = entry.map_err(|e| e.to_string())?.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|x| x != "log") {
                continue;
            }
            let from = durable.get(&path).copied().unwrap_or(0) as usize;
            let len = std::fs::metadata(&path).map_err(|e| e.to_string())?.len();
            if len <= from as u64 {
                continue; // a sealed segment, trimmed to what was flushed
            }
            let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let end = bytes.iter().rposition(|b| *b != 0).map_or(0, |p| p + 1);
            if end <= from {
                continue;
            }
            let mut damage = vec![0u8; end - from];
            if rng.next().is_multiple_of(2) {
                // Torn: a prefix of what was in flight is garbage.
                let torn = (rng.next() as usize % damage.len()).max(1);
                for b in &mut damage[..torn] {
                    *b = rng.next() as u8;
                }
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            f.seek(SeekFrom::Start(from as u64))
                .map_err(|e| e.to_string())?;
            f.write_all(&damage).map_err(|e| e.to_string())?;
            lost += damage.len() as u64;
        }
    }
    Ok(lost)
}

/// Async flush interval of the tortured broker (its default).
const ASYNC_INTERVAL_MS: u64 = 100;
/// How much later than the interval an acked message may still be lost
/// under async flush: the flush's own duration on a loaded machine.
const ASYNC_SLACK_MS: u64 = 400;

/// The broker's default dedup window by age (`dedup_window_ms`).
const DEDUP_WINDOW_MS_DEFAULT: u64 = 600_000;
const TOPIC: &str = "torture";
const GROUP: &str = "workers";

/// A tiny deterministic generator (xorshift64*): kill times only.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

struct Broker {
    child: Child,
}

impl Broker {
    fn start(
        data: &PathBuf,
        listen: &str,
        journal: Option<&PathBuf>,
        flush: &str,
        segment_bytes: Option<u64>,
        dedup_window_ms: Option<u64>,
    ) -> Result<(Broker, SocketAddr), String> {
        use std::io::{BufRead, BufReader};
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .args([
                "serve",
                "--flush",
                flush,
                "--admin-listen",
                "off",
                "--txn-check-after-ms",
                "300",
                "--txn-check-interval-ms",
                "200",
                "--listen",
                listen,
            ])
            .arg("--data")
            .arg(data)
            .args(segment_bytes.map(|b| format!("--segment-bytes={b}")))
            .args(dedup_window_ms.map(|ms| format!("--dedup-window-ms={ms}")))
            .env("BIDA_LOG", "error")
            .args(journal.map(|j| format!("--fault-flush-journal={}", j.display())))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawning bida serve: {e}"))?;
        let stdout = child.stdout.take().expect("piped");
        let mut line = String::new();
        let mut reader = BufReader::new(stdout);
        reader
            .read_line(&mut line)
            .map_err(|e| format!("reading the broker's address: {e}"))?;
        std::thread::spawn(move || for _ in reader.lines() {});
        let addr = line
            .trim()
            .strip_prefix("bida: listening on ")
            .ok_or_else(|| format!("unexpected broker output {line:?}"))?
            .parse()
            .map_err(|e| format!("{e}"))?;
        Ok((Broker { child }, addr))
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Default)]
struct Ledger {
    /// Ids the broker acknowledged to the producer.
    acked: HashMap<u128, Instant>,
    /// Where each acked id was stored, as the ack said.
    offsets: HashMap<u128, u64>,
    /// Offsets the consumer group's consumer sent an ack for.
    consumer_acked: BTreeSet<u64>,
    /// What the transactional producer decided (or was about to decide)
    /// for each transaction: true for commit.
    txn_intent: HashMap<u128, bool>,
    /// Transactions whose commit the broker acknowledged.
    txn_committed: HashMap<u128, Instant>,
    /// Producer sends the broker answered duplicate: retries of a batch
    /// already stored, and how many came within a second of a restart.
    duplicates: u64,
    duplicates_after_restart: u64,
    /// When the broker was last restarted.
    restarted: Option<Instant>,
}

/// A transactional message's payload: marker, transaction id.
fn txn_payload(txn: u128) -> Vec<u8> {
    let mut p = vec![b'T'];
    p.extend_from_slice(&txn.to_le_bytes());
    p
}

fn txn_of(payload: &[u8]) -> Option<u128> {
    match payload {
        [b'T', rest @ ..] if rest.len() == 16 => {
            Some(u128::from_le_bytes(rest.try_into().expect("16 bytes")))
        }
        _ => None,
    }
}

pub fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    if args.data.exists() {
        return Err(format!(
            "{} exists; remove it or pass another --data",
            args.data.display()
        )
        .into());
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1
    });
    println!("bida torture: {} cycles, seed {seed}", args.cycles);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(torture(&args, seed));
    if !args.keep_data {
        let _ = std::fs::remove_dir_all(&args.data);
        let _ = std::fs::remove_file(args.data.with_extension("flush-journal"));
    }
    match result {
        Ok(summary) => {
            println!("{summary}");
            Ok(ExitCode::SUCCESS)
        }
        Err(violation) => {
            eprintln!("bida torture: VIOLATION (seed {seed}): {violation}");
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn torture(args: &Args, seed: u64) -> Result<String, String> {
    let mut rng = Rng(seed);
    let journal = args
        .power_loss
        .then(|| args.data.with_extension("flush-journal"));
    let async_flush = args.flush == super::FlushArg::Async;
    let flush = if async_flush { "async" } else { "sync" };
    let (mut broker, addr) = Broker::start(
        &args.data,
        "127.0.0.1:0",
        journal.as_ref(),
        flush,
        args.segment_bytes,
        args.dedup_window_ms,
    )?;
    let (mut lost_total, mut lost_oldest_ms) = (0usize, 0u64);
    // When each kill happened: an ack the client handled just after a
    // kill was sent before it, so a loss is judged against every kill.
    let mut kills: Vec<Instant> = Vec::new();
    let mut torn = 0u64;
    let listen = addr.to_string();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let client = Client::connect(addr).await.map_err(|e| e.to_string())?;
    client
        .create_topic(TOPIC, 1, true, Default::default())
        .await
        .map_err(|e| e.to_string())?;
    let producer_task = tokio::spawn(produce(client.clone(), ledger.clone(), stop.clone()));
    let consumer_task = tokio::spawn(consume(client.clone(), ledger.clone(), stop.clone()));
    let txn_task = tokio::spawn(transact(addr, ledger.clone(), stop.clone()));

    // The verification group reads every offset once, in order.
    let verify_client = Client::connect(addr).await.map_err(|e| e.to_string())?;
    let mut verifier = Consumer::new(
        verify_client.clone(),
        TOPIC,
        "verify",
        ConsumerOptions {
            max_messages: 4096,
            max_wait: Duration::from_millis(50),
            ..ConsumerOptions::default()
        },
    );
    // Each stored id and the timestamp of its first copy.
    let mut seen: HashMap<u128, u64> = HashMap::new();
    let window_ms = args.dedup_window_ms.unwrap_or(DEDUP_WINDOW_MS_DEFAULT);
    // Ids stored a second time once their first copy had left the dedup
    // window (allowed: the window is the promise's bound).
    let mut stored_after_window = 0u64;
    let mut seen_txns: HashSet<u128> = HashSet::new();
    let mut next_offset = 0u64;
    let started = Instant::now();
    // What the last check covered: (acked ids, committed transactions).
    let mut last_checked = (0usize, 0usize);
    for cycle in 1..=args.cycles {
        let run_ms = 50 + rng.next() % args.max_run_ms.max(51);
        tokio::time::sleep(Duration::from_millis(run_ms)).await;
        // Everything acked before the kill must survive it.
        type Acked = Vec<(u128, Instant)>;
        let (acked_before, committed_before): (Acked, Acked) = {
            let l = ledger.lock().expect("ledger");
            (
                l.acked.iter().map(|(k, v)| (*k, *v)).collect(),
                l.txn_committed.iter().map(|(k, v)| (*k, *v)).collect(),
            )
        };
        let killed_at = Instant::now();
        kills.push(killed_at);
        let offsets: HashMap<u128, u64> = ledger.lock().expect("ledger").offsets.clone();
        broker.kill();
        if let Some(j) = &journal {
            torn += power_cut(&args.data, j, &mut rng)?;
        }
        if args.sabotage_cycle == Some(cycle) {
            sabotage(&args.data)?;
        }
        let (b, _) = Broker::start(
            &args.data,
            &listen,
            journal.as_ref(),
            flush,
            args.segment_bytes,
            args.dedup_window_ms,
        )?;
        broker = b;
        ledger.lock().expect("ledger").restarted = Some(Instant::now());
        if async_flush {
            // A power cut under async flush may take back offsets already
            // read: read everything again, with a new verification group.
            verifier = Consumer::new(
                verify_client.clone(),
                TOPIC,
                &format!("verify-{cycle}"),
                ConsumerOptions {
                    max_messages: 4096,
                    max_wait: Duration::from_millis(50),
                    ..ConsumerOptions::default()
                },
            );
            seen.clear();
            seen_txns.clear();
            next_offset = 0;
        }
        // Read everything stored so far with the verification group.
        let end = loop {
            match client.describe_topic(TOPIC).await {
                Ok(d) => break d.partitions[0].end,
                Err(e) if e.is_retriable() || e.code().is_none() => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => return Err(format!("describe after restart {cycle}: {e}")),
            }
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while next_offset < end {
            if Instant::now() > deadline {
                return Err(format!(
                    "cycle {cycle}: could not read offsets {next_offset}..{end}"
                ));
            }
            let batch = match verifier.fetch().await {
                Ok(b) => b,
                Err(_) => continue,
            };
            for d in &batch {
                if d.offset != next_offset {
                    return Err(format!(
                        "cycle {cycle}: offset {} follows {}: offsets are not contiguous (or repeated)",
                        d.offset,
                        next_offset.wrapping_sub(1)
                    ));
                }
                if let Some(&first_ms) = seen.get(&d.id.0) {
                    let apart_ms = d.timestamp_ms.saturating_sub(first_ms);
                    if apart_ms < window_ms {
                        return Err(format!(
                            "cycle {cycle}: id {} is stored twice (second at offset {}, {apart_ms} ms after the first, inside the {window_ms} ms dedup window)",
                            d.id, d.offset
                        ));
                    }
                    stored_after_window += 1;
                } else {
                    seen.insert(d.id.0, d.timestamp_ms);
                }
                if let Some(txn) = txn_of(&d.payload) {
                    let intent = ledger.lock().expect("ledger").txn_intent.get(&txn).copied();
                    if intent != Some(true) {
                        return Err(format!(
                            "cycle {cycle}: transaction {txn:032x} is visible at offset {} but was {}",
                            d.offset,
                            if intent.is_some() { "rolled back" } else { "never committed" }
                        ));
                    }
                    if !seen_txns.insert(txn) {
                        return Err(format!(
                            "cycle {cycle}: transaction {txn:032x} was made visible twice"
                        ));
                    }
                }
                next_offset += 1;
            }
            let refs: Vec<_> = batch.iter().collect();
            if !refs.is_empty() {
                let _ = verifier.ack(&refs).await;
            }
        }
        let window = Duration::from_millis(ASYNC_INTERVAL_MS + ASYNC_SLACK_MS);
        // How long before the kill that took it a lost message was acked:
        // the nearest kill at or after its ack (an ack handled up to 200 ms
        // after a kill was in flight when it happened).
        let age_at_kill = |acked_at: Instant| {
            kills
                .iter()
                .filter(|k| acked_at <= **k + Duration::from_millis(200))
                .map(|k| k.saturating_duration_since(acked_at))
                .min()
                .unwrap_or_else(|| killed_at.duration_since(acked_at))
        };
        let mut forget = Vec::new();
        for (id, acked_at) in &acked_before {
            if seen.contains_key(id) {
                continue;
            }
            let age = age_at_kill(*acked_at);
            if !async_flush || age > window {
                return Err(format!(
                    "cycle {cycle}: id {} was acked {} ms before the kill and is missing after the restart (stored at offset {})",
                    InnerMsgId(*id),
                    age.as_millis(),
                    offsets.get(id).copied().unwrap_or(u64::MAX)
                ));
            }
            lost_oldest_ms = lost_oldest_ms.max(age.as_millis() as u64);
            forget.push(*id);
        }
        for (txn, committed_at) in &committed_before {
            if seen_txns.contains(txn) {
                continue;
            }
            let age = age_at_kill(*committed_at);
            if !async_flush || age > window {
                return Err(format!(
                    "cycle {cycle}: transaction {txn:032x} was committed {} ms before the kill and is not visible after the restart",
                    age.as_millis()
                ));
            }
            ledger.lock().expect("ledger").txn_committed.remove(txn);
        }
        if !forget.is_empty() {
            lost_total += forget.len();
            let mut l = ledger.lock().expect("ledger");
            for id in &forget {
                l.acked.remove(id);
            }
        }
        // The group may not have moved past an offset its consumer did not ack.
        let position = loop {
            match client.group_position(TOPIC, GROUP).await {
                Ok(p) => break p,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        // (Under async flush a power cut may take back offsets the group
        // had acked, and hand them to new messages: this check needs sync.)
        if let Some(p) = position.first().filter(|_| !async_flush) {
            let l = ledger.lock().expect("ledger");
            let unacked = (0..p.committed).find(|o| !l.consumer_acked.contains(o));
            if let Some(o) = unacked {
                return Err(format!(
                    "cycle {cycle}: group {GROUP} committed {} but its consumer never acked offset {o}",
                    p.committed
                ));
            }
        }
        last_checked = (acked_before.len(), committed_before.len());
        if cycle % 10 == 0 || cycle == args.cycles {
            println!(
                "cycle {cycle}: {} messages stored, {} acked to the producer, {} transactions committed, all present once",
                next_offset,
                acked_before.len(),
                committed_before.len()
            );
        }
    }
    stop.store(true, Ordering::Release);
    let _ = producer_task.await;
    let _ = consumer_task.await;
    let _ = txn_task.await;
    drop(broker);
    let l = ledger.lock().expect("ledger");
    let rolled_back = l.txn_intent.values().filter(|c| !**c).count();
    println!(
        "retries: {} sends answered duplicate (stored once), {} of them in the first second after a restart; {stored_after_window} ids stored again after leaving the {window_ms} ms dedup window",
        l.duplicates,
        l.duplicates_after_restart
    );
    if journal.is_some() {
        println!("power cuts: {torn} bytes written but not flushed were zeroed or garbled");
    }
    if async_flush {
        println!(
            "async flush: {lost_total} acked messages lost to the kills, the oldest acked {lost_oldest_ms} ms before its kill (allowed: {} ms)",
            ASYNC_INTERVAL_MS + ASYNC_SLACK_MS
        );
    }
    Ok(format!(
        "bida torture: {} cycles in {:.1} s; by the last check {} messages stored, {} of them acked to the producer before a kill, {} transactions committed before a kill; {} transactions rolled back in all; {}",
        args.cycles,
        started.elapsed().as_secs_f64(),
        next_offset,
        last_checked.0,
        last_checked.1,
        rolled_back,
        if async_flush {
            "acked messages lost only within the async flush window, none stored twice, offsets contiguous, nothing rolled back visible"
        } else {
            "no acked message lost, none stored twice, offsets contiguous, no unacked message skipped, nothing rolled back visible"
        }
    ))
}

/// Sends numbered messages in a pipelined stream; every ack goes in the
/// ledger. Sends that fail after their retries are simply not acked.
async fn produce(client: Arc<Client>, ledger: Arc<Mutex<Ledger>>, stop: Arc<AtomicBool>) {
    let options = ProducerOptions {
        attempts: 1000,
        request_timeout: Duration::from_millis(500),
        backoff: RetryBackoff::Fixed(Duration::from_millis(20)),
        inflight_batches_max: 8,
        batch_messages_max: 200,
        ..ProducerOptions::default()
    };
    let producer = loop {
        match Producer::new(client.clone(), TOPIC, options.clone()).await {
            Ok(p) => break p,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let mut n = 0u64;
    while !stop.load(Ordering::Acquire) {
        for _ in 0..200 {
            n += 1;
            let ledger = ledger.clone();
            producer
                .send_with_callback(OutgoingMessage::new(n.to_le_bytes().to_vec()), move |r| {
                    if let Ok(r) = r {
                        let mut l = ledger.lock().expect("ledger");
                        if r.duplicate {
                            l.duplicates += 1;
                            if l.restarted
                                .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
                            {
                                l.duplicates_after_restart += 1;
                            }
                        }
                        drop(l);
                        ledger
                            .lock()
                            .expect("ledger")
                            .acked
                            .insert(r.id.0, Instant::now());
                        ledger
                            .lock()
                            .expect("ledger")
                            .offsets
                            .insert(r.id.0, r.offset);
                    }
                })
                .await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    producer.flush().await;
}

/// The consumer group's worker: fetches and acks, recording every offset
/// it sends an ack for.
async fn consume(client: Arc<Client>, ledger: Arc<Mutex<Ledger>>, stop: Arc<AtomicBool>) {
    let consumer = Consumer::new(
        client,
        TOPIC,
        GROUP,
        ConsumerOptions {
            max_messages: 500,
            max_wait: Duration::from_millis(50),
            ..ConsumerOptions::default()
        },
    );
    while !stop.load(Ordering::Acquire) {
        let Ok(batch) = consumer.fetch().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let refs: Vec<_> = batch.iter().collect();
        if refs.is_empty() {
            continue;
        }
        // Recorded before sending: an ack the broker applied just before
        // a kill may never be answered, and still counts as sent.
        ledger
            .lock()
            .expect("ledger")
            .consumer_acked
            .extend(batch.iter().map(|d| d.offset));
        let _ = consumer.ack(&refs).await;
    }
}

/// A transactional producer: one half per transaction, committed two
/// times in three, rolled back otherwise. Its intent is recorded before
/// the decision is sent, and check-backs are answered from that record
/// (unknown when the crash came before the producer decided).
async fn transact(addr: SocketAddr, ledger: Arc<Mutex<Ledger>>, stop: Arc<AtomicBool>) {
    let checked = ledger.clone();
    let checker = move |check: &bida::protocol::txn::Check| match checked
        .lock()
        .expect("ledger")
        .txn_intent
        .get(&check.txn_id)
    {
        Some(true) => Decision::Commit,
        Some(false) => Decision::Rollback,
        None => Decision::Unknown,
    };
    let producer = loop {
        if stop.load(Ordering::Acquire) {
            return;
        }
        match TransactionalProducer::connect(addr, "torture-txn", checker.clone()).await {
            Ok(p) => break p,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let producer = producer.with_retry(RetryOptions {
        attempts: 1000,
        timeout: Duration::from_millis(500),
        backoff: RetryBackoff::Fixed(Duration::from_millis(20)),
    });
    let mut n = 0u64;
    while !stop.load(Ordering::Acquire) {
        n += 1;
        let mut t = producer.begin();
        let txn = t.id();
        if t.send_half(TOPIC, OutgoingMessage::new(txn_payload(txn)))
            .await
            .is_err()
        {
            continue;
        }
        let commit = !n.is_multiple_of(3);
        ledger
            .lock()
            .expect("ledger")
            .txn_intent
            .insert(txn, commit);
        if commit {
            if t.commit().await.is_ok() {
                ledger
                    .lock()
                    .expect("ledger")
                    .txn_committed
                    .insert(txn, Instant::now());
            }
        } else {
            let _ = t.rollback().await;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
