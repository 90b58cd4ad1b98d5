//! Sealed credentials, least-privilege roles and rotation, tested from the
//! outside: through `keepd psql`, `keepd rotate`, the HTTP API, the files
//! and the process table.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{Daemon, Signal, TestNode, postgres_pids, wait_until};
use keepd::secrets::store::CredentialStatus;
use serde_json::{Value, json};

/// `credentials.rotation_grace_period`: how long a rotated-out login role
/// lives on.
fn grace_period(period: &str) -> Value {
    json!({"credentials": {"rotation_grace_period": period}})
}

fn started(node: &TestNode) -> Daemon {
    let daemon = node.start();
    assert!(
        daemon.wait_health(200, Duration::from_secs(15)),
        "{}",
        daemon.log()
    );
    daemon
}

/// Waits until the rotation has finished: one login role, the active one,
/// and db.enc records every retired credential as expired and audited.
fn wait_converged(node: &TestNode, daemon: &Daemon, version: u32) {
    let expected = vec![format!("keepd_{}_v{version}", node_id(daemon))];
    let done = wait_until(Duration::from_secs(30), || {
        let creds = node.credentials();
        let settled = creds.login_roles.iter().all(|c| {
            (c.version == version && c.status == CredentialStatus::Active)
                || (c.status == CredentialStatus::Expired && c.audited)
        });
        (settled && node.login_roles() == expected).then_some(())
    });
    assert!(
        done.is_some(),
        "rotation did not converge on v{version}: roles {:?}\n{}",
        node.login_roles(),
        daemon.log()
    );
}

