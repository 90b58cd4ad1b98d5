//! OPAQUE logins from outside: the password reaches keepd nowhere, known
//! and unknown accounts answer alike (shape and timing), moving a
//! password account, and every malformed or out-of-order message refused
//! by name.

use crate::common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::{Daemon, TestNode};
use hyper::Method;
use keepd::client::SyncClient;
use keepd::client::opaque::Login;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PASSWORD: &str = "correct horse battery staple";

fn email() -> String {
    format!("user-{}@example.org", common::uuid())
}

/// A TCP proxy in front of `target` that keeps every byte clients send.
async fn recording_proxy(target: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kept = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let kept = kept.clone();
            tokio::spawn(async move {
                let outbound = tokio::net::TcpStream::connect(target).await.unwrap();
                let (mut from_client, mut to_client) = inbound.split();
                let (mut from_server, mut to_server) = outbound.into_split();
                let upstream = async {
                    let mut buf = vec![0u8; 65536];
                    loop {
                        let n = from_client.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        kept.lock().unwrap().extend_from_slice(&buf[..n]);
                        if to_server.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = to_server.shutdown().await;
                };
                let downstream = async {
                    let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
                };
                tokio::join!(upstream, downstream);
            });
        }
    });
    (addr, seen)
}

/// Every file under `dir`, read whole.
fn files_under(dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_under(&path, out);
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path.display().to_string(), bytes));
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// An account registers, logs in, changes its password and erases itself
/// with OPAQUE; everything keepd received (the bytes at its listener),
/// stored (every table, dumped as text) and logged (keepd's log,
/// Postgres's files under the data directory) is searched for either
/// password, as text, base64 and hex: neither appears anywhere.
#[tokio::test(flavor = "multi_thread")]
async fn the_password_reaches_keepd_nowhere() {
    let node = TestNode::with(common::unlimited_rates());
    let daemon = node.start_healthy();
    let (proxy, received) = recording_proxy(daemon.addr()).await;
    let (old, new) = ("first secret passphrase", "second secret passphrase");
    let email = email();
    let mut client = SyncClient::new(proxy);
    client.register(&email, old).await.unwrap();
    client.login(&email, old).await.unwrap();
    client.create_vault("v", "a vault password").await.unwrap();
    client.change_password(&email, old, new).await.unwrap();
    client.login(&email, new).await.unwrap();
    let wrong = client.login(&email, old).await.unwrap_err();
    assert_eq!(wrong.code(), Some("invalid_credentials"), "{wrong}");
    client.login(&email, new).await.unwrap();
    // What the tables hold, before the erasure takes the account away.
    let tables = node
        .superuser()
        .await
        .query(
            "SELECT string_agg(t::text, E'\\n') FROM (\
               SELECT u::text AS t FROM keepd.users u UNION ALL \
               SELECT o::text FROM keepd.opaque_logins o UNION ALL \
               SELECT l::text FROM keepd.login_throttle l UNION ALL \
               SELECT a::text FROM keepd_audit.audit_log a) all_rows",
            &[],
        )
        .await
        .unwrap();
    let tables: String = tables[0].get(0);
    client.delete_account(&email, new).await.unwrap();

    let received = received.lock().unwrap().clone();
    assert!(
        contains(&received, b"/auth/opaque/login/finish"),
        "the proxy saw the exchange"
    );
    let mut places: Vec<(String, Vec<u8>)> = vec![
        ("the requests keepd received".into(), received),
        ("keepd's tables".into(), tables.into_bytes()),
        ("keepd's log".into(), daemon.log().into_bytes()),
    ];
    files_under(&node.data_dir(), &mut places);
    let logs = places
        .iter()
        .filter(|(name, _)| name.contains("log"))
        .count();
    assert!(logs > 1, "Postgres's logs were searched too");
    for password in [old, new] {
        for form in [
            password.as_bytes().to_vec(),
            BASE64.encode(password).into_bytes(),
            hex::encode(password).into_bytes(),
        ] {
            for (place, bytes) in &places {
                assert!(
                    !contains(bytes, &form),
                    "{password:?} appears in {place} as {}",
                    String::from_utf8_lossy(&form)
                );
            }
        }
    }
}

