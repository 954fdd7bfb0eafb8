//! Admission by deadline: a call is refused at once (RESOURCE_EXHAUSTED) when the calls
//! already in flight would, at the rate calls are completing now, take more than half of
//! its deadline to get through.
//!
//! The in-flight cap (`--max-in-flight`) is a count: it bounds the queue to that many
//! calls, which is a short wait when calls are fast and a long one when they are not. A
//! write path that commits a few hundred reports a second on a slow disk would hold 2048
//! calls for seconds, past their callers' deadlines: admitted calls then fail with
//! DEADLINE_EXCEEDED after doing their work for nobody. This layer estimates the wait a
//! new call would have by Little's law (calls in flight divided by completions per
//! second, measured over a recent window of 100 ms to 1 s holding at least 16 completions)
//! and refuses the call when that wait exceeds half of the shorter of its `grpc-timeout`
//! and `--rpc-timeout-ms`. It only acts with at least [`MIN_IN_FLIGHT`] calls in flight and
//! such a measured rate, so a quiet server, a burst after an idle spell or a trickle, and
//! calls held open by a slow or hostile client without load behind them are admitted (the
//! count cap still applies). `--deadline-admission false` turns it off.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tonic::body::Body;

/// Below this many calls in flight every call is admitted.
pub const MIN_IN_FLIGHT: usize = 16;
/// The shortest interval the completion rate is measured over.
const RATE_INTERVAL: Duration = Duration::from_millis(100);
/// A window this long with fewer than [`MIN_SAMPLE`] completions leaves the rate unknown.
const IDLE_INTERVAL: Duration = Duration::from_secs(1);
/// The completions a window needs before its rate counts.
const MIN_SAMPLE: u64 = 16;

/// What the layers share: calls in flight (the in-flight semaphore) and completions.
#[derive(Debug)]
pub struct Admission {
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    server_limit: Duration,
    completed: AtomicU64,
    rate: Mutex<Rate>,
}

#[derive(Debug)]
struct Rate {
    since: Instant,
    completed_then: u64,
    /// Completions per second over the last interval; `None` until measured, or after
    /// [`IDLE_INTERVAL`] without one (an idle or stalled server is left to the count cap).
    per_second: Option<f64>,
}

impl Admission {
    /// Admission over the in-flight semaphore `in_flight` of `max_in_flight` permits, for
    /// calls whose longest deadline is `server_limit` (`--rpc-timeout-ms`).
    pub fn new(in_flight: Arc<Semaphore>, max_in_flight: usize, server_limit: Duration) -> Self {
        Self {
            in_flight,
            max_in_flight,
            server_limit,
            completed: AtomicU64::new(0),
            rate: Mutex::new(Rate {
                since: Instant::now(),
                completed_then: 0,
                per_second: None,
            }),
        }
    }

    /// Completions per second, re-measured when the last measure is older than
    /// [`RATE_INTERVAL`] and the window holds at least [`MIN_SAMPLE`] completions. A
    /// window that reaches [`IDLE_INTERVAL`] with fewer (a quiet spell, a trickle, a
    /// stall, or calls held open without completing) says nothing about the server's
    /// capacity: it is dropped and the rate is unknown until a new window fills.
    fn rate(&self) -> Option<f64> {
        let mut rate = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = rate.since.elapsed();
        if elapsed >= RATE_INTERVAL {
            let completed = self.completed.load(Ordering::Relaxed);
            let done = completed.saturating_sub(rate.completed_then);
            if done >= MIN_SAMPLE {
                rate.per_second = Some(done as f64 / elapsed.as_secs_f64());
                rate.since = Instant::now();
                rate.completed_then = completed;
            } else if elapsed >= IDLE_INTERVAL {
                rate.per_second = None;
                rate.since = Instant::now();
                rate.completed_then = completed;
            }
        }
        rate.per_second
    }

    /// The wait a call with deadline `budget` would have, when it is over half of it.
    fn too_long(&self, budget: Duration) -> Option<Duration> {
        let in_flight = self
            .max_in_flight
            .saturating_sub(self.in_flight.available_permits());
        if in_flight < MIN_IN_FLIGHT {
            return None;
        }
        let wait = Duration::from_secs_f64(in_flight as f64 / self.rate()?);
        (wait > budget / 2).then_some(wait)
    }
}

