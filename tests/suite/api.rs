//! The sync API over real HTTPS against a real keepd and Postgres, driven
//! by the reference client.

use crate::common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::{Daemon, TestNode};
use hyper::Method;
use keepd::client::{DeviceKey, LogEntry, SyncClient, VaultKey};
use serde_json::{Value, json};

const PASSWORD: &str = "correct horse battery";

/// A node whose rate limits do not get in the tests' way, with these
/// `api` settings (`json!({"max_push_entries": 100})`).
fn api_node(api: Value) -> (TestNode, Daemon) {
    let node = TestNode::with_https(common::unlimited_rates());
    node.merge(json!({ "api": api }));
    let daemon = node.start_healthy();
    (node, daemon)
}

fn email() -> String {
    format!("user-{}@example.org", common::uuid())
}

/// A registered, logged-in client.
async fn user(daemon: &Daemon) -> (SyncClient, String) {
    let email = email();
    let mut client = daemon.client();
    client.register(&email, PASSWORD).await.unwrap();
    client.login(&email, PASSWORD).await.unwrap();
    (client, email)
}

/// An account of the password routes (HaexHub's), logged in.
async fn password_user(daemon: &Daemon) -> (SyncClient, String) {
    let email = email();
    let mut client = daemon.client();
    client
        .register_with_password(&email, PASSWORD)
        .await
        .unwrap();
    client.login_with_password(&email, PASSWORD).await.unwrap();
    (client, email)
}

fn entries(n: usize, tag: &str) -> Vec<LogEntry> {
    (0..n)
        .map(|i| LogEntry {
            data: format!("{tag}-{i}").into_bytes(),
            haex_timestamp: format!("{tag}-{i:06}"),
        })
        .collect()
}

async fn raw(client: &SyncClient, method: Method, path: &str, body: &str) -> (u16, Value) {
    let answer = client
        .send(method, path, &[], Some(body.as_bytes().to_vec()))
        .await
        .unwrap();
    (answer.status, answer.body)
}

/// The error code of a JSON error answer, checking its shape.
fn code(answer: &(u16, Value)) -> &str {
    let error = &answer.1["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "no message in {answer:?}"
    );
    error["code"].as_str().unwrap_or("")
}

async fn sql_rows(node: &TestNode, sql: &str) -> Vec<tokio_postgres::Row> {
    node.superuser().await.query(sql, &[]).await.unwrap()
}

