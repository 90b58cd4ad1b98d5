//! The security report measured from a live keepd, each check's pass and
//! fail path provoked from outside, and the three fallback modes.

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::TestNode;
use serde_json::{Value, json};

fn report(node: &TestNode) -> (i32, Value) {
    let out = node.command(&["report", "--json"]).output().unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "not JSON: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), json)
}

fn status<'a>(report: &'a Value, id: &str) -> &'a str {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no check {id}: {report}"))["status"]
        .as_str()
        .unwrap()
}

fn sql(node: &TestNode, statement: &str) {
    node.psql("superuser", statement)
        .unwrap_or_else(|e| panic!("{statement}: {e}"));
}

#[test]
fn each_check_passes_and_fails_as_the_live_system_changes() {
    let node = TestNode::new();
    let daemon = node.start();
    assert!(daemon.wait_health(200, Duration::from_secs(30)));
    let (code, healthy) = report(&node);
    assert_eq!(code, 0);
    for id in [
        "credentials.sealing",
        "roles.login_role",
        "roles.group_roles",
        "network.transport",
        "hba.rules",
        "auth.password_encryption",
        "logging.settings",
        "audit.chain",
        "files.modes",
        "network.forbidden_connection",
    ] {
        assert_eq!(status(&healthy, id), "pass", "{id}: {healthy}");
    }
    for id in [
        "tls.minimum_version",
        "tls.client_certificates",
        "docker.container",
    ] {
        assert_eq!(status(&healthy, id), "n/a", "{id}");
    }
    assert_eq!(status(&healthy, "encryption_at_rest"), "warn");
    // Legacy backup signatures are accepted by default: a minor warning.
    assert_eq!(status(&healthy, "api.backup_signatures"), "warn");
    // So are the password routes, which show the server the password.
    assert_eq!(status(&healthy, "api.password_login"), "warn");
    // And the identity key in the clear.
    assert_eq!(status(&healthy, "identity.protection"), "warn");
    assert_eq!(healthy["level"], "high");
    assert!(
        healthy["threatModel"]
            .as_str()
            .unwrap()
            .contains("compromised host")
    );
    let checks = healthy["checks"].as_array().unwrap();
    assert!(
        checks
            .iter()
            .all(|c| c["recommendation"].is_string() && c["value"].is_string())
    );

    // Break things from outside; the report sees each.
    let login = node.login_roles()[0].clone();
    sql(&node, &format!("ALTER ROLE {login} CREATEDB"));
    sql(&node, "ALTER ROLE keepd_query LOGIN");
    let hba = node.data_dir().join("pg_hba.conf");
    let rendered_hba = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(&hba, format!("local all all trust\n{rendered_hba}")).unwrap();
    sql(&node, "ALTER SYSTEM SET password_encryption = 'md5'");
    sql(&node, "ALTER SYSTEM SET log_statement = 'all'");
    sql(&node, "SELECT pg_reload_conf()");
    let runtime = node.dir.path().join("run");
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (code, broken) = report(&node);
    assert_eq!(status(&broken, "roles.login_role"), "fail", "{broken}");
    assert_eq!(status(&broken, "roles.group_roles"), "fail");
    assert_eq!(status(&broken, "hba.rules"), "fail");
    assert_eq!(status(&broken, "auth.password_encryption"), "fail");
    assert_eq!(status(&broken, "logging.settings"), "warn");
    assert_eq!(status(&broken, "files.modes"), "fail");
    assert_eq!(broken["level"], "reduced");
    assert_eq!(code, 1, "below the minimum level: exit 1");

    sql(&node, &format!("ALTER ROLE {login} NOCREATEDB"));
    sql(&node, "ALTER ROLE keepd_query NOLOGIN");
    std::fs::write(&hba, rendered_hba).unwrap();
    sql(&node, "ALTER SYSTEM RESET password_encryption");
    sql(&node, "ALTER SYSTEM RESET log_statement");
    sql(&node, "SELECT pg_reload_conf()");
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (code, fixed) = report(&node);
    assert_eq!(
        (code, fixed["level"].as_str()),
        (0, Some("high")),
        "{fixed}"
    );

    // The audit chain altered behind keepd's back (triggers lifted by a
    // superuser): the report fails it.
    let sealed = common::wait_until(Duration::from_secs(20), || {
        let (_, r) = report(&node);
        r["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| {
                c["id"] == "audit.chain"
                    && c["value"]
                        .as_str()
                        .unwrap_or("")
                        .contains(", 0 entries not yet sealed")
            })
            .then_some(())
    });
    assert!(sealed.is_some());
    sql(
        &node,
        "ALTER TABLE keepd_audit.audit_log DISABLE TRIGGER audit_log_append_only; \
         UPDATE keepd_audit.audit_log SET action = 'FORGED' \
           WHERE id = (SELECT min(id) FROM keepd_audit.audit_log); \
         ALTER TABLE keepd_audit.audit_log ENABLE TRIGGER audit_log_append_only",
    );
    let (_, tampered) = report(&node);
    assert_eq!(status(&tampered, "audit.chain"), "fail", "{tampered}");
    assert_eq!(tampered["level"], "reduced");
}

