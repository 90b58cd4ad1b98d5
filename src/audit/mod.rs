//! The hash-chained audit trail.
//!
//! Writers append entries (`record`) in the same transaction as the change
//! they describe, as `keepd_audit`, unchained: no lock is held across
//! tenants. One `AuditSealer` per node (an advisory lock) chains the
//! committed entries into `audit_chain`, each link an HMAC-SHA256 (keyed by
//! the node identity, so a database-only attacker cannot recompute it) over
//! the previous link, the sequence number and every field of the entry. The
//! chain head is signed with the node key into a checkpoint file outside the
//! database, which catches a truncated tail. `verify` recomputes it all.
//! `retention` exports and prunes the oldest entries (`audit.retention`).

pub mod retention;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tracing::{error, info, warn};
use zeroize::Zeroizing;

use crate::cluster::{ClusterKey, Purpose};
use crate::fsutil;
use crate::identity::NodeIdentity;
use crate::postgres::pool::{
    GroupRole, OperationContext, PoolError, RoleAwarePool, ScopedTransaction,
};
use crate::shutdown::Shutdown;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("audit query failed: {}", crate::postgres::describe_error(.0))]
    Sql(#[from] tokio_postgres::Error),
    #[error("cannot write the audit checkpoint {path}: {source}")]
    Checkpoint {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the audit checkpoint {path} is unreadable or not signed by this node: {reason}")]
    BadCheckpoint { path: PathBuf, reason: String },
    #[error("the audit export {path} does not verify: {reason}")]
    BadExport { path: PathBuf, reason: String },
    #[error(
        "the audit chain in the database does not extend the signed checkpoint ({0}); keepd stops \
         sealing to keep the evidence: run `keepd audit verify`"
    )]
    Diverged(String),
}

/// The key of this node's audit chain, derived from its identity: each
/// node of a cluster keeps and signs a chain of its own.
pub struct AuditKeys {
    chain: Zeroizing<[u8; 32]>,
}

impl AuditKeys {
    pub fn new(identity: &NodeIdentity) -> AuditKeys {
        AuditKeys {
            chain: identity.derive_key(b"keepd audit", b"keepd audit chain v1"),
        }
    }
}

/// How audit metadata names people and places without saying who: keyed
/// with the cluster's key, so an account has the same identifier in every
/// node's chain.
pub struct AuditIdentifiers {
    key: Zeroizing<[u8; 32]>,
}

impl AuditIdentifiers {
    pub fn new(cluster: &ClusterKey) -> AuditIdentifiers {
        AuditIdentifiers {
            key: cluster.derive(Purpose::AuditIdentifiers),
        }
    }

    /// A keyed HMAC of an identifier (email, address, token) for audit
    /// metadata: equal inputs give equal values; the input is not recoverable.
    pub fn identifier(&self, kind: &str, value: &str) -> String {
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(self.key.as_ref()).expect("any key length");
        mac.update(kind.as_bytes());
        mac.update(&[0]);
        mac.update(value.as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..16])
    }
}

/// What an audit entry records; each action names the table it changes,
/// so the two cannot disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditAction {
    NodeStart,
    CredentialRotation,
    CredentialRotationComplete,
    UserRegister,
    Login,
    LoginFailed,
    Logout,
    PasswordChange,
    AccountErase,
    VaultKeyStore,
    /// A vault key re-wrapped (the same key under a new password).
    VaultKeyRewrap,
    /// A vault erased with its key and entries.
    VaultDelete,
    SyncPush,
    DeviceAdd,
    DeviceRevoke,
    BackupCreate,
    /// A backup deleted by its owner (`DELETE /backups/{id}`).
    BackupDelete,
    /// The database was restored from a backup (`keepd restore`): the
    /// chain continues from the restored point.
    NodeRestore,
    /// The operator's account commands (`keepd account`): source
    /// component `control`, the operator's uid in the metadata.
    AccountDisable,
    AccountEnable,
    AccountDelete,
    InviteCreate,
    /// A second factor confirmed by its owner, turned off by its owner,
    /// or reset by the operator (`keepd account reset-second-factor`).
    SecondFactorEnable,
    SecondFactorDisable,
    SecondFactorReset,
    /// A field key version made by the rotation rule (age or uses), and
    /// old versions retired once no value used them.
    FieldKeyRotation,
    FieldKeyRetire,
    /// Entries past `audit.retention` exported and pruned (the export's
    /// file name and the seq range in the metadata).
    AuditPrune,
    /// A node admitted to the cluster by a join token (the node and the
    /// token's id in the metadata).
    ClusterJoin,
}

