//! keepd's packages on the real Docker engine. The Debian package
//! (scripts/build-deb.sh: cargo-deb around the binary this test build
//! made, no second compile) is installed with apt in a clean Debian 12
//! container, PostgreSQL coming from Debian's mirror, and started the way
//! its systemd unit starts it. The container image
//! (contrib/docker/Dockerfile) is built on that package and run with a
//! read-only root. Both start from debian:bookworm-slim, which
//! scripts/build-debian-base.sh makes with debootstrap (no registry is
//! reachable here) and reuses. Without a Docker engine (or cargo-deb) the
//! tests fail in CI and say `SKIPPED` elsewhere (`common::require`). Each
//! step prints how long it took (`package: ...`).

use crate::common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{keepd_bin, wait_until};
use serde_json::Value;

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");
const BASE_IMAGE: &str = "debian:bookworm-slim";
/// The Dockerfile's runtime stage (all but keepd), kept between runs (like
/// the base image) so that the next build finds it in the engine's cache.
const RUNTIME_STAGE: &str = "keepd-test-image-runtime:cache";
/// apt's downloads, kept between runs in a volume of their own: each run's
/// container is new, the packages it fetches need not be.
const APT_CACHE: &str = "keepd-test-apt-archives";
/// The label on what a run makes; its value names the run.
const LABEL: &str = "io.keepd.test";

/// Runs a command to its end: (success, stdout + stderr).
fn output(cmd: &mut Command) -> (bool, String) {
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) => panic!("{cmd:?} cannot run: {e}"),
    };
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn docker(args: &[&str]) -> (bool, String) {
    output(Command::new("docker").args(args))
}

/// `docker ARGS`, which must succeed: its output.
fn docker_ok(args: &[&str]) -> String {
    let (ok, text) = docker(args);
    assert!(ok, "docker {} failed:\n{text}", args.join(" "));
    text
}

/// `docker ARGS`, which must succeed: its standard output alone.
fn docker_stdout(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "docker {} failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What `docker ARGS` lists, one id or name a line (nothing on failure).
fn docker_list(args: &[&str]) -> Vec<String> {
    match Command::new("docker").args(args).output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    }
}

/// Runs one step of a test and says how long it took.
fn step<T>(name: &str, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let value = f();
    eprintln!("package: {name}: {:.1?}", start.elapsed());
    value
}

/// Whether the .deb can be built here: cargo-deb and dpkg's tools
/// (`common::require`).
fn can_build_deb() -> bool {
    let cargo_deb = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    common::require(
        cargo_deb,
        "cargo-deb is not installed",
        "crates.io's cargo-deb; scripts/install-deps.sh installs it",
    ) && common::require_tool("dpkg-deb", "Debian's dpkg")
        && common::require_tool("dpkg-shlibdeps", "Debian's dpkg-dev")
}

/// Whether the engine answers and the .deb can be built; then the base
/// image, built once and reused.
fn engine_ready() -> bool {
    if !(common::require_docker() && can_build_deb()) {
        return false;
    }
    let script = Path::new(MANIFEST_DIR).join("scripts/build-debian-base.sh");
    let (ok, text) = step("the base image (scripts/build-debian-base.sh)", || {
        output(&mut Command::new(&script))
    });
    assert!(ok, "building {BASE_IMAGE} failed:\n{text}");
    true
}

/// The .deb of the binary this test build made (scripts/build-deb.sh for
/// the binary's profile), built once per binary: the tests share it under
/// a lock, as they may run at the same time.
fn deb() -> PathBuf {
    let binary = Path::new(keepd_bin());
    // target/debug is the dev profile's; other profiles' directories bear
    // their names.
    let profile = match binary
        .parent()
        .and_then(|dir| dir.file_name())
        .and_then(|name| name.to_str())
    {
        Some("debug") | None => "dev",
        Some(dir) => dir,
    };
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let out_dir = tmp.join("package-deb");
    let lock = std::fs::File::create(tmp.join("package-deb.lock")).unwrap();
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).unwrap();
    let built = std::fs::metadata(binary).unwrap().modified().unwrap();
    let current = find_deb(&out_dir).filter(|deb| {
        std::fs::metadata(deb)
            .and_then(|m| m.modified())
            .is_ok_and(|made| made > built)
    });
    if let Some(deb) = current {
        return deb;
    }
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(&out_dir).unwrap();
    let script = Path::new(MANIFEST_DIR).join("scripts/build-deb.sh");
    let (ok, text) = step("the .deb (scripts/build-deb.sh --fast)", || {
        output(
            Command::new(&script)
                .args(["--profile", profile, "--fast", "--output"])
                .arg(&out_dir),
        )
    });
    assert!(ok, "scripts/build-deb.sh failed:\n{text}");
    find_deb(&out_dir).unwrap_or_else(|| panic!("no .deb in {}:\n{text}", out_dir.display()))
}

