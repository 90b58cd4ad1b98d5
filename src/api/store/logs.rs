//! `keepd.sync_logs` and `keepd.push_requests` (`keepd_sync` writes,
//! `keepd_query` reads).

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use tokio_postgres::Row;

use uuid::Uuid;

use super::{Reader, StoreError};
use crate::field_crypto::{FieldCipher, column};
use crate::postgres::pool::{GroupRole, OperationContext, RoleAwarePool, ScopedTransaction};

/// Reserves sequence numbers on the vault's counter and stores the whole
/// batch under them, in one statement: entry k (1-based) of the arrays
/// gets the counter's old value + k. The counter's row lock is held to
/// commit, so concurrent pushes to one vault commit in sequence order and
/// a rolled-back push gives its numbers back. No row when the user has no
/// such vault. The account's usage is not counted here (`keepd.usage` =
/// 'deferred' for this transaction): the push claims the bytes it reserved
/// before (`usage::Reservation`), so the account's usage row is not locked
/// for the rest of the push.
///
/// Under an Idempotency-Key (`$10`, NULL for none), in the same statement:
/// no row, and nothing stored, when a live record has the key (one
/// younger than `$12` seconds, `api.idempotency_ttl`); otherwise the
/// record names the entries (where they start, how many) and the
/// request's fingerprint (`$11`), replacing an expired one. The fourth
/// column says whether the record was written (true without a key): false
/// when a concurrent retry with the key committed first (its row is then
/// the record, and this push must roll back). One statement instead of a
/// lookup, the append and the record: each is a round trip and a
/// statement's overhead in Postgres.
const APPEND_ONCE: &str = "WITH deferred AS MATERIALIZED ( \
       SELECT set_config('keepd.usage', 'deferred', true)), \
     recorded AS MATERIALIZED ( \
       SELECT FROM keepd.push_requests \
       WHERE user_id = $1 AND idempotency_key = $10::text \
         AND created_at > now() - make_interval(secs => $12)), \
     reserved AS ( \
       UPDATE keepd.vaults SET last_sequence = last_sequence + $3, bytes = bytes + $9 \
       WHERE user_id = $1 AND vault_id = $2 AND EXISTS (SELECT FROM deferred) \
         AND NOT EXISTS (SELECT FROM recorded) \
       RETURNING id, last_sequence - $3 AS base), \
     saved AS ( \
       INSERT INTO keepd.push_requests \
         (user_id, idempotency_key, vault, first_sequence, entries, request_hash) \
       SELECT $1, $10, id, base + 1, $3::int8::int4, $11 FROM reserved WHERE $10 IS NOT NULL \
       ON CONFLICT (user_id, idempotency_key) DO UPDATE \
         SET response = NULL, vault = excluded.vault, \
             first_sequence = excluded.first_sequence, entries = excluded.entries, \
             request_hash = excluded.request_hash, created_at = now() \
         WHERE keepd.push_requests.created_at <= now() - make_interval(secs => $12) \
       RETURNING true AS won) \
     INSERT INTO keepd.sync_logs \
       (id, vault, user_id, sequence, encrypted_data, nonce, haex_timestamp, size_bytes) \
     SELECT e.id, r.id, $1, r.base + e.ord, e.data, e.nonce, e.ts, e.size \
     FROM reserved r, unnest($4::uuid[], $5::text[], $6::text[], $7::text[], $8::int8[]) \
          WITH ORDINALITY AS e(id, data, nonce, ts, size, ord) \
     RETURNING vault, sequence, created_at, $10 IS NULL OR EXISTS (SELECT FROM saved)";