impl AuditAction {
    /// The name stored in `audit_log.action`.
    pub fn name(self) -> &'static str {
        match self {
            AuditAction::NodeStart => "NODE_START",
            AuditAction::CredentialRotation => "CREDENTIAL_ROTATION",
            AuditAction::CredentialRotationComplete => "CREDENTIAL_ROTATION_COMPLETE",
            AuditAction::UserRegister => "USER_REGISTER",
            AuditAction::Login => "LOGIN",
            AuditAction::LoginFailed => "LOGIN_FAILED",
            AuditAction::Logout => "LOGOUT",
            AuditAction::PasswordChange => "PASSWORD_CHANGE",
            AuditAction::AccountErase => "ACCOUNT_ERASE",
            AuditAction::VaultKeyStore => "VAULT_KEY_STORE",
            AuditAction::VaultKeyRewrap => "VAULT_KEY_REWRAP",
            AuditAction::VaultDelete => "VAULT_DELETE",
            AuditAction::SyncPush => "SYNC_PUSH",
            AuditAction::DeviceAdd => "DEVICE_ADD",
            AuditAction::DeviceRevoke => "DEVICE_REVOKE",
            AuditAction::BackupCreate => "BACKUP_CREATE",
            AuditAction::BackupDelete => "BACKUP_DELETE",
            AuditAction::NodeRestore => "NODE_RESTORE",
            AuditAction::AccountDisable => "ACCOUNT_DISABLE",
            AuditAction::AccountEnable => "ACCOUNT_ENABLE",
            AuditAction::AccountDelete => "ACCOUNT_DELETE",
            AuditAction::InviteCreate => "INVITE_CREATE",
            AuditAction::SecondFactorEnable => "SECOND_FACTOR_ENABLE",
            AuditAction::SecondFactorDisable => "SECOND_FACTOR_DISABLE",
            AuditAction::SecondFactorReset => "SECOND_FACTOR_RESET",
            AuditAction::FieldKeyRotation => "FIELD_KEY_ROTATION",
            AuditAction::FieldKeyRetire => "FIELD_KEY_RETIRE",
            AuditAction::AuditPrune => "AUDIT_PRUNE",
            AuditAction::ClusterJoin => "CLUSTER_JOIN",
        }
    }

    /// The table the action changes (`audit_log.table_name`).
    pub fn table(self) -> &'static str {
        match self {
            AuditAction::NodeStart | AuditAction::NodeRestore => "-",
            AuditAction::CredentialRotation | AuditAction::CredentialRotationComplete => {
                "pg_authid"
            }
            AuditAction::UserRegister
            | AuditAction::LoginFailed
            | AuditAction::PasswordChange
            | AuditAction::AccountErase
            | AuditAction::AccountDisable
            | AuditAction::AccountEnable
            | AuditAction::AccountDelete
            | AuditAction::SecondFactorEnable
            | AuditAction::SecondFactorDisable
            | AuditAction::SecondFactorReset => "keepd.users",
            AuditAction::InviteCreate => "keepd.invites",
            AuditAction::Login | AuditAction::Logout => "keepd.sessions",
            AuditAction::VaultKeyStore | AuditAction::VaultKeyRewrap => "keepd.vault_keys",
            AuditAction::VaultDelete => "keepd.vaults",
            AuditAction::SyncPush => "keepd.sync_logs",
            AuditAction::DeviceAdd | AuditAction::DeviceRevoke => "keepd.devices",
            AuditAction::BackupCreate | AuditAction::BackupDelete => "keepd.backups",
            AuditAction::FieldKeyRotation | AuditAction::FieldKeyRetire => "keepd.field_keys",
            AuditAction::AuditPrune => "keepd_audit.audit_log",
            AuditAction::ClusterJoin => "keepd.cluster_members",
        }
    }
}

