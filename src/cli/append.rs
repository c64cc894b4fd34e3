//! `bida append`: append messages to a log directly (no broker).
//!
//! With `--generate N` it appends N generated records in batches and prints
//! `offset<TAB>inner-msg-id` for each once it is acknowledged (durable under
//! `--flush sync`): the crash tests kill it and check every printed line.

use std::hash::{BuildHasher, RandomState};
use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::Instant;

use bida::log::{InnerMsgId, Log, Message};

use super::LogArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    log: LogArgs,
    /// Append this many generated records instead of reading stdin.
    #[arg(long)]
    generate: Option<u64>,
    /// Payload bytes of each generated record.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Messages per append.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Print `offset<TAB>inner-msg-id<TAB>duplicate` for every acked message.
    #[arg(long)]
    verbose: bool,
}

/// The payload of generated record `i`: its number, padded to `size` bytes
/// with a pattern derived from it, so a reader can check every byte.
pub fn generated_payload(i: u64, size: usize) -> Vec<u8> {
    let mut payload = Vec::with_capacity(size.max(24));
    payload.extend_from_slice(format!("record-{i}:").as_bytes());
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while payload.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Eight letters per step: cheap enough not to dominate a benchmark.
        let letters = (x & 0x0f0f_0f0f_0f0f_0f0f) + 0x6161_6161_6161_6161;
        let take = (size - payload.len()).min(8);
        payload.extend_from_slice(&letters.to_le_bytes()[..take]);
    }
    payload
}

pub fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let log = Log::open(&args.log.data, args.log.options())?;
    // A random producer id in the high half, a sequence in the low half.
    let producer = u128::from(RandomState::new().hash_one(std::process::id()));
    let batch_len = args.batch.max(1);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let started = Instant::now();
    let mut acked = 0u64;
    let mut duplicates = 0u64;
    let mut seq = 0u64;
    let mut append =
        |payloads: &[Vec<u8>], out: &mut dyn Write| -> Result<(), Box<dyn std::error::Error>> {
            let ids: Vec<InnerMsgId> = payloads
                .iter()
                .map(|_| {
                    seq += 1;
                    InnerMsgId(producer << 64 | u128::from(seq))
                })
                .collect();
            let batch: Vec<Message<'_>> = payloads
                .iter()
                .zip(&ids)
                .map(|(p, &id)| Message {
                    id,
                    payload: p,
                    ..Message::default()
                })
                .collect();
            let appended = log.append_acked(&batch)?;
            for (outcome, id) in appended.outcomes.iter().zip(&ids) {
                acked += 1;
                duplicates += u64::from(outcome.duplicate);
                if args.verbose || args.generate.is_some() {
                    writeln!(out, "{}\t{id}\t{}", outcome.offset, outcome.duplicate)?;
                }
            }
            out.flush()?;
            Ok(())
        };
    if let Some(count) = args.generate {
        let mut i = 0u64;
        while i < count {
            let n = (count - i).min(batch_len as u64);
            let payloads: Vec<Vec<u8>> = (i..i + n)
                .map(|j| generated_payload(j, args.size))
                .collect();
            append(&payloads, &mut out)?;
            i += n;
        }
    } else {
        let stdin = std::io::stdin();
        let mut pending = Vec::with_capacity(batch_len);
        for line in stdin.lock().lines() {
            pending.push(line?.into_bytes());
            if pending.len() == batch_len {
                append(&pending, &mut out)?;
                pending.clear();
            }
        }
        if !pending.is_empty() {
            append(&pending, &mut out)?;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!(
        "appended {acked} message(s) ({duplicates} duplicate) in {elapsed:.3} s; next offset {}",
        log.next_offset()
    );
    log.close()?;
    Ok(ExitCode::SUCCESS)
}