fn find_deb(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
}

/// Removes what one run made (containers, volumes, images bearing its
/// label) whatever happens. The base image, the runtime stage and the apt
/// cache stay for the next run.
struct Cleanup {
    run: String,
}

impl Cleanup {
    fn new() -> Cleanup {
        Cleanup {
            run: common::uuid(),
        }
    }

    /// `--label` for what this run makes.
    fn label(&self) -> String {
        format!("{LABEL}={}", self.run)
    }

    /// A name for a container, volume or image of this run.
    fn name(&self, what: &str) -> String {
        format!("keepd-test-{what}-{}", &self.run[..8])
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let filter = format!("label={}", self.label());
        for id in docker_list(&["ps", "-aq", "--filter", &filter]) {
            docker(&["rm", "-f", "-v", &id]);
        }
        for name in docker_list(&["volume", "ls", "-q", "--filter", &filter]) {
            docker(&["volume", "rm", "-f", &name]);
        }
        for id in docker_list(&["images", "-q", "--filter", &filter]) {
            docker(&["rmi", "-f", &id]);
        }
    }
}

/// A process whose standard error is collected line by line (keepd logs
/// there); killed when dropped.
struct Process {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Process {
    fn spawn(mut cmd: Command) -> Process {
        let spawned = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => panic!("{cmd:?} cannot run: {e}"),
        };
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Process { child, lines }
    }

    fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    fn exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_until(timeout, || self.child.try_wait().ok().flatten())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP GET from inside `container` to its own loopback, as the image's
/// HEALTHCHECK asks (the slim image has no curl: bash's /dev/tcp); the
/// status, or None when nothing answers.
fn status_inside(container: &str, port: u16, path: &str) -> Option<u16> {
    let probe = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port} && \
         printf 'GET {path} HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && \
         read -r -t 4 _ status _ <&3 && echo \"$status\""
    );
    let (ok, text) = docker(&["exec", container, "bash", "-c", &probe]);
    if !ok {
        return None;
    }
    text.trim().parse().ok()
}

/// The package's files, control data and unit, checked without installing
/// it.
fn check_contents(deb: &Path) {
    let (ok, listing) = output(Command::new("dpkg-deb").arg("--contents").arg(deb));
    assert!(ok, "{listing}");
    // mode, owner, size, date, time, path (and "-> target" for links)
    let entries: Vec<(&str, &str)> = listing
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            Some((*fields.first()?, *fields.get(5)?))
        })
        .collect();
    for (path, mode) in [
        ("./usr/bin/keepd", "-rwxr-xr-x"),
        ("./usr/lib/systemd/system/keepd.service", "-rw-r--r--"),
        ("./usr/share/man/man1/keepd.1.gz", "-rw-r--r--"),
        ("./usr/share/man/man1/keepd-run.1.gz", "-rw-r--r--"),
        (
            "./usr/share/bash-completion/completions/keepd",
            "-rw-r--r--",
        ),
        ("./usr/share/zsh/vendor-completions/_keepd", "-rw-r--r--"),
        (
            "./usr/share/fish/vendor_completions.d/keepd.fish",
            "-rw-r--r--",
        ),
        ("./etc/keepd/keepd.yaml", "-rw-r-----"),
    ] {
        assert!(
            entries.contains(&(mode, path)),
            "{path} ({mode}) is not in the package:\n{listing}"
        );
    }
    let (_, conffiles) = output(
        Command::new("dpkg-deb")
            .arg("--info")
            .arg(deb)
            .arg("conffiles"),
    );
    assert_eq!(conffiles.trim(), "/etc/keepd/keepd.yaml");
    let (_, depends) = output(
        Command::new("dpkg-deb")
            .arg("--field")
            .arg(deb)
            .arg("Depends"),
    );
    assert!(
        depends.contains("postgresql-15") && depends.contains("adduser"),
        "Depends: {depends}"
    );

    let root = tempfile::tempdir().unwrap();
    let (ok, text) = output(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root.path()));
    assert!(ok, "{text}");
    let config = std::fs::read(root.path().join("etc/keepd/keepd.yaml")).unwrap();
    assert_eq!(
        config,
        std::fs::read(Path::new(MANIFEST_DIR).join("config/keepd.example.yaml")).unwrap(),
        "the packaged configuration is the example"
    );
    let unit_path = root.path().join("usr/lib/systemd/system/keepd.service");
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    assert!(
        unit.contains("\nExecStart=/usr/bin/keepd run --config /etc/keepd/keepd.yaml\n"),
        "{unit}"
    );
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_path)
        .output()
        .expect("systemd-analyze runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    // This host has no /usr/bin/keepd (the container has, and runs the
    // unit's command): that alone may be reported.
    let findings: Vec<&str> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .filter(|line| !line.contains("Command /usr/bin/keepd is not executable"))
        .collect();
    assert!(
        findings.is_empty(),
        "systemd-analyze verify keepd.service:\n{text}"
    );
}

