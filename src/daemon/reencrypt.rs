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

use crate::fields::FieldCipher;
use crate::postgres::tls::Endpoint;
use crate::shutdown::Shutdown;

const BATCH: i64 = 200;

pub struct Reencryption {
    pub fields: Arc<FieldCipher>,
    pub superuser: Endpoint,
}

/// What one pass over a column did.
#[derive(Debug, Default)]
struct Pass {
    rewritten: u64,
    /// Under a key version this node does not have.
    unreadable: u64,
}

impl Reencryption {
    pub async fn run(self, stop: Shutdown) {
        let columns: Vec<_> = self.fields.columns().collect();
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
        for (table, column) in columns {
            let mut total = Pass::default();
            loop {
                if stop.is_requested() {
                    return;
                }
                match self.batch(&client, table, column).await {
                    Ok(pass) if pass.rewritten == 0 => {
                        total.unreadable = pass.unreadable;
                        break;
                    }
                    Ok(pass) => {
                        total.rewritten += pass.rewritten;
                        info!(
                            table,
                            column,
                            rewritten = total.rewritten,
                            "field re-encryption: progress"
                        );
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => {
                        error!(table, column, error = %e, "field re-encryption failed; retrying at the next start");
                        break;
                    }
                }
            }
            if total.unreadable > 0 {
                warn!(
                    table,
                    column,
                    values = total.unreadable,
                    "values under a field key version this node does not have"
                );
            }
            info!(
                table,
                column,
                rewritten = total.rewritten,
                version = self.fields.current_version(),
                "field re-encryption: column current"
            );
        }
    }

    /// Re-seals up to one batch of values not under the current key.
    async fn batch(
        &self,
        client: &Client,
        table: &str,
        column: &str,
    ) -> Result<Pass, tokio_postgres::Error> {
        let text = crate::fields::is_text(table, column);
        let rows = client
            .query(
                &format!(
                    "SELECT id, {column} FROM {table} WHERE {} ORDER BY id LIMIT $1",
                    self.fields.stale_values(table, column)
                ),
                &[&BATCH],
            )
            .await?;
        let mut pass = Pass::default();
        let update = format!("UPDATE {table} SET {column} = $1 WHERE id = $2 AND {column} = $3");
        for row in rows {
            let id: uuid::Uuid = row.get(0);
            let f = &self.fields;
            // Compare and set: replaced only if it still holds what was read.
            let result = if text {
                let old: String = row.get(1);
                match f.open_text(table, column, old.clone()) {
                    Ok(plain) => {
                        let new = f.seal_text(table, column, plain);
                        Some(client.execute(&update, &[&new, &id, &old]).await?)
                    }
                    Err(_) => None,
                }
            } else {
                let old: Vec<u8> = row.get(1);
                match f.open_bytes(table, column, old.clone()) {
                    Ok(plain) => {
                        let new = f.seal_bytes(table, column, plain);
                        Some(client.execute(&update, &[&new, &id, &old]).await?)
                    }
                    Err(_) => None,
                }
            };
            match result {
                Some(rows) => pass.rewritten += rows,
                None => pass.unreadable += 1,
            }
        }
        Ok(pass)
    }
}
