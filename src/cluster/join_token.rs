//! Join tokens: the right to join the cluster without an operator at the
//! new node, within a lifetime and a number of uses (an autoscaler's new
//! pod, a rolling restart). Pure: no I/O.
//!
//! A token is `keepd-join-1.<id>.<secret>`: a public id (listing,
//! revoking, the audit trail) and 256 random bits. The cluster stores
//! neither the token nor a hash an attacker could use: it stores the
//! public half of an Ed25519 key derived from the secret (`verifier`), a
//! one-way value that checks a signature and makes none. A node holding
//! the token signs a claim naming itself and its public key; a member
//! checks the claim with the verifier and admits the node by sealing the
//! cluster key to that public key, as an operator's `admit` does. The
//! token never carries the cluster key, and a claim read from the
//! database serves no other node (it names its key).

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use zeroize::Zeroizing;

use crate::identity::hkdf32;

const PREFIX: &str = "keepd-join-1";
const DOMAIN: &[u8] = b"keepd join token v1";

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "this is not a keepd join token (`keepd-join-1.<id>.<secret>`, as `keepd cluster token \
         create` prints it)"
    )]
    Malformed,
    #[error("the operating system's random number generator failed: {0}")]
    Entropy(String),
}

/// A join token; Debug and Display show its id only.
pub struct JoinToken {
    id: String,
    secret: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinToken({})", self.id)
    }
}

impl JoinToken {
    pub fn generate() -> Result<JoinToken, TokenError> {
        let mut id = [0u8; 8];
        let mut secret = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut id).map_err(|e| TokenError::Entropy(e.to_string()))?;
        getrandom::fill(secret.as_mut()).map_err(|e| TokenError::Entropy(e.to_string()))?;
        Ok(JoinToken {
            id: hex::encode(id),
            secret,
        })
    }

    /// Reads a token as printed (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<JoinToken, TokenError> {
        let mut parts = text.trim().split('.');
        let (Some(PREFIX), Some(id), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let id_ok = id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit());
        let bytes = Zeroizing::new(B64.decode(secret).map_err(|_| TokenError::Malformed)?);
        let secret: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| TokenError::Malformed)?;
        if !id_ok {
            return Err(TokenError::Malformed);
        }
        Ok(JoinToken {
            id: id.to_ascii_lowercase(),
            secret: Zeroizing::new(secret),
        })
    }

    /// The token as the operator hands it to a new node.
    pub fn expose(&self) -> Zeroizing<String> {
        Zeroizing::new(format!(
            "{PREFIX}.{}.{}",
            self.id,
            B64.encode(self.secret.as_ref())
        ))
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn signing_key(&self) -> SigningKey {
        let seed = hkdf32(DOMAIN, self.secret.as_ref(), self.id.as_bytes());
        SigningKey::from_bytes(&seed)
    }

    /// What the cluster stores of the token.
    pub fn verifier(&self) -> VerifyingKey {
        self.signing_key().verifying_key()
    }

    /// The claim of the node `node_id` with `public` to join by this token.
    pub fn claim(&self, node_id: &str, public: &VerifyingKey) -> Vec<u8> {
        self.signing_key()
            .sign(&claim_message(&self.id, node_id, public))
            .to_bytes()
            .to_vec()
    }
}

fn claim_message(token_id: &str, node_id: &str, public: &VerifyingKey) -> Vec<u8> {
    format!(
        "{PREFIX} claim|{token_id}|{node_id}|{}",
        hex::encode(public.as_bytes())
    )
    .into_bytes()
}

/// Whether `claim` was made with the token whose stored verifier is
/// `verifier`, for the node `node_id` with `public`.
pub fn claim_holds(
    verifier: &[u8],
    token_id: &str,
    node_id: &str,
    public: &VerifyingKey,
    claim: &[u8],
) -> bool {
    let Some(verifier) = <[u8; 32]>::try_from(verifier)
        .ok()
        .and_then(|bytes| VerifyingKey::from_bytes(&bytes).ok())
    else {
        return false;
    };
    let Ok(signature) = <[u8; 64]>::try_from(claim) else {
        return false;
    };
    verifier
        .verify(
            &claim_message(token_id, node_id, public),
            &Signature::from_bytes(&signature),
        )
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> (String, VerifyingKey) {
        let key = SigningKey::from_bytes(&[7; 32]).verifying_key();
        (crate::identity::NodeId::of(&key).to_string(), key)
    }

    #[test]
    fn a_token_reads_back_and_shows_only_its_id() {
        let token = JoinToken::generate().unwrap();
        let text = token.expose();
        let back = JoinToken::parse(&format!(" {}\n", text.as_str())).unwrap();
        assert_eq!(back.id(), token.id());
        assert_eq!(back.verifier(), token.verifier());
        let secret = text.rsplit('.').next().unwrap();
        assert!(!format!("{token:?}").contains(secret));
        for bad in [
            "",
            "keepd-join-1.abc.def",
            &text.replacen("keepd-join-1", "keepd-join-2", 1),
            &format!("{}.extra", text.as_str()),
            &text.replacen(token.id(), "zzzzzzzzzzzzzzzz", 1),
        ] {
            assert!(JoinToken::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_claim_holds_for_its_node_and_token_only() {
        let token = JoinToken::generate().unwrap();
        let (id, key) = node();
        let claim = token.claim(&id, &key);
        let verifier = token.verifier();
        assert!(claim_holds(
            verifier.as_bytes(),
            token.id(),
            &id,
            &key,
            &claim
        ));
        // Another node's key, another id, another token's verifier.
        let other = SigningKey::from_bytes(&[8; 32]).verifying_key();
        assert!(!claim_holds(
            verifier.as_bytes(),
            token.id(),
            &id,
            &other,
            &claim
        ));
        assert!(!claim_holds(
            verifier.as_bytes(),
            "0000000000000000",
            &id,
            &key,
            &claim
        ));
        let forged = JoinToken::generate().unwrap();
        assert!(!claim_holds(
            forged.verifier().as_bytes(),
            token.id(),
            &id,
            &key,
            &claim
        ));
        assert!(!claim_holds(&[1, 2], token.id(), &id, &key, &claim));
    }
}
