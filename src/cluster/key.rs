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
//! A rotation (`rotated`) makes a new root, one generation on. What cannot
//! change without breaking what was made with it is carried as inherited
//! keys: the OPAQUE setup (every registration depends on it), the email
//! HMAC key (an email's HMAC cannot be recomputed without the email) and
//! the field keys still in use (re-encrypted under a version of the new
//! root, then dropped at the next rotation). The previous root's token key
//! is kept, with the moment of the rotation, so its tokens are accepted
//! until they expire; the fingerprints of every earlier root let a node's
//! pin follow however many rotations it missed.
//!
//! Stored form (sealed to each member, never in the clear): v1 is a magic
//! line, the root, then each inherited key as (domain, label, key); v2 a
//! magic line, the generation, the root, the previous generation (if any),
//! the earlier roots' fingerprints and then the inherited keys as in v1.

use zeroize::Zeroizing;

use crate::identity::{NodeIdentity, hkdf32};

const MAGIC: &[u8] = b"keepd-cluster-key v1\n";
const MAGIC_V2: &[u8] = b"keepd-cluster-key v2\n";

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
    /// 1 for a cluster's first root, one more at each rotation.
    generation: u32,
    root: Zeroizing<[u8; 32]>,
    inherited: Vec<Inherited>,
    previous: Option<Previous>,
    /// The fingerprints of every root before this one, oldest first.
    ancestors: Vec<String>,
}

/// The root this one replaced, as much of it as is still needed.
#[derive(Clone)]
pub struct Previous {
    pub generation: u32,
    /// When it was replaced (Unix seconds).
    pub rotated_at: u64,
    pub token_key: Zeroizing<[u8; 32]>,
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
            generation: 1,
            root,
            inherited: Vec::new(),
            previous: None,
            ancestors: Vec::new(),
        })
    }

    /// The next generation: a new root, carrying the OPAQUE setup, the
    /// email HMAC key and the field keys of `field_versions` (those still
    /// in use), and this root's token key until its tokens expire.
    pub fn rotated(&self, field_versions: &[u32], now: u64) -> Result<ClusterKey, KeyError> {
        let mut next = ClusterKey::generate()?;
        next.generation = self.generation + 1;
        let carried = [Purpose::Opaque, Purpose::EmailHmac]
            .into_iter()
            .chain(field_versions.iter().copied().map(Purpose::Field));
        for purpose in carried {
            let (domain, label) = purpose.domain_label();
            next.inherited.push(Inherited {
                key: self.derive(purpose),
                domain: domain.to_vec(),
                label,
            });
        }
        next.previous = Some(Previous {
            generation: self.generation,
            rotated_at: now,
            token_key: self.derive(Purpose::Tokens),
        });
        next.ancestors = self.ancestors.clone();
        next.ancestors.push(self.fingerprint());
        Ok(next)
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The root this one replaced, if it is still needed.
    pub fn previous(&self) -> Option<&Previous> {
        self.previous.as_ref()
    }

    /// Whether the root of `fingerprint` came before this one in the
    /// cluster's line of rotations.
    pub fn descends_from(&self, fingerprint: &str) -> bool {
        self.ancestors.iter().any(|a| a == fingerprint)
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
        let mut out = Zeroizing::new(Vec::with_capacity(160 + 100 * self.inherited.len()));
        out.extend_from_slice(MAGIC_V2);
        out.extend_from_slice(&self.generation.to_be_bytes());
        out.extend_from_slice(self.root.as_ref());
        match &self.previous {
            None => out.push(0),
            Some(p) => {
                out.push(1);
                out.extend_from_slice(&p.generation.to_be_bytes());
                out.extend_from_slice(&p.rotated_at.to_be_bytes());
                out.extend_from_slice(p.token_key.as_ref());
            }
        }
        out.extend_from_slice(&(self.ancestors.len() as u32).to_be_bytes());
        for fingerprint in &self.ancestors {
            out.push(fingerprint.len() as u8);
            out.extend_from_slice(fingerprint.as_bytes());
        }
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
        let (generation, previous, ancestors, rest) = match bytes.strip_prefix(MAGIC_V2) {
            Some(rest) => {
                let (generation, rest) = split_u32(rest)?;
                let (root, rest) = split_key(rest)?;
                let (&flag, mut after) = rest.split_first().ok_or(KeyError::Damaged)?;
                let previous = match flag {
                    0 => None,
                    1 => {
                        let (generation, rest) = split_u32(after)?;
                        let (at, rest) = rest.split_first_chunk::<8>().ok_or(KeyError::Damaged)?;
                        let (token_key, rest) = split_key(rest)?;
                        after = rest;
                        Some(Previous {
                            generation,
                            rotated_at: u64::from_be_bytes(*at),
                            token_key,
                        })
                    }
                    _ => return Err(KeyError::Damaged),
                };
                let (count, mut rest) = split_u32(after)?;
                let mut ancestors = Vec::new();
                for _ in 0..count {
                    let (fingerprint, after) = split_prefixed(rest)?;
                    ancestors.push(
                        String::from_utf8(fingerprint.to_vec()).map_err(|_| KeyError::Damaged)?,
                    );
                    rest = after;
                }
                (generation, previous, ancestors, (root, rest))
            }
            None => {
                let rest = bytes.strip_prefix(MAGIC).ok_or(KeyError::Damaged)?;
                (1, None, Vec::new(), split_key(rest)?)
            }
        };
        let (root, mut rest) = rest;
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
        Ok(ClusterKey {
            generation,
            root,
            inherited,
            previous,
            ancestors,
        })
    }
}

