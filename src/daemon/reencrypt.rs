//! The field keys' life on this node: every `RotationPolicy::check_every`
//! it counts its seals into `keepd.field_keys`, learns the version the
//! cluster seals under, makes the next one when the rule says so (age or
//! uses; one node wins) and brings every sealed column under the current
//! version, in the background and in small batches: values written before
//! encryption was enabled get sealed, values under an older version
//! re-sealed. Reads go on all along (every version opens), and each row is
//! replaced only if it still holds what was read (compare and set), so a
//! concurrent write is never overwritten. Once a pass finds nothing left
//! under older versions, they are retired.
//!
//! A rotation waits until the previous one's values have moved, so a store
//! larger than `rotate_after_uses` is not re-encrypted in an endless loop.
//!
//! It runs as the superuser, because row-level security would otherwise
//! show it one tenant at a time.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;
use tracing::{error, info, warn};

use uuid::Uuid;

use crate::audit::{AuditAction, AuditEntry};
use crate::cluster::heartbeat;
use crate::field_crypto::{Column, Encryptable, FieldCipher, FieldPlan};
use crate::field_keys::{self, Reason, RotationPolicy};
use crate::postgres::pool::RoleAwarePool;
use crate::postgres::tls::Endpoint;
use crate::shutdown::Shutdown;

const BATCH: i64 = 200;

pub struct Reencryption {
    pub fields: Arc<FieldCipher>,
    pub policy: RotationPolicy,
    pub superuser: Endpoint,
    /// For the audit entries of rotations and retirements.
    pub pool: RoleAwarePool,
    pub node_id: String,
}

/// How long a new version must have existed before a pass may retire the
/// older ones: every node has learnt of it (they look every
/// `check_every`) and sealed its last value under the old one.
fn settled(policy: &RotationPolicy) -> Duration {
    policy.check_every() * 3
}

/// What a pass over a column did.
#[derive(Debug, Default)]
struct Pass {
    /// Rows looked at in this batch (0: the column is done).
    seen: u64,
    rewritten: u64,
    /// Under a key version this node does not have.
    unreadable: u64,
    /// Rows the server refused to take in their new form (a constraint).
    refused: u64,
    first_refusal: Option<String>,
    last_id: Option<Uuid>,
}

impl Pass {
    fn add(&mut self, batch: Pass) {
        self.rewritten += batch.rewritten;
        self.unreadable += batch.unreadable;
        self.refused += batch.refused;
        if self.first_refusal.is_none() {
            self.first_refusal = batch.first_refusal;
        }
        self.last_id = batch.last_id;
    }
}

impl Reencryption {
    pub async fn run(self, mut stop: Shutdown) {
        let every = self.policy.check_every();
        let mut client = None;
        // The version the last complete pass brought every value under,
        // and that version's age when the pass began.
        let mut moved: Option<(u32, u64)> = None;
        loop {
            if client.as_ref().is_none_or(Client::is_closed) {
                client = match self.superuser.connect().await {
                    Ok(c) => Some(c),
                    Err(e) => {
                        warn!(error = %e, "field keys: cannot connect; tried again in {}s", every.as_secs());
                        None
                    }
                };
            }
            if let Some(c) = &mut client
                && let Err(e) = self.tend(c, &mut moved, &stop).await
            {
                warn!(error = %crate::postgres::describe_error(&e), "field keys: this round failed; tried again in {}s", every.as_secs());
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.requested() => return,
            }
        }
    }

    /// One round: count, learn, re-encrypt, retire, rotate.
    async fn tend(
        &self,
        client: &mut Client,
        moved: &mut Option<(u32, u64)>,
        stop: &Shutdown,
    ) -> Result<(), tokio_postgres::Error> {
        let ours = self.fields.current_version();
        let seals = self.fields.take_seals();
        if seals > 0
            && let Err(e) = field_keys::count_uses(client, ours, seals).await
        {
            // Counted again next round rather than lost.
            self.fields.add_seals(seals);
            return Err(e);
        }
        let versions = field_keys::versions(client).await?;
        let Some(current) = versions.last().cloned() else {
            return Ok(());
        };
        // A version of a root this node does not hold yet: `daemon::root`
        // adopts it within a heartbeat.
        let root = self.fields.generation();
        if current.generation > root {
            return Ok(());
        }
        if current.version != ours {
            self.fields.seal_under(current.version);
            info!(
                version = current.version,
                previous = ours,
                "field keys: sealing under the cluster's new version"
            );
        }
        let settled = settled(&self.policy).as_secs();
        let unretired = versions
            .iter()
            .any(|v| v.version < current.version && v.retired_at.is_none());
        let needed = match *moved {
            Some((version, _)) if version != current.version => true,
            None => true,
            // A pass that began before every node could have learnt of
            // the version may have missed their last old values: once
            // more when it has settled, if anything is left to retire.
            Some((_, began_at_age)) => {
                began_at_age < settled && current.age_seconds >= settled && unretired
            }
        };
        if needed {
            let began_at_age = current.age_seconds;
            if !self.pass(client, current.version, stop).await {
                return Ok(());
            }
            *moved = Some((current.version, began_at_age));
            if began_at_age >= settled && unretired {
                self.retire(client, current.version).await?;
            }
        }
        // The cluster key rotated and every live node holds the new root:
        // values move to a version of it (the old ones were carried).
        // Meanwhile no version is made: one made under the old root would
        // not have been carried.
        let reason = match root > current.generation {
            true => {
                (heartbeat::lowest_live_generation(client).await? >= root).then_some(Reason::Root)
            }
            false => self.policy.due(&current),
        };
        if let Some(reason) = reason
            && moved.is_some_and(|(version, _)| version == current.version)
            && let Some(made) = field_keys::rotate(client, current.version, reason, root).await?
        {
            self.fields.seal_under(made);
            info!(
                version = made,
                previous = current.version,
                reason = reason.as_str(),
                uses = current.uses,
                age_seconds = current.age_seconds,
                "field keys: rotated"
            );
            self.audit(
                AuditAction::FieldKeyRotation,
                serde_json::json!({"version": made, "previous": current.version, "reason": reason.as_str()}),
            )
            .await;
        }
        Ok(())
    }