/// The vault `$2` of user `$1` and up to `$4` of its entries after
/// sequence `$3` whose sizes add up to at most `$5` bytes (the first
/// always); `more` on an entry tells whether the vault holds a later one,
/// and each row carries the vault's last sequence. No row: no such vault;
/// one row of NULLs but the last sequence: no entry in the range.
///
/// Sequences are gap-free (a push reserves consecutive numbers, a
/// rolled-back one gives them back, and keepd never deletes one entry), so
/// the entries after `$3` are `$3 + 1` to `$3 + $4`: the range bounds what
/// any plan reads, with or without the table's statistics. (Without them,
/// before the first ANALYZE of a freshly pushed table, Postgres chose a
/// bitmap scan of every entry after `$3` and a sort, and a fresh vault
/// pulled at half the speed of a settled one.) When `$4` entries the size
/// of the vault's largest (`vaults.largest_entry`, schema v26) fit in
/// `$5`, no page can pass the budget and the first branch reads the range
/// as it is; otherwise the second adds up the sizes, a window run once
/// over the rows in index order with a ROWS frame. Postgres checks each
/// branch's condition on the vault once and skips the other branch.
const PULL_LOGS: &str = "SELECT t.id, t.encrypted_data, t.nonce, t.haex_timestamp, t.sequence, \
       t.created_at, t.sequence < v.last_sequence AS more, v.last_sequence \
     FROM keepd.vaults v LEFT JOIN LATERAL ( \
       (SELECT id, encrypted_data, nonce, haex_timestamp, sequence, created_at \
        FROM keepd.sync_logs \
        WHERE vault = v.id AND sequence > $3::int8 AND sequence <= $3::int8 + $4::int8 \
          AND v.largest_entry * $4::int8 <= $5::int8 \
        ORDER BY sequence LIMIT $4::int8) \
       UNION ALL \
       (SELECT id, encrypted_data, nonce, haex_timestamp, sequence, created_at \
        FROM (SELECT p.*, row_number() OVER w AS n, \
                     sum(octet_length(p.encrypted_data) + octet_length(p.nonce) \
                         + octet_length(p.haex_timestamp)) OVER w AS running \
              FROM (SELECT id, encrypted_data, nonce, haex_timestamp, sequence, created_at \
                    FROM keepd.sync_logs \
                    WHERE vault = v.id AND sequence > $3::int8 \
                      AND sequence <= $3::int8 + $4::int8 \
                    ORDER BY sequence LIMIT $4::int8) p \
              WINDOW w AS (ORDER BY p.sequence \
                           ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)) s \
        WHERE v.largest_entry * $4::int8 > $5::int8 AND (s.n = 1 OR s.running <= $5::int8))) t \
       ON true \
     WHERE v.user_id = $1 AND v.vault_id = $2";

/// The first sequence after `$3` in the user's vault: where a page
/// continues past entries removed by hand (outside keepd, which never
/// leaves a gap) when the range of `PULL_LOGS` held none.
const NEXT_SEQUENCE: &str = "SELECT min(l.sequence) FROM keepd.sync_logs l \
     JOIN keepd.vaults v ON v.id = l.vault \
     WHERE v.user_id = $1 AND v.vault_id = $2 AND l.sequence > $3";

/// A record older than `api.idempotency_ttl` (`$3`, seconds) has expired:
/// the key may name a new request. Since schema v25 a record names its
/// push's entries (`vault`, `first_sequence`, `entries`); one written
/// before holds the answer itself (`response`).
const STORED_PUSH: &str = "SELECT response, request_hash, vault, first_sequence, entries \
     FROM keepd.push_requests \
     WHERE user_id = $1 AND idempotency_key = $2 \
       AND created_at > now() - make_interval(secs => $3)";

/// The entries a record names, in sequence order.
const RECORDED_ENTRIES: &str = "SELECT id, sequence, haex_timestamp, created_at \
     FROM keepd.sync_logs \
     WHERE vault = $1 AND sequence >= $2 AND sequence < $2 + $3::int8 \
     ORDER BY sequence";

/// One entry as the client sent it.
pub struct NewEntry {
    pub encrypted_data: String,
    pub nonce: String,
    pub haex_timestamp: String,
}

impl NewEntry {
    /// What the entry counts against `api.quotas.storage_bytes`, by the
    /// rule backups follow too: the bytes the client sent, decoded
    /// (`encryptedData` and `nonce` from their base64, `haexTimestamp` as
    /// UTF-8), before any sealing at rest.
    pub fn size_bytes(&self) -> i64 {
        (decoded_len(&self.encrypted_data) + decoded_len(&self.nonce) + self.haex_timestamp.len())
            as i64
    }
}

/// The length of what standard, padded base64 (checked by the handler)
/// decodes to, without decoding it.
fn decoded_len(base64: &str) -> usize {
    let padding = base64
        .bytes()
        .rev()
        .take_while(|&b| b == b'=')
        .count()
        .min(2);
    (base64.len() / 4 * 3).saturating_sub(padding)
}

/// What storing an entry gave it.
pub struct AppendedEntry {
    pub id: Uuid,
    pub sequence: i64,
    pub haex_timestamp: String,
    pub created_at: SystemTime,
}

/// One entry of a page, borrowed from the rows Postgres sent where it
/// was stored in the clear.
pub struct Entry<'a> {
    pub id: Uuid,
    pub encrypted_data: Cow<'a, str>,
    pub nonce: Cow<'a, str>,
    pub haex_timestamp: Cow<'a, str>,
    pub sequence: i64,
    pub created_at: SystemTime,
}

