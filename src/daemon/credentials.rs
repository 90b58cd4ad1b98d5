//! db.enc at start: opened with the identity, or made on a first start.

use tracing::info;

use super::DaemonError;
use crate::clock::unix_now;
use crate::config::{Config, Layout};
use crate::identity::NodeIdentity;
use crate::secrets::store::{CredentialStore, Credentials};

/// The sealed credentials, created on first start (before the cluster, so
/// a cluster without credentials means they were lost, not never made).
pub(super) fn load_credentials(
    config: &Config,
    layout: &Layout,
    identity: &NodeIdentity,
    store: &CredentialStore,
) -> Result<Credentials, DaemonError> {
    let mut credentials = existing_or_new_credentials(config, layout, identity, store)?;
    if config.backup.enabled() && credentials.backup_passphrase.is_none() {
        credentials.backup_passphrase = Some(crate::secrets::values::generate_password(64)?);
        store.save(identity, config.credentials.encryption_method, &credentials)?;
        info!(path = %store.path().display(), "generated and sealed the backup repository's passphrase");
    }
    if config.backup.s3.is_some() && credentials.s3.is_none() {
        return Err(DaemonError::Backup(crate::backup::BackupError::NoS3Key));
    }
    Ok(credentials)
}

fn existing_or_new_credentials(
    config: &Config,
    layout: &Layout,
    identity: &NodeIdentity,
    store: &CredentialStore,
) -> Result<Credentials, DaemonError> {
    if let Some((credentials, method)) = store.load(identity)? {
        if method != config.credentials.encryption_method {
            info!(?method, wanted = ?config.credentials.encryption_method, "resealing db.enc");
            store.save(identity, config.credentials.encryption_method, &credentials)?;
        }
        return Ok(credentials);
    }
    let data_dir = layout.data_dir();
    if data_dir.join("PG_VERSION").exists() {
        return Err(DaemonError::CredentialsMissing {
            path: store.path().to_owned(),
            data_dir,
        });
    }
    let credentials = Credentials::generate(config.credentials.password_length, unix_now())?;
    store.save(identity, config.credentials.encryption_method, &credentials)?;
    info!(path = %store.path().display(), "generated and sealed the database credentials");
    Ok(credentials)
}