fn node_id(daemon: &Daemon) -> String {
    daemon.get("/health").unwrap().1["nodeId"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn sealed_file_and_role_model_are_as_specified() {
    use std::os::unix::fs::MetadataExt;
    let node = TestNode::new();
    let daemon = started(&node);
    let id = node_id(&daemon);
    let secrets = node.state_dir().join("secrets");
    assert_eq!(std::fs::metadata(&secrets).unwrap().mode() & 0o777, 0o700);
    assert_eq!(
        std::fs::metadata(secrets.join("db.enc")).unwrap().mode() & 0o777,
        0o600
    );
    let creds = node.credentials();
    assert_eq!(creds.superuser.expose().len(), 64);
    assert_eq!(creds.active().unwrap().version, 1);

    let login = format!("keepd_{id}_v1");
    let attrs = node
        .psql(
            "superuser",
            &format!(
                "SELECT rolcanlogin, rolinherit, rolsuper, rolcreaterole, rolcreatedb, rolreplication, \
                 rolbypassrls, rolconnlimit FROM pg_roles WHERE rolname = '{login}'"
            ),
        )
        .unwrap();
    assert_eq!(
        attrs, "t|f|f|f|f|f|f|18",
        "LOGIN NOINHERIT, nothing else, limit = pool + 2"
    );
    let groups = node
        .psql(
            "superuser",
            &format!(
                "SELECT string_agg(g.rolname, ',' ORDER BY g.rolname) FROM pg_auth_members m \
                 JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles u ON u.oid = m.member \
                 WHERE u.rolname = '{login}'"
            ),
        )
        .unwrap();
    assert_eq!(
        groups,
        "keepd_audit,keepd_auth,keepd_operator,keepd_query,keepd_readonly,keepd_sync"
    );
    let nologin = node
        .psql(
            "superuser",
            "SELECT string_agg(rolname, ',' ORDER BY rolname) FROM pg_roles \
             WHERE rolname IN ('keepd_owner','keepd_sync','keepd_query','keepd_auth','keepd_audit','keepd_readonly','keepd_operator') \
             AND NOT rolcanlogin AND NOT rolsuper",
        )
        .unwrap();
    assert_eq!(nologin.split(',').count(), 7, "{nologin}");
    let owned = node
        .psql(
            "superuser",
            &format!(
                "SELECT (SELECT count(*) FROM pg_class WHERE relowner = r.oid) + \
                 (SELECT count(*) FROM pg_namespace WHERE nspowner = r.oid) \
                 FROM pg_roles r WHERE rolname = '{login}'"
            ),
        )
        .unwrap();
    assert_eq!(owned, "0", "the login role owns nothing");
    // PUBLIC has no right on the database or the public schema.
    let acl = node
        .psql(
            "superuser",
            "SELECT coalesce(datacl::text, '') || ' ' || \
             (SELECT coalesce(nspacl::text, '') FROM pg_namespace WHERE nspname = 'public') \
             FROM pg_database WHERE datname = 'keepd'",
        )
        .unwrap();
    assert!(
        !acl.contains("{=") && !acl.contains(",="),
        "PUBLIC privileges left: {acl}"
    );

    // Denied for real, as the login role itself.
    let denied = node
        .psql("login", "CREATE TABLE public.intruder (x int)")
        .unwrap_err();
    assert!(denied.contains("permission denied"), "{denied}");
    let denied = node.psql("login", "SET ROLE keepd_superuser").unwrap_err();
    assert!(denied.contains("permission denied"), "{denied}");
    let denied = node
        .psql("login", "SELECT pg_read_file('PG_VERSION')")
        .unwrap_err();
    assert!(denied.contains("permission denied"), "{denied}");
    assert_eq!(node.psql("login", "SELECT current_user").unwrap(), login);
}

#[test]
fn unknown_psql_role_is_refused_with_choices() {
    let node = TestNode::new();
    let _daemon = started(&node);
    let err = node.psql("postgres", "SELECT 1").unwrap_err();
    assert!(
        err.contains("--role postgres") && err.contains("superuser"),
        "{err}"
    );
}

#[test]
fn damaged_or_foreign_db_enc_stops_keepd_and_is_kept() {
    let node = TestNode::new();
    let mut daemon = started(&node);
    daemon.signal(Signal::SIGTERM);
    daemon.wait_exit(Duration::from_secs(20)).unwrap();
    drop(daemon);
    let path = node.state_dir().join("secrets/db.enc");
    let good = std::fs::read(&path).unwrap();

    let mut flipped = good.clone();
    let at = String::from_utf8_lossy(&good)
        .find("\"ciphertext\": \"")
        .unwrap()
        + 30;
    flipped[at] = if flipped[at] == b'A' { b'B' } else { b'A' };
    let other = TestNode::new();
    drop(started(&other));
    let foreign = std::fs::read(other.state_dir().join("secrets/db.enc")).unwrap();
    for (what, damaged) in [
        ("flipped byte", flipped),
        ("truncated", good[..good.len() / 3].to_vec()),
        ("another node's", foreign),
    ] {
        std::fs::write(&path, &damaged).unwrap();
        let out = node.command(&["run"]).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{what}");
        let msg = String::from_utf8_lossy(&out.stderr);
        assert!(
            msg.contains("db.enc") && msg.contains("will not replace"),
            "{what}: {msg}"
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            damaged,
            "{what}: file changed"
        );
        assert!(
            postgres_pids(&node.data_dir()).is_empty(),
            "{what}: postgres started"
        );
    }
    std::fs::write(&path, &good).unwrap();
    drop(started(&node));
}

#[test]
fn rotation_under_continuous_load_fails_nothing() {
    let node = TestNode::with(common::config::merged([
        common::unlimited_rates(),
        grace_period("2s"),
    ]));
    let daemon = Arc::new(started(&node));
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load: Vec<_> = (0..2)
        .map(|_| {
            let (daemon, stop, ok, failed) =
                (daemon.clone(), stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // Every /health is a transaction through the pool as the login role.
                    match daemon.health() {
                        Some(200) => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for version in [2, 3] {
        // The previous rotation may still be recording its retirement
        // (step 9): a refusal then is by design, so ask again.
        let message = wait_until(Duration::from_secs(15), || {
            let (success, message) = node.rotate();
            assert!(
                success || message.contains("already under way"),
                "{message}"
            );
            success.then_some(message)
        })
        .expect("a rotation was accepted");
        assert!(
            message.contains(&format!("v{version} is active")),
            "{message}"
        );
        let id = node_id(&daemon);
        let converged = wait_until(Duration::from_secs(30), || {
            (node.login_roles() == vec![format!("keepd_{id}_v{version}")]).then_some(())
        });
        assert!(converged.is_some(), "{:?}", node.login_roles());
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("{ok} requests succeeded, {failed} failed across two rotations");
    assert!(ok > 100, "the load ran ({ok})");
    assert_eq!(failed, 0, "requests failed during rotation");
    assert_eq!(node.credentials().active().unwrap().version, 3);
}

#[test]
fn a_second_rotation_request_while_one_runs_is_refused() {
    let node = TestNode::with(grace_period("30s"));
    let _daemon = started(&node);
    assert!(node.rotate().0);
    let (success, message) = node.rotate();
    assert!(!success);
    assert!(
        message.contains("already under way") && message.contains("v1 retires"),
        "{message}"
    );
}

#[test]
fn rotate_without_a_daemon_says_so() {
    let node = TestNode::new();
    let (success, message) = node.rotate();
    assert!(!success);
    assert!(
        message.contains("does not appear to be running"),
        "{message}"
    );
}

#[test]
fn no_password_or_verifier_in_logs_argv_or_files() {
    let node = TestNode::with(grace_period("2s"));
    node.set("database.postgres.log_statement", "all");
    let daemon = started(&node);
    let verifiers = |node: &TestNode| -> Vec<String> {
        node.psql(
            "superuser",
            "SELECT rolpassword FROM pg_authid WHERE rolpassword IS NOT NULL",
        )
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
    };
    let mut secrets: Vec<String> = verifiers(&node);
    let before = node.credentials();
    secrets.push(before.superuser.expose().to_string());
    secrets.push(
        before
            .active()
            .unwrap()
            .password
            .as_ref()
            .unwrap()
            .expose()
            .to_string(),
    );

    // Watch every process's argv while a rotation runs.
    let watching = Arc::new(AtomicBool::new(true));
    let argv_hits = {
        let (watching, secrets) = (watching.clone(), secrets.clone());
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while watching.load(Ordering::Relaxed) {
                for entry in std::fs::read_dir("/proc").unwrap().flatten() {
                    if let Ok(argv) = std::fs::read(entry.path().join("cmdline")) {
                        let argv = String::from_utf8_lossy(&argv).into_owned();
                        seen.extend(
                            secrets
                                .iter()
                                .filter(|s| argv.contains(s.as_str()))
                                .cloned(),
                        );
                    }
                }
            }
            seen
        })
    };
    assert!(node.rotate().0);
    wait_converged(&node, &daemon, 2);
    let superuser = node.command(&["rotate", "--superuser"]).output().unwrap();
    assert!(superuser.status.success());
    watching.store(false, Ordering::Relaxed);
    assert!(
        argv_hits.join().unwrap().is_empty(),
        "a secret appeared in a process's argv"
    );
    let after = node.credentials();
    secrets.push(after.superuser.expose().to_string());
    secrets.push(
        after
            .active()
            .unwrap()
            .password
            .as_ref()
            .unwrap()
            .expose()
            .to_string(),
    );
    secrets.extend(verifiers(&node));
    // SCRAM verifiers are `SCRAM-SHA-256$iter:salt$stored:server`; match
    // their key parts too, in case a log quoted them partially.
    let needles: Vec<String> = secrets
        .iter()
        .flat_map(|s| {
            let mut v = vec![s.clone()];
            if let Some((_, keys)) = s.rsplit_once('$') {
                v.extend(keys.split(':').map(str::to_string));
            }
            v
        })
        .collect();

    let mut scanned = Vec::new();
    let mut hits = Vec::new();
    let mut scan = |name: String, text: Vec<u8>| {
        let text = String::from_utf8_lossy(&text);
        for needle in &needles {
            if text.contains(needle.as_str()) {
                hits.push(name.clone());
            }
        }
        scanned.push(name);
    };
    scan("keepd's log".into(), daemon.log().into_bytes());
    // Every file keepd or Postgres writes outside the relation and WAL
    // storage (where Postgres keeps pg_authid itself), and outside db.enc.
    let mut stack = vec![node.dir.path().to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                if ![
                    "base",
                    "global",
                    "pg_wal",
                    "pg_xact",
                    "pg_multixact",
                    "pg_subtrans",
                ]
                .contains(&name.as_str())
                {
                    stack.push(path);
                }
            } else if path.is_file() && name != "db.enc" {
                scan(
                    path.display().to_string(),
                    std::fs::read(&path).unwrap_or_default(),
                );
            }
        }
    }
    assert!(
        scanned.iter().any(|n| n.contains("/pglog/")),
        "the Postgres log was scanned: {scanned:?}"
    );
    assert!(hits.is_empty(), "secrets found in {hits:?}");
    // log_statement = all really was on: the log has statements.
    let log_dir = node.pg_log_dir();
    let pg_log: String = std::fs::read_dir(&log_dir)
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(
        pg_log.contains("statement: "),
        "log_statement=all logged nothing"
    );
}

fn crash_at(step: u8) {
    let node = TestNode::with(grace_period("1s"));
    let mut daemon = {
        let mut cmd = node.command(&["run"]);
        cmd.env("KEEPD_FAULT_ROTATION_STEP", step.to_string());
        common::Daemon::spawn_with(cmd, node.data_dir())
    };
    assert!(
        daemon.wait_health(200, Duration::from_secs(15)),
        "{}",
        daemon.log()
    );
    let id = node_id(&daemon);
    let _ = node.rotate();
    let status = daemon.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some(),
        "keepd did not stop at step {step}:\n{}",
        daemon.log()
    );
    assert!(
        daemon
            .wait_for_log(
                "fault injection: killing keepd after rotation step",
                // The reader thread may still be draining the dead process's pipe.
                Duration::from_secs(5)
            )
            .is_some(),
        "{}",
        daemon.log()
    );
    drop(daemon);
    assert!(
        postgres_pids(&node.data_dir()).is_empty(),
        "orphan postgres after the crash"
    );

    let daemon = started(&node);
    wait_converged(&node, &daemon, 2);
    assert_eq!(node.login_roles(), vec![format!("keepd_{id}_v2")]);
    let creds = node.credentials();
    assert_eq!(creds.active().unwrap().version, 2);
    assert_eq!(
        creds.live().count(),
        1,
        "no pending or retiring credential left"
    );
    assert_eq!(
        node.psql("login", "SELECT current_user").unwrap(),
        format!("keepd_{id}_v2")
    );
    assert_eq!(daemon.health(), Some(200));
}

macro_rules! crash_tests {
    ($($name:ident => $step:expr),* $(,)?) => {
        $(#[test] fn $name() { crash_at($step); })*
    };
}

crash_tests! {
    crash_after_rotation_step_1_converges => 1,
    crash_after_rotation_step_2_converges => 2,
    crash_after_rotation_step_3_converges => 3,
    crash_after_rotation_step_4_converges => 4,
    crash_after_rotation_step_5_converges => 5,
    crash_after_rotation_step_6_converges => 6,
    crash_after_rotation_step_7_converges => 7,
    crash_after_rotation_step_8_converges => 8,
    crash_after_rotation_step_9_converges => 9,
}

/// `credentials.encrypted_path` moves db.enc: the daemon seals it there
/// (in a private directory), nothing is written at the default place, and
/// the operator commands and the report read it from there.
#[test]
fn the_sealed_file_lives_where_credentials_encrypted_path_says() {
    use std::os::unix::fs::MetadataExt;
    let elsewhere = tempfile::tempdir().unwrap();
    let path = elsewhere.path().join("vault").join("keepd-db.enc");
    let node = TestNode::with(json!({"credentials": {"encrypted_path": path}}));
    let _daemon = started(&node);
    assert!(path.is_file(), "db.enc not at {}", path.display());
    assert_eq!(
        std::fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777,
        0o700
    );
    assert!(
        !node.state_dir().join("secrets/db.enc").exists(),
        "db.enc also written at the default place"
    );
    assert_eq!(node.psql("superuser", "SELECT 1").unwrap().trim(), "1");
    assert_eq!(node.report_check("credentials.sealing")["status"], "pass");
}

/// `keepd psql` hands the password over a descriptor, never the
/// environment: psql's children (its shell escape, pg_dump) hold no secret
/// in theirs (CIS 1.7).
#[test]
fn psql_children_hold_no_password_in_their_environment() {
    let node = TestNode::new();
    let _daemon = started(&node);
    let out = node
        .command(&[
            "psql",
            "--",
            "-XAtq",
            "-c",
            "\\! cat /proc/$$/environ | tr '\\0' '\\n'",
        ])
        .output()
        .unwrap();
    let environ = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(environ.contains("PGPASSFILE=/dev/fd/"), "{environ}");
    assert!(!environ.contains("PGPASSWORD"), "{environ}");
    let credentials = node.credentials();
    for secret in [
        credentials.superuser.expose(),
        credentials
            .active()
            .unwrap()
            .password
            .as_ref()
            .unwrap()
            .expose(),
    ] {
        assert!(
            !environ.contains(secret),
            "a password in psql's child's environment"
        );
    }
    // And psql itself got in (as the superuser, then the login role).
    assert_eq!(node.psql("superuser", "SELECT 1").unwrap(), "1");
    assert_eq!(node.psql("login", "SELECT 1").unwrap(), "1");
}

/// keepd's superuser gets a new password while the daemon serves and a
/// `keepd psql` session stays open: no request fails, the session goes on,
/// the old password is refused, the daemon's own new superuser connections
/// (a login-role rotation) use the new one, and it is audited.
#[test]
fn the_superuser_password_rotates_under_load_and_an_open_psql_session() {
    use std::io::{BufRead, BufReader, Write};
    let node = TestNode::with(common::config::merged([
        common::unlimited_rates(),
        grace_period("2s"),
    ]));
    let daemon = Arc::new(started(&node));
    let mut session = node
        .command(&["psql", "--", "-XAtq"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = session.stdin.take().unwrap();
    let mut output = BufReader::new(session.stdout.take().unwrap());
    let mut ask = |sql: &str| {
        writeln!(input, "{sql}").unwrap();
        input.flush().unwrap();
        let mut line = String::new();
        output.read_line(&mut line).unwrap();
        line.trim().to_string()
    };
    assert_eq!(ask("SELECT current_user;"), "keepd_superuser");
    let before = node.credentials();
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let load = {
        let (daemon, stop, failed) = (daemon.clone(), stop.clone(), failed.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if daemon.health() != Some(200) {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    for _ in 0..2 {
        let out = node.command(&["rotate", "--superuser"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("new password"), "{text}");
    }
    // The daemon's next superuser connection: a login-role rotation.
    let (rotated, message) = node.rotate();
    assert!(rotated, "{message}");
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "requests failed");
    assert_eq!(ask("SELECT 2;"), "2", "the open session went on");
    drop(input);
    assert!(session.wait().unwrap().success());

    let after = node.credentials();
    assert_ne!(after.superuser.expose(), before.superuser.expose());
    assert!(after.superuser_next.is_none());
    assert!(after.superuser_created_at >= before.superuser_created_at);
    // db.enc's password works (keepd psql reads it); the old one is refused.
    assert_eq!(node.psql("superuser", "SELECT 1").unwrap(), "1");
    let socket = node.dir.path().join("run/postgres");
    let old = std::process::Command::new("psql")
        .args([
            "-XAtq",
            "-h",
            socket.to_str().unwrap(),
            "-U",
            "keepd_superuser",
            "-d",
            "keepd",
            "-c",
            "SELECT 1",
        ])
        .env("PGPASSWORD", before.superuser.expose())
        .output()
        .unwrap();
    assert!(!old.status.success(), "the old password still logs in");
    assert!(
        String::from_utf8_lossy(&old.stderr).contains("password authentication failed"),
        "{}",
        String::from_utf8_lossy(&old.stderr)
    );
    let audited = node
        .psql(
            "superuser",
            "SELECT count(*) FROM keepd_audit.audit_log WHERE action = 'CREDENTIAL_ROTATION' \
             AND metadata->>'role' = 'superuser'",
        )
        .unwrap();
    assert_eq!(audited, "2");
    let status = node.command(&["keys", "status"]).output().unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("credentials.superuser_rotation_interval"),
        "{status}"
    );
}

/// A superuser rotation interrupted after its new password was sealed is
/// finished by the next start, and keepd starts.
#[test]
fn an_interrupted_superuser_rotation_is_finished_at_start() {
    let node = TestNode::new();
    let mut daemon = started(&node);
    daemon.stop();
    let identity =
        keepd::identity::NodeIdentity::load(&node.state_dir().join("identity.key")).unwrap();
    let mut credentials = node.credentials();
    let next = keepd::secrets::values::generate_password(64).unwrap();
    credentials.superuser_next = Some(next.clone());
    keepd::secrets::store::CredentialStore::new(node.state_dir().join("secrets/db.enc"))
        .save(&identity, keepd::config::SealMethod::Hybrid, &credentials)
        .unwrap();
    let daemon = started(&node);
    assert!(
        daemon
            .wait_for_log(
                "rotation: finishing an interrupted superuser password rotation",
                Duration::from_secs(10)
            )
            .is_some(),
        "{}",
        daemon.log()
    );
    let after = node.credentials();
    assert_eq!(after.superuser.expose(), next.expose());
    assert!(after.superuser_next.is_none());
    assert_eq!(node.psql("superuser", "SELECT 1").unwrap(), "1");
}