/// Tells every node's watchers the vaults' new last sequences
/// (`api::events`), one notification each.
const ANNOUNCE: &str = "SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload";

/// Announces `events`, which pushes have committed, to the vaults'
/// watchers on every node, in one transaction of its own committed
/// unflushed. Not in a push's transaction: Postgres queues notifications
/// in commit order under one lock held until the commit is on disk, so
/// notifying pushes could not share a WAL flush. A crash may lose the
/// events, not the entries: a stream that reconnects starts from the
/// vault's head. A notification touches no tenant's rows: the
/// transaction has none.
pub async fn announce(
    pool: &RoleAwarePool,
    events: &[crate::api::events::VaultEvent],
) -> Result<(), StoreError> {
    let ctx = OperationContext::system(GroupRole::Sync);
    let payloads: Vec<String> = events.iter().map(|event| event.payload()).collect();
    pool.run_unflushed(&ctx, ANNOUNCE, &[&crate::api::events::CHANNEL, &payloads])
        .await?;
    Ok(())
}

/// A stored batch: the vault's row id and the entries in sequence order.
pub struct Appended {
    pub vault: Uuid,
    pub entries: Vec<AppendedEntry>,
}

/// Stores `entries` in the user's vault `vault_id` under new sequence
/// numbers and, under an Idempotency-Key, records them, in one statement
/// (`APPEND_ONCE`); with whether the record was written (true
/// without a key). None when the user has no such vault, or a live record
/// has the key.
async fn append(
    tx: &ScopedTransaction,
    fields: &FieldCipher,
    user: Uuid,
    vault_id: &str,
    entries: Vec<NewEntry>,
    idempotency: Option<&Idempotency<'_>>,
) -> Result<Option<(Appended, bool)>, StoreError> {
    let count = entries.len();
    let mut ids = Vec::with_capacity(count);
    let mut data = Vec::with_capacity(count);
    let mut nonces = Vec::with_capacity(count);
    let mut stamps = Vec::with_capacity(count);
    let mut sizes = Vec::with_capacity(count);
    // What the answer repeats of each entry, in batch order: no need to
    // have Postgres send it back and open it again.
    let mut sent = Vec::with_capacity(count);
    for entry in entries {
        // Time-ordered (version 7): each push appends to the right edge
        // of the key's index instead of touching random pages of it.
        let id = Uuid::now_v7();
        ids.push(id);
        sizes.push(entry.size_bytes());
        sent.push((id, entry.haex_timestamp.clone()));
        data.push(fields.seal_text(column::LOG_DATA, entry.encrypted_data));
        nonces.push(fields.seal_text(column::LOG_NONCE, entry.nonce));
        stamps.push(fields.seal_text(column::LOG_TIMESTAMP, entry.haex_timestamp));
    }
    let bytes = sizes.iter().sum::<i64>();
    let (key, fingerprint, ttl) = (
        idempotency.map(|i| i.key),
        idempotency.map(|i| i.fingerprint),
        idempotency.map(|i| i.ttl.as_secs_f64()),
    );
    let rows = tx
        .query(
            APPEND_ONCE,
            &[
                &user,
                &vault_id,
                &(count as i64),
                &ids,
                &data,
                &nonces,
                &stamps,
                &sizes,
                &bytes,
                &key,
                &fingerprint,
                &ttl,
            ],
        )
        .await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let (vault, recorded) = (first.get(0), first.get(3));
    let mut stored: Vec<(i64, SystemTime)> =
        rows.iter().map(|row| (row.get(1), row.get(2))).collect();
    // Entry k of the batch got the k-th of its consecutive sequences.
    stored.sort_unstable_by_key(|(sequence, _)| *sequence);
    let entries = sent
        .into_iter()
        .zip(stored)
        .map(
            |((id, haex_timestamp), (sequence, created_at))| AppendedEntry {
                id,
                sequence,
                haex_timestamp,
                created_at,
            },
        )
        .collect();
    Ok(Some((Appended { vault, entries }, recorded)))
}

/// Entries after `after`: the rows as Postgres sent them, read by
/// [`Page::entries`].
pub struct Page {
    rows: Vec<Row>,
}

