//! A real broker process on 127.0.0.1, on a port it picks.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct BrokerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    /// The admin HTTP listener (`/metrics`).
    pub admin: SocketAddr,
    /// The Kafka-protocol listener, when started with `--kafka-listen`.
    pub kafka: Option<SocketAddr>,
}

impl BrokerProcess {
    /// Starts `bida serve` on `data` with `extra` flags and waits for its
    /// "listening on" line.
    pub fn start(data: &Path, extra: &[&str]) -> BrokerProcess {
        Self::start_with(data, "127.0.0.1:0", extra, &[])
    }

    /// Starts on `listen` (e.g. the address of a broker that was killed,
    /// so clients reconnect to it) with extra environment variables.
    pub fn start_with(
        data: &Path,
        listen: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> BrokerProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bida"))
            .arg("serve")
            .arg("--data")
            .arg(data)
            .args(["--listen", listen, "--admin-listen", "127.0.0.1:0"])
            .args(extra)
            .env("BIDA_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn bida serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            for _ in 0..3 {
                if let Some(Ok(line)) = lines.next() {
                    let _ = tx.send(line);
                }
            }
            // Keep draining so the broker never blocks on a full pipe.
            for _ in lines {}
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the broker printed its address");
        let addr = line
            .strip_prefix("bida: listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("an address");
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the broker printed its admin address");
        let admin = line
            .strip_prefix("bida: admin on http://")
            .or_else(|| line.strip_prefix("bida: admin on https://"))
            .unwrap_or_else(|| panic!("unexpected second line {line:?}"))
            .parse()
            .expect("an address");
        let kafka = extra.contains(&"--kafka-listen").then(|| {
            let line = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("the broker printed its Kafka address");
            line.strip_prefix("bida: kafka on ")
                .unwrap_or_else(|| panic!("unexpected third line {line:?}"))
                .parse()
                .expect("an address")
        });
        BrokerProcess {
            child,
            addr,
            admin,
            kafka,
        }
    }

    /// Waits for the process to exit by itself (a crash hook), at most
    /// `within`.
    pub fn wait_exit(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.child.try_wait().expect("wait").is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Resident memory of the broker process, in bytes (`VmRSS`).
    pub fn rss_bytes(&self) -> u64 {
        self.status_bytes("VmRSS:")
    }

    /// A `kB` line of `/proc/PID/status` (`VmRSS:`, `RssAnon:`,
    /// `RssFile:`), in bytes.
    pub fn status_bytes(&self, field: &str) -> u64 {
        status_bytes(self.child.id(), field)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits (at most 30 s) for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        rustix_kill(self.child.id());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the broker did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn rustix_kill(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `kB` line of `/proc/PID/status` of any process, in bytes (for a
/// sampler thread that cannot hold the [`BrokerProcess`]).
pub fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/PID/status"))
        * 1024
}
