//! Running a program where the server's files are: on this host as
//! Postgres's account (native, external), or inside the node's server
//! container (docker). `backup` runs pgBackRest through it without knowing
//! which provider there is.

use std::process::{Command, Stdio};

use super::docker::{self, DockerError};
use super::native::{NativeError, PgAccount};
use crate::config::{Config, Provider};
use crate::secrets::values::SecretString;

/// Why a program could not be run (its own failure is its exit code).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("cannot run {program} in the server container: {source}")]
    Container {
        program: String,
        source: DockerError,
    },
}

/// What a program said and how it ended.
#[derive(Debug)]
pub struct RunOutput {
    /// None when a signal ended it.
    pub code: Option<i64>,
    pub stdout: String,
    /// Empty in a container, where both streams come as one.
    pub stderr: String,
}

impl RunOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Where programs for the server run.
#[derive(Debug, Clone)]
pub enum CommandRunner {
    /// On this host, as this account (None: as keepd).
    Local(Option<PgAccount>),
    /// `docker exec` in this node's server container.
    Container { node_id: String },
}

impl CommandRunner {
    /// Where the programs of node `node_id`'s server run.
    pub fn of(config: &Config, node_id: &str) -> Result<CommandRunner, NativeError> {
        Ok(match config.database.postgres.provider {
            Provider::Docker => CommandRunner::Container {
                node_id: node_id.to_string(),
            },
            Provider::Native | Provider::External => {
                CommandRunner::Local(PgAccount::resolve(&config.database.postgres.native.run_as)?)
            }
        })
    }

    /// Runs `program` with `args` and exactly `env` (and `LC_ALL=C`);
    /// `echo` also prints its output as it comes (a long backup's
    /// progress). Dropping the future kills a local program; one in a
    /// container ends with the container.
    pub async fn run(
        &self,
        program: &str,
        args: &[String],
        env: &[(&str, &SecretString)],
        echo: bool,
    ) -> Result<RunOutput, RunError> {
        match self {
            CommandRunner::Local(account) => {
                let mut command = Command::new(program);
                command.env_clear().env("LC_ALL", "C");
                for (name, value) in env {
                    command.env(name, value.expose());
                }
                command.current_dir("/").args(args).stdin(Stdio::null());
                if let Some(account) = account {
                    use std::os::unix::process::CommandExt;
                    command.uid(account.uid.as_raw()).gid(account.gid.as_raw());
                }
                if echo {
                    command.stdout(Stdio::inherit()).stderr(Stdio::inherit());
                }
                let out = tokio::process::Command::from(command)
                    .kill_on_drop(true)
                    .output()
                    .await
                    .map_err(|source| RunError::Spawn {
                        program: program.to_string(),
                        source,
                    })?;
                Ok(RunOutput {
                    code: out.status.code().map(i64::from),
                    stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                })
            }
            CommandRunner::Container { node_id } => {
                let mut cmd = vec![program.to_string()];
                cmd.extend(args.iter().cloned());
                let mut vars: Vec<String> = env
                    .iter()
                    .map(|(name, value)| format!("{name}={}", value.expose()))
                    .collect();
                vars.push("LC_ALL=C".into());
                let (code, output) = docker::exec_in_server(node_id, cmd, vars, echo)
                    .await
                    .map_err(|source| RunError::Container {
                        program: program.to_string(),
                        source,
                    })?;
                Ok(RunOutput {
                    code: Some(code),
                    stdout: output,
                    stderr: String::new(),
                })
            }
        }
    }
}
