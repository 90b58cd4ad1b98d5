//! A stop signal shared by the daemon's long-running tasks.

use tokio::sync::watch;

/// Resolves `requested` for every clone once triggered.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// Triggers the paired `Shutdown`s.
pub struct ShutdownTrigger(watch::Sender<bool>);

pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        let _ = self.0.send(true);
    }
}

impl Shutdown {
    /// Returns once a stop has been requested (at once if it already was).
    pub async fn requested(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    /// Whether a stop has been requested, without waiting.
    pub fn is_requested(&self) -> bool {
        *self.0.borrow()
    }
}