/// Adds [`Admit`] in front of the in-flight cap; `None` admits every call.
#[derive(Debug, Clone)]
pub struct AdmissionLayer {
    admission: Option<Arc<Admission>>,
}

impl AdmissionLayer {
    /// The layer; `None` turns admission by deadline off.
    pub fn new(admission: Option<Admission>) -> Self {
        Self {
            admission: admission.map(Arc::new),
        }
    }
}

impl<S> tower::Layer<S> for AdmissionLayer {
    type Service = Admit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admit {
            inner,
            admission: self.admission.clone(),
        }
    }
}

/// See [`AdmissionLayer`].
#[derive(Debug, Clone)]
pub struct Admit<S> {
    inner: S,
    admission: Option<Arc<Admission>>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S> tower::Service<http::Request<Body>> for Admit<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let Some(admission) = self.admission.clone() else {
            return Box::pin(self.inner.call(req));
        };
        let budget = crate::deadline::grpc_timeout(req.headers())
            .map_or(admission.server_limit, |t| t.min(admission.server_limit));
        if let Some(wait) = admission.too_long(budget) {
            return Box::pin(std::future::ready(Ok(tonic::Status::resource_exhausted(
                format!(
                    "overloaded: the calls in flight need about {} ms, over half of this call's deadline of {} ms; retry with backoff",
                    wait.as_millis(),
                    budget.as_millis()
                ),
            )
            .into_http())));
        }
        let call = self.inner.call(req);
        Box::pin(async move {
            let answer = call.await;
            // Calls the in-flight cap refused end as errors here: only calls that ran
            // count as completions.
            if answer.is_ok() {
                admission.completed.fetch_add(1, Ordering::Relaxed);
            }
            answer
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_only_a_wait_over_half_the_deadline_with_enough_in_flight() {
        let sem = Arc::new(Semaphore::new(100));
        let a = Admission::new(sem.clone(), 100, Duration::from_secs(30));
        // Nothing measured yet: admitted whatever is in flight.
        let held = sem.clone().try_acquire_many_owned(50).unwrap();
        assert_eq!(a.too_long(Duration::from_millis(100)), None);
        // 100 completions in ~100 ms (~1000/s): 50 in flight wait ~50 ms.
        a.completed.fetch_add(100, Ordering::Relaxed);
        std::thread::sleep(RATE_INTERVAL);
        let rate = a.rate().unwrap();
        assert!((500.0..=1000.0).contains(&rate), "{rate}");
        assert_eq!(a.too_long(Duration::from_secs(1)), None);
        let wait = a.too_long(Duration::from_millis(20)).unwrap();
        assert!(wait > Duration::from_millis(10), "{wait:?}");
        // Few in flight: admitted even with a tiny deadline.
        drop(held);
        let _few = sem
            .clone()
            .try_acquire_many_owned(MIN_IN_FLIGHT as u32 - 1)
            .unwrap();
        assert_eq!(a.too_long(Duration::from_millis(1)), None);
    }

    #[test]
    fn an_interval_without_completions_leaves_the_rate_unknown() {
        let sem = Arc::new(Semaphore::new(100));
        let a = Admission::new(sem.clone(), 100, Duration::from_secs(30));
        let _held = sem.clone().try_acquire_many_owned(90).unwrap();
        std::thread::sleep(RATE_INTERVAL);
        assert_eq!(a.rate(), None);
        assert_eq!(a.too_long(Duration::from_millis(1)), None);
    }

    #[test]
    fn a_trickle_over_a_quiet_spell_is_not_taken_for_the_capacity() {
        let sem = Arc::new(Semaphore::new(100));
        let a = Admission::new(sem.clone(), 100, Duration::from_secs(30));
        // Five completions over a second: too few to measure anything.
        a.completed.fetch_add(5, Ordering::Relaxed);
        std::thread::sleep(IDLE_INTERVAL);
        let _burst = sem.clone().try_acquire_many_owned(64).unwrap();
        assert_eq!(a.rate(), None);
        assert_eq!(a.too_long(Duration::from_millis(100)), None);
    }
}