/// The median of `samples`, in microseconds.
fn median(mut samples: Vec<u128>) -> u128 {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

/// A login's first message answered for an account and for an email no
/// account has: the same shape and, over 200 tries each, medians within
/// 10 %. The password route alike.
#[tokio::test(flavor = "multi_thread")]
async fn known_and_unknown_accounts_answer_alike() {
    let node = TestNode::with(common::unlimited_rates());
    node.set("api.rate_limits.login_failures_free", 1_000_000);
    let daemon = node.start_healthy();
    let client = daemon.client();
    let (known, password_known) = (email(), email());
    client.register(&known, PASSWORD).await.unwrap();
    client
        .register_with_password(&password_known, PASSWORD)
        .await
        .unwrap();
    let (_, request) = Login::start(PASSWORD).unwrap();
    let start = |email: &str| json!({"email": email, "credentialRequest": request}).to_string();
    let wrong = |email: &str| json!({"email": email, "password": "not it at all"}).to_string();

    let send = async |path: &str, body: String| {
        let began = Instant::now();
        let answer = client
            .send(Method::POST, path, &[], Some(body.into_bytes()))
            .await
            .unwrap();
        (began.elapsed().as_micros(), answer)
    };
    // Shapes: the same fields, the same lengths.
    let (_, a) = send("/auth/opaque/login/start", start(&known)).await;
    let (_, b) = send("/auth/opaque/login/start", start(&email())).await;
    assert_eq!((a.status, b.status), (200, 200));
    let shape = |v: &Value| {
        v.as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().map_or(0, str::len)))
            .collect::<Vec<_>>()
    };
    assert_eq!(shape(&a.body), shape(&b.body));

    for (path, body, known) in [
        (
            "/auth/opaque/login/start",
            &start as &dyn Fn(&str) -> String,
            &known,
        ),
        ("/auth/login", &wrong, &password_known),
    ] {
        // Up to three rounds: a burst of the other tests' load on these two
        // cores can skew one round; a real difference shows in every one.
        let mut rounds = Vec::new();
        let mut alike = false;
        for _ in 0..3 {
            let (mut for_known, mut for_unknown) = (Vec::new(), Vec::new());
            for _ in 0..200 {
                // Interleaved, so drift in the machine's load hits both alike.
                let (t, answer) = send(path, body(known)).await;
                assert!(matches!(answer.status, 200 | 401), "{}", answer.text);
                for_known.push(t);
                let (t, answer) = send(path, body(&email())).await;
                assert!(matches!(answer.status, 200 | 401), "{}", answer.text);
                for_unknown.push(t);
            }
            let (k, u) = (median(for_known), median(for_unknown));
            let ratio = k as f64 / u as f64;
            eprintln!("{path}: median {k} µs for an account, {u} µs for none ({ratio:.3})");
            rounds.push(format!("{k} µs against {u} µs"));
            alike = (0.9..=1.1).contains(&ratio);
            if alike {
                break;
            }
        }
        assert!(alike, "{path}: {rounds:?}");
    }
}

async fn post(client: &SyncClient, path: &str, body: Value) -> (u16, Value) {
    let answer = client
        .send(Method::POST, path, &[], Some(body.to_string().into_bytes()))
        .await
        .unwrap();
    (answer.status, answer.body)
}

fn code(answer: &(u16, Value)) -> (u16, &str) {
    (answer.0, answer.1["error"]["code"].as_str().unwrap_or(""))
}

