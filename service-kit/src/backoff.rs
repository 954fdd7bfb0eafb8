//! Reconnect delays with jitter: exponential growth to a cap, each delay drawn uniformly
//! from its upper half ("equal jitter"), so a fleet of clients cut off at the same moment
//! does not come back in lockstep.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// The delays of one reconnecting client.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    seed: u64,
}

impl Backoff {
    /// Delays from about `initial` doubling up to about `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            current: initial,
            // Seeded from the OS per process and thread, stepped per instance.
            seed: std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish(),
        }
    }

    /// The next delay: between half and all of the current step; the step doubles.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.current;
        self.current = (self.current * 2).min(self.max);
        // xorshift64*: cheap, and plenty for spreading reconnects.
        self.seed ^= self.seed >> 12;
        self.seed ^= self.seed << 25;
        self.seed ^= self.seed >> 27;
        let r = self.seed.wrapping_mul(0x2545_F491_4F6C_DD1D);
        let fraction = (r >> 11) as f64 / (1u64 << 53) as f64;
        step / 2 + step.mul_f64(fraction / 2.0)
    }

    /// Back to the first step (after a connection that worked).
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_within_their_jitter_range() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let steps = [100, 200, 400, 800, 1600, 2000, 2000];
        for step in steps {
            let d = b.next_delay();
            let step = Duration::from_millis(step);
            assert!(
                d >= step / 2 && d <= step,
                "{d:?} outside [{:?}, {step:?}]",
                step / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn clients_cut_off_together_do_not_retry_in_lockstep() {
        let firsts: std::collections::HashSet<Duration> = (0..50)
            .map(|_| {
                let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
                b.next_delay()
            })
            .collect();
        // 50 clients drawing from half a second: collisions at nanosecond precision are
        // vanishingly rare; lockstep would give one value.
        assert!(firsts.len() > 40, "only {} distinct delays", firsts.len());
    }
}
