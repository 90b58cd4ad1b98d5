//! Brings every configured column under the current field key, in the
//! background and in small batches: values written before encryption was
//! enabled get sealed, values under an older key version re-sealed. Reads
//! go on all along (every known version opens), and each row is replaced
//! only if it still holds what was read (compare and set), so a
//! concurrent write is never overwritten.
//!
//! It runs as the superuser, because row-level security would otherwise
//! show it one tenant at a time.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;
use tracing::{error, info, warn};

use uuid::Uuid;

use crate::field_crypto::{Column, Encryptable, FieldCipher};
use crate::postgres::tls::Endpoint;
use crate::shutdown::Shutdown;

const BATCH: i64 = 200;

pub struct Reencryption {
    pub fields: Arc<FieldCipher>,
    pub superuser: Endpoint,
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
    pub async fn run(self, stop: Shutdown) {
        let columns: Vec<_> = self.fields.plan().columns().collect();
        if columns.is_empty() {
            return;
        }
        let client = match self.superuser.connect().await {
            Ok(client) => client,
            Err(e) => {
                error!(error = %e, "field re-encryption cannot connect; values stay as they are");
                return;
            }
        };
        for encryptable in columns {
            let column = encryptable.column().short_name();
            let mut total = Pass::default();
            loop {
                if stop.is_requested() {
                    return;
                }
                match self.batch(&client, encryptable, total.last_id).await {
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
                        error!(column, rewritten = total.rewritten, error = %e, "field re-encryption stopped; it resumes at the next start");
                        break;
                    }
                }
            }
            // Every row was looked at once (in id order), so this is exact.
            if total.unreadable == 0 && total.refused == 0 {
                info!(
                    column,
                    rewritten = total.rewritten,
                    version = self.fields.plan().current_version(),
                    "field re-encryption: column current"
                );
            } else {
                warn!(
                    column,
                    rewritten = total.rewritten,
                    unreadable = total.unreadable,
                    refused = total.refused,
                    first_refusal = total.first_refusal.as_deref().unwrap_or(""),
                    version = self.fields.plan().current_version(),
                    "field re-encryption: column not current; these values stay as they are"
                );
            }
        }
    }

    /// Re-seals up to one batch of values not under the current key, in id
    /// order after `after`; values it cannot re-seal are counted, not
    /// retried, so one bad row never stops the rest.
    async fn batch(
        &self,
        client: &Client,
        encryptable: Encryptable,
        after: Option<Uuid>,
    ) -> Result<Pass, tokio_postgres::Error> {
        let Column { table, name } = encryptable.column();
        let rows = client
            .query(
                &format!(
                    "SELECT id, {name} FROM {table} WHERE {} AND ($2::uuid IS NULL OR id > $2) \
                     ORDER BY id LIMIT $1",
                    self.fields.plan().stale_values(encryptable)
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
