//! keepd as a service: the systemd unit's exposure rating, the launchd
//! plist, and the sd_notify conversation on a test notify socket.

use crate::common;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Daemon, Signal, TestNode, wait_until};
use serde_json::json;

fn print(node: &TestNode, target: &str) -> String {
    let out = node
        .command(&["service", "print", "--target", target])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn systemd_unit_is_rated_at_most_1_5() {
    if !common::require_tool("systemd-analyze", "Debian's systemd") {
        return;
    }
    let node = TestNode::new();
    let unit = node.dir.path().join("keepd.service");
    std::fs::write(&unit, print(&node, "systemd")).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=15"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let level: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for keepd.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no rating in:\n{text}"));
    assert!(level <= 1.5, "rated {level}");
    let installed = std::fs::read_to_string(&unit).unwrap();
    assert!(installed.contains(&format!("run --config {}", node.config.display())));
}

#[test]
fn launchd_plist_is_a_valid_plist_with_the_right_arguments() {
    let node = TestNode::new();
    let plist = print(&node, "launchd");
    let script =
        "import json, plistlib, sys; print(json.dumps(plistlib.loads(sys.stdin.buffer.read())))";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(plist.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "not a plist:\n{plist}");
    let parsed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(parsed["Label"], "dev.keepd");
    assert_eq!(
        parsed["ProgramArguments"],
        serde_json::json!([
            common::keepd_bin(),
            "run",
            "--config",
            node.config.display().to_string()
        ])
    );
}

#[test]
fn sd_notify_ready_after_health_then_watchdog_pings() {
    let node = TestNode::new();
    let socket_path = node.dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let messages = Arc::new(Mutex::new(Vec::<String>::new()));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (sink, finished) = (messages.clone(), done.clone());
    let listener = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while !finished.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(n) = socket.recv(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    });
    let mut cmd = node.command(&["run"]);
    cmd.env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000");
    let mut daemon = Daemon::spawn_with(cmd, node.data_dir());
    let ready = wait_until(Duration::from_secs(30), || {
        messages
            .lock()
            .unwrap()
            .iter()
            .position(|m| m.contains("READY=1"))
    })
    .expect("READY=1 sent");
    // READY comes after Postgres, migrations and the API: /health is 200.
    assert_eq!(daemon.health(), Some(200));
    let seen = messages.lock().unwrap().clone();
    assert!(
        seen[..ready].iter().any(|m| m.starts_with("STATUS=")),
        "phases reported before READY: {seen:?}"
    );
    let pings = wait_until(Duration::from_secs(5), || {
        let n = messages
            .lock()
            .unwrap()
            .iter()
            .filter(|m| *m == "WATCHDOG=1")
            .count();
        (n >= 3).then_some(n)
    });
    assert!(pings.is_some(), "{:?}", messages.lock().unwrap());
    daemon.stop();
    let stopping = wait_until(Duration::from_secs(2), || {
        messages
            .lock()
            .unwrap()
            .iter()
            .any(|m| m.contains("STOPPING=1"))
            .then_some(())
    });
    assert!(stopping.is_some());
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    listener.join().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_applies_log_level_and_rate_limit_and_refuses_a_broken_file() {
    let node = TestNode::with(json!({"api": {"rate_limits": {"auth_per_minute": 2}}}));
    let daemon = node.start();
    assert!(daemon.wait_health(200, Duration::from_secs(30)));
    let client = keepd::client::SyncClient::new(daemon.addr());
    let attempt = || async {
        client
            .register_with_password("not-an-email", "a long password")
            .await
            .unwrap_err()
            .code()
            .map(str::to_string)
    };
    assert_eq!(attempt().await.as_deref(), Some("invalid_email"));
    assert_eq!(attempt().await.as_deref(), Some("invalid_email"));
    assert_eq!(attempt().await.as_deref(), Some("rate_limited"));

    node.merge(json!({
        "api": {"rate_limits": {"auth_per_minute": 100}, "listen": "127.0.0.1:1"},
        "log": {"level": "debug"},
    }));
    daemon.signal(Signal::SIGHUP);
    for message in [
        "SIGHUP: api.rate_limits applied",
        "SIGHUP: log level applied",
        "SIGHUP: these settings changed and take effect at the next restart",
    ] {
        assert!(
            daemon
                .wait_for_log(message, Duration::from_secs(10))
                .is_some(),
            "{message}:\n{}",
            daemon.log()
        );
    }
    let restart = daemon
        .wait_for_log(
            "SIGHUP: these settings changed and take effect at the next restart",
            Duration::from_secs(1),
        )
        .unwrap();
    assert!(
        restart["sections"].as_str().unwrap().contains("api"),
        "{restart}"
    );
    assert_eq!(
        attempt().await.as_deref(),
        Some("invalid_email"),
        "new limit applied"
    );
    assert!(
        wait_until(Duration::from_secs(10), || daemon
            .log()
            .contains("\"level\":\"DEBUG\"")
            .then_some(()))
        .is_some(),
        "debug events after the reload"
    );

    // A broken file: reported, the running configuration kept.
    std::fs::write(&node.config, "node: [this is not a mapping\n").unwrap();
    daemon.signal(Signal::SIGHUP);
    assert!(
        daemon
            .wait_for_log(
                "SIGHUP: the new configuration is invalid; keeping the running one",
                Duration::from_secs(10)
            )
            .is_some()
    );
    assert_eq!(daemon.health(), Some(200));
    assert_eq!(attempt().await.as_deref(), Some("invalid_email"));
}
