//! The wall clock the log stamps records with and judges ages by.
//!
//! Every age the engine acts on (the dedup window, segment age rolls,
//! retention) is measured with one [`Clock`] from [`Options`](super::Options),
//! so a test can move time forward by hours in a microsecond and reach what
//! a run inside the default windows never does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch: the system clock, or a manual one that
/// moves only when told (tests). Clones of a manual clock share its time.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    manual: Option<Arc<AtomicU64>>,
}

impl Clock {
    /// The system's wall clock (the default).
    pub fn system() -> Self {
        Clock { manual: None }
    }

    /// A clock that stands at `start_ms` until [`Clock::advance`] moves it.
    pub fn manual(start_ms: u64) -> Self {
        Clock {
            manual: Some(Arc::new(AtomicU64::new(start_ms))),
        }
    }

    /// The time now, in milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        match &self.manual {
            Some(ms) => ms.load(Ordering::Acquire),
            None => system_now_ms(),
        }
    }

    /// Moves a manual clock forward; the system clock ignores it.
    pub fn advance(&self, ms: u64) {
        if let Some(now) = &self.manual {
            now.fetch_add(ms, Ordering::AcqRel);
        }
    }

    /// True for a manual clock.
    pub fn is_manual(&self) -> bool {
        self.manual.is_some()
    }
}

/// Two clocks are equal when they are both the system clock or clones of one
/// manual clock.
impl PartialEq for Clock {
    fn eq(&self, other: &Self) -> bool {
        match (&self.manual, &other.manual) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for Clock {}

/// The system's wall clock in milliseconds since the Unix epoch (0 before it).
pub fn system_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told_and_clones_share_it() {
        let clock = Clock::manual(1_000);
        let clone = clock.clone();
        assert_eq!(clock.now_ms(), 1_000);
        clone.advance(250);
        assert_eq!(clock.now_ms(), 1_250);
        assert_eq!(clock, clone);
        assert_ne!(clock, Clock::manual(1_250));
        assert_ne!(clock, Clock::system());
        assert!(Clock::system().now_ms() > 1_600_000_000_000);
    }
}
