//! `keepd service`: the service definitions this binary runs under, and
//! their installation. systemd (Linux) and launchd (macOS) are written
//! here; a Windows service is not built by this crate (see docs).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The systemd unit, as shipped in `systemd/keepd.service`.
const SYSTEMD_UNIT: &str = include_str!("../systemd/keepd.service");
/// What the docker provider adds (`systemd/keepd-docker.conf`).
const SYSTEMD_DOCKER_DROPIN: &str = include_str!("../systemd/keepd-docker.conf");

const UNIT_PATH: &str = "/etc/systemd/system/keepd.service";
const DROPIN_PATH: &str = "/etc/systemd/system/keepd.service.d/docker.conf";
const IDENTITY_DROPIN_PATH: &str = "/etc/systemd/system/keepd.service.d/identity.conf";
const PLIST_PATH: &str = "/Library/LaunchDaemons/dev.keepd.plist";

/// Where an install from the binary puts its manual pages and completions
/// (a package uses /usr/share instead): the places man, bash-completion,
/// zsh and fish look in by default.
const MAN_DIR: &str = "/usr/local/share/man/man1";
const COMPLETION_PATHS: [(&str, &str); 3] = [
    ("bash", "/usr/local/share/bash-completion/completions/keepd"),
    ("zsh", "/usr/local/share/zsh/site-functions/_keepd"),
    (
        "fish",
        "/usr/local/share/fish/vendor_completions.d/keepd.fish",
    ),
];

/// The manual pages (file name, roff) and completion scripts (shell,
/// script) the binary generates from its own command line.
#[derive(Debug, Clone, Default)]
pub struct Documentation {
    pub man_pages: Vec<(String, String)>,
    pub completions: Vec<(&'static str, String)>,
}

impl Documentation {
    fn install(&self) -> Vec<Step> {
        let pages = self.man_pages.iter().map(|(name, roff)| Step::Write {
            path: Path::new(MAN_DIR).join(name),
            contents: roff.clone(),
        });
        let scripts = self.completions.iter().filter_map(|(shell, script)| {
            let (_, path) = COMPLETION_PATHS.iter().find(|(s, _)| s == shell)?;
            Some(Step::Write {
                path: path.into(),
                contents: script.clone(),
            })
        });
        pages.chain(scripts).collect()
    }