/// Malformed messages, a finish without a start, a finish replayed, an
/// expired login: each refused with its code, never a 500, and the same
/// for an email no account has.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_and_out_of_order_messages_are_refused_by_name() {
    let node = TestNode::with(common::unlimited_rates());
    let daemon = node.start_healthy();
    let client = daemon.client();
    let email = email();
    client.register(&email, PASSWORD).await.unwrap();

    for (path, body, field) in [
        (
            "/auth/opaque/register/start",
            json!({"email": email, "registrationRequest": "AAAA"}),
            "registrationRequest",
        ),
        (
            "/auth/opaque/register/start",
            json!({"email": email, "registrationRequest": "not base64!"}),
            "registrationRequest",
        ),
        (
            "/auth/opaque/register/finish",
            json!({"email": self::email(), "registrationRecord": BASE64.encode([7u8; 192])}),
            "registrationRecord",
        ),
        (
            "/auth/opaque/login/start",
            json!({"email": email, "credentialRequest": BASE64.encode([1u8; 96])}),
            "credentialRequest",
        ),
        (
            "/auth/opaque/login/start",
            json!({"email": email, "credentialRequest": BASE64.encode([1u8; 95])}),
            "credentialRequest",
        ),
    ] {
        let answer = post(&client, path, body).await;
        assert_eq!(
            code(&answer),
            (400, "invalid_opaque_message"),
            "{path}: {answer:?}"
        );
        let message = answer.1["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{message}");
    }

    let started = |email: String| {
        let client = &client;
        async move {
            let (login, request) = Login::start(PASSWORD).unwrap();
            let answer = post(
                client,
                "/auth/opaque/login/start",
                json!({"email": email, "credentialRequest": request}),
            )
            .await;
            assert_eq!(answer.0, 200, "{answer:?}");
            let finished = login
                .finish(PASSWORD, &answer.1["credentialResponse"])
                .unwrap();
            (answer.1["loginId"].clone(), finished)
        }
    };
    let finish = |email: &str, login: &Value, finalization: &str| json!({"email": email, "loginId": login, "credentialFinalization": finalization});
    // A finish without a start; a loginId that is no id.
    let nowhere = finish(&email, &json!(common::uuid()), &BASE64.encode([3u8; 64]));
    let answer = post(&client, "/auth/opaque/login/finish", nowhere).await;
    assert_eq!(code(&answer), (401, "login_expired"), "{answer:?}");
    let not_an_id = finish(&email, &json!("12"), &BASE64.encode([3u8; 64]));
    let answer = post(&client, "/auth/opaque/login/finish", not_an_id).await;
    assert_eq!(code(&answer), (400, "invalid_login_id"), "{answer:?}");
    // A finish of the wrong length uses the login up like any finish: the
    // right one after it is too late.
    let (login, finished) = started(email.clone()).await;
    let finished = finished.expect("the password is right");
    let short = finish(&email, &login, &BASE64.encode([3u8; 10]));
    let answer = post(&client, "/auth/opaque/login/finish", short).await;
    assert_eq!(code(&answer), (400, "invalid_opaque_message"), "{answer:?}");
    let right = finish(&email, &login, &finished.finalization);
    let answer = post(&client, "/auth/opaque/login/finish", right).await;
    assert_eq!(code(&answer), (401, "login_expired"), "{answer:?}");
    let (login, finished) = started(email.clone()).await;
    let right = finish(&email, &login, &finished.unwrap().finalization);
    let answer = post(&client, "/auth/opaque/login/finish", right.clone()).await;
    assert_eq!(answer.0, 200, "{answer:?}");
    assert!(answer.1["token"].is_string());
    // Replayed: the state was read once.
    let answer = post(&client, "/auth/opaque/login/finish", right).await;
    assert_eq!(code(&answer), (401, "login_expired"), "{answer:?}");
    // Another email cannot finish this account's login.
    let (login, finished) = started(email.clone()).await;
    let stolen = finish(&self::email(), &login, &finished.unwrap().finalization);
    let answer = post(&client, "/auth/opaque/login/finish", stolen).await;
    assert_eq!(code(&answer), (401, "login_expired"), "{answer:?}");
    // Expired: a login older than its 60 seconds.
    let (login, finished) = started(email.clone()).await;
    node.superuser()
        .await
        .execute(
            "UPDATE keepd.opaque_logins SET expires_at = now() - interval '1 second'",
            &[],
        )
        .await
        .unwrap();
    let late = finish(&email, &login, &finished.unwrap().finalization);
    let answer = post(&client, "/auth/opaque/login/finish", late).await;
    assert_eq!(code(&answer), (401, "login_expired"), "{answer:?}");
    // An email with no account: the client cannot finish; a made-up
    // finalization is answered as a wrong password is.
    let nobody = self::email();
    let (login, finished) = started(nobody.clone()).await;
    assert!(finished.is_none(), "no record, nothing to finish with");
    let guess = finish(&nobody, &login, &BASE64.encode([5u8; 64]));
    let for_nobody = post(&client, "/auth/opaque/login/finish", guess).await;
    let (login, _) = started(email.clone()).await;
    let guess = finish(&email, &login, &BASE64.encode([5u8; 64]));
    let for_account = post(&client, "/auth/opaque/login/finish", guess).await;
    assert_eq!(code(&for_nobody), (401, "invalid_credentials"));
    assert_eq!(for_nobody, for_account, "the same answer, whoever asks");
    assert!(
        !daemon.log().contains("\"level\":\"ERROR\""),
        "{}",
        daemon.log()
    );
}