fn split_u32(bytes: &[u8]) -> Result<(u32, &[u8]), KeyError> {
    let (n, rest) = bytes.split_first_chunk::<4>().ok_or(KeyError::Damaged)?;
    Ok((u32::from_be_bytes(*n), rest))
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
        for cut in [0, MAGIC_V2.len(), MAGIC_V2.len() + 31, bytes.len() - 1] {
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

    #[test]
    fn a_rotation_carries_what_cannot_change_and_keeps_the_previous_token_key() {
        let identity = NodeIdentity::from_seed(&[3; 32]);
        let first = ClusterKey::inheriting(&identity, 1).unwrap();
        let second = first.rotated(&[1, 2], 1_000).unwrap();
        assert_eq!((first.generation(), second.generation()), (1, 2));
        assert_ne!(first.fingerprint(), second.fingerprint());
        for carried in [
            Purpose::Opaque,
            Purpose::EmailHmac,
            Purpose::Field(1),
            Purpose::Field(2),
        ] {
            assert_eq!(
                *second.derive(carried),
                *first.derive(carried),
                "{carried:?}"
            );
        }
        for renewed in [
            Purpose::Tokens,
            Purpose::AuditIdentifiers,
            Purpose::Field(3),
        ] {
            assert_ne!(
                *second.derive(renewed),
                *first.derive(renewed),
                "{renewed:?}"
            );
        }
        let previous = second.previous().unwrap();
        assert_eq!(previous.generation, 1);
        assert_eq!(previous.rotated_at, 1_000);
        assert!(second.descends_from(&first.fingerprint()));
        assert_eq!(*previous.token_key, *first.derive(Purpose::Tokens));
        // Through the stored form, and once more: only one previous root.
        let back = ClusterKey::from_bytes(&second.to_bytes()).unwrap();
        assert_eq!(back.generation(), 2);
        assert!(back.descends_from(&first.fingerprint()));
        assert_eq!(
            *back.derive(Purpose::Field(1)),
            *first.derive(Purpose::Field(1))
        );
        let third = back.rotated(&[3], 2_000).unwrap();
        assert_eq!(third.previous().unwrap().generation, 2);
        // A node that missed both rotations still recognises its line.
        assert!(
            third.descends_from(&first.fingerprint()) && third.descends_from(&second.fingerprint())
        );
        assert!(!first.descends_from(&third.fingerprint()));
        assert_eq!(
            *third.derive(Purpose::Field(3)),
            *second.derive(Purpose::Field(3))
        );
        assert_eq!(
            *third.derive(Purpose::Opaque),
            *first.derive(Purpose::Opaque)
        );
        // A v1 key (from before rotations) reads as generation 1.
        let mut v1 = MAGIC.to_vec();
        v1.extend_from_slice(first.root.as_ref());
        let old = ClusterKey::from_bytes(&v1).unwrap();
        assert_eq!(
            (old.generation(), old.fingerprint()),
            (1, first.fingerprint())
        );
    }
}