impl Page {
    /// The entries in sequence order (the query leaves the order to the
    /// join: sorting here is cheaper than a sort of wide rows in Postgres).
    pub fn entries(&self, fields: &FieldCipher) -> Result<Vec<Entry<'_>>, StoreError> {
        let mut entries = Vec::with_capacity(self.rows.len());
        for row in &self.rows {
            // One row of NULLs: the vault has no entry after `after`.
            let Some(sequence) = row.get::<_, Option<i64>>(4) else {
                continue;
            };
            entries.push(Entry {
                id: row.get(0),
                encrypted_data: fields.open_str(column::LOG_DATA, row.get(1))?,
                nonce: fields.open_str(column::LOG_NONCE, row.get(2))?,
                haex_timestamp: fields.open_str(column::LOG_TIMESTAMP, row.get(3))?,
                sequence,
                created_at: row.get(5),
            });
        }
        entries.sort_unstable_by_key(|entry| entry.sequence);
        Ok(entries)
    }

    /// More entries follow (the limit or the byte budget was reached, or
    /// the vault grew): the last entry's `more`.
    pub fn has_more(&self) -> bool {
        self.rows
            .iter()
            .filter_map(|row| {
                Some((
                    row.get::<_, Option<i64>>(4)?,
                    row.get::<_, Option<bool>>(6)?,
                ))
            })
            .max_by_key(|(sequence, _)| *sequence)
            .is_some_and(|(_, more)| more)
    }

    /// The stored size of the page's text, to size the answer up front.
    pub fn text_bytes(&self) -> usize {
        self.rows
            .iter()
            .map(|row| {
                (1..=3)
                    .map(|i| row.get::<_, Option<&str>>(i).map_or(0, str::len))
                    .sum::<usize>()
            })
            .sum()
    }
}

/// Up to `limit` entries of the user's vault `vault_id` after `after`, in
/// sequence order, no more than `budget` bytes of them (but always at
/// least one); None when the user has no such vault. One statement, in
/// a read of its own (for the API, one round trip with the session's
/// check: `UserAuth::reader`).
pub async fn page<R: Reader>(
    reader: &R,
    user: Uuid,
    vault_id: &str,
    after: i64,
    limit: i64,
    budget: i64,
) -> Result<Option<Page>, R::Error> {
    let mut rows = reader
        .read(PULL_LOGS, &[&user, &vault_id, &after, &limit, &budget])
        .await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let empty = first.get::<_, Option<i64>>(4).is_none();
    if empty && first.get::<_, i64>(7) > after {
        let next: Option<i64> = reader
            .read(NEXT_SEQUENCE, &[&user, &vault_id, &after])
            .await?
            .first()
            .and_then(|row| row.get(0));
        if let Some(next) = next {
            rows = reader
                .read(PULL_LOGS, &[&user, &vault_id, &(next - 1), &limit, &budget])
                .await?;
        }
    }
    Ok(Some(Page { rows }))
}

/// What a push answered under an Idempotency-Key, and the fingerprint of
/// the request it answered (None for records from before schema v5).
pub struct StoredPush<R> {
    /// None when the entries it stored are gone (their vault was deleted
    /// since, or some were removed by hand).
    pub response: Option<R>,
    pub request_hash: Option<Vec<u8>>,
}

