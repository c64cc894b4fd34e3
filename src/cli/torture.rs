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
    /// For testing the checker itself: after the kill in this cycle, zero
    /// the last 64 KiB of stored data (acked records), as a disk that
    /// lost them would. The run must then fail.
    #[arg(long, hide = true)]
    sabotage_cycle: Option<u32>,
}

/// Zeroes the last 64 KiB before the end of the data in the newest
/// segment of the torture topic.
fn sabotage(data: &std::path::Path) -> Result<(), String> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let dir = data.join("topics").join(TOPIC).join("0");
    let newest = std::fs::read_dir(&dir)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .max()
        .ok_or("no segment to damage")?;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&newest)
        .map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    let end = bytes.iter().rposition(|b| *b != 0).ok_or("empty segment")? + 1;
    let from = end.saturating_sub(64 << 10);
    f.seek(SeekFrom::Start(from as u64))
        .map_err(|e| e.to_string())?;
    f.write_all(&vec![0u8; end - from])
        .map_err(|e| e.to_string())?;
    Ok(())
}

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
    fn start(data: &PathBuf, listen: &str) -> Result<(Broker, SocketAddr), String> {
        use std::io::{BufRead, BufReader};
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .args([
                "serve",
                "--flush",
                "sync",
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
            .env("BIDA_LOG", "error")
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
    acked: HashSet<u128>,
    /// Offsets the consumer group's consumer sent an ack for.
    consumer_acked: BTreeSet<u64>,
    /// What the transactional producer decided (or was about to decide)
    /// for each transaction: true for commit.
    txn_intent: HashMap<u128, bool>,
    /// Transactions whose commit the broker acknowledged.
    txn_committed: HashSet<u128>,
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
    let (mut broker, addr) = Broker::start(&args.data, "127.0.0.1:0")?;
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
    let verifier = Consumer::new(
        verify_client,
        TOPIC,
        "verify",
        ConsumerOptions {
            max_messages: 4096,
            max_wait: Duration::from_millis(50),
            ..ConsumerOptions::default()
        },
    );
    let mut seen: HashSet<u128> = HashSet::new();
    let mut seen_txns: HashSet<u128> = HashSet::new();
    let mut next_offset = 0u64;
    let started = Instant::now();
    // What the last check covered: (acked ids, committed transactions).
    let mut last_checked = (0usize, 0usize);
    for cycle in 1..=args.cycles {
        let run_ms = 50 + rng.next() % args.max_run_ms.max(51);
        tokio::time::sleep(Duration::from_millis(run_ms)).await;
        // Everything acked before the kill must survive it.
        let (acked_before, committed_before): (Vec<u128>, Vec<u128>) = {
            let l = ledger.lock().expect("ledger");
            (
                l.acked.iter().copied().collect(),
                l.txn_committed.iter().copied().collect(),
            )
        };
        broker.kill();
        if args.sabotage_cycle == Some(cycle) {
            sabotage(&args.data)?;
        }
        let (b, _) = Broker::start(&args.data, &listen)?;
        broker = b;
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
                if !seen.insert(d.id.0) {
                    return Err(format!(
                        "cycle {cycle}: id {} is stored twice (second at offset {})",
                        d.id, d.offset
                    ));
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
        if let Some(lost) = acked_before.iter().find(|id| !seen.contains(id)) {
            return Err(format!(
                "cycle {cycle}: id {} was acked before the kill and is missing after the restart",
                InnerMsgId(*lost)
            ));
        }
        if let Some(lost) = committed_before.iter().find(|t| !seen_txns.contains(t)) {
            return Err(format!(
                "cycle {cycle}: transaction {lost:032x} was committed before the kill and is not visible after the restart"
            ));
        }
        // The group may not have moved past an offset its consumer did not ack.
        let position = loop {
            match client.group_position(TOPIC, GROUP).await {
                Ok(p) => break p,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        if let Some(p) = position.first() {
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
    Ok(format!(
        "bida torture: {} cycles in {:.1} s; by the last check {} messages stored, {} of them acked to the producer before a kill, {} transactions committed before a kill; {} transactions rolled back in all; no acked message lost, none stored twice, offsets contiguous, no unacked message skipped, nothing rolled back visible",
        args.cycles,
        started.elapsed().as_secs_f64(),
        next_offset,
        last_checked.0,
        last_checked.1,
        rolled_back
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
                        ledger.lock().expect("ledger").acked.insert(r.id.0);
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
                ledger.lock().expect("ledger").txn_committed.insert(txn);
            }
        } else {
            let _ = t.rollback().await;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
