//! keepd with the native provider, driven from outside: real binary, real
//! Postgres, real signals.

use crate::common;

use std::time::{Duration, Instant};

use common::{Signal, TestNode, kill, postgres_pids, wait_until};

#[test]
fn serves_health_survives_postmaster_kill_and_stops_cleanly() {
    let node = TestNode::new();
    let mut daemon = node.start();
    assert!(
        daemon.wait_health(200, Duration::from_secs(10)),
        "{}",
        daemon.log()
    );
    let (_, body) = daemon.get("/health").unwrap();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["postgres"], "up");

    // Postgres listens on no TCP port at all: only its Unix socket.
    let pids = postgres_pids(&node.data_dir());
    assert!(!pids.is_empty(), "no postgres found on the data directory");
    let listening = common::listening_tcp_inodes();
    for pid in &pids {
        let open_listeners: Vec<_> = common::socket_inodes(*pid)
            .intersection(&listening)
            .copied()
            .collect();
        assert!(
            open_listeners.is_empty(),
            "postgres pid {pid} listens on TCP"
        );
    }
    assert!(
        node.dir.path().join("run/postgres/.s.PGSQL.5432").exists(),
        "the Unix socket is where the config says"
    );

    // kill -9 of the postmaster: restarted, and healthy again within 15 s.
    let first = daemon.postmaster_pid().expect("postmaster.pid");
    kill(first, Signal::SIGKILL);
    let killed_at = Instant::now();
    let recovered = wait_until(Duration::from_secs(15), || {
        let pid = daemon.postmaster_pid()?;
        (pid != first && daemon.health() == Some(200)).then_some(pid)
    });
    assert!(
        recovered.is_some(),
        "not healthy again within 15 s of kill -9:\n{}",
        daemon.log()
    );
    eprintln!("recovered in {:?}", killed_at.elapsed());
    assert!(
        daemon
            .wait_for_log("postgres exited unexpectedly", Duration::ZERO)
            .is_some()
    );

    // SIGTERM: exit 0 within 20 s, no postgres left behind.
    daemon.signal(Signal::SIGTERM);
    let status = daemon
        .wait_exit(Duration::from_secs(20))
        .expect("keepd did not exit in 20 s");
    assert_eq!(status.code(), Some(0), "{}", daemon.log());
    assert!(
        postgres_pids(&node.data_dir()).is_empty(),
        "postgres outlived keepd"
    );
    assert!(!node.data_dir().join("postmaster.pid").exists());
}

#[test]
fn health_is_503_while_postgres_does_not_answer() {
    let node = TestNode::new();
    let daemon = node.start();
    assert!(daemon.wait_health(200, Duration::from_secs(10)));
    // A frozen (not dead) server answers nothing: the probe must time out
    // into a 503 rather than hang or report success.
    // A backend listed here may end before it is stopped (a background
    // task's short connection closing): gone is fine, either way.
    let pids = postgres_pids(&node.data_dir());
    let signal = |pid: i32, signal| {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
    };
    for pid in &pids {
        signal(*pid, Signal::SIGSTOP);
    }
    let outage = wait_until(Duration::from_secs(10), || {
        daemon.get("/health").filter(|(status, _)| *status == 503)
    });
    for pid in &pids {
        signal(*pid, Signal::SIGCONT);
    }
    let (_, body) = outage.expect("/health never reported the outage");
    assert_eq!(body["status"], "unavailable");
    assert!(daemon.wait_health(200, Duration::from_secs(15)));
}

#[test]
fn postgres_dies_with_keepd_and_a_restart_recovers() {
    let node = TestNode::new();
    let mut daemon = node.start();
    assert!(daemon.wait_health(200, Duration::from_secs(10)));
    let node_id = daemon.get("/health").unwrap().1["nodeId"].clone();
    daemon.signal(Signal::SIGKILL);
    daemon.wait_exit(Duration::from_secs(5)).unwrap();
    let gone = wait_until(Duration::from_secs(10), || {
        postgres_pids(&node.data_dir()).is_empty().then_some(())
    });
    assert!(gone.is_some(), "postgres outlived kill -9 of keepd");
    drop(daemon);

    let daemon = node.start();
    assert!(
        daemon.wait_health(200, Duration::from_secs(15)),
        "{}",
        daemon.log()
    );
    assert_eq!(
        daemon.get("/health").unwrap().1["nodeId"],
        node_id,
        "the identity key was reused, not replaced"
    );
    assert!(
        daemon
            .wait_for_log("initdb: done", Duration::ZERO)
            .is_none(),
        "the existing cluster was reused"
    );
}

