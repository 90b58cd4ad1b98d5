//! Encryption at rest, `method: application`: the configured columns are
//! sealed with AES-256-GCM before they reach Postgres (a random 12-byte
//! nonce per value, the table and column as associated data, the key
//! version stored with each value) under keys derived from the cluster
//! key, so every node of a cluster reads what any of them sealed. Values written before encryption was enabled read as they
//! are; a value under a key version this node does not have is an error
//! naming it.
//!
//! Stored forms: text columns `kf1:<version>:<base64(nonce ‖ sealed)>`,
//! bytea columns `b"KF1" ‖ version (u32 BE) ‖ nonce ‖ sealed`.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use zeroize::Zeroizing;

use crate::cluster::{ClusterKey, Purpose};
use crate::config::{Config, FieldAlgorithm};

const TEXT_PREFIX: &str = "kf1:";
const BYTES_PREFIX: &[u8] = b"KF1";
const NONCE_LEN: usize = 12;

/// A column of keepd's schema, schema-qualified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Column {
    pub table: &'static str,
    pub name: &'static str,
}

impl Column {
    /// `table.column` without the schema, as the configuration names it.
    pub fn short_name(&self) -> String {
        format!("{}.{}", self.table.trim_start_matches("keepd."), self.name)
    }

    fn aad(&self) -> String {
        format!("{}.{}", self.table, self.name)
    }
}

/// A text column keepd can encrypt. Only the constants in `column` exist,
/// so a misspelled column does not compile (and cannot silently store
/// plaintext).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TextColumn(Column);

/// A bytea column keepd can encrypt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BytesColumn(Column);

/// Either kind, for what walks every configured column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Encryptable {
    Text(TextColumn),
    Bytes(BytesColumn),
}

impl Encryptable {
    pub fn column(&self) -> Column {
        match self {
            Encryptable::Text(TextColumn(c)) | Encryptable::Bytes(BytesColumn(c)) => *c,
        }
    }
}

/// The columns keepd can encrypt.
pub mod column {
    use super::{BytesColumn, Column, TextColumn};

    const fn text(table: &'static str, name: &'static str) -> TextColumn {
        TextColumn(Column { table, name })
    }

    const fn bytes(table: &'static str, name: &'static str) -> BytesColumn {
        BytesColumn(Column { table, name })
    }

    pub const LOG_DATA: TextColumn = text("keepd.sync_logs", "encrypted_data");
    pub const LOG_NONCE: TextColumn = text("keepd.sync_logs", "nonce");
    pub const LOG_TIMESTAMP: TextColumn = text("keepd.sync_logs", "haex_timestamp");
    pub const VAULT_KEY: TextColumn = text("keepd.vault_keys", "encrypted_vault_key");
    pub const VAULT_KEY_SALT: TextColumn = text("keepd.vault_keys", "salt");
    pub const VAULT_KEY_NONCE: TextColumn = text("keepd.vault_keys", "nonce");
    pub const BACKUP_CIPHERTEXT: BytesColumn = bytes("keepd.backups", "ciphertext");
    pub const BACKUP_NONCE: BytesColumn = bytes("keepd.backups", "nonce");
    pub const BACKUP_AUTH_TAG: BytesColumn = bytes("keepd.backups", "auth_tag");
    pub const BACKUP_SIGNATURE: BytesColumn = bytes("keepd.backups", "signature");
    pub const DEVICE_NAME: TextColumn = text("keepd.devices", "device_name");
    pub const OPAQUE_RECORD: BytesColumn = bytes("keepd.users", "opaque_record");
    pub const OPAQUE_LOGIN_STATE: BytesColumn = bytes("keepd.opaque_logins", "state");
    pub const TOTP_SECRET: BytesColumn = bytes("keepd.users", "totp_secret");
}

/// Columns sealed whatever the configuration says: secrets of keepd's own
/// (an account's OPAQUE record, a login's state, a TOTP secret), not the client's
/// ciphertext. They rotate with `key_version` like the configured ones.
pub const ALWAYS_SEALED: &[BytesColumn] = &[
    column::OPAQUE_RECORD,
    column::OPAQUE_LOGIN_STATE,
    column::TOTP_SECRET,
];

