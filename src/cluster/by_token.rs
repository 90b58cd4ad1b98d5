//! Admission by join token: the tokens an admitted node issues, lists and
//! revokes (`keepd cluster token`), the members' admission of a node that
//! waits with a valid claim, and the waiting node's reading of why it is
//! not admitted yet. Every change runs as the owner under the membership
//! lock, as an operator's `admit` does.

use std::time::Duration;

use tokio_postgres::Client;
use tracing::info;

use super::join_token::{JoinToken, claim_holds};
use super::{ClusterError, key_of, locked, open, own_sealed_key, seal_to};
use crate::identity::NodeIdentity;

/// One row of `keepd cluster token list` (times in UTC, to the second).
#[derive(Debug)]
pub struct TokenInfo {
    pub id: String,
    pub created_at: String,
    pub created_by: String,
    pub expires_at: String,
    pub uses_left: i32,
    /// valid, expired, used up or revoked.
    pub state: String,
}

/// Issues a token valid for `ttl` and `uses` admissions; only an
/// admitted member may.
pub async fn create_token(
    client: &mut Client,
    identity: &NodeIdentity,
    ttl: Duration,
    uses: u32,
) -> Result<JoinToken, ClusterError> {
    let me = identity.node_id().as_str();
    let token = JoinToken::generate()?;
    let tx = locked(client).await?;
    own_sealed_key(&tx, me).await?;
    let uses = i32::try_from(uses).unwrap_or(i32::MAX);
    tx.execute(
        "INSERT INTO keepd.cluster_join_tokens (id, verifier, created_by, expires_at, uses_left) \
         VALUES ($1, $2, $3, now() + make_interval(secs => $4), $5)",
        &[
            &token.id(),
            &token.verifier().as_bytes().as_slice(),
            &me,
            &ttl.as_secs_f64(),
            &uses,
        ],
    )
    .await?;
    tx.commit().await?;
    info!(token = token.id(), ttl = ?ttl, uses, "cluster: join token issued");
    Ok(token)
}

/// Every token, newest first.
pub async fn tokens(client: &mut Client) -> Result<Vec<TokenInfo>, ClusterError> {
    let tx = locked(client).await?;
    let rows = tx
        .query(
            "SELECT id, to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'), \
               created_by, to_char(expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'), \
               uses_left, CASE WHEN revoked_at IS NOT NULL THEN 'revoked' \
                 WHEN expires_at <= now() THEN 'expired' \
                 WHEN uses_left = 0 THEN 'used up' ELSE 'valid' END \
             FROM keepd.cluster_join_tokens ORDER BY created_at DESC, id",
            &[],
        )
        .await?;
    tx.commit().await?;
    Ok(rows
        .iter()
        .map(|row| TokenInfo {
            id: row.get(0),
            created_at: row.get(1),
            created_by: row.get(2),
            expires_at: row.get(3),
            uses_left: row.get(4),
            state: row.get(5),
        })
        .collect())
}

/// Revokes the token `id`: no node is admitted by it from now on.
pub async fn revoke_token(client: &mut Client, id: &str) -> Result<(), ClusterError> {
    let tx = locked(client).await?;
    let revoked = tx
        .execute(
            "UPDATE keepd.cluster_join_tokens SET revoked_at = coalesce(revoked_at, now()) \
             WHERE id = $1",
            &[&id],
        )
        .await?;
    if revoked == 0 {
        return Err(ClusterError::UnknownToken(id.into()));
    }
    tx.commit().await?;
    info!(token = id, "cluster: join token revoked");
    Ok(())
}

