//! The cluster key: the one secret every node of a cluster shares, the root
//! of the keys a request may need on any node (tokens, email HMACs, field
//! encryption, audit identifiers). Pure: no I/O.
//!
//! 256 random bits, plus, for a cluster founded by a node that already held
//! data, the keys that node had derived from its identity for those
//! purposes ("inherited"): they stay the keys of their purposes, so every
//! account, token, email HMAC and sealed field of the single node keeps
//! working on every member. A purpose without an inherited key (a new
//! cluster, or a field key version raised later) derives from the root.
//!
//! Stored form (sealed to each member, never in the clear): a magic line,
//! the root, then each inherited key as (domain, label, key).

use zeroize::Zeroizing;

use crate::identity::{NodeIdentity, hkdf32};

const MAGIC: &[u8] = b"keepd-cluster-key v1\n";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the cluster key is damaged or not a keepd cluster key")]
    Damaged,
    #[error("the operating system's random number generator failed: {0}")]
    Entropy(String),
}

/// What a shared key is for. The domain and label of each are the ones
/// keepd derived from the node identity before clusters existed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// HS256 bearer tokens.
    Tokens,
    /// The HMAC that stands for an account's email.
    EmailHmac,
    /// The HMAC that stands for account ids in the audit log.
    AuditIdentifiers,
    /// Field encryption at rest, key version `n`.
    Field(u32),
    /// OPAQUE's server setup (`crate::opaque`).
    Opaque,
}

impl Purpose {
    fn domain_label(self) -> (&'static [u8], Vec<u8>) {
        match self {
            Purpose::Tokens => (b"keepd tokens", b"keepd jwt hs256 v1".to_vec()),
            Purpose::EmailHmac => (b"keepd accounts", b"keepd email hmac v1".to_vec()),
            Purpose::AuditIdentifiers => (b"keepd audit", b"keepd audit identifiers v1".to_vec()),
            Purpose::Field(version) => (
                b"keepd fields",
                format!("keepd field key v{version}").into_bytes(),
            ),
            Purpose::Opaque => (b"keepd opaque", b"keepd opaque server setup v1".to_vec()),
        }
    }
}

#[derive(Clone)]
struct Inherited {
    domain: Vec<u8>,
    label: Vec<u8>,
    key: Zeroizing<[u8; 32]>,
}

/// The cluster's shared secret. Debug prints nothing of it; a clone is
/// zeroized like the original (field encryption keeps one to derive the
/// versions it meets).
#[derive(Clone)]
pub struct ClusterKey {
    root: Zeroizing<[u8; 32]>,
    inherited: Vec<Inherited>,
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

impl ClusterKey {
    /// A new cluster's key: 256 random bits, nothing inherited.
    pub fn generate() -> Result<ClusterKey, KeyError> {
        let mut root = Zeroizing::new([0u8; 32]);
        getrandom::fill(root.as_mut()).map_err(|e| KeyError::Entropy(e.to_string()))?;
        Ok(ClusterKey {
            root,
            inherited: Vec::new(),
        })
    }

    /// The key of a cluster founded by a node that already holds data: a
    /// new root, and the keys `identity` derived for every purpose (field
    /// keys up to `field_versions`) kept as they were.
    pub fn inheriting(
        identity: &NodeIdentity,
        field_versions: u32,
    ) -> Result<ClusterKey, KeyError> {
        let mut key = ClusterKey::generate()?;
        let purposes = [
            Purpose::Tokens,
            Purpose::EmailHmac,
            Purpose::AuditIdentifiers,
        ]
        .into_iter()
        .chain((1..=field_versions).map(Purpose::Field));
        for purpose in purposes {
            let (domain, label) = purpose.domain_label();
            key.inherited.push(Inherited {
                key: identity.derive_key(domain, &label),
                domain: domain.to_vec(),
                label,
            });
        }
        Ok(key)
    }

    /// The key for `purpose`: the inherited one if there is one, else
    /// derived from the root.
    pub fn derive(&self, purpose: Purpose) -> Zeroizing<[u8; 32]> {
        let (domain, label) = purpose.domain_label();
        match self
            .inherited
            .iter()
            .find(|k| k.domain == domain && k.label == label)
        {
            Some(inherited) => inherited.key.clone(),
            None => hkdf32(domain, self.root.as_ref(), &label),
        }
    }