fn node_with_security(mode: &str, minimum: &str) -> TestNode {
    TestNode::with(json!({"security": {"fallback_mode": mode, "minimum_level": minimum}}))
}

#[test]
fn fallback_modes_strict_warn_permissive() {
    // Strict, asking for more than this host gives: refused, each named.
    let strict = node_with_security("strict", "maximum");
    let mut refused = strict.spawn();
    let status = refused.wait_exit(Duration::from_secs(60)).expect("exits");
    assert_eq!(status.code(), Some(1), "{}", refused.log());
    let log = refused.log();
    assert!(
        log.contains("fallback_mode is strict") && log.contains("below security.minimum_level"),
        "{log}"
    );
    assert!(
        common::postgres_pids(&strict.data_dir()).is_empty(),
        "Postgres left running"
    );

    // Strict, and an at-rest method this host cannot provide: named.
    let luks = TestNode::with(json!({
        "security": {"fallback_mode": "strict"},
        "encryption_at_rest": {"enabled": true, "method": "luks"},
    }));
    let mut refused = luks.spawn();
    let status = refused.wait_exit(Duration::from_secs(60)).expect("exits");
    assert_eq!(status.code(), Some(1), "{}", refused.log());
    // Measured, not assumed: the device under the data directory is named.
    assert!(
        refused
            .log()
            .contains("encryption_at_rest: method luks, but the"),
        "{}",
        refused.log()
    );

    // Strict with a minimum the host meets: starts.
    let strict_ok = node_with_security("strict", "high");
    let daemon = strict_ok.start();
    assert!(daemon.wait_health(200, Duration::from_secs(30)));
    drop(daemon);

    // Warn: starts, logs each fallback and the shortfall.
    let warn = node_with_security("warn", "maximum");
    let daemon = warn.start();
    assert!(daemon.wait_health(200, Duration::from_secs(30)));
    let fallback = daemon
        .wait_for_log("security fallback", Duration::from_secs(5))
        .expect("a fallback is logged");
    assert_eq!(fallback["check"], "encryption_at_rest");
    assert!(daemon.log().contains("below security.minimum_level"));
    let report = daemon
        .wait_for_log("security report", Duration::from_secs(5))
        .expect("the report is logged");
    let parsed: Value = serde_json::from_str(report["report"].as_str().unwrap()).unwrap();
    assert_eq!(parsed["level"], "high");
    drop(daemon);

    // Permissive: starts quietly.
    let permissive = node_with_security("permissive", "maximum");
    let daemon = permissive.start();
    assert!(daemon.wait_health(200, Duration::from_secs(30)));
    assert!(
        !daemon.log().contains("security fallback"),
        "{}",
        daemon.log()
    );
}