/// Admits every waiting node whose claim holds for a valid token (not
/// revoked, not expired, uses left), one use each: the cluster key sealed
/// to the public key the node recorded. Returns (node, token) of each.
pub async fn admit_by_tokens(
    client: &mut Client,
    identity: &NodeIdentity,
) -> Result<Vec<(String, String)>, ClusterError> {
    // Most of the time nobody waits: a look without the lock first.
    let waiting: bool = client
        .query_one(
            "SELECT EXISTS (SELECT FROM keepd.cluster_members \
             WHERE sealed_key IS NULL AND join_token IS NOT NULL)",
            &[],
        )
        .await?
        .get(0);
    if !waiting {
        return Ok(Vec::new());
    }
    let me = identity.node_id().as_str();
    let tx = locked(client).await?;
    let key = open(identity, &own_sealed_key(&tx, me).await?)?;
    let claims = tx
        .query(
            "SELECT m.node_id, m.public_key, m.join_token, m.join_claim, t.verifier \
             FROM keepd.cluster_members m JOIN keepd.cluster_join_tokens t ON t.id = m.join_token \
             WHERE m.sealed_key IS NULL AND t.revoked_at IS NULL AND t.expires_at > now() \
               AND t.uses_left > 0 \
             ORDER BY m.requested_at, m.node_id",
            &[],
        )
        .await?;
    let mut admitted = Vec::new();
    for row in &claims {
        let (node, token): (String, String) = (row.get(0), row.get(2));
        let Ok(public) = key_of(row.get(1), &node) else {
            continue;
        };
        let claim: Option<Vec<u8>> = row.get(3);
        let verifier: Vec<u8> = row.get(4);
        if !claim.is_some_and(|claim| claim_holds(&verifier, &token, &node, &public, &claim)) {
            continue;
        }
        // The token's last use may have gone to an earlier row.
        let used = tx
            .execute(
                "UPDATE keepd.cluster_join_tokens SET uses_left = uses_left - 1 \
                 WHERE id = $1 AND uses_left > 0",
                &[&token],
            )
            .await?;
        if used == 0 {
            continue;
        }
        seal_to(&tx, &key, &node, &public, me).await?;
        info!(
            node_id = node,
            token,
            admitted_by = me,
            "cluster: node admitted by join token"
        );
        admitted.push((node, token));
    }
    tx.commit().await?;
    Ok(admitted)
}

/// Why a node waiting with `token` is not admitted (yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// Valid: a member admits the node within seconds.
    Valid,
    Unknown,
    /// The id is the cluster's, the secret is not the one issued with it.
    Forged,
    Revoked(String),
    Expired(String),
    UsedUp,
}

impl std::fmt::Display for Standing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Standing::Valid => write!(f, "valid; a member admits this node at its next look"),
            Standing::Unknown => write!(
                f,
                "the cluster issued no token with this id (mistyped, or of another cluster)"
            ),
            Standing::Forged => write!(
                f,
                "its secret is not the one issued with this id (forged or damaged)"
            ),
            Standing::Revoked(at) => write!(f, "revoked at {at} UTC"),
            Standing::Expired(at) => write!(f, "expired at {at} UTC"),
            Standing::UsedUp => write!(f, "used up: every admission it allowed was made"),
        }
    }
}

/// The token's standing, read by the waiting node itself (it holds the
/// token, so it can tell a forged secret from an unknown id).
pub async fn standing(client: &Client, token: &JoinToken) -> Result<Standing, ClusterError> {
    let row = client
        .query_opt(
            "SELECT verifier, \
               to_char(revoked_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'), \
               CASE WHEN expires_at <= now() \
                 THEN to_char(expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') END, \
               uses_left \
             FROM keepd.cluster_join_tokens WHERE id = $1",
            &[&token.id()],
        )
        .await?;
    let Some(row) = row else {
        return Ok(Standing::Unknown);
    };
    let verifier: Vec<u8> = row.get(0);
    Ok(if verifier != token.verifier().as_bytes() {
        Standing::Forged
    } else if let Some(at) = row.get::<_, Option<String>>(1) {
        Standing::Revoked(at)
    } else if let Some(at) = row.get::<_, Option<String>>(2) {
        Standing::Expired(at)
    } else if row.get::<_, i32>(3) == 0 {
        Standing::UsedUp
    } else {
        Standing::Valid
    })
}