    /// A name for this key that says nothing about it (SHA-256 of a key
    /// derived for the purpose), for pinning.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let check = hkdf32(
            b"keepd cluster",
            self.root.as_ref(),
            b"keepd cluster fingerprint v1",
        );
        hex::encode(&Sha256::digest(check.as_ref())[..16])
    }

    /// Whether keys were inherited from a node's identity.
    pub fn inherited_keys(&self) -> usize {
        self.inherited.len()
    }

    /// The stored form, to be sealed.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(64 + 100 * self.inherited.len()));
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(self.root.as_ref());
        for k in &self.inherited {
            for part in [&k.domain, &k.label] {
                out.push(part.len() as u8);
                out.extend_from_slice(part);
            }
            out.extend_from_slice(k.key.as_ref());
        }
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<ClusterKey, KeyError> {
        let rest = bytes.strip_prefix(MAGIC).ok_or(KeyError::Damaged)?;
        let (root, mut rest) = split_key(rest)?;
        let mut inherited = Vec::new();
        while !rest.is_empty() {
            let (domain, after) = split_prefixed(rest)?;
            let (label, after) = split_prefixed(after)?;
            let (key, after) = split_key(after)?;
            inherited.push(Inherited {
                domain: domain.to_vec(),
                label: label.to_vec(),
                key,
            });
            rest = after;
        }
        Ok(ClusterKey { root, inherited })
    }
}

fn split_key(bytes: &[u8]) -> Result<(Zeroizing<[u8; 32]>, &[u8]), KeyError> {
    let (key, rest) = bytes.split_first_chunk::<32>().ok_or(KeyError::Damaged)?;
    Ok((Zeroizing::new(*key), rest))
}

fn split_prefixed(bytes: &[u8]) -> Result<(&[u8], &[u8]), KeyError> {
    let (&len, rest) = bytes.split_first().ok_or(KeyError::Damaged)?;
    let len = usize::from(len);
    if rest.len() < len {
        return Err(KeyError::Damaged);
    }
    Ok(rest.split_at(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inherited_keys_are_the_identitys_and_new_purposes_come_from_the_root() {
        let identity = NodeIdentity::from_seed(&[7; 32]);
        let key = ClusterKey::inheriting(&identity, 2).unwrap();
        assert_eq!(key.inherited_keys(), 5);
        for purpose in [
            Purpose::Tokens,
            Purpose::EmailHmac,
            Purpose::AuditIdentifiers,
            Purpose::Field(1),
            Purpose::Field(2),
        ] {
            let (domain, label) = purpose.domain_label();
            assert_eq!(*key.derive(purpose), *identity.derive_key(domain, &label));
        }
        let (domain, label) = Purpose::Field(3).domain_label();
        assert_ne!(
            *key.derive(Purpose::Field(3)),
            *identity.derive_key(domain, &label)
        );
        assert_eq!(
            *key.derive(Purpose::Field(3)),
            *hkdf32(domain, key.root.as_ref(), &label)
        );
    }

    #[test]
    fn the_stored_form_round_trips_and_damage_is_an_error() {
        let identity = NodeIdentity::from_seed(&[9; 32]);
        let key = ClusterKey::inheriting(&identity, 1).unwrap();
        let bytes = key.to_bytes();
        let back = ClusterKey::from_bytes(&bytes).unwrap();
        assert_eq!(*back.root, *key.root);
        assert_eq!(*back.derive(Purpose::Tokens), *key.derive(Purpose::Tokens));
        assert_eq!(back.inherited_keys(), 4);
        for cut in [0, MAGIC.len(), MAGIC.len() + 31, bytes.len() - 1] {
            assert!(
                ClusterKey::from_bytes(&bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let fresh = ClusterKey::generate().unwrap();
        assert_eq!(
            ClusterKey::from_bytes(&fresh.to_bytes())
                .unwrap()
                .inherited_keys(),
            0
        );
        assert_ne!(*fresh.derive(Purpose::Tokens), *key.derive(Purpose::Tokens));
        assert_eq!(format!("{fresh:?}"), "ClusterKey(..)");
    }
}
