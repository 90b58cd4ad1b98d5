//! The node's Ed25519 identity: created once, loaded afterwards, never replaced.
//!
//! Everything keepd seals is sealed to this key, and the node id (a short hash
//! of its public key) names everything keepd creates. A damaged or foreign key
//! file is an error for the operator to resolve: silently generating a new key
//! would orphan every sealed secret.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::fsutil;

pub mod protection;

const MAGIC_LINE: &str = "keepd-identity: v1";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "no identity key at {path}: this node has not run yet (start it with `keepd run`, \
         check --config and node.state_dir), or rebuild the key with `keepd recovery combine`"
    )]
    Missing { path: PathBuf },
    #[error("cannot read identity key {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create identity key {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a keepd identity key (its first line is not `{MAGIC_LINE}`); \
         restore the node's own identity.key from backup or point node.state_dir elsewhere"
    )]
    Foreign { path: PathBuf },
    #[error(
        "identity key {path} is corrupted ({reason}); keepd will not replace it because every \
         sealed secret depends on it: restore it from backup or recover it with \
         `keepd recovery combine`"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "identity key {path} has mode {mode:04o}, readable by other users; \
         run `chmod 600 {path}` after checking nobody copied it"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("cannot gather randomness for a new identity key: {0}")]
    Entropy(String),
    #[error(
        "a plaintext identity key {plain} lies beside the identity kept as {protection} \
         (node.identity): check that both name the same node (`keepd status`), then delete \
         the plaintext file; keepd will not run with both"
    )]
    PlaintextBeside {
        plain: PathBuf,
        protection: &'static str,
    },
    #[error(
        "node.identity names no protection: set node.identity.passphrase_file or \
         node.identity.credential, then run it again"
    )]
    NotProtected,
    #[error("node.identity.passphrase_file {file}: {reason}")]
    Passphrase { file: PathBuf, reason: String },
    #[error(
        "node.identity.credential {path} does not give the identity: {reason}; keepd never \
         falls back to a plaintext key"
    )]
    Credential { path: PathBuf, reason: String },
}

impl IdentityError {
    /// A setting that cannot work as written (exit 2): the protection the
    /// configuration names cannot open the key.
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            IdentityError::PlaintextBeside { .. }
                | IdentityError::NotProtected
                | IdentityError::Passphrase { .. }
                | IdentityError::Credential { .. }
        )
    }
}

/// A short, stable, lowercase-hex name for this node (first 8 bytes of the
/// SHA-256 of the public key), safe in role, container and file names.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct NodeId(String);

