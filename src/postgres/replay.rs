//! A restore's server: the data directory brought back in place by a
//! restore command, then the node's own server run until it has replayed
//! the archive to its target and promoted. The native provider runs the
//! command here and a postmaster of its own; the docker provider runs the
//! command in a one-off container on the volume and starts the node's
//! container. `admin` (`keepd restore`) drives it without knowing which.

use std::path::PathBuf;
use std::process::Child;
use std::sync::Arc;

use super::commands::{CommandRunner, RunOutput};
use super::docker::DockerCluster;
use super::native::NativeCluster;
use super::render::{RenderInputs, render};
use super::server::ProviderError;
use super::tls::Endpoint;
use super::{DATABASE, native::NativeError};
use crate::config::{Config, Layout, Provider, Topology};
use crate::pki::NodePki;
use crate::repository::RepositoryEnv;
use crate::secrets::values::{ScramVerifier, SecretString};

/// Why the replay's server stopped short.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error("the container {0} is running: stop keepd (and the container) before a restore")]
    ContainerRunning(String),
    #[error("an external server restores from its own backups: keepd takes none of it")]
    External,
    #[error("cannot start Postgres to replay the archive: {0}")]
    Spawn(std::io::Error),
    #[error(
        "Postgres exited while replaying the WAL archive ({status}); its output is above, and its \
         log under {log}"
    )]
    Exited { status: String, log: PathBuf },
}

impl From<NativeError> for ReplayError {
    fn from(e: NativeError) -> ReplayError {
        ReplayError::Provider(e.into())
    }
}

impl From<super::docker::DockerError> for ReplayError {
    fn from(e: super::docker::DockerError) -> ReplayError {
        ReplayError::Provider(e.into())
    }
}

enum Host {
    Native {
        runner: CommandRunner,
        pki: Option<Arc<NodePki>>,
        env: RepositoryEnv,
        postmaster: Option<Child>,
    },
    Docker(Box<DockerCluster>),
}

/// The server a restore replays on.
pub struct Replay {
    config: Config,
    layout: Layout,
    host: Host,
}

impl Replay {
    /// Checks everything the replay needs before the data directory is
    /// touched: the rendered configuration, the node PKI in TCP mode, a
    /// data directory to restore into (native); a stopped container
    /// prepared as the daemon prepares it (docker).
    pub async fn prepare(
        config: &Config,
        node_id: &str,
        superuser: &SecretString,
        env: RepositoryEnv,
    ) -> Result<Replay, ReplayError> {
        let host = match config.database.postgres.provider {
            Provider::External => return Err(ReplayError::External),
            Provider::Native => {
                let rendered = render(&RenderInputs::of(config)).map_err(NativeError::Render)?;
                let pki = match Topology::of(config).issues_certificates() {
                    true => Some(Arc::new(
                        NodePki::load(&config.node.state_dir, node_id)
                            .map_err(ProviderError::Pki)?,
                    )),
                    false => None,
                };
                if !Layout::of(config).data_dir().join("PG_VERSION").exists() {
                    NativeCluster::prepare_restore_target(config, &rendered)?;
                }
                Host::Native {
                    runner: CommandRunner::of(config, node_id)?,
                    pki,
                    env,
                    postmaster: None,
                }
            }
            Provider::Docker => {
                let verifier = ScramVerifier::of(superuser);
                let inputs = RenderInputs::of(config);
                let (cluster, _) =
                    DockerCluster::prepare(config, inputs, node_id, &verifier, env).await?;
                if cluster.running().await? {
                    return Err(ReplayError::ContainerRunning(
                        cluster.container_name().to_string(),
                    ));
                }
                Host::Docker(Box::new(cluster))
            }
        };
        Ok(Replay {
            config: config.clone(),
            layout: Layout::of(config),
            host,
        })
    }

    /// Runs the restore command `argv` (pgBackRest's, with `env`) where
    /// the data directory is: here as Postgres's account (native), or in a
    /// one-off container on the volume, whose environment the container
    /// holds (docker).
    pub async fn restore(
        &self,
        argv: Vec<String>,
        env: &[(&str, &SecretString)],
    ) -> Result<RunOutput, ReplayError> {
        match &self.host {
            Host::Native { runner, .. } => {
                let (program, args) = argv.split_first().expect("a command");
                runner
                    .run(program, args, env, false)
                    .await
                    .map_err(|e| ReplayError::Spawn(std::io::Error::other(e.to_string())))
            }
            Host::Docker(cluster) => Ok(RunOutput {
                code: Some(0),
                stdout: cluster.run_one_off("pgBackRest restore", argv).await?,
                stderr: String::new(),
            }),
        }
    }

    /// Starts the node's server on the restored directory; the endpoint
    /// of its superuser.
    pub async fn start(&mut self, superuser: &SecretString) -> Result<Endpoint, ReplayError> {
        let endpoint = match &mut self.host {
            Host::Native {
                pki,
                env,
                postmaster,
                ..
            } => {
                // Installed as the daemon installs it.
                let (cluster, _) = NativeCluster::prepare(
                    &self.config,
                    RenderInputs::of(&self.config),
                    pki.as_ref(),
                    env.clone(),
                )?;
                // Its output until its logging starts (a bad setting, say)
                // goes to the operator's terminal.
                let child = cluster
                    .postmaster_command()
                    .stderr(std::process::Stdio::inherit())
                    .spawn()
                    .map_err(ReplayError::Spawn)?;
                *postmaster = Some(child);
                cluster.superuser_endpoint(superuser, DATABASE)
            }
            Host::Docker(cluster) => {
                cluster.start().await?;
                cluster.superuser_endpoint(superuser, DATABASE)
            }
        };
        Ok(endpoint)
    }

    /// Whether the replay is over by the server's own sign (native: its
    /// recovery.signal is gone); an error when the server died. Without a
    /// sign (docker) the caller asks the server whether it is in recovery.
    pub fn done(&mut self) -> Result<bool, ReplayError> {
        match &mut self.host {
            Host::Native { postmaster, .. } => {
                let layout = &self.layout;
                if let Some(status) = postmaster
                    .as_mut()
                    .and_then(|p| p.try_wait().ok().flatten())
                {
                    return Err(ReplayError::Exited {
                        status: status.to_string(),
                        log: layout.postgres_log_dir(),
                    });
                }
                Ok(!layout.data_dir().join("recovery.signal").exists())
            }
            Host::Docker(_) => Ok(false),
        }
    }

    /// Stops the server (a fast shutdown: the restored cluster is left
    /// consistent).
    pub async fn stop(self) {
        match self.host {
            Host::Native { postmaster, .. } => {
                if let Some(mut child) = postmaster {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(child.id() as i32),
                        nix::sys::signal::Signal::SIGINT,
                    );
                    let _ = child.wait();
                }
            }
            Host::Docker(cluster) => cluster.stop().await,
        }
    }
}
