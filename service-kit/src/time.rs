//! Time and numbers both services share: milliseconds since the epoch, an injectable
//! clock (tests move it), saturating conversions between the unsigned counters of the API
//! and the signed integers SQL stores, and the registry of PostgreSQL advisory-lock keys.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// A source of the current time (injectable: tests run schedules, windows and grants on a
/// clock they move).
pub trait Clock: Send + Sync + 'static {
    /// Now, in milliseconds since the Unix epoch.
    fn now_ms(&self) -> Millis;
}

/// The wall clock in milliseconds.
pub fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> Millis {
        now_ms()
    }
}

/// A clock that shows what it is set to and moves only when told (tests).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    /// A clock showing `now_ms`.
    pub fn new(now_ms: Millis) -> Self {
        Self(AtomicI64::new(now_ms))
    }

    /// Sets the clock to `now_ms`.
    pub fn set(&self, now_ms: Millis) {
        self.0.store(now_ms, Ordering::SeqCst);
    }

    /// Moves the clock forward by `ms`.
    pub fn advance(&self, ms: Millis) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> Millis {
        self.0.load(Ordering::SeqCst)
    }
}

/// `v` as an `i64` for SQL, saturating at `i64::MAX`.
pub fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// `v` from SQL as a `u64`, negative values as 0.
pub fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Every PostgreSQL advisory-lock key the services take, in one place: two services
/// sharing one database must never take each other's lock by accident.
pub mod locks {
    /// release-svc: held while its schema migrates (`pg_advisory_xact_lock`).
    pub const RELEASE_MIGRATIONS: i64 = 7_303;
    /// release-svc: the placement applier's lease (one replica applies events).
    pub const RELEASE_APPLIER: i64 = 7_304;
    /// deploy-svc: held while its schema migrates.
    pub const DEPLOY_MIGRATIONS: i64 = 7_305;
    /// release-svc: the first key of the two-key transaction locks taken per CreateRelease
    /// request id (the second key is the id's hash).
    pub const RELEASE_REQUEST_ID: i32 = 7_306;

    /// Every key, for the uniqueness check.
    pub const ALL: [i64; 4] = [
        RELEASE_MIGRATIONS,
        RELEASE_APPLIER,
        DEPLOY_MIGRATIONS,
        RELEASE_REQUEST_ID as i64,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advisory_lock_keys_are_distinct() {
        let mut keys = locks::ALL.to_vec();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), locks::ALL.len());
    }

    #[test]
    fn conversions_saturate() {
        assert_eq!(to_i64(u64::MAX), i64::MAX);
        assert_eq!(to_u64(-5), 0);
        assert_eq!(to_u64(to_i64(42)), 42);
    }

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let c = ManualClock::new(1_000);
        c.advance(500);
        assert_eq!(c.now_ms(), 1_500);
        c.set(10);
        assert_eq!(c.now_ms(), 10);
    }
}
