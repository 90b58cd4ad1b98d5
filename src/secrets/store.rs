//! `db.enc`: every database credential of this node, sealed to its identity.
//!
//! Written atomically (temporary file, fsync, rename, fsync of the
//! directory) with mode 0600 in a 0700 directory. A file that cannot be
//! opened is an error for the operator: keepd never regenerates over it,
//! since that would lock it out of its own database.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::seal::{self, SealError};
use crate::config::SealMethod;
use crate::fsutil;
use crate::identity::NodeIdentity;
use crate::secrets::values::{self, EntropyError, SecretString};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read sealed credentials {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write sealed credentials {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot open sealed credentials {path}: {source}. keepd will not replace them, since \
         that would lock it out of its own database: restore db.enc and identity.key from the \
         same backup"
    )]
    Open { path: PathBuf, source: SealError },
    #[error(
        "{path} is sealed with x25519 only, which anyone may seal to this node; copy db.enc \
         back by hand if you trust it"
    )]
    Unproven { path: PathBuf },
    #[error("sealed credentials {path} decrypt but do not hold credentials: {reason}")]
    Payload { path: PathBuf, reason: String },
    #[error(
        "sealed credentials {path} have mode {mode:04o}, readable by other users; run \
         `chmod 600 {path}`"
    )]
    Exposed { path: PathBuf, mode: u32 },
}

/// Where a login role's credential is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CredentialStatus {
    /// Generated, its role perhaps not yet created (rotation step 1).
    Pending,
    /// What new connections use.
    Active,
    /// Still valid until the grace period ends (rotation steps 3-7).
    Retiring,
    /// Its role is dropped and its password forgotten.
    Expired,
}

/// One version of the node's login role.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginCredential {
    pub version: u32,
    /// None once expired: a dropped role's password is not kept.
    pub password: Option<SecretString>,
    pub status: CredentialStatus,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds at which `status` was entered.
    pub status_since: u64,
    /// The expiry is in the audit trail (rotation step 9).
    #[serde(default)]
    pub audited: bool,
}

/// Everything `db.enc` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub superuser: SecretString,
    /// When the superuser's password was made (Unix seconds; 0 in files
    /// from before it rotated: due at once).
    #[serde(default)]
    pub superuser_created_at: u64,
    /// A new superuser password sealed before Postgres takes it; present
    /// only while a rotation is under way (or was interrupted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superuser_next: Option<SecretString>,
    pub login_roles: Vec<LoginCredential>,
    /// pgBackRest's repository passphrase, made when backups are first
    /// configured (absent in files from before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_passphrase: Option<SecretString>,
    /// The S3 repository's access key (`keepd backup s3-credentials`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Credentials>,
}

/// An S3 access key pgBackRest signs its requests with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct S3Credentials {
    pub key_id: SecretString,
    pub secret: SecretString,
}

impl Credentials {
    /// A new superuser password and login role version 1, active.
    pub fn generate(password_length: usize, now: u64) -> Result<Credentials, EntropyError> {
        Ok(Credentials {
            superuser: values::generate_password(password_length)?,
            superuser_created_at: now,
            superuser_next: None,
            login_roles: vec![LoginCredential {
                version: 1,
                password: Some(values::generate_password(password_length)?),
                status: CredentialStatus::Active,
                created_at: now,
                status_since: now,
                audited: false,
            }],
            backup_passphrase: None,
            s3: None,
        })
    }

    pub fn active(&self) -> Option<&LoginCredential> {
        self.login_roles
            .iter()
            .find(|c| c.status == CredentialStatus::Active)
    }

    pub fn get(&self, version: u32) -> Option<&LoginCredential> {
        self.login_roles.iter().find(|c| c.version == version)
    }

    pub fn get_mut(&mut self, version: u32) -> Option<&mut LoginCredential> {
        self.login_roles.iter_mut().find(|c| c.version == version)
    }

