//! `bida torture` in CI: a short crash cycle against a real broker, and
//! proof that its checker fails when acked data is lost.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests and benches fail loudly

use std::process::Command;

fn torture(dir: &std::path::Path, extra: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bida"))
        .arg("torture")
        .arg("--data")
        .arg(dir.join("d"))
        .args(extra)
        .output()
        .expect("run bida torture");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn sigkill_cycles_lose_nothing_acked_and_store_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, text) = torture(dir.path(), &["--cycles", "8"]);
    assert!(ok, "{text}");
    assert!(text.contains("no acked message lost"), "{text}");
}

#[test]
fn the_checker_catches_lost_acked_data() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, text) = torture(dir.path(), &["--cycles", "3", "--sabotage-cycle", "2"]);
    assert!(!ok, "zeroed acked records went unnoticed:\n{text}");
    assert!(text.contains("VIOLATION"), "{text}");
}

#[test]
fn power_cuts_lose_nothing_acked_under_sync_flush() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, text) = torture(dir.path(), &["--cycles", "5", "--power-loss"]);
    assert!(ok, "{text}");
    assert!(text.contains("no acked message lost"), "{text}");
    assert!(text.contains("power cuts:"), "{text}");
}

#[test]
fn power_cuts_under_async_flush_lose_only_the_flush_window() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, text) = torture(
        dir.path(),
        &["--cycles", "5", "--power-loss", "--flush", "async"],
    );
    assert!(ok, "{text}");
    assert!(
        text.contains("lost only within the async flush window"),
        "{text}"
    );
}

#[test]
fn crashes_in_rolls_and_background_seals_lose_nothing_acked() {
    // 1 MiB segments: every cycle rolls many times, so kills and power
    // cuts land between a roll and the background seal of its segment.
    let dir = tempfile::tempdir().unwrap();
    let (ok, text) = torture(
        dir.path(),
        &[
            "--cycles",
            "6",
            "--power-loss",
            "--segment-bytes",
            "1048576",
        ],
    );
    assert!(ok, "{text}");
    assert!(text.contains("no acked message lost"), "{text}");
}

#[test]
fn retries_across_restarts_are_stored_once_past_a_short_dedup_window() {
    // A 2-second window and 1 MiB segments: after the first few cycles
    // every restart rebuilds the window behind sealed segments older than
    // it, where a retried batch was once stored a second time.
    let dir = tempfile::tempdir().unwrap();
    let (ok, text) = torture(
        dir.path(),
        &[
            "--cycles",
            "16",
            "--segment-bytes",
            "1048576",
            "--dedup-window-ms",
            "2000",
        ],
    );
    assert!(ok, "{text}");
    assert!(text.contains("none stored twice"), "{text}");
    let in_seconds = text
        .split(" cycles in ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|t| t.parse::<f64>().ok())
        .expect("the run's length");
    assert!(
        in_seconds > 2.0,
        "the run must outlast the dedup window to reach the rebuild path: {text}"
    );
}