/// Registration (one account per address however it is spelled, bad
/// addresses and weak passwords refused), login (a wrong password and an
/// unknown account answered alike), and what is kept: no address in the
/// table, no secret in the audit trail.
#[tokio::test(flavor = "multi_thread")]
async fn accounts_register_and_log_in_and_nothing_secret_is_kept() {
    let (node, daemon) = api_node(json!({}));
    let email = email();
    let mut client = daemon.client();

    let registered = client
        .send(
            Method::POST,
            "/auth/register",
            &[],
            Some(
                json!({"email": email.to_uppercase(), "password": PASSWORD})
                    .to_string()
                    .into_bytes(),
            ),
        )
        .await
        .unwrap();
    assert_eq!(registered.status, 201, "{}", registered.text);
    assert_eq!(registered.body["user"]["email"], email);
    assert!(
        registered.body["user"]["createdAt"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    let again = client.register(&email, PASSWORD).await.unwrap_err();
    assert_eq!(again.code(), Some("email_taken"));
    // One account per address however it is spelled: a fullwidth first
    // letter is the same address; an invisible character is refused.
    let mut fullwidth: String = email.chars().skip(1).collect();
    fullwidth.insert(0, char::from_u32(0xFF55).unwrap()); // FULLWIDTH u
    let same = client.register(&fullwidth, PASSWORD).await.unwrap_err();
    assert_eq!(same.code(), Some("email_taken"), "{same}");
    let hidden = client
        .register(&format!("{email}\u{200B}"), PASSWORD)
        .await
        .unwrap_err();
    assert_eq!(hidden.code(), Some("invalid_email"), "{hidden}");
    let bad_email = client.register("not-an-email", PASSWORD).await.unwrap_err();
    assert_eq!(bad_email.code(), Some("invalid_email"));
    let weak = client
        .register_with_password(&self::email(), "short")
        .await
        .unwrap_err();
    assert_eq!(weak.code(), Some("weak_password"));

    // Wrong password and unknown account: the same answer.
    let wrong = client
        .send(
            Method::POST,
            "/auth/login",
            &[],
            Some(
                json!({"email": email, "password": "wrong password"})
                    .to_string()
                    .into_bytes(),
            ),
        )
        .await
        .unwrap();
    let unknown = client
        .send(
            Method::POST,
            "/auth/login",
            &[],
            Some(
                json!({"email": self::email(), "password": PASSWORD})
                    .to_string()
                    .into_bytes(),
            ),
        )
        .await
        .unwrap();
    assert_eq!((wrong.status, unknown.status), (401, 401));
    assert_eq!(
        wrong.text, unknown.text,
        "login failures must be indistinguishable"
    );

    let login = client
        .send(
            Method::POST,
            "/auth/login",
            &[],
            Some(
                json!({"email": email, "password": PASSWORD})
                    .to_string()
                    .into_bytes(),
            ),
        )
        .await
        .unwrap();
    assert_eq!(login.status, 200, "{}", login.text);
    assert_eq!(login.body["message"], "Login successful");
    assert_eq!(login.body["user"], registered.body["user"]);
    let token = login.body["token"].as_str().unwrap().to_string();
    client.set_token(Some(token.clone()));
    client.create_vault("v", PASSWORD).await.unwrap();

    // The table holds no address, and no secret reached the audit trail.
    let users = sql_rows(&node, "SELECT string_agg(u::text, '') FROM keepd.users u").await;
    let users: String = users[0].get(0);
    assert!(!users.contains(&email) && !users.contains("example.org"));
    let audit = sql_rows(
        &node,
        "SELECT string_agg(action || ' ' || metadata::text, E'\\n' ORDER BY id) FROM keepd_audit.audit_log",
    )
    .await;
    let audit: String = audit[0].get(0);
    for action in ["USER_REGISTER", "LOGIN", "LOGIN_FAILED", "VAULT_KEY_STORE"] {
        assert!(audit.contains(action), "{action} not audited:\n{audit}");
    }
    for secret in [email.as_str(), "example.org", "127.0.0.1", &token, PASSWORD] {
        assert!(!audit.contains(secret), "{secret} in the audit trail");
    }
}

/// Logout revokes the token; a password change ends every session.
#[tokio::test(flavor = "multi_thread")]
async fn logout_and_a_password_change_end_sessions() {
    let (_node, daemon) = api_node(json!({}));
    let (mut client, email) = user(&daemon).await;
    client.create_vault("v", PASSWORD).await.unwrap();
    // Logout revokes the token.
    client.logout().await.unwrap();
    let after = client.pull("v", 0, 10).await.unwrap_err();
    assert_eq!(after.status(), Some(401));

    // A password change ends every session.
    let mut first = daemon.client();
    first.login(&email, PASSWORD).await.unwrap();
    let mut second = daemon.client();
    second.login(&email, PASSWORD).await.unwrap();
    first
        .change_password(&email, PASSWORD, "a new long password")
        .await
        .unwrap();
    for session in [&first, &second] {
        assert_eq!(session.devices().await.unwrap_err().status(), Some(401));
    }
    assert!(client.login(&email, PASSWORD).await.is_err());
    let mut owner = daemon.client();
    owner.login(&email, "a new long password").await.unwrap();
}

/// Erasure asks for the password and removes the account and everything
/// it owns; the audit trail records it and still verifies.
#[tokio::test(flavor = "multi_thread")]
async fn erasure_removes_the_account_and_everything_it_owns() {
    let (node, daemon) = api_node(json!({}));
    let (_, email) = user(&daemon).await;
    let mut owner = daemon.client();
    let user = owner.login(&email, PASSWORD).await.unwrap();
    owner.create_vault("v", PASSWORD).await.unwrap();
    let key = owner.open_vault("v", PASSWORD).await.unwrap();
    owner.push("v", &key, &entries(3, "e"), None).await.unwrap();
    let device = DeviceKey::generate().unwrap();
    let device_id = owner.register_device("laptop", &device).await.unwrap();
    owner
        .store_backup(&device_id, &device, &key, b"backup", "Internal")
        .await
        .unwrap();
    // Not on the token alone: the password is asked for.
    let refused = owner
        .delete_account(&email, "not the password")
        .await
        .unwrap_err();
    assert_eq!(refused.status(), Some(401));
    let refused = owner
        .send(Method::DELETE, "/account", &[], Some(b"{}".to_vec()))
        .await
        .unwrap();
    assert_eq!(refused.status, 400, "{}", refused.text);
    assert_eq!(refused.body["error"]["code"], "missing_proof");
    if let Err(e) = owner.delete_account(&email, PASSWORD).await {
        panic!("{e:?}\n{}", daemon.log());
    }
    for table in [
        "users",
        "sessions",
        "vaults",
        "vault_keys",
        "sync_logs",
        "push_requests",
        "devices",
        "backups",
    ] {
        let column = if table == "users" { "id" } else { "user_id" };
        let rows = sql_rows(
            &node,
            &format!(
                "SELECT count(*) FROM keepd.{table} WHERE {column} = '{}'",
                user.id
            ),
        )
        .await;
        assert_eq!(
            rows[0].get::<_, i64>(0),
            0,
            "{table} kept rows of an erased user"
        );
    }
    assert_eq!(
        owner.login(&email, PASSWORD).await.unwrap_err().code(),
        Some("invalid_credentials")
    );
    let erased = sql_rows(
        &node,
        "SELECT count(*) FROM keepd_audit.audit_log WHERE action = 'ACCOUNT_ERASE'",
    )
    .await;
    assert_eq!(erased[0].get::<_, i64>(0), 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (code, text) = node.audit_verify();
    assert_eq!(code, 0, "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_expired_and_foreign_tokens_are_refused() {
    let (node, daemon) = api_node(json!({}));
    let (client, _) = user(&daemon).await;
    let token = client.token().unwrap().to_string();
    let parts: Vec<&str> = token.split('.').collect();
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;

    let (victim, _) = user(&daemon).await;
    let victim_claims: Value = serde_json::from_slice(
        &B64.decode(victim.token().unwrap().split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    let mut claims: Value = serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap();
    claims["sub"] = victim_claims["sub"].clone();
    let swapped = format!(
        "{}.{}.{}",
        parts[0],
        B64.encode(claims.to_string()),
        parts[2]
    );
    let alg_none = format!(
        "{}.{}.",
        B64.encode(r#"{"alg":"none","typ":"JWT"}"#),
        parts[1]
    );
    // Expired: a real signature with the cluster's key, zero lifetime.
    let (identity, cluster) = node.cluster_key().await;
    let sub = uuid::Uuid::parse_str(claims["sub"].as_str().unwrap()).unwrap();
    let sid = uuid::Uuid::parse_str(claims["sid"].as_str().unwrap()).unwrap();
    let (expired, _) =
        keepd::tokens::TokenIssuer::new(&cluster, identity.node_id().as_str(), Duration::ZERO)
            .issue(sub, sid);
    // Another cluster's key.
    let stranger = keepd::cluster::ClusterKey::generate().unwrap();
    let (foreign, _) = keepd::tokens::TokenIssuer::new(
        &stranger,
        identity.node_id().as_str(),
        Duration::from_secs(600),
    )
    .issue(sub, sid);

    for (what, bad) in [
        ("swapped subject", swapped),
        ("alg none", alg_none),
        ("expired", expired),
        ("foreign", foreign),
        ("garbage", "abc".to_string()),
    ] {
        let mut forged = daemon.client();
        forged.set_token(Some(bad));
        for (method, path) in [
            (Method::GET, "/devices"),
            (Method::GET, "/backups"),
            (Method::GET, "/sync/vault-key/v"),
            (Method::POST, "/sync/pull"),
            (Method::POST, "/sync/push"),
            (Method::DELETE, "/account"),
        ] {
            let answer = raw(&forged, method, path, r#"{"vaultId":"v"}"#).await;
            assert_eq!(answer.0, 401, "{what} token on {path}: {answer:?}");
            assert_eq!(code(&answer), "unauthorized");
        }
    }
    let anonymous = daemon.client();
    let answer = raw(&anonymous, Method::GET, "/devices", "").await;
    assert_eq!(answer.0, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn vault_keys_push_pull_and_bad_input() {
    let (node, daemon) = api_node(json!({"max_push_entries": 100, "max_body_bytes": 65536}));
    let (client, _) = user(&daemon).await;

    // Vault key: created once, even when many race for it.
    let key = VaultKey::generate().unwrap();
    let wrapped = Arc::new(key.wrap(PASSWORD).unwrap());
    let client = Arc::new(client);
    let mut racers = Vec::new();
    for _ in 0..8 {
        let (client, wrapped) = (client.clone(), wrapped.clone());
        racers.push(tokio::spawn(async move {
            client.store_vault_key("notes", &wrapped).await
        }));
    }
    let mut created = 0;
    for racer in racers {
        match racer.await.unwrap() {
            Ok(answer) => {
                created += 1;
                assert_eq!(answer["message"], "Vault key stored successfully");
                assert_eq!(answer["vaultKey"]["vaultId"], "notes");
                assert!(answer["vaultKey"]["id"].is_string());
            }
            Err(e) => assert_eq!(e.code(), Some("vault_key_exists"), "{e}"),
        }
    }
    assert_eq!(created, 1);
    let opened = client.open_vault("notes", PASSWORD).await.unwrap();
    let missing = client.open_vault("nope", PASSWORD).await.unwrap_err();
    assert_eq!(
        (missing.status(), missing.code()),
        (Some(404), Some("vault_not_found"))
    );

    // Push and pull.
    let pushed = client
        .push("notes", &opened, &entries(5, "a"), None)
        .await
        .unwrap();
    assert_eq!(pushed.count, 5);
    let sequences: Vec<i64> = pushed.logs.iter().map(|l| l.sequence).collect();
    assert_eq!(sequences, vec![1, 2, 3, 4, 5]);
    let page = client.pull("notes", 0, 2).await.unwrap();
    assert!(page.has_more);
    assert_eq!(page.logs.len(), 2);
    let rest = client.pull("notes", 2, 100).await.unwrap();
    assert!(!rest.has_more);
    assert_eq!(
        rest.logs.iter().map(|l| l.sequence).collect::<Vec<_>>(),
        vec![3, 4, 5]
    );
    let plain = key
        .decrypt_entry(&rest.logs[0].encrypted_data, &rest.logs[0].nonce)
        .unwrap();
    assert_eq!(plain, b"a-2");
    assert_eq!(rest.logs[0].haex_timestamp, "a-000002");

    // Idempotent retry (the same request again): the first result,
    // nothing stored twice.
    let sealed = SyncClient::seal_push("notes", &key, &entries(3, "b")).unwrap();
    let first = client.push_sealed(&sealed, Some("retry-1")).await.unwrap();
    let retry = client.push_sealed(&sealed, Some("retry-1")).await.unwrap();
    assert_eq!(
        first.logs.iter().map(|l| &l.id).collect::<Vec<_>>(),
        retry.logs.iter().map(|l| &l.id).collect::<Vec<_>>()
    );
    let stored = sql_rows(&node, "SELECT count(*) FROM keepd.sync_logs").await;
    assert_eq!(stored[0].get::<_, i64>(0), 8);

    // Bad input: 4xx with a code, never a 500.
    let good_entry = r#"{"encryptedData":"AAAA","nonce":"AAAA","haexTimestamp":"t"}"#;
    let big = format!(
        r#"{{"vaultId":"notes","logs":[{}]}}"#,
        vec![good_entry; 101].join(",")
    );
    let huge = format!(
        r#"{{"vaultId":"notes","logs":[{{"encryptedData":"{}","nonce":"AAAA","haexTimestamp":"t"}}]}}"#,
        "A".repeat(70_000)
    );
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("malformed", r#"{"vaultId":"#.into(), 400, "malformed_json"),
        ("wrong type", r#"{"vaultId":1,"logs":[]}"#.into(), 400, "invalid_body"),
        ("missing field", r#"{"vaultId":"notes"}"#.into(), 400, "invalid_body"),
        ("empty batch", r#"{"vaultId":"notes","logs":[]}"#.into(), 400, "invalid_batch_size"),
        ("too many", big, 400, "invalid_batch_size"),
        ("oversize", huge, 413, "body_too_large"),
        (
            "bad base64",
            r#"{"vaultId":"notes","logs":[{"encryptedData":"!!","nonce":"AAAA","haexTimestamp":"t"}]}"#.into(),
            400,
            "invalid_base64",
        ),
        (
            "unknown vault",
            format!(r#"{{"vaultId":"other","logs":[{good_entry}]}}"#),
            404,
            "vault_not_found",
        ),
        ("empty vault id", format!(r#"{{"vaultId":"","logs":[{good_entry}]}}"#), 400, "invalid_vault_id"),
        (
            "NUL in a timestamp",
            r#"{"vaultId":"notes","logs":[{"encryptedData":"AAAA","nonce":"AAAA","haexTimestamp":"t\u0000"}]}"#.into(),
            400,
            "invalid_timestamp",
        ),
        ("NUL in a vault id", format!(r#"{{"vaultId":"n\u0000","logs":[{good_entry}]}}"#), 400, "invalid_vault_id"),
    ];
    for (what, body, status, expected) in cases {
        let answer = raw(&client, Method::POST, "/sync/push", &body).await;
        assert_eq!(answer.0, status, "{what}: {answer:?}");
        assert_eq!(code(&answer), expected, "{what}");
    }
    for (body, expected) in [
        (r#"{"vaultId":"notes","limit":0}"#, "invalid_limit"),
        (r#"{"vaultId":"notes","limit":1001}"#, "invalid_limit"),
        (
            r#"{"vaultId":"notes","afterSequence":-1}"#,
            "invalid_after_sequence",
        ),
        (r#"{"vaultId":"notes","afterSequence":"x"}"#, "invalid_body"),
    ] {
        let answer = raw(&client, Method::POST, "/sync/pull", body).await;
        assert_eq!((answer.0, code(&answer)), (400, expected), "{body}");
    }
    let no_type = client
        .send(
            Method::POST,
            "/sync/pull",
            &[("content-type", "text/plain")],
            None,
        )
        .await
        .unwrap();
    assert_eq!(no_type.status, 415, "{}", no_type.text);
    let bad_key = raw(
        &client,
        Method::POST,
        "/sync/vault-key",
        r#"{"vaultId":"x","encryptedVaultKey":"not base64!","salt":"AAAA","nonce":"AAAA"}"#,
    )
    .await;
    assert_eq!((bad_key.0, code(&bad_key)), (400, "invalid_base64"));
    assert!(!daemon.log().contains("request failed"), "{}", daemon.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_pushers_get_gap_free_sequences_and_readers_miss_nothing() {
    const PUSHERS: usize = 8;
    const PUSHES: usize = 50;
    const PER_PUSH: usize = 3;
    let (_node, daemon) = api_node(json!({}));
    let email = email();
    let mut owner = daemon.client();
    owner.register(&email, PASSWORD).await.unwrap();
    owner.login(&email, PASSWORD).await.unwrap();
    let key = Arc::new(owner.create_vault("shared", PASSWORD).await.unwrap());
    let token = owner.token().unwrap().to_string();

    let reader = {
        let mut client = daemon.client();
        client.set_token(Some(token.clone()));
        tokio::spawn(async move {
            let total = (PUSHERS * PUSHES * PER_PUSH) as i64;
            let mut seen = Vec::new();
            let mut after = 0;
            while after < total {
                let page = client.pull("shared", after, 37).await.unwrap();
                for log in &page.logs {
                    seen.push(log.sequence);
                }
                after = seen.last().copied().unwrap_or(0);
                if page.logs.is_empty() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            seen
        })
    };
    let mut pushers = Vec::new();
    for p in 0..PUSHERS {
        let mut client = daemon.client();
        client.set_token(Some(token.clone()));
        let key = key.clone();
        pushers.push(tokio::spawn(async move {
            let mut sequences = Vec::new();
            for i in 0..PUSHES {
                let batch = entries(PER_PUSH, &format!("p{p}-{i}"));
                let pushed = client.push("shared", &key, &batch, None).await.unwrap();
                let seq: Vec<i64> = pushed.logs.iter().map(|l| l.sequence).collect();
                assert!(
                    seq.windows(2).all(|w| w[1] == w[0] + 1),
                    "a batch's sequences are contiguous: {seq:?}"
                );
                sequences.extend(seq);
            }
            sequences
        }));
    }
    let mut all = Vec::new();
    for pusher in pushers {
        all.extend(pusher.await.unwrap());
    }
    all.sort_unstable();
    let total = (PUSHERS * PUSHES * PER_PUSH) as i64;
    assert_eq!(all, (1..=total).collect::<Vec<_>>(), "gap-free and unique");
    let seen = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        seen,
        (1..=total).collect::<Vec<_>>(),
        "the reader skipped or repeated entries"
    );
    let unique: BTreeSet<_> = seen.into_iter().collect();
    assert_eq!(unique.len() as i64, total);
}

/// A node, a logged-in user with vault `v` and a registered device:
/// (node, daemon, client, the vault's key, the device's key, its id).
async fn user_with_device() -> (TestNode, Daemon, SyncClient, VaultKey, DeviceKey, String) {
    let (node, daemon) = api_node(json!({}));
    let (client, _) = user(&daemon).await;
    let key = client.create_vault("v", PASSWORD).await.unwrap();
    let device = DeviceKey::generate().unwrap();
    let device_id = client.register_device("laptop", &device).await.unwrap();
    (node, daemon, client, key, device, device_id)
}

/// A registered device is listed with its key; a device with a bad key,
/// name or encoding is refused with the code that says which.
#[tokio::test(flavor = "multi_thread")]
async fn devices_are_listed_and_bad_device_input_is_refused() {
    let (_node, _daemon, client, _key, device, device_id) = user_with_device().await;
    let listed = client.devices().await.unwrap();
    assert_eq!(listed["devices"][0]["id"], device_id);
    assert_eq!(listed["devices"][0]["publicKey"], device.public_key());
    for (body, expected) in [
        (
            r#"{"deviceName":"x","publicKey":"AAAA","proof":"AAAA"}"#,
            "invalid_public_key",
        ),
        (
            r#"{"deviceName":"x","publicKey":"%%%","proof":"AAAA"}"#,
            "invalid_base64",
        ),
        (
            r#"{"deviceName":"","publicKey":"AAAA","proof":"AAAA"}"#,
            "invalid_device_name",
        ),
        (
            r#"{"deviceName":"lap\u0000top","publicKey":"AAAA","proof":"AAAA"}"#,
            "invalid_device_name",
        ),
        // The identity point (1, 0, ..., 0) and the all-zero encoding of
        // a small-order point: weak, refused.
        (
            r#"{"deviceName":"x","publicKey":"AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","proof":"AAAA"}"#,
            "weak_public_key",
        ),
        (
            r#"{"deviceName":"x","publicKey":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","proof":"AAAA"}"#,
            "weak_public_key",
        ),
    ] {
        let answer = raw(&client, Method::POST, "/devices", body).await;
        assert_eq!((answer.0, code(&answer)), (400, expected), "{body}");
        if body.contains("\\u0000") {
            let message = answer.1["error"]["message"].as_str().unwrap();
            assert!(
                message.contains("deviceName") && message.contains("NUL"),
                "{message}"
            );
        }
    }
}

/// Backups are stored as ciphertext only, restored, and listed newest
/// first, paged, metadata only.
#[tokio::test(flavor = "multi_thread")]
async fn backups_are_stored_sealed_restored_and_paged() {
    let (node, _daemon, client, key, device, device_id) = user_with_device().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let plaintext = format!("backup {i}");
        ids.push(
            client
                .store_backup(
                    &device_id,
                    &device,
                    &key,
                    plaintext.as_bytes(),
                    "Confidential",
                )
                .await
                .unwrap(),
        );
    }
    let restored = client.restore_backup(&ids[4], &key).await.unwrap();
    assert_eq!(restored, b"backup 4");
    // keepd holds ciphertext only.
    let stored = sql_rows(
        &node,
        "SELECT string_agg(encode(ciphertext, 'escape'), '') FROM keepd.backups",
    )
    .await;
    assert!(!stored[0].get::<_, String>(0).contains("backup"));

    // Newest first, paged, metadata only.
    let first = client.backups("?limit=2").await.unwrap();
    let page: Vec<&str> = first["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(page, vec![ids[4].as_str(), ids[3].as_str()]);
    assert!(first["backups"][0].get("ciphertext").is_none());
    assert_eq!(first["backups"][0]["dataClassification"], "Confidential");
    let cursor = first["nextCursor"].as_str().unwrap();
    let second = client
        .backups(&format!("?limit=2&before={cursor}"))
        .await
        .unwrap();
    assert_eq!(second["backups"][0]["id"], ids[2]);
    let last = client
        .backups(&format!("?limit=2&before={}", ids[1]))
        .await
        .unwrap();
    assert_eq!(last["backups"].as_array().unwrap().len(), 1);
    assert!(last["nextCursor"].is_null());
    for query in ["?limit=0", "?limit=abc", "?before=not-a-uuid"] {
        let e = client.backups(query).await.unwrap_err();
        assert_eq!(e.status(), Some(400), "{query}: {e}");
    }
}

/// Backup signatures are checked before anything is stored: a wrong key,
/// other bytes, a short signature, a bad class, an unknown or revoked
/// device are refused; version 2 binds the classification, nonce and tag;
/// the same backup twice is refused; a legacy signature is accepted and
/// named; only what was accepted is stored and audited.
#[tokio::test(flavor = "multi_thread")]
async fn backup_signatures_are_checked_before_anything_is_stored() {
    let (node, _daemon, client, key, device, device_id) = user_with_device().await;
    // Signatures are checked before anything is stored.
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as B64;
    let backup = key.encrypt_backup(b"payload").unwrap();
    let body = |signature: String, classification: &str, device: &str| {
        json!({
            "deviceId": device,
            "ciphertext": B64.encode(&backup.ciphertext),
            "nonce": B64.encode(&backup.nonce),
            "authTag": B64.encode(&backup.auth_tag),
            "signature": signature,
            "dataClassification": classification,
        })
        .to_string()
    };
    let other_device = DeviceKey::generate().unwrap();
    let cases = [
        (
            "wrong key",
            body(
                other_device.sign(&backup.ciphertext),
                "Internal",
                &device_id,
            ),
            400,
            "bad_signature",
        ),
        (
            "signs other bytes",
            body(device.sign(b"other"), "Internal", &device_id),
            400,
            "bad_signature",
        ),
        (
            "short signature",
            body(B64.encode([1u8; 10]), "Internal", &device_id),
            400,
            "invalid_signature",
        ),
        (
            "bad class",
            body(device.sign(&backup.ciphertext), "Secret", &device_id),
            400,
            "invalid_body",
        ),
        (
            "unknown device",
            body(device.sign(&backup.ciphertext), "Internal", &common::uuid()),
            403,
            "unknown_device",
        ),
    ];
    for (what, body, status, expected) in cases {
        let answer = raw(&client, Method::POST, "/backups", &body).await;
        assert_eq!((answer.0, code(&answer)), (status, expected), "{what}");
    }

    // Version 2 (keepd's client) binds the classification, nonce and tag:
    // the same signature under another classification does not verify.
    let v2 = |classification: &str, signed_as: &str| {
        let device_uuid = device_id.parse().unwrap();
        let message = keepd::device_messages::backup_v2(
            device_uuid,
            signed_as,
            &backup.nonce,
            &backup.auth_tag,
            &backup.ciphertext,
        );
        let mut body: Value =
            serde_json::from_str(&body(device.sign(&message), classification, &device_id)).unwrap();
        body["signatureVersion"] = json!(2);
        body.to_string()
    };
    let answer = raw(
        &client,
        Method::POST,
        "/backups",
        &v2("Restricted", "Internal"),
    )
    .await;
    assert_eq!((answer.0, code(&answer)), (400, "bad_signature"));
    let answer = raw(
        &client,
        Method::POST,
        "/backups",
        &v2("Internal", "Internal"),
    )
    .await;
    assert_eq!(answer.0, 201, "{answer:?}");
    assert_eq!(answer.1["backup"]["signatureScheme"], "v2");
    // The same backup again is refused, under either scheme.
    let answer = raw(
        &client,
        Method::POST,
        "/backups",
        &v2("Internal", "Internal"),
    )
    .await;
    assert_eq!((answer.0, code(&answer)), (409, "backup_exists"));
    let legacy = body(device.sign(&backup.ciphertext), "Internal", &device_id);
    let answer = raw(&client, Method::POST, "/backups", &legacy).await;
    assert_eq!((answer.0, code(&answer)), (409, "backup_exists"));
    // A legacy (ciphertext-only) signature is still accepted, and named.
    let other = key.encrypt_backup(b"from an old client").unwrap();
    let legacy = json!({
        "deviceId": device_id,
        "ciphertext": B64.encode(&other.ciphertext),
        "nonce": B64.encode(&other.nonce),
        "authTag": B64.encode(&other.auth_tag),
        "signature": device.sign(&other.ciphertext),
        "dataClassification": "Internal",
    });
    let answer = raw(&client, Method::POST, "/backups", &legacy.to_string()).await;
    assert_eq!(answer.0, 201, "{answer:?}");
    assert_eq!(
        answer.1["backup"]["signatureScheme"],
        "legacy-ciphertext-only"
    );
    assert_eq!(answer.1["backup"]["signatureVersion"], 1);
    let schemes = sql_rows(
        &node,
        "SELECT string_agg(metadata->>'signatureScheme', ',' ORDER BY id) FROM keepd_audit.audit_log \
         WHERE action = 'BACKUP_CREATE'",
    )
    .await;
    assert_eq!(schemes[0].get::<_, String>(0), "v2,legacy-ciphertext-only");
    client.revoke_device(&device_id).await.unwrap();
    let revoked = raw(
        &client,
        Method::POST,
        "/backups",
        &body(device.sign(&backup.ciphertext), "Internal", &device_id),
    )
    .await;
    assert_eq!((revoked.0, code(&revoked)), (403, "device_revoked"));
    let count = sql_rows(&node, "SELECT count(*) FROM keepd.backups").await;
    assert_eq!(count[0].get::<_, i64>(0), 2, "refused backups were stored");
    let audit = sql_rows(
        &node,
        "SELECT count(*) FILTER (WHERE action = 'BACKUP_CREATE'), count(*) FILTER (WHERE action = 'DEVICE_ADD'), \
         count(*) FILTER (WHERE action = 'DEVICE_REVOKE') FROM keepd_audit.audit_log",
    )
    .await;
    assert_eq!(
        (
            audit[0].get::<_, i64>(0),
            audit[0].get::<_, i64>(1),
            audit[0].get::<_, i64>(2)
        ),
        (2, 1, 1)
    );
}

/// With `api.backups.accept_v1_signatures: false`, a backup signed over
/// its ciphertext alone (signature version 1, explicit or by default) is
/// refused with a code and a message naming the setting; version 2 is
/// stored.
#[tokio::test(flavor = "multi_thread")]
async fn legacy_backup_signatures_can_be_refused() {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as B64;
    let (node, daemon) = api_node(json!({"backups": {"accept_v1_signatures": false}}));
    let (client, _) = user(&daemon).await;
    let key = client.create_vault("v", PASSWORD).await.unwrap();
    let device = DeviceKey::generate().unwrap();
    let device_id = client.register_device("laptop", &device).await.unwrap();
    let backup = key.encrypt_backup(b"payload").unwrap();
    let legacy = |version: Option<u8>| {
        let mut body = json!({
            "deviceId": device_id,
            "ciphertext": B64.encode(&backup.ciphertext),
            "nonce": B64.encode(&backup.nonce),
            "authTag": B64.encode(&backup.auth_tag),
            "signature": device.sign(&backup.ciphertext),
            "dataClassification": "Internal",
        });
        if let Some(version) = version {
            body["signatureVersion"] = json!(version);
        }
        body.to_string()
    };
    for version in [None, Some(1)] {
        let answer = raw(&client, Method::POST, "/backups", &legacy(version)).await;
        assert_eq!(
            (answer.0, code(&answer)),
            (400, "legacy_signature_refused"),
            "{version:?}: {answer:?}"
        );
        let message = answer.1["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("api.backups.accept_v1_signatures"),
            "{message}"
        );
    }
    let stored = sql_rows(&node, "SELECT count(*) FROM keepd.backups").await;
    assert_eq!(stored[0].get::<_, i64>(0), 0, "a refused backup was stored");
    // keepd's client signs version 2: accepted.
    client
        .store_backup(&device_id, &device, &key, b"payload", "Internal")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_proves_its_key_and_a_key_serves_one_account() {
    let (_node, daemon) = api_node(json!({}));
    let (alice, _) = user(&daemon).await;
    let (mallory, _) = user(&daemon).await;
    let device = DeviceKey::generate().unwrap();
    let alice_id: uuid::Uuid = alice.account().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let mallory_id: uuid::Uuid = mallory.account().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let register = |proof: String| {
        json!({"deviceName": "phone", "publicKey": device.public_key(), "proof": proof}).to_string()
    };
    // Alice's proof names Alice: Mallory cannot replay it, nor sign one
    // for this key without its private half.
    let alice_proof = device.registration_proof(alice_id);
    let stranger = DeviceKey::generate().unwrap();
    for (what, proof) in [
        ("replayed proof of another account", alice_proof.clone()),
        (
            "signed by another key",
            stranger.registration_proof(mallory_id),
        ),
        ("not a signature", "AAAA".to_string()),
    ] {
        let answer = raw(&mallory, Method::POST, "/devices", &register(proof)).await;
        assert_eq!((answer.0, code(&answer)), (400, "bad_proof"), "{what}");
    }
    let answer = raw(
        &alice,
        Method::POST,
        "/devices",
        &register(alice_proof.clone()),
    )
    .await;
    assert_eq!(answer.0, 201, "{answer:?}");
    // Registered: not again, here or in any other account, even by its
    // holder with a valid proof.
    let answer = raw(&alice, Method::POST, "/devices", &register(alice_proof)).await;
    assert_eq!((answer.0, code(&answer)), (409, "device_key_registered"));
    let answer = raw(
        &mallory,
        Method::POST,
        "/devices",
        &register(device.registration_proof(mallory_id)),
    )
    .await;
    assert_eq!((answer.0, code(&answer)), (409, "device_key_registered"));
    assert!(
        mallory.devices().await.unwrap()["devices"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn another_users_ids_are_out_of_reach_on_every_route() {
    let (_node, daemon) = api_node(json!({}));
    let (alice, _) = user(&daemon).await;
    let (mallory, _) = user(&daemon).await;
    let key = alice.create_vault("diary", PASSWORD).await.unwrap();
    alice
        .push("diary", &key, &entries(2, "secret"), None)
        .await
        .unwrap();
    let device = DeviceKey::generate().unwrap();
    let device_id = alice.register_device("phone", &device).await.unwrap();
    let backup_id = alice
        .store_backup(&device_id, &device, &key, b"private", "Restricted")
        .await
        .unwrap();

    let e = mallory.open_vault("diary", PASSWORD).await.unwrap_err();
    assert_eq!(e.code(), Some("vault_not_found"));
    let e = mallory.pull("diary", 0, 100).await.unwrap_err();
    assert_eq!(e.code(), Some("vault_not_found"));
    let e = mallory
        .push("diary", &key, &entries(1, "x"), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("vault_not_found"));
    let e = mallory.restore_backup(&backup_id, &key).await.unwrap_err();
    assert_eq!(e.code(), Some("backup_not_found"));
    let e = mallory.revoke_device(&device_id).await.unwrap_err();
    assert_eq!(e.code(), Some("device_not_found"));
    let e = mallory
        .store_backup(&device_id, &device, &key, b"planted", "Internal")
        .await
        .unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(403), Some("unknown_device")));
    assert_eq!(mallory.devices().await.unwrap()["devices"], json!([]));
    assert_eq!(mallory.backups("").await.unwrap()["backups"], json!([]));
    // Mallory's own vault of the same name is a different vault.
    let own = mallory.create_vault("diary", PASSWORD).await.unwrap();
    mallory
        .push("diary", &own, &entries(1, "m"), None)
        .await
        .unwrap();
    assert_eq!(mallory.pull("diary", 0, 100).await.unwrap().logs.len(), 1);
    assert_eq!(alice.pull("diary", 0, 100).await.unwrap().logs.len(), 2);
    // Alice's data is untouched.
    assert_eq!(
        alice.restore_backup(&backup_id, &key).await.unwrap(),
        b"private"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn root_openapi_metrics_and_rate_limits() {
    let node = TestNode::with_https(json!({"api": {"rate_limits": {"auth_per_minute": 3}}}));
    let daemon = node.start();
    assert!(daemon.wait_health(200, Duration::from_secs(30)));
    let client = daemon.client();
    let root = raw(&client, Method::GET, "/", "").await;
    assert_eq!(root.0, 200);
    assert_eq!(root.1["name"], "keepd");
    assert_eq!(root.1["status"], "ok");
    assert!(root.1["version"].is_string() && root.1["env"].is_string());

    let openapi = raw(&client, Method::GET, "/openapi.json", "").await;
    assert_eq!(openapi.0, 200);
    let paths = openapi.1["paths"].as_object().unwrap();
    for path in ["/auth/login", "/sync/push", "/sync/pull", "/backups/{id}"] {
        assert!(paths.contains_key(path), "{path} missing");
    }
    let unknown = raw(&client, Method::GET, "/no/such/route", "").await;
    assert_eq!((unknown.0, code(&unknown)), (404, "no_such_route"));

    // Login attempts per address: the fourth in a minute is refused.
    for _ in 0..3 {
        let e = client
            .register_with_password("bad", PASSWORD)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some("invalid_email"));
    }
    let limited = client
        .send(
            Method::POST,
            "/auth/login",
            &[],
            Some(
                json!({"email": email(), "password": PASSWORD})
                    .to_string()
                    .into_bytes(),
            ),
        )
        .await
        .unwrap();
    assert_eq!(limited.status, 429, "{}", limited.text);
    assert!(limited.retry_after.is_some_and(|s| (1..=60).contains(&s)));
    assert_eq!(limited.body["error"]["code"], "rate_limited");

    let (ok, text) = node.rotate();
    assert!(ok, "{text}");
    // Metrics are not on the public listener, only on the private one.
    let public = raw(&client, Method::GET, "/metrics", "").await;
    assert_eq!((public.0, code(&public)), (404, "no_such_route"));
    let metrics = daemon.metrics();
    for line in [
        r#"keepd_http_requests_total{method="GET",route="/",status="200"} 1"#,
        r#"keepd_http_requests_total{method="POST",route="/auth/login",status="429"} 1"#,
        "keepd_credential_rotations_total 1",
        "keepd_postgres_up 1",
        "keepd_postgres_restarts_total 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line}:\n{metrics}"
        );
    }
    assert!(metrics.contains("keepd_http_request_duration_seconds_bucket{method=\"GET\",route=\"/openapi.json\",le=\"+Inf\"} 1"));
    assert!(metrics.contains("keepd_pool_open_connections"));
    // Unrouted answers count too; the level is the report's.
    let class = |c: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("keepd_http_responses_total{{class=\"{c}\"}} ")))
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(class("4xx") >= 5, "{metrics}");
    assert!(class("2xx") >= 2, "{metrics}");
    for name in [
        "keepd_security_level ",
        "keepd_build_info{version=",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "keepd_http_connections_open ",
    ] {
        assert!(
            metrics.lines().any(|l| l.starts_with(name)),
            "missing {name}:\n{metrics}"
        );
    }
    assert!(!metrics.contains("keepd_security_level 0"), "{metrics}");
    // Postgres's own figures, read as pg_monitor on a schedule.
    let metrics = common::wait_until(Duration::from_secs(20), || {
        let m = daemon.metrics();
        m.contains("keepd_db_statement_seconds{").then_some(m)
    })
    .expect("the database metrics were read");
    for name in [
        "keepd_db_table_bytes{table=\"keepd.users\"} ",
        "keepd_db_index_bytes{table=\"keepd_audit.audit_log\"} ",
        "keepd_db_dead_tuples{table=\"keepd.sync_logs\"} ",
        "keepd_db_sessions{state=\"idle\",role=",
        "keepd_db_oldest_transaction_seconds ",
        "keepd_db_xid_age ",
        "keepd_db_checkpoints{kind=\"timed\"} ",
        "keepd_db_wal_bytes ",
        "keepd_db_statement_calls{queryid=",
    ] {
        assert!(
            metrics.lines().any(|l| l.starts_with(name)),
            "missing {name}:\n{metrics}"
        );
    }
    let users: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("keepd_db_table_bytes{table=\"keepd.users\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(users > 0.0, "{metrics}");
    assert!(!metrics.contains("SELECT"), "no statement text");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_database_gets_fast_503s_and_recovers() {
    let (node, daemon) = api_node(json!({"request_timeout": "2s"}));
    let (client, _) = user(&daemon).await;
    let key = client.create_vault("v", PASSWORD).await.unwrap();
    client
        .push("v", &key, &entries(1, "before"), None)
        .await
        .unwrap();

    // Every Postgres process stopped: connections stay open, nothing answers.
    let pids = common::postgres_pids(&node.data_dir());
    assert!(!pids.is_empty());
    for pid in &pids {
        common::kill(*pid, common::Signal::SIGSTOP);
    }
    let started = std::time::Instant::now();
    let stalled = client
        .push("v", &key, &entries(1, "stalled"), None)
        .await
        .unwrap_err();
    let waited = started.elapsed();
    assert_eq!(
        (stalled.status(), stalled.code()),
        (Some(503), Some("database_unavailable")),
        "{stalled}"
    );
    assert!(waited < Duration::from_secs(5), "answered after {waited:?}");
    assert!(matches!(
        stalled,
        keepd::client::ClientError::Api {
            retry_after: Some(_),
            ..
        }
    ));
    assert!(daemon.wait_health(503, Duration::from_secs(5)));

    for pid in &pids {
        common::kill(*pid, common::Signal::SIGCONT);
    }
    assert!(
        daemon.wait_health(200, Duration::from_secs(15)),
        "{}",
        daemon.log()
    );
    let retried = common::wait_until(Duration::from_secs(10), || {
        let (client, key) = (&client, &key);
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current()
                .block_on(client.push("v", key, &entries(1, "after"), None))
                .ok()
        })
    });
    assert!(retried.is_some(), "pushes work again");
    // Nothing half-applied: the stalled push either landed whole or not at
    // all, and sequences stay gap-free.
    let all = client.pull("v", 0, 100).await.unwrap();
    let sequences: Vec<i64> = all.logs.iter().map(|l| l.sequence).collect();
    assert_eq!(sequences, (1..=sequences.len() as i64).collect::<Vec<_>>());
}

/// An Idempotency-Key names one request: the same request replays its
/// first answer, another request under it is refused, and after
/// `api.idempotency_ttl` the key is free again (the record deleted, as are
/// dead sessions).
#[tokio::test(flavor = "multi_thread")]
async fn idempotency_keys_name_one_request_and_expire() {
    // Long enough that the first phase never outlives it, short enough to
    // see it expire.
    let (node, daemon) = api_node(json!({"idempotency_ttl": "5s"}));
    let (client, _) = user(&daemon).await;
    let key = client.create_vault("v", PASSWORD).await.unwrap();
    client.create_vault("w", PASSWORD).await.unwrap();
    let a = entries(3, "a");
    let first = client.push("v", &key, &a, Some("k1")).await.unwrap();
    // A client retries the very bytes it sent: the first answer again.
    let body = serde_json::to_string(&json!({
        "vaultId": "v",
        "logs": [{"encryptedData": "AAAA", "nonce": "AAAA", "haexTimestamp": "t"}],
    }))
    .unwrap();
    let send_as = |key: &'static str, vault_body: String| {
        let client = &client;
        async move {
            client
                .send(
                    Method::POST,
                    "/sync/push",
                    &[("idempotency-key", key)],
                    Some(vault_body.into_bytes()),
                )
                .await
                .unwrap()
        }
    };
    let send = |vault_body: String| send_as("k2", vault_body);
    let stored = send(body.clone()).await;
    assert_eq!(stored.status, 200, "{}", stored.text);
    let replay = send(body.clone()).await;
    assert_eq!((replay.status, &replay.body), (200, &stored.body));
    // Another body, or another vault, under the same key: refused, nothing stored.
    let other_body = body.replace("\"t\"", "\"t2\"");
    let other_vault = body.replace("\"v\"", "\"w\"");
    for changed in [other_body, other_vault] {
        let answer = send(changed).await;
        assert_eq!(answer.status, 422, "{}", answer.text);
        assert_eq!(answer.body["error"]["code"], "idempotency_key_reused");
    }
    // Each stored push wrote its audit entry with its commit; a replay or
    // a refusal wrote none.
    let audited = node
        .psql(
            "superuser",
            "SELECT count(*) FROM keepd_audit.audit_log \
             WHERE action = 'SYNC_PUSH' AND role_used = 'keepd_sync'",
        )
        .unwrap();
    assert_eq!(audited.trim(), "2");
    let pulled = client.pull("v", 0, 100).await.unwrap();
    assert_eq!(
        pulled.logs.len(),
        4,
        "3 from k1 and 1 from k2, nothing else"
    );
    assert_eq!(client.pull("w", 0, 100).await.unwrap().logs.len(), 0);
    // The typed client encrypts afresh on every call: another request.
    let again = client.push("v", &key, &entries(3, "a"), Some("k1")).await;
    assert_eq!(
        again.unwrap_err().code(),
        Some("idempotency_key_reused"),
        "fresh nonces make another request"
    );
    assert_eq!(first.count, 3);
    // Retries sent at once: one stores, the others (rolled back when they
    // find its record) answer what it stored.
    let racing = body.replace("\"t\"", "\"t-race\"");
    let answers =
        futures_util::future::join_all((0..6).map(|_| send_as("k-race", racing.clone()))).await;
    for answer in &answers {
        assert_eq!(
            (answer.status, &answer.body),
            (200, &answers[0].body),
            "{}",
            answer.text
        );
    }
    assert_eq!(client.pull("v", 0, 100).await.unwrap().logs.len(), 5);

    // After the TTL the janitor deletes the records and dead sessions, and
    // the key may name a new request.
    let (other, _) = user(&daemon).await;
    other.logout().await.unwrap();
    let count = |sql: &str| -> i64 { node.psql("superuser", sql).unwrap().trim().parse().unwrap() };
    // A push keepd stopped in the middle of left its reservation (schema
    // v23): past an hour the janitor gives its bytes back.
    let usage_sql = "SELECT storage_bytes FROM keepd.account_usage \
         WHERE user_id = (SELECT user_id FROM keepd.vaults WHERE vault_id = 'v')";
    let before = count(usage_sql);
    node.psql(
        "superuser",
        "WITH u AS (SELECT user_id FROM keepd.vaults WHERE vault_id = 'v'), \
              r AS (INSERT INTO keepd.push_reservations (id, user_id, bytes, created_at) \
                    SELECT gen_random_uuid(), user_id, 1000, now() - interval '61 minutes' FROM u) \
         UPDATE keepd.account_usage SET storage_bytes = storage_bytes + 1000 \
         WHERE user_id = (SELECT user_id FROM u)",
    )
    .unwrap();
    assert_eq!(count(usage_sql), before + 1000);
    let swept = common::wait_until(Duration::from_secs(20), || {
        (count("SELECT count(*) FROM keepd.push_requests") == 0
            && count("SELECT count(*) FROM keepd.sessions WHERE revoked_at IS NOT NULL") == 0
            && count("SELECT count(*) FROM keepd.push_reservations") == 0)
            .then_some(())
    });
    assert!(swept.is_some(), "{}", daemon.log());
    assert_eq!(count(usage_sql), before, "the orphan's bytes given back");
    let reused = send(body.replace("\"t\"", "\"t3\"")).await;
    assert_eq!(reused.status, 200, "{}", reused.text);
    assert_eq!(client.pull("v", 0, 100).await.unwrap().logs.len(), 6);

    // A record names its push's entries (schema v25): once their vault is
    // deleted, the retry is told so and nothing is stored.
    let to_w = body.replace("\"v\"", "\"w\"");
    assert_eq!(send_as("k3", to_w.clone()).await.status, 200);
    client.delete_vault("w").await.unwrap();
    let gone = send_as("k3", to_w).await;
    assert_eq!(gone.status, 404, "{}", gone.text);
    assert_eq!(gone.body["error"]["code"], "vault_not_found");
    // A record written before v25 holds its answer, and still gives it.
    let old_answer = json!({"message": "1 logs pushed successfully", "count": 1, "logs": [{
        "id": "018f0000-0000-7000-8000-000000000000", "sequence": 9,
        "haexTimestamp": "t", "createdAt": "2026-01-01T00:00:00.000000Z"}]});
    node.psql(
        "superuser",
        &format!(
            "INSERT INTO keepd.push_requests (user_id, idempotency_key, response) \
             SELECT user_id, 'k4', '{old_answer}' FROM keepd.vaults WHERE vault_id = 'v'"
        ),
    )
    .unwrap();
    let old = send_as("k4", body.clone()).await;
    assert_eq!((old.status, &old.body), (200, &old_answer), "{}", old.text);
    assert_eq!(client.pull("v", 0, 100).await.unwrap().logs.len(), 6);
}

/// A pull answers at most `api.max_pull_bytes` (fewer entries and
/// `hasMore`, but always one), and an entry beyond `api.max_entry_bytes`
/// is refused.
#[tokio::test(flavor = "multi_thread")]
async fn pulls_are_bounded_in_bytes_and_entries_in_size() {
    let (_node, daemon) = api_node(json!({"max_pull_bytes": 65536, "max_entry_bytes": 100000}));
    let (client, _) = user(&daemon).await;
    let key = client.create_vault("v", PASSWORD).await.unwrap();
    // Six entries of 20,000 bytes: about 27 KB each as stored (base64).
    let sized = |n: usize, bytes: usize, tag: &str| -> Vec<LogEntry> {
        (0..n)
            .map(|i| LogEntry {
                data: vec![b'x'; bytes],
                haex_timestamp: format!("{tag}-{i}"),
            })
            .collect()
    };
    client
        .push("v", &key, &sized(6, 20_000, "m"), None)
        .await
        .unwrap();
    let first = client.pull("v", 0, 100).await.unwrap();
    assert_eq!(first.logs.len(), 2, "two fit in 64 KiB, three do not");
    assert!(first.has_more);
    let mut seen: Vec<i64> = first.logs.iter().map(|l| l.sequence).collect();
    let mut after = *seen.last().unwrap();
    loop {
        let page = client.pull("v", after, 100).await.unwrap();
        assert!(!page.logs.is_empty() && page.logs.len() <= 2);
        seen.extend(page.logs.iter().map(|l| l.sequence));
        after = *seen.last().unwrap();
        if !page.has_more {
            break;
        }
    }
    assert_eq!(seen, (1..=6).collect::<Vec<_>>());
    // One entry larger than the budget still comes, alone.
    client
        .push("v", &key, &sized(2, 70_000, "big"), None)
        .await
        .unwrap();
    let big = client.pull("v", 6, 100).await.unwrap();
    assert_eq!((big.logs.len(), big.has_more), (1, true));
    let key_plain = key.decrypt_entry(&big.logs[0].encrypted_data, &big.logs[0].nonce);
    assert_eq!(key_plain.unwrap().len(), 70_000);
    // Beyond api.max_entry_bytes: 413, nothing stored.
    let too_big = client
        .push("v", &key, &sized(1, 100_100, "huge"), None)
        .await;
    let e = too_big.unwrap_err();
    assert_eq!(
        (e.status(), e.code()),
        (Some(413), Some("entry_too_large")),
        "{e}"
    );
    assert!(e.to_string().contains("logs[0].encryptedData"), "{e}");
    let tail = client.pull("v", 8, 100).await.unwrap();
    assert!(tail.logs.is_empty() && !tail.has_more);
}

fn quota_node(quotas: Value) -> (TestNode, Daemon) {
    api_node(json!({ "quotas": quotas }))
}

fn usage(account: &Value) -> (u64, u64, u64, u64) {
    let u = &account["usage"];
    let n = |k: &str| u[k].as_u64().unwrap();
    (n("storageBytes"), n("vaults"), n("devices"), n("backups"))
}

#[tokio::test(flavor = "multi_thread")]
async fn quotas_count_exactly_refuse_with_413_and_give_back() {
    let (node, daemon) =
        quota_node(json!({"storage_bytes": 20000, "vaults": 2, "devices": 1, "backups": 1}));
    let (client, email) = user(&daemon).await;
    let account = client.account().await.unwrap();
    assert_eq!(usage(&account), (0, 0, 0, 0));
    assert_eq!(account["quotas"]["storageBytes"], 20000);
    assert_eq!(account["quotas"]["vaults"], 2);

    let key = client.create_vault("a", PASSWORD).await.unwrap();
    let key_b = client.create_vault("b", PASSWORD).await.unwrap();
    let e = client.create_vault("c", PASSWORD).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(413), Some("quota_exceeded")));
    assert!(e.to_string().contains("api.quotas.vaults"), "{e}");

    let phone = DeviceKey::generate().unwrap();
    let phone_id = client.register_device("phone", &phone).await.unwrap();
    let e = client
        .register_device("laptop", &DeviceKey::generate().unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("quota_exceeded"));
    assert!(e.to_string().contains("api.quotas.devices"), "{e}");
    // A revoked device still counts, until the janitor purges it (here
    // the operator, as the janitor's statement does).
    client.revoke_device(&phone_id).await.unwrap();
    let laptop = DeviceKey::generate().unwrap();
    let e = client.register_device("laptop", &laptop).await.unwrap_err();
    assert_eq!(e.code(), Some("quota_exceeded"), "{e}");
    node.superuser()
        .await
        .execute(
            "DELETE FROM keepd.devices WHERE revoked_at IS NOT NULL",
            &[],
        )
        .await
        .unwrap();
    let laptop_id = client.register_device("laptop", &laptop).await.unwrap();

    let one = client
        .store_backup(&laptop_id, &laptop, &key, b"one", "Internal")
        .await
        .unwrap();
    // Storage counts a backup's decoded bytes (ciphertext, nonce, tag),
    // as it does an entry's.
    {
        use base64::Engine;
        use base64::engine::general_purpose::STANDARD as B64;
        let (status, whole) = raw(&client, Method::GET, &format!("/backups/{one}"), "").await;
        assert_eq!(status, 200, "{whole}");
        let decoded = |k: &str| {
            B64.decode(whole["backup"][k].as_str().unwrap())
                .unwrap()
                .len() as u64
        };
        let size = decoded("ciphertext") + decoded("nonce") + decoded("authTag");
        assert_eq!(whole["backup"]["sizeBytes"], size);
        assert_eq!(usage(&client.account().await.unwrap()).0, size);
    }
    let e = client
        .store_backup(&laptop_id, &laptop, &key, b"two", "Internal")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("api.quotas.backups"), "{e}");

    // A push that does not commit (no such vault) gives back the bytes it
    // reserved before its transaction (schema v23), at once.
    let before = usage(&client.account().await.unwrap()).0;
    let entry = LogEntry {
        data: vec![1; 700],
        haex_timestamp: "gone".into(),
    };
    let e = client
        .push("missing", &key, &[entry], None)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
    let reservations = || async {
        sql_rows(&node, "SELECT count(*) FROM keepd.push_reservations").await[0].get::<_, i64>(0)
    };
    let mut given_back = false;
    for _ in 0..50 {
        if reservations().await == 0 && usage(&client.account().await.unwrap()).0 == before {
            given_back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        given_back,
        "the failed push's reservation was not given back"
    );

    // Eight clients push 1 KiB-ish entries at once, over both vaults (so
    // no vault row orders them), until the storage quota refuses them:
    // usage never passes it and matches what is stored.
    let keys = [Arc::new(key), Arc::new(key_b)];
    let mut tasks = Vec::new();
    for t in 0..8 {
        let client = client.another_connection();
        let (vault, key) = (["a", "b"][t % 2], keys[t % 2].clone());
        tasks.push(tokio::spawn(async move {
            let mut accepted = 0u64;
            for i in 0..40 {
                let entry = LogEntry {
                    data: vec![t as u8; 700],
                    haex_timestamp: format!("{t}-{i:04}"),
                };
                match client.push(vault, &key, &[entry], None).await {
                    Ok(_) => accepted += 1,
                    Err(e) => {
                        assert_eq!(e.code(), Some("quota_exceeded"), "{e}");
                        break;
                    }
                }
            }
            accepted
        }));
    }
    let mut accepted = 0;
    for task in tasks {
        accepted += task.await.unwrap();
    }
    let (bytes, vaults, devices, backups) = usage(&client.account().await.unwrap());
    assert_eq!((vaults, devices, backups), (2, 1, 1));
    assert!(bytes <= 20000, "usage {bytes} passed the quota");
    let stored = sql_rows(
        &node,
        "SELECT (SELECT sum(size_bytes) FROM keepd.sync_logs)::int8 + \
                (SELECT sum(size_bytes) FROM keepd.backups)::int8, \
                (SELECT count(*) FROM keepd.sync_logs)",
    )
    .await;
    assert_eq!(bytes as i64, stored[0].get::<_, i64>(0), "usage is exact");
    assert_eq!(
        reservations().await,
        0,
        "every reservation claimed or given back"
    );
    assert_eq!(accepted as i64, stored[0].get::<_, i64>(1));
    // An entry counts its decoded bytes: 700 of data, the nonce, the
    // timestamp.
    let decoded = sql_rows(
        &node,
        "SELECT bool_and(size_bytes = octet_length(decode(encrypted_data, 'base64')) \
           + octet_length(decode(nonce, 'base64')) + octet_length(haex_timestamp)) \
         FROM keepd.sync_logs",
    )
    .await;
    assert_eq!(decoded[0].get::<_, Option<bool>>(0), Some(true));
    assert!(bytes > 20000 - 1000, "the quota was nearly filled: {bytes}");

    // Erasing a vault (here by the operator, as the cascade an erasure
    // runs) gives its bytes and its count back.
    node.superuser()
        .await
        .execute("DELETE FROM keepd.vaults WHERE vault_id = 'a'", &[])
        .await
        .unwrap();
    let (bytes, vaults, _, _) = usage(&client.account().await.unwrap());
    assert_eq!(vaults, 1);
    let left = sql_rows(
        &node,
        "SELECT (SELECT sum(size_bytes) FROM keepd.backups)::int8 + \
                (SELECT coalesce(sum(size_bytes), 0) FROM keepd.sync_logs)::int8",
    )
    .await;
    assert_eq!(
        bytes as i64,
        left[0].get::<_, i64>(0),
        "b's entries and the backup"
    );
    client.create_vault("c", PASSWORD).await.unwrap();

    client.delete_account(&email, PASSWORD).await.unwrap();
    let left = sql_rows(&node, "SELECT count(*) FROM keepd.account_usage").await;
    assert_eq!(left[0].get::<_, i64>(0), 0, "erasure removes the usage row");
}

/// `DELETE /backups/{id}`: the owner's backup goes, its bytes and its
/// place in `api.quotas.backups` come back at once, the deletion is
/// audited; another account's id, or one already deleted, is 404.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_backup_frees_its_quota_and_is_audited() {
    let (node, daemon) = quota_node(json!({"backups": 1}));
    let (client, _) = user(&daemon).await;
    let (stranger, _) = user(&daemon).await;
    let key = client.create_vault("v", PASSWORD).await.unwrap();
    let laptop = DeviceKey::generate().unwrap();
    let laptop_id = client.register_device("laptop", &laptop).await.unwrap();
    let one = client
        .store_backup(&laptop_id, &laptop, &key, b"one", "Internal")
        .await
        .unwrap();
    let e = client
        .store_backup(&laptop_id, &laptop, &key, b"two", "Internal")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("api.quotas.backups"), "{e}");
    let e = stranger.delete_backup(&one).await.unwrap_err();
    assert_eq!(
        (e.status(), e.code()),
        (Some(404), Some("backup_not_found"))
    );
    assert_eq!(usage(&client.account().await.unwrap()).3, 1, "still there");

    client.delete_backup(&one).await.unwrap();
    let (bytes, _, _, backups) = usage(&client.account().await.unwrap());
    assert_eq!((bytes, backups), (0, 0), "freed at once");
    let e = client.restore_backup(&one, &key).await.unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
    let e = client.delete_backup(&one).await.unwrap_err();
    assert_eq!(
        (e.status(), e.code()),
        (Some(404), Some("backup_not_found"))
    );
    client
        .store_backup(&laptop_id, &laptop, &key, b"two", "Internal")
        .await
        .unwrap();
    let audited = sql_rows(
        &node,
        "SELECT metadata->>'backup', (metadata->>'bytes')::int8 FROM keepd_audit.audit_log \
         WHERE action = 'BACKUP_DELETE'",
    )
    .await;
    assert_eq!(audited.len(), 1);
    assert_eq!(audited[0].get::<_, String>(0), one);
    assert!(audited[0].get::<_, i64>(1) > 0);
}

/// Registering and revoking cannot grow the devices table without bound:
/// a revoked device counts against `api.quotas.devices` until the janitor
/// purges it, `revoked_device_retention` after its revocation, and the
/// refusal says so; a revoked device whose backups are stored is kept.
#[tokio::test(flavor = "multi_thread")]
async fn revoked_devices_count_against_the_cap_until_purged() {
    // The janitor sweeps every half idempotency TTL: every second here.
    let (node, daemon) = api_node(json!({
        "idempotency_ttl": "2s",
        "quotas": {"devices": 2, "revoked_device_retention": "3s"},
    }));
    let (client, _) = user(&daemon).await;
    let key = client.create_vault("v", PASSWORD).await.unwrap();
    let (signer, spare) = (
        DeviceKey::generate().unwrap(),
        DeviceKey::generate().unwrap(),
    );
    let signer_id = client.register_device("signer", &signer).await.unwrap();
    let spare_id = client.register_device("spare", &spare).await.unwrap();
    let backup = client
        .store_backup(&signer_id, &signer, &key, b"keep me", "Internal")
        .await
        .unwrap();
    client.revoke_device(&spare_id).await.unwrap();
    let e = client
        .register_device("third", &DeviceKey::generate().unwrap())
        .await
        .unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(413), Some("quota_exceeded")));
    let said = e.to_string();
    for part in [
        "api.quotas.devices allows 2",
        "1 of them revoked",
        "api.quotas.revoked_device_retention (3s)",
    ] {
        assert!(said.contains(part), "{part:?} not in {said}");
    }
    assert_eq!(
        usage(&client.account().await.unwrap()).2,
        2,
        "revoked ones count"
    );
    client.revoke_device(&signer_id).await.unwrap();

    // Past the retention the janitor purges the spare; the signer, whose
    // backup is stored, stays (and counts), its backup with it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = sql_rows(&node, "SELECT count(*) FROM keepd.devices").await[0].get::<_, i64>(0);
        if left == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the revoked spare was not purged ({left} devices)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let listed = client.devices().await.unwrap();
    assert_eq!(listed["devices"].as_array().unwrap().len(), 1);
    assert_eq!(listed["devices"][0]["id"], signer_id);
    assert_eq!(
        client.restore_backup(&backup, &key).await.unwrap(),
        b"keep me"
    );
    assert_eq!(usage(&client.account().await.unwrap()).2, 1);
    client
        .register_device("third", &DeviceKey::generate().unwrap())
        .await
        .unwrap();
    let e = client
        .register_device("fourth", &DeviceKey::generate().unwrap())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("1 of them revoked"), "{e}");
}

/// A node behind a trusted proxy (the test itself, on loopback), with
/// small limits: every request names its client in X-Forwarded-For.
fn limited_node(rates: Value) -> (TestNode, Daemon) {
    let node = TestNode::with_https(json!({"api": {
        "trusted_proxies": ["127.0.0.1"],
        "rate_limits": rates,
    }}));
    let daemon = node.start_healthy();
    (node, daemon)
}

async fn as_client(
    client: &SyncClient,
    addr: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> keepd::client::Answer {
    client
        .send(
            method,
            path,
            &[("x-forwarded-for", addr)],
            body.map(|b| b.to_string().into_bytes()),
        )
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_is_rate_limited_per_account_or_per_address() {
    let (_node, daemon) = limited_node(json!({
        "auth_per_minute": 1000,
        "account_per_second": 1,
        "account_burst": 5,
        "address_per_second": 1,
        "address_burst": 5,
    }));
    // On the password routes: two requests an account, within the burst
    // of 5 one address has (OPAQUE's take four).
    let (alice, _) = password_user(&daemon).await;
    let (bob, _) = password_user(&daemon).await;
    // Authenticated routes count per account, whatever the address: a
    // burst of 5, then 429 (one more may have been refilled meanwhile).
    let mut statuses = Vec::new();
    for i in 0..8 {
        let answer = as_client(
            &alice,
            &format!("10.1.0.{i}"),
            Method::GET,
            "/devices",
            None,
        )
        .await;
        statuses.push(answer.status);
        if answer.status == 429 {
            assert!(
                answer.retry_after.is_some_and(|s| (1..=2).contains(&s)),
                "{answer:?}"
            );
            assert_eq!(answer.body["error"]["code"], "rate_limited");
            assert!(
                answer.text.contains("account_per_second"),
                "{}",
                answer.text
            );
        }
    }
    assert!(statuses[..5].iter().all(|s| *s == 200), "{statuses:?}");
    assert!(statuses[6..].iter().all(|s| *s == 429), "{statuses:?}");
    let answer = as_client(&bob, "10.1.0.1", Method::GET, "/account", None).await;
    assert_eq!(answer.status, 200, "another account is not slowed");
    // Public routes, refused tokens and unrouted paths count per address.
    let anonymous = daemon.client();
    let mut forged = daemon.client();
    forged.set_token(Some("not.a.token".into()));
    for (client, addr, path, first) in [
        (&anonymous, "10.2.0.1", "/health", 200),
        (&forged, "10.3.0.1", "/devices", 401),
        (&anonymous, "10.4.0.1", "/no/such", 404),
    ] {
        let mut statuses = Vec::new();
        for _ in 0..8 {
            statuses.push(
                as_client(client, addr, Method::GET, path, None)
                    .await
                    .status,
            );
        }
        assert_eq!(statuses[0], first, "{path}");
        assert!(
            statuses[6..].iter().all(|s| *s == 429),
            "{path}: {statuses:?}"
        );
    }
    let answer = as_client(&anonymous, "10.2.0.2", Method::GET, "/", None).await;
    assert_eq!(answer.status, 200, "another address is not slowed");
}

#[tokio::test(flavor = "multi_thread")]
async fn guessing_a_password_from_many_addresses_is_slowed_but_the_owner_gets_in() {
    let (_node, daemon) = limited_node(json!({
        "auth_per_minute": 1000,
        "login_failures_free": 3,
        "login_delay_max": "1m",
    }));
    let email = email();
    let owner = daemon.client();
    owner
        .register_with_password(&email, PASSWORD)
        .await
        .unwrap();
    let home = "10.9.0.1";
    let login = |password: &str| json!({"email": email, "password": password});
    let answer = as_client(
        &owner,
        home,
        Method::POST,
        "/auth/login",
        Some(login(PASSWORD)),
    )
    .await;
    assert_eq!(answer.status, 200);
    // 40 addresses, 10 guesses each, as fast as they can.
    let attacker = daemon.client();
    let (mut wrong, mut slowed) = (0, 0);
    for a in 0..40 {
        for _ in 0..10 {
            let addr = format!("10.66.{a}.1");
            let answer = as_client(
                &attacker,
                &addr,
                Method::POST,
                "/auth/login",
                Some(login("guess guess")),
            )
            .await;
            match answer.status {
                401 => wrong += 1,
                429 => {
                    slowed += 1;
                    assert!(answer.retry_after.is_some(), "{answer:?}");
                }
                other => panic!("{other}: {}", answer.text),
            }
        }
    }
    // The free failures, then one per elapsed delay (1 s, 2 s, ...).
    assert!(wrong <= 3 + 3, "{wrong} guesses were checked");
    assert_eq!(wrong + slowed, 400);
    // Meanwhile the owner, from an address the account logged in from,
    // gets in at once; the attacker's failures do not count against it.
    let answer = as_client(
        &owner,
        home,
        Method::POST,
        "/auth/login",
        Some(login(PASSWORD)),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    // A stolen token guessing the current password is slowed the same way.
    let mut thief = daemon.client();
    thief.set_token(answer.body["token"].as_str().map(str::to_string));
    let guess = json!({"currentPassword": "guess guess", "newPassword": "x".repeat(12)});
    let mut statuses = Vec::new();
    for a in 0..10 {
        let addr = format!("10.77.{a}.1");
        statuses.push(
            as_client(
                &thief,
                &addr,
                Method::POST,
                "/auth/password",
                Some(guess.clone()),
            )
            .await
            .status,
        );
    }
    assert!(statuses[..3].iter().all(|s| *s == 401), "{statuses:?}");
    assert!(statuses[4..].iter().all(|s| *s == 429), "{statuses:?}");
    // The thief's guesses do not lock the owner out of the calls that end
    // the thief's session: from home, the password changes at once.
    let change = json!({"currentPassword": PASSWORD, "newPassword": "a brand new password"});
    let answer = as_client(&thief, home, Method::POST, "/auth/password", Some(change)).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
}

/// Guesses sent at the same instant cannot slip through one opening of
/// the delay: each is counted before its password is checked.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_wrong_logins_cost_one_attempt_each() {
    let (_node, daemon) = limited_node(json!({
        "auth_per_minute": 1000,
        "login_failures_free": 5,
    }));
    let email = email();
    daemon.client().register(&email, PASSWORD).await.unwrap();
    let clients = (0..8).map(|_| daemon.client()).collect();
    let (checked, held) = common::wrong_logins_at_once(clients, &email, 60).await;
    assert!(checked <= 5 + 1, "{checked} of 60 guesses were checked");
    assert_eq!(checked + held, 60);
    // An email with no account answers alike.
    let clients = (0..8).map(|_| daemon.client()).collect();
    let (unknown, _) = common::wrong_logins_at_once(clients, &self::email(), 60).await;
    assert!(unknown <= 5 + 1, "{unknown} of 60 guesses were checked");
}

#[tokio::test(flavor = "multi_thread")]
async fn registration_open_invite_or_closed() {
    let (node, daemon) = api_node(json!({"registration": "invite"}));
    let client = daemon.client();
    let e = client.register(&email(), PASSWORD).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(400), Some("invite_required")));
    let e = client
        .register_invited(&email(), PASSWORD, Some("0123456789abcdef0123456789abcdef"))
        .await
        .unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(403), Some("invalid_invite")));
    let invite = |node: &TestNode| {
        let out = node
            .command(&["account", "invite", "--ttl", "1h"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    // A garbage invite tells nothing of whether an email has an account:
    // a registered one is answered exactly as a new one.
    let taken = email();
    client
        .register_invited(&taken, PASSWORD, Some(&invite(&node)))
        .await
        .unwrap();
    for address in [taken.as_str(), &email()] {
        let e = client
            .register_invited(address, PASSWORD, Some("0123456789abcdef0123456789abcdef"))
            .await
            .unwrap_err();
        assert_eq!(
            (e.status(), e.code()),
            (Some(403), Some("invalid_invite")),
            "{address}"
        );
    }
    // With a valid invite, a taken email is a 409 and the invite is not used up.
    let code = invite(&node);
    let e = client
        .register_invited(&taken, PASSWORD, Some(&code))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("email_taken"));
    client
        .register_invited(&email(), PASSWORD, Some(&code))
        .await
        .unwrap();
    let invite = node
        .command(&["account", "invite", "--ttl", "1h"])
        .output()
        .unwrap();
    assert!(
        invite.status.success(),
        "{}",
        String::from_utf8_lossy(&invite.stderr)
    );
    let code = String::from_utf8(invite.stdout).unwrap().trim().to_string();
    assert_eq!(code.len(), 32, "{code}");
    // Nothing but its hash is stored.
    let stored = sql_rows(&node, "SELECT encode(code_hash, 'hex') FROM keepd.invites").await;
    assert!(stored.iter().all(|row| row.get::<_, String>(0) != code));
    client
        .register_invited(&email(), PASSWORD, Some(&code))
        .await
        .unwrap();
    let e = client
        .register_invited(&email(), PASSWORD, Some(&code))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("invalid_invite"), "single use");
    drop(daemon);

    let (_node, daemon) = api_node(json!({"registration": "closed"}));
    let e = daemon
        .client()
        .register(&email(), PASSWORD)
        .await
        .unwrap_err();
    assert_eq!(
        (e.status(), e.code()),
        (Some(403), Some("registration_closed"))
    );
}

/// `keepd account`, run as an operator would: over the control socket.
fn operator(node: &TestNode, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["account"];
    all.extend_from_slice(args);
    let out = node.command(&all).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_lists_shows_disables_enables_and_deletes_accounts() {
    let (node, daemon) = api_node(json!({"quotas": {"vaults": 7}}));
    let (client, email) = user(&daemon).await;
    let vault = client.create_vault("notes", PASSWORD).await.unwrap();
    client
        .push("notes", &vault, &entries(3, "n"), None)
        .await
        .unwrap();
    let id = client.account().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    let (code, listed, err) = operator(&node, &["list"]);
    assert_eq!(code, 0, "{err}");
    let row = listed
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(row.contains("active"), "{row}");
    // By email (keepd looks it up by HMAC), against api.quotas.
    let (code, shown, err) = operator(&node, &["show", &email.to_uppercase()]);
    assert_eq!(code, 0, "{err}");
    assert!(shown.contains(&id) && shown.contains("1 of 7"), "{shown}");
    assert!(!shown.contains(&email), "keepd keeps no address: {shown}");
    let (_, json, _) = operator(&node, &["show", &id, "--json"]);
    let json: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["account"]["live_sessions"], 1);
    assert!(json["account"]["usage"]["storage_bytes"].as_u64().unwrap() > 0);

    // Disabled: the open session ends, login is refused with its own code.
    let (code, said, err) = operator(&node, &["disable", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(said.contains("disabled since"), "{said}");
    let e = client.account().await.unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");
    let mut again = daemon.client();
    let e = again.login(&email, PASSWORD).await.unwrap_err();
    assert_eq!(
        (e.status(), e.code()),
        (Some(403), Some("account_disabled"))
    );
    // The wrong password still hears only that the credentials are wrong.
    let e = again.login(&email, "not the password").await.unwrap_err();
    assert_eq!(e.code(), Some("invalid_credentials"));
    let (code, _, err) = operator(&node, &["disable", &id]);
    assert_eq!(code, 1);
    assert!(err.contains("already disabled"), "{err}");

    let (code, _, err) = operator(&node, &["enable", &email]);
    assert_eq!(code, 0, "{err}");
    again.login(&email, PASSWORD).await.unwrap();
    assert_eq!(again.pull("notes", 0, 10).await.unwrap().logs.len(), 3);

    // A disable while logins are in flight leaves no live session: each
    // login either finished before it (its session ended by it) or hears
    // account_disabled.
    let logins: Vec<_> = (0..8)
        .map(|_| {
            let mut c = daemon.client();
            let email = email.clone();
            tokio::spawn(async move {
                for _ in 0..4 {
                    if let Err(e) = c.login(&email, PASSWORD).await {
                        assert_eq!(e.code(), Some("account_disabled"), "{e}");
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (code, _, err) = operator(&node, &["disable", &id]);
    assert_eq!(code, 0, "{err}");
    for login in logins {
        login.await.unwrap();
    }
    let (_, json, _) = operator(&node, &["show", &id, "--json"]);
    let json: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["account"]["live_sessions"], 0, "{json}");

    // Deleting asks for --yes (a usage error), then erases everything.
    let (code, _, err) = operator(&node, &["delete", &id]);
    assert_eq!(code, 2);
    assert!(err.contains("--yes"), "{err}");
    let (code, said, err) = operator(&node, &["delete", &id, "--yes"]);
    assert_eq!(code, 0, "{err}");
    assert!(said.contains("deleted"), "{said}");
    let e = again.login(&email, PASSWORD).await.unwrap_err();
    assert_eq!(e.code(), Some("invalid_credentials"));
    let left = sql_rows(
        &node,
        &format!("SELECT (SELECT count(*) FROM keepd.users WHERE id = '{id}') + (SELECT count(*) FROM keepd.sync_logs WHERE user_id = '{id}')"),
    )
    .await;
    assert_eq!(left[0].get::<_, i64>(0), 0);
    let (code, _, err) = operator(&node, &["show", &id]);
    assert_eq!(code, 1);
    assert!(err.contains("no account"), "{err}");
    let (code, _, err) = operator(&node, &["show", "alice"]);
    assert_eq!(code, 2, "not an id or an email: {err}");
    let (code, _, err) = operator(&node, &["show", "alice@nowhere"]);
    assert_eq!(code, 2, "not an address: {err}");
    assert!(err.contains("name@example.com"), "{err}");

    // Audited as the operator's, naming neither the email nor the id.
    let audit = sql_rows(
        &node,
        "SELECT action, source_component, metadata::text FROM keepd_audit.audit_log \
         WHERE action IN ('ACCOUNT_DISABLE', 'ACCOUNT_ENABLE', 'ACCOUNT_DELETE') ORDER BY id",
    )
    .await;
    let actions: Vec<String> = audit.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        actions,
        [
            "ACCOUNT_DISABLE",
            "ACCOUNT_ENABLE",
            "ACCOUNT_DISABLE",
            "ACCOUNT_DELETE"
        ]
    );
    let uid = nix::unistd::geteuid().as_raw();
    for row in &audit {
        assert_eq!(row.get::<_, String>(1), "control");
        let metadata: String = row.get(2);
        assert!(metadata.contains(&format!("\"uid\": {uid}")), "{metadata}");
        assert!(
            !metadata.contains(&id) && !metadata.contains(&email),
            "{metadata}"
        );
    }
    drop(daemon);
    // With no daemon, the CLI says so and touches no database.
    let (code, _, err) = operator(&node, &["list"]);
    assert_eq!(code, 1);
    assert!(err.contains("does not appear to be running"), "{err}");
}

/// keepd's resident memory now and at its peak, in MiB (/proc).
fn memory_mib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            .unwrap()
            / 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets the peak (VmHWM) to the current resident size.
fn reset_peak(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
}

/// The bound on what concurrent pulls may add to keepd's memory: four
/// clients, each answer at most api.max_pull_bytes (8 MiB) held about three
/// times (rows, decoded entries, the JSON body), plus allocator slack.
const PULL_MEMORY_BOUND_MIB: u64 = 128;

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_pulls_of_a_large_vault_stay_within_a_memory_bound() {
    let node = TestNode::with(common::unlimited_rates());
    let daemon = node.start_healthy();
    let (client, _) = user(&daemon).await;
    client.create_vault("big", PASSWORD).await.unwrap();
    // 200 entries of 1.33 MiB each (~267 MiB), written straight into the
    // table: this is about reading it.
    const ENTRIES: i64 = 200;
    node.superuser()
        .await
        .batch_execute(&format!(
            "INSERT INTO keepd.sync_logs (id, vault, user_id, sequence, encrypted_data, nonce, \
               haex_timestamp, size_bytes) \
             SELECT gen_random_uuid(), v.id, v.user_id, s, repeat(md5(s::text), 43690), 'bm9uY2U=', \
               lpad(s::text, 8, '0'), 43690 * 32 \
             FROM keepd.vaults v, generate_series(1, {ENTRIES}) s WHERE v.vault_id = 'big'; \
             UPDATE keepd.vaults SET last_sequence = {ENTRIES} WHERE vault_id = 'big';"
        ))
        .await
        .unwrap();
    let pid = daemon.pid();
    let (before, _) = memory_mib(pid);
    reset_peak(pid);
    let mut readers = Vec::new();
    for _ in 0..4 {
        let client = client.another_connection();
        readers.push(tokio::spawn(async move {
            let (mut after, mut pages, mut bytes) = (0, 0, 0usize);
            loop {
                let page = client.pull("big", after, 1000).await.unwrap();
                pages += 1;
                bytes += page
                    .logs
                    .iter()
                    .map(|e| e.encrypted_data.len())
                    .sum::<usize>();
                after = page.logs.last().unwrap().sequence;
                if !page.has_more {
                    return (after, pages, bytes);
                }
            }
        }));
    }
    for reader in readers {
        let (last, pages, bytes) = reader.await.unwrap();
        assert_eq!(last, ENTRIES, "every entry was read");
        assert!(
            pages >= 30,
            "the byte budget paged the answer ({pages} pages)"
        );
        assert_eq!(bytes, ENTRIES as usize * 43690 * 32);
    }
    let (_, peak) = memory_mib(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (after, _) = memory_mib(pid);
    eprintln!("keepd memory: {before} MiB before, {peak} MiB at the peak, {after} MiB after");
    assert!(
        peak.saturating_sub(before) <= PULL_MEMORY_BOUND_MIB,
        "4 pulls of a {} MiB vault raised keepd from {before} to {peak} MiB",
        ENTRIES * 43690 * 32 / (1 << 20)
    );
    // Returned: no more than a few of the largest buffers stay held.
    assert!(
        after.saturating_sub(before) <= 32,
        "memory held after the pulls: {before} -> {after} MiB"
    );
}

/// Vault management (GET /sync/vaults paged, PATCH of a vault key guarded
/// by its version, DELETE of one vault giving its bytes back), wrong-key
/// protection through keyCheck, the HaexHub shapes without keyCheck still
/// accepted, and a first sync of 10,000 entries with the defaults.
#[tokio::test(flavor = "multi_thread")]
async fn vaults_are_listed_rekeyed_and_erased_and_a_wrong_key_stores_nothing() {
    let (node, daemon) = api_node(json!({}));
    let (client, _) = user(&daemon).await;
    let k1 = client.create_vault("v1", PASSWORD).await.unwrap();
    let k2 = client.create_vault("v2", PASSWORD).await.unwrap();
    client.create_vault("v3", PASSWORD).await.unwrap();
    client
        .push("v1", &k1, &entries(3, "a"), None)
        .await
        .unwrap();

    // Listed in vaultId order, two at a time.
    let first = client.vaults(2, None).await.unwrap();
    let ids = |page: &Value| -> Vec<String> {
        page["vaults"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["vaultId"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(&first), ["v1", "v2"]);
    assert_eq!(first["nextCursor"], "v2");
    let v1 = &first["vaults"][0];
    assert_eq!(
        (v1["entryCount"].as_i64(), v1["lastSequence"].as_i64()),
        (Some(3), Some(3))
    );
    let bytes = v1["bytes"].as_u64().unwrap();
    assert!(bytes > 0);
    let second = client.vaults(2, Some("v2")).await.unwrap();
    assert_eq!(ids(&second), ["v3"]);
    assert!(second["nextCursor"].is_null());
    let (status, _) = raw(&client, Method::GET, "/sync/vaults?limit=0", "").await;
    assert_eq!(status, 400);

    // The wrong key: refused, nothing stored.
    let wrong = client
        .push("v1", &k2, &entries(1, "x"), None)
        .await
        .unwrap_err();
    assert_eq!(
        (wrong.status(), wrong.code()),
        (Some(409), Some("wrong_vault_key")),
        "{wrong}"
    );
    assert_eq!(client.pull("v1", 0, 100).await.unwrap().logs.len(), 3);
    // HaexHub's shapes, without keyCheck, work as before.
    let (data, nonce) = k1.encrypt_entry(b"plain client").unwrap();
    let body = serde_json::json!({"vaultId": "v1", "logs": [{"encryptedData": data, "nonce": nonce, "haexTimestamp": "t"}]});
    let pushed = raw(&client, Method::POST, "/sync/push", &body.to_string()).await;
    assert_eq!(pushed.0, 200, "{pushed:?}");

    // Re-wrapped under a new password, version by version.
    let record = raw(&client, Method::GET, "/sync/vault-key/v1", "").await;
    assert_eq!(record.1["vaultKey"]["version"], 1);
    assert_eq!(record.1["vaultKey"]["keyCheck"], k1.key_check().as_str());
    let done = client
        .rewrap_vault("v1", &k1, "a new password", 1)
        .await
        .unwrap();
    assert_eq!(done["version"], 2);
    let stale = client
        .rewrap_vault("v1", &k1, "another", 1)
        .await
        .unwrap_err();
    assert_eq!(
        (stale.status(), stale.code()),
        (Some(409), Some("stale_vault_key")),
        "{stale}"
    );
    // A PATCH keeps the record's key check unless it says it replaces it.
    let other = VaultKey::generate().unwrap();
    let wrapped = other.wrap("a new password").unwrap();
    let patch = |version: i64, replace: Option<bool>| {
        let mut body = json!({
            "encryptedVaultKey": wrapped.encrypted_vault_key,
            "salt": wrapped.salt,
            "nonce": wrapped.nonce,
            "version": version,
            "keyCheck": wrapped.key_check,
        });
        if let Some(replace) = replace {
            body["replaceKeyCheck"] = json!(replace);
        }
        body.to_string()
    };
    let kept = raw(
        &client,
        Method::PATCH,
        "/sync/vault-key/v1",
        &patch(2, None),
    )
    .await;
    assert_eq!(kept.0, 200, "{kept:?}");
    let record = raw(&client, Method::GET, "/sync/vault-key/v1", "").await;
    assert_eq!(record.1["vaultKey"]["keyCheck"], k1.key_check().as_str());
    let replaced = raw(
        &client,
        Method::PATCH,
        "/sync/vault-key/v1",
        &patch(3, Some(true)),
    )
    .await;
    assert_eq!(replaced.0, 200, "{replaced:?}");
    let record = raw(&client, Method::GET, "/sync/vault-key/v1", "").await;
    assert_eq!(record.1["vaultKey"]["keyCheck"], other.key_check().as_str());
    let missing = json!({"encryptedVaultKey": wrapped.encrypted_vault_key, "salt": wrapped.salt,
        "nonce": wrapped.nonce, "version": 4, "replaceKeyCheck": true});
    // Replacing without a new one removes it.
    let cleared = raw(
        &client,
        Method::PATCH,
        "/sync/vault-key/v1",
        &missing.to_string(),
    )
    .await;
    assert_eq!(cleared.0, 200, "{cleared:?}");
    let record = raw(&client, Method::GET, "/sync/vault-key/v1", "").await;
    assert!(record.1["vaultKey"]["keyCheck"].is_null(), "{record:?}");
    // Back to the vault's own key, wrapped under the new password.
    let back = k1.wrap("a new password").unwrap();
    let body = json!({"encryptedVaultKey": back.encrypted_vault_key, "salt": back.salt,
        "nonce": back.nonce, "version": 5, "keyCheck": back.key_check, "replaceKeyCheck": true});
    let restored = raw(
        &client,
        Method::PATCH,
        "/sync/vault-key/v1",
        &body.to_string(),
    )
    .await;
    assert_eq!(restored.0, 200, "{restored:?}");
    let reopened = client.open_vault("v1", "a new password").await.unwrap();
    let page = client.pull("v1", 0, 100).await.unwrap();
    let first_entry = reopened
        .decrypt_entry(&page.logs[0].encrypted_data, &page.logs[0].nonce)
        .unwrap();
    assert_eq!(first_entry, b"a-0");
    assert!(
        client.open_vault("v1", PASSWORD).await.is_err(),
        "the old password no longer opens it"
    );

    // Erased: its bytes back in the quota, its key and entries gone, audited.
    let before = client.account().await.unwrap();
    let erased = client.delete_vault("v1").await.unwrap();
    assert_eq!(erased["entryCount"], 4);
    let after = client.account().await.unwrap();
    assert_eq!(
        usage(&before).0 - usage(&after).0,
        erased["bytes"].as_u64().unwrap()
    );
    assert_eq!(usage(&before).1 - 1, usage(&after).1, "one vault fewer");
    assert!(erased["bytes"].as_u64().unwrap() >= bytes);
    let gone = raw(&client, Method::GET, "/sync/vault-key/v1", "").await;
    assert_eq!((gone.0, code(&gone)), (404, "vault_not_found"));
    let again = raw(&client, Method::DELETE, "/sync/vault/v1", "").await;
    assert_eq!((again.0, code(&again)), (404, "vault_not_found"));
    assert_eq!(ids(&client.vaults(10, None).await.unwrap()), ["v2", "v3"]);
    let audited = sql_rows(
        &node,
        "SELECT count(*) FROM keepd_audit.audit_log WHERE action IN ('VAULT_DELETE', 'VAULT_KEY_REWRAP')",
    )
    .await;
    assert_eq!(
        audited[0].get::<_, i64>(0),
        5 + 1,
        "five re-wraps, one erasure"
    );

    // A first sync of 10,000 small entries, one request, default settings.
    let big = entries(10_000, "first-sync");
    let result = client.push("v2", &k2, &big, None).await.unwrap();
    assert_eq!(result.count, 10_000);
    assert_eq!(
        client.vaults(10, None).await.unwrap()["vaults"][0]["entryCount"],
        10_000
    );
}

/// GET /devices is paged like GET /backups.
#[tokio::test(flavor = "multi_thread")]
async fn devices_are_listed_a_page_at_a_time() {
    let (_node, daemon) = api_node(json!({}));
    let (client, _) = user(&daemon).await;
    for i in 0..3 {
        client
            .register_device(
                &format!("device {i}"),
                &keepd::client::DeviceKey::generate().unwrap(),
            )
            .await
            .unwrap();
    }
    let first = raw(&client, Method::GET, "/devices?limit=2", "").await;
    assert_eq!(first.0, 200, "{first:?}");
    assert_eq!(first.1["devices"].as_array().unwrap().len(), 2);
    let cursor = first.1["nextCursor"]
        .as_str()
        .unwrap_or_else(|| panic!("{first:?}"))
        .to_string();
    let second = raw(
        &client,
        Method::GET,
        &format!("/devices?limit=2&after={cursor}"),
        "",
    )
    .await;
    let names: Vec<&str> = second.1["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["deviceName"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["device 2"]);
    assert!(second.1["nextCursor"].is_null());
    let bad = raw(&client, Method::GET, "/devices?limit=1000", "").await;
    assert_eq!((bad.0, code(&bad)), (400, "invalid_limit"));
}

/// Live updates over real HTTP: the head first, each commit after, never
/// another account's vault nor ciphertext; a reconnect with
/// Last-Event-ID resumes without a gap; the per-account cap answers 429;
/// the reference client's `watch` turns events into pulls.
#[tokio::test(flavor = "multi_thread")]
async fn events_follow_commits_resume_without_a_gap_and_are_capped() {
    let (_node, daemon) = api_node(json!({"events": {"max_streams_per_account": 2}}));
    let (client, _) = user(&daemon).await;
    let (other, _) = user(&daemon).await;
    let key = client.create_vault("v", PASSWORD).await.unwrap();
    let other_key = other.create_vault("v", PASSWORD).await.unwrap();
    let mut stream = client.events("v", None).await.unwrap();
    assert_eq!(next_event(&mut stream).await.sequence, 0, "the head first");
    other
        .push("v", &other_key, &entries(3, "o"), None)
        .await
        .unwrap();
    client
        .push("v", &key, &entries(2, "a"), None)
        .await
        .unwrap();
    let event = next_event(&mut stream).await;
    assert_eq!(
        (event.vault_id.as_str(), event.sequence),
        ("v", 2),
        "mine only"
    );
    drop(stream);

    // Disconnected while a push commits: the reconnect starts from there.
    client
        .push("v", &key, &entries(1, "b"), None)
        .await
        .unwrap();
    let mut resumed = client.events("v", Some(2)).await.unwrap();
    assert_eq!(next_event(&mut resumed).await.sequence, 3);
    let mut current = client.events("v", Some(3)).await.unwrap();
    client
        .push("v", &key, &entries(1, "c"), None)
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut current).await.sequence,
        4,
        "no head event when seen"
    );
    assert_eq!(next_event(&mut resumed).await.sequence, 4);

    // Two streams for this account: a third is refused.
    let refused = client.events("v", None).await.err().expect("capped");
    assert_eq!(
        (refused.status(), refused.code()),
        (Some(429), Some("too_many_streams")),
        "{refused}"
    );
    let missing = other
        .events("nope", None)
        .await
        .err()
        .expect("no such vault");
    assert_eq!(missing.status(), Some(404));
    drop((resumed, current));

    // The server notices the closed streams and gives their places back;
    // the framing is SSE's, the id the sequence, and no ciphertext.
    let mut raw = common::wait_until_async(Duration::from_secs(10), || client.events("v", None))
        .await
        .expect("a stream opens again once the others closed");
    let block = tokio::time::timeout(Duration::from_secs(5), raw.next_block())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        block.contains("event: sync")
            && block.contains("id: 4")
            && block.contains(r#""sequence":4"#),
        "{block}"
    );
    assert!(
        !block.contains("encryptedData") && !block.contains("nonce"),
        "{block}"
    );
    drop(raw);

    // watch: events become pulls, up to what a background push stored.
    let mut pusher = daemon.client();
    pusher.set_token(client.token().map(str::to_string));
    let background = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let key = key;
        pusher
            .push("v", &key, &entries(5, "w"), None)
            .await
            .unwrap();
    });
    let mut seen = Vec::new();
    let last = tokio::time::timeout(
        Duration::from_secs(10),
        client.watch("v", 4, |page| {
            seen.extend(page.logs.iter().map(|e| e.sequence));
            seen.len() < 5
        }),
    )
    .await
    .expect("watch sees the push")
    .unwrap();
    background.await.unwrap();
    assert_eq!(seen, [5, 6, 7, 8, 9]);
    assert_eq!(last, 9);
}

/// A stream that opens its connection is answered outside hyper (the
/// edge's lean path, which keeps 10 000 streams in tens of MiB): on plain
/// HTTP, as over TLS above, its answers are framed as HTTP/1.1 says, it
/// closes the connection after (and when the client sends anything more),
/// and a stream opened on a connection that served another request first,
/// or over h2c, is still answered (by hyper).
#[tokio::test(flavor = "multi_thread")]
async fn event_streams_on_plain_http_are_framed_as_http_says_and_close_after() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let node = TestNode::with(common::unlimited_rates());
    let daemon = node.start_healthy();
    let addr = daemon.addr();
    let (client, _) = user(&daemon).await;
    let key = client.create_vault("v", PASSWORD).await.unwrap();
    let token = client.token().unwrap().to_string();
    let events = |auth: &str| {
        format!(
            "GET /sync/events?vaultId=v HTTP/1.1\r\nHost: localhost\r\n{auth}Accept: text/event-stream\r\n\r\n"
        )
    };
    async fn within<F: std::future::Future>(what: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(5), what)
            .await
            .expect("within 5 s")
    }

    // Refused: the whole answer, its length, then the connection's end.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(events("").as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    within(tcp.read_to_end(&mut answer)).await.unwrap();
    let answer = String::from_utf8(answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{head}");
    assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
    assert!(head.contains("\r\ndate: "), "{head}");
    assert!(
        head.contains(&format!("\r\ncontent-length: {}\r\n", body.len())),
        "{head}"
    );
    let error: Value = serde_json::from_str(body).unwrap();
    assert_eq!(error["error"]["code"], "unauthorized", "{body}");

    // Answered: chunked, one chunk an event, pushes stream through.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(events(&format!("Authorization: Bearer {token}\r\n")).as_bytes())
        .await
        .unwrap();
    let mut reader = tokio::io::BufReader::new(tcp);
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        assert_ne!(
            within(reader.read_line(&mut head)).await.unwrap(),
            0,
            "{head}"
        );
    }
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    for line in [
        "content-type: text/event-stream",
        "transfer-encoding: chunked",
        "connection: close",
    ] {
        assert!(head.contains(&format!("\r\n{line}\r\n")), "{line}: {head}");
    }
    assert!(!head.contains("content-length"), "{head}");
    // The chunks until `id: N` (heartbeats are chunks of their own).
    async fn until_id(reader: &mut (impl tokio::io::AsyncBufRead + Unpin), id: u64) {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt};
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).await.unwrap();
            let size = usize::from_str_radix(size.trim_end_matches("\r\n"), 16)
                .unwrap_or_else(|_| panic!("a chunk size line: {size:?}"));
            assert!(size > 0, "the stream ended");
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).await.unwrap();
            assert!(chunk.ends_with(b"\r\n"), "a chunk ends with CRLF");
            let text = String::from_utf8(chunk).unwrap();
            if text.contains(&format!("\nid: {id}\n")) {
                assert!(text.starts_with("event: sync\n"), "{text}");
                return;
            }
        }
    }
    within(until_id(&mut reader, 0)).await;
    client
        .push("v", &key, &entries(2, "a"), None)
        .await
        .unwrap();
    within(until_id(&mut reader, 2)).await;
    // More bytes on a connection that said it closes: closed.
    reader
        .get_mut()
        .write_all(b"GET /health HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = within(reader.read_to_end(&mut rest)).await;

    // A stream after another request on the same connection, and h2c.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let both = format!(
        "GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n{}",
        events(&format!("Authorization: Bearer {token}\r\n"))
    );
    tcp.write_all(both.as_bytes()).await.unwrap();
    let mut reader = tokio::io::BufReader::new(tcp);
    let mut seen = String::new();
    while seen.matches("HTTP/1.1 200 OK").count() < 2 {
        assert_ne!(
            within(reader.read_line(&mut seen)).await.unwrap(),
            0,
            "{seen}"
        );
    }
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut h2, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2c with prior knowledge");
    tokio::spawn(connection);
    let request = hyper::Request::get(format!("http://{addr}/health"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let answer = within(h2.send_request(request)).await.unwrap();
    assert_eq!(answer.status(), 200);
}

async fn next_event(stream: &mut keepd::client::EventStream) -> keepd::client::VaultEvent {
    tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("an event within 5 s")
        .unwrap()
        .expect("the stream goes on")
}

/// A page reads the range its cursor names (keepd never leaves a gap in a
/// vault's sequences, and the page query relies on it to bound what it
/// reads): entries removed by hand, a few or more than a page, are skipped,
/// and paging still reaches every entry left, with `hasMore` true until
/// the last.
#[tokio::test(flavor = "multi_thread")]
async fn pages_reach_every_entry_across_gaps_made_by_hand() {
    let (node, daemon) = api_node(json!({}));
    let (client, _) = user(&daemon).await;
    let key = client.create_vault("gaps", PASSWORD).await.unwrap();
    for batch in 0..3 {
        client
            .push("gaps", &key, &entries(100, &format!("b{batch}")), None)
            .await
            .unwrap();
    }
    node.superuser()
        .await
        .batch_execute(
            "DELETE FROM keepd.sync_logs WHERE sequence BETWEEN 10 AND 19 \
                OR sequence BETWEEN 50 AND 249",
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = client.pull("gaps", after, 100).await.unwrap();
        seen.extend(page.logs.iter().map(|entry| entry.sequence));
        if !page.has_more {
            break;
        }
        after = page
            .logs
            .last()
            .expect("a page with more is not empty")
            .sequence;
    }
    let left: Vec<i64> = (1..10).chain(20..50).chain(250..=300).collect();
    assert_eq!(seen, left);
}

/// `audit.retention`: entries past it are exported (signed, every link
/// kept) and pruned; the chain still verifies from its signed base, each
/// export verifies and continues the one before, and an edited export is
/// refused by name.
#[tokio::test(flavor = "multi_thread")]
async fn audit_past_its_retention_is_exported_pruned_and_still_verifies() {
    let node = TestNode::with(json!({"audit": {"retention": "2s"}}));
    let mut daemon = node.start_healthy();
    let mut client = SyncClient::new(daemon.addr());
    for n in 0..3 {
        let email = format!("pruned{n}@example.org");
        client.register(&email, PASSWORD).await.unwrap();
        client.login(&email, PASSWORD).await.unwrap();
    }
    let exports = node.state_dir().join("audit-exports");
    let verdict = common::wait_until(Duration::from_secs(30), || {
        let (code, out) = node.audit_verify();
        (code == 0 && out.contains("exported and pruned")).then_some(out)
    })
    .expect("entries older than 2 s are pruned within 30 s");
    assert!(verdict.contains("audit chain intact"), "{verdict}");

    let mut files: Vec<_> = std::fs::read_dir(&exports)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty());
    let mut prev = "0".repeat(64);
    for file in &files {
        let (code, out) = node.run(&["audit", "verify", "--export", file.to_str().unwrap()]);
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("audit export intact"), "{out}");
        let text = std::fs::read_to_string(file).unwrap();
        let header: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(header["prev"], prev.as_str(), "exports continue each other");
        prev = header["last"].as_str().unwrap().to_owned();
        assert!(!text.contains("@example.org") && !text.contains(PASSWORD));
    }

    // An edited export is refused, naming what changed.
    let text = std::fs::read_to_string(&files[0]).unwrap();
    let edited = node.dir.path().join("edited.jsonl");
    std::fs::write(&edited, text.replacen("\"action\":\"", "\"action\":\"X", 1)).unwrap();
    let (code, out) = node.run(&["audit", "verify", "--export", edited.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("changed after signing"), "{out}");

    // The chain goes on from its head, across a restart.
    client.login("pruned0@example.org", PASSWORD).await.unwrap();
    daemon.stop();
    let _daemon = node.start_healthy();
    let (code, out) = node.audit_verify();
    assert_eq!(code, 0, "{out}");

    // Whoever prunes further by hand cannot move the signed base along.
    let db = node.superuser().await;
    db.batch_execute(
        "SET session_replication_role = replica;
         CREATE TEMP TABLE doomed AS SELECT seq, entry_id FROM keepd_audit.audit_chain ORDER BY seq LIMIT 1;
         DELETE FROM keepd_audit.audit_chain WHERE seq IN (SELECT seq FROM doomed);
         DELETE FROM keepd_audit.audit_log WHERE id IN (SELECT entry_id FROM doomed);
         UPDATE keepd_audit.audit_base SET seq = seq + 1;
         SET session_replication_role = origin;",
    )
    .await
    .unwrap();
    let (code, out) = node.audit_verify();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("base is not this node's"), "{out}");
}

/// `audit.forward`: every entry, once sealed, reaches a syslog socket as
/// one JSON line with its seq and hash; no email or password in it.
#[tokio::test(flavor = "multi_thread")]
async fn audit_entries_are_forwarded_to_a_syslog_socket_once_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.sock");
    let collector = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    collector
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let node = TestNode::with(json!({"audit": {"forward": path}}));
    let daemon = node.start_healthy();
    let email = "forwarded@example.org";
    let mut client = SyncClient::new(daemon.addr());
    client.register(email, PASSWORD).await.unwrap();
    client.login(email, PASSWORD).await.unwrap();
    let mut lines = Vec::new();
    let mut buffer = vec![0u8; 65536];
    while !lines
        .iter()
        .any(|l: &String| l.contains("\"action\":\"LOGIN\""))
    {
        let n = collector.recv(&mut buffer).expect("a line within 15 s");
        lines.push(String::from_utf8_lossy(&buffer[..n]).into_owned());
    }
    let mut seqs = Vec::new();
    for line in &lines {
        let (head, body) = line.split_once("]: ").unwrap();
        assert!(head.starts_with("<86>keepd-audit["), "{line}");
        let entry: Value = serde_json::from_str(body).unwrap();
        assert_eq!(entry["hash"].as_str().unwrap().len(), 64, "{entry}");
        seqs.push(entry["seq"].as_i64().unwrap());
        assert!(!line.contains(email) && !line.contains(PASSWORD), "{line}");
    }
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"action\":\"USER_REGISTER\""))
    );
}