/// What happened, as the caller knows it. Identifiers in `metadata` must
/// come from `AuditKeys::identifier`.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    pub action: AuditAction,
    pub rows_affected: i64,
    pub duration: Duration,
    pub source_component: &'static str,
    pub metadata: serde_json::Value,
}

const INSERT_ENTRY: &str = "INSERT INTO keepd_audit.audit_log \
    (node_id, operation_id, role_used, action, table_name, rows_affected, duration_us, \
     source_component, metadata) \
    VALUES ($1, gen_random_uuid(), $2, $3, $4, $5, $6, $7, $8)";

/// Appends `entry` inside `tx`, as `keepd_audit`, then returns `tx` to its
/// role. It commits or rolls back with the change it records.
pub async fn record(
    tx: &mut ScopedTransaction,
    node_id: &str,
    entry: &AuditEntry,
) -> Result<(), AuditError> {
    let role_used = tx.role().name();
    let duration_us = entry.duration.as_micros().min(i64::MAX as u128) as i64;
    tx.execute_as(
        GroupRole::Audit,
        INSERT_ENTRY,
        &[
            &node_id,
            &role_used,
            &entry.action.name(),
            &entry.action.table(),
            &entry.rows_affected,
            &duration_us,
            &entry.source_component,
            &entry.metadata,
        ],
    )
    .await?;
    Ok(())
}

/// Records `entry` in a transaction of its own (for events with no data
/// change, such as a credential rotation step).
pub async fn record_alone(
    pool: &RoleAwarePool,
    node_id: &str,
    entry: &AuditEntry,
) -> Result<(), AuditError> {
    let mut tx = pool
        .begin(&OperationContext::system(GroupRole::Audit))
        .await?;
    record(&mut tx, node_id, entry).await?;
    Ok(tx.commit().await?)
}

/// The columns of an entry, in the order the link hash covers them; the
/// same projection serves sealing and verification.
const ENTRY_COLUMNS: &str = "e.id, (extract(epoch FROM e.recorded_at) * 1000000)::bigint, e.node_id, \
    e.operation_id::text, e.role_used, e.action, e.table_name, e.rows_affected, e.duration_us, \
    e.source_component, e.metadata::text";

struct EntryFields {
    id: i64,
    recorded_us: i64,
    texts: [String; 5],
    rows_affected: i64,
    duration_us: i64,
    source_component: String,
    metadata: String,
}

impl EntryFields {
    /// Reads the entry columns starting at `at`.
    fn from_row(row: &tokio_postgres::Row, at: usize) -> Option<EntryFields> {
        Some(EntryFields {
            id: row.get::<_, Option<i64>>(at)?,
            recorded_us: row.get(at + 1),
            texts: [
                row.get(at + 2),
                row.get(at + 3),
                row.get(at + 4),
                row.get(at + 5),
                row.get(at + 6),
            ],
            rows_affected: row.get(at + 7),
            duration_us: row.get(at + 8),
            source_component: row.get(at + 9),
            metadata: row.get(at + 10),
        })
    }
}

/// One link: HMAC(prev ‖ seq ‖ every field, length-prefixed).
fn link(keys: &AuditKeys, prev: &[u8; 32], seq: i64, entry: &EntryFields) -> [u8; 32] {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(keys.chain.as_ref()).expect("any key length");
    mac.update(prev);
    mac.update(&seq.to_be_bytes());
    for number in [entry.id, entry.recorded_us] {
        mac.update(&number.to_be_bytes());
    }
    let texts = entry
        .texts
        .iter()
        .chain([&entry.source_component, &entry.metadata]);
    for text in texts {
        mac.update(&(text.len() as u64).to_be_bytes());
        mac.update(text.as_bytes());
    }
    for number in [entry.rows_affected, entry.duration_us] {
        mac.update(&number.to_be_bytes());
    }
    mac.finalize().into_bytes().into()
}

/// The signed head of the chain, kept outside the database.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Checkpoint {
    pub format: String,
    pub node_id: String,
    pub seq: i64,
    pub hash: String,
    pub signed_at: u64,
    pub signature: String,
}

const CHECKPOINT_FORMAT: &str = "keepd-audit-checkpoint-v1";

