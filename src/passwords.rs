//! Account passwords: Argon2id (the crate's defaults, OWASP's minimum:
//! 19 MiB, 2 passes) on tokio's blocking pool, at most one hash per core at
//! a time so a burst of logins cannot starve the runtime or the memory.

use std::sync::Arc;

use argon2::{Argon2, PasswordHasher as _, PasswordVerifier as _};
use tokio::sync::Semaphore;

use crate::secrets::values::SecretString;

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("password hashing failed: {0}")]
    Hash(String),
    #[error("the password hashing task was cancelled")]
    Cancelled,
}

/// Hashes and verifies account passwords with bounded concurrency.
#[derive(Clone)]
pub struct PasswordHasher {
    permits: Arc<Semaphore>,
    /// A real hash of a random password: verifying an unknown account
    /// against it costs what a real verification costs.
    decoy: Arc<String>,
}

impl PasswordHasher {
    pub fn new() -> Result<PasswordHasher, PasswordError> {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let decoy = crate::secrets::values::generate_password(32)
            .map_err(|e| PasswordError::Hash(e.to_string()))?;
        Ok(PasswordHasher {
            permits: Arc::new(Semaphore::new(cores)),
            decoy: Arc::new(hash_now(&decoy)?),
        })
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PasswordError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| PasswordError::Cancelled)?;
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|_| PasswordError::Cancelled)
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
