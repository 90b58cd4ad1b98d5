//! How the identity key is kept at rest (`node.identity`): in the clear
//! (0600, the default), wrapped under a passphrase, or as a systemd
//! encrypted credential. Whoever copies a state directory holding a
//! protected identity holds nothing they can open.
//!
//! - **Passphrase**: `state_dir/identity.sealed`, the key file's text
//!   sealed with AES-256-GCM under a key Argon2id derives from the
//!   passphrase in `node.identity.passphrase_file` (a file the service
//!   manager provides, never the configuration itself). A wrong
//!   passphrase is a configuration error; nothing is written.
//! - **Credential**: the file `node.identity.credential` made by
//!   `systemd-creds encrypt` (TPM2 where present, the host key
//!   otherwise). Under systemd, `LoadCredentialEncrypted=keepd-identity:…`
//!   hands keepd the decrypted key in `$CREDENTIALS_DIRECTORY`, in memory;
//!   elsewhere (the CLI, a test) keepd runs `systemd-creds decrypt` itself.
//!
//! With either, a plaintext `identity.key` beside it is refused: the
//! protection would be a pretence.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use zeroize::Zeroizing;

use super::{IdentityError, NodeIdentity};
use crate::config::{Config, Layout};
use crate::fsutil;

const SEALED_MAGIC: &str = "keepd-identity-sealed: v1";
/// The name systemd gives the credential (`LoadCredentialEncrypted=`).
pub const CREDENTIAL_NAME: &str = "keepd-identity";
/// Argon2id for the passphrase: RFC 9106's second recommended option
/// (64 MiB, 3 passes), one lane.
const KDF_MEMORY_KIB: u32 = 65_536;
const KDF_PASSES: u32 = 3;
const KDF_LANES: u32 = 1;

/// How the identity is protected at rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    Plaintext,
    Passphrase,
    Credential,
}

impl Protection {
    pub fn describe(self) -> &'static str {
        match self {
            Protection::Plaintext => "a plaintext file (mode 0600)",
            Protection::Passphrase => "sealed under a passphrase (Argon2id, AES-256-GCM)",
            Protection::Credential => "a systemd encrypted credential",
        }
    }
}

/// Where this node's identity is, and how to open it.
pub struct IdentityStore {
    plain: PathBuf,
    sealed: PathBuf,
    passphrase_file: Option<PathBuf>,
    credential: Option<PathBuf>,
}

fn kdf(passphrase: &[u8], salt: &[u8]) -> Zeroizing<[u8; 32]> {
    let params = Params::new(KDF_MEMORY_KIB, KDF_PASSES, KDF_LANES, Some(32))
        .expect("constant, valid Argon2 parameters");
    let mut key = Zeroizing::new([0u8; 32]);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(passphrase, salt, key.as_mut())
        .expect("a 16-byte salt and a 32-byte output are valid");
    key
}

impl IdentityStore {
    pub fn of(config: &Config) -> IdentityStore {
        let layout = Layout::of(config);
        IdentityStore {
            plain: layout.identity_key(),
            sealed: layout.identity_sealed(),
            passphrase_file: config.node.identity.passphrase_file.clone(),
            credential: config.node.identity.credential.clone(),
        }
    }

    pub fn protection(&self) -> Protection {
        match (&self.passphrase_file, &self.credential) {
            (Some(_), _) => Protection::Passphrase,
            (None, Some(_)) => Protection::Credential,
            (None, None) => Protection::Plaintext,
        }
    }

    /// The path an operator's copy of the key (or its protected form) is
    /// at, for messages.
    pub fn path(&self) -> &Path {
        match self.protection() {
            Protection::Plaintext => &self.plain,
            Protection::Passphrase => &self.sealed,
            Protection::Credential => self.credential.as_deref().unwrap_or(&self.plain),
        }
    }

    /// Refuses a plaintext key beside a protected one.
    fn no_plaintext_beside(&self) -> Result<(), IdentityError> {
        if self.protection() != Protection::Plaintext && self.plain.exists() {
            return Err(IdentityError::PlaintextBeside {
                plain: self.plain.clone(),
                protection: self.protection().describe(),
            });
        }
        Ok(())
    }

    /// The identity, opened as `node.identity` says.
    pub fn load(&self) -> Result<NodeIdentity, IdentityError> {
        self.no_plaintext_beside()?;
        match self.protection() {
            Protection::Plaintext => NodeIdentity::load(&self.plain),
            Protection::Passphrase => self.open_sealed(),
            Protection::Credential => self.open_credential(),
        }
    }