impl Checkpoint {
    fn message(node_id: &str, seq: i64, hash: &str, signed_at: u64) -> String {
        format!("{CHECKPOINT_FORMAT}|{node_id}|{seq}|{hash}|{signed_at}")
    }

    fn sign(identity: &NodeIdentity, seq: i64, hash: &[u8; 32]) -> Checkpoint {
        let node_id = identity.node_id().to_string();
        let hash = hex::encode(hash);
        let signed_at = crate::clock::unix_now();
        let signature = sign(identity, &Self::message(&node_id, seq, &hash, signed_at));
        Checkpoint {
            format: CHECKPOINT_FORMAT.into(),
            node_id,
            seq,
            hash,
            signed_at,
            signature,
        }
    }

    /// Loads and checks the signature; None when no checkpoint exists yet.
    pub fn load(path: &Path, identity: &NodeIdentity) -> Result<Option<Checkpoint>, AuditError> {
        let bad = |reason: String| AuditError::BadCheckpoint {
            path: path.to_owned(),
            reason,
        };
        let text = match std::fs::read(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(bad(e.to_string())),
        };
        let cp: Checkpoint = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        if cp.format != CHECKPOINT_FORMAT {
            return Err(bad(format!("unknown format {:?}", cp.format)));
        }
        let message = Self::message(&cp.node_id, cp.seq, &cp.hash, cp.signed_at);
        match signed_by(identity, &message, &cp.signature) {
            Some(true) => Ok(Some(cp)),
            Some(false) => Err(bad(
                "the signature does not verify with this node's key".into()
            )),
            None => Err(bad("the signature is malformed".into())),
        }
    }

    fn save(&self, path: &Path) -> Result<(), AuditError> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("checkpoint serialises");
        bytes.push(b'\n');
        fsutil::write_atomic(path, &bytes, None).map_err(|source| AuditError::Checkpoint {
            path: path.to_owned(),
            source,
        })
    }
}

/// `message` signed with the node's identity, base64: the checkpoint's
/// and retention's signatures.
fn sign(identity: &NodeIdentity, message: &str) -> String {
    BASE64.encode(identity.sign(message.as_bytes()).to_bytes())
}

/// Whether `signature` (base64) is the node's over `message`; None when it
/// is not a signature at all.
fn signed_by(identity: &NodeIdentity, message: &str, signature: &str) -> Option<bool> {
    use ed25519_dalek::Verifier;
    let bytes: [u8; 64] = BASE64.decode(signature).ok()?.try_into().ok()?;
    Some(
        identity
            .public_key()
            .verify(
                message.as_bytes(),
                &ed25519_dalek::Signature::from_bytes(&bytes),
            )
            .is_ok(),
    )
}

/// Serialises sealing across every keepd sharing a cluster.
const SEAL_LOCK: i64 = 0x6b65_6570_645f_6175; // "keepd_au"
const SEAL_BATCH: i64 = 500;

/// Chains committed entries, and signs the head into the checkpoint.
pub struct AuditSealer {
    pool: RoleAwarePool,
    identity: Arc<NodeIdentity>,
    keys: Arc<AuditKeys>,
    checkpoint: PathBuf,
    forward: Option<Forwarder>,
}

/// Sends each sealed entry to a syslog socket as one JSON line
/// (`audit.forward`), never blocking the sealer: a collector that is away
/// or slow loses lines (counted, said once), the chain loses nothing.
struct Forwarder {
    socket: std::os::unix::net::UnixDatagram,
    path: PathBuf,
    dropped: std::sync::atomic::AtomicU64,
}

/// syslog facility authpriv (10), severity info (6).
const SYSLOG_PRIORITY: u8 = 10 * 8 + 6;