/// The systemd unit as packaged in `deb`.
fn packaged_unit(deb: &Path) -> String {
    let root = tempfile::tempdir().unwrap();
    let (ok, text) = output(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root.path()));
    assert!(ok, "{text}");
    std::fs::read_to_string(root.path().join("usr/lib/systemd/system/keepd.service")).unwrap()
}

/// The package's files, modes, control data, configuration and unit
/// (`systemd-analyze verify`), without installing it: no Docker engine
/// needed.
#[test]
fn the_deb_holds_its_files_configuration_and_a_valid_unit() {
    if !(can_build_deb() && common::require_tool("systemd-analyze", "Debian's systemd")) {
        return;
    }
    let deb = deb();
    step("the package's contents (dpkg-deb, systemd-analyze)", || {
        check_contents(&deb)
    });
}

/// A key of the unit's [Service] section (the first, if repeated).
fn unit_key(unit: &str, key: &str) -> String {
    unit.lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        .map(|value| value.trim().to_string())
        .unwrap_or_else(|| panic!("no {key}= in the unit:\n{unit}"))
}

#[test]
fn the_deb_installs_on_debian_12_and_its_unit_command_serves() {
    if !engine_ready() {
        return;
    }
    let deb = deb();
    let packaged_unit = packaged_unit(&deb);

    let cleanup = Cleanup::new();
    let container = cleanup.name("deb");
    let deb_dir = deb.parent().unwrap().display().to_string();
    let deb_name = deb.file_name().unwrap().to_str().unwrap().to_string();
    if docker_list(&[
        "volume",
        "ls",
        "-q",
        "--filter",
        &format!("name={APT_CACHE}"),
    ])
    .is_empty()
    {
        docker(&[
            "volume",
            "create",
            "--label",
            &format!("{LABEL}=apt-cache"),
            APT_CACHE,
        ]);
    }
    // A clean Debian 12; --init reaps what a stopped Postgres leaves
    // behind, as systemd would.
    docker_ok(&[
        "run",
        "-d",
        "--init",
        "--name",
        &container,
        "--label",
        &cleanup.label(),
        "-v",
        &format!("{deb_dir}:/deb:ro"),
        "-v",
        &format!("{APT_CACHE}:/var/cache/apt/archives"),
        BASE_IMAGE,
        // Bounded: a test process killed before its cleanup leaves no
        // container behind for long.
        "sleep",
        "1800",
    ]);
    // As a user would install it, recommends and all; the image's
    // docker-clean (which empties apt's download cache) is left out so the
    // cache volume keeps what was fetched.
    let install = format!(
        "rm -f /etc/apt/apt.conf.d/docker-clean && apt-get update -qq && \
         apt-get install -y -qq /deb/{deb_name}"
    );
    let (ok, text) = step(
        "apt-get install ./keepd_*.deb (PostgreSQL from Debian)",
        || {
            docker(&[
                "exec",
                "-e",
                "DEBIAN_FRONTEND=noninteractive",
                &container,
                "sh",
                "-c",
                &install,
            ])
        },
    );
    assert!(ok, "installing the package failed:\n{text}");

    // What the postinst made.
    let account = docker_ok(&["exec", &container, "getent", "passwd", "keepd"]);
    assert!(
        account
            .trim_end()
            .ends_with(":/var/lib/keepd:/usr/sbin/nologin"),
        "{account}"
    );
    let modes = docker_ok(&[
        "exec",
        &container,
        "stat",
        "-c",
        "%U:%G %a %n",
        "/var/lib/keepd",
        "/etc/keepd",
        "/etc/keepd/keepd.yaml",
    ]);
    assert_eq!(
        modes.trim(),
        "keepd:keepd 700 /var/lib/keepd\nroot:keepd 750 /etc/keepd\nroot:keepd 640 /etc/keepd/keepd.yaml"
    );

    // keepd started as its unit starts it, without systemd: the installed
    // unit's ExecStart, as its User= and Group=, under its UMask=, in the
    // RuntimeDirectory= systemd would have made (the StateDirectory= is
    // the postinst's /var/lib/keepd, checked above).
    let unit = docker_ok(&[
        "exec",
        &container,
        "cat",
        "/usr/lib/systemd/system/keepd.service",
    ]);
    assert_eq!(unit, packaged_unit);
    let exec_start = unit_key(&unit, "ExecStart");
    assert_eq!(
        exec_start,
        "/usr/bin/keepd run --config /etc/keepd/keepd.yaml"
    );
    let (user, group, umask) = (
        unit_key(&unit, "User"),
        unit_key(&unit, "Group"),
        unit_key(&unit, "UMask"),
    );
    assert_eq!(unit_key(&unit, "StateDirectory"), "keepd");
    let runtime_dir = format!("/run/{}", unit_key(&unit, "RuntimeDirectory"));
    docker_ok(&[
        "exec",
        &container,
        "install",
        "-d",
        "-o",
        &user,
        "-g",
        &group,
        "-m",
        &unit_key(&unit, "RuntimeDirectoryMode"),
        &runtime_dir,
    ]);
    let mut cmd = Command::new("docker");
    cmd.args([
        "exec".to_string(),
        "-e".to_string(),
        "HOME=/var/lib/keepd".to_string(),
        "-e".to_string(),
        format!("USER={user}"),
        "-e".to_string(),
        format!("LOGNAME={user}"),
        container.clone(),
        "setpriv".to_string(),
        format!("--reuid={user}"),
        format!("--regid={group}"),
        "--init-groups".to_string(),
        "sh".to_string(),
        "-c".to_string(),
        format!("umask {umask} && exec \"$@\""),
        "sh".to_string(),
    ]);
    cmd.args(exec_start.split_whitespace());
    let mut keepd = Process::spawn(cmd);
    let healthy = step("keepd healthy (initdb, migrations, report)", || {
        wait_until(Duration::from_secs(120), || {
            if keepd.exited() {
                return Some(false);
            }
            (status_inside(&container, 8787, "/health") == Some(200)).then_some(true)
        })
    });
    assert_eq!(
        healthy,
        Some(true),
        "keepd did not become healthy:\n{}",
        keepd.log()
    );

    // A clean start: the security report shown, no error logged, no check
    // failed, the level not below security.minimum_level (`keepd report`
    // exits 1 then).
    let log = keepd.log();
    assert!(
        log.contains("Security Report"),
        "no security report:\n{log}"
    );
    let errors: Vec<&str> = log
        .lines()
        .filter(|line| line.split_whitespace().nth(1) == Some("ERROR"))
        .collect();
    assert!(errors.is_empty(), "errors at startup:\n{log}");
    assert!(
        !log.contains("below security.minimum_level"),
        "the security level is too low:\n{log}"
    );
    let report: Value = serde_json::from_str(&docker_stdout(&[
        "exec", "-u", &user, &container, "keepd", "report", "--json",
    ]))
    .expect("keepd report --json prints JSON");
    let failed: Vec<&Value> = report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|check| check["status"] == "fail")
        .collect();
    assert!(failed.is_empty(), "failed checks: {failed:?}");
    eprintln!(
        "package: security level of the packaged install: {}",
        report["level"]
    );

    // SIGTERM, as systemctl stop sends it: keepd stops Postgres and exits 0.
    let stop = "for d in /proc/[0-9]*; do \
                [ \"$(cat $d/comm 2>/dev/null)\" = keepd ] && kill -TERM ${d#/proc/}; \
                done; true";
    docker_ok(&["exec", &container, "sh", "-c", stop]);
    let status = keepd
        .wait_exit(Duration::from_secs(30))
        .expect("keepd stops on SIGTERM");
    assert!(status.success(), "{status:?}\n{}", keepd.log());
    assert!(keepd.log().contains("keepd stopped"), "{}", keepd.log());
}

