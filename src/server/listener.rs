//! Accepting connections: the connection cap, accept pacing, TLS
//! handshakes, and the stop that tells every connection and waits for them.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use super::admission::Rooms;
use super::conn::connection;
use super::{error_frame, SHUTDOWN_GRACE};
use crate::broker::Broker;
use crate::protocol::ErrorCode;
use crate::tls::TlsAcceptor;

/// Accepts connections until `shutdown` completes, then stops every
/// connection (each is told with a SHUTTING_DOWN error) and waits up to
/// five seconds for them. The caller closes the broker afterwards.
///
/// With `tls`, every connection runs its handshake first (bounded by the
/// frame timeout) and the frames travel inside TLS.
pub async fn serve(
    broker: Arc<Broker>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    let config = broker.config().clone();
    let limit = Arc::new(Semaphore::new(config.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut pace = AcceptPace::new(config.accept_rate_max, Instant::now());
    let rooms = Arc::new(Rooms::new(&config));
    let timer = tokio::spawn(broker.clone().run_expiry_timer(stop_rx.clone()));
    tokio::pin!(shutdown);
    loop {
        let pause = pace
            .as_mut()
            .map_or(Duration::ZERO, |p| p.wait(Instant::now()));
        tokio::select! {
            _ = &mut shutdown => break,
            // Over the accept rate: connections wait in the kernel's
            // backlog meanwhile.
            _ = tokio::time::sleep(pause), if !pause.is_zero() => continue,
            accepted = listener.accept(), if pause.is_zero() => {
                if let Some(p) = &mut pace {
                    p.take();
                }
                let stream = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let peer = stream.peer_addr().ok();
                match (limit.clone().try_acquire_owned(), &tls) {
                    (Ok(permit), None) => {
                        let (rd, wr) = stream.into_split();
                        tasks.spawn(connection(broker.clone(), rooms.clone(), rd, wr, peer, permit, stop_rx.clone()));
                    }
                    (Ok(permit), Some(acceptor)) => {
                        let (acceptor, broker, rooms, stop) = (acceptor.clone(), broker.clone(), rooms.clone(), stop_rx.clone());
                        let handshake = Duration::from_millis(config.frame_timeout_ms);
                        tasks.spawn(async move {
                            match tokio::time::timeout(handshake, acceptor.accept(stream)).await {
                                Ok(Ok(tls)) => {
                                    let (rd, wr) = tokio::io::split(tls);
                                    connection(broker, rooms, rd, wr, peer, permit, stop).await;
                                }
                                Ok(Err(e)) => tracing::debug!(?peer, error = %e, "TLS handshake failed"),
                                Err(_) => tracing::debug!(?peer, "TLS handshake timed out"),
                            }
                        });
                    }
                    // Over TLS an error frame could not be read before a
                    // handshake: refuse by closing.
                    (Err(_), Some(_)) => drop(stream),
                    (Err(_), None) => {
                        tasks.spawn(refuse(stream, config.max_connections));
                    }
                }
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    broker.begin_stop();
    let _ = stop_tx.send(true);
    let _ = timer.await;
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = tasks.len(),
            "connections still open after the grace period; aborting them"
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

/// `accept_rate_max` as a token bucket: that many accepts a second, in a
/// burst of as many.
struct AcceptPace {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl AcceptPace {
    /// `None` for no limit (0).
    fn new(rate: u32, now: Instant) -> Option<AcceptPace> {
        (rate > 0).then_some(AcceptPace {
            rate: rate as f64,
            tokens: rate as f64,
            at: now,
        })
    }

    /// How long until the next accept is allowed; zero: now.
    fn wait(&mut self, now: Instant) -> Duration {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + earned).min(self.rate);
        self.at = now;
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
        }
    }

    fn take(&mut self) {
        self.tokens -= 1.0;
    }
}

async fn refuse(mut stream: TcpStream, max: usize) {
    let f = error_frame(
        0,
        ErrorCode::TooManyConnections,
        format!("the broker holds its maximum of {max} connections"),
    );
    let _ = stream.write_all(&f).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_are_paced_to_the_rate_after_a_burst() {
        assert!(AcceptPace::new(0, Instant::now()).is_none(), "0: no limit");
        let t0 = Instant::now();
        let mut pace = AcceptPace::new(100, t0).unwrap();
        for _ in 0..100 {
            assert_eq!(pace.wait(t0), Duration::ZERO, "the burst");
            pace.take();
        }
        let wait = pace.wait(t0);
        assert!(
            wait > Duration::from_millis(9) && wait <= Duration::from_millis(10),
            "{wait:?}"
        );
        // One a second per rate, and idle time refills no more than a burst.
        let t1 = t0 + Duration::from_millis(10);
        assert_eq!(pace.wait(t1), Duration::ZERO);
        pace.take();
        assert!(pace.wait(t1) > Duration::ZERO);
        let later = t1 + Duration::from_secs(60);
        let mut allowed = 0;
        while pace.wait(later).is_zero() {
            pace.take();
            allowed += 1;
        }
        assert_eq!(allowed, 100);
    }
}