impl Forwarder {
    fn to(path: PathBuf) -> Forwarder {
        let socket = std::os::unix::net::UnixDatagram::unbound()
            .expect("a Unix datagram socket can be made");
        let _ = socket.set_nonblocking(true);
        Forwarder {
            socket,
            path,
            dropped: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn send(&self, seq: i64, entry: &EntryFields, hash: &[u8; 32]) {
        let [node, operation, role, action, table] = &entry.texts;
        let line = serde_json::json!({
            "seq": seq,
            "id": entry.id,
            "recordedAtUs": entry.recorded_us,
            "node": node,
            "operation": operation,
            "role": role,
            "action": action,
            "table": table,
            "rows": entry.rows_affected,
            "durationUs": entry.duration_us,
            "source": entry.source_component,
            "metadata": serde_json::from_str::<serde_json::Value>(&entry.metadata)
                .unwrap_or(serde_json::Value::Null),
            "hash": hex::encode(hash),
        });
        let message = format!(
            "<{SYSLOG_PRIORITY}>keepd-audit[{}]: {line}",
            std::process::id()
        );
        if let Err(e) = self.socket.send_to(message.as_bytes(), &self.path)
            && self
                .dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                == 0
        {
            warn!(path = %self.path.display(), error = %e, "audit.forward: the collector does not take entries; they stay in the chain, and this is said once");
        }
    }
}

impl AuditSealer {
    pub fn new(
        pool: RoleAwarePool,
        identity: Arc<NodeIdentity>,
        keys: Arc<AuditKeys>,
        checkpoint: PathBuf,
    ) -> AuditSealer {
        AuditSealer {
            pool,
            identity,
            keys,
            checkpoint,
            forward: None,
        }
    }

    /// Seals what is committed; returns the head (seq, hash) if any.
    pub async fn seal(&self) -> Result<Option<(i64, [u8; 32])>, AuditError> {
        let tx = self
            .pool
            .begin(&OperationContext::system(GroupRole::Audit))
            .await?;
        let node = self.identity.node_id().as_str();
        // One sealer per node's chain, whichever process runs it.
        tx.query_one(
            "SELECT pg_advisory_xact_lock($1::bigint + hashtext($2))",
            &[&SEAL_LOCK, &node],
        )
        .await?;
        let head = tx
            .query(
                "SELECT seq, hash FROM keepd_audit.audit_chain WHERE node_id = $1 \
                 ORDER BY seq DESC LIMIT 1",
                &[&node],
            )
            .await?;
        let (mut seq, mut prev): (i64, [u8; 32]) = match head.first() {
            Some(row) => (
                row.get(0),
                row.get::<_, Vec<u8>>(1).try_into().unwrap_or([0; 32]),
            ),
            None => (0, [0; 32]),
        };
        if let Some(cp) = Checkpoint::load(&self.checkpoint, &self.identity)? {
            let at = tx
                .query(
                    "SELECT hash FROM keepd_audit.audit_chain WHERE node_id = $1 AND seq = $2",
                    &[&node, &cp.seq],
                )
                .await?;
            let matches = at
                .first()
                .is_some_and(|r| hex::encode(r.get::<_, Vec<u8>>(0)) == cp.hash);
            // Retention may have pruned the link the checkpoint names.
            let pruned = || async {
                let base = tx.query(retention::BASE, &[&node]).await?;
                Ok::<_, AuditError>(
                    base.first()
                        .is_some_and(|row| row.get::<_, i64>(0) >= cp.seq),
                )
            };
            if !matches && !pruned().await? {
                return Err(AuditError::Diverged(format!(
                    "checkpoint at seq {}, database chain ends at seq {seq}",
                    cp.seq
                )));
            }
        }
        let rows = tx
            .query(
                &format!(
                    "SELECT {ENTRY_COLUMNS} FROM keepd_audit.audit_log e \
                     WHERE e.node_id = $2 \
                       AND NOT EXISTS (SELECT 1 FROM keepd_audit.audit_chain c WHERE c.entry_id = e.id) \
                     ORDER BY e.id LIMIT $1"
                ),
                &[&SEAL_BATCH, &node],
            )
            .await?;
        if rows.is_empty() {
            return Ok((seq > 0).then_some((seq, prev)));
        }
        let (mut seqs, mut ids, mut prevs, mut hashes) = (vec![], vec![], vec![], vec![]);
        let mut sealed = Vec::new();
        for row in &rows {
            let entry = EntryFields::from_row(row, 0).expect("entry id is never null");
            seq += 1;
            let hash = link(&self.keys, &prev, seq, &entry);
            seqs.push(seq);
            ids.push(entry.id);
            prevs.push(prev.to_vec());
            hashes.push(hash.to_vec());
            prev = hash;
            if self.forward.is_some() {
                sealed.push((seq, entry, hash));
            }
        }
        tx.execute(
            "INSERT INTO keepd_audit.audit_chain (node_id, seq, entry_id, prev_hash, hash) \
             SELECT $5, * FROM unnest($1::bigint[], $2::bigint[], $3::bytea[], $4::bytea[])",
            &[&seqs, &ids, &prevs, &hashes, &node],
        )
        .await?;
        tx.commit().await?;
        if let Some(forward) = &self.forward {
            for (seq, entry, hash) in &sealed {
                forward.send(*seq, entry, hash);
            }
        }
        Ok(Some((seq, prev)))
    }

    /// Each entry, once sealed, also goes to the syslog socket at `path`.
    pub fn forwarding(self, path: Option<PathBuf>) -> AuditSealer {
        AuditSealer {
            forward: path.map(Forwarder::to),
            ..self
        }
    }

    /// Seals every second, checkpoints when the head moved, and once more
    /// at shutdown.
    pub async fn run(self, mut stop: Shutdown) {
        let mut checkpointed: Option<i64> = None;
        let mut failing_since: Option<Instant> = None;
        loop {
            let stopping = tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => false,
                _ = stop.requested() => true,
            };
            match self.seal().await {
                Ok(Some((seq, hash))) if checkpointed != Some(seq) => {
                    match Checkpoint::sign(&self.identity, seq, &hash).save(&self.checkpoint) {
                        Ok(()) => checkpointed = Some(seq),
                        Err(e) => error!(error = %e, "cannot write the audit checkpoint"),
                    }
                    failing_since = None;
                }
                Ok(_) => failing_since = None,
                Err(e) => {
                    // Once per outage, not once per second.
                    if failing_since.is_none() {
                        error!(error = %e, "audit sealing failed; retrying every second");
                        failing_since = Some(Instant::now());
                    }
                }
            }
            if stopping {
                if let Some(seq) = checkpointed {
                    info!(seq, "audit chain sealed and checkpointed at shutdown");
                }
                return;
            }
        }
    }
}

/// The outcome of `verify`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Intact {
        sealed: i64,
        /// The entries up to this seq were exported and pruned
        /// (`audit.retention`); 0: none.
        pruned: i64,
        unsealed: i64,
        checkpoint: Option<i64>,
        /// The restores the chain records (`NODE_RESTORE` metadata).
        restores: Vec<String>,
    },
    Broken {
        seq: i64,
        entry_id: Option<i64>,
        reason: String,
    },
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Intact {
                sealed,
                pruned,
                unsealed,
                checkpoint,
                restores,
            } => {
                write!(f, "audit chain intact: {sealed} sealed entries")?;
                if *pruned > 0 {
                    write!(
                        f,
                        " (seq 1 to {pruned} exported and pruned; the chain continues from its signed base)"
                    )?;
                }
                match checkpoint {
                    Some(seq) => write!(f, ", signed checkpoint at seq {seq} matches")?,
                    None => write!(f, ", no checkpoint yet")?,
                }
                write!(f, ", {unsealed} entries not yet sealed")?;
                for restore in restores {
                    write!(f, "; restored from a backup: {restore}")?;
                }
                Ok(())
            }
            Verdict::Broken {
                seq,
                entry_id,
                reason,
            } => {
                write!(f, "audit chain broken at seq {seq}")?;
                if let Some(id) = entry_id {
                    write!(f, " (entry {id})")?;
                }
                write!(f, ": {reason}")
            }
        }
    }
}