/// contrib/docker/compose.yaml as docker-compose reads it (no engine
/// needed): read-only, unprivileged, its state in a volume, published on
/// loopback only.
#[test]
fn the_compose_file_runs_the_image_hardened() {
    if !common::require_tool("docker-compose", "Debian's docker-compose") {
        return;
    }
    let file = Path::new(MANIFEST_DIR).join("contrib/docker/compose.yaml");
    let out = Command::new("docker-compose")
        .arg("-f")
        .arg(&file)
        .arg("config")
        .output()
        .expect("docker-compose runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "read_only: true",
        "no-new-privileges:true",
        "999:999",
        "- ALL",
        "keepd-state:/var/lib/keepd",
        "- /tmp",
        "127.0.0.1:8787:8787",
    ] {
        assert!(text.contains(needle), "{needle} is not in:\n{text}");
    }
}

/// What the container logged (keepd logs to stderr).
fn logs(container: &str) -> String {
    docker(&["logs", container]).1
}

fn container_running(container: &str) -> bool {
    docker_stdout(&["inspect", "-f", "{{.State.Running}}", container]).trim() == "true"
}

fn wait_healthy(container: &str, addr: SocketAddr) -> Option<Value> {
    wait_until(Duration::from_secs(120), || {
        if !container_running(container) {
            return Some(None);
        }
        match common::http_get(addr, "/health") {
            Some((200, body)) => Some(Some(body)),
            _ => None,
        }
    })
    .flatten()
}

