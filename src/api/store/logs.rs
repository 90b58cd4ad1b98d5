//! `keepd.sync_logs` and `keepd.push_requests` (`keepd_sync` writes,
//! `keepd_query` reads).

use std::time::{Duration, SystemTime};

use uuid::Uuid;

use super::StoreError;
use super::vaults::Reserved;
use crate::field_crypto::{FieldCipher, column};
use crate::postgres::pool::ScopedTransaction;

/// Stores a whole batch in one statement: entry k (1-based) of the arrays
/// gets sequence `$3 + k`.
const INSERT_LOGS: &str = "INSERT INTO keepd.sync_logs \
     (id, vault, user_id, sequence, encrypted_data, nonce, haex_timestamp, size_bytes) \
     SELECT e.id, $1, $2, $3 + e.ord, e.data, e.nonce, e.ts, e.size \
     FROM unnest($4::uuid[], $5::text[], $6::text[], $7::text[], $8::int8[]) \
          WITH ORDINALITY AS e(id, data, nonce, ts, size, ord) \
     RETURNING id, sequence, haex_timestamp, created_at";

/// Up to `$4` entries after sequence `$2` whose stored sizes add up to at
/// most `$5` bytes (the first always), out of the `$3` (= `$4` + 1) the
/// index yields; `available` tells the caller whether more remain. Only
/// what fits the budget leaves the server.
const PULL_LOGS: &str = "SELECT id, encrypted_data, nonce, haex_timestamp, sequence, created_at, \
       available \
     FROM (SELECT p.*, row_number() OVER w AS n, count(*) OVER () AS available, \
             sum(octet_length(p.encrypted_data) + octet_length(p.nonce) \
                 + octet_length(p.haex_timestamp)) OVER w AS running \
           FROM (SELECT id, encrypted_data, nonce, haex_timestamp, sequence, created_at \
                 FROM keepd.sync_logs WHERE vault = $1 AND sequence > $2 \
                 ORDER BY sequence LIMIT $3) p \
           WINDOW w AS (ORDER BY p.sequence)) t \
     WHERE n <= $4 AND (n = 1 OR running <= $5) \
     ORDER BY sequence";

/// A record older than `api.idempotency_ttl` (`$3`, seconds) has expired:
/// the key may name a new request.
const STORED_PUSH: &str = "SELECT response, request_hash FROM keepd.push_requests \
     WHERE user_id = $1 AND idempotency_key = $2 \
       AND created_at > now() - make_interval(secs => $3)";

/// Remembers a push's response; no row when a concurrent retry won. An
/// expired record under the same key is replaced.
const SAVE_PUSH: &str = "INSERT INTO keepd.push_requests \
     (user_id, idempotency_key, response, request_hash) VALUES ($1, $2, $3, $4) \
     ON CONFLICT (user_id, idempotency_key) DO UPDATE \
       SET response = excluded.response, request_hash = excluded.request_hash, \
           created_at = now() \
       WHERE keepd.push_requests.created_at <= now() - make_interval(secs => $5)";

/// One entry as the client sent it.
pub struct NewEntry {
    pub encrypted_data: String,
    pub nonce: String,
    pub haex_timestamp: String,
}

impl NewEntry {
    /// What the entry counts against `api.quotas.storage_bytes`: its text
    /// as sent, before any sealing at rest.
    pub fn size_bytes(&self) -> i64 {
        (self.encrypted_data.len() + self.nonce.len() + self.haex_timestamp.len()) as i64
    }
}

/// What storing an entry gave it.
pub struct Appended {
    pub id: Uuid,
    pub sequence: i64,
    pub haex_timestamp: String,
    pub created_at: SystemTime,
}

pub struct Entry {
    pub id: Uuid,
    pub encrypted_data: String,
    pub nonce: String,
    pub haex_timestamp: String,
    pub sequence: i64,
    pub created_at: SystemTime,
}