/// The CIS items of the managed server: a failed login really waits
/// (auth_delay); PUBLIC's privileges (the live ACLs), the logging settings
/// and the hba scope pass; each check names its CIS item.
#[tokio::test(flavor = "multi_thread")]
async fn cis_items_hold_from_outside_and_name_their_ids() {
    let node = TestNode::new();
    let _daemon = node.start_healthy();
    // A wrong password: answered only after auth_delay's half second.
    let mut config = node.pg_config();
    config.user("keepd_superuser").password("not the password");
    let started = std::time::Instant::now();
    let refused = config.connect(tokio_postgres::NoTls).await;
    assert!(refused.is_err());
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "a failed login was answered after {:?}",
        started.elapsed()
    );
    // pg_hba admits keepd's own roles only (CIS 5.10): a login role made
    // behind keepd's back is refused before its password is asked.
    sql(
        &node,
        "CREATE ROLE intruder LOGIN PASSWORD 'intruder password'",
    );
    sql(&node, "GRANT CONNECT ON DATABASE keepd TO intruder");
    let mut config = node.pg_config();
    config.user("intruder").password("intruder password");
    let refused = config
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("refused");
    assert_eq!(
        refused.code().map(|c| c.code()),
        Some("28000"),
        "{refused:?}"
    );
    sql(&node, "REVOKE CONNECT ON DATABASE keepd FROM intruder");
    sql(&node, "DROP ROLE intruder");
    // PUBLIC's USAGE on schema public in the server's other databases is
    // revoked too, and measured in each.
    let grant = |statement: &str| {
        let out = node
            .command(&[
                "psql",
                "--",
                "-XAtq",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                "\\c template1",
                "-c",
                statement,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let check = node.report_check("privileges.public");
    assert_eq!(check["status"], "pass", "revoked at start: {check}");
    grant("GRANT USAGE ON SCHEMA public TO PUBLIC");
    let check = node.report_check("privileges.public");
    assert_eq!(check["status"], "warn", "{check}");
    assert!(
        check["value"]
            .as_str()
            .unwrap()
            .contains("schema public in template1"),
        "{check}"
    );
    grant("REVOKE ALL ON SCHEMA public FROM PUBLIC");
    let (_, report) = report(&node);
    for (id, item) in [
        ("auth.delay", "5.7"),
        ("privileges.public", "4.10"),
        ("logging.settings", "3.1"),
        ("hba.rules", "5.10"),
        ("audit.pgaudit", "3.2"),
        ("roles.superuser", "5.5"),
    ] {
        assert_eq!(status(&report, id), "pass", "{id}: {report}");
        let check = report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .unwrap();
        assert_eq!(check["cis"], item, "{check}");
    }
}

/// The Postgres log's text, every file.
fn postgres_log(node: &TestNode) -> String {
    let mut text = String::new();
    for entry in std::fs::read_dir(node.pg_log_dir()).unwrap() {
        text.push_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap_or_default());
    }
    text
}

/// pgAudit from outside (CIS 3.2): a superuser session other than keepd's
/// is logged statement by statement, an attempt on the audit trail is
/// logged as an object access, passwords are redacted, and keepd's own
/// requests add no audit line.
#[test]
fn pgaudit_logs_superuser_sessions_and_tampering_but_not_the_pool() {
    let node = TestNode::new();
    let daemon = node.start_healthy();
    let client = daemon.client();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        client
            .register("pgaudit@example.org", "correct horse battery")
            .await
            .unwrap();
    });
    sql(&node, "SELECT count(*) AS audited_read FROM keepd.users");
    sql(
        &node,
        "CREATE ROLE keepd_pgaudit_probe PASSWORD 'hunter2-never-logged'",
    );
    sql(&node, "DROP ROLE keepd_pgaudit_probe");
    let tampering = node.psql(
        "superuser",
        "UPDATE keepd_audit.audit_log SET action = 'FORGED' WHERE id = 1",
    );
    assert!(tampering.is_err(), "the trigger refuses it");
    let log = common::wait_until(Duration::from_secs(10), || {
        let log = postgres_log(&node);
        log.contains("keepd_audit.audit_log").then_some(log)
    })
    .expect("pgAudit logged the attempt");
    let audit: Vec<&str> = log.lines().filter(|l| l.contains("AUDIT: ")).collect();
    assert!(
        audit.iter().any(|l| l.contains("SESSION")
            && l.contains("READ,SELECT")
            && l.contains("audited_read")),
        "{audit:#?}"
    );
    assert!(
        audit.iter().any(|l| l.contains("OBJECT")
            && l.contains("UPDATE")
            && l.contains("keepd_audit.audit_log")),
        "{audit:#?}"
    );
    assert!(
        audit
            .iter()
            .any(|l| l.contains("CREATE ROLE") && l.contains("<REDACTED>")),
        "{audit:#?}"
    );
    let leaks: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("hunter2-never-logged"))
        .collect();
    assert!(leaks.is_empty(), "a password reached the log: {leaks:#?}");
    // keepd's own sessions (the registration through the pool, the
    // sealer, the janitor) log no reads or writes of their own; the
    // cluster key's accesses are object-logged as intended.
    let own: Vec<&&str> = audit
        .iter()
        .filter(|l| {
            (l.contains("app=keepd,") || l.contains("app=keepd-pool,"))
                && l.contains("AUDIT: SESSION")
        })
        .filter(|l| l.contains(",READ,") || l.contains(",WRITE,"))
        .collect();
    assert!(
        audit
            .iter()
            .any(|l| l.contains("OBJECT") && l.contains("keepd.cluster_members")),
        "{audit:#?}"
    );
    assert!(own.is_empty(), "{own:#?}");
}

