//! Sealing bytes to the node identity: pure functions, no I/O.
//!
//! The envelope is versioned JSON naming its method. `x25519`: an ephemeral
//! X25519 key agreed with the node's static X25519 key (mapped from its
//! Ed25519 key), HKDF-SHA256, XSalsa20-Poly1305. `hkdf`: HKDF-SHA256 from the
//! identity seed with a random salt, AES-256-GCM. `hybrid` (the default):
//! both parts, each of which decrypts on its own.
//!
//! Every key is derived with a label naming the format version, the part's
//! algorithm, the method and the node id, so editing the envelope's header
//! breaks authentication. Opening requires *every* part to authenticate and
//! agree: a flipped byte anywhere is an error, never a silent fallback.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::config::SealMethod;
use crate::identity::{NodeId, NodeIdentity};

const FORMAT: &str = "keepd-sealed";
const VERSION: u32 = 1;
const X25519_ALG: &str = "x25519-xsalsa20poly1305";
const HKDF_ALG: &str = "hkdf-sha256-aes256gcm";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("not a keepd sealed file (expected a `{FORMAT}` envelope)")]
    Foreign,
    #[error("truncated or corrupted: {0}")]
    Malformed(String),
    #[error("envelope version {0} is newer than this keepd understands (1); upgrade keepd")]
    UnsupportedVersion(u32),
    #[error(
        "sealed for node {sealed_for}, but this node is {this}: the state directory's \
         identity.key is not the one these secrets belong to"
    )]
    WrongNode { sealed_for: String, this: String },
    #[error(
        "the {part} part fails authentication: the file was altered or sealed with another key"
    )]
    Tampered { part: &'static str },
    #[error("the parts of the hybrid envelope disagree: the file was altered")]
    Disagree,
    #[error("the operating system's random number generator failed: {0}")]
    Entropy(String),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    format: String,
    version: u32,
    method: String,
    node_id: String,
    parts: Vec<Part>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Part {
    alg: String,
    /// The ephemeral X25519 public key (x25519) or the HKDF salt (hkdf).
    key_material: String,
    nonce: String,
    ciphertext: String,
}

fn method_name(method: SealMethod) -> &'static str {
    match method {
        SealMethod::X25519 => "x25519",
        SealMethod::Hkdf => "hkdf",
        SealMethod::Hybrid => "hybrid",
    }
}

fn random<const N: usize>() -> Result<[u8; N], SealError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|e| SealError::Entropy(e.to_string()))?;
    Ok(bytes)
}

fn label(alg: &str, method: &str, node_id: &str) -> Vec<u8> {
    format!("{FORMAT} v{VERSION}|{alg}|{method}|{node_id}").into_bytes()
}

