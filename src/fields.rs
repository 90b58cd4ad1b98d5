//! Encryption at rest, `method: application`: the configured columns are
//! sealed with AES-256-GCM before they reach Postgres (a random 12-byte
//! nonce per value, the table and column as associated data, the key
//! version stored with each value) under keys derived from the node
//! identity. Values written before encryption was enabled read as they
//! are; a value under a key version this node does not have is an error
//! naming it.
//!
//! Stored forms: text columns `kf1:<version>:<base64(nonce ‖ sealed)>`,
//! bytea columns `b"KF1" ‖ version (u32 BE) ‖ nonce ‖ sealed`.

use std::collections::{BTreeSet, HashMap};

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use zeroize::Zeroizing;

use crate::config::{AtRestMethod, Config};
use crate::identity::NodeIdentity;

const TEXT_PREFIX: &str = "kf1:";
const BYTES_PREFIX: &[u8] = b"KF1";
const NONCE_LEN: usize = 12;

/// The columns keepd can encrypt: (table, column, is text).
const SUPPORTED: &[(&str, &str, bool)] = &[
    ("keepd.sync_logs", "encrypted_data", true),
    ("keepd.sync_logs", "nonce", true),
    ("keepd.sync_logs", "haex_timestamp", true),
    ("keepd.vault_keys", "encrypted_vault_key", true),
    ("keepd.vault_keys", "salt", true),
    ("keepd.vault_keys", "nonce", true),
    ("keepd.backups", "ciphertext", false),
    ("keepd.backups", "nonce", false),
    ("keepd.backups", "auth_tag", false),
    ("keepd.backups", "signature", false),
    ("keepd.devices", "device_name", true),
];

pub const SUPPORTED_LIST: &str = "sync_logs.{encrypted_data, nonce, haex_timestamp}, \
    vault_keys.{encrypted_vault_key, salt, nonce}, backups.{ciphertext, nonce, auth_tag, \
    signature}, devices.device_name";

/// Whether keepd stores `table.column` as text (else bytea).
pub fn is_text(table: &str, column: &str) -> bool {
    supported(table, column).is_none_or(|(_, text)| text)
}

/// The schema-qualified table and whether the column is text, when keepd
/// can encrypt `table.column` (`table` with or without `keepd.`).
pub fn supported(table: &str, column: &str) -> Option<(&'static str, bool)> {
    let qualified = if table.contains('.') {
        table.to_string()
    } else {
        format!("keepd.{table}")
    };
    SUPPORTED
        .iter()
        .find(|(t, c, _)| *t == qualified && *c == column)
        .map(|(t, _, text)| (*t, *text))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FieldError {
    #[error(
        "{table}.{column} holds a value sealed under field key version {version}, which this \
         node does not have (current: {current}); was encryption_at_rest.application.key_version \
         lowered, or the value written by another node?"
    )]
    UnknownKey {
        table: String,
        column: String,
        version: u32,
        current: u32,
    },
    #[error("{table}.{column} holds a damaged or altered encrypted value")]
    Damaged { table: String, column: String },
}

/// Seals and opens the configured columns.
pub struct FieldCipher {
    columns: BTreeSet<(&'static str, &'static str)>,
    /// Configured columns keepd's schema does not have (the seeds'
    /// examples name other applications' tables): not encrypted, reported.
    unsupported: Vec<String>,
    keys: HashMap<u32, Zeroizing<[u8; 32]>>,
    current: u32,
}

impl FieldCipher {
    /// From the configuration: encrypts nothing unless application
    /// encryption is enabled.
    pub fn new(identity: &NodeIdentity, config: &Config) -> FieldCipher {
        let at_rest = &config.encryption_at_rest;
        let enabled = at_rest.enabled && at_rest.method == AtRestMethod::Application;
        let mut columns = BTreeSet::new();
        let mut unsupported = Vec::new();
        let configured = at_rest
            .application
            .encrypted_fields
            .iter()
            .filter(|_| enabled);
        for fields in configured {
            for column in &fields.columns {
                let known = SUPPORTED.iter().find(|(t, c, _)| {
                    supported(&fields.table, column).is_some_and(|(table, _)| *t == table)
                        && c == column
                });
                match known {
                    Some((table, column, _)) => {
                        columns.insert((*table, *column));
                    }
                    None => unsupported.push(format!("{}.{column}", fields.table)),
                }
            }
        }
        let current = at_rest.application.key_version;
        let keys = (1..=current)
            .map(|v| {
                let label = format!("keepd field key v{v}");
                (v, identity.derive_key(b"keepd fields", label.as_bytes()))
            })
            .collect();
        FieldCipher {
            columns,
            unsupported,
            keys,
            current,
        }
    }

