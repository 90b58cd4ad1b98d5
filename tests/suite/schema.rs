//! Schema, permission matrix, row-level security, pool hygiene and the
//! audit chain, proven against a real keepd-managed Postgres through the
//! public API (the role-aware pool) and the binary (`keepd audit verify`).

use crate::common;

use std::time::Duration;

use common::{TestNode, uuid, wait_until};
use keepd::postgres::matrix::{self, Privilege};
use keepd::postgres::migrate::{self, MigrateError, Migration};
use keepd::postgres::pool::{GroupRole, OperationContext, PoolError, RoleAwarePool};

const ROLES: [GroupRole; 6] = [
    GroupRole::Sync,
    GroupRole::Query,
    GroupRole::Auth,
    GroupRole::Audit,
    GroupRole::Readonly,
    GroupRole::Operator,
];

fn started() -> (TestNode, common::Daemon) {
    let node = TestNode::new();
    let daemon = node.start();
    assert!(
        daemon.wait_health(200, Duration::from_secs(15)),
        "{}",
        daemon.log()
    );
    (node, daemon)
}

/// A column each table has, for an UPDATE that touches nothing.
fn some_column(table: &str) -> &'static str {
    match table {
        "keepd.users" => "password_hash",
        "keepd.sessions" | "keepd.devices" => "revoked_at",
        "keepd.vaults" => "last_sequence",
        "keepd.vault_keys" => "salt",
        "keepd.sync_logs" | "keepd.backups" => "nonce",
        "keepd.push_requests" => "response",
        "keepd.account_usage" => "vaults",
        "keepd.invites" => "used_at",
        "keepd.login_throttle" => "last_failure",
        "keepd.opaque_logins" => "user_id",
        "keepd.recovery_codes" => "used_at",
        "keepd.cluster_members" => "admitted_by",
        "keepd.cluster_liveness" => "seen_at",
        "keepd.field_keys" => "retired_at",
        "keepd.cluster_key_log" => "members",
        "keepd.cluster_removals" => "removed_by",
        "keepd.cluster_join_tokens" => "revoked_at",
        "keepd.push_reservations" => "bytes",
        "keepd_audit.audit_log" => "action",
        "keepd_audit.audit_chain" => "sealed_at",
        "keepd_audit.audit_base" => "signed_at",
        other => panic!("no column known for {other}"),
    }
}

fn statement(privilege: Privilege, table: &str) -> String {
    match privilege {
        Privilege::Select => format!("SELECT 1 FROM {table} LIMIT 0"),
        Privilege::Insert => format!("INSERT INTO {table} DEFAULT VALUES"),
        Privilege::Update => format!(
            "UPDATE {table} SET {} = NULL WHERE false",
            some_column(table)
        ),
        Privilege::Delete => format!("DELETE FROM {table} WHERE false"),
        Privilege::Truncate => format!("TRUNCATE {table}"),
    }
}