    /// Retires the versions below `current` that are not yet.
    async fn retire(&self, client: &Client, current: u32) -> Result<(), tokio_postgres::Error> {
        let retired = field_keys::retire_below(client, current).await?;
        if !retired.is_empty() {
            info!(versions = ?retired, current, "field keys: retired (no value uses them)");
            self.audit(
                AuditAction::FieldKeyRetire,
                serde_json::json!({"versions": retired, "current": current}),
            )
            .await;
        }
        Ok(())
    }

    async fn audit(&self, action: AuditAction, metadata: serde_json::Value) {
        let entry = AuditEntry {
            action,
            rows_affected: 1,
            duration: Duration::ZERO,
            source_component: "field_keys",
            metadata,
        };
        if let Err(e) = crate::audit::record_alone(&self.pool, &self.node_id, &entry).await {
            error!(action = action.name(), error = %e, "field keys: cannot record the audit entry");
        }
    }

    /// Brings every sealed column under `current`; true when every value
    /// is now under it (nothing unreadable, nothing refused, not stopped).
    async fn pass(&self, client: &Client, current: u32, stop: &Shutdown) -> bool {
        let mut clean = true;
        for encryptable in self.fields.plan().columns() {
            let column = encryptable.column().short_name();
            let mut total = Pass::default();
            loop {
                if stop.is_requested() {
                    return false;
                }
                match self
                    .batch(client, encryptable, current, total.last_id)
                    .await
                {
                    Ok(batch) if batch.seen == 0 => break,
                    Ok(batch) => {
                        let rewrote = batch.rewritten > 0;
                        total.add(batch);
                        if rewrote {
                            info!(
                                column,
                                rewritten = total.rewritten,
                                "field re-encryption: progress"
                            );
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => {
                        error!(column, rewritten = total.rewritten, error = %e, "field re-encryption stopped; it resumes at the next round");
                        return false;
                    }
                }
            }
            // Every row was looked at once (in id order), so this is exact.
            if total.unreadable == 0 && total.refused == 0 {
                if total.rewritten > 0 {
                    info!(
                        column,
                        rewritten = total.rewritten,
                        version = current,
                        "field re-encryption: column current"
                    );
                }
            } else {
                clean = false;
                warn!(
                    column,
                    rewritten = total.rewritten,
                    unreadable = total.unreadable,
                    refused = total.refused,
                    first_refusal = total.first_refusal.as_deref().unwrap_or(""),
                    version = current,
                    "field re-encryption: column not current; these values stay as they are"
                );
            }
        }
        clean
    }

    /// Re-seals up to one batch of values not under the current key, in id
    /// order after `after`; values it cannot re-seal are counted, not
    /// retried, so one bad row never stops the rest.
    async fn batch(
        &self,
        client: &Client,
        encryptable: Encryptable,
        current: u32,
        after: Option<Uuid>,
    ) -> Result<Pass, tokio_postgres::Error> {
        let Column { table, name } = encryptable.column();
        let rows = client
            .query(
                &format!(
                    "SELECT id, {name} FROM {table} WHERE {} AND ($2::uuid IS NULL OR id > $2) \
                     ORDER BY id LIMIT $1",
                    FieldPlan::stale_values(encryptable, current)
                ),
                &[&BATCH, &after],
            )
            .await?;
        let mut pass = Pass {
            seen: rows.len() as u64,
            ..Pass::default()
        };
        let update = format!("UPDATE {table} SET {name} = $1 WHERE id = $2 AND {name} = $3");
        for row in rows {
            let id: Uuid = row.get(0);
            pass.last_id = Some(id);
            let f = &self.fields;
            // Compare and set: replaced only if it still holds what was read.
            let written = match encryptable {
                Encryptable::Text(column) => {
                    let old: String = row.get(1);
                    match f.open_text(column, old.clone()) {
                        Ok(plain) => {
                            let new = f.seal_text(column, plain);
                            Some(client.execute(&update, &[&new, &id, &old]).await)
                        }
                        Err(_) => None,
                    }
                }
                Encryptable::Bytes(column) => {
                    let old: Vec<u8> = row.get(1);
                    match f.open_bytes(column, old.clone()) {
                        Ok(plain) => {
                            let new = f.seal_bytes(column, plain);
                            Some(client.execute(&update, &[&new, &id, &old]).await)
                        }
                        Err(_) => None,
                    }
                }
            };
            match written {
                None => pass.unreadable += 1,
                Some(Ok(rows)) => pass.rewritten += rows,
                // The server refused this row (a constraint): count it and
                // go on; a lost connection ends the pass.
                Some(Err(e)) if e.as_db_error().is_some() => {
                    pass.refused += 1;
                    if pass.first_refusal.is_none() {
                        pass.first_refusal = Some(crate::postgres::describe_error(&e));
                    }
                }
                Some(Err(e)) => return Err(e),
            }
        }
        Ok(pass)
    }
}