/// After a restore from a backup: the signed checkpoint moved to the head
/// of this node's chain as restored (its seq returned, with the one it
/// replaced), so the restored point is the new base and a later
/// truncation is still caught. Only the identity can sign it, so this is
/// no way around the checkpoint for anyone without it.
pub async fn rebase_checkpoint(
    client: &tokio_postgres::Client,
    identity: &NodeIdentity,
    path: &Path,
) -> Result<(Option<i64>, i64), AuditError> {
    let before = Checkpoint::load(path, identity)?.map(|cp| cp.seq);
    let head = client
        .query_opt(
            "SELECT seq, hash FROM keepd_audit.audit_chain WHERE node_id = $1 \
             ORDER BY seq DESC LIMIT 1",
            &[&identity.node_id().as_str()],
        )
        .await?;
    let (seq, hash) = match head {
        Some(row) => {
            let hash: Vec<u8> = row.get(1);
            let hash: [u8; 32] = hash.try_into().map_err(|_| AuditError::BadCheckpoint {
                path: path.to_owned(),
                reason: "the restored chain's head hash is not 32 bytes".into(),
            })?;
            (row.get::<_, i64>(0), hash)
        }
        None => (0, [0; 32]),
    };
    Checkpoint::sign(identity, seq, &hash).save(path)?;
    Ok((before, seq))
}

