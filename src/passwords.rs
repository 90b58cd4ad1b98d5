//! Account passwords: Argon2id (the crate's defaults, OWASP's minimum:
//! 19 MiB, 2 passes) on threads of their own, half the cores (at least
//! one) at a lowered priority (nice 10): a login flood takes at most that
//! many cores, and on them only the time sync requests leave, so it cannot
//! starve the runtime, the database or the memory (19 MiB per thread).

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use argon2::{Argon2, PasswordHasher as _, PasswordVerifier as _};

use crate::secrets::values::SecretString;

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("password hashing failed: {0}")]
    Hash(String),
    #[error("the password hashing task was cancelled")]
    Cancelled,
    #[error("cannot start a password hashing thread: {0}")]
    Thread(std::io::Error),
}

type Job = Box<dyn FnOnce() + Send>;

/// Hashes and verifies account passwords on a bounded pool of
/// low-priority threads; they end when the last clone is dropped.
#[derive(Clone)]
pub struct PasswordHasher {
    jobs: mpsc::Sender<Job>,
    /// A real hash of a random password: verifying an unknown account
    /// against it costs what a real verification costs.
    decoy: Arc<String>,
}

impl PasswordHasher {
    pub fn new() -> Result<PasswordHasher, PasswordError> {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let decoy = crate::secrets::values::generate_password(32)
            .map_err(|e| PasswordError::Hash(e.to_string()))?;
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for _ in 0..(cores / 2).max(1) {
            let queue = Arc::clone(&queue);
            std::thread::Builder::new()
                .name("keepd-hash".into())
                .spawn(move || {
                    lower_priority();
                    loop {
                        // The lock is held while waiting, not while hashing.
                        let next = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok(job) = next else { return };
                        // A failed job drops its answer (the caller sees
                        // Cancelled); the thread lives on.
                        let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
                    }
                })
                .map_err(PasswordError::Thread)?;
        }
        Ok(PasswordHasher {
            jobs,
            decoy: Arc::new(hash_now(&decoy)?),
        })
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PasswordError> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = answer.send(work());
            }))
            .map_err(|_| PasswordError::Cancelled)?;
        answered.await.map_err(|_| PasswordError::Cancelled)
    }

    /// The PHC string of `password` under a fresh salt.
    pub async fn hash(&self, password: SecretString) -> Result<String, PasswordError> {
        self.run(move || hash_now(&password)).await?
    }

    /// Whether `password` matches `stored`; `None` (no such account)
    /// verifies against the decoy so the answer takes as long.
    pub async fn verify(
        &self,
        password: SecretString,
        stored: Option<String>,
    ) -> Result<bool, PasswordError> {
        let known = stored.is_some();
        let stored = stored.unwrap_or_else(|| self.decoy.as_str().to_owned());
        let matches = self
            .run(move || {
                Argon2::default()
                    .verify_password(password.expose().as_bytes(), stored.as_str())
                    .is_ok()
            })
            .await?;
        Ok(known && matches)
    }
}

/// Lowers the calling thread's priority to nice 10, so that a sync request
/// on a normal thread wins the core over a hash (weight 1024 against 110).
/// Linux only, where a thread's niceness is its own (elsewhere it would be
/// the whole process's). Best effort: a hash at normal priority is slower
/// for sync requests beside it, never wrong.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority reads no memory of ours; on Linux,
        // PRIO_PROCESS with who = 0 names the calling thread.
        let failed = unsafe { nix::libc::setpriority(nix::libc::PRIO_PROCESS, 0, 10) } != 0;
        if failed {
            tracing::warn!(error = %std::io::Error::last_os_error(), "password hashing runs at normal priority");
        }
    }
}

fn hash_now(password: &SecretString) -> Result<String, PasswordError> {
    Argon2::default()
        .hash_password(password.expose().as_bytes())
        .map(|hash| hash.to_string())
        .map_err(|e| PasswordError::Hash(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hash_verifies_and_unknown_accounts_never_match() {
        let hasher = PasswordHasher::new().unwrap();
        let password = SecretString::new("correct horse".into());
        let stored = hasher.hash(password.clone()).await.unwrap();
        assert!(stored.starts_with("$argon2id$"), "{stored}");
        assert!(!stored.contains("correct horse"));
        assert!(
            hasher
                .verify(password.clone(), Some(stored.clone()))
                .await
                .unwrap()
        );
        let wrong = SecretString::new("battery staple".into());
        assert!(!hasher.verify(wrong, Some(stored)).await.unwrap());
        assert!(!hasher.verify(password, None).await.unwrap());
    }
}