impl NodeId {
    /// The id of the node holding `key`.
    pub fn of(key: &VerifyingKey) -> NodeId {
        let digest = Sha256::digest(key.as_bytes());
        NodeId(hex::encode(&digest[..8]))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The SHA-256 of an Ed25519 public key in groups of four hex digits: what
/// an operator compares before admitting a node to a cluster.
pub fn fingerprint(key: &VerifyingKey) -> String {
    let digest = hex::encode(Sha256::digest(key.as_bytes()));
    let groups: Vec<&str> = (0..digest.len())
        .step_by(4)
        .map(|i| &digest[i..i + 4])
        .collect();
    groups.join(" ")
}

/// HKDF-SHA256 of `ikm` to 32 bytes, `domain` as the salt and `label` as
/// the info: how every purpose's key is derived from a root secret.
pub fn hkdf32(domain: &[u8], ikm: &[u8], label: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut key = Zeroizing::new([0u8; 32]);
    hkdf::Hkdf::<Sha256>::new(Some(domain), ikm)
        .expand(label, key.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    key
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.0)
    }
}

/// The node's signing key. Its Debug output shows only the node id.
pub struct NodeIdentity {
    signing: SigningKey,
    node_id: NodeId,
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl NodeIdentity {
    /// Loads the key at `path`, creating it (0600, parent 0700) when absent.
    /// Returns the identity and whether it was created now.
    pub fn load_or_create(path: &Path) -> Result<(NodeIdentity, bool), IdentityError> {
        match std::fs::symlink_metadata(path) {
            Ok(_) => Ok((NodeIdentity::load(path)?, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok((NodeIdentity::create(path)?, true))
            }
            Err(source) => Err(IdentityError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    pub fn load(path: &Path) -> Result<NodeIdentity, IdentityError> {
        let read_err = |source: std::io::Error| match source.kind() {
            std::io::ErrorKind::NotFound => IdentityError::Missing {
                path: path.to_owned(),
            },
            _ => IdentityError::Read {
                path: path.to_owned(),
                source,
            },
        };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::Exposed {
                path: path.to_owned(),
                mode,
            });
        }
        let bytes = Zeroizing::new(std::fs::read(path).map_err(read_err)?);
        NodeIdentity::from_text(&bytes, path)
    }

    /// The identity a key file's text holds; `path` names where it came
    /// from in errors.
    fn from_text(bytes: &[u8], path: &Path) -> Result<NodeIdentity, IdentityError> {
        NodeIdentity::parse(bytes).map_err(|problem| match problem {
            ParseProblem::Foreign => IdentityError::Foreign {
                path: path.to_owned(),
            },
            ParseProblem::Corrupt(reason) => IdentityError::Corrupt {
                path: path.to_owned(),
                reason,
            },
        })
    }

    fn create(path: &Path) -> Result<NodeIdentity, IdentityError> {
        let identity = NodeIdentity::generate()?;
        identity.write_new(path)?;
        Ok(identity)
    }

    /// A new identity, in memory only.
    fn generate() -> Result<NodeIdentity, IdentityError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut()).map_err(|e| IdentityError::Entropy(e.to_string()))?;
        Ok(NodeIdentity::from_seed(&seed))
    }

    /// Writes this identity to `path` (0600, parent 0700); an existing file
    /// is never overwritten.
    pub fn write_new(&self, path: &Path) -> Result<(), IdentityError> {
        self.write(path, true)
    }

    /// Writes the key as a new 0600 file where an operator asked for it
    /// (`keepd recovery combine --out`): a missing directory is made
    /// private, an existing one (`/tmp`, say) is left as it is.
    pub fn write_new_at(&self, path: &Path) -> Result<(), IdentityError> {
        self.write(path, false)
    }

    fn write(&self, path: &Path, tighten_dir: bool) -> Result<(), IdentityError> {
        let write_err = |source| IdentityError::Write {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            match tighten_dir {
                true => fsutil::ensure_private_dir(dir),
                false => fsutil::create_dir_if_missing(dir, 0o700),
            }
            .map_err(write_err)?;
        }
        let text = self.encode();
        // create_new: a key that appeared since we looked is never overwritten.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(write_err)?;
        file.write_all(text.as_bytes()).map_err(write_err)?;
        file.sync_all().map_err(write_err)?;
        if let Some(dir) = path.parent() {
            fsutil::sync_dir(dir).map_err(write_err)?;
        }
        Ok(())
    }

    /// The identity whose Ed25519 seed is `seed` (key recovery).
    pub fn from_seed(seed: &[u8; 32]) -> NodeIdentity {
        let signing = SigningKey::from_bytes(seed);
        let node_id = NodeId::of(&signing.verifying_key());
        NodeIdentity { signing, node_id }
    }

    fn encode(&self) -> Zeroizing<String> {
        Zeroizing::new(format!(
            "{MAGIC_LINE}\n\
             # The node identity of keepd {id}. Every sealed secret of this node depends on it:\n\
             # keep it private (mode 0600) and back it up, or split it with `keepd recovery split`.\n\
             algorithm: ed25519\n\
             seed: {seed}\n\
             public-key: {public}\n",
            id = self.node_id,
            seed = Zeroizing::new(BASE64.encode(self.signing.to_bytes())).as_str(),
            public = BASE64.encode(self.signing.verifying_key().as_bytes()),
        ))
    }

    fn parse(bytes: &[u8]) -> Result<NodeIdentity, ParseProblem> {
        let text = std::str::from_utf8(bytes).map_err(|_| ParseProblem::Foreign)?;
        let mut lines = text.lines();
        if lines.next().map(str::trim_end) != Some(MAGIC_LINE) {
            return Err(ParseProblem::Foreign);
        }
        let (mut algorithm, mut seed_b64, mut public_b64) = (None, None, None);
        // Messages name line numbers and field names only, never content:
        // a damaged line may hold part of the seed.
        for (index, line) in lines.enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line.split_once(':').ok_or_else(|| {
                ParseProblem::Corrupt(format!("line {} is not `field: value`", index + 2))
            })?;
            let slot = match key.trim() {
                "algorithm" => &mut algorithm,
                "seed" => &mut seed_b64,
                "public-key" => &mut public_b64,
                _ => {
                    return Err(ParseProblem::Corrupt(format!(
                        "line {} has an unexpected field",
                        index + 2
                    )));
                }
            };
            if slot.replace(value.trim()).is_some() {
                return Err(ParseProblem::Corrupt(format!(
                    "field `{}` repeated",
                    key.trim()
                )));
            }
        }
        match algorithm {
            Some("ed25519") => {}
            Some(other) => {
                return Err(ParseProblem::Corrupt(format!(
                    "algorithm `{other}` is not ed25519"
                )));
            }
            None => return Err(ParseProblem::Corrupt("no `algorithm` field".into())),
        }
        let seed_b64 = seed_b64.ok_or_else(|| ParseProblem::Corrupt("no `seed` field".into()))?;
        let public_b64 =
            public_b64.ok_or_else(|| ParseProblem::Corrupt("no `public-key` field".into()))?;
        let seed = Zeroizing::new(
            BASE64
                .decode(seed_b64)
                .map_err(|_| ParseProblem::Corrupt("the seed is not valid base64".into()))?,
        );
        let seed: Zeroizing<[u8; 32]> =
            Zeroizing::new(seed.as_slice().try_into().map_err(|_| {
                ParseProblem::Corrupt(format!("the seed is {} bytes, not 32", seed.len()))
            })?);
        let public = BASE64
            .decode(public_b64)
            .map_err(|_| ParseProblem::Corrupt("the public key is not valid base64".into()))?;
        let identity = NodeIdentity::from_seed(&seed);
        if identity.signing.verifying_key().as_bytes().as_slice() != public.as_slice() {
            return Err(ParseProblem::Corrupt(
                "the seed does not match the recorded public key".into(),
            ));
        }
        Ok(identity)
    }