/// Every column keepd can encrypt; the configuration is checked against it.
pub const SUPPORTED: &[Encryptable] = &[
    Encryptable::Text(column::LOG_DATA),
    Encryptable::Text(column::LOG_NONCE),
    Encryptable::Text(column::LOG_TIMESTAMP),
    Encryptable::Text(column::VAULT_KEY),
    Encryptable::Text(column::VAULT_KEY_SALT),
    Encryptable::Text(column::VAULT_KEY_NONCE),
    Encryptable::Bytes(column::BACKUP_CIPHERTEXT),
    Encryptable::Bytes(column::BACKUP_NONCE),
    Encryptable::Bytes(column::BACKUP_AUTH_TAG),
    Encryptable::Bytes(column::BACKUP_SIGNATURE),
    Encryptable::Text(column::DEVICE_NAME),
];

/// `SUPPORTED` as the configuration spells it, grouped by table:
/// `sync_logs.{encrypted_data, nonce, haex_timestamp}, ...`.
pub fn supported_list() -> String {
    let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
    for c in SUPPORTED.iter().map(Encryptable::column) {
        let table = c.table.trim_start_matches("keepd.");
        match groups.iter_mut().find(|(t, _)| *t == table) {
            Some((_, names)) => names.push(c.name),
            None => groups.push((table, vec![c.name])),
        }
    }
    groups
        .iter()
        .map(|(table, names)| match names.as_slice() {
            [one] => format!("{table}.{one}"),
            many => format!("{table}.{{{}}}", many.join(", ")),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The supported column the configuration names (`table` with or without
/// `keepd.`).
fn lookup(table: &str, name: &str) -> Option<Encryptable> {
    let table = table.strip_prefix("keepd.").unwrap_or(table);
    SUPPORTED.iter().copied().find(|e| {
        let c = e.column();
        c.name == name && c.table.trim_start_matches("keepd.") == table
    })
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FieldError {
    #[error("{table}.{column} holds a damaged or altered encrypted value")]
    Damaged { table: String, column: String },
}

impl FieldError {
    fn damaged(column: Column) -> FieldError {
        FieldError::Damaged {
            table: column.table.into(),
            column: column.name.into(),
        }
    }
}

/// Which columns are sealed: what the configuration says, without any
/// key (the report reads it).
pub struct FieldPlan {
    columns: BTreeSet<Encryptable>,
    /// Configured columns keepd's schema does not have (the seeds'
    /// examples name other applications' tables): not encrypted, reported.
    unsupported: Vec<String>,
    /// `key_version`: the lowest version that may seal.
    floor: u32,
}

impl FieldPlan {
    /// From the configuration: encrypts nothing unless application
    /// encryption is enabled.
    pub fn new(config: &Config) -> FieldPlan {
        let at_rest = &config.encryption_at_rest;
        // The configured algorithm is the one this module implements; a
        // second would be a new arm here and a new stored-form prefix.
        let FieldAlgorithm::Aes256Gcm = at_rest.application.algorithm;
        let enabled = at_rest.enabled && at_rest.method.encrypts_fields();
        let mut columns: BTreeSet<Encryptable> = ALWAYS_SEALED
            .iter()
            .copied()
            .map(Encryptable::Bytes)
            .collect();
        let mut unsupported = Vec::new();
        let configured = at_rest
            .application
            .encrypted_fields
            .iter()
            .filter(|_| enabled);
        for fields in configured {
            for column in &fields.columns {
                match lookup(&fields.table, column) {
                    Some(known) => {
                        columns.insert(known);
                    }
                    None => unsupported.push(format!("{}.{column}", fields.table)),
                }
            }
        }
        FieldPlan {
            columns,
            unsupported,
            floor: at_rest.application.key_version,
        }
    }

    /// Configured columns that are not in keepd's schema.
    pub fn unsupported(&self) -> Vec<String> {
        self.unsupported.clone()
    }

    /// The configured `key_version`: the cluster seals under it or a
    /// later version.
    pub fn floor(&self) -> u32 {
        self.floor
    }

    /// Every sealed column: the configured ones and `ALWAYS_SEALED`.
    pub fn columns(&self) -> impl Iterator<Item = Encryptable> + '_ {
        self.columns.iter().copied()
    }

    /// The columns the configuration names (`ALWAYS_SEALED` aside).
    pub fn configured(&self) -> impl Iterator<Item = Encryptable> + '_ {
        self.columns().filter(|c| match c {
            Encryptable::Bytes(column) => !ALWAYS_SEALED.contains(column),
            Encryptable::Text(_) => true,
        })
    }

    /// A SQL condition (no parameters) true for the values of `column` not
    /// sealed under `current`: sealed under another version, or written
    /// before encryption was enabled.
    pub fn stale_values(column: Encryptable, current: u32) -> String {
        match column {
            Encryptable::Text(TextColumn(c)) => {
                format!("{} NOT LIKE '{TEXT_PREFIX}{current}:%'", c.name)
            }
            Encryptable::Bytes(BytesColumn(c)) => {
                let marker = hex::encode([BYTES_PREFIX, &current.to_be_bytes()].concat());
                format!(
                    "substring({} FROM 1 FOR {}) <> '\\x{marker}'::bytea",
                    c.name,
                    BYTES_PREFIX.len() + 4
                )
            }
        }
    }

    fn encrypts(&self, column: Encryptable) -> bool {
        self.columns.contains(&column)
    }
}

/// Seals and opens the configured columns.
pub struct FieldCipher {
    plan: FieldPlan,
    /// Replaced when the cluster root rotates (`rekey`).
    cluster: RwLock<ClusterKey>,
    /// The version that seals; `field_keys` moves it.
    current: AtomicU32,
    /// Values sealed since `take_seals` last counted them.
    sealed: AtomicU64,
    /// The versions met so far, derived once each.
    keys: RwLock<HashMap<u32, Zeroizing<[u8; 32]>>>,
}

impl FieldCipher {
    /// The configuration's plan, sealing under its `key_version` until
    /// the cluster's current version is set.
    pub fn new(cluster: &ClusterKey, config: &Config) -> FieldCipher {
        let plan = FieldPlan::new(config);
        FieldCipher {
            current: AtomicU32::new(plan.floor),
            plan,
            cluster: RwLock::new(cluster.clone()),
            sealed: AtomicU64::new(0),
            keys: RwLock::new(HashMap::new()),
        }
    }

    pub fn plan(&self) -> &FieldPlan {
        &self.plan
    }

    /// The version new values are sealed under.
    pub fn current_version(&self) -> u32 {
        self.current.load(Ordering::Acquire)
    }

    /// From now on, seal under `version` (the cluster's current one).
    pub fn seal_under(&self, version: u32) {
        self.current.store(version.max(1), Ordering::Release);
    }

    /// The cluster's new root: the versions in use were carried by the
    /// rotation (they derive as before); later ones come from it.
    pub fn rekey(&self, cluster: &ClusterKey) {
        *self.cluster.write().expect("not poisoned") = cluster.clone();
        self.keys.write().expect("not poisoned").clear();
    }

    /// The generation of the cluster root it derives new versions from.
    pub fn generation(&self) -> u32 {
        self.cluster.read().expect("not poisoned").generation()
    }

    /// How many values were sealed since the last call.
    pub fn take_seals(&self) -> u64 {
        self.sealed.swap(0, Ordering::AcqRel)
    }

    /// Gives back seals `take_seals` returned that could not be recorded.
    pub fn add_seals(&self, seals: u64) {
        self.sealed.fetch_add(seals, Ordering::AcqRel);
    }

    fn cipher(&self, version: u32) -> Aes256Gcm {
        let known = self
            .keys
            .read()
            .expect("not poisoned")
            .get(&version)
            .map(|k| Aes256Gcm::new_from_slice(k.as_ref()).expect("32-byte key"));
        known.unwrap_or_else(|| {
            let key = self
                .cluster
                .read()
                .expect("not poisoned")
                .derive(Purpose::Field(version));
            let cipher = Aes256Gcm::new_from_slice(key.as_ref()).expect("32-byte key");
            self.keys
                .write()
                .expect("not poisoned")
                .insert(version, key);
            cipher
        })
    }

    /// `(version, nonce ‖ sealed)`.
    fn seal(&self, column: Column, plain: &[u8]) -> (u32, Vec<u8>) {
        let version = self.current_version();
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).expect("the OS CSPRNG is available");
        let aad = column.aad();
        self.sealed.fetch_add(1, Ordering::Relaxed);
        let sealed = self
            .cipher(version)
            .encrypt(
                &nonce.into(),
                Payload {
                    msg: plain,
                    aad: aad.as_bytes(),
                },
            )
            .expect("AES-256-GCM encrypts any length we hold");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        (version, out)
    }

    fn open(&self, column: Column, version: u32, body: &[u8]) -> Result<Vec<u8>, FieldError> {
        let damaged = || FieldError::damaged(column);
        // Version 0 was never made; any other is derived (a forged one
        // fails authentication like any altered value).
        if version == 0 || body.len() < NONCE_LEN {
            return Err(damaged());
        }
        let (nonce, sealed) = body.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| damaged())?;
        let aad = column.aad();
        self.cipher(version)
            .decrypt(
                &nonce.into(),
                Payload {
                    msg: sealed,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| damaged())
    }

    /// The stored form of a text value.
    pub fn seal_text(&self, column: TextColumn, value: String) -> String {
        if !self.plan.encrypts(Encryptable::Text(column)) {
            return value;
        }
        let (version, sealed) = self.seal(column.0, value.as_bytes());
        format!("{TEXT_PREFIX}{version}:{}", BASE64.encode(sealed))
    }

    /// A text value back from its stored form.
    pub fn open_text(&self, column: TextColumn, stored: String) -> Result<String, FieldError> {
        if !stored.starts_with(TEXT_PREFIX) {
            return Ok(stored);
        }
        self.open_str(column, &stored).map(Cow::into_owned)
    }

    /// A text value back from its stored form, borrowed where it was
    /// stored in the clear (a page of entries is read without a copy).
    pub fn open_str<'a>(
        &self,
        column: TextColumn,
        stored: &'a str,
    ) -> Result<Cow<'a, str>, FieldError> {
        let Some(rest) = stored.strip_prefix(TEXT_PREFIX) else {
            return Ok(Cow::Borrowed(stored));
        };
        let damaged = || FieldError::damaged(column.0);
        let (version, body) = rest.split_once(':').ok_or_else(damaged)?;
        let version: u32 = version.parse().map_err(|_| damaged())?;
        let body = BASE64.decode(body).map_err(|_| damaged())?;
        let plain = self.open(column.0, version, &body)?;
        String::from_utf8(plain)
            .map(Cow::Owned)
            .map_err(|_| damaged())
    }

    /// The stored form of a bytea value.
    pub fn seal_bytes(&self, column: BytesColumn, value: Vec<u8>) -> Vec<u8> {
        if !self.plan.encrypts(Encryptable::Bytes(column)) {
            return value;
        }
        let (version, sealed) = self.seal(column.0, &value);
        let mut out = BYTES_PREFIX.to_vec();
        out.extend_from_slice(&version.to_be_bytes());
        out.extend_from_slice(&sealed);
        out
    }

    /// A bytea value back from its stored form.
    pub fn open_bytes(&self, column: BytesColumn, stored: Vec<u8>) -> Result<Vec<u8>, FieldError> {
        let Some(rest) = stored.strip_prefix(BYTES_PREFIX) else {
            return Ok(stored);
        };
        if rest.len() < 4 {
            return Err(FieldError::damaged(column.0));
        }
        let version = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes"));
        self.open(column.0, version, &rest[4..])
    }

    /// The key version a stored value is under, if it is sealed.
    pub fn version_of_text(stored: &str) -> Option<u32> {
        stored
            .strip_prefix(TEXT_PREFIX)?
            .split_once(':')?
            .0
            .parse()
            .ok()
    }

    pub fn version_of_bytes(stored: &[u8]) -> Option<u32> {
        let rest = stored.strip_prefix(BYTES_PREFIX)?;
        Some(u32::from_be_bytes(rest.get(..4)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher(version: u32, fields: &str) -> (tempfile::TempDir, ClusterKey, FieldCipher) {
        let cluster = ClusterKey::generate().unwrap();
        let (dir, cluster, cipher) = configured(cluster, version, fields);
        (dir, cluster, cipher)
    }

    fn cipher_of(
        cluster: &ClusterKey,
        version: u32,
    ) -> (tempfile::TempDir, ClusterKey, FieldCipher) {
        configured(cluster.clone(), version, FIELDS)
    }

    fn configured(
        cluster: ClusterKey,
        version: u32,
        fields: &str,
    ) -> (tempfile::TempDir, ClusterKey, FieldCipher) {
        let dir = tempfile::tempdir().unwrap();
        let yaml = format!(
            "encryption_at_rest:\n  enabled: true\n  method: application\n  application:\n    \
             key_version: {version}\n    encrypted_fields:\n{fields}"
        );
        let path = dir.path().join("k.yaml");
        std::fs::write(&path, yaml).unwrap();
        let config = Config::load(&path).unwrap();
        let cipher = FieldCipher::new(&cluster, &config);
        (dir, cluster, cipher)
    }

    const FIELDS: &str = "      - table: sync_logs\n        columns: [encrypted_data]\n      - table: backups\n        columns: [ciphertext]\n";

    #[test]
    fn round_trip_and_passthrough() {
        let (_d, _id, c) = cipher(1, FIELDS);
        let stored = c.seal_text(column::LOG_DATA, "secret".into());
        assert!(stored.starts_with("kf1:1:") && !stored.contains("secret"));
        assert_eq!(c.open_text(column::LOG_DATA, stored).unwrap(), "secret");
        let bytes = c.seal_bytes(column::BACKUP_CIPHERTEXT, b"blob".to_vec());
        assert_eq!(FieldCipher::version_of_bytes(&bytes), Some(1));
        assert_eq!(
            c.open_bytes(column::BACKUP_CIPHERTEXT, bytes).unwrap(),
            b"blob"
        );
        // Not configured, or written before: as is.
        assert_eq!(c.seal_text(column::LOG_NONCE, "n".into()), "n");
        assert_eq!(
            c.open_text(column::LOG_DATA, "plain".into()).unwrap(),
            "plain"
        );
        assert_eq!(
            FieldPlan::stale_values(Encryptable::Text(column::LOG_DATA), 1),
            "encrypted_data NOT LIKE 'kf1:1:%'"
        );
        assert_eq!(
            FieldPlan::stale_values(Encryptable::Bytes(column::BACKUP_CIPHERTEXT), 1),
            "substring(ciphertext FROM 1 FOR 7) <> '\\x4b463100000001'::bytea"
        );
    }

    #[test]
    fn tamper_and_swap_are_errors_and_every_version_opens() {
        let (_d, id, c) = cipher(1, FIELDS);
        let stored = c.seal_text(column::LOG_DATA, "secret".into());
        let mut chars: Vec<char> = stored.chars().collect();
        let last = chars.len() - 2;
        chars[last] = if chars[last] == 'A' { 'B' } else { 'A' };
        let tampered: String = chars.into_iter().collect();
        assert!(matches!(
            c.open_text(column::LOG_DATA, tampered),
            Err(FieldError::Damaged { .. })
        ));
        // Moved to another column: the associated data no longer matches.
        assert!(c.open_text(column::VAULT_KEY_SALT, stored.clone()).is_err());

        // Rotated to v2: v1 values still open, and a node still sealing
        // under v1 opens what another sealed under v2.
        c.seal_under(2);
        assert_eq!(c.current_version(), 2);
        let newer = c.seal_text(column::LOG_DATA, "x".into());
        assert_eq!(FieldCipher::version_of_text(&newer), Some(2));
        assert_eq!(c.open_text(column::LOG_DATA, stored).unwrap(), "secret");
        let (_d1, _, behind) = cipher_of(&id, 1);
        assert_eq!(behind.open_text(column::LOG_DATA, newer).unwrap(), "x");
        // Both of its seals were counted, once.
        assert_eq!(c.take_seals(), 2);
        assert_eq!(c.take_seals(), 0);
        // A version that was never made is a damaged value, not a panic.
        let forged = c
            .seal_text(column::LOG_DATA, "y".into())
            .replacen("kf1:2:", "kf1:0:", 1);
        assert!(matches!(
            c.open_text(column::LOG_DATA, forged),
            Err(FieldError::Damaged { .. })
        ));
    }

    #[test]
    fn columns_outside_keepds_schema_are_named_not_encrypted() {
        let (_d, _id, c) = cipher(
            1,
            "      - table: datasets\n        columns: [content]\n      - table: devices\n        columns: [device_name]\n",
        );
        assert_eq!(c.plan().unsupported(), vec!["datasets.content".to_string()]);
        assert_eq!(
            c.plan().configured().collect::<Vec<_>>(),
            vec![Encryptable::Text(column::DEVICE_NAME)]
        );
        // keepd's own secrets are sealed whatever is configured.
        let sealed: Vec<_> = c.plan().columns().collect();
        for always in ALWAYS_SEALED {
            assert!(sealed.contains(&Encryptable::Bytes(*always)));
        }
    }

    #[test]
    fn the_supported_list_is_generated_from_the_columns() {
        assert_eq!(
            supported_list(),
            "sync_logs.{encrypted_data, nonce, haex_timestamp}, \
             vault_keys.{encrypted_vault_key, salt, nonce}, \
             backups.{ciphertext, nonce, auth_tag, signature}, devices.device_name"
        );
        assert_eq!(
            lookup("keepd.devices", "device_name"),
            Some(Encryptable::Text(column::DEVICE_NAME))
        );
        assert_eq!(lookup("devices", "name"), None);
    }
}
