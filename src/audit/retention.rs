//! Audit retention (`audit.retention`): a node's entries older than the
//! retention are written to a signed export file, then pruned from its
//! chain, oldest first, never the head.
//!
//! The chain then starts at a base, the last pruned link, which the node
//! signs with its identity key (`keepd_audit.audit_base`): `verify` starts
//! from it, so a pruned chain still verifies, and whoever deletes more of
//! the chain cannot move the base along. An export holds every field of
//! its entries with their links; `keepd audit verify --export FILE`
//! recomputes them from the base they continued and checks the node's
//! signature, so exports and the chain in the database form one record.
//!
//! The tables refuse deletes from anyone (their triggers); the superuser
//! prunes with `session_replication_role = replica` for that transaction
//! alone, which only a superuser may set, under the sealer's lock.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::{
    AuditAction, AuditError, AuditKeys, ENTRY_COLUMNS, EntryFields, INSERT_ENTRY, SEAL_LOCK, link,
    sign, signed_by,
};
use crate::config::{Config, Layout};
use crate::fsutil;
use crate::identity::NodeIdentity;
use crate::postgres::SUPERUSER;
use crate::postgres::describe_error;
use crate::postgres::tls::Endpoint;
use crate::shutdown::Shutdown;

const BASE_FORMAT: &str = "keepd-audit-base-v1";
const EXPORT_FORMAT: &str = "keepd-audit-export-v1";
/// Entries per pass (and per export file): a bounded transaction.
const PRUNE_BATCH: i64 = 10_000;

/// The base of this node's chain: (seq, hash, signed_at, signature).
pub(super) const BASE: &str =
    "SELECT seq, hash, signed_at, signature FROM keepd_audit.audit_base WHERE node_id = $1";

/// Where a pruned chain continues from: the last pruned link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Base {
    pub seq: i64,
    pub hash: [u8; 32],
}

impl Base {
    fn message(node: &str, seq: i64, hash: &[u8; 32], signed_at: i64) -> String {
        format!(
            "{BASE_FORMAT}|{node}|{seq}|{}|{signed_at}",
            hex::encode(hash)
        )
    }

    /// Reads a base row (`BASE`) and checks the node's signature over it.
    pub(super) fn from_row(
        row: &tokio_postgres::Row,
        identity: &NodeIdentity,
    ) -> Result<Base, String> {
        let seq: i64 = row.get(0);
        let hash: [u8; 32] = row
            .get::<_, Vec<u8>>(1)
            .try_into()
            .map_err(|_| "its hash is not 32 bytes".to_string())?;
        let signed_at: i64 = row.get(2);
        let message = Base::message(identity.node_id().as_str(), seq, &hash, signed_at);
        if signed_by(identity, &message, row.get(3)) != Some(true) {
            return Err("its signature does not verify with this node's key".into());
        }
        Ok(Base { seq, hash })
    }
}

/// An export file's first line: what it holds, signed.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ExportHeader {
    format: String,
    node: String,
    from_seq: i64,
    to_seq: i64,
    /// The link the first entry continues (zeros: the chain's start).
    prev: String,
    last: String,
    entries: u64,
    /// SHA-256 of every line after this one, newlines included.
    body_sha256: String,
    signed_at: i64,
    signature: String,
}

impl ExportHeader {
    fn message(&self) -> String {
        format!(
            "{EXPORT_FORMAT}|{}|{}|{}|{}|{}|{}|{}|{}",
            self.node,
            self.from_seq,
            self.to_seq,
            self.prev,
            self.last,
            self.entries,
            self.body_sha256,
            self.signed_at
        )
    }
}

/// One exported entry: every field its link covers, exactly as sealed
/// (`metadata` as the text that was hashed).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ExportEntry {
    seq: i64,
    id: i64,
    recorded_at_us: i64,
    node: String,
    operation: String,
    role: String,
    action: String,
    table: String,
    rows: i64,
    duration_us: i64,
    source: String,
    metadata: String,
    hash: String,
}

impl ExportEntry {
    fn of(seq: i64, entry: &EntryFields, hash: &[u8; 32]) -> ExportEntry {
        let [node, operation, role, action, table] = entry.texts.clone();
        ExportEntry {
            seq,
            id: entry.id,
            recorded_at_us: entry.recorded_us,
            node,
            operation,
            role,
            action,
            table,
            rows: entry.rows_affected,
            duration_us: entry.duration_us,
            source: entry.source_component.clone(),
            metadata: entry.metadata.clone(),
            hash: hex::encode(hash),
        }
    }