    fn uninstall(&self) -> Vec<Step> {
        let pages = self.man_pages.iter().map(|(name, _)| Step::Remove {
            path: Path::new(MAN_DIR).join(name),
        });
        let scripts = COMPLETION_PATHS
            .iter()
            .map(|(_, path)| Step::Remove { path: path.into() });
        pages.chain(scripts).collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    Systemd,
    Launchd,
}

impl Target {
    /// The service manager of this platform.
    pub fn native() -> Target {
        if cfg!(target_os = "macos") {
            Target::Launchd
        } else {
            Target::Systemd
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{command}` failed: {reason}")]
    Command { command: String, reason: String },
}

/// The systemd unit for `binary` and `config`.
pub fn systemd_unit(binary: &Path, config: &Path) -> String {
    SYSTEMD_UNIT.replace(
        "ExecStart=/usr/local/bin/keepd run --config /etc/keepd/keepd.yaml",
        &format!(
            "ExecStart={} run --config {}",
            binary.display(),
            config.display()
        ),
    )
}

pub fn systemd_docker_dropin() -> &'static str {
    SYSTEMD_DOCKER_DROPIN
}

/// The drop-in that hands keepd its identity from an encrypted credential
/// (`node.identity.credential`): systemd decrypts it at each start into
/// the service's private, in-memory credentials directory.
pub fn systemd_identity_dropin(credential: &Path) -> String {
    format!(
        "# keepd's identity key, a systemd encrypted credential (node.identity.credential,\n\
         # made by `keepd identity protect`).\n\
         [Service]\n\
         LoadCredentialEncrypted={}:{}\n",
        crate::identity::protection::CREDENTIAL_NAME,
        credential.display()
    )
}

/// The drop-ins an install adds to the unit.
#[derive(Debug, Clone, Copy, Default)]
pub struct Units<'a> {
    /// The docker provider's (`systemd/keepd-docker.conf`).
    pub docker: bool,
    /// `node.identity.credential`, when the identity is one.
    pub identity_credential: Option<&'a Path>,
}

fn xml(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A launchd daemon definition running `binary run --config config`.
pub fn launchd_plist(binary: &Path, config: &Path) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
  <key>Label</key>
  <string>dev.keepd</string>
  <key>ProgramArguments</key>
  <array>
    <string>{binary}</string>
    <string>run</string>
    <string>--config</string>
    <string>{config}</string>
  </array>
  <key>RunAtLoad</key>
  <true/>
  <key>KeepAlive</key>
  <dict>
    <key>SuccessfulExit</key>
    <false/>
  </dict>
  <key>UserName</key>
  <string>_keepd</string>
  <key>Umask</key>
  <integer>63</integer>
  <key>ExitTimeOut</key>
  <integer>30</integer>
  <key>StandardErrorPath</key>
  <string>/var/log/keepd.log</string>
</dict>
</plist>
"#,
        binary = xml(&binary.display().to_string()),
        config = xml(&config.display().to_string()),
    )
}

/// One step of an installation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Write { path: PathBuf, contents: String },
    Remove { path: PathBuf },
    Run { program: String, args: Vec<String> },
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Write { path, contents } => {
                write!(f, "write {} ({} bytes)", path.display(), contents.len())
            }
            Step::Remove { path } => write!(f, "remove {}", path.display()),
            Step::Run { program, args } => write!(f, "run {program} {}", args.join(" ")),
        }
    }
}

fn run(program: &str, args: &[&str]) -> Step {
    Step::Run {
        program: program.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
    }
}

/// The steps that install keepd as a service of `target`.
pub fn install_steps(
    target: Target,
    binary: &Path,
    config: &Path,
    units: Units<'_>,
    docs: &Documentation,
) -> Vec<Step> {
    // The documentation last: a failed step leaves none of it behind.
    let mut steps = match target {
        Target::Systemd => {
            let mut steps = vec![
                // The service account, if missing (useradd refuses a
                // duplicate; `id` checks first).
                run(
                    "sh",
                    &[
                        "-c",
                        "id keepd >/dev/null 2>&1 || useradd --system --user-group --no-create-home --shell /usr/sbin/nologin keepd",
                    ],
                ),
                Step::Write {
                    path: UNIT_PATH.into(),
                    contents: systemd_unit(binary, config),
                },
            ];
            if units.docker {
                steps.push(Step::Write {
                    path: DROPIN_PATH.into(),
                    contents: systemd_docker_dropin().into(),
                });
            }
            if let Some(credential) = units.identity_credential {
                steps.push(Step::Write {
                    path: IDENTITY_DROPIN_PATH.into(),
                    contents: systemd_identity_dropin(credential),
                });
            }
            steps.push(run("systemctl", &["daemon-reload"]));
            steps.push(run("systemctl", &["enable", "keepd.service"]));
            steps
        }
        Target::Launchd => vec![
            Step::Write {
                path: PLIST_PATH.into(),
                contents: launchd_plist(binary, config),
            },
            run("launchctl", &["load", "-w", PLIST_PATH]),
        ],
    };
    steps.extend(docs.install());
    steps
}

/// The steps that remove it (state and configuration stay).
pub fn uninstall_steps(target: Target, docs: &Documentation) -> Vec<Step> {
    let mut steps = match target {
        Target::Systemd => vec![
            run("systemctl", &["disable", "--now", "keepd.service"]),
            Step::Remove {
                path: DROPIN_PATH.into(),
            },
            Step::Remove {
                path: IDENTITY_DROPIN_PATH.into(),
            },
            Step::Remove {
                path: UNIT_PATH.into(),
            },
            run("systemctl", &["daemon-reload"]),
        ],
        Target::Launchd => vec![
            run("launchctl", &["unload", "-w", PLIST_PATH]),
            Step::Remove {
                path: PLIST_PATH.into(),
            },
        ],
    };
    steps.extend(docs.uninstall());
    steps
}

/// Carries out `steps`, stopping at the first failure.
pub fn apply(steps: &[Step]) -> Result<(), ServiceError> {
    for step in steps {
        match step {
            Step::Write { path, contents } => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|source| ServiceError::Write {
                        path: dir.into(),
                        source,
                    })?;
                }
                std::fs::write(path, contents).map_err(|source| ServiceError::Write {
                    path: path.clone(),
                    source,
                })?;
            }
            Step::Remove { path } => match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(ServiceError::Write {
                        path: path.clone(),
                        source,
                    });
                }
            },
            Step::Run { program, args } => {
                let status = Command::new(program).args(args).status();
                match status {
                    Ok(s) if s.success() => {}
                    Ok(s) => {
                        return Err(ServiceError::Command {
                            command: step.to_string(),
                            reason: s.to_string(),
                        });
                    }
                    Err(e) => {
                        return Err(ServiceError::Command {
                            command: step.to_string(),
                            reason: e.to_string(),
                        });
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_runs_the_given_binary_and_config() {
        let unit = systemd_unit(Path::new("/opt/keepd/bin/keepd"), Path::new("/srv/k.yaml"));
        assert!(unit.contains("\nExecStart=/opt/keepd/bin/keepd run --config /srv/k.yaml\n"));
        assert!(unit.contains("\nType=notify\n") && unit.contains("\nWatchdogSec="));
        // Room for api.max_connections' default and more (see edge).
        let limit: u64 = unit
            .lines()
            .find_map(|l| l.strip_prefix("LimitNOFILE="))
            .unwrap()
            .parse()
            .unwrap();
        assert!(limit >= 1024 + crate::edge::RESERVED_FDS + 1000);
        let docs = Documentation {
            man_pages: vec![("keepd.1".into(), ".TH keepd 1".into())],
            completions: vec![("bash", "complete -F _keepd keepd".into())],
        };
        let units = Units {
            docker: true,
            identity_credential: Some(Path::new("/etc/credstore.encrypted/keepd-identity")),
        };
        let steps = install_steps(
            Target::Systemd,
            Path::new("/b"),
            Path::new("/c"),
            units,
            &docs,
        );
        let writes = |target: &str| {
            steps
                .iter()
                .any(|s| matches!(s, Step::Write { path, .. } if path == Path::new(target)))
        };
        assert!(writes(DROPIN_PATH));
        assert!(steps.iter().any(|s| matches!(s, Step::Write { path, contents }
            if path == Path::new(IDENTITY_DROPIN_PATH)
                && contents.contains("\nLoadCredentialEncrypted=keepd-identity:/etc/credstore.encrypted/keepd-identity\n"))));
        assert!(writes("/usr/local/share/man/man1/keepd.1"));
        assert!(writes("/usr/local/share/bash-completion/completions/keepd"));
        let removed = uninstall_steps(Target::Systemd, &docs);
        assert!(removed.iter().any(
            |s| matches!(s, Step::Remove { path } if path == Path::new("/usr/local/share/man/man1/keepd.1"))
        ));
    }
}
