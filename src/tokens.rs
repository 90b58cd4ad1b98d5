//! Bearer tokens: compact JWTs (RFC 7519) signed HS256 with a key derived
//! from the cluster key, so every node of a cluster accepts every node's
//! tokens and there is no shared secret to configure.
//!
//! Each token names the generation of the cluster root its key comes from
//! in the header's `kid` (`{"alg":"HS256","typ":"JWT","kid":"2"}`; the
//! first generation writes no `kid`, as keepd always did). Verification
//! accepts exactly the header of the current generation, or of the
//! previous one while its tokens may still be live (until the rotation
//! plus the TTL): `alg: none`, other algorithms, unknown generations and
//! re-encoded headers are refused before any signature check. Whether the session is
//! still live (logout, password change) is the database's answer, not the
//! token's; `TokenClaims::sid` names the row to ask about.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::cluster::{ClusterKey, Purpose};

/// The only header keepd issues or accepts, already encoded.
const HEADER: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9";
/// Longer tokens are refused unparsed.
const MAX_TOKEN_LEN: usize = 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the token is not a JWT of three base64url parts")]
    Malformed,
    #[error("the token's header is not the HS256 header keepd issues")]
    WrongAlgorithm,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token's key belongs to a cluster root replaced longer ago than its lifetime")]
    RetiredKey,
}

/// What a token says about its bearer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenClaims {
    /// The user.
    pub sub: Uuid,
    /// The session row (revocation).
    pub sid: Uuid,
    /// The issuing node.
    pub iss: String,
    pub iat: u64,
    pub exp: u64,
}

/// Mints and checks tokens for one node of a cluster.
pub struct TokenIssuer {
    key: Zeroizing<[u8; 32]>,
    header: String,
    /// The previous root's header and key, and until when its tokens pass.
    previous: Option<(String, Zeroizing<[u8; 32]>, u64)>,
    /// Issue under the previous root: a node just given a new root keeps
    /// issuing what every node accepts until every live node holds it.
    issue_previous: AtomicBool,
    node_id: String,
    ttl: Duration,
}