fn derive(salt: &[u8], ikm: &[u8], info: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut key = Zeroizing::new([0u8; 32]);
    hkdf::Hkdf::<Sha256>::new(Some(salt), ikm)
        .expand(info, key.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    key
}

/// Seals `plaintext` so that only `identity` can open it.
pub fn seal(
    identity: &NodeIdentity,
    method: SealMethod,
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    let name = method_name(method);
    let node_id = identity.node_id().as_str();
    let mut parts = Vec::new();
    if matches!(method, SealMethod::X25519 | SealMethod::Hybrid) {
        parts.push(seal_x25519(
            &identity.x25519_public(),
            node_id,
            name,
            plaintext,
        )?);
    }
    if matches!(method, SealMethod::Hkdf | SealMethod::Hybrid) {
        parts.push(seal_hkdf(identity, name, plaintext)?);
    }
    Ok(envelope(name, node_id, parts))
}

/// Seals `plaintext` for another node, known only by its public key: the
/// `x25519` method, which needs no secret of the recipient's to seal and
/// its identity to open.
pub fn seal_for(recipient: &VerifyingKey, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
    let name = method_name(SealMethod::X25519);
    let node_id = NodeId::of(recipient);
    let x25519 = x25519_dalek::PublicKey::from(recipient.to_montgomery().to_bytes());
    let part = seal_x25519(&x25519, node_id.as_str(), name, plaintext)?;
    Ok(envelope(name, node_id.as_str(), vec![part]))
}

fn envelope(method: &str, node_id: &str, parts: Vec<Part>) -> Vec<u8> {
    let envelope = Envelope {
        format: FORMAT.into(),
        version: VERSION,
        method: method.into(),
        node_id: node_id.into(),
        parts,
    };
    let mut out = serde_json::to_vec_pretty(&envelope).expect("envelope serialises");
    out.push(b'\n');
    out
}

fn seal_x25519(
    recipient: &x25519_dalek::PublicKey,
    node_id: &str,
    method: &str,
    plaintext: &[u8],
) -> Result<Part, SealError> {
    use crypto_secretbox::aead::{Aead, KeyInit};
    let ephemeral = x25519_dalek::StaticSecret::from(random::<32>()?);
    let ephemeral_public = x25519_dalek::PublicKey::from(&ephemeral);
    let shared = ephemeral.diffie_hellman(recipient);
    let salt = [ephemeral_public.as_bytes().as_slice(), recipient.as_bytes()].concat();
    let key = derive(
        &salt,
        shared.as_bytes(),
        &label(X25519_ALG, method, node_id),
    );
    let nonce = random::<24>()?;
    let cipher = crypto_secretbox::XSalsa20Poly1305::new(key.as_ref().into());
    let ciphertext = cipher
        .encrypt(&nonce.into(), plaintext)
        .expect("XSalsa20-Poly1305 encrypts any length we hold");
    Ok(Part {
        alg: X25519_ALG.into(),
        key_material: BASE64.encode(ephemeral_public.as_bytes()),
        nonce: BASE64.encode(nonce),
        ciphertext: BASE64.encode(ciphertext),
    })
}

fn seal_hkdf(identity: &NodeIdentity, method: &str, plaintext: &[u8]) -> Result<Part, SealError> {
    use aes_gcm::aead::{Aead, KeyInit};
    let salt = random::<32>()?;
    let key = derive(
        &salt,
        identity.seed().as_ref(),
        &label(HKDF_ALG, method, identity.node_id().as_str()),
    );
    let nonce = random::<12>()?;
    let cipher = aes_gcm::Aes256Gcm::new_from_slice(key.as_ref()).expect("32-byte key");
    let ciphertext = cipher
        .encrypt(&nonce.into(), plaintext)
        .expect("AES-256-GCM encrypts any length we hold");
    Ok(Part {
        alg: HKDF_ALG.into(),
        key_material: BASE64.encode(salt),
        nonce: BASE64.encode(nonce),
        ciphertext: BASE64.encode(ciphertext),
    })
}

/// Opens an envelope sealed to `identity`; returns the method it used.
pub fn open(
    identity: &NodeIdentity,
    sealed: &[u8],
) -> Result<(SealMethod, Zeroizing<Vec<u8>>), SealError> {
    let value: serde_json::Value = serde_json::from_slice(sealed).map_err(|e| {
        if sealed.first() == Some(&b'{') {
            SealError::Malformed(e.to_string())
        } else {
            SealError::Foreign
        }
    })?;
    if value.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
        return Err(SealError::Foreign);
    }
    let envelope: Envelope =
        serde_json::from_value(value).map_err(|e| SealError::Malformed(e.to_string()))?;
    if envelope.version != VERSION {
        return Err(SealError::UnsupportedVersion(envelope.version));
    }
    let method = match envelope.method.as_str() {
        "x25519" => SealMethod::X25519,
        "hkdf" => SealMethod::Hkdf,
        "hybrid" => SealMethod::Hybrid,
        other => return Err(SealError::Malformed(format!("unknown method `{other}`"))),
    };
    let this = identity.node_id().as_str();
    if envelope.node_id != this {
        return Err(SealError::WrongNode {
            sealed_for: envelope.node_id,
            this: this.into(),
        });
    }
    let expected: &[&str] = match method {
        SealMethod::X25519 => &[X25519_ALG],
        SealMethod::Hkdf => &[HKDF_ALG],
        SealMethod::Hybrid => &[X25519_ALG, HKDF_ALG],
    };
    let algs: Vec<&str> = envelope.parts.iter().map(|p| p.alg.as_str()).collect();
    if algs != expected {
        return Err(SealError::Malformed(format!(
            "method {} needs parts {expected:?}, found {algs:?}",
            envelope.method
        )));
    }
    let mut opened: Option<Zeroizing<Vec<u8>>> = None;
    for part in &envelope.parts {
        let plaintext = open_part(identity, &envelope.method, part)?;
        match &opened {
            Some(first) if first.as_slice() != plaintext.as_slice() => {
                return Err(SealError::Disagree);
            }
            Some(_) => {}
            None => opened = Some(plaintext),
        }
    }
    Ok((method, opened.expect("at least one part")))
}