/// The live (unexpired) record of this Idempotency-Key, if any, its
/// answer made again by `respond` from the entries the push stored (a
/// record from before schema v25 holds its answer).
pub async fn stored_push<R: serde::de::DeserializeOwned>(
    tx: &ScopedTransaction,
    fields: &FieldCipher,
    user: Uuid,
    key: &str,
    ttl: Duration,
    respond: impl FnOnce(Appended) -> R,
) -> Result<Option<StoredPush<R>>, StoreError> {
    let rows = tx
        .query(STORED_PUSH, &[&user, &key, &ttl.as_secs_f64()])
        .await?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let request_hash = row.get(1);
    if let Some(response) = row.get::<_, Option<serde_json::Value>>(0) {
        let response = serde_json::from_value(response).map_err(StoreError::decode)?;
        return Ok(Some(StoredPush {
            response: Some(response),
            request_hash,
        }));
    }
    let (vault, first, count): (Uuid, i64, i32) = (row.get(2), row.get(3), row.get(4));
    let rows = tx
        .query(RECORDED_ENTRIES, &[&vault, &first, &i64::from(count)])
        .await?;
    let entries = rows
        .iter()
        .map(|row| {
            Ok(AppendedEntry {
                id: row.get(0),
                sequence: row.get(1),
                haex_timestamp: fields.open_text(column::LOG_TIMESTAMP, row.get(2))?,
                created_at: row.get(3),
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let whole = entries.len() == count as usize;
    Ok(Some(StoredPush {
        response: whole.then(|| respond(Appended { vault, entries })),
        request_hash,
    }))
}

/// A push as its handler checked it: the transaction's one store call
/// (`push`) takes it whole.
pub struct PushBatch<'a> {
    pub user: Uuid,
    pub vault_id: &'a str,
    pub entries: Vec<NewEntry>,
    /// The client's `keyCheck`: nothing is stored when the vault's differs.
    pub key_check: Option<&'a str>,
    pub idempotency: Option<Idempotency<'a>>,
}

/// An `Idempotency-Key`, the fingerprint of its request, and how long its
/// record names the request.
pub struct Idempotency<'a> {
    pub key: &'a str,
    pub fingerprint: &'a [u8],
    pub ttl: Duration,
}

/// How a push went.
pub enum PushOutcome<R> {
    /// The key names a recorded push: its first answer (or, if the
    /// fingerprints differ, another request's); nothing was stored.
    Recorded(StoredPush<R>),
    /// The user has no such vault.
    NoVault,
    /// The vault's key check differs from the push's.
    WrongKey,
    /// The key's record was live when the push looked, and expired before
    /// it could be read: nothing was stored; sent again, the push stores.
    Expired,
    /// Stored (not yet committed) and the answer recorded under the key;
    /// the caller commits (claiming the bytes it reserved,
    /// `usage::Reservation`) and then announces the event. `raced` says a
    /// concurrent retry with the same key committed first (the caller
    /// rolls back and answers from that record).
    Stored {
        event: crate::api::events::VaultEvent,
        first: i64,
        response: R,
        raced: bool,
    },
}

/// A whole push in `tx`: the key check compared, the batch appended and
/// recorded under the Idempotency-Key (one statement, `APPEND_ONCE`); the
/// answer is what `respond` makes of the stored entries (of the recorded
/// ones, for a retry).
pub async fn push<R: serde::de::DeserializeOwned>(
    tx: &ScopedTransaction,
    fields: &FieldCipher,
    batch: PushBatch<'_>,
    respond: impl Fn(Appended) -> R,
) -> Result<PushOutcome<R>, StoreError> {
    let PushBatch {
        user,
        vault_id,
        entries,
        key_check,
        idempotency,
    } = batch;
    // A retry is answered from its record before anything else is
    // looked at; only a push that stored nothing looks for one.
    let recorded = async |tx| match &idempotency {
        Some(idempotency) => {
            stored_push(tx, fields, user, idempotency.key, idempotency.ttl, &respond).await
        }
        None => Ok(None),
    };
    if let Some(sent) = key_check {
        let differs = match super::vaults::key_check(tx, user, vault_id).await? {
            None => Some(PushOutcome::NoVault),
            Some(Some(stored)) if stored != sent => Some(PushOutcome::WrongKey),
            Some(_) => None,
        };
        if let Some(refused) = differs {
            return Ok(match recorded(tx).await? {
                Some(first) => PushOutcome::Recorded(first),
                None => refused,
            });
        }
    }
    let Some((appended, won)) =
        append(tx, fields, user, vault_id, entries, idempotency.as_ref()).await?
    else {
        return Ok(match recorded(tx).await? {
            Some(first) => PushOutcome::Recorded(first),
            // The vault is there, so a live record stopped the append and
            // has expired since (the janitor's, at the key's TTL).
            None if idempotency.is_some()
                && super::vaults::key_check(tx, user, vault_id)
                    .await?
                    .is_some() =>
            {
                PushOutcome::Expired
            }
            None => PushOutcome::NoVault,
        });
    };
    let vault = appended.vault;
    // (A batch is never empty: the handler refuses one.)
    let (Some(first), Some(last)) = (appended.entries.first(), appended.entries.last()) else {
        return Ok(PushOutcome::NoVault);
    };
    let (first, last) = (first.sequence, last.sequence);
    let response = respond(appended);
    Ok(PushOutcome::Stored {
        event: crate::api::events::VaultEvent {
            vault,
            sequence: last,
        },
        first,
        response,
        raced: !won,
    })
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as BASE64;

    use super::*;

    #[test]
    fn an_entry_counts_its_decoded_bytes() {
        for n in 1..=64 {
            let text = BASE64.encode(vec![7u8; n]);
            assert_eq!(decoded_len(&text), n, "{text}");
        }
        // 700 bytes of ciphertext, a 12-byte nonce, a 6-byte timestamp: 718,
        // not the 958 characters their base64 and the timestamp take.
        let entry = NewEntry {
            encrypted_data: BASE64.encode([1u8; 700]),
            nonce: BASE64.encode([2u8; 12]),
            haex_timestamp: "t-0001".into(),
        };
        assert_eq!(entry.size_bytes(), 718);
        // A timestamp counts its UTF-8 bytes.
        let entry = NewEntry {
            haex_timestamp: "é".into(),
            ..entry
        };
        assert_eq!(entry.size_bytes(), 700 + 12 + 2);
    }
}
