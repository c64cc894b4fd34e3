//! Memory admission at the edge: the broker-wide budgets for large frames
//! still arriving ([`FrameRoom`]) and for deliveries queued to clients
//! ([`ReplyRoom`]), and who holds them. Clients that stall cannot keep
//! either from clients that send and read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::cmd::fetch::DELIVERY_BYTES_MAX;
use crate::broker::BrokerConfig;
use crate::sync::lock;

/// Bytes of deliveries (FETCH replies, DELIVER pushes) one connection may
/// have queued for its writer; more wait until the client reads.
pub const REPLY_ROOM_BYTES: u32 = 2 * DELIVERY_BYTES_MAX;
/// Frames larger than this need room in the broker-wide
/// `frame_memory_max` budget before the broker reads them in.
pub const LARGE_FRAME_BYTES: usize = 64 << 10;
/// A large frame whose connection has not delivered `PROGRESS_BYTES` more
/// of it for this long may be evicted (its connection closed with
/// FRAME_TIMEOUT) when another connection needs the room it holds.
pub const STALL_EVICT: Duration = Duration::from_millis(250);
/// Bytes of a large frame that count as progress.
pub(super) const PROGRESS_BYTES: usize = 64 << 10;
/// A large frame takes room in steps of this as its bytes arrive, so it
/// holds about what it has sent, not what it announced.
pub(super) const ROOM_STEP: usize = 1 << 20;
/// Large frames of at most this size (a produce batch of ~1,000 small
/// messages is ~120 KiB) may take room from a reserve that larger frames
/// cannot touch, so clients that announce huge frames and stall delay them
/// not even until the stalled are evicted.
pub const RESERVE_FRAME_BYTES_MAX: usize = 1 << 20;

/// The broker-wide budget for large frames still arriving
/// (`frame_memory_max`, in KiB), and who holds it: when the budget is
/// spent, a connection that needs room evicts the holder that has stalled
/// longest (no `PROGRESS_BYTES` for `STALL_EVICT`). Clients that announce
/// big frames and stall, or trickle them, cannot keep the room from
/// clients that send.
///
/// An eighth of the budget (less if that would leave the rest smaller than
/// one frame of `frame_bytes_max`) is a reserve only frames of at most
/// `RESERVE_FRAME_BYTES_MAX` may take, tried before the rest.
pub struct FrameRoom {
    kib: Arc<Semaphore>,
    reserve: Arc<Semaphore>,
    holders: Mutex<HashMap<u64, Holder>>,
}

/// Names each connection in the frame and reply rooms.
static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh id for a connection.
pub(super) fn next_connection_id() -> u64 {
    NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed)
}

struct Holder {
    progress_at: Instant,
    /// Waiting for more room: its client is not the one stalling it.
    waiting: bool,
    evict: Arc<Notify>,
}

impl FrameRoom {
    pub fn new(bytes: u64, frame_bytes_max: u32) -> FrameRoom {
        let kib = (bytes / 1024).min(Semaphore::MAX_PERMITS as u64) as usize;
        let reserve = (kib / 8).min(kib.saturating_sub(frame_bytes_max.div_ceil(1024) as usize));
        FrameRoom {
            kib: Arc::new(Semaphore::new(kib - reserve)),
            reserve: Arc::new(Semaphore::new(reserve)),
            holders: Mutex::new(HashMap::new()),
        }
    }