fn decode<const N: usize>(field: &'static str, text: &str) -> Result<[u8; N], SealError> {
    let bytes = BASE64
        .decode(text)
        .map_err(|_| SealError::Malformed(format!("{field} is not base64")))?;
    bytes
        .try_into()
        .map_err(|_| SealError::Malformed(format!("{field} has the wrong length")))
}

fn open_part(
    identity: &NodeIdentity,
    method: &str,
    part: &Part,
) -> Result<Zeroizing<Vec<u8>>, SealError> {
    let ciphertext = BASE64
        .decode(&part.ciphertext)
        .map_err(|_| SealError::Malformed("ciphertext is not base64".into()))?;
    let node_id = identity.node_id().as_str();
    if part.alg == X25519_ALG {
        use crypto_secretbox::aead::{Aead, KeyInit};
        let ephemeral_public =
            x25519_dalek::PublicKey::from(decode::<32>("ephemeral key", &part.key_material)?);
        let nonce = decode::<24>("nonce", &part.nonce)?;
        let shared = identity.x25519_secret().diffie_hellman(&ephemeral_public);
        let salt = [
            ephemeral_public.as_bytes().as_slice(),
            identity.x25519_public().as_bytes(),
        ]
        .concat();
        let key = derive(
            &salt,
            shared.as_bytes(),
            &label(X25519_ALG, method, node_id),
        );
        let cipher = crypto_secretbox::XSalsa20Poly1305::new(key.as_ref().into());
        cipher
            .decrypt(&nonce.into(), ciphertext.as_slice())
            .map(Zeroizing::new)
            .map_err(|_| SealError::Tampered { part: X25519_ALG })
    } else {
        use aes_gcm::aead::{Aead, KeyInit};
        let salt = decode::<32>("salt", &part.key_material)?;
        let nonce = decode::<12>("nonce", &part.nonce)?;
        let key = derive(
            &salt,
            identity.seed().as_ref(),
            &label(HKDF_ALG, method, node_id),
        );
        let cipher = aes_gcm::Aes256Gcm::new_from_slice(key.as_ref()).expect("32-byte key");
        cipher
            .decrypt(&nonce.into(), ciphertext.as_slice())
            .map(Zeroizing::new)
            .map_err(|_| SealError::Tampered { part: HKDF_ALG })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::identity::test_identity as identity;

    const METHODS: [SealMethod; 3] = [SealMethod::X25519, SealMethod::Hkdf, SealMethod::Hybrid];

    #[test]
    fn round_trips_for_every_method() {
        let (_d, id) = identity();
        for method in METHODS {
            let sealed = seal(&id, method, b"the secret").unwrap();
            let (used, plain) = open(&id, &sealed).unwrap();
            assert_eq!(used, method);
            assert_eq!(plain.as_slice(), b"the secret");
            assert!(!String::from_utf8_lossy(&sealed).contains("the secret"));
        }
    }

    #[test]
    fn sealed_for_a_public_key_opens_only_with_its_identity() {
        let (_d, recipient) = identity();
        let (_e, other) = identity();
        let sealed = seal_for(&recipient.public_key(), b"shared").unwrap();
        let (used, plain) = open(&recipient, &sealed).unwrap();
        assert_eq!(
            (used, plain.as_slice()),
            (SealMethod::X25519, b"shared".as_slice())
        );
        assert!(matches!(
            open(&other, &sealed),
            Err(SealError::WrongNode { .. })
        ));
    }

    #[test]
    fn each_hybrid_part_opens_on_its_own() {
        let (_d, id) = identity();
        let sealed = seal(&id, SealMethod::Hybrid, b"both").unwrap();
        let envelope: Envelope = serde_json::from_slice(&sealed).unwrap();
        for part in &envelope.parts {
            assert_eq!(open_part(&id, "hybrid", part).unwrap().as_slice(), b"both");
        }
    }

    #[test]
    fn sealing_twice_differs() {
        let (_d, id) = identity();
        for method in METHODS {
            assert_ne!(
                seal(&id, method, b"x").unwrap(),
                seal(&id, method, b"x").unwrap()
            );
        }
    }

    #[test]
    fn every_flipped_ciphertext_byte_is_detected() {
        let (_d, id) = identity();
        for method in METHODS {
            let sealed = seal(&id, method, b"0123456789abcdef").unwrap();
            let envelope: Envelope = serde_json::from_slice(&sealed).unwrap();
            for index in 0..envelope.parts.len() {
                let raw = BASE64.decode(&envelope.parts[index].ciphertext).unwrap();
                for byte in 0..raw.len() {
                    let mut flipped = raw.clone();
                    flipped[byte] ^= 0x01;
                    let mut edited: Envelope = serde_json::from_slice(&sealed).unwrap();
                    edited.parts[index].ciphertext = BASE64.encode(&flipped);
                    let bytes = serde_json::to_vec(&edited).unwrap();
                    assert!(
                        matches!(open(&id, &bytes), Err(SealError::Tampered { .. })),
                        "{method:?} part {index} byte {byte}"
                    );
                }
            }
        }
    }

    #[test]
    fn edited_header_fields_are_detected() {
        let (_d, id) = identity();
        let sealed = seal(&id, SealMethod::Hybrid, b"x").unwrap();
        let mut edited: Envelope = serde_json::from_slice(&sealed).unwrap();
        edited.parts.remove(0);
        edited.method = "hkdf".into();
        // Downgrading hybrid to one part changes the derivation label.
        let err = open(&id, &serde_json::to_vec(&edited).unwrap()).unwrap_err();
        assert!(matches!(err, SealError::Tampered { .. }), "{err}");
    }

    #[test]
    fn truncated_and_foreign_files_are_named() {
        let (_d, id) = identity();
        let sealed = seal(&id, SealMethod::Hybrid, b"x").unwrap();
        for cut in [1, sealed.len() / 2, sealed.len() - 3] {
            let err = open(&id, &sealed[..cut]).unwrap_err();
            assert!(
                matches!(err, SealError::Malformed(_)),
                "cut at {cut}: {err}"
            );
        }
        assert!(matches!(
            open(&id, b"PGDMP binary"),
            Err(SealError::Foreign)
        ));
        assert!(matches!(
            open(&id, b"{\"format\":\"other\"}"),
            Err(SealError::Foreign)
        ));
    }

    #[test]
    fn another_nodes_key_is_refused() {
        let (_a, alice) = identity();
        let (_b, bob) = identity();
        let sealed = seal(&alice, SealMethod::Hybrid, b"x").unwrap();
        let err = open(&bob, &sealed).unwrap_err();
        assert!(matches!(err, SealError::WrongNode { .. }), "{err}");
        // Even with the node id edited to match, the keys do not open it.
        let mut edited: Envelope = serde_json::from_slice(&sealed).unwrap();
        edited.node_id = bob.node_id().to_string();
        let err = open(&bob, &serde_json::to_vec(&edited).unwrap()).unwrap_err();
        assert!(matches!(err, SealError::Tampered { .. }), "{err}");
    }

    #[test]
    fn newer_versions_are_refused_clearly() {
        let (_d, id) = identity();
        let sealed = seal(&id, SealMethod::Hkdf, b"x").unwrap();
        let mut edited: Envelope = serde_json::from_slice(&sealed).unwrap();
        edited.version = 2;
        let err = open(&id, &serde_json::to_vec(&edited).unwrap()).unwrap_err();
        assert!(matches!(err, SealError::UnsupportedVersion(2)), "{err}");
    }
}