/// The header of tokens under generation `generation` of the root.
fn header(generation: u32) -> String {
    match generation {
        1 => HEADER.to_string(),
        g => B64URL.encode(format!(r#"{{"alg":"HS256","typ":"JWT","kid":"{g}"}}"#)),
    }
}

use crate::clock::unix_now;

impl TokenIssuer {
    pub fn new(cluster: &ClusterKey, node_id: &str, ttl: Duration) -> TokenIssuer {
        TokenIssuer {
            key: cluster.derive(Purpose::Tokens),
            header: header(cluster.generation()),
            previous: cluster.previous().map(|p| {
                (
                    header(p.generation),
                    p.token_key.clone(),
                    p.rotated_at.saturating_add(ttl.as_secs()),
                )
            }),
            // Until the heartbeat says every live node holds the new root,
            // while the previous root's tokens still pass anywhere.
            issue_previous: AtomicBool::new(
                cluster
                    .previous()
                    .is_some_and(|p| unix_now() < p.rotated_at.saturating_add(ttl.as_secs())),
            ),
            node_id: node_id.to_string(),
            ttl,
        }
    }

    /// Every live node holds the current root: issue under it.
    pub fn issue_under_current(&self) {
        self.issue_previous.store(false, Ordering::Release);
    }

    pub fn issues_under_previous(&self) -> bool {
        self.issue_previous.load(Ordering::Acquire)
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn mac(key: &[u8; 32]) -> Hmac<Sha256> {
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("any key length")
    }

    /// A token for `user` in `session`, valid for the configured TTL.
    pub fn issue(&self, user: Uuid, session: Uuid) -> (String, TokenClaims) {
        let iat = unix_now();
        let claims = TokenClaims {
            sub: user,
            sid: session,
            iss: self.node_id.clone(),
            iat,
            exp: iat.saturating_add(self.ttl.as_secs()),
        };
        let payload = serde_json::to_vec(&claims).expect("claims serialise");
        let (header, key) = match &self.previous {
            Some((header, key, _)) if self.issues_under_previous() => (header, key),
            _ => (&self.header, &self.key),
        };
        let signing_input = format!("{header}.{}", B64URL.encode(payload));
        let mut mac = Self::mac(key);
        mac.update(signing_input.as_bytes());
        let signature = B64URL.encode(mac.finalize().into_bytes());
        (format!("{signing_input}.{signature}"), claims)
    }

    /// The claims of a token a node of this cluster issued and that has
    /// not expired.
    pub fn verify(&self, token: &str) -> Result<TokenClaims, TokenError> {
        self.verify_at(token, unix_now())
    }

    fn verify_at(&self, token: &str, now: u64) -> Result<TokenClaims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let key = match &self.previous {
            _ if header == self.header => &self.key,
            Some((previous, key, until)) if header == previous => {
                if now >= *until {
                    return Err(TokenError::RetiredKey);
                }
                key
            }
            _ => return Err(TokenError::WrongAlgorithm),
        };
        let signature = B64URL
            .decode(signature)
            .map_err(|_| TokenError::Malformed)?;
        let mut mac = Self::mac(key);
        mac.update(&token.as_bytes()[..header.len() + 1 + payload.len()]);
        mac.verify_slice(&signature)
            .map_err(|_| TokenError::BadSignature)?;
        let payload = B64URL.decode(payload).map_err(|_| TokenError::Malformed)?;
        let claims: TokenClaims =
            serde_json::from_slice(&payload).map_err(|_| TokenError::Malformed)?;
        if claims.exp <= now {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer(ttl: u64) -> TokenIssuer {
        let dir = tempfile::tempdir().unwrap();
        let (identity, _) =
            crate::identity::NodeIdentity::load_or_create(&dir.path().join("id")).unwrap();
        let cluster = ClusterKey::generate().unwrap();
        TokenIssuer::new(
            &cluster,
            identity.node_id().as_str(),
            Duration::from_secs(ttl),
        )
    }

    #[test]
    fn another_member_of_the_cluster_accepts_the_token() {
        let cluster = ClusterKey::generate().unwrap();
        let ids: Vec<_> = (0..2)
            .map(|i| crate::identity::NodeIdentity::from_seed(&[i; 32]))
            .collect();
        let a = TokenIssuer::new(&cluster, ids[0].node_id().as_str(), Duration::from_secs(60));
        let b = TokenIssuer::new(&cluster, ids[1].node_id().as_str(), Duration::from_secs(60));
        let (token, claims) = a.issue(Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(b.verify(&token).unwrap(), claims);
        assert_eq!(claims.iss, ids[0].node_id().as_str());
    }

    #[test]
    fn header_constant_is_the_encoded_hs256_header() {
        assert_eq!(
            B64URL.decode(HEADER).unwrap(),
            br#"{"alg":"HS256","typ":"JWT"}"#
        );
    }

    #[test]
    fn round_trip_and_expiry() {
        let issuer = issuer(60);
        let (user, session) = (Uuid::new_v4(), Uuid::new_v4());
        let (token, claims) = issuer.issue(user, session);
        let verified = issuer.verify(&token).unwrap();
        assert_eq!(verified, claims);
        assert_eq!(verified.sub, user);
        assert_eq!(verified.sid, session);
        assert_eq!(
            issuer.verify_at(&token, claims.exp),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn forged_and_foreign_tokens_are_refused() {
        let issuer = issuer(60);
        let (token, _) = issuer.issue(Uuid::new_v4(), Uuid::new_v4());
        let (foreign, _) = self::issuer(60).issue(Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(issuer.verify(&foreign), Err(TokenError::BadSignature));

        let parts: Vec<&str> = token.split('.').collect();
        let none_header = B64URL.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let alg_none = format!("{none_header}.{}.", parts[1]);
        assert_eq!(issuer.verify(&alg_none), Err(TokenError::WrongAlgorithm));

        let mut claims: serde_json::Value =
            serde_json::from_slice(&B64URL.decode(parts[1]).unwrap()).unwrap();
        claims["sub"] = serde_json::json!(Uuid::new_v4());
        let swapped = B64URL.encode(claims.to_string());
        let tampered = format!("{}.{swapped}.{}", parts[0], parts[2]);
        assert_eq!(issuer.verify(&tampered), Err(TokenError::BadSignature));

        for junk in [
            "",
            "a.b",
            "a.b.c.d",
            &format!("{token}x"),
            &"x".repeat(5000),
        ] {
            assert!(issuer.verify(junk).is_err(), "{junk:?} accepted");
        }
    }

    #[test]
    fn tokens_of_the_previous_root_pass_until_they_could_have_expired() {
        let id = crate::identity::NodeIdentity::from_seed(&[5; 32]);
        let first = ClusterKey::generate().unwrap();
        let old = TokenIssuer::new(&first, id.node_id().as_str(), Duration::from_secs(60));
        let (token, claims) = old.issue(Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(
            token.split('.').next(),
            Some(HEADER),
            "generation 1 writes no kid"
        );
        let rotated_at = claims.iat + 10;
        let second = first.rotated(&[], rotated_at).unwrap();
        let new = TokenIssuer::new(&second, id.node_id().as_str(), Duration::from_secs(60));
        assert_eq!(new.verify_at(&token, claims.iat + 20), Ok(claims.clone()));
        assert_eq!(
            new.verify_at(&token, rotated_at + 60),
            Err(TokenError::RetiredKey)
        );
        // Until every node holds the new root, tokens are the previous one's
        // (made now: this rotation is recent).
        let recent = TokenIssuer::new(
            &first.rotated(&[], unix_now()).unwrap(),
            id.node_id().as_str(),
            Duration::from_secs(60),
        );
        assert!(recent.issues_under_previous());
        let (early, _) = recent.issue(Uuid::new_v4(), Uuid::new_v4());
        assert!(old.verify(&early).is_ok(), "the old root's nodes accept it");
        recent.issue_under_current();
        let (late, _) = recent.issue(Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(old.verify(&late), Err(TokenError::WrongAlgorithm));
        new.issue_under_current();
        let (fresh, fresh_claims) = new.issue(Uuid::new_v4(), Uuid::new_v4());
        let kid: serde_json::Value =
            serde_json::from_slice(&B64URL.decode(fresh.split('.').next().unwrap()).unwrap())
                .unwrap();
        assert_eq!(kid["kid"], "2");
        assert_eq!(new.verify(&fresh), Ok(fresh_claims));
        // The old root does not know the new generation's tokens.
        assert_eq!(old.verify(&fresh), Err(TokenError::WrongAlgorithm));
        // A token signed with the old key under the new header is forged.
        let parts: Vec<&str> = token.split('.').collect();
        let relabelled = format!(
            "{}.{}.{}",
            fresh.split('.').next().unwrap(),
            parts[1],
            parts[2]
        );
        assert_eq!(new.verify(&relabelled), Err(TokenError::BadSignature));
        // Two rotations on, the first root's tokens are refused.
        let third = second.rotated(&[], rotated_at + 1).unwrap();
        let newest = TokenIssuer::new(&third, id.node_id().as_str(), Duration::from_secs(60));
        assert_eq!(
            newest.verify_at(&token, claims.iat + 20),
            Err(TokenError::WrongAlgorithm)
        );
    }
}