    fn holders(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Holder>> {
        lock(&self.holders)
    }

    /// Waits for `kib` of room until `deadline`, evicting stalled holders
    /// meanwhile. `None` at the deadline. A frame of at most
    /// `RESERVE_FRAME_BYTES_MAX` (`whole_frame`) tries the reserve first.
    pub(super) async fn acquire(
        &self,
        id: u64,
        kib: u32,
        whole_frame: Option<usize>,
        evict: &Arc<Notify>,
        deadline: Instant,
    ) -> Option<OwnedSemaphorePermit> {
        let reserved = whole_frame
            .filter(|&n| n <= RESERVE_FRAME_BYTES_MAX)
            .and_then(|_| self.reserve.clone().try_acquire_many_owned(kib).ok());
        if let Some(p) = reserved {
            self.hold(id, evict);
            return Some(p);
        }
        if let Some(h) = self.holders().get_mut(&id) {
            h.waiting = true;
        }
        loop {
            let wait = (Instant::now() + Duration::from_millis(50)).min(deadline);
            let acquired = tokio::select! {
                // Evicted while waiting for more: this connection is done.
                _ = evict.notified() => return None,
                a = tokio::time::timeout_at(wait.into(), self.kib.clone().acquire_many_owned(kib)) => a,
            };
            match acquired {
                Ok(Ok(p)) => {
                    self.hold(id, evict);
                    return Some(p);
                }
                Ok(Err(_)) => return None,
                Err(_) if Instant::now() >= deadline => return None,
                Err(_) => self.evict_stalled(id),
            }
        }
    }

    /// Records that `id` holds room and has just made progress.
    fn hold(&self, id: u64, evict: &Arc<Notify>) {
        self.holders().insert(
            id,
            Holder {
                progress_at: Instant::now(),
                waiting: false,
                evict: evict.clone(),
            },
        );
    }

    /// Evicts every holder (other than `id`) whose client has stalled for
    /// `STALL_EVICT`. Holders waiting for more room are not stalled by
    /// their clients and are spared, unless every holder is waiting (each
    /// for room another holds): then the one waiting longest goes, once it
    /// has waited `STALL_EVICT`.
    fn evict_stalled(&self, id: u64) {
        let now = Instant::now();
        let stalled = |v: &Holder| now.duration_since(v.progress_at) >= STALL_EVICT;
        let mut holders = self.holders();
        let before = holders.len();
        holders.retain(|h, v| {
            let evict = *h != id && !v.waiting && stalled(v);
            if evict {
                v.evict.notify_one();
            }
            !evict
        });
        if holders.len() < before || holders.values().any(|v| !v.waiting) {
            return;
        }
        let longest = holders
            .iter()
            .filter(|(h, v)| **h != id && stalled(v))
            .min_by_key(|(_, v)| v.progress_at)
            .map(|(h, _)| *h);
        if let Some(h) = longest.and_then(|h| holders.remove(&h)) {
            h.evict.notify_one();
        }
    }

    pub(super) fn progress(&self, id: u64) {
        if let Some(h) = self.holders().get_mut(&id) {
            h.progress_at = Instant::now();
        }
    }

    pub(super) fn release(&self, id: u64) {
        self.holders().remove(&id);
    }
}

/// The broker-wide budget for deliveries built and queued to clients
/// (as large as `frame_memory_max`), on top of each connection's
/// `REPLY_ROOM_BYTES`. When it is spent, a connection that needs room ends
/// every connection whose writer has waited `STALL_EVICT` for its client
/// to read while holding room: clients that do not read cannot keep it
/// from clients that do.
pub struct ReplyRoom {
    kib: Arc<Semaphore>,
    readers: Mutex<HashMap<u64, Reader>>,
}

pub(super) struct Reader {
    pub held_kib: Arc<AtomicUsize>,
    pub blocked_since_ms: Arc<AtomicU64>,
    pub writer: tokio::task::AbortHandle,
}

/// Room for one queued delivery, given back when the writer takes it.
pub struct ReplyPermit {
    pub(super) own: OwnedSemaphorePermit,
    pub(super) shared: OwnedSemaphorePermit,
    pub(super) held_kib: Arc<AtomicUsize>,
    pub(super) kib: usize,
}

impl ReplyPermit {
    /// Gives back what a built frame of `bytes` does not use: room is taken
    /// for the largest reply a request may get, and most are smaller.
    pub(super) fn shrink_to(&mut self, bytes: usize) {
        let kib = bytes.div_ceil(1024).max(1);
        if kib < self.kib {
            let spare = self.kib - kib;
            drop(self.own.split(spare));
            drop(self.shared.split(spare));
            self.held_kib.fetch_sub(spare, Ordering::AcqRel);
            self.kib = kib;
        }
    }
}

impl Drop for ReplyPermit {
    fn drop(&mut self) {
        self.held_kib.fetch_sub(self.kib, Ordering::AcqRel);
    }
}

impl ReplyRoom {
    pub fn new(bytes: u64) -> ReplyRoom {
        let kib = (bytes / 1024).min(Semaphore::MAX_PERMITS as u64) as usize;
        ReplyRoom {
            kib: Arc::new(Semaphore::new(kib)),
            readers: Mutex::new(HashMap::new()),
        }
    }