#[test]
fn the_image_runs_keepd_unprivileged_on_a_read_only_root() {
    if !engine_ready() {
        return;
    }
    let deb = deb();
    let cleanup = Cleanup::new();

    // The build context holds what the Dockerfile takes from the
    // repository (the .dockerignore's exceptions), at the same paths.
    let context = tempfile::Builder::new()
        .prefix("package-context")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let ctx = context.path();
    std::fs::create_dir_all(ctx.join("target/debian")).unwrap();
    std::fs::create_dir_all(ctx.join("contrib/docker")).unwrap();
    std::fs::copy(
        &deb,
        ctx.join("target/debian").join(deb.file_name().unwrap()),
    )
    .unwrap();
    for file in ["Dockerfile", "keepd.yaml"] {
        std::fs::copy(
            Path::new(MANIFEST_DIR).join("contrib/docker").join(file),
            ctx.join("contrib/docker").join(file),
        )
        .unwrap();
    }
    let dockerfile = ctx.join("contrib/docker/Dockerfile");
    let (dockerfile, ctx) = (dockerfile.to_str().unwrap(), ctx.to_str().unwrap());
    step(
        "docker build --target runtime (cached after a first run)",
        || {
            docker_ok(&[
                "build",
                "--target",
                "runtime",
                "-t",
                RUNTIME_STAGE,
                "--label",
                &format!("{LABEL}=cache"),
                "-f",
                dockerfile,
                ctx,
            ])
        },
    );
    let image = format!("{}:test", cleanup.name("image"));
    step("docker build (the package on the runtime stage)", || {
        docker_ok(&[
            "build",
            "-t",
            &image,
            "--label",
            &cleanup.label(),
            "-f",
            dockerfile,
            ctx,
        ])
    });

    let volume = cleanup.name("state");
    docker_ok(&["volume", "create", "--label", &cleanup.label(), &volume]);
    let port = common::free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let container = cleanup.name("image");
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &container,
        "--label",
        &cleanup.label(),
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--tmpfs",
        "/run",
        "-v",
        &format!("{volume}:/var/lib/keepd"),
        "-p",
        &format!("127.0.0.1:{port}:8787"),
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        &image,
    ]);
    let health = step("the container healthy on a published loopback port", || {
        wait_healthy(&container, addr)
    })
    .unwrap_or_else(|| panic!("keepd did not become healthy:\n{}", logs(&container)));
    assert_eq!(health["status"], "ok", "{health}");
    let node_id = health["nodeId"].as_str().expect("nodeId").to_string();

    // The image's HEALTHCHECK command answers as the engine would run it.
    let test: Vec<String> = serde_json::from_str(&docker_stdout(&[
        "image",
        "inspect",
        "-f",
        "{{json .Config.Healthcheck.Test}}",
        &image,
    ]))
    .unwrap();
    assert_eq!(test.first().map(String::as_str), Some("CMD"), "{test:?}");
    let mut exec = vec!["exec".to_string(), container.clone()];
    exec.extend(test[1..].iter().cloned());
    let exec: Vec<&str> = exec.iter().map(String::as_str).collect();
    docker_ok(&exec);
    // /metrics on its own listener inside the container's network.
    assert_eq!(status_inside(&container, 9187, "/metrics"), Some(200));

    // No process of the container runs as root: keepd, its Postgres, tini.
    let config = docker_stdout(&[
        "inspect",
        "-f",
        "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}}",
        &container,
    ]);
    assert_eq!(config.trim(), "999:999 true");
    let processes = docker_stdout(&[
        "exec",
        &container,
        "sh",
        "-c",
        "for d in /proc/[0-9]*; do \
         [ -r $d/status ] && echo \"$(cat $d/comm) $(grep ^Uid: $d/status | cut -f2-)\"; \
         done; true",
    ]);
    let uids: Vec<(String, Vec<String>)> = processes
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let comm = fields.next()?.to_string();
            Some((comm, fields.map(str::to_string).collect::<Vec<_>>()))
        })
        // A process that ended between the two reads has no Uid line.
        .filter(|(_, ids)| !ids.is_empty())
        .collect();
    for name in ["keepd", "postgres"] {
        assert!(
            uids.iter().any(|(comm, _)| comm == name),
            "no {name} process:\n{processes}"
        );
    }
    for (comm, ids) in &uids {
        assert!(
            ids.len() == 4 && ids.iter().all(|id| id != "0"),
            "{comm} runs as uid {ids:?}:\n{processes}"
        );
    }

    // The root filesystem is read-only, even for root; the volume and
    // /tmp are where keepd writes.
    let (wrote, text) = docker(&[
        "exec",
        "-u",
        "0",
        &container,
        "sh",
        "-c",
        "echo x > /etc/keepd-probe",
    ]);
    assert!(
        !wrote && text.contains("Read-only file system"),
        "the root filesystem is writable: {text}"
    );
    docker_ok(&[
        "exec",
        &container,
        "sh",
        "-c",
        "touch /var/lib/keepd/.probe /tmp/.probe && rm /var/lib/keepd/.probe /tmp/.probe",
    ]);

    let log = logs(&container);
    let errors: Vec<&str> = log
        .lines()
        .filter(|line| {
            serde_json::from_str::<Value>(line).is_ok_and(|event| event["level"] == "ERROR")
        })
        .collect();
    assert!(errors.is_empty(), "errors:\n{log}");

    // docker stop (SIGTERM through tini): keepd stops Postgres and exits 0;
    // started again on a fresh tmpfs it is the same node, its state in the
    // volume.
    step("docker stop", || {
        docker_ok(&["stop", "-t", "30", &container])
    });
    assert_eq!(
        docker_stdout(&["inspect", "-f", "{{.State.ExitCode}}", &container]).trim(),
        "0",
        "{}",
        logs(&container)
    );
    assert!(logs(&container).contains("keepd stopped"));
    docker_ok(&["start", &container]);
    let again = step("restarted on its volume", || wait_healthy(&container, addr))
        .unwrap_or_else(|| panic!("keepd did not come back:\n{}", logs(&container)));
    assert_eq!(again["nodeId"], node_id.as_str());
}