/// Whether the error is Postgres refusing the privilege itself (not a
/// constraint, a policy or a trigger reached after the privilege check).
fn is_permission_denied(e: &PoolError) -> bool {
    let PoolError::Sql(e) = e else { return false };
    e.as_db_error().is_some_and(|db| {
        db.code() == &tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE
            && db.message().starts_with("permission denied")
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn every_cell_of_the_permission_matrix_holds() {
    let (node, _daemon) = started();
    let pool = node.pool(2);
    let mut failures = Vec::new();
    for role in ROLES {
        for table in matrix::TABLES {
            for privilege in Privilege::ALL {
                let tx = pool
                    .begin(&OperationContext::user(role, uuid()))
                    .await
                    .unwrap();
                // Dropped without commit: rolled back whatever happens.
                let result = tx.execute(&statement(privilege, table), &[]).await;
                // A SELECT naming no column needs a privilege on any one
                // column; the UPDATE names one the column grants leave out.
                let allowed = matrix::allows(role.name(), table, privilege)
                    || (privilege == Privilege::Select
                        && matrix::COLUMNS.iter().any(|(r, t, p, _)| {
                            *r == role.name() && *t == table && *p == Privilege::Select
                        }));
                let denied = matches!(&result, Err(e) if is_permission_denied(e));
                if allowed == denied {
                    failures.push(format!(
                        "{} {} {table}: expected {}, got {result:?}",
                        role.name(),
                        privilege.sql(),
                        if allowed { "allowed" } else { "denied" }
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn column_grants_hold_column_by_column() {
    let (node, _daemon) = started();
    for (role, table, privilege, columns) in matrix::COLUMNS {
        let (schema, name) = table.split_once('.').unwrap();
        let granted = node
            .psql(
                "superuser",
                &format!(
                    "SELECT string_agg(column_name, ',' ORDER BY column_name) \
                     FROM information_schema.columns \
                     WHERE table_schema = '{schema}' AND table_name = '{name}' \
                       AND has_column_privilege('{role}', '{table}', column_name, '{}')",
                    privilege.sql()
                ),
            )
            .unwrap();
        let mut expected: Vec<&str> = columns.to_vec();
        expected.sort_unstable();
        assert_eq!(
            granted.trim(),
            expected.join(","),
            "{role} {} {table}",
            privilege.sql()
        );
    }
    // What it is for: the operator's role cannot read a password hash.
    let pool = node.pool(1);
    let tx = pool
        .begin(&OperationContext::system(GroupRole::Operator))
        .await
        .unwrap();
    let e = tx
        .query("SELECT password_hash FROM keepd.users", &[])
        .await
        .unwrap_err();
    assert!(is_permission_denied(&e), "{e:?}");
}

/// Creates one row in every tenant table for `user`; returns nothing but
/// panics on failure.
async fn populate(pool: &RoleAwarePool, user: &str) {
    let auth = pool
        .begin(&OperationContext::user(GroupRole::Auth, user))
        .await
        .unwrap();
    let hmac = &user[..8];
    auth.execute(
        &format!("INSERT INTO keepd.users (id, email_hmac, password_hash) VALUES ('{user}', '\\x{hmac}', 'h')"),
        &[],
    )
    .await
    .unwrap();
    auth.execute(
        &format!("INSERT INTO keepd.sessions (id, user_id, expires_at) VALUES (gen_random_uuid(), '{user}', now() + interval '1h')"),
        &[],
    )
    .await
    .unwrap();
    auth.commit().await.unwrap();
    let sync = pool
        .begin(&OperationContext::user(GroupRole::Sync, user))
        .await
        .unwrap();
    let vault = uuid();
    let device = uuid();
    for sql in [
        format!(
            "INSERT INTO keepd.vaults (id, user_id, vault_id) VALUES ('{vault}', '{user}', 'v')"
        ),
        format!(
            "INSERT INTO keepd.vault_keys (id, vault, user_id, encrypted_vault_key, salt, nonce) VALUES (gen_random_uuid(), '{vault}', '{user}', 'k', 's', 'n')"
        ),
        format!(
            "INSERT INTO keepd.sync_logs (id, vault, user_id, sequence, encrypted_data, nonce, haex_timestamp) VALUES (gen_random_uuid(), '{vault}', '{user}', 1, 'd', 'n', 't')"
        ),
        format!(
            "INSERT INTO keepd.push_requests (user_id, idempotency_key, response) VALUES ('{user}', 'k', '{{}}')"
        ),
        format!(
            "INSERT INTO keepd.devices (id, user_id, device_name, public_key) VALUES ('{device}', '{user}', 'd', sha256('{user}'::bytea))"
        ),
        format!(
            "INSERT INTO keepd.backups (id, user_id, device_id, ciphertext, nonce, auth_tag, signature, data_classification, size_bytes) VALUES (gen_random_uuid(), '{user}', '{device}', '\\x00', '\\x00', '\\x00', '\\x00', 'Internal', 1)"
        ),
    ] {
        sync.execute(&sql, &[]).await.unwrap();
    }
    sync.commit().await.unwrap();
}

const TENANT_TABLES: [(&str, &str); 9] = [
    ("keepd.users", "id"),
    ("keepd.sessions", "user_id"),
    ("keepd.vaults", "user_id"),
    ("keepd.vault_keys", "user_id"),
    ("keepd.sync_logs", "user_id"),
    ("keepd.push_requests", "user_id"),
    ("keepd.devices", "user_id"),
    ("keepd.backups", "user_id"),
    ("keepd.account_usage", "user_id"),
];

#[tokio::test(flavor = "multi_thread")]
async fn row_level_security_isolates_tenants_even_from_hand_written_sql() {
    let (node, _daemon) = started();
    let pool = node.pool(2);
    let (alice, bob) = (uuid(), uuid());
    populate(&pool, &alice).await;
    populate(&pool, &bob).await;

    for role in [
        GroupRole::Readonly,
        GroupRole::Query,
        GroupRole::Sync,
        GroupRole::Auth,
    ] {
        let tx = pool
            .begin(&OperationContext::user(role, alice.clone()))
            .await
            .unwrap();
        for (table, owner) in TENANT_TABLES {
            if !matrix::allows(role.name(), table, Privilege::Select) {
                continue;
            }
            let mine: i64 = tx
                .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await
                .unwrap()
                .get(0);
            let theirs: i64 = tx
                .query_one(
                    &format!("SELECT count(*) FROM {table} WHERE {owner} = '{bob}'"),
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(
                (mine, theirs),
                (1, 0),
                "{} sees others' rows in {table}",
                role.name()
            );
        }
    }
    // Without a tenant, nothing is visible.
    let tx = pool
        .begin(&OperationContext::system(GroupRole::Readonly))
        .await
        .unwrap();
    for (table, _) in TENANT_TABLES {
        let n: i64 = tx
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "{table} visible without a tenant");
    }
    drop(tx);

    // Alice cannot write rows owned by Bob, nor touch his existing rows.
    let attempts = [
        (
            GroupRole::Auth,
            format!(
                "INSERT INTO keepd.sessions (id, user_id, expires_at) VALUES (gen_random_uuid(), '{bob}', now())"
            ),
        ),
        (
            GroupRole::Auth,
            format!(
                "INSERT INTO keepd.users (id, email_hmac, password_hash) VALUES ('{bob}', '\\xff', 'x')"
            ),
        ),
        (
            GroupRole::Sync,
            format!(
                "INSERT INTO keepd.vaults (id, user_id, vault_id) VALUES (gen_random_uuid(), '{bob}', 'stolen')"
            ),
        ),
        (
            GroupRole::Sync,
            format!(
                "INSERT INTO keepd.devices (id, user_id, device_name, public_key) VALUES (gen_random_uuid(), '{bob}', 'd', decode(repeat('00', 32), 'hex'))"
            ),
        ),
        (
            GroupRole::Sync,
            format!(
                "INSERT INTO keepd.push_requests (user_id, idempotency_key, response) VALUES ('{bob}', 'x', '{{}}')"
            ),
        ),
    ];
    for (role, sql) in attempts {
        let tx = pool
            .begin(&OperationContext::user(role, alice.clone()))
            .await
            .unwrap();
        let err = tx.execute(&sql, &[]).await.unwrap_err();
        assert!(
            err.to_string().contains("row-level security"),
            "{sql}: {err}"
        );
    }
    let tx = pool
        .begin(&OperationContext::user(GroupRole::Sync, alice.clone()))
        .await
        .unwrap();
    let changed = tx
        .execute(
            &format!("UPDATE keepd.vaults SET last_sequence = 99 WHERE user_id = '{bob}'"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(changed, 0);
    let tx = pool
        .begin(&OperationContext::user(GroupRole::Auth, alice.clone()))
        .await
        .unwrap();
    let deleted = tx
        .execute(&format!("DELETE FROM keepd.users WHERE id = '{bob}'"), &[])
        .await
        .unwrap();
    assert_eq!(deleted, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_login_lookup_sees_only_the_user_with_that_email_hmac() {
    let (node, _daemon) = started();
    let pool = node.pool(1);
    let (alice, bob) = (uuid(), uuid());
    populate(&pool, &alice).await;
    populate(&pool, &bob).await;
    let lookup = OperationContext {
        role: GroupRole::Auth,
        user_id: None,
        email_hmac: Some(alice[..8].to_string()),
    };
    let tx = pool.begin(&lookup).await.unwrap();
    let ids: Vec<String> = tx
        .query("SELECT id::text FROM keepd.users", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, vec![alice]);
}

#[tokio::test(flavor = "multi_thread")]
async fn role_and_tenant_never_leak_into_the_next_transaction() {
    let (node, _daemon) = started();
    let pool = node.pool(1); // one connection: every transaction reuses it
    let who = "SELECT current_user::text, current_setting('keepd.user_id', true), session_user::text, pg_backend_pid()";
    let alice = uuid();
    let tx = pool
        .begin(&OperationContext::user(GroupRole::Sync, alice.clone()))
        .await
        .unwrap();
    let row = tx.query_one(who, &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "keepd_sync");
    assert_eq!(row.get::<_, String>(1), alice);
    let login: String = row.get(2);
    let backend: i32 = row.get(3);
    tx.commit().await.unwrap();

    let tx = pool
        .begin(&OperationContext::system(GroupRole::Query))
        .await
        .unwrap();
    let row = tx.query_one(who, &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(3), backend, "same connection");
    assert_eq!(row.get::<_, String>(0), "keepd_query");
    assert_eq!(row.get::<_, String>(1), "", "the previous tenant is gone");
    assert_eq!(row.get::<_, String>(2), login);
    // Abandoned mid-way (an error path): rolled back, settings gone.
    tx.execute(
        &format!("SELECT set_config('keepd.user_id', '{alice}', false)"),
        &[],
    )
    .await
    .unwrap();
    drop(tx);

    let bob = uuid();
    let tx = pool
        .begin(&OperationContext::user(GroupRole::Auth, bob.clone()))
        .await
        .unwrap();
    tx.execute(
        &format!(
            "INSERT INTO keepd.users (id, email_hmac, password_hash) VALUES ('{bob}', '\\x01', 'h')"
        ),
        &[],
    )
    .await
    .unwrap();
    drop(tx); // never committed

    let tx = pool
        .begin(&OperationContext::user(GroupRole::Readonly, bob.clone()))
        .await
        .unwrap();
    let row = tx.query_one(who, &[]).await.unwrap();
    assert_eq!(
        row.get::<_, i32>(3),
        backend,
        "same connection after rollback"
    );
    assert_eq!(row.get::<_, String>(0), "keepd_readonly");
    assert_eq!(row.get::<_, String>(1), bob);
    let n: i64 = tx
        .query_one("SELECT count(*) FROM keepd.users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "the abandoned insert was rolled back");
}

/// A read runs its statements in order in a transaction of its own, with
/// the role and tenant of its context, the first time (statements
/// prepared) and once they are prepared (everything in one round trip);
/// a statement that fails stops those after it, and nothing is left open
/// for the next transaction on the connection. An unflushed write's
/// scope turns the commit's wait for the disk off, for it alone.
#[tokio::test(flavor = "multi_thread")]
async fn a_read_runs_in_order_in_its_scope_and_stops_at_a_failure() {
    let (node, _daemon) = started();
    let pool = node.pool(1); // one connection: every transaction reuses it
    let who = "SELECT current_user::text, current_setting('keepd.user_id', true)";
    // Session-wide once its transaction commits: seen by the next one.
    let probe = "SELECT set_config('keepd.read_probe', $1, false)";
    let fail = "SELECT 1 / (random() * 0)::int4";
    let alice = uuid();
    let ctx = OperationContext::user(GroupRole::Sync, alice.clone());
    for attempt in ["first, preparing", "prepared, pipelined"] {
        let rows = pool
            .read(&ctx, &[(who, &[]), (probe, &[&"ran"])])
            .await
            .unwrap();
        assert_eq!(rows.len(), 2, "{attempt}");
        assert_eq!(rows[0][0].get::<_, String>(0), "keepd_sync", "{attempt}");
        assert_eq!(rows[0][0].get::<_, String>(1), alice, "{attempt}");
        assert_eq!(rows[1][0].get::<_, String>(0), "ran", "{attempt}");

        let failed = pool
            .read(&ctx, &[(fail, &[]), (probe, &[&"ran after a failure"])])
            .await
            .unwrap_err();
        assert!(
            failed.to_string().contains("division by zero"),
            "{attempt}: {failed}"
        );

        let tx = pool
            .begin(&OperationContext::system(GroupRole::Query))
            .await
            .unwrap();
        let row = tx
            .query_one(
                "SELECT current_user::text, current_setting('keepd.user_id', true), \
                 current_setting('keepd.read_probe', true)",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "keepd_query", "{attempt}");
        assert_eq!(row.get::<_, String>(1), "", "{attempt}");
        assert_eq!(
            row.get::<_, String>(2),
            "ran",
            "{attempt}: the statement after the failure did not run"
        );
        tx.commit().await.unwrap();

        // An unflushed transaction does not wait for the disk; a read
        // commits as configured (on).
        let setting = "SELECT current_setting('synchronous_commit')";
        let unflushed = pool.run_unflushed(&ctx, setting, &[]).await.unwrap();
        assert_eq!(unflushed[0].get::<_, String>(0), "off", "{attempt}");
        let read = pool.read(&ctx, &[(setting, &[])]).await.unwrap();
        assert_eq!(read[0][0].get::<_, String>(0), "on", "{attempt}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_connection_is_replaced_not_reused() {
    let (node, _daemon) = started();
    let pool = node.pool(1);
    let backend = "SELECT pg_backend_pid()";
    let tx = pool
        .begin(&OperationContext::system(GroupRole::Readonly))
        .await
        .unwrap();
    let first: i32 = tx.query_one(backend, &[]).await.unwrap().get(0);
    tx.commit().await.unwrap();
    let admin = node.superuser().await;
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&first])
        .await
        .unwrap();
    for _ in 0..3 {
        let tx = pool
            .begin(&OperationContext::system(GroupRole::Readonly))
            .await
            .unwrap();
        let now: i32 = tx.query_one(backend, &[]).await.unwrap().get(0);
        assert_ne!(now, first, "the terminated connection was reused");
        tx.commit().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_abandoned_transaction_releases_its_locks_at_once() {
    let (node, _daemon) = started();
    let pool = node.pool(4);
    let tx = pool
        .begin(&OperationContext::system(GroupRole::Audit))
        .await
        .unwrap();
    tx.query_one("SELECT pg_advisory_xact_lock(4242)", &[])
        .await
        .unwrap();
    // An early return or a cancelled request: dropped, never committed,
    // and its connection sits idle in the pool afterwards.
    drop(tx);
    let admin = node.superuser().await;
    let mut released = false;
    for _ in 0..50 {
        let row = admin
            .query_one("SELECT pg_try_advisory_lock(4242)", &[])
            .await
            .unwrap();
        released = row.get(0);
        if released {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(released, "the dropped transaction still holds its lock");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_migration_changes_nothing() {
    let (node, _daemon) = started();
    let mut client = node.superuser().await;
    let next = migrate::MIGRATIONS.len() as i32 + 1;
    let broken = Migration {
        version: next,
        name: "broken",
        sql: "CREATE TABLE keepd.half_done (x int); SELECT * FROM keepd.no_such_table;",
    };
    let migrations: Vec<Migration> = migrate::MIGRATIONS
        .iter()
        .copied()
        .chain([broken])
        .collect();
    let err = migrate::apply(&mut client, &migrations).await.unwrap_err();
    assert!(
        matches!(err, MigrateError::Failed { version, .. } if version == next),
        "{err}"
    );
    assert!(err.to_string().contains("nothing was changed"), "{err}");
    let half: Option<String> = client
        .query_one("SELECT to_regclass('keepd.half_done')::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(half, None, "the failed migration left a table behind");
    let newest: i32 = client
        .query_one("SELECT max(version) FROM keepd.schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(newest, next - 1);

    // An applied migration whose content changed is refused.
    let mut edited: Vec<Migration> = migrate::MIGRATIONS.to_vec();
    edited[0].sql = "SELECT 1;";
    let err = migrate::apply(&mut client, &edited).await.unwrap_err();
    assert!(
        matches!(err, MigrateError::Changed { version: 1, .. }),
        "{err}"
    );
    // A database newer than this binary is refused.
    let err = migrate::apply(&mut client, &migrate::MIGRATIONS[..1])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            MigrateError::Newer {
                applied,
                known: 1
            } if applied == next - 1
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_audit_trail_refuses_changes_even_from_its_owner() {
    let (node, _daemon) = started();
    // Row triggers fire only on rows: let the start entry be sealed first.
    wait_sealed(&node);
    let client = node.superuser().await;
    for sql in [
        "UPDATE keepd_audit.audit_log SET action = 'forged'",
        "DELETE FROM keepd_audit.audit_log",
        "TRUNCATE keepd_audit.audit_log CASCADE",
        "UPDATE keepd_audit.audit_chain SET hash = hash",
        "DELETE FROM keepd_audit.audit_chain",
        "TRUNCATE keepd_audit.audit_chain",
    ] {
        let err = client
            .batch_execute(&format!("BEGIN; SET LOCAL ROLE keepd_owner; {sql}; COMMIT"))
            .await
            .unwrap_err();
        let _ = client.batch_execute("ROLLBACK").await;
        let message = err
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_default();
        assert!(message.contains("append-only"), "{sql}: {err}");
    }
}

/// Appends `n` entries from `writers` concurrent tasks.
/// Entries as the node itself writes them (its sealer chains its own).
async fn append_entries(node: &TestNode, writers: usize, n: usize) {
    let pool = node.pool(writers);
    let identity =
        keepd::identity::NodeIdentity::load(&node.state_dir().join("identity.key")).unwrap();
    let node_id = identity.node_id().to_string();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let (pool, node_id) = (pool.clone(), node_id.clone());
            tokio::spawn(async move {
                for i in 0..n {
                    let entry = keepd::audit::AuditEntry {
                        action: keepd::audit::AuditAction::NodeStart,
                        rows_affected: i as i64,
                        duration: Duration::from_micros(w as u64),
                        source_component: "test",
                        metadata: serde_json::json!({"writer": w}),
                    };
                    keepd::audit::record_alone(&pool, &node_id, &entry)
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

/// Waits until `keepd audit verify` reports nothing unsealed.
fn wait_sealed(node: &TestNode) -> String {
    wait_until(Duration::from_secs(20), || {
        let (code, text) = node.audit_verify();
        (code == 0 && text.contains(", 0 entries not yet sealed")).then_some(text)
    })
    .unwrap_or_else(|| panic!("never fully sealed: {:?}", node.audit_verify()))
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_writers_form_one_chain() {
    let (node, _daemon) = started();
    append_entries(&node, 8, 50).await;
    let text = wait_sealed(&node);
    let sealed: i64 = text
        .split_whitespace()
        .skip_while(|w| *w != "intact:")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    assert!(sealed >= 401, "{text}");
    let client = node.superuser().await;
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT prev_hash), min(seq), max(seq) FROM keepd_audit.audit_chain",
            &[],
        )
        .await
        .unwrap();
    let (count, distinct_prev, min, max): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!((count, min, max), (sealed, 1, sealed), "gap-free sequence");
    assert_eq!(
        distinct_prev, count,
        "no two links share a predecessor: no fork"
    );
}

/// A node with sealed and checkpointed entries, for tampering.
async fn tamper_target() -> (TestNode, common::Daemon, tokio_postgres::Client) {
    let (node, daemon) = started();
    append_entries(&node, 2, 5).await;
    wait_sealed(&node);
    // The checkpoint follows the head within a second of sealing.
    std::thread::sleep(Duration::from_millis(1500));
    let client = node.superuser().await;
    (node, daemon, client)
}

fn assert_broken_at(node: &TestNode, seq: i64, words: &str) {
    let (code, text) = node.audit_verify();
    assert_eq!(code, 1, "{text}");
    assert!(text.contains(&format!("broken at seq {seq}")), "{text}");
    assert!(text.contains(words), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_altered_entry_is_detected() {
    let (node, _daemon, client) = tamper_target().await;
    client
        .batch_execute(
            "ALTER TABLE keepd_audit.audit_log DISABLE TRIGGER ALL;
             UPDATE keepd_audit.audit_log SET rows_affected = rows_affected + 1
               WHERE id = (SELECT entry_id FROM keepd_audit.audit_chain WHERE seq = 3);
             ALTER TABLE keepd_audit.audit_log ENABLE TRIGGER ALL;",
        )
        .await
        .unwrap();
    assert_broken_at(&node, 3, "altered");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_entry_deleted_from_the_middle_is_detected() {
    let (node, _daemon, client) = tamper_target().await;
    client
        .batch_execute(
            "SET session_replication_role = replica;
             DELETE FROM keepd_audit.audit_log WHERE id = (SELECT entry_id FROM keepd_audit.audit_chain WHERE seq = 4);
             DELETE FROM keepd_audit.audit_chain WHERE seq = 4;
             SET session_replication_role = origin;",
        )
        .await
        .unwrap();
    assert_broken_at(&node, 4, "deleted");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_truncated_tail_is_detected_by_the_checkpoint() {
    let (node, daemon, client) = tamper_target().await;
    client
        .batch_execute(
            "SET session_replication_role = replica;
             CREATE TEMP TABLE doomed AS SELECT seq, entry_id FROM keepd_audit.audit_chain ORDER BY seq DESC LIMIT 2;
             DELETE FROM keepd_audit.audit_chain WHERE seq IN (SELECT seq FROM doomed);
             DELETE FROM keepd_audit.audit_log WHERE id IN (SELECT entry_id FROM doomed);
             SET session_replication_role = origin;",
        )
        .await
        .unwrap();
    let (code, text) = node.audit_verify();
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("tail was truncated"), "{text}");
    // keepd noticed too, and keeps the checkpoint as evidence.
    assert!(
        daemon
            .wait_for_log(
                "audit sealing failed; retrying every second",
                Duration::from_secs(5)
            )
            .is_some(),
        "{}",
        daemon.log()
    );
    let (code, _) = node.audit_verify();
    assert_eq!(code, 1, "the checkpoint was not overwritten");
}

/// Schema v6 counts what accounts stored before it: an upgrade of a
/// database holding data (in a database of its own, built to v5 first).
/// Schema v14 counts it again under one rule (decoded bytes; revoked
/// devices too), values sealed at rest included.
#[tokio::test(flavor = "multi_thread")]
async fn upgrading_to_usage_counts_what_accounts_already_hold() {
    let (node, _daemon) = started();
    node.superuser()
        .await
        .batch_execute("CREATE DATABASE keepd_upgrade OWNER keepd_owner")
        .await
        .unwrap();
    let mut config = node.pg_config();
    config
        .dbname("keepd_upgrade")
        .user("keepd_superuser")
        .password(node.credentials().superuser.expose());
    let (mut client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(
            "CREATE SCHEMA keepd AUTHORIZATION keepd_owner; \
             CREATE SCHEMA keepd_audit AUTHORIZATION keepd_owner;",
        )
        .await
        .unwrap();
    // Schema v5 as an older keepd left it (its grants do not matter here).
    let tx = client.transaction().await.unwrap();
    tx.batch_execute(
        "SET LOCAL ROLE keepd_owner; CREATE TABLE keepd.schema_migrations (version integer \
         PRIMARY KEY, name text NOT NULL, checksum text NOT NULL, applied_at timestamptz NOT NULL \
         DEFAULT now());",
    )
    .await
    .unwrap();
    for m in &migrate::MIGRATIONS[..5] {
        tx.batch_execute(m.sql).await.unwrap();
        tx.execute(
            "INSERT INTO keepd.schema_migrations (version, name, checksum) \
             VALUES ($1, $2, encode(sha256(convert_to($3, 'UTF8')), 'hex'))",
            &[&m.version, &m.name, &m.sql],
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    client.batch_execute("RESET ROLE").await.unwrap();
    // As the superuser (no row-level security): two accounts' data.
    let (alice, bob) = (uuid(), uuid());
    let (vault, device) = (uuid(), uuid());
    client
        .batch_execute(&format!(
            "INSERT INTO keepd.users (id, email_hmac, password_hash) VALUES \
               ('{alice}', '\\x01', 'h'), ('{bob}', '\\x02', 'h'); \
             INSERT INTO keepd.vaults (id, user_id, vault_id) VALUES ('{vault}', '{alice}', 'v'); \
             INSERT INTO keepd.sync_logs (id, vault, user_id, sequence, encrypted_data, nonce, haex_timestamp) VALUES \
               (gen_random_uuid(), '{vault}', '{alice}', 1, 'aaaa', 'bm4=', 't1'), \
               (gen_random_uuid(), '{vault}', '{alice}', 2, 'bbbbbbbb', 'bm4=', 't2'); \
             INSERT INTO keepd.devices (id, user_id, device_name, public_key, revoked_at) VALUES \
               ('{device}', '{alice}', 'd', sha256('a'), NULL), \
               (gen_random_uuid(), '{alice}', 'old', sha256('b'), now()); \
             INSERT INTO keepd.backups (id, user_id, device_id, ciphertext, nonce, auth_tag, signature, data_classification, size_bytes) VALUES \
               (gen_random_uuid(), '{alice}', '{device}', '\\x00', '\\x00', '\\x00', '\\x00', 'Internal', 100);"
        ))
        .await
        .unwrap();
    // Up to v13, as the keepd of that schema left it: its permission
    // matrix named only the tables it had, so the migrations are applied
    // as its `apply` did, without today's grants.
    let tx = client.transaction().await.unwrap();
    tx.batch_execute("SET LOCAL ROLE keepd_owner")
        .await
        .unwrap();
    for m in &migrate::MIGRATIONS[5..13] {
        tx.batch_execute(m.sql).await.unwrap();
        tx.execute(
            "INSERT INTO keepd.schema_migrations (version, name, checksum) \
             VALUES ($1, $2, encode(sha256(convert_to($3, 'UTF8')), 'hex'))",
            &[&m.version, &m.name, &m.sql],
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    let usage = |client: tokio_postgres::Client| async move {
        let rows = client
            .query(
                "SELECT user_id::text, storage_bytes, vaults, devices, backups \
                 FROM keepd.account_usage ORDER BY storage_bytes DESC",
                &[],
            )
            .await
            .unwrap();
        let usage: Vec<(String, i64, i32, i32, i32)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
            .collect();
        (client, usage)
    };
    let (mut client, counted) = usage(client).await;
    // v6: entries as their text, 4+4+2 and 8+4+2 bytes; the backup's 100;
    // one live device.
    assert_eq!(
        counted,
        vec![
            (alice.clone(), 10 + 14 + 100, 1, 1, 1),
            (bob.clone(), 0, 0, 0, 0)
        ]
    );

    // Values sealed at rest (their stored form only matters here): an
    // entry whose encryptedData was 8 characters of base64, nonce 4 and
    // timestamp 2 bytes; a backup of 5 bytes of ciphertext (sealed), a
    // 12-byte nonce (in the clear) and a 16-byte tag (sealed).
    client
        .batch_execute(&format!(
            "INSERT INTO keepd.sync_logs (id, vault, user_id, sequence, encrypted_data, nonce, haex_timestamp) VALUES \
               (gen_random_uuid(), '{vault}', '{alice}', 3, \
                'kf1:1:' || encode(decode(repeat('00', 28 + 8), 'hex'), 'base64'), \
                'kf1:1:' || encode(decode(repeat('00', 28 + 4), 'hex'), 'base64'), \
                'kf1:1:' || encode(decode(repeat('00', 28 + 2), 'hex'), 'base64')); \
             INSERT INTO keepd.backups (id, user_id, device_id, ciphertext, nonce, auth_tag, signature, data_classification, size_bytes) VALUES \
               (gen_random_uuid(), '{alice}', '{device}', \
                '\\x4b463100000001'::bytea || decode(repeat('00', 28 + 5), 'hex'), \
                decode(repeat('00', 12), 'hex'), \
                '\\x4b463100000001'::bytea || decode(repeat('00', 28 + 16), 'hex'), \
                '\\x00', 'Internal', 1);"
        ))
        .await
        .unwrap();
    migrate::apply(&mut client, migrate::MIGRATIONS)
        .await
        .unwrap();
    let (client, counted) = usage(client).await;
    // v14: the decoded bytes. Entries 3+2+2 and 6+2+2; the sealed one
    // 6 (8 characters of base64 whose padding sealing hides: counted
    // high) + 3 + 2; backups 1+1+1 and 5+12+16. Both devices count (a
    // revoked one until it is purged).
    assert_eq!(
        counted,
        vec![
            (alice.clone(), 7 + 10 + 11 + 3 + 33, 1, 2, 2),
            (bob.clone(), 0, 0, 0, 0)
        ]
    );
    let vault_bytes: i64 = client
        .query_one("SELECT bytes FROM keepd.vaults", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(vault_bytes, 7 + 10 + 11);
    // v26: the vault's largest entry as stored, which bounds its pages:
    // the sealed one, 54 + 50 + 46 characters.
    let largest: i64 = client
        .query_one("SELECT largest_entry FROM keepd.vaults", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(largest, 54 + 50 + 46);
    let helpers: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_proc WHERE proname LIKE 'v14\\_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(helpers, 0, "the migration's helpers were left behind");
    // Row-level security is forced again on every table the backfill read.
    let unforced: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'keepd' AND c.relkind = 'r' AND c.relname <> 'schema_migrations' \
               AND NOT c.relforcerowsecurity",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(unforced, 0);
}

/// `keepd migrate status` says which migrations are applied, and names a
/// changed or unknown one with exit 1.
#[test]
fn migrate_status_names_every_migration_and_a_changed_one() {
    let (node, _daemon) = started();
    let status = |node: &TestNode| {
        let out = node
            .command(&["migrate", "status", "--json"])
            .output()
            .unwrap();
        let listed: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
        (out.status.code(), listed)
    };
    let (code, listed) = status(&node);
    assert_eq!(code, Some(0), "{listed}");
    let listed = listed.as_array().unwrap().clone();
    assert_eq!(listed.len(), migrate::MIGRATIONS.len());
    assert!(
        listed
            .iter()
            .all(|m| m["state"] == "applied" && m["appliedAt"].is_string())
    );

    node.psql(
        "superuser",
        "UPDATE keepd.schema_migrations SET checksum = repeat('0', 64) WHERE version = 3; \
         INSERT INTO keepd.schema_migrations (version, name, checksum) \
         VALUES (999, 'from_a_newer_keepd', repeat('f', 64))",
    )
    .unwrap();
    let (code, listed) = status(&node);
    assert_eq!(code, Some(1), "{listed}");
    let state = |version: i64| {
        listed
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["version"] == version)
            .unwrap()["state"]
            .clone()
    };
    assert_eq!(state(3), "changed");
    assert_eq!(state(999), "unknown");
    assert_eq!(state(1), "applied");
    let text = node.command(&["migrate", "status"]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains("from_a_newer_keepd") && l.contains("unknown")),
        "{text}"
    );
}

/// Schema v24 checks a log entry's vault once per statement instead of
/// per-row foreign keys: every entry must name a vault of its own account,
/// and erasing a vault or an account (even as the superuser, with no
/// tenant) removes the entries, as ON DELETE CASCADE did.
#[tokio::test(flavor = "multi_thread")]
async fn log_entries_name_a_vault_of_their_account_and_leave_with_it() {
    let (node, _daemon) = started();
    let pool = node.pool(2);
    let (alice, bob) = (uuid(), uuid());
    populate(&pool, &alice).await;
    populate(&pool, &bob).await;
    let db = node.superuser().await;
    let vault_of = |user: &str| format!("(SELECT id FROM keepd.vaults WHERE user_id = '{user}')");
    let insert = |vault: &str, user: &str, sequence: i64| {
        format!(
            "INSERT INTO keepd.sync_logs (id, vault, user_id, sequence, encrypted_data, nonce, haex_timestamp, size_bytes) \
             VALUES (gen_random_uuid(), {vault}, '{user}', {sequence}, 'd', 'n', 't', 100)"
        )
    };
    let refused = |e: tokio_postgres::Error| {
        assert_eq!(
            e.code(),
            Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION),
            "{e}"
        );
    };
    // Another account's vault, a vault that does not exist, and a move of
    // an entry to another account's vault: refused, even to the superuser.
    refused(
        db.batch_execute(&insert(&vault_of(&bob), &alice, 2))
            .await
            .unwrap_err(),
    );
    refused(
        db.batch_execute(&insert(&format!("'{}'", uuid()), &alice, 2))
            .await
            .unwrap_err(),
    );
    refused(
        db.batch_execute(&format!(
            "UPDATE keepd.sync_logs SET vault = {}, sequence = 100 WHERE user_id = '{alice}'",
            vault_of(&bob)
        ))
        .await
        .unwrap_err(),
    );
    // Its own vault: stored.
    db.batch_execute(&insert(&vault_of(&alice), &alice, 2))
        .await
        .unwrap();
    let count = |user: String| {
        let db = &db;
        async move {
            db.query_one(
                &format!("SELECT count(*) FROM keepd.sync_logs WHERE user_id = '{user}'"),
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
        }
    };
    assert_eq!(count(alice.clone()).await, 2);
    // Every write keeps the vault's largest entry, as stored (schema v26:
    // it bounds a page), even by hand: raised, never lowered.
    let largest = || {
        let (db, alice) = (&db, &alice);
        async move {
            let sql = format!("SELECT largest_entry FROM keepd.vaults WHERE user_id = '{alice}'");
            db.query_one(&sql, &[]).await.unwrap().get::<_, i64>(0)
        }
    };
    assert_eq!(largest().await, 3, "'d', 'n', 't'");
    for (data, expected) in [("dddddddddd", 12), ("d", 12)] {
        db.batch_execute(&format!(
            "UPDATE keepd.sync_logs SET encrypted_data = '{data}' \
             WHERE user_id = '{alice}' AND sequence = 2"
        ))
        .await
        .unwrap();
        assert_eq!(largest().await, expected, "after {data}");
    }
    let storage = || {
        let (db, alice) = (&db, &alice);
        async move {
            db.query_one(
                &format!("SELECT storage_bytes FROM keepd.account_usage WHERE user_id = '{alice}'"),
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
        }
    };
    let before = storage().await;
    // Erasing the vault as the superuser (no tenant) takes its entries and
    // gives their bytes back; erasing an account takes its vaults' entries.
    db.batch_execute(&format!(
        "DELETE FROM keepd.vaults WHERE user_id = '{alice}'"
    ))
    .await
    .unwrap();
    assert_eq!(count(alice.clone()).await, 0);
    assert_eq!(
        storage().await,
        before - 100,
        "an erased vault's entries no longer count"
    );
    assert_eq!(count(bob.clone()).await, 1);
    db.batch_execute(&format!("DELETE FROM keepd.users WHERE id = '{bob}'"))
        .await
        .unwrap();
    assert_eq!(count(bob).await, 0);
}