    fn fields(self) -> EntryFields {
        EntryFields {
            id: self.id,
            recorded_us: self.recorded_at_us,
            texts: [
                self.node,
                self.operation,
                self.role,
                self.action,
                self.table,
            ],
            rows_affected: self.rows,
            duration_us: self.duration_us,
            source_component: self.source,
            metadata: self.metadata,
        }
    }
}

/// A checked export (`keepd audit verify --export`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportVerdict {
    pub node: String,
    pub from_seq: i64,
    pub to_seq: i64,
    pub prev: String,
    pub last: String,
}

impl std::fmt::Display for ExportVerdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "audit export intact: seq {} to {} of node {}, signed by it; continues link {}… and ends at link {}…",
            self.from_seq,
            self.to_seq,
            self.node,
            &self.prev[..16],
            &self.last[..16]
        )
    }
}

/// Checks an export file: the node's signature over its header and body,
/// and every link recomputed from the one it continues.
pub fn verify_export(path: &Path, identity: &NodeIdentity) -> Result<ExportVerdict, AuditError> {
    let bad = |reason: String| AuditError::BadExport {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let (first, body) = text
        .split_once('\n')
        .ok_or_else(|| bad("it has no header line".into()))?;
    let header: ExportHeader = serde_json::from_str(first)
        .map_err(|e| bad(format!("the header is not an audit export's: {e}")))?;
    if header.format != EXPORT_FORMAT {
        return Err(bad(format!("unknown format {:?}", header.format)));
    }
    let node = identity.node_id().as_str();
    if header.node != node {
        return Err(bad(format!(
            "node {} exported it and this is node {node}: verify it on that node (its identity made the links)",
            header.node
        )));
    }
    if signed_by(identity, &header.message(), &header.signature) != Some(true) {
        return Err(bad(
            "the signature does not verify with this node's key".into()
        ));
    }
    if hex::encode(Sha256::digest(body.as_bytes())) != header.body_sha256 {
        return Err(bad("the entries were changed after signing".into()));
    }
    let keys = AuditKeys::new(identity);
    let mut prev: [u8; 32] = hex::decode(&header.prev)
        .ok()
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| bad("the header's prev is not a link".into()))?;
    let mut seq = header.from_seq;
    let mut count = 0u64;
    for (n, line) in body.lines().enumerate() {
        let entry: ExportEntry = serde_json::from_str(line)
            .map_err(|e| bad(format!("line {}: not an exported entry: {e}", n + 2)))?;
        if entry.seq != seq {
            return Err(bad(format!(
                "line {}: seq {} where {seq} follows",
                n + 2,
                entry.seq
            )));
        }
        let stored = entry.hash.clone();
        let hash = link(&keys, &prev, seq, &entry.fields());
        if hex::encode(hash) != stored {
            return Err(bad(format!(
                "line {}: the entry or its link was altered",
                n + 2
            )));
        }
        prev = hash;
        seq += 1;
        count += 1;
    }
    if count != header.entries || seq - 1 != header.to_seq || hex::encode(prev) != header.last {
        return Err(bad(format!(
            "it holds {count} entries ending at seq {}, its header says {} ending at seq {}",
            seq - 1,
            header.entries,
            header.to_seq
        )));
    }
    Ok(ExportVerdict {
        node: header.node,
        from_seq: header.from_seq,
        to_seq: header.to_seq,
        prev: header.prev,
        last: header.last,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error("audit retention query failed: {}", describe_error(.0))]
    Sql(#[from] tokio_postgres::Error),
    #[error("the chain's base is not this node's: {0}; run `keepd audit verify`")]
    BadBase(String),
    #[error(
        "the chain is broken at seq {0}: nothing is pruned while it is; run `keepd audit verify`"
    )]
    Broken(i64),
    #[error("cannot write the audit export {path}: {source}")]
    Export {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One pass's work: the entries exported and pruned.
#[derive(Debug, PartialEq, Eq)]
struct Pruned {
    from_seq: i64,
    to_seq: i64,
    file: PathBuf,
}

/// Prunes this node's chain past `audit.retention`, exporting first.
pub struct Retention {
    superuser: Endpoint,
    identity: Arc<NodeIdentity>,
    keep: Duration,
    export_dir: PathBuf,
}

impl Retention {
    /// None when `audit.retention` is unset (the chain is kept whole).
    pub fn new(
        config: &Config,
        identity: Arc<NodeIdentity>,
        superuser: Endpoint,
    ) -> Option<Retention> {
        let keep = config.audit.retention?.get();
        Some(Retention {
            superuser,
            identity,
            keep,
            export_dir: config
                .audit
                .export_dir
                .clone()
                .unwrap_or_else(|| Layout::of(config).audit_exports()),
        })
    }

    /// A pass every quarter of the retention, between a second and an
    /// hour; each pass prunes until nothing old is left.
    pub async fn run(self, mut stop: Shutdown) {
        let every = (self.keep / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600));
        let mut failing = false;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.requested() => return,
            }
            loop {
                match self.pass().await {
                    Ok(Some(pruned)) => {
                        failing = false;
                        info!(
                            from_seq = pruned.from_seq,
                            to_seq = pruned.to_seq,
                            export = %pruned.file.display(),
                            "audit retention: entries exported and pruned"
                        );
                    }
                    Ok(None) => {
                        failing = false;
                        break;
                    }
                    Err(e) => {
                        // Once per outage.
                        if !failing {
                            warn!(error = %e, "audit retention: nothing pruned; retrying");
                            failing = true;
                        }
                        break;
                    }
                }
            }
        }
    }

    async fn pass(&self) -> Result<Option<Pruned>, RetentionError> {
        let node = self.identity.node_id().as_str();
        let mut client = self.superuser.connect().await?;
        let tx = client.transaction().await?;
        tx.query_one(
            "SELECT pg_advisory_xact_lock($1::bigint + hashtext($2))",
            &[&SEAL_LOCK, &node],
        )
        .await?;
        let base = match tx.query_opt(BASE, &[&node]).await? {
            Some(row) => {
                Some(Base::from_row(&row, &self.identity).map_err(RetentionError::BadBase)?)
            }
            None => None,
        };
        let (mut seq, mut prev) = base.map_or((0, [0; 32]), |b| (b.seq, b.hash));
        let start_prev = prev;
        // Oldest first, never the head (the sealer continues from it);
        // stopped at the first entry still within the retention.
        let rows = tx
            .query(
                &format!(
                    "SELECT c.seq, {ENTRY_COLUMNS}, c.hash, e.recorded_at < now() - make_interval(secs => $3) \
                     FROM keepd_audit.audit_chain c JOIN keepd_audit.audit_log e ON e.id = c.entry_id \
                     WHERE c.node_id = $1 AND c.seq > $2 \
                       AND c.seq < (SELECT max(seq) FROM keepd_audit.audit_chain WHERE node_id = $1) \
                     ORDER BY c.seq LIMIT $4"
                ),
                &[&node, &seq, &self.keep.as_secs_f64(), &PRUNE_BATCH],
            )
            .await?;
        let keys = AuditKeys::new(&self.identity);
        let (mut body, mut ids) = (String::new(), Vec::new());
        for row in &rows {
            if !row.get::<_, bool>(13) {
                break;
            }
            let at: i64 = row.get(0);
            let entry = EntryFields::from_row(row, 1).expect("entry id is never null");
            let hash = link(&keys, &prev, at, &entry);
            if at != seq + 1 || row.get::<_, Vec<u8>>(12) != hash {
                return Err(RetentionError::Broken(seq + 1));
            }
            let line = serde_json::to_string(&ExportEntry::of(at, &entry, &hash))
                .expect("an entry serialises");
            body.push_str(&line);
            body.push('\n');
            ids.push(entry.id);
            (seq, prev) = (at, hash);
        }
        let Some(first) = ids.first().map(|_| seq - ids.len() as i64 + 1) else {
            return Ok(None);
        };
        let file = Export {
            from_seq: first,
            to_seq: seq,
            prev: start_prev,
            last: prev,
            entries: ids.len(),
            body: &body,
        }
        .write(&self.identity, &self.export_dir)?;
        tx.execute(
            INSERT_ENTRY,
            &[
                &node,
                &SUPERUSER,
                &AuditAction::AuditPrune.name(),
                &AuditAction::AuditPrune.table(),
                &(ids.len() as i64),
                &0i64,
                &"retention",
                &serde_json::json!({
                    "fromSeq": first,
                    "toSeq": seq,
                    "export": file.file_name().map(|n| n.to_string_lossy().into_owned()),
                }),
            ],
        )
        .await?;
        // This transaction alone: the append-only triggers stay for
        // every other session.
        tx.batch_execute("SET LOCAL session_replication_role = replica")
            .await?;
        tx.execute(
            "DELETE FROM keepd_audit.audit_chain WHERE node_id = $1 AND seq BETWEEN $2 AND $3",
            &[&node, &first, &seq],
        )
        .await?;
        tx.execute(
            "DELETE FROM keepd_audit.audit_log WHERE id = ANY($1)",
            &[&ids],
        )
        .await?;
        let signed_at = i64::try_from(crate::clock::unix_now()).unwrap_or(i64::MAX);
        let signature = sign(&self.identity, &Base::message(node, seq, &prev, signed_at));
        tx.execute(
            "INSERT INTO keepd_audit.audit_base (node_id, seq, hash, signed_at, signature) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (node_id) DO UPDATE \
             SET seq = EXCLUDED.seq, hash = EXCLUDED.hash, signed_at = EXCLUDED.signed_at, \
                 signature = EXCLUDED.signature",
            &[&node, &seq, &prev.to_vec(), &signed_at, &signature],
        )
        .await?;
        tx.commit().await?;
        Ok(Some(Pruned {
            from_seq: first,
            to_seq: seq,
            file,
        }))
    }
}

