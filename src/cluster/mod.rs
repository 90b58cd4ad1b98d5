//! A cluster: keepd nodes over one Postgres, sharing accounts and keys.
//!
//! `key` is the shared secret (pure); this module keeps
//! `keepd.cluster_members`, where the key is stored sealed to each admitted
//! node's identity and a node not yet admitted waits with its public key.
//! Every change of the membership runs as the owner in a transaction under
//! one advisory lock, so founding, joining, admitting and removing never
//! interleave; `heartbeat` stamps the node's row of `keepd.cluster_liveness` and
//! counts, as the superuser, outside the lock.
//! No secret crosses in the clear: a node seals the key for another with
//! that node's public key, which it reads from the row the node wrote.

pub mod by_token;
pub mod heartbeat;
pub mod join_token;
pub mod key;

use ed25519_dalek::VerifyingKey;
use tokio_postgres::{Client, Transaction};
use tracing::info;

use crate::identity::{NodeId, NodeIdentity, fingerprint};
use crate::postgres::roles::{RoleAdmin, RoleError, login_role_name};
use crate::postgres::{OWNER_ROLE, describe_error};
use crate::secrets::seal::{self, SealError};
pub use join_token::{JoinToken, TokenError};
pub use key::{ClusterKey, KeyError, Purpose};

/// Serialises every change to the membership ("keepd_cl").
const CLUSTER_LOCK: i64 = 0x6b65_6570_645f_636c;
/// Held by the one cluster-key rotation under way ("keepd_rk").
const ROTATION_LOCK: i64 = 0x6b65_6570_645f_726b;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("reading or writing keepd.cluster_members failed: {}", describe_error(.0))]
    Sql(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("no join token {0} exists (`keepd cluster token list` lists them)")]
    UnknownToken(String),
    #[error("the cluster key sealed for this node does not open: {0}")]
    Seal(#[from] SealError),
    #[error(
        "keepd.cluster_members records another public key for node {0}: the row was altered, \
         or two identities share an id"
    )]
    KeyMismatch(String),
    #[error("this node ({0}) is not an admitted member: run the command on an admitted node")]
    NotAMember(String),
    #[error("no node {0} is waiting to be admitted (`keepd cluster pending` lists those that are)")]
    NotPending(String),
    #[error("node {0} is not in the cluster (`keepd cluster status` lists the members)")]
    Unknown(String),
    #[error(
        "the row of node {0} names a public key whose id is another node's: it was not \
         written by that node, and is not admitted"
    )]
    Forged(String),
    #[error("a node cannot remove itself; run `keepd cluster remove {0}` on another member")]
    RemoveSelf(String),
    #[error(
        "this database was used before clusters existed by node {others}, whose keys its data \
         was made with; this node ({node}) cannot found the cluster for it: upgrade and start \
         that node first, then admit this one from it"
    )]
    NotTheFounder { node: String, others: String },
    #[error(
        "the cluster key sealed for this node ({found}) is neither the one it last held nor \
         one rotated from it (the fingerprint in {path}, {pinned}): keepd.cluster_members was \
         altered; find out why before removing {path}"
    )]
    KeyChanged {
        path: std::path::PathBuf,
        pinned: String,
        found: String,
    },
    #[error("cannot read or write {path}: {source}")]
    Pin {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("another `keepd cluster rotate-key` is under way; run it again when it has finished")]
    RotationUnderWay,
    #[error(
        "the previous rotation (generation {generation}) is not yet held by every live node \
         ({nodes}); a node follows one rotation at a time: wait until `keepd keys status` on \
         each shows it (a few seconds for a running node), or remove the node"
    )]
    RotationPending { generation: u32, nodes: String },
    #[error(
        "the cluster key sealed for this node (fingerprint {found}) does not descend from the \
         one it holds ({held}): keepd.cluster_members was altered; find out why"
    )]
    NotASuccessor { held: String, found: String },
    #[error("dropping the login roles of node {node} failed: {source}")]
    Roles {
        node: String,
        #[source]
        source: RoleError,
    },
}

/// Where this node stands.
pub enum Membership {
    /// Admitted: the cluster key.
    Member(ClusterKey),
    /// Recorded, waiting for `keepd cluster admit`.
    Pending,
}