/// A password account moves to OPAQUE with its current password; from
/// then on its password login is refused. With api.auth.password_login
/// off the password routes answer 403 and the report's check passes.
#[tokio::test(flavor = "multi_thread")]
async fn a_password_account_moves_to_opaque_and_the_password_routes_can_be_turned_off() {
    let node = TestNode::with(common::unlimited_rates());
    let daemon = node.start_healthy();
    let email = email();
    let mut client = daemon.client();
    client
        .register_with_password(&email, PASSWORD)
        .await
        .unwrap();
    // No OPAQUE record yet: an OPAQUE login cannot finish.
    let e = client.login(&email, PASSWORD).await.unwrap_err();
    assert_eq!(e.code(), Some("invalid_credentials"));
    client.login_with_password(&email, PASSWORD).await.unwrap();
    let wrong = client
        .upgrade_to_opaque(&email, "not the password")
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Some("invalid_credentials"));
    client.upgrade_to_opaque(&email, PASSWORD).await.unwrap();
    let refused = client
        .login_with_password(&email, PASSWORD)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some("invalid_credentials"), "{refused}");
    client.login(&email, PASSWORD).await.unwrap();
    // The password routes of re-authentication say what to do instead.
    let e = client
        .change_password_with_password(PASSWORD, "another long password")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("opaque_account"), "{e}");
    let audit = node
        .superuser()
        .await
        .query(
            "SELECT count(*) FROM keepd_audit.audit_log \
             WHERE action = 'PASSWORD_CHANGE' AND metadata->>'method' = 'opaque'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(audit[0].get::<_, i64>(0), 1, "the move is audited");
    drop(daemon);

    node.set("api.auth.password_login", false);
    let daemon: Daemon = node.start_healthy();
    let mut client = daemon.client();
    let e = client
        .register_with_password(&self::email(), PASSWORD)
        .await
        .unwrap_err();
    assert_eq!(
        (e.status(), e.code()),
        (Some(403), Some("password_login_disabled"))
    );
    let e = client
        .login_with_password(&email, PASSWORD)
        .await
        .unwrap_err();
    assert_eq!(
        (e.status(), e.code()),
        (Some(403), Some("password_login_disabled"))
    );
    client.login(&email, PASSWORD).await.unwrap();
    assert_eq!(node.report_check("api.password_login")["status"], "pass");
}
