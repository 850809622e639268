//! Two-stage shutdown. The first SIGTERM or SIGINT cancels [`Shutdown::token`]: listeners
//! stop accepting and long-lived streams end. The process then waits for in-flight work,
//! bounded by a drain deadline.

use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Handle shared by every server of a process.
#[derive(Clone, Default)]
pub struct Shutdown {
    /// Cancelled when the process should stop accepting work.
    token: CancellationToken,
    /// Tracks connection tasks so the drain knows when they are all done.
    tasks: TaskTracker,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancelled once shutdown starts; servers and streams select on it.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Tracker for per-connection tasks that the drain waits for.
    pub fn tracker(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Starts shutdown by hand (tests, fatal errors).
    pub fn trigger(&self) {
        self.token.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves when shutdown has started.
    pub async fn triggered(&self) {
        self.token.cancelled().await
    }

    /// Waits for SIGTERM or SIGINT, then starts shutdown.
    pub async fn on_signal(&self) {
        wait_for_signal().await;
        tracing::info!("shutdown signal received, draining");
        self.trigger();
    }

    /// Waits until every tracked task is done or `deadline` passes. Returns whether the
    /// drain completed in time.
    pub async fn drain(&self, deadline: Duration) -> bool {
        self.tasks.close();
        let done = tokio::time::timeout(deadline, self.tasks.wait())
            .await
            .is_ok();
        if !done {
            tracing::warn!(
                remaining = self.tasks.len(),
                "drain deadline passed, closing anyway"
            );
        }
        done
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_tracked_tasks() {
        let sd = Shutdown::new();
        let token = sd.token();
        sd.tracker().spawn(async move {
            token.cancelled().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        });
        sd.trigger();
        assert!(sd.drain(Duration::from_secs(5)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_gives_up_at_deadline() {
        let sd = Shutdown::new();
        sd.tracker().spawn(std::future::pending::<()>());
        sd.trigger();
        assert!(!sd.drain(Duration::from_secs(1)).await);
    }
}