/// One row of `keepd cluster status` / `pending` (times in UTC, to the
/// second).
#[derive(Debug)]
pub struct Member {
    pub node_id: String,
    pub fingerprint: String,
    pub admitted: bool,
    pub requested_at: String,
    pub admitted_at: Option<String>,
    pub admitted_by: Option<String>,
}

async fn locked(client: &mut Client) -> Result<Transaction<'_>, ClusterError> {
    let tx = client.transaction().await?;
    tx.batch_execute(&format!("SET LOCAL ROLE {OWNER_ROLE}"))
        .await?;
    tx.query_one("SELECT pg_advisory_xact_lock($1)", &[&CLUSTER_LOCK])
        .await?;
    Ok(tx)
}

/// This node's place in the cluster, at start. The first node to find no
/// admitted member founds the cluster: a new key, inheriting this node's
/// own keys when a keepd from before clusters used the database (so
/// nothing of a single node is lost; field keys up to `field_versions`).
/// A node the cluster does not know records itself as pending, with its
/// claim to join by `token` if it holds one (`by_token`).
pub async fn join(
    client: &mut Client,
    identity: &NodeIdentity,
    field_versions: u32,
    token: Option<&JoinToken>,
) -> Result<Membership, ClusterError> {
    let node = identity.node_id().as_str();
    let public = identity.public_key();
    let tx = locked(client).await?;
    let mine = tx
        .query_opt(
            "SELECT public_key, sealed_key FROM keepd.cluster_members WHERE node_id = $1",
            &[&node],
        )
        .await?;
    if let Some(row) = mine {
        let key: Vec<u8> = row.get(0);
        if key != public.as_bytes() {
            return Err(ClusterError::KeyMismatch(node.into()));
        }
        let sealed: Option<Vec<u8>> = row.get(1);
        if let (None, Some(token)) = (&sealed, token) {
            // A token given (or replaced) while the node waits.
            tx.execute(
                "UPDATE keepd.cluster_members SET join_token = $2, join_claim = $3 \
                 WHERE node_id = $1 AND join_token IS DISTINCT FROM $2",
                &[&node, &token.id(), &token.claim(node, &public)],
            )
            .await?;
        }
        tx.commit().await?;
        return Ok(match sealed {
            Some(sealed) => Membership::Member(open(identity, &sealed)?),
            None => Membership::Pending,
        });
    }
    let admitted: i64 = tx
        .query_one(
            "SELECT count(*) FROM keepd.cluster_members WHERE sealed_key IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if admitted > 0 {
        tx.execute(
            "INSERT INTO keepd.cluster_members (node_id, public_key, join_token, join_claim) \
             VALUES ($1, $2, $3, $4)",
            &[
                &node,
                &public.as_bytes().as_slice(),
                &token.map(JoinToken::id),
                &token.map(|t| t.claim(node, &public)),
            ],
        )
        .await?;
        tx.commit().await?;
        return Ok(Membership::Pending);
    }
    // Schema v10 (this table) applied after the first migrations, in a
    // later start: a keepd from before clusters used this database, and
    // its keys came from its identity. (Migrations of one start share one
    // transaction and so one timestamp.) Row-level security does not hide
    // this, as it would the accounts themselves.
    let predates_clusters: bool = tx
        .query_one(
            "SELECT coalesce((SELECT applied_at FROM keepd.schema_migrations WHERE version = 10) \
               > (SELECT min(applied_at) FROM keepd.schema_migrations), false)",
            &[],
        )
        .await?
        .get(0);
    let key = if predates_clusters {
        // Its data was made with the keys of the node that used it: only
        // that node may found the cluster (its login roles say which).
        let nodes: Vec<String> = tx
            .query(
                "SELECT DISTINCT substring(rolname FROM '^keepd_([0-9a-f]{16})_v[0-9]+$') \
                 FROM pg_roles WHERE rolname ~ '^keepd_[0-9a-f]{16}_v[0-9]+$'",
                &[],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        if !nodes.is_empty() && !nodes.iter().any(|n| n == node) {
            return Err(ClusterError::NotTheFounder {
                node: node.into(),
                others: nodes.join(", "),
            });
        }
        ClusterKey::inheriting(identity, field_versions)?
    } else {
        ClusterKey::generate()?
    };
    let sealed = seal::seal_for(&public, &key.to_bytes())?;
    tx.execute(
        "INSERT INTO keepd.cluster_members \
           (node_id, public_key, sealed_key, admitted_at, admitted_by) \
         VALUES ($1, $2, $3, now(), $1)",
        &[&node, &public.as_bytes().as_slice(), &sealed],
    )
    .await?;
    tx.commit().await?;
    info!(
        node_id = node,
        inherited_keys = key.inherited_keys(),
        "cluster founded: this node holds the new cluster key"
    );
    Ok(Membership::Member(key))
}

/// Trust on first use: the first cluster key a node holds is pinned by its
/// fingerprint in `path`; a different key later (a row rewritten by
/// someone who can write the table but holds no member's identity) is
/// refused rather than used.
pub fn check_pin(key: &ClusterKey, path: &std::path::Path) -> Result<(), ClusterError> {
    let pin_error = |source| ClusterError::Pin {
        path: path.to_owned(),
        source,
    };
    let fingerprint = key.fingerprint();
    let write = || {
        crate::fsutil::write_atomic(path, format!("{fingerprint}\n").as_bytes(), None)
            .map_err(pin_error)
    };
    match std::fs::read_to_string(path) {
        Ok(pinned) if pinned.trim() == fingerprint => Ok(()),
        // The cluster rotated its key while this node was away.
        Ok(pinned) if key.descends_from(pinned.trim()) => {
            info!(
                fingerprint,
                "cluster: the pin follows the rotated cluster key"
            );
            write()
        }
        Ok(pinned) => Err(ClusterError::KeyChanged {
            path: path.to_owned(),
            pinned: pinned.trim().to_string(),
            found: fingerprint.clone(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => write(),
        Err(e) => Err(pin_error(e)),
    }
}

/// The cluster key sealed for node `me`, which must be an admitted member.
async fn own_sealed_key(tx: &Transaction<'_>, me: &str) -> Result<Vec<u8>, ClusterError> {
    tx.query_opt(
        "SELECT sealed_key FROM keepd.cluster_members WHERE node_id = $1",
        &[&me],
    )
    .await?
    .and_then(|row| row.get(0))
    .ok_or_else(|| ClusterError::NotAMember(me.into()))
}

fn open(identity: &NodeIdentity, sealed: &[u8]) -> Result<ClusterKey, ClusterError> {
    let (_, plain) = seal::open(identity, sealed)?;
    Ok(ClusterKey::from_bytes(&plain)?)
}

/// Every node the cluster knows, admitted or waiting, oldest first.
pub async fn members(client: &mut Client) -> Result<Vec<Member>, ClusterError> {
    let tx = locked(client).await?;
    let rows = tx
        .query(
            "SELECT node_id, public_key, sealed_key IS NOT NULL, \
               to_char(requested_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'), \
               to_char(admitted_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'), admitted_by \
             FROM keepd.cluster_members ORDER BY requested_at, node_id",
            &[],
        )
        .await?;
    tx.commit().await?;
    Ok(rows
        .iter()
        .map(|row| {
            let key: Vec<u8> = row.get(1);
            Member {
                node_id: row.get(0),
                fingerprint: public_key(&key)
                    .map_or_else(|| "(not a key)".into(), |k| fingerprint(&k)),
                admitted: row.get(2),
                requested_at: row.get(3),
                admitted_at: row.get(4),
                admitted_by: row.get(5),
            }
        })
        .collect())
}

fn public_key(bytes: &[u8]) -> Option<VerifyingKey> {
    VerifyingKey::from_bytes(bytes.try_into().ok()?).ok()
}

/// The public key a row records for `node_id`, if it is that node's (its id
/// is the key's): a row cannot borrow another node's name.
fn key_of(bytes: &[u8], node_id: &str) -> Result<VerifyingKey, ClusterError> {
    public_key(bytes)
        .filter(|key| NodeId::of(key).as_str() == node_id)
        .ok_or_else(|| ClusterError::Forged(node_id.into()))
}

/// The admission itself: `key` sealed to the pending node's `recipient`
/// key, recorded as admitted by `me`; a node admitted again after a
/// removal is a member, counted and trusted again.
async fn seal_to(
    tx: &Transaction<'_>,
    key: &ClusterKey,
    node_id: &str,
    recipient: &VerifyingKey,
    me: &str,
) -> Result<(), ClusterError> {
    let sealed = seal::seal_for(recipient, &key.to_bytes())?;
    tx.execute(
        "DELETE FROM keepd.cluster_removals WHERE node_id = $1",
        &[&node_id],
    )
    .await?;
    tx.execute(
        "UPDATE keepd.cluster_members \
         SET sealed_key = $2, admitted_at = now(), admitted_by = $3 WHERE node_id = $1",
        &[&node_id, &sealed, &me],
    )
    .await?;
    Ok(())
}

/// Admits the pending node `node_id`: the cluster key, opened with this
/// node's identity, sealed to the public key the pending node recorded
/// (whose id must be `node_id`, so a row cannot borrow another's name).
pub async fn admit(
    client: &mut Client,
    identity: &NodeIdentity,
    node_id: &str,
) -> Result<(), ClusterError> {
    let me = identity.node_id().as_str();
    let tx = locked(client).await?;
    let mine = own_sealed_key(&tx, me).await?;
    let key = open(identity, &mine)?;
    let theirs = tx
        .query_opt(
            "SELECT public_key FROM keepd.cluster_members \
             WHERE node_id = $1 AND sealed_key IS NULL",
            &[&node_id],
        )
        .await?
        .ok_or_else(|| ClusterError::NotPending(node_id.into()))?;
    let recipient = key_of(theirs.get(0), node_id)?;
    seal_to(&tx, &key, node_id, &recipient, me).await?;
    tx.commit().await?;
    info!(node_id, admitted_by = me, "cluster: node admitted");
    Ok(())
}

/// Removes `node_id` from the cluster: its login roles (its sessions
/// ended), then its row with its sealed key. Nothing is revoked by this:
/// the node knew the cluster key and may still (the key is not rotated);
/// what it loses is its roles and its copy in the database.
pub async fn remove(
    client: &mut Client,
    identity: &NodeIdentity,
    node_id: &str,
) -> Result<(), ClusterError> {
    if node_id == identity.node_id().as_str() {
        return Err(ClusterError::RemoveSelf(node_id.into()));
    }
    let tx = locked(client).await?;
    let row = tx
        .query_opt(
            "SELECT public_key FROM keepd.cluster_members WHERE node_id = $1",
            &[&node_id],
        )
        .await?
        .ok_or_else(|| ClusterError::Unknown(node_id.into()))?;
    tx.commit().await?;
    // The roles are named by the node's id, which must be its key's: a
    // forged row cannot name another node's roles.
    let node = NodeId::of(&key_of(row.get(0), node_id)?);
    // Roles first: if dropping one fails, the row is still there and the
    // command can be run again.
    let roles = |source| ClusterError::Roles {
        node: node_id.into(),
        source,
    };
    let mut admin = RoleAdmin::new(client);
    for version in admin.node_role_versions(&node).await.map_err(roles)? {
        let name = login_role_name(&node, version);
        admin.terminate_sessions(&name).await.map_err(roles)?;
        admin.drop_role(&name).await.map_err(roles)?;
    }
    let tx = locked(client).await?;
    tx.execute(
        "DELETE FROM keepd.cluster_members WHERE node_id = $1",
        &[&node_id],
    )
    .await?;
    // No longer live: a rotation does not wait for it.
    tx.execute(
        "DELETE FROM keepd.cluster_liveness WHERE node_id = $1",
        &[&node_id],
    )
    .await?;
    // It still knows the current root: the report says so until a rotation.
    tx.execute(
        "INSERT INTO keepd.cluster_removals (node_id, removed_by) VALUES ($1, $2)",
        &[&node_id, &identity.node_id().as_str()],
    )
    .await?;
    tx.commit().await?;
    info!(node_id, "cluster: node removed");
    Ok(())
}

/// What `rotate_key` made.
#[derive(Debug)]
pub struct RotatedKey {
    pub generation: u32,
    pub fingerprint: String,
    pub members: usize,
}

/// A new cluster root, sealed to every admitted member in one transaction
/// (`ClusterKey::rotated`: what cannot change is carried). The nodes adopt
/// it within a heartbeat or two (`daemon::root`), issue tokens and seal
/// fields under it once every live node holds it, and accept the previous
/// root's tokens until they expire.
pub async fn rotate_key(
    client: &mut Client,
    identity: &NodeIdentity,
) -> Result<RotatedKey, ClusterError> {
    let me = identity.node_id().as_str();
    let tx = client.transaction().await?;
    let free: bool = tx
        .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&ROTATION_LOCK])
        .await?
        .get(0);
    if !free {
        return Err(ClusterError::RotationUnderWay);
    }
    tx.batch_execute(&format!("SET LOCAL ROLE {OWNER_ROLE}"))
        .await?;
    tx.query_one("SELECT pg_advisory_xact_lock($1)", &[&CLUSTER_LOCK])
        .await?;
    let current = open(identity, &own_sealed_key(&tx, me).await?)?;
    let behind: Vec<String> = tx
        .query(
            "SELECT node_id FROM keepd.cluster_liveness l \
             WHERE seen_at > now() - make_interval(secs => $1) AND key_generation < $2 \
               AND NOT EXISTS (SELECT 1 FROM keepd.cluster_removals r \
                               WHERE r.node_id = l.node_id) \
             ORDER BY node_id",
            &[
                &heartbeat::LIVE.as_secs_f64(),
                &(current.generation() as i32),
            ],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if !behind.is_empty() {
        return Err(ClusterError::RotationPending {
            generation: current.generation(),
            nodes: behind.join(", "),
        });
    }
    tx.query_one(
        "SELECT pg_advisory_xact_lock($1)",
        &[&crate::field_keys::VERSIONS_LOCK],
    )
    .await?;
    let live_fields: Vec<u32> = tx
        .query(
            "SELECT version FROM keepd.field_keys WHERE retired_at IS NULL",
            &[],
        )
        .await?
        .iter()
        .map(|row| u32::try_from(row.get::<_, i32>(0)).unwrap_or(0))
        .collect();
    let next = current.rotated(&live_fields, crate::clock::unix_now())?;
    let members = tx
        .query(
            "SELECT node_id, public_key FROM keepd.cluster_members WHERE sealed_key IS NOT NULL",
            &[],
        )
        .await?;
    let bytes = next.to_bytes();
    for row in &members {
        let node: String = row.get(0);
        let public = key_of(row.get(1), &node)?;
        let sealed = seal::seal_for(&public, &bytes)?;
        tx.execute(
            "UPDATE keepd.cluster_members SET sealed_key = $2 WHERE node_id = $1",
            &[&node, &sealed],
        )
        .await?;
    }
    let fingerprint = next.fingerprint();
    tx.execute(
        "INSERT INTO keepd.cluster_key_log (generation, fingerprint, rotated_by, members) \
         VALUES ($1, $2, $3, $4)",
        &[
            &(next.generation() as i32),
            &fingerprint,
            &me,
            &(members.len() as i32),
        ],
    )
    .await?;
    tx.commit().await?;
    info!(
        generation = next.generation(),
        fingerprint,
        members = members.len(),
        "cluster: the key rotated"
    );
    Ok(RotatedKey {
        generation: next.generation(),
        fingerprint,
        members: members.len(),
    })
}

/// The key sealed for this node now, if it is a successor of `held` (the
/// cluster rotated); None while it is `held` itself.
pub async fn successor(
    client: &mut Client,
    identity: &NodeIdentity,
    held: &ClusterKey,
) -> Result<Option<ClusterKey>, ClusterError> {
    let me = identity.node_id().as_str();
    let tx = locked(client).await?;
    let sealed = own_sealed_key(&tx, me).await?;
    tx.commit().await?;
    let found = open(identity, &sealed)?;
    let held_print = held.fingerprint();
    if found.fingerprint() == held_print {
        return Ok(None);
    }
    match found.descends_from(&held_print) {
        true => Ok(Some(found)),
        false => Err(ClusterError::NotASuccessor {
            held: held_print,
            found: found.fingerprint(),
        }),
    }
}