/// Recomputes the whole chain over `client` (any role that may read the
/// audit schema) and checks it against the signed checkpoint.
pub async fn verify(
    client: &tokio_postgres::Client,
    identity: &NodeIdentity,
    checkpoint: &Path,
) -> Result<Verdict, AuditError> {
    // One snapshot for the chain and the count of what it does not hold
    // yet: read apart, the sealer could seal everything in between and
    // the verdict would count those entries nowhere.
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let verdict = verify_in_snapshot(client, identity, checkpoint).await;
    // Read only: ending it by rollback also clears an aborted one.
    client.batch_execute("ROLLBACK").await?;
    verdict
}

async fn verify_in_snapshot(
    client: &tokio_postgres::Client,
    identity: &NodeIdentity,
    checkpoint: &Path,
) -> Result<Verdict, AuditError> {
    let keys = AuditKeys::new(identity);
    let rows = client
        .query(
            &format!(
                "SELECT c.seq, c.entry_id, c.prev_hash, c.hash, {ENTRY_COLUMNS} \
                 FROM keepd_audit.audit_chain c LEFT JOIN keepd_audit.audit_log e ON e.id = c.entry_id \
                 WHERE c.node_id = $1 ORDER BY c.seq"
            ),
            &[&identity.node_id().as_str()],
        )
        .await?;
    // A pruned chain starts after its signed base.
    let base = match client
        .query_opt(retention::BASE, &[&identity.node_id().as_str()])
        .await?
    {
        None => None,
        Some(row) => match retention::Base::from_row(&row, identity) {
            Ok(base) => Some(base),
            Err(reason) => {
                return Ok(Verdict::Broken {
                    seq: row.get(0),
                    entry_id: None,
                    reason: format!("the pruned chain's base is not this node's: {reason}"),
                });
            }
        },
    };
    let pruned = base.map_or(0, |b| b.seq);
    let mut prev = base.map_or([0u8; 32], |b| b.hash);
    let mut expected = pruned + 1;
    let mut hashes = Vec::with_capacity(rows.len());
    let mut restores = Vec::new();
    for row in &rows {
        let seq: i64 = row.get(0);
        let entry_id: i64 = row.get(1);
        let broken = |seq: i64, reason: &str| Verdict::Broken {
            seq,
            entry_id: Some(entry_id),
            reason: reason.into(),
        };
        if seq != expected {
            return Ok(Verdict::Broken {
                seq: expected,
                entry_id: None,
                reason: "the link is missing: entries were deleted from the chain".into(),
            });
        }
        let Some(entry) = EntryFields::from_row(row, 4) else {
            return Ok(broken(seq, "the entry was deleted"));
        };
        let stored_prev: Vec<u8> = row.get(2);
        if stored_prev != prev {
            return Ok(broken(seq, "the link does not follow its predecessor"));
        }
        let hash = link(&keys, &prev, seq, &entry);
        let stored: Vec<u8> = row.get(3);
        if stored != hash {
            return Ok(broken(seq, "the entry or its link was altered"));
        }
        if entry.texts[3] == AuditAction::NodeRestore.name() {
            restores.push(entry.metadata.clone());
        }
        hashes.push(hash);
        prev = hash;
        expected += 1;
    }
    let sealed = expected - 1;
    let checkpoint = match Checkpoint::load(checkpoint, identity)? {
        None => None,
        // Pruned since it was signed: the signed base stands for it.
        Some(cp) if cp.seq < pruned => Some(cp.seq),
        Some(cp) if cp.seq > sealed => {
            return Ok(Verdict::Broken {
                seq: sealed + 1,
                entry_id: None,
                reason: format!(
                    "the tail was truncated: the signed checkpoint is at seq {}, the chain ends at seq {sealed}",
                    cp.seq
                ),
            });
        }
        Some(cp) => {
            // `hashes` holds the links after the base; the checkpoint may
            // name the base itself.
            let at = match usize::try_from(cp.seq - pruned - 1) {
                Ok(i) => hashes.get(i).copied(),
                Err(_) => base.map(|b| b.hash),
            };
            if cp.seq > 0 && at.map(hex::encode) != Some(cp.hash.clone()) {
                return Ok(Verdict::Broken {
                    seq: cp.seq,
                    entry_id: None,
                    reason: "the chain differs from the signed checkpoint".into(),
                });
            }
            Some(cp.seq)
        }
    };
    let unsealed: i64 = client
        .query_one(
            "SELECT count(*) FROM keepd_audit.audit_log e WHERE e.node_id = $1 \
             AND NOT EXISTS (SELECT 1 FROM keepd_audit.audit_chain c WHERE c.entry_id = e.id)",
            &[&identity.node_id().as_str()],
        )
        .await?
        .get(0);
    // The verdict says how many are not yet sealed; the report and
    // `keepd audit verify` show it (a healthy start always has one: its own).
    Ok(Verdict::Intact {
        sealed,
        pruned,
        unsealed,
        checkpoint,
        restores,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::identity::test_identity as identity;

    fn entry(action: &str) -> EntryFields {
        EntryFields {
            id: 7,
            recorded_us: 1_700_000_000_000_000,
            texts: [
                "node".into(),
                "op".into(),
                "keepd_sync".into(),
                action.into(),
                "keepd.sync_logs".into(),
            ],
            rows_affected: 3,
            duration_us: 1200,
            source_component: "api".into(),
            metadata: "{}".into(),
        }
    }

    #[test]
    fn every_field_and_the_predecessor_change_the_link() {
        let (_d, id) = identity();
        let keys = AuditKeys::new(&id);
        let base = link(&keys, &[0; 32], 1, &entry("INSERT"));
        assert_ne!(base, link(&keys, &[0; 32], 1, &entry("DELETE")));
        assert_ne!(base, link(&keys, &[1; 32], 1, &entry("INSERT")));
        assert_ne!(base, link(&keys, &[0; 32], 2, &entry("INSERT")));
        let mut e = entry("INSERT");
        e.rows_affected = 4;
        assert_ne!(base, link(&keys, &[0; 32], 1, &e));
        // Field boundaries are unambiguous.
        let mut a = entry("INSERT");
        a.texts[0] = "no".into();
        a.texts[1] = "deop".into();
        assert_ne!(base, link(&keys, &[0; 32], 1, &a));
    }

    #[test]
    fn links_are_keyed_by_the_node() {
        let (_a, alice) = identity();
        let (_b, bob) = identity();
        let e = entry("INSERT");
        assert_ne!(
            link(&AuditKeys::new(&alice), &[0; 32], 1, &e),
            link(&AuditKeys::new(&bob), &[0; 32], 1, &e)
        );
    }

    #[test]
    fn identifiers_are_stable_keyed_and_opaque() {
        let keys = AuditIdentifiers::new(&ClusterKey::generate().unwrap());
        let a = keys.identifier("email", "alice@example.com");
        assert_eq!(a, keys.identifier("email", "alice@example.com"));
        assert_ne!(a, keys.identifier("ip", "alice@example.com"));
        assert!(!a.contains("alice"));
        assert_eq!(a.len(), 32);
    }

    #[test]
    fn checkpoints_verify_and_detect_edits() {
        let (dir, id) = identity();
        let path = dir.path().join("audit.checkpoint");
        assert_eq!(Checkpoint::load(&path, &id).unwrap(), None);
        let cp = Checkpoint::sign(&id, 42, &[9; 32]);
        cp.save(&path).unwrap();
        assert_eq!(Checkpoint::load(&path, &id).unwrap(), Some(cp.clone()));
        let edited = serde_json::to_string(&Checkpoint { seq: 41, ..cp }).unwrap();
        std::fs::write(&path, edited).unwrap();
        let err = Checkpoint::load(&path, &id).unwrap_err();
        assert!(err.to_string().contains("does not verify"), "{err}");
    }
}