/// What a pass exports: a run of links and the one it continues.
struct Export<'a> {
    from_seq: i64,
    to_seq: i64,
    prev: [u8; 32],
    last: [u8; 32],
    entries: usize,
    body: &'a str,
}

impl Export<'_> {
    /// Writes it, signed, into `dir` (0600, durable) before anything is
    /// pruned.
    fn write(&self, identity: &NodeIdentity, dir: &Path) -> Result<PathBuf, RetentionError> {
        let node = identity.node_id().as_str();
        let file = dir.join(format!(
            "audit-{node}-{:012}-{:012}.jsonl",
            self.from_seq, self.to_seq
        ));
        let failed = |source| RetentionError::Export {
            path: file.clone(),
            source,
        };
        fsutil::ensure_private_dir(dir).map_err(failed)?;
        let mut header = ExportHeader {
            format: EXPORT_FORMAT.into(),
            node: node.into(),
            from_seq: self.from_seq,
            to_seq: self.to_seq,
            prev: hex::encode(self.prev),
            last: hex::encode(self.last),
            entries: self.entries as u64,
            body_sha256: hex::encode(Sha256::digest(self.body.as_bytes())),
            signed_at: i64::try_from(crate::clock::unix_now()).unwrap_or(i64::MAX),
            signature: String::new(),
        };
        header.signature = sign(identity, &header.message());
        let mut text = serde_json::to_string(&header).expect("a header serialises");
        text.push('\n');
        text.push_str(self.body);
        fsutil::write_atomic(&file, text.as_bytes(), None).map_err(failed)?;
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::test_identity as identity;

    fn entry(id: i64) -> EntryFields {
        EntryFields {
            id,
            recorded_us: 1_700_000_000_000_000 + id,
            texts: [
                "node".into(),
                "op".into(),
                "keepd_sync".into(),
                "SYNC_PUSH".into(),
                "keepd.sync_logs".into(),
            ],
            rows_affected: 1,
            duration_us: 10,
            source_component: "api".into(),
            metadata: r#"{"n": 1}"#.into(),
        }
    }

    /// An export of entries 3..=5 continuing `prev`, as a pass writes it.
    fn export(dir: &Path, id: &Arc<NodeIdentity>) -> PathBuf {
        let keys = AuditKeys::new(id);
        let start = [7u8; 32];
        let (mut prev, mut body) = (start, String::new());
        for seq in 3..=5 {
            let hash = link(&keys, &prev, seq, &entry(seq));
            body.push_str(
                &serde_json::to_string(&ExportEntry::of(seq, &entry(seq), &hash)).unwrap(),
            );
            body.push('\n');
            prev = hash;
        }
        Export {
            from_seq: 3,
            to_seq: 5,
            prev: start,
            last: prev,
            entries: 3,
            body: &body,
        }
        .write(id, &dir.join("exports"))
        .unwrap()
    }

    #[test]
    fn an_export_verifies_and_any_change_is_named() {
        let (dir, id) = identity();
        let id = Arc::new(id);
        let file = export(dir.path(), &id);
        let verdict = verify_export(&file, &id).unwrap();
        assert_eq!((verdict.from_seq, verdict.to_seq), (3, 5));
        assert_eq!(verdict.prev, hex::encode([7u8; 32]));

        let text = std::fs::read_to_string(&file).unwrap();
        let edits = [
            (
                text.replacen("SYNC_PUSH", "SYNC_PULL", 1),
                "changed after signing",
            ),
            (
                text.replacen("\"fromSeq\":3", "\"fromSeq\":2", 1),
                "signature",
            ),
            (
                text.lines().take(3).collect::<Vec<_>>().join("\n") + "\n",
                "changed after signing",
            ),
        ];
        for (edited, named) in edits {
            std::fs::write(&file, edited).unwrap();
            let err = verify_export(&file, &id).unwrap_err().to_string();
            assert!(err.contains(named), "{err}");
        }
    }

    #[test]
    fn another_nodes_export_is_refused_by_name() {
        let (dir, id) = identity();
        let file = export(dir.path(), &Arc::new(id));
        let (_other_dir, other) = identity();
        let err = verify_export(&file, &other).unwrap_err().to_string();
        assert!(err.contains("verify it on that node"), "{err}");
    }
}