    /// Credentials whose roles must exist in Postgres.
    pub fn live(&self) -> impl Iterator<Item = &LoginCredential> {
        self.login_roles
            .iter()
            .filter(|c| c.status != CredentialStatus::Expired)
    }

    fn check(&self) -> Result<(), String> {
        let active = self
            .login_roles
            .iter()
            .filter(|c| c.status == CredentialStatus::Active)
            .count();
        if active != 1 {
            return Err(format!("{active} active login credentials instead of one"));
        }
        if let Some(c) = self.live().find(|c| c.password.is_none()) {
            return Err(format!("login credential v{} has no password", c.version));
        }
        Ok(())
    }
}

/// The sealed credential file.
#[derive(Debug, Clone)]
pub struct CredentialStore {
    path: PathBuf,
}

impl CredentialStore {
    pub fn new(path: PathBuf) -> CredentialStore {
        CredentialStore { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// None when no file exists yet (first start).
    pub fn load(
        &self,
        identity: &NodeIdentity,
    ) -> Result<Option<(Credentials, SealMethod)>, StoreError> {
        let read_err = |source| StoreError::Read {
            path: self.path.clone(),
            source,
        };
        let meta = match std::fs::metadata(&self.path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(read_err(e)),
        };
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(StoreError::Exposed {
                path: self.path.clone(),
                mode,
            });
        }
        let sealed = std::fs::read(&self.path).map_err(read_err)?;
        let (method, plaintext) =
            seal::open(identity, &sealed).map_err(|source| StoreError::Open {
                path: self.path.clone(),
                source,
            })?;
        let payload_err = |reason: String| StoreError::Payload {
            path: self.path.clone(),
            reason,
        };
        let credentials: Credentials =
            serde_json::from_slice(&plaintext).map_err(|e| payload_err(e.to_string()))?;
        credentials.check().map_err(payload_err)?;
        Ok(Some((credentials, method)))
    }

    /// Writes the file, still sealed, to `dest` (a backup repository keeps
    /// it beside the backups for a restore onto a fresh state directory).
    pub fn copy_sealed_to(&self, dest: &Path) -> Result<(), StoreError> {
        let sealed = std::fs::read(&self.path).map_err(|source| StoreError::Read {
            path: self.path.clone(),
            source,
        })?;
        fsutil::write_atomic(dest, &sealed, None).map_err(|source| StoreError::Write {
            path: dest.to_owned(),
            source,
        })
    }

    /// Takes the sealed copy at `from` as this file (a restore onto a
    /// fresh state directory). Only a copy this node's identity could
    /// have made is taken: the copy's directory may be writable by
    /// others, and x25519 alone lets anyone seal to the node's public key.
    pub fn adopt_copy(&self, identity: &NodeIdentity, from: &Path) -> Result<(), StoreError> {
        let sealed = std::fs::read(from).map_err(|source| StoreError::Read {
            path: from.to_owned(),
            source,
        })?;
        let (method, _) = seal::open(identity, &sealed).map_err(|source| StoreError::Open {
            path: from.to_owned(),
            source,
        })?;
        if method == SealMethod::X25519 {
            return Err(StoreError::Unproven {
                path: from.to_owned(),
            });
        }
        let write_err = |source| StoreError::Write {
            path: self.path.clone(),
            source,
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fsutil::ensure_private_dir(dir).map_err(write_err)?;
        fsutil::write_atomic(&self.path, &sealed, None).map_err(write_err)
    }

    /// Replaces the file atomically; a crash leaves the old or the new one.
    pub fn save(
        &self,
        identity: &NodeIdentity,
        method: SealMethod,
        credentials: &Credentials,
    ) -> Result<(), StoreError> {
        let write_err = |source| StoreError::Write {
            path: self.path.clone(),
            source,
        };
        let plaintext =
            Zeroizing::new(serde_json::to_vec(credentials).expect("credentials serialise"));
        let sealed =
            seal::seal(identity, method, &plaintext).map_err(|source| StoreError::Open {
                path: self.path.clone(),
                source,
            })?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fsutil::ensure_private_dir(dir).map_err(write_err)?;
        fsutil::write_atomic(&self.path, &sealed, None).map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn setup() -> (tempfile::TempDir, NodeIdentity, CredentialStore) {
        let (dir, id) = crate::identity::test_identity();
        let store = CredentialStore::new(dir.path().join("secrets/db.enc"));
        (dir, id, store)
    }

    /// A store holding freshly generated credentials.
    fn saved() -> (tempfile::TempDir, NodeIdentity, CredentialStore) {
        let (dir, id, store) = setup();
        let credentials = Credentials::generate(64, 1).unwrap();
        store.save(&id, SealMethod::Hybrid, &credentials).unwrap();
        (dir, id, store)
    }

    #[test]
    fn absent_file_loads_as_none() {
        let (_d, id, store) = setup();
        assert!(store.load(&id).unwrap().is_none());
    }

    #[test]
    fn saved_credentials_load_back_with_modes() {
        let (_d, id, store) = setup();
        let creds = Credentials::generate(64, 1000).unwrap();
        for method in [SealMethod::X25519, SealMethod::Hkdf, SealMethod::Hybrid] {
            store.save(&id, method, &creds).unwrap();
            let (loaded, used) = store.load(&id).unwrap().unwrap();
            assert_eq!(used, method);
            assert_eq!(loaded.superuser.expose(), creds.superuser.expose());
            assert_eq!(
                loaded.active().unwrap().password.as_ref().unwrap().expose(),
                creds.active().unwrap().password.as_ref().unwrap().expose()
            );
        }
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(store.path()), 0o600);
        assert_eq!(mode(store.path().parent().unwrap()), 0o700);
        let text = std::fs::read_to_string(store.path()).unwrap();
        assert!(!text.contains(creds.superuser.expose()));
        let leftovers: Vec<_> = std::fs::read_dir(store.path().parent().unwrap())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name() != "db.enc")
            .collect();
        assert!(leftovers.is_empty(), "temporary files left behind");
    }

    #[test]
    fn damage_is_an_error_and_the_file_is_kept() {
        let (_d, id, store) = saved();
        let good = std::fs::read(store.path()).unwrap();
        // A flipped byte inside a base64 ciphertext, a truncation, garbage.
        let text = String::from_utf8(good.clone()).unwrap();
        let at = text.find("\"ciphertext\": \"").unwrap() + 20;
        let mut flipped = good.clone();
        flipped[at] = if flipped[at] == b'A' { b'B' } else { b'A' };
        for damaged in [
            flipped,
            good[..good.len() / 2].to_vec(),
            b"\x00\x01garbage".to_vec(),
        ] {
            std::fs::write(store.path(), &damaged).unwrap();
            let err = store.load(&id).unwrap_err();
            assert!(matches!(err, StoreError::Open { .. }), "{err}");
            assert!(err.to_string().contains("will not replace"), "{err}");
            assert_eq!(std::fs::read(store.path()).unwrap(), damaged);
        }
    }

    #[test]
    fn another_identity_cannot_open_it() {
        let (_d, _, store) = saved();
        let (_other_dir, other) = crate::identity::test_identity();
        let err = store.load(&other).unwrap_err();
        assert!(err.to_string().contains("sealed for node"), "{err}");
    }

    #[test]
    fn readable_file_is_refused() {
        let (_d, id, store) = setup();
        store
            .save(
                &id,
                SealMethod::Hkdf,
                &Credentials::generate(32, 1).unwrap(),
            )
            .unwrap();
        std::fs::set_permissions(store.path(), std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            store.load(&id),
            Err(StoreError::Exposed { mode: 0o640, .. })
        ));
    }

    #[test]
    fn debug_output_holds_no_password() {
        let creds = Credentials::generate(64, 1).unwrap();
        let debug = format!("{creds:?}");
        assert!(!debug.contains(creds.superuser.expose()));
        assert!(!debug.contains(creds.active().unwrap().password.as_ref().unwrap().expose()));
    }
}