    pub fn node_id(&self) -> &NodeId {
        &self.node_id
    }

    pub fn public_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// The 32-byte secret seed, for deriving sealing keys and Shamir shares.
    pub fn seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.signing.to_bytes())
    }

    /// The X25519 static secret paired with this Ed25519 key (the standard
    /// birational map), for sealing secrets to this node.
    pub fn x25519_secret(&self) -> x25519_dalek::StaticSecret {
        x25519_dalek::StaticSecret::from(self.signing.to_scalar_bytes())
    }

    /// The X25519 public key matching `x25519_secret`.
    pub fn x25519_public(&self) -> x25519_dalek::PublicKey {
        x25519_dalek::PublicKey::from(self.signing.verifying_key().to_montgomery().to_bytes())
    }

    /// A 32-byte key for one purpose, derived from the seed with
    /// HKDF-SHA256; `domain` and `label` keep purposes apart, so one
    /// derived key says nothing about another or about the seed.
    pub fn derive_key(&self, domain: &[u8], label: &[u8]) -> Zeroizing<[u8; 32]> {
        hkdf32(domain, self.seed().as_ref(), label)
    }

    pub fn sign(&self, message: &[u8]) -> ed25519_dalek::Signature {
        use ed25519_dalek::Signer;
        self.signing.sign(message)
    }
}

enum ParseProblem {
    Foreign,
    Corrupt(String),
}

