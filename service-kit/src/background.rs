//! A server's background tasks, started in one place and stopped by one [`Background::drain`]
//! once the listeners have drained: the tasks that finish their work when asked (a last
//! usage flush, an applier handing back its lease) are awaited; the rest (metrics and probe
//! servers, followers) are aborted.

use std::future::Future;
use std::time::Duration;

use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::sync::CancellationToken;

/// The background tasks of one server.
#[derive(Debug)]
pub struct Background {
    stop: CancellationToken,
    awaited: Vec<(&'static str, JoinHandle<()>)>,
    aborted: Vec<AbortHandle>,
}

impl Background {
    /// No tasks yet; `stop` is the token the awaited tasks watch.
    pub fn new(stop: CancellationToken) -> Self {
        Self {
            stop,
            awaited: Vec::new(),
            aborted: Vec::new(),
        }
    }

    /// The token the awaited tasks watch.
    pub fn stop(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Spawns `task` (named `name` in the log), awaited by [`Background::drain`]: it must
    /// return soon after the stop token is cancelled.
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        self.awaited.push((name, tokio::spawn(task)));
    }

    /// Spawns `task`, aborted by [`Background::drain`].
    pub fn spawn_abortable<T: Send + 'static>(
        &mut self,
        task: impl Future<Output = T> + Send + 'static,
    ) {
        self.abort_on_drain(&tokio::spawn(task));
    }

    /// A task already running (a server's), aborted by [`Background::drain`].
    pub fn abort_on_drain<T>(&mut self, task: &JoinHandle<T>) {
        self.aborted.push(task.abort_handle());
    }

    /// Cancels the stop token, aborts the abortable tasks and waits for the others; one
    /// that panicked is logged with its name.
    pub async fn drain(self) {
        self.stop.cancel();
        for task in self.aborted {
            task.abort();
        }
        for (name, task) in self.awaited {
            if let Err(e) = task.await {
                tracing::error!(task = name, error = %e, "background task failed");
            }
        }
    }
}

/// Runs `pass` every `interval` until `stop` is cancelled (the first at once; a late pass
/// delays the next instead of bunching the missed ones).
pub async fn every<F, Fut>(interval: Duration, stop: CancellationToken, mut pass: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        pass().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn drain_waits_for_awaited_tasks_and_aborts_the_others() {
        let mut bg = Background::new(CancellationToken::new());
        let flushed = Arc::new(AtomicBool::new(false));
        let (stop, done) = (bg.stop(), flushed.clone());
        bg.spawn("flusher", async move {
            stop.cancelled().await;
            tokio::task::yield_now().await;
            done.store(true, Ordering::SeqCst);
        });
        let forever = tokio::spawn(std::future::pending::<()>());
        bg.abort_on_drain(&forever);
        bg.drain().await;
        assert!(
            flushed.load(Ordering::SeqCst),
            "the awaited task finished its work"
        );
        assert!(forever.await.unwrap_err().is_cancelled());
    }
}
