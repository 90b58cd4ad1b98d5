//! What a start writes into the audit trail: the node's start, and a
//! restore `keepd restore` made since the last one.

use std::path::Path;
use std::time::Duration;

use tracing::info;

use super::DaemonError;
use super::rotator::RotationError;
use crate::audit;
use crate::config::Layout;
use crate::postgres::pool::RoleAwarePool;

/// Records this start, and a pending restore note, each in its own entry.
pub(super) async fn start(
    pool: &RoleAwarePool,
    node_id: &str,
    layout: &Layout,
) -> Result<(), DaemonError> {
    let started = audit::AuditEntry {
        action: audit::AuditAction::NodeStart,
        rows_affected: 0,
        duration: Duration::ZERO,
        source_component: "daemon",
        metadata: serde_json::json!({"version": env!("CARGO_PKG_VERSION")}),
    };
    audit::record_alone(pool, node_id, &started)
        .await
        .map_err(RotationError::from)?;
    record_restore(pool, node_id, &layout.restore_note()).await
}

/// A restore `keepd restore` made since the last start goes into the audit
/// trail (the chain continues from the restored point), once.
async fn record_restore(
    pool: &RoleAwarePool,
    node_id: &str,
    note: &Path,
) -> Result<(), DaemonError> {
    let Ok(text) = std::fs::read_to_string(note) else {
        return Ok(());
    };
    let metadata = serde_json::from_str(&text)
        .unwrap_or_else(|_| serde_json::json!({"note": "unreadable", "text": text}));
    let entry = audit::AuditEntry {
        action: audit::AuditAction::NodeRestore,
        rows_affected: 0,
        duration: Duration::ZERO,
        source_component: "restore",
        metadata,
    };
    audit::record_alone(pool, node_id, &entry)
        .await
        .map_err(RotationError::from)?;
    std::fs::remove_file(note).map_err(|source| DaemonError::Directory {
        path: note.to_owned(),
        source,
    })?;
    info!(metadata = %entry.metadata, "recorded the restore from a backup in the audit trail");
    Ok(())
}