/// A superuser made by hand, and given keepd_sync so pg_hba lets it in:
/// `roles.foreign` fails naming it (strict mode would refuse), and what
/// its session reads is in the log, statement by statement.
#[test]
fn a_hand_made_superuser_fails_the_report_and_is_logged_whole() {
    let node = TestNode::new();
    let mut daemon = node.start_healthy();
    assert_eq!(node.report_check("roles.foreign")["status"], "pass");
    sql(
        &node,
        "CREATE ROLE intruder LOGIN SUPERUSER PASSWORD 'intruder password'; \
         GRANT keepd_sync TO intruder",
    );
    let socket = node.dir.path().join("run/postgres");
    let out = std::process::Command::new("psql")
        .args([
            "-XAtq",
            "-h",
            socket.to_str().unwrap(),
            "-U",
            "intruder",
            "-d",
            "keepd",
            "-c",
            "SELECT count(*) AS intruder_read FROM keepd.users",
        ])
        .env("PGPASSWORD", "intruder password")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let check = node.report_check("roles.foreign");
    assert_eq!(check["status"], "fail", "{check}");
    assert!(
        check["value"]
            .as_str()
            .unwrap()
            .contains("intruder (superuser)"),
        "{check}"
    );
    let pgaudit = node.report_check("audit.pgaudit");
    assert_eq!(pgaudit["status"], "pass", "{pgaudit}");
    let logged = common::wait_until(Duration::from_secs(10), || {
        postgres_log(&node)
            .lines()
            .any(|l| {
                l.contains("user=intruder")
                    && l.contains("AUDIT: SESSION")
                    && l.contains("READ,SELECT")
                    && l.contains("intruder_read")
            })
            .then_some(())
    });
    assert!(logged.is_some(), "the intruder's read is not in the log");
    daemon.stop();
    // Strict mode refuses to start while it can log in.
    node.merge(json!({"security": {"fallback_mode": "strict"}}));
    let (code, text) = node.run(&["run"]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("roles.foreign") || text.contains("intruder"),
        "{text}"
    );
}

/// The running daemon measures the report again: a role appearing lowers
/// `keepd_security_level` within the interval and is logged once, its
/// removal raises it again.
#[test]
fn the_level_is_measured_again_while_keepd_runs() {
    let node = TestNode::with(json!({
        "security": {"remeasure_interval": "1s"},
        "api": {"metrics_listen": format!("127.0.0.1:{}", common::free_port())},
    }));
    let mut daemon = node.start_healthy();
    let level = |daemon: &common::Daemon| -> u64 {
        daemon
            .metrics()
            .lines()
            .find_map(|l| l.strip_prefix("keepd_security_level "))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let at_start = level(&daemon);
    sql(&node, "CREATE ROLE late_intruder LOGIN SUPERUSER");
    let fell = common::wait_until(Duration::from_secs(15), || {
        (level(&daemon) < at_start).then_some(())
    });
    assert!(fell.is_some(), "{}", daemon.log());
    let event = daemon
        .wait_for_log("security level fell", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("{}", daemon.log()));
    assert!(
        event["findings"].to_string().contains("late_intruder"),
        "{event}"
    );
    sql(&node, "DROP ROLE late_intruder");
    let rose = common::wait_until(Duration::from_secs(15), || {
        (level(&daemon) == at_start).then_some(())
    });
    assert!(rose.is_some(), "{}", daemon.log());
    assert!(
        daemon
            .wait_for_log("security level rose", Duration::from_secs(5))
            .is_some()
    );
    let falls = daemon
        .log()
        .lines()
        .filter(|l| l.contains("security level fell"))
        .count();
    assert_eq!(falls, 1, "each change is logged once");
    daemon.stop();
}

/// A server without pgAudit beside it: keepd starts without loading it,
/// the report fails the check naming the package, strict mode refuses.
#[test]
fn missing_pgaudit_is_a_finding_and_strict_refuses() {
    let real = std::fs::read_dir("/usr/lib/postgresql")
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .find(|p| p.join("postgres").exists())
        .expect("PostgreSQL installed");
    // The server's binaries, linked from a directory with no lib beside it.
    let fake = tempfile::tempdir().unwrap();
    let bin = fake.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for entry in std::fs::read_dir(&real).unwrap() {
        let entry = entry.unwrap();
        std::os::unix::fs::symlink(entry.path(), bin.join(entry.file_name())).unwrap();
    }
    std::fs::set_permissions(fake.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let settings = |mode: &str| {
        json!({
            "database": {"postgres": {"native": {"bin_dir": bin}}},
            "security": {"fallback_mode": mode},
        })
    };
    let node = TestNode::with(settings("warn"));
    let daemon = node.start_healthy();
    let check = node.report_check("audit.pgaudit");
    assert_eq!(check["status"], "fail", "{check}");
    assert!(
        check["recommendation"]
            .as_str()
            .unwrap()
            .contains("postgresql-15-pgaudit"),
        "{check}"
    );
    assert!(
        daemon.log().contains("pgAudit is not installed"),
        "{}",
        daemon.log()
    );
    drop(daemon);

    let strict = TestNode::with(settings("strict"));
    let mut refused = strict.spawn();
    let status = refused.wait_exit(Duration::from_secs(60)).expect("exits");
    assert_eq!(status.code(), Some(1), "{}", refused.log());
    assert!(
        refused
            .log()
            .contains("audit.pgaudit: pgAudit is not loaded"),
        "{}",
        refused.log()
    );
}
