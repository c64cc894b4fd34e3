//! An order service that writes its order row and its "order created"
//! message atomically, with a bida transaction (see README.md).
//!
//! Its local store is a file of committed order rows, one per line, each
//! written with one `write` and made durable with `fsync` (the "local
//! transaction"). The flow per order:
//!
//! 1. `begin` + `send_half`: the message is stored by the broker, invisible;
//! 2. the local transaction: append the row, fsync;
//! 3. `commit`: the message becomes visible.
//!
//! If the service dies between 1 and 3, the broker asks any live instance
//! of the producer group `order-service` about the transaction; the check
//! callback answers from the file: row present = committed, absent = rolled
//! back. Try it:
//!
//! ```sh
//! cargo run --release --example order_service -- 127.0.0.1:7878 ./orders.txt 3
//! cargo run --release --example order_service -- 127.0.0.1:7878 ./orders.txt 1 die-after-row
//! cargo run --release --example order_service -- 127.0.0.1:7878 ./orders.txt 1 die-before-row
//! cargo run --release --example order_service -- 127.0.0.1:7878 ./orders.txt 0 answer-checks
//! ```
//!
//! The last one only answers check-backs (for about 20 s, past the
//! broker's first check at 6 s): the order of the `die-after-row` run is
//! then delivered, the one of `die-before-row` never is.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests and benches fail loudly

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bida::client::txn::{Check, Decision, TransactionalProducer};
use bida::client::OutgoingMessage;

const TOPIC: &str = "order-events";
const GROUP: &str = "order-service";

/// The local store: is this order's row there?
fn row_exists(store: &Path, order_id: &str) -> std::io::Result<bool> {
    match std::fs::read_to_string(store) {
        // Only whole lines count: a torn last line is not a committed row.
        Ok(text) => Ok(text
            .split_inclusive('\n')
            .any(|line| line.strip_suffix('\n') == Some(order_id))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// The local transaction: one appended line, then fsync.
fn write_row(store: &Path, order_id: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(store)?;
    f.write_all(format!("{order_id}\n").as_bytes())?;
    f.sync_data()
}

/// The broker asks: did the transaction whose message has key `order_id`
/// commit? The row is written within milliseconds of the half, long before
/// the first check (6 s by default), so a missing row means it never will.
fn check(store: &Path, c: &Check) -> Decision {
    let Some(order_id) = c.key.as_deref().and_then(|k| std::str::from_utf8(k).ok()) else {
        return Decision::Rollback;
    };
    match row_exists(store, order_id) {
        Ok(true) => Decision::Commit,
        Ok(false) => Decision::Rollback,
        Err(_) => Decision::Unknown, // ask again later
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!(
            "usage: order_service BROKER STORE COUNT [die-after-row|die-before-row|answer-checks]"
        );
        std::process::exit(2);
    }
    let broker = args[1].parse()?;
    let store = PathBuf::from(&args[2]);
    let count: u32 = args[3].parse()?;
    let mode = args.get(4).map(String::as_str).unwrap_or("");

    let checked_store = store.clone();
    let producer = TransactionalProducer::connect(broker, GROUP, move |c| {
        let d = check(&checked_store, c);
        eprintln!(
            "check #{} for {:?}: {d:?}",
            c.check,
            c.key.as_deref().map(String::from_utf8_lossy)
        );
        d
    })
    .await?;

    for i in 0..count {
        let order_id = format!("order-{}-{i}", std::process::id());
        let mut txn = producer.begin();
        txn.send_half(
            TOPIC,
            OutgoingMessage::new(format!(
                "{{\"event\":\"order created\",\"order\":\"{order_id}\"}}"
            ))
            .with_key(order_id.clone()),
        )
        .await?;
        if mode == "die-before-row" {
            eprintln!("{order_id}: half stored; dying before the local transaction");
            std::process::exit(1);
        }
        write_row(&store, &order_id)?;
        if mode == "die-after-row" {
            eprintln!("{order_id}: row written; dying before the commit");
            std::process::exit(1);
        }
        let reply = txn.commit().await?;
        println!("{order_id}: committed at {:?}", reply.placed);
    }
    if mode == "answer-checks" {
        tokio::time::sleep(Duration::from_secs(20)).await;
    }
    Ok(())
}