    pub(super) fn readers(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Reader>> {
        lock(&self.readers)
    }

    /// Waits for `kib` of shared room, ending stalled readers meanwhile.
    pub(super) async fn acquire(&self, id: u64, kib: u32) -> Option<OwnedSemaphorePermit> {
        loop {
            let wait = tokio::time::Instant::now() + Duration::from_millis(50);
            match tokio::time::timeout_at(wait, self.kib.clone().acquire_many_owned(kib)).await {
                Ok(p) => return p.ok(),
                Err(_) => self.evict_stalled(id),
            }
        }
    }

    fn evict_stalled(&self, id: u64) {
        let now = crate::net::clock_ms();
        let stall = STALL_EVICT.as_millis() as u64;
        self.readers().retain(|r, v| {
            let since = v.blocked_since_ms.load(Ordering::Acquire);
            let stalled = *r != id
                && since != 0
                && now.saturating_sub(since) >= stall
                && v.held_kib.load(Ordering::Acquire) > 0;
            if stalled {
                tracing::debug!("ending a connection that does not read its deliveries while others wait for room");
                v.writer.abort();
            }
            !stalled
        });
    }
}

/// Both budgets of one listener, sized from the broker's config.
pub(super) struct Rooms {
    pub frames: FrameRoom,
    pub replies: ReplyRoom,
}

impl Rooms {
    pub fn new(config: &BrokerConfig) -> Rooms {
        Rooms {
            frames: FrameRoom::new(config.frame_memory_max, config.frame_bytes_max),
            replies: ReplyRoom::new(config.frame_memory_max),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_spares_holders_waiting_for_room_unless_all_are() {
        let room = FrameRoom::new(64 << 20, 16 << 20);
        let now = Instant::now();
        let put = |id: u64, ago_ms: u64, waiting: bool| {
            room.holders().insert(
                id,
                Holder {
                    progress_at: now - Duration::from_millis(ago_ms),
                    waiting,
                    evict: Arc::new(Notify::new()),
                },
            );
        };
        let ids = || {
            let mut v: Vec<u64> = room.holders().keys().copied().collect();
            v.sort();
            v
        };
        put(1, 1_000, false); // its client stalled: evicted
        put(2, 1_000, true); // waits for room: spared
        put(3, 10, false); // progressing
        room.evict_stalled(99);
        assert_eq!(ids(), vec![2, 3]);
        // All waiting, each for room another holds: the longest waiter goes.
        room.release(3);
        put(4, 600, true);
        put(5, 10, true);
        room.evict_stalled(5);
        assert_eq!(ids(), vec![4, 5]);
        room.evict_stalled(5);
        assert_eq!(ids(), vec![5]);
        // Not before it has waited STALL_EVICT, and never the caller.
        put(6, 100, true);
        room.evict_stalled(5);
        room.evict_stalled(6);
        assert_eq!(ids(), vec![5, 6]);
    }

    #[test]
    fn a_built_reply_gives_back_the_room_it_does_not_use() {
        let own = Arc::new(Semaphore::new(16 * 1024));
        let shared = ReplyRoom::new(64 << 20);
        let held = Arc::new(AtomicUsize::new(8 * 1024));
        let mut permit = ReplyPermit {
            own: own.clone().try_acquire_many_owned(8 * 1024).unwrap(),
            shared: shared.kib.clone().try_acquire_many_owned(8 * 1024).unwrap(),
            held_kib: held.clone(),
            kib: 8 * 1024,
        };
        permit.shrink_to(3000);
        assert_eq!(own.available_permits(), 16 * 1024 - 3);
        assert_eq!(shared.kib.available_permits(), 64 * 1024 - 3);
        assert_eq!(held.load(Ordering::Acquire), 3);
        // Never below one KiB, and never grows.
        permit.shrink_to(0);
        assert_eq!(permit.kib, 1);
        permit.shrink_to(1 << 20);
        assert_eq!(permit.kib, 1);
        drop(permit);
        assert_eq!(own.available_permits(), 16 * 1024);
        assert_eq!(shared.kib.available_permits(), 64 * 1024);
        assert_eq!(held.load(Ordering::Acquire), 0);
    }
}