/// A fresh identity in its own temporary directory, for tests.
#[cfg(test)]
pub(crate) fn test_identity() -> (tempfile::TempDir, NodeIdentity) {
    let dir = tempfile::tempdir().unwrap();
    let (id, _) = NodeIdentity::load_or_create(&dir.path().join("identity.key")).unwrap();
    (dir, id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_path(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join("state").join("identity.key")
    }

    #[test]
    fn created_then_loaded_with_same_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = key_path(&dir);
        let (first, created) = NodeIdentity::load_or_create(&path).unwrap();
        assert!(created);
        let (second, created) = NodeIdentity::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(first.node_id(), second.node_id());
        assert_eq!(first.node_id().as_str().len(), 16);
        assert!(
            first
                .node_id()
                .as_str()
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        let file_mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(file_mode, 0o600);
        let dir_mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
    }

    #[test]
    fn distinct_nodes_get_distinct_ids() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let (a, _) = NodeIdentity::load_or_create(&key_path(&a)).unwrap();
        let (b, _) = NodeIdentity::load_or_create(&key_path(&b)).unwrap();
        assert_ne!(a.node_id(), b.node_id());
    }

    fn rewrite(path: &Path, edit: impl FnOnce(String) -> String) {
        let text = std::fs::read_to_string(path).unwrap();
        std::fs::write(path, edit(text)).unwrap();
    }

    #[test]
    fn corrupted_seed_is_an_error_and_file_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = key_path(&dir);
        NodeIdentity::load_or_create(&path).unwrap();
        rewrite(&path, |t| {
            let (head, tail) = t.split_once("seed: ").unwrap();
            let mut tail = tail.to_string();
            let flipped = if tail.starts_with('A') { "B" } else { "A" };
            tail.replace_range(0..1, flipped);
            format!("{head}seed: {tail}")
        });
        let before = std::fs::read(&path).unwrap();
        let err = NodeIdentity::load_or_create(&path).unwrap_err();
        assert!(matches!(err, IdentityError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("does not match"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), before, "never replaced");
    }

    #[test]
    fn truncated_file_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = key_path(&dir);
        NodeIdentity::load_or_create(&path).unwrap();
        rewrite(&path, |t| t[..t.find("public-key").unwrap()].to_string());
        let err = NodeIdentity::load(&path).unwrap_err();
        assert!(matches!(err, IdentityError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn foreign_file_is_named_foreign() {
        let dir = tempfile::tempdir().unwrap();
        let path = key_path(&dir);
        fsutil::ensure_private_dir(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn==\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = NodeIdentity::load_or_create(&path).unwrap_err();
        assert!(matches!(err, IdentityError::Foreign { .. }), "{err}");
        std::fs::write(&path, [0xffu8, 0x00, 0x13]).unwrap();
        let err = NodeIdentity::load(&path).unwrap_err();
        assert!(matches!(err, IdentityError::Foreign { .. }), "{err}");
    }

    #[test]
    fn readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = key_path(&dir);
        NodeIdentity::load_or_create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = NodeIdentity::load(&path).unwrap_err();
        assert!(
            matches!(err, IdentityError::Exposed { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn errors_and_debug_never_show_the_seed() {
        let dir = tempfile::tempdir().unwrap();
        let path = key_path(&dir);
        let (id, _) = NodeIdentity::load_or_create(&path).unwrap();
        let seed_b64 = BASE64.encode(id.seed().as_slice());
        assert!(!format!("{id:?}").contains(&seed_b64));
        rewrite(&path, |t| t.replace("seed: ", "seed "));
        let err = NodeIdentity::load(&path).unwrap_err().to_string();
        assert!(!err.contains(&seed_b64), "{err}");
        assert!(!err.contains(&seed_b64[..6]), "{err}");
    }

    #[test]
    fn x25519_pair_matches() {
        let dir = tempfile::tempdir().unwrap();
        let (id, _) = NodeIdentity::load_or_create(&key_path(&dir)).unwrap();
        let derived = x25519_dalek::PublicKey::from(&id.x25519_secret());
        assert_eq!(derived.as_bytes(), id.x25519_public().as_bytes());
    }

    #[test]
    fn signatures_verify_with_public_key() {
        use ed25519_dalek::Verifier;
        let dir = tempfile::tempdir().unwrap();
        let (id, _) = NodeIdentity::load_or_create(&key_path(&dir)).unwrap();
        let sig = id.sign(b"chain head");
        assert!(id.public_key().verify(b"chain head", &sig).is_ok());
        assert!(id.public_key().verify(b"chain tail", &sig).is_err());
    }
}