    /// The identity, created on a first start (plaintext or sealed under
    /// the passphrase; a credential is made by the operator from an
    /// existing key, `keepd identity protect`). Whether it was created now.
    pub fn load_or_create(&self) -> Result<(NodeIdentity, bool), IdentityError> {
        self.no_plaintext_beside()?;
        match self.protection() {
            Protection::Plaintext => NodeIdentity::load_or_create(&self.plain),
            Protection::Passphrase if !self.sealed.exists() => {
                let passphrase = self.passphrase()?;
                let identity = NodeIdentity::generate()?;
                self.write_sealed(&identity, &passphrase)?;
                Ok((identity, true))
            }
            _ => Ok((self.load()?, false)),
        }
    }

    fn passphrase(&self) -> Result<Zeroizing<Vec<u8>>, IdentityError> {
        let file = self
            .passphrase_file
            .as_ref()
            .expect("passphrase protection");
        let bad = |reason: String| IdentityError::Passphrase {
            file: file.clone(),
            reason,
        };
        let text = Zeroizing::new(std::fs::read(file).map_err(|e| bad(e.to_string()))?);
        // A file written by `echo` ends with a newline that is not part of it.
        let end = text
            .iter()
            .rposition(|b| !matches!(b, b'\n' | b'\r'))
            .map_or(0, |i| i + 1);
        let passphrase = text[..end].to_vec();
        if passphrase.len() < 12 {
            return Err(bad(
                "it holds fewer than 12 bytes; use a long passphrase".into()
            ));
        }
        Ok(Zeroizing::new(passphrase))
    }

