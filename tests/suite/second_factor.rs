//! TOTP as a second factor, from outside: enrolment and confirmation, a
//! code accepted once, recovery codes once each, turning it off, the
//! operator's audited reset, `api.auth.require_second_factor`, and code
//! guesses throttled like password guesses.

use crate::common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::TestNode;
use hyper::Method;
use keepd::client::{SecondFactor, SyncClient};
use keepd::second_factor::code_for;
use serde_json::json;

const PASSWORD: &str = "correct horse battery staple";

fn email() -> String {
    format!("user-{}@example.org", common::uuid())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_factor_is_needed_once_confirmed_and_each_code_works_once() {
    let node = TestNode::with(common::unlimited_rates());
    let daemon = node.start_healthy();
    let email = email();
    let mut client = daemon.client();
    client.register(&email, PASSWORD).await.unwrap();
    client.login(&email, PASSWORD).await.unwrap();

    let (uri, secret) = client.enrol_totp(Some(&email)).await.unwrap();
    assert!(uri.starts_with("otpauth://totp/keepd:"), "{uri}");
    assert!(uri.contains(&format!("secret={secret}")), "{uri}");
    // Not on until confirmed: a login needs no code yet.
    daemon.client().login(&email, PASSWORD).await.unwrap();
    let step = now() / 30;
    let code = |step: u64| code_for(&secret, step * 30).unwrap();
    let wrong = client.confirm_totp("000000").await;
    if code(step) != "000000" {
        assert_eq!(wrong.unwrap_err().code(), Some("invalid_second_factor"));
    }
    let recovery = client.confirm_totp(&code(step)).await.unwrap();
    assert_eq!(recovery.len(), 10);
    // Only hashes are kept; the secret is sealed.
    let stored = node
        .superuser()
        .await
        .query(
            "SELECT u.totp_secret::text, (SELECT string_agg(encode(code_hash, 'hex'), ',') \
             FROM keepd.recovery_codes) FROM keepd.users u WHERE u.totp_secret IS NOT NULL",
            &[],
        )
        .await
        .unwrap();
    let (sealed, hashes): (String, String) = (stored[0].get(0), stored[0].get(1));
    assert!(!sealed.contains(&hex::encode(secret.as_bytes())) && sealed.starts_with("\\x4b4631"));
    for code in &recovery {
        assert!(!hashes.contains(&code.replace('-', "")));
    }

    let (this_step, next_step) = (code(step), code(step + 1));
    let typed = recovery[0].to_uppercase().replace('-', " ");
    let mut other = daemon.client();
    let login = async |client: &mut SyncClient, factor| {
        client
            .login_with_second_factor(&email, PASSWORD, factor)
            .await
            .map_err(|e| e.code().map(str::to_string))
    };
    assert_eq!(
        login(&mut other, None).await.unwrap_err().as_deref(),
        Some("second_factor_required")
    );
    // The confirmation's code again: a replay.
    assert_eq!(
        login(&mut other, Some(SecondFactor::Totp(&this_step)))
            .await
            .unwrap_err()
            .as_deref(),
        Some("invalid_second_factor")
    );
    assert_eq!(
        login(&mut other, Some(SecondFactor::Totp("12345")))
            .await
            .unwrap_err()
            .as_deref(),
        Some("invalid_totp_code")
    );
    // The next step's code (within the skew of one step) works, once.
    login(&mut other, Some(SecondFactor::Totp(&next_step)))
        .await
        .unwrap();
    assert_eq!(
        login(&mut other, Some(SecondFactor::Totp(&next_step)))
            .await
            .unwrap_err()
            .as_deref(),
        Some("invalid_second_factor")
    );
    // A recovery code works once, however it is typed.
    login(&mut other, Some(SecondFactor::Recovery(&typed)))
        .await
        .unwrap();
    assert_eq!(
        login(&mut other, Some(SecondFactor::Recovery(&recovery[0])))
            .await
            .unwrap_err()
            .as_deref(),
        Some("invalid_second_factor")
    );
    // The password route asks for it as well.
    let answer = other
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
    assert_eq!(answer.status, 401, "{}", answer.text);

    let (code, text) = node.run(&["account", "show", &email]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("2fa       TOTP"), "{text}");
    // Off: the password and a code.
    let e = other
        .send(
            Method::DELETE,
            "/auth/totp",
            &[],
            Some(b"{\"totpCode\": \"123456\"}".to_vec()),
        )
        .await
        .unwrap();
    assert_eq!(e.status, 400, "{}", e.text);
    other
        .disable_totp(&email, PASSWORD, SecondFactor::Recovery(&recovery[1]))
        .await
        .unwrap();
    login(&mut other, None).await.unwrap();
    let audit = node
        .superuser()
        .await
        .query(
            "SELECT string_agg(action, ',' ORDER BY id) FROM keepd_audit.audit_log \
             WHERE action LIKE 'SECOND_FACTOR_%'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        audit[0].get::<_, String>(0),
        "SECOND_FACTOR_ENABLE,SECOND_FACTOR_DISABLE"
    );
}

/// A lost phone: the operator resets the factor, audited; the account
/// logs in with its password alone.
#[tokio::test(flavor = "multi_thread")]
async fn the_operator_resets_a_lost_second_factor() {
    let node = TestNode::with(common::unlimited_rates());
    let daemon = node.start_healthy();
    let email = email();
    let mut client = daemon.client();
    client.register(&email, PASSWORD).await.unwrap();
    client.login(&email, PASSWORD).await.unwrap();
    let (_, secret) = client.enrol_totp(None).await.unwrap();
    client
        .confirm_totp(&code_for(&secret, now()).unwrap())
        .await
        .unwrap();
    let e = daemon.client().login(&email, PASSWORD).await.unwrap_err();
    assert_eq!(e.code(), Some("second_factor_required"));
    let (code, text) = node.run(&["account", "reset-second-factor", &email]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("2fa       none"), "{text}");
    let (code, text) = node.run(&["account", "reset-second-factor", &email]);
    assert_ne!(code, 0, "{text}");
    daemon.client().login(&email, PASSWORD).await.unwrap();
    let audit = node
        .superuser()
        .await
        .query(
            "SELECT metadata->'operator'->>'uid' FROM keepd_audit.audit_log \
             WHERE action = 'SECOND_FACTOR_RESET'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(audit.len(), 1, "the reset is audited once");
    assert!(audit[0].get::<_, Option<String>>(0).is_some());
}

/// With api.auth.require_second_factor, the synced data answers only a
/// session that proved a second factor.
#[tokio::test(flavor = "multi_thread")]
async fn a_required_second_factor_holds_back_every_sync_route() {
    let node = TestNode::with(common::unlimited_rates());
    node.set("api.auth.require_second_factor", true);
    let daemon = node.start_healthy();
    let email = email();
    let mut client = daemon.client();
    client.register(&email, PASSWORD).await.unwrap();
    client.login(&email, PASSWORD).await.unwrap();
    for refused in [
        client.vaults(10, None).await.unwrap_err(),
        client
            .create_vault("v", PASSWORD)
            .await
            .map(|_| ())
            .unwrap_err(),
        client.devices().await.unwrap_err(),
        // A pull reads in the round trip that checks the session: the
        // page is dropped unread.
        client.pull("v", 0, 10).await.map(|_| ()).unwrap_err(),
    ] {
        assert_eq!(
            (refused.status(), refused.code()),
            (Some(403), Some("second_factor_required")),
            "{refused}"
        );
        assert!(refused.to_string().contains("/auth/totp"), "{refused}");
    }
    let (_, secret) = client.enrol_totp(None).await.unwrap();
    client
        .confirm_totp(&code_for(&secret, now()).unwrap())
        .await
        .unwrap();
    // This session confirmed it: it proved the factor.
    client.create_vault("v", PASSWORD).await.unwrap();
    assert_eq!(
        client.vaults(10, None).await.unwrap()["vaults"][0]["vaultId"],
        "v"
    );
}

/// Wrong codes count as failed attempts of the account, as wrong
/// passwords do: past the free ones, a stranger's guesses are held back.
#[tokio::test(flavor = "multi_thread")]
async fn guessing_codes_is_throttled_like_guessing_passwords() {
    let node = TestNode::with(common::unlimited_rates());
    node.merge(json!({"api": {
        "trusted_proxies": ["127.0.0.1"],
        "rate_limits": {"login_failures_free": 3},
    }}));
    let daemon = node.start_healthy();
    let email = email();
    let mut client = daemon.client();
    client.register(&email, PASSWORD).await.unwrap();
    client.login(&email, PASSWORD).await.unwrap();
    let (_, secret) = client.enrol_totp(None).await.unwrap();
    client
        .confirm_totp(&code_for(&secret, now()).unwrap())
        .await
        .unwrap();
    // A thief with the password, guessing codes on the password route.
    let mut statuses = Vec::new();
    for guess in 0..8 {
        let body = json!({"email": email, "password": PASSWORD,
                          "totpCode": format!("{:06}", 111_111 * (guess % 9 + 1) % 1_000_000)});
        let answer = client
            .send(
                Method::POST,
                "/auth/login",
                &[("x-forwarded-for", "10.99.0.1")],
                Some(body.to_string().into_bytes()),
            )
            .await
            .unwrap();
        statuses.push(answer.status);
    }
    assert!(statuses[..3].iter().all(|s| *s == 401), "{statuses:?}");
    assert!(statuses[4..].iter().all(|s| *s == 429), "{statuses:?}");
}