#[test]
fn a_second_daemon_on_the_same_state_dir_is_refused() {
    let node = TestNode::new();
    let first = node.start();
    assert!(first.wait_health(200, Duration::from_secs(10)));
    let out = node.command(&["run"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("another keepd"), "{stderr}");
    assert!(
        stderr.contains(&format!("pid {}", first.child.id())),
        "{stderr}"
    );
    assert_eq!(first.health(), Some(200), "the first one is untouched");
}

#[test]
fn a_stale_postmaster_pid_naming_another_process_is_removed() {
    let node = TestNode::new();
    let mut daemon = node.start();
    assert!(daemon.wait_health(200, Duration::from_secs(10)));
    daemon.signal(Signal::SIGTERM);
    daemon.wait_exit(Duration::from_secs(20)).unwrap();
    drop(daemon);

    // A live process that is not postgres holds the PID in the file, as
    // after a crash and PID reuse; Postgres alone would refuse to start.
    let mut impostor = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let pid_file = node.data_dir().join("postmaster.pid");
    std::fs::write(
        &pid_file,
        format!("{}\n{}\n", impostor.id(), node.data_dir().display()),
    )
    .unwrap();
    let daemon = node.start();
    assert!(
        daemon.wait_health(200, Duration::from_secs(15)),
        "{}",
        daemon.log()
    );
    assert!(
        daemon
            .wait_for_log(
                "removing a stale postmaster.pid: that process is not a postgres on this data directory",
                Duration::ZERO
            )
            .is_some(),
        "{}",
        daemon.log()
    );
    assert!(
        impostor.try_wait().unwrap().is_none(),
        "the impostor was not touched"
    );
    impostor.kill().unwrap();
    impostor.wait().unwrap();
}

#[test]
fn installed_configuration_is_exactly_what_render_writes() {
    let node = TestNode::new();
    let daemon = node.start();
    assert!(daemon.wait_health(200, Duration::from_secs(10)));
    let out_dir = node.dir.path().join("rendered");
    let out = node
        .command(&["render", "--out", out_dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["postgresql.conf", "pg_hba.conf", "pg_ident.conf"] {
        let rendered = std::fs::read_to_string(out_dir.join(name)).unwrap();
        let installed = std::fs::read_to_string(node.data_dir().join(name)).unwrap();
        assert_eq!(rendered, installed, "{name} differs");
    }
    for name in [
        "00-extensions.sql",
        "01-roles.sql",
        "02-schema.sql",
        "03-audit.sql",
        "04-hardening.sql",
    ] {
        assert!(out_dir.join("initdb").join(name).exists(), "{name}");
    }
}

#[test]
fn private_files_and_directories_have_tight_modes() {
    use std::os::unix::fs::MetadataExt;
    let node = TestNode::new();
    let daemon = node.start();
    assert!(daemon.wait_health(200, Duration::from_secs(10)));
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().mode() & 0o777;
    assert_eq!(mode(&node.state_dir().join("identity.key")), 0o600);
    assert_eq!(mode(&node.data_dir()), 0o700);
    assert_eq!(mode(&node.dir.path().join("run/postgres")), 0o700);
    // Nobody but keepd may list or write them; Postgres's account may at
    // most traverse (0710) when it is a different user.
    for dir in [node.state_dir(), node.dir.path().join("run")] {
        assert!(
            [0o700, 0o710].contains(&mode(&dir)),
            "{} is {:o}",
            dir.display(),
            mode(&dir)
        );
    }
    // The server's log lives beside the data directory, never in it.
    assert_eq!(mode(&node.pg_log_dir()), 0o700);
    assert!(!node.data_dir().join("log").exists());
    let logs: Vec<_> = std::fs::read_dir(node.pg_log_dir())
        .unwrap()
        .flatten()
        .collect();
    assert!(!logs.is_empty(), "the logging collector writes files");
    for log in logs {
        assert_eq!(mode(&log.path()), 0o600, "{}", log.path().display());
    }
}

/// A stop asked for during start-up (here: while initdb or Postgres is
/// starting) is honoured in order once keepd can stop: a clean exit and no
/// Postgres left behind, never the signal's default action.
#[test]
fn a_stop_during_start_up_is_a_clean_stop() {
    let node = TestNode::new();
    let mut child = node
        .command(&["run"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let starting = wait_until(Duration::from_secs(30), || {
        node.data_dir().join("PG_VERSION").exists().then_some(())
    });
    assert!(starting.is_some(), "initdb never began");
    kill(child.id() as i32, Signal::SIGTERM);
    let status = wait_until(Duration::from_secs(60), || child.try_wait().unwrap());
    let status = status.expect("keepd did not stop within 60 s of SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(
        postgres_pids(&node.data_dir()).is_empty(),
        "postgres outlived a stop during start-up"
    );
}

/// A cluster runs only with the binaries of its own major version: another
/// is never picked up silently, and the error names both and the way out.
#[test]
fn a_cluster_of_another_major_version_is_refused_by_name() {
    let node = TestNode::new();
    let mut daemon = node.start_healthy();
    daemon.stop();
    let pg_version = node.data_dir().join("PG_VERSION");
    let installed = std::fs::read_to_string(&pg_version).unwrap();
    std::fs::write(&pg_version, "9\n").unwrap();
    let out = node.command(&["run"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("holds a PostgreSQL 9 cluster")
            && text.contains(&format!(
                "only PostgreSQL {} is installed",
                installed.trim()
            ))
            && text.contains("pg_upgrade"),
        "{text}"
    );
    std::fs::write(&pg_version, &installed).unwrap();
    node.set("database.postgres.version", 99);
    let out = node.command(&["run"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("database.postgres.version asks for 99"),
        "{text}"
    );
    assert_eq!(out.status.code(), Some(2), "a setting's error: {text}");
}

/// Postgres's log files past `database.postgres.log_retention` are deleted;
/// newer ones stay.
#[test]
fn old_postgres_logs_are_deleted() {
    let node = TestNode::new();
    let mut daemon = node.start_healthy();
    daemon.stop();
    let logs = node.pg_log_dir();
    let (old, recent) = (
        logs.join("postgresql-2026-01-01.log"),
        logs.join("postgresql-recent.log"),
    );
    for (file, age_days) in [(&old, 20), (&recent, 3)] {
        let f = std::fs::File::create(file).unwrap();
        f.set_modified(std::time::SystemTime::now() - Duration::from_secs(age_days * 86_400))
            .unwrap();
    }
    let _daemon = node.start_healthy();
    let deleted = wait_until(Duration::from_secs(10), || (!old.exists()).then_some(()));
    assert!(
        deleted.is_some(),
        "a 20-day-old log survived a 14-day retention"
    );
    assert!(recent.exists(), "a 3-day-old log was deleted");
}

/// A memory cgroup under this process's own, limited to `bytes`, with the
/// file a process is moved into it by; None where cgroups cannot be made.
fn limited_memory_cgroup(bytes: u64) -> Option<std::path::PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let (base, limit_file) = own.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (hierarchy, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "memory") {
            Some((
                std::path::Path::new("/sys/fs/cgroup/memory").join(path),
                "memory.limit_in_bytes",
            ))
        } else if hierarchy == "0"
            && std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
        {
            Some((
                std::path::Path::new("/sys/fs/cgroup").join(path),
                "memory.max",
            ))
        } else {
            None
        }
    })?;
    let dir = base.join(format!("keepd-test-{}", common::uuid()));
    std::fs::create_dir(&dir).ok()?;
    std::fs::write(dir.join(limit_file), bytes.to_string()).ok()?;
    Some(dir)
}

/// Postgres's memory settings follow the memory keepd may use: inside a
/// cgroup limited to 1 GiB, a quarter of it for shared buffers, and the
/// report shows them; a parameter passed through lands (and may override
/// a size), one keepd sets itself is refused by name with exit 2.
#[test]
fn memory_settings_follow_a_cgroup_limit_and_settings_pass_through() {
    let group = limited_memory_cgroup(1 << 30);
    if !common::require(
        group.is_some(),
        "cannot make a memory cgroup",
        "run the tests as root where /sys/fs/cgroup is writable",
    ) {
        return;
    }
    let group = group.unwrap();
    let node = TestNode::new();
    node.merge(serde_json::json!({"database": {"postgres": {"settings": {
        "random_page_cost": 1.1,
        "maintenance_work_mem": "96MB",
    }}}}));
    let mut command = node.command(&["run"]);
    let procs = group.join("cgroup.procs");
    // SAFETY: the child only writes its own pid to a file before exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
            std::fs::write(&procs, std::process::id().to_string())
        });
    }
    let mut daemon = common::Daemon::spawn_with(command, node.data_dir());
    assert!(
        daemon.wait_health(200, Duration::from_secs(30)),
        "{}",
        daemon.log()
    );
    let show = |name: &str| node.psql("superuser", &format!("SHOW {name}")).unwrap();
    assert_eq!(
        show("shared_buffers"),
        "256MB",
        "a quarter of the cgroup's 1 GiB"
    );
    assert_eq!(show("effective_cache_size"), "768MB");
    assert_eq!(show("random_page_cost"), "1.1");
    assert_eq!(
        show("maintenance_work_mem"),
        "96MB",
        "the operator's overrides keepd's"
    );
    let check = node.report_check("postgres.memory");
    assert!(
        check["value"]
            .as_str()
            .unwrap()
            .contains("shared_buffers 256MB"),
        "{check}"
    );
    daemon.stop();
    let _ = std::fs::remove_dir(&group);

    node.set(
        "database.postgres.settings",
        serde_json::json!({"ssl": "off", "port": 1, "work_mem": "8MB"}),
    );
    let out = node.command(&["run"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("database.postgres.settings")
            && text.contains("port, ssl")
            && !text.contains("work_mem"),
        "{text}"
    );
}