    /// Configured columns that are not in keepd's schema.
    pub fn unsupported(&self) -> Vec<String> {
        self.unsupported.clone()
    }

    pub fn current_version(&self) -> u32 {
        self.current
    }

    /// The configured columns, as (table, column).
    pub fn columns(&self) -> impl Iterator<Item = (&'static str, &'static str)> + '_ {
        self.columns.iter().copied()
    }

    /// A SQL condition (no parameters) true for the values of
    /// `table.column` not sealed under the current key: sealed under
    /// another version, or written before encryption was enabled.
    pub fn stale_values(&self, table: &str, column: &str) -> String {
        if is_text(table, column) {
            format!("{column} NOT LIKE '{TEXT_PREFIX}{}:%'", self.current)
        } else {
            let marker = hex::encode([BYTES_PREFIX, &self.current.to_be_bytes()].concat());
            format!(
                "substring({column} FROM 1 FOR {}) <> '\\x{marker}'::bytea",
                BYTES_PREFIX.len() + 4
            )
        }
    }

    fn encrypts(&self, table: &str, column: &str) -> bool {
        self.columns.contains(&(table, column))
    }

    fn cipher(&self, version: u32) -> Option<Aes256Gcm> {
        let key = self.keys.get(&version)?;
        Some(Aes256Gcm::new_from_slice(key.as_ref()).expect("32-byte key"))
    }

    fn seal(&self, table: &str, column: &str, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).expect("the OS CSPRNG is available");
        let aad = format!("{table}.{column}");
        let sealed = self
            .cipher(self.current)
            .expect("the current key exists")
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
        out
    }

    fn open(
        &self,
        table: &str,
        column: &str,
        version: u32,
        body: &[u8],
    ) -> Result<Vec<u8>, FieldError> {
        let damaged = || FieldError::Damaged {
            table: table.into(),
            column: column.into(),
        };
        let cipher = self.cipher(version).ok_or_else(|| FieldError::UnknownKey {
            table: table.into(),
            column: column.into(),
            version,
            current: self.current,
        })?;
        if body.len() < NONCE_LEN {
            return Err(damaged());
        }
        let (nonce, sealed) = body.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| damaged())?;
        let aad = format!("{table}.{column}");
        cipher
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
    pub fn seal_text(&self, table: &str, column: &str, value: String) -> String {
        if !self.encrypts(table, column) {
            return value;
        }
        let sealed = self.seal(table, column, value.as_bytes());
        format!("{TEXT_PREFIX}{}:{}", self.current, BASE64.encode(sealed))
    }

    /// A text value back from its stored form.
    pub fn open_text(
        &self,
        table: &str,
        column: &str,
        stored: String,
    ) -> Result<String, FieldError> {
        let Some(rest) = stored.strip_prefix(TEXT_PREFIX) else {
            return Ok(stored);
        };
        let damaged = || FieldError::Damaged {
            table: table.into(),
            column: column.into(),
        };
        let (version, body) = rest.split_once(':').ok_or_else(damaged)?;
        let version: u32 = version.parse().map_err(|_| damaged())?;
        let body = BASE64.decode(body).map_err(|_| damaged())?;
        let plain = self.open(table, column, version, &body)?;
        String::from_utf8(plain).map_err(|_| damaged())
    }

    /// The stored form of a bytea value.
    pub fn seal_bytes(&self, table: &str, column: &str, value: Vec<u8>) -> Vec<u8> {
        if !self.encrypts(table, column) {
            return value;
        }
        let mut out = BYTES_PREFIX.to_vec();
        out.extend_from_slice(&self.current.to_be_bytes());
        out.extend_from_slice(&self.seal(table, column, &value));
        out
    }

    /// A bytea value back from its stored form.
    pub fn open_bytes(
        &self,
        table: &str,
        column: &str,
        stored: Vec<u8>,
    ) -> Result<Vec<u8>, FieldError> {
        let Some(rest) = stored.strip_prefix(BYTES_PREFIX) else {
            return Ok(stored);
        };
        if rest.len() < 4 {
            return Err(FieldError::Damaged {
                table: table.into(),
                column: column.into(),
            });
        }
        let version = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes"));
        self.open(table, column, version, &rest[4..])
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

    fn cipher(version: u32, fields: &str) -> (tempfile::TempDir, NodeIdentity, FieldCipher) {
        let dir = tempfile::tempdir().unwrap();
        let (identity, _) = NodeIdentity::load_or_create(&dir.path().join("id")).unwrap();
        let yaml = format!(
            "encryption_at_rest:\n  enabled: true\n  method: application\n  application:\n    \
             key_version: {version}\n    encrypted_fields:\n{fields}"
        );
        let path = dir.path().join("k.yaml");
        std::fs::write(&path, yaml).unwrap();
        let config = Config::load(&path).unwrap();
        let cipher = FieldCipher::new(&identity, &config);
        (dir, identity, cipher)
    }

    const FIELDS: &str = "      - table: sync_logs\n        columns: [encrypted_data]\n      - table: backups\n        columns: [ciphertext]\n";

    #[test]
    fn round_trip_and_passthrough() {
        let (_d, _id, c) = cipher(1, FIELDS);
        let stored = c.seal_text("keepd.sync_logs", "encrypted_data", "secret".into());
        assert!(stored.starts_with("kf1:1:") && !stored.contains("secret"));
        assert_eq!(
            c.open_text("keepd.sync_logs", "encrypted_data", stored)
                .unwrap(),
            "secret"
        );
        let bytes = c.seal_bytes("keepd.backups", "ciphertext", b"blob".to_vec());
        assert_eq!(FieldCipher::version_of_bytes(&bytes), Some(1));
        assert_eq!(
            c.open_bytes("keepd.backups", "ciphertext", bytes).unwrap(),
            b"blob"
        );
        // Not configured, or written before: as is.
        assert_eq!(c.seal_text("keepd.sync_logs", "nonce", "n".into()), "n");
        assert_eq!(
            c.open_text("keepd.sync_logs", "encrypted_data", "plain".into())
                .unwrap(),
            "plain"
        );
        assert_eq!(
            c.stale_values("keepd.sync_logs", "encrypted_data"),
            "encrypted_data NOT LIKE 'kf1:1:%'"
        );
        assert_eq!(
            c.stale_values("keepd.backups", "ciphertext"),
            "substring(ciphertext FROM 1 FOR 7) <> '\\x4b463100000001'::bytea"
        );
    }

    #[test]
    fn tamper_swap_and_unknown_key_are_errors() {
        let (_d, id, c) = cipher(1, FIELDS);
        let stored = c.seal_text("keepd.sync_logs", "encrypted_data", "secret".into());
        let mut chars: Vec<char> = stored.chars().collect();
        let last = chars.len() - 2;
        chars[last] = if chars[last] == 'A' { 'B' } else { 'A' };
        let tampered: String = chars.into_iter().collect();
        assert!(matches!(
            c.open_text("keepd.sync_logs", "encrypted_data", tampered),
            Err(FieldError::Damaged { .. })
        ));
        // Moved to another column: the associated data no longer matches.
        assert!(
            c.open_text("keepd.vault_keys", "salt", stored.clone())
                .is_err()
        );

        // Rotated to v2: v1 values still open; v1-only nodes refuse v2 values.
        let dir = tempfile::tempdir().unwrap();
        let yaml = format!(
            "encryption_at_rest:\n  enabled: true\n  application:\n    key_version: 2\n    encrypted_fields:\n{FIELDS}"
        );
        std::fs::write(dir.path().join("k.yaml"), yaml).unwrap();
        let v2 = FieldCipher::new(&id, &Config::load(&dir.path().join("k.yaml")).unwrap());
        assert_eq!(
            v2.open_text("keepd.sync_logs", "encrypted_data", stored)
                .unwrap(),
            "secret"
        );
        let newer = v2.seal_text("keepd.sync_logs", "encrypted_data", "x".into());
        assert_eq!(FieldCipher::version_of_text(&newer), Some(2));
        let err = c
            .open_text("keepd.sync_logs", "encrypted_data", newer)
            .unwrap_err();
        assert!(matches!(
            err,
            FieldError::UnknownKey {
                version: 2,
                current: 1,
                ..
            }
        ));
        assert!(err.to_string().contains("key version 2"), "{err}");
    }

    #[test]
    fn columns_outside_keepds_schema_are_named_not_encrypted() {
        let (_d, _id, c) = cipher(
            1,
            "      - table: datasets\n        columns: [content]\n      - table: devices\n        columns: [device_name]\n",
        );
        assert_eq!(c.unsupported(), vec!["datasets.content".to_string()]);
        assert_eq!(
            c.columns().collect::<Vec<_>>(),
            vec![("keepd.devices", "device_name")]
        );
    }
}