/// Stores `entries` under the reserved sequence numbers, in one
/// statement; the stored entries in sequence order.
pub async fn append(
    tx: &ScopedTransaction,
    fields: &FieldCipher,
    user: Uuid,
    reserved: &Reserved,
    entries: Vec<NewEntry>,
) -> Result<Vec<Appended>, StoreError> {
    let count = entries.len();
    let mut ids = Vec::with_capacity(count);
    let mut data = Vec::with_capacity(count);
    let mut nonces = Vec::with_capacity(count);
    let mut stamps = Vec::with_capacity(count);
    let mut sizes = Vec::with_capacity(count);
    for entry in entries {
        ids.push(Uuid::new_v4());
        sizes.push(entry.size_bytes());
        data.push(fields.seal_text(column::LOG_DATA, entry.encrypted_data));
        nonces.push(fields.seal_text(column::LOG_NONCE, entry.nonce));
        stamps.push(fields.seal_text(column::LOG_TIMESTAMP, entry.haex_timestamp));
    }
    let base = reserved.first - 1;
    let rows = tx
        .query(
            INSERT_LOGS,
            &[
                &reserved.vault,
                &user,
                &base,
                &ids,
                &data,
                &nonces,
                &stamps,
                &sizes,
            ],
        )
        .await?;
    let mut appended = rows
        .iter()
        .map(|row| {
            Ok(Appended {
                id: row.get(0),
                sequence: row.get(1),
                haex_timestamp: fields.open_text(column::LOG_TIMESTAMP, row.get(2))?,
                created_at: row.get(3),
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    appended.sort_by_key(|entry| entry.sequence);
    Ok(appended)
}

/// Entries after `after`, in sequence order.
pub struct Page {
    pub entries: Vec<Entry>,
    /// More entries follow (the limit or the byte budget was reached).
    pub has_more: bool,
}

/// Up to `limit` entries after `after`, in sequence order, no more than
/// `budget` bytes of them (but always at least one).
pub async fn page(
    tx: &ScopedTransaction,
    fields: &FieldCipher,
    vault: Uuid,
    after: i64,
    limit: i64,
    budget: i64,
) -> Result<Page, StoreError> {
    let rows = tx
        .query(PULL_LOGS, &[&vault, &after, &(limit + 1), &limit, &budget])
        .await?;
    let available: i64 = rows.first().map_or(0, |row| row.get(6));
    let entries = rows
        .iter()
        .map(|row| {
            Ok(Entry {
                id: row.get(0),
                encrypted_data: fields.open_text(column::LOG_DATA, row.get(1))?,
                nonce: fields.open_text(column::LOG_NONCE, row.get(2))?,
                haex_timestamp: fields.open_text(column::LOG_TIMESTAMP, row.get(3))?,
                sequence: row.get(4),
                created_at: row.get(5),
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(Page {
        has_more: (entries.len() as i64) < available,
        entries,
    })
}

/// What a push answered under an Idempotency-Key, and the fingerprint of
/// the request it answered (None for records from before schema v5).
pub struct StoredPush {
    pub response: serde_json::Value,
    pub request_hash: Option<Vec<u8>>,
}

/// The live (unexpired) record of this Idempotency-Key, if any.
pub async fn stored_push(
    tx: &ScopedTransaction,
    user: Uuid,
    key: &str,
    ttl: Duration,
) -> Result<Option<StoredPush>, StoreError> {
    let rows = tx
        .query(STORED_PUSH, &[&user, &key, &ttl.as_secs_f64()])
        .await?;
    Ok(rows.first().map(|row| StoredPush {
        response: row.get(0),
        request_hash: row.get(1),
    }))
}

/// Remembers a push's response and request fingerprint; false when a
/// concurrent retry with the same key committed first.
pub async fn save_push(
    tx: &ScopedTransaction,
    user: Uuid,
    key: &str,
    request_hash: &[u8],
    response: &serde_json::Value,
    ttl: Duration,
) -> Result<bool, StoreError> {
    let saved = tx
        .execute(
            SAVE_PUSH,
            &[&user, &key, response, &request_hash, &ttl.as_secs_f64()],
        )
        .await?;
    Ok(saved > 0)
}