    /// Seals `identity` under `passphrase` into `identity.sealed` (a new
    /// file: an existing one is never overwritten).
    pub fn write_sealed(
        &self,
        identity: &NodeIdentity,
        passphrase: &[u8],
    ) -> Result<(), IdentityError> {
        let write_err = |source| IdentityError::Write {
            path: self.sealed.clone(),
            source,
        };
        let mut salt = [0u8; 16];
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut salt).map_err(|e| IdentityError::Entropy(e.to_string()))?;
        getrandom::fill(&mut nonce).map_err(|e| IdentityError::Entropy(e.to_string()))?;
        let key = kdf(passphrase, &salt);
        let sealed = Aes256Gcm::new_from_slice(key.as_ref())
            .expect("32-byte key")
            .encrypt(
                &nonce.into(),
                Payload {
                    msg: identity.encode().as_bytes(),
                    aad: SEALED_MAGIC.as_bytes(),
                },
            )
            .expect("AES-256-GCM seals a key file");
        let text = format!(
            "{SEALED_MAGIC}\n\
             # The node identity of keepd {id}, sealed under the passphrase of\n\
             # node.identity.passphrase_file (Argon2id m={KDF_MEMORY_KIB} KiB t={KDF_PASSES} p={KDF_LANES}, AES-256-GCM).\n\
             salt: {salt}\nnonce: {nonce}\nsealed: {sealed}\n",
            id = identity.node_id(),
            salt = BASE64.encode(salt),
            nonce = BASE64.encode(nonce),
            sealed = BASE64.encode(sealed),
        );
        if let Some(dir) = self.sealed.parent() {
            fsutil::ensure_private_dir(dir).map_err(write_err)?;
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&self.sealed)
            .map_err(write_err)?;
        file.write_all(text.as_bytes()).map_err(write_err)?;
        file.sync_all().map_err(write_err)?;
        if let Some(dir) = self.sealed.parent() {
            fsutil::sync_dir(dir).map_err(write_err)?;
        }
        Ok(())
    }

    fn open_sealed(&self) -> Result<NodeIdentity, IdentityError> {
        let path = &self.sealed;
        let text = std::fs::read_to_string(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => IdentityError::Missing { path: path.clone() },
            _ => IdentityError::Read {
                path: path.clone(),
                source,
            },
        })?;
        let corrupt = |reason: &str| IdentityError::Corrupt {
            path: path.clone(),
            reason: reason.into(),
        };
        let mut lines = text.lines();
        if lines.next() != Some(SEALED_MAGIC) {
            return Err(IdentityError::Foreign { path: path.clone() });
        }
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
                .and_then(|v| BASE64.decode(v.trim()).ok())
                .ok_or_else(|| corrupt(&format!("no readable `{name}` line")))
        };
        let (salt, nonce, sealed) = (field("salt")?, field("nonce")?, field("sealed")?);
        let nonce: [u8; 12] = nonce
            .try_into()
            .map_err(|_| corrupt("the nonce is not 12 bytes"))?;
        let key = kdf(&self.passphrase()?, &salt);
        let plain = Aes256Gcm::new_from_slice(key.as_ref())
            .expect("32-byte key")
            .decrypt(
                &nonce.into(),
                Payload {
                    msg: &sealed,
                    aad: SEALED_MAGIC.as_bytes(),
                },
            )
            .map_err(|_| IdentityError::Passphrase {
                file: self.passphrase_file.clone().unwrap_or_default(),
                reason: format!(
                    "it does not open {} (a wrong passphrase, or the file was altered)",
                    path.display()
                ),
            })?;
        NodeIdentity::from_text(&Zeroizing::new(plain), path)
    }

    fn open_credential(&self) -> Result<NodeIdentity, IdentityError> {
        let credential = self.credential.as_ref().expect("credential protection");
        // Under systemd: decrypted for us, in memory, for this service only.
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            let path = Path::new(&dir).join(CREDENTIAL_NAME);
            if path.exists() {
                let bytes =
                    Zeroizing::new(std::fs::read(&path).map_err(|source| IdentityError::Read {
                        path: path.clone(),
                        source,
                    })?);
                return NodeIdentity::from_text(&bytes, &path);
            }
        }
        let out = Command::new("systemd-creds")
            .args(["decrypt", &format!("--name={CREDENTIAL_NAME}")])
            .arg(credential)
            .arg("-")
            .output()
            .map_err(|e| IdentityError::Credential {
                path: credential.clone(),
                reason: format!("cannot run systemd-creds: {e}"),
            })?;
        let plain = Zeroizing::new(out.stdout);
        if !out.status.success() {
            return Err(IdentityError::Credential {
                path: credential.clone(),
                reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        NodeIdentity::from_text(&plain, credential)
    }

    /// Encrypts `identity` as a systemd credential at `node.identity.credential`
    /// (`systemd-creds encrypt --with-key=<with_key>`), the plaintext fed
    /// through a pipe, never a file.
    pub fn write_credential(
        &self,
        identity: &NodeIdentity,
        with_key: &str,
    ) -> Result<(), IdentityError> {
        let credential = self.credential.as_ref().expect("credential protection");
        let failed = |reason: String| IdentityError::Credential {
            path: credential.clone(),
            reason,
        };
        if credential.exists() {
            return Err(failed(
                "it exists already; keepd never overwrites it".into(),
            ));
        }
        let mut child = Command::new("systemd-creds")
            .args([
                "encrypt",
                &format!("--name={CREDENTIAL_NAME}"),
                &format!("--with-key={with_key}"),
                "-",
            ])
            .arg(credential)
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| failed(format!("cannot run systemd-creds: {e}")))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(identity.encode().as_bytes())
                .map_err(|e| failed(e.to_string()))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| failed(e.to_string()))?;
        if !out.status.success() {
            return Err(failed(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        Ok(())
    }

    /// Moves the plaintext key into the configured protection, opens it
    /// back to check, then deletes the plaintext file (`keepd identity
    /// protect`, keepd stopped). The node's id.
    pub fn protect(&self, with_key: &str) -> Result<super::NodeId, IdentityError> {
        let identity = NodeIdentity::load(&self.plain)?;
        match self.protection() {
            Protection::Plaintext => return Err(IdentityError::NotProtected),
            Protection::Passphrase => self.write_sealed(&identity, &self.passphrase()?)?,
            Protection::Credential => self.write_credential(&identity, with_key)?,
        }
        let reopened = match self.protection() {
            Protection::Passphrase => self.open_sealed()?,
            _ => self.open_credential()?,
        };
        assert_eq!(
            reopened.node_id(),
            identity.node_id(),
            "the protected key is the node's own"
        );
        std::fs::remove_file(&self.plain).map_err(|source| IdentityError::Write {
            path: self.plain.clone(),
            source,
        })?;
        if let Some(dir) = self.plain.parent() {
            fsutil::sync_dir(dir).map_err(|source| IdentityError::Write {
                path: dir.to_owned(),
                source,
            })?;
        }
        Ok(identity.node_id().clone())
    }

    /// The plaintext key file.
    pub fn plain_path(&self) -> &Path {
        &self.plain
    }
}
