//! Bearer tokens: compact JWTs (RFC 7519) signed HS256 with a key derived
//! from the cluster key, so every node of a cluster accepts every node's
//! tokens and there is no shared secret to configure.
//!
//! Verification accepts exactly one header (`{"alg":"HS256","typ":"JWT"}`
//! as keepd writes it): `alg: none`, other algorithms and re-encoded
//! headers are refused before any signature check. Whether the session is
//! still live (logout, password change) is the database's answer, not the
//! token's; `TokenClaims::sid` names the row to ask about.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::cluster::{ClusterKey, Purpose};
use crate::identity::NodeId;

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
    node_id: String,
    ttl: Duration,
}

use crate::clock::unix_now;

impl TokenIssuer {
    pub fn new(cluster: &ClusterKey, node_id: &NodeId, ttl: Duration) -> TokenIssuer {
        TokenIssuer {
            key: cluster.derive(Purpose::Tokens),
            node_id: node_id.to_string(),
            ttl,
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn mac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as KeyInit>::new_from_slice(self.key.as_ref()).expect("any key length")
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
        let signing_input = format!("{HEADER}.{}", B64URL.encode(payload));
        let mut mac = self.mac();
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
        if header != HEADER {
            return Err(TokenError::WrongAlgorithm);
        }
        let signature = B64URL
            .decode(signature)
            .map_err(|_| TokenError::Malformed)?;
        let mut mac = self.mac();
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
        TokenIssuer::new(&cluster, identity.node_id(), Duration::from_secs(ttl))
    }

    #[test]
    fn another_member_of_the_cluster_accepts_the_token() {
        let cluster = ClusterKey::generate().unwrap();
        let ids: Vec<_> = (0..2)
            .map(|i| crate::identity::NodeIdentity::from_seed(&[i; 32]))
            .collect();
        let a = TokenIssuer::new(&cluster, ids[0].node_id(), Duration::from_secs(60));
        let b = TokenIssuer::new(&cluster, ids[1].node_id(), Duration::from_secs(60));
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
}
