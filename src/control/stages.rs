//! Supervision of the daemon's long-running stages (the pipeline's batcher, the sources, the
//! HTTP server, the reload watcher).
//!
//! A stage that ends before shutdown began is a dead pipeline: messages would wait forever
//! while the process looks alive. [`Stages::supervise`] watches each stage's task; when one
//! ends early (returned, or panicked past every `catch_unwind`), `/readyz` answers 503 naming
//! it, and [`Stages::failure`] resolves so the daemon shuts down and exits non-zero, and its
//! supervisor (systemd, Kubernetes) restarts it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The stage that stopped, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageFailure {
    pub stage: &'static str,
    pub reason: String,
}

impl std::fmt::Display for StageFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stage {} stopped: {}", self.stage, self.reason)
    }
}

/// The registry of supervised stages. One per daemon.
pub struct Stages {
    stopping: AtomicBool,
    failed: Mutex<Option<StageFailure>>,
    changed: watch::Sender<bool>,
}

impl Default for Stages {
    fn default() -> Self {
        Stages {
            stopping: AtomicBool::new(false),
            failed: Mutex::new(None),
            changed: watch::channel(false).0,
        }
    }
}

impl Stages {
    pub fn new() -> Stages {
        Stages::default()
    }

    /// Watches `task` as stage `name`; returns a handle that resolves when the task has
    /// ended (await it instead of `task` when shutting down).
    pub fn supervise<T: Send + 'static>(
        self: &std::sync::Arc<Self>,
        name: &'static str,
        task: JoinHandle<T>,
    ) -> JoinHandle<()> {
        let stages = std::sync::Arc::clone(self);
        tokio::spawn(async move {
            let result = task.await;
            if stages.stopping.load(Ordering::Relaxed) {
                return;
            }
            let reason = match result {
                Ok(_) => "it ended while the daemon was running".to_owned(),
                Err(e) if e.is_panic() => {
                    let panic = e.into_panic();
                    let text = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    format!("it panicked: {text}")
                }
                Err(e) => format!("it was cancelled: {e}"),
            };
            stages.fail(name, reason);
        })
    }

    /// Marks `stage` as stopped (the first failure is kept).
    pub fn fail(&self, stage: &'static str, reason: String) {
        let failure = StageFailure { stage, reason };
        tracing::error!("{failure}; the daemon is shutting down so its supervisor restarts it");
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if failed.is_none() {
            *failed = Some(failure);
        }
        drop(failed);
        self.changed.send_replace(true);
    }

    /// Shutdown began: stages ending from now on are not failures.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// The first stage that stopped, if any did.
    pub fn failed(&self) -> Option<StageFailure> {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Resolves when a stage has stopped.
    pub async fn failure(&self) -> StageFailure {
        let mut changed = self.changed.subscribe();
        loop {
            if let Some(f) = self.failed() {
                return f;
            }
            if changed.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn a_stage_that_ends_early_is_a_failure_and_one_that_ends_on_shutdown_is_not() {
        let stages = Arc::new(Stages::new());
        let ends = stages.supervise("pipeline", tokio::spawn(async {}));
        ends.await.unwrap();
        let f = stages.failure().await;
        assert_eq!(f.stage, "pipeline");
        assert_eq!(
            f.to_string(),
            "stage pipeline stopped: it ended while the daemon was running"
        );

        let stages = Arc::new(Stages::new());
        stages.stopping();
        stages
            .supervise("pipeline", tokio::spawn(async {}))
            .await
            .unwrap();
        assert_eq!(stages.failed(), None);
    }

    #[tokio::test]
    async fn a_panicking_stage_names_the_panic() {
        let stages = Arc::new(Stages::new());
        let task = tokio::spawn(async { panic!("boom") });
        stages.supervise("source.amqp", task).await.unwrap();
        let f = stages.failed().unwrap();
        assert_eq!(
            (f.stage, f.reason.as_str()),
            ("source.amqp", "it panicked: boom")
        );
    }
}
