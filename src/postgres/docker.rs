//! The docker provider: Postgres in a hardened container, through the
//! Docker Engine API (bollard).
//!
//! `DockerCluster::prepare` makes sure the image is present (pulled with
//! progress only when absent), the data volume exists, the rendered files
//! are in place for a read-only bind mount, the cluster is initialised
//! (`initdb` in a one-off container) and the superuser's verifier is set
//! (`postgres --single` in a one-off container, the statement sent over
//! its stdin). The server container is created, adopted or recreated by
//! `ensure_container`; the supervisor starts and watches it.
//!
//! Hardening of every container keepd creates: the image's `postgres` user
//! (keepd's own user when keepd is not root), no capabilities,
//! `no-new-privileges`, a read-only root filesystem with a tmpfs for
//! scratch, pids and memory limits, no published port, no restart policy
//! (keepd supervises), and `network_mode: none`: keepd reaches Postgres
//! through its socket directory, a bind mount from `runtime_dir`.
//! Containers and volumes carry keepd's labels; keepd never touches a
//! container it did not label.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, EndpointIpamConfig, EndpointSettings, HostConfig, Ipam, IpamConfig,
    NetworkCreateRequest, NetworkingConfig, RestartPolicy, RestartPolicyNameEnum,
    VolumeCreateRequest,
};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, CreateImageOptionsBuilder,
    DownloadFromContainerOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder,
};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use super::render::{RenderError, RenderInputs, RenderedConfig};
use super::tls::{Endpoint, Tls};
use super::{
    INITDB_ARGS, PgAddress, SINGLE_USER_ARGS, SUPERUSER, endpoint, superuser_verifier_statement,
};
use crate::config::container::REPOSITORY;
use crate::config::{Config, Layout, Topology};
use crate::fsutil;
use crate::pki::NodePki;
use crate::repository::RepositoryEnv;
use crate::repository::{PGBACKREST, PGBACKREST_CONF};
use crate::secrets::values::{ScramVerifier, SecretString};

/// Where things live inside the container (the official image's layout;
/// what the rendered files name is `config::container`).
const DATA_MOUNT: &str = "/var/lib/postgresql/data";
const TLS_MOUNT: &str = "/etc/keepd-tls";
use crate::config::container::{CONF as CONF_MOUNT, PGDATA, SOCKET as SOCKET_MOUNT};

const LABEL_MANAGED: &str = "io.keepd.managed";
const LABEL_NODE: &str = "io.keepd.node-id";
const LABEL_CONFIG: &str = "io.keepd.config-hash";

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error(
        "backups are configured but the image {image} has no /usr/bin/pgbackrest: use an image \
         with pgBackRest installed (FROM postgres, apt-get install pgbackrest), or unset backup.*"
    )]
    NoPgBackRest { image: String },
    #[error("pgBackRest in container {container} exited with {code}: {output}")]
    Exec {
        container: String,
        code: i64,
        output: String,
    },
    #[error(
        "cannot reach the Docker engine ({reason}); is dockerd running, and may keepd use its \
         socket (DOCKER_HOST or /var/run/docker.sock)?"
    )]
    Engine { reason: String },
    #[error(
        "the image {image} is not present and pulling it failed: {reason}; set \
         database.postgres.docker.image to an image this host has (docker images) or can pull"
    )]
    Pull { image: String, reason: String },
    #[error(
        "a container named {name} exists but keepd did not create it (no {LABEL_NODE} label for \
         this node); keepd never touches other containers: rename or remove it"
    )]
    Foreign { name: String },
    #[error(
        "the image {image} has no `postgres` user in /etc/passwd; use an image laid out like the official postgres image"
    )]
    NoPostgresUser { image: String },
    #[error("{what} failed (exit {code}); its output:\n{output}")]
    OneOff {
        what: &'static str,
        code: i64,
        output: String,
    },
    #[error(
        "the host cannot reach {address} on the internal network {network}: this Docker engine \
         isolates internal bridges from the host; use network.use_unix_socket: true (no network \
         at all) instead"
    )]
    Unreachable { network: String, address: Ipv4Addr },
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    #[error(transparent)]
    Tls(#[from] super::tls::TlsError),
    #[error("cannot prepare {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("Docker engine request failed ({what}): {source}")]
    Api {
        what: &'static str,
        source: bollard::errors::Error,
    },
}

fn api(what: &'static str) -> impl FnOnce(bollard::errors::Error) -> DockerError {
    move |source| DockerError::Api { what, source }
}

fn not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// What the engine reports about the running container, for the security
/// report: measured from `inspect`, not taken from keepd's own config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerFacts {
    pub name: String,
    pub id: String,
    pub user: String,
    pub network_mode: String,
    pub cap_drop: Vec<String>,
    pub cap_add: Vec<String>,
    pub readonly_rootfs: bool,
    pub security_opt: Vec<String>,
    pub published_ports: usize,
    pub privileged: bool,
}

/// The names of a node's engine resources, spelled once (tests use them
/// too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerNames {
    pub container: String,
    pub volume: String,
    pub network: String,
    /// The container (created, never started) keepd reads the image from.
    pub probe: String,
    /// The short-lived container of initdb and single-user mode.
    pub one_off: String,
}

impl DockerNames {
    pub fn for_node(node_id: &str) -> DockerNames {
        let container = format!("keepd-pg-{node_id}");
        DockerNames {
            volume: format!("{container}-data"),
            network: format!("keepd-internal-{node_id}"),
            probe: format!("{container}-probe"),
            one_off: format!("{container}-oneoff"),
            container,
        }
    }
}

/// The numeric user every keepd container runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ContainerUser {
    uid: u32,
    gid: u32,
}

impl std::fmt::Display for ContainerUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.uid, self.gid)
    }
}

/// What a container is for, which decides its user, network and labels.
enum Role<'a> {
    /// Reads files of the image (never started), as the image's
    /// `postgres` user by name (its ids are what it finds out).
    Probe,
    /// initdb or single-user mode: no network.
    OneOff(ContainerUser),
    /// The server: on the internal network in TCP mode, labelled with the
    /// rendered configuration's fingerprint.
    Server(ContainerUser, Option<&'a InternalNetwork>),
}

/// What every keepd container of this node shares; complete before any
/// container exists.
struct Engine {
    docker: Docker,
    image: String,
    node_id: String,
    names: DockerNames,
    conf_dir: PathBuf,
    socket_dir: PathBuf,
    port: u16,
    memory_bytes: i64,
    pids_limit: i64,
    fingerprint: String,
    /// Backups: the repository's host directory, and what pgBackRest
    /// reads from its environment.
    backup: Option<BackupMounts>,
}

/// What the containers of a node with backups mount and are given (a
/// directory repository: validation refuses a bucket, which a container
/// without a route out could not reach).
struct BackupMounts {
    repository: PathBuf,
    env: RepositoryEnv,
}

/// The node's Postgres container, built only once its user and (in TCP
/// mode) its network are known.
pub struct DockerCluster {
    engine: Engine,
    user: ContainerUser,
    /// TCP mode: the internal network, the container's address on it and
    /// the PKI; None: no network at all, the socket bind mount.
    tcp: Option<InternalNetwork>,
    pub start_timeout: Duration,
    pub shutdown_timeout: Duration,
}

/// keepd's `--internal` bridge network (no masquerade) and its TLS.
struct InternalNetwork {
    name: String,
    address: Ipv4Addr,
    tls_dir: PathBuf,
    pki: Arc<NodePki>,
    superuser_tls: Tls,
}

/// How many /28 subnets keepd tries when creating its network.
const SUBNET_ATTEMPTS: u32 = 64;

impl Engine {
    /// keepd's internal network, created when missing: `internal` (no
    /// route out), no masquerade, a /28 of its own so the container has a
    /// fixed address its certificate can name. Returns (name, address).
    async fn ensure_network(&self) -> Result<(String, Ipv4Addr), DockerError> {
        let name = self.names.network.clone();
        let found = match self.docker.inspect_network(&name, None).await {
            Ok(found) => Some(found),
            Err(e) if not_found(&e) => None,
            Err(e) => return Err(api("inspect network")(e)),
        };
        let network = match found {
            Some(found) => {
                if found.labels.as_ref().and_then(|l| l.get(LABEL_NODE)) != Some(&self.node_id) {
                    return Err(DockerError::Foreign { name });
                }
                found
            }
            None => {
                self.create_network(&name).await?;
                self.docker
                    .inspect_network(&name, None)
                    .await
                    .map_err(api("inspect network"))?
            }
        };
        let subnet = network
            .ipam
            .and_then(|ipam| ipam.config)
            .and_then(|configs| configs.into_iter().find_map(|c| c.subnet))
            .and_then(|subnet| subnet.split('/').next()?.parse::<Ipv4Addr>().ok())
            .ok_or_else(|| DockerError::Foreign { name: name.clone() })?;
        let base = u32::from(subnet);
        Ok((name, Ipv4Addr::from(base + 2)))
    }

    async fn create_network(&self, name: &str) -> Result<(), DockerError> {
        // A /28 in 10.213.0.0/16 picked from the node id, then the next
        // ones while the engine reports an overlap.
        let seed = u32::from_str_radix(&self.node_id[..4], 16).unwrap_or(0);
        let mut last = None;
        for attempt in 0..SUBNET_ATTEMPTS {
            let block = (seed + attempt) % 4096;
            let subnet = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 213, 0, 0)) + block * 16);
            let request = NetworkCreateRequest {
                name: name.to_string(),
                driver: Some("bridge".into()),
                internal: Some(true),
                labels: Some(self.labels()),
                options: Some(HashMap::from([(
                    "com.docker.network.bridge.enable_ip_masquerade".to_string(),
                    "false".to_string(),
                )])),
                ipam: Some(Ipam {
                    config: Some(vec![IpamConfig {
                        subnet: Some(format!("{subnet}/28")),
                        gateway: Some(Ipv4Addr::from(u32::from(subnet) + 1).to_string()),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            };
            match self.docker.create_network(request).await {
                Ok(_) => {
                    info!(network = name, %subnet, "docker: created the internal network (no masquerade)");
                    return Ok(());
                }
                Err(e) if e.to_string().contains("overlap") => last = Some(e),
                Err(e) => return Err(api("create network")(e)),
            }
        }
        Err(api("create network")(last.expect("at least one attempt")))
    }

    /// Whether the host reaches the container's address: a refused or
    /// accepted connection says yes; silence or "unreachable" says the
    /// engine isolates internal bridges from the host.
    async fn host_reaches(&self, address: Ipv4Addr) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            let attempt = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::net::TcpStream::connect((address, self.port)),
            )
            .await;
            match attempt {
                Ok(Ok(_)) => return true,
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => return true,
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        false
    }

    async fn ensure_image(&self) -> Result<(), DockerError> {
        match self.docker.inspect_image(&self.image).await {
            Ok(_) => {
                info!(image = %self.image, "docker: image present, using it");
                return Ok(());
            }
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(api("inspect image")(e)),
        }
        info!(image = %self.image, "docker: image absent, pulling it");
        let options = CreateImageOptionsBuilder::new()
            .from_image(&self.image)
            .build();
        let mut pull = self.docker.create_image(Some(options), None, None);
        let mut last = String::new();
        while let Some(step) = pull.next().await {
            let step = step.map_err(|e| DockerError::Pull {
                image: self.image.clone(),
                reason: e.to_string(),
            })?;
            if let Some(detail) = step.error_detail.and_then(|d| d.message) {
                return Err(DockerError::Pull {
                    image: self.image.clone(),
                    reason: detail,
                });
            }
            // One line per layer state change, not one per progress tick.
            let status = step.status.unwrap_or_default();
            let line = format!("{} {status}", step.id.unwrap_or_default());
            if line != last {
                info!(image = %self.image, progress = %line.trim(), "docker: pulling");
                last = line;
            }
        }
        info!(image = %self.image, "docker: image pulled");
        Ok(())
    }

    fn labels(&self) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_MANAGED.to_string(), "true".to_string()),
            (LABEL_NODE.to_string(), self.node_id.clone()),
        ])
    }

    async fn ensure_volume(&self) -> Result<(), DockerError> {
        match self.docker.inspect_volume(&self.names.volume).await {
            Ok(volume) => {
                if volume.labels.get(LABEL_NODE) != Some(&self.node_id) {
                    return Err(DockerError::Foreign {
                        name: self.names.volume.clone(),
                    });
                }
                Ok(())
            }
            Err(e) if not_found(&e) => {
                info!(volume = %self.names.volume, "docker: creating the data volume");
                self.docker
                    .create_volume(VolumeCreateRequest {
                        name: Some(self.names.volume.clone()),
                        labels: Some(self.labels()),
                        ..Default::default()
                    })
                    .await
                    .map_err(api("create volume"))?;
                Ok(())
            }
            Err(e) => Err(api("inspect volume")(e)),
        }
    }

    /// What keepd needs to know of the image, read from a container
    /// created (never started) from it: the UID and GID the containers run
    /// as (keepd's own when keepd is not root, since Postgres refuses root,
    /// else the image's `postgres` user from its /etc/passwd), whether it
    /// carries pgAudit beside the server on its PATH, and, with backups on,
    /// that it carries pgBackRest (the archive command runs inside).
    async fn probe_image(&self) -> Result<ImageFacts, DockerError> {
        let probe = &self.names.probe;
        self.remove_if_ours(probe).await?;
        self.create(probe, vec!["true".into()], false, Role::Probe)
            .await?;
        let facts = self.read_image_facts(probe).await;
        self.remove_if_ours(probe).await?;
        facts
    }

    async fn read_image_facts(&self, probe: &str) -> Result<ImageFacts, DockerError> {
        let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
        let user = if uid.is_root() {
            let passwd = self
                .download(probe, "/etc/passwd")
                .await
                .map_err(api("read /etc/passwd from the image"))?;
            passwd
                .as_deref()
                .and_then(|p| postgres_ids(&String::from_utf8_lossy(p)))
                .map(|(uid, gid)| ContainerUser { uid, gid })
                .ok_or_else(|| DockerError::NoPostgresUser {
                    image: self.image.clone(),
                })?
        } else {
            ContainerUser {
                uid: uid.as_raw(),
                gid: gid.as_raw(),
            }
        };
        let image = self
            .docker
            .inspect_image(&self.image)
            .await
            .map_err(api("inspect image"))?;
        let path = image
            .config
            .and_then(|c| c.env)
            .unwrap_or_default()
            .into_iter()
            .find_map(|e| e.strip_prefix("PATH=").map(str::to_owned))
            .unwrap_or_default();
        let mut pgaudit = false;
        if let Some(lib) = server_lib_dir(&path) {
            pgaudit = self
                .download(probe, &format!("{lib}/pgaudit.so"))
                .await
                .map_err(api("look for pgaudit in the image"))?
                .is_some();
        }
        // A binary of megabytes: fetched only when backups need it.
        if self.backup.is_some()
            && self
                .download(probe, PGBACKREST)
                .await
                .map_err(api("look for pgBackRest in the image"))?
                .is_none()
        {
            return Err(DockerError::NoPgBackRest {
                image: self.image.clone(),
            });
        }
        Ok(ImageFacts { user, pgaudit })
    }

    /// One file of a container's filesystem, None when it is absent.
    async fn download(
        &self,
        container: &str,
        path: &str,
    ) -> Result<Option<Vec<u8>>, bollard::errors::Error> {
        let mut tar = Vec::new();
        let mut download = self.docker.download_from_container(
            container,
            Some(
                DownloadFromContainerOptionsBuilder::new()
                    .path(path)
                    .build(),
            ),
        );
        while let Some(chunk) = download.next().await {
            match chunk {
                Ok(bytes) => tar.extend_from_slice(&bytes),
                Err(e) if not_found(&e) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        Ok(single_file_of_tar(&tar))
    }

    /// Writes the rendered files for the read-only mount and prepares the
    /// socket directory the container shares with keepd.
    fn install(&self, rendered: &RenderedConfig, user: ContainerUser) -> Result<(), DockerError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| DockerError::Io { path, source }
        };
        // The files hold no secret; the container's user must read them.
        fsutil::ensure_dir_mode(&self.conf_dir, 0o755).map_err(io(&self.conf_dir))?;
        let pgbackrest = rendered
            .pgbackrest_conf
            .as_deref()
            .map(|conf| (PGBACKREST_CONF, conf));
        for (name, text) in rendered.server_files().into_iter().chain(pgbackrest) {
            let path = self.conf_dir.join(name);
            fsutil::write_atomic(&path, text.as_bytes(), None).map_err(io(&path))?;
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
                .map_err(io(&path))?;
        }
        if let Some(BackupMounts { repository, .. }) = &self.backup {
            // The container's user writes the archive and the backups.
            fsutil::ensure_private_dir(repository).map_err(io(repository))?;
            nix::unistd::chown(
                repository,
                Some(nix::unistd::Uid::from_raw(user.uid)),
                Some(nix::unistd::Gid::from_raw(user.gid)),
            )
            .map_err(|e| io(repository)(e.into()))?;
        }
        fsutil::ensure_private_dir(&self.socket_dir).map_err(io(&self.socket_dir))?;
        nix::unistd::chown(
            &self.socket_dir,
            Some(nix::unistd::Uid::from_raw(user.uid)),
            Some(nix::unistd::Gid::from_raw(user.gid)),
        )
        .map_err(|e| io(&self.socket_dir)(e.into()))?;
        Ok(())
    }

    /// The hardened host configuration every keepd container gets; only
    /// the server joins the internal network in TCP mode.
    fn host_config(&self, network: Option<&InternalNetwork>) -> HostConfig {
        let mut binds = vec![
            format!("{}:{CONF_MOUNT}:ro", self.conf_dir.display()),
            format!("{}:{SOCKET_MOUNT}:rw", self.socket_dir.display()),
            format!("{}:{DATA_MOUNT}:rw", self.names.volume),
        ];
        if let Some(backup) = &self.backup {
            binds.push(format!("{}:{REPOSITORY}:rw", backup.repository.display()));
        }
        let network = match network {
            Some(net) => {
                binds.push(format!("{}:{TLS_MOUNT}:ro", net.tls_dir.display()));
                net.name.clone()
            }
            None => "none".to_string(),
        };
        HostConfig {
            binds: Some(binds),
            network_mode: Some(network),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            readonly_rootfs: Some(true),
            tmpfs: Some(HashMap::from([(
                "/tmp".to_string(),
                "rw,noexec,nosuid,nodev,size=64m".to_string(),
            )])),
            memory: Some(self.memory_bytes),
            pids_limit: Some(self.pids_limit),
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            }),
            publish_all_ports: Some(false),
            privileged: Some(false),
            ..Default::default()
        }
    }

    async fn create(
        &self,
        name: &str,
        cmd: Vec<String>,
        stdin: bool,
        role: Role<'_>,
    ) -> Result<(), DockerError> {
        let mut labels = self.labels();
        let (user, network) = match role {
            Role::Probe => ("postgres".to_string(), None),
            Role::OneOff(user) => (user.to_string(), None),
            Role::Server(user, network) => {
                labels.insert(LABEL_CONFIG.to_string(), self.fingerprint.clone());
                (user.to_string(), network)
            }
        };
        let mut env = vec![format!("PGDATA={PGDATA}"), "LC_ALL=C".into()];
        // The archive command (server) and a restore (one-off) read the
        // repository's passphrase and key from their environment.
        if let (Role::Server(..) | Role::OneOff(_), Some(backup)) = (&role, &self.backup) {
            env.extend(backup.env.docker_env());
        }
        let body = ContainerCreateBody {
            image: Some(self.image.clone()),
            user: Some(user),
            // The official image's entrypoint would re-run its own setup.
            entrypoint: Some(vec![]),
            cmd: Some(cmd),
            env: Some(env),
            labels: Some(labels),
            open_stdin: Some(stdin),
            stdin_once: Some(stdin),
            attach_stdin: Some(stdin),
            stop_signal: Some("SIGINT".into()),
            network_disabled: Some(network.is_none()),
            networking_config: network.map(|net| NetworkingConfig {
                endpoints_config: Some(HashMap::from([(
                    net.name.clone(),
                    EndpointSettings {
                        ipam_config: Some(EndpointIpamConfig {
                            ipv4_address: Some(net.address.to_string()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                )])),
            }),
            host_config: Some(self.host_config(network)),
            ..Default::default()
        };
        self.docker
            .create_container(
                Some(CreateContainerOptionsBuilder::new().name(name).build()),
                body,
            )
            .await
            .map_err(api("create container"))?;
        Ok(())
    }

    /// Removes `name` if it exists and carries this node's label; a
    /// container of the same name that is not ours is an error.
    async fn remove_if_ours(&self, name: &str) -> Result<(), DockerError> {
        match self.docker.inspect_container(name, None).await {
            Ok(found) => {
                let ours = found
                    .config
                    .and_then(|c| c.labels)
                    .is_some_and(|l| l.get(LABEL_NODE) == Some(&self.node_id));
                if !ours {
                    return Err(DockerError::Foreign {
                        name: name.to_string(),
                    });
                }
                self.docker
                    .remove_container(
                        name,
                        Some(RemoveContainerOptionsBuilder::new().force(true).build()),
                    )
                    .await
                    .map_err(api("remove container"))
            }
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(api("inspect container")(e)),
        }
    }
}

impl DockerCluster {
    /// Everything up to (not including) starting the server container.
    /// Renders the configuration for what the image carries.
    pub async fn prepare(
        config: &Config,
        inputs: RenderInputs,
        node_id: &str,
        verifier: &ScramVerifier,
        archive_env: RepositoryEnv,
    ) -> Result<(DockerCluster, RenderedConfig), DockerError> {
        let settings = &config.database.postgres.docker;
        let docker = Docker::connect_with_local_defaults().map_err(|e| DockerError::Engine {
            reason: e.to_string(),
        })?;
        docker.ping().await.map_err(|e| DockerError::Engine {
            reason: e.to_string(),
        })?;
        let layout = Layout::of(config);
        let mut engine = Engine {
            docker,
            image: settings.image.clone(),
            node_id: node_id.to_string(),
            names: DockerNames::for_node(node_id),
            conf_dir: layout.docker_conf_dir(),
            socket_dir: layout.socket_dir(),
            port: config.network.port,
            memory_bytes: i64::from(settings.memory_mb) * 1024 * 1024,
            pids_limit: i64::from(settings.pids_limit),
            fingerprint: String::new(),
            backup: config
                .backup
                .repository
                .clone()
                .map(|repository| BackupMounts {
                    repository,
                    env: archive_env,
                }),
        };
        engine.ensure_image().await?;
        engine.ensure_volume().await?;
        let ImageFacts { user, pgaudit } = engine.probe_image().await?;
        if !pgaudit {
            warn!(image = %engine.image, "docker: the image carries no pgAudit; Postgres runs without it (the security report's audit.pgaudit)");
        }
        let rendered = super::render::render(&inputs.with_pgaudit(pgaudit))?;
        engine.fingerprint = rendered.fingerprint();
        engine.install(&rendered, user)?;
        let mut tcp = None;
        if Topology::of(config).is_tcp() {
            let (name, address) = engine.ensure_network().await?;
            let pki = Arc::new(
                NodePki::ensure(
                    &config.node.state_dir,
                    node_id,
                    &[IpAddr::V4(address)],
                    std::time::SystemTime::now(),
                )?
                .with_client_lifetime(config.credentials.rotation_interval.get()),
            );
            let tls_dir = layout.docker_tls_dir();
            install_tls(&tls_dir, &pki, user)?;
            // `keepd psql` and `keepd audit verify` read where to connect.
            let marker = layout.docker_address_file();
            fsutil::write_atomic(&marker, address.to_string().as_bytes(), None).map_err(
                |source| DockerError::Io {
                    path: marker.clone(),
                    source,
                },
            )?;
            tcp = Some(InternalNetwork {
                name,
                address,
                tls_dir,
                superuser_tls: Tls::for_role(&pki, SUPERUSER)?,
                pki,
            });
        }
        let cluster = DockerCluster {
            engine,
            user,
            tcp,
            start_timeout: settings.start_timeout.get(),
            shutdown_timeout: settings.shutdown_timeout.get(),
        };
        if !cluster.running().await? {
            cluster.initdb().await?;
            cluster.set_superuser_verifier(verifier).await?;
        }
        cluster.ensure_container().await?;
        Ok((cluster, rendered))
    }

    pub fn container_name(&self) -> &str {
        &self.engine.names.container
    }

    /// Installs a renewed server certificate (TCP mode); a reload applies it.
    pub fn install_server_tls(&self, pki: &NodePki) -> Result<(), DockerError> {
        let Some(net) = &self.tcp else {
            return Ok(());
        };
        install_tls(&net.tls_dir, pki, self.user)
    }

    /// The container's address in TCP mode.
    pub fn tls_address(&self) -> Option<IpAddr> {
        self.tcp.as_ref().map(|net| IpAddr::V4(net.address))
    }

    /// The node PKI in TCP mode (login roles get client certificates).
    pub fn pki(&self) -> Option<Arc<NodePki>> {
        self.tcp.as_ref().map(|net| net.pki.clone())
    }

    pub fn superuser_endpoint(&self, password: &SecretString, dbname: &str) -> Endpoint {
        let (address, tls) = match &self.tcp {
            Some(net) => (
                PgAddress::Tcp(IpAddr::V4(net.address)),
                net.superuser_tls.clone(),
            ),
            None => (PgAddress::Socket(self.engine.socket_dir.clone()), Tls::Off),
        };
        endpoint(&address, self.engine.port, SUPERUSER, password, dbname, tls)
    }

    /// Runs `cmd` in a one-off hardened container on the data volume,
    /// feeding it `input` on stdin; returns its output, or an error with
    /// the output when it exits non-zero.
    async fn one_off(
        &self,
        what: &'static str,
        cmd: Vec<String>,
        input: Option<&[u8]>,
    ) -> Result<String, DockerError> {
        let name = &self.engine.names.one_off;
        self.engine.remove_if_ours(name).await?;
        self.engine
            .create(name, cmd, input.is_some(), Role::OneOff(self.user))
            .await?;
        let options = AttachContainerOptionsBuilder::new()
            .stdin(input.is_some())
            .stdout(true)
            .stderr(true)
            .stream(true)
            .build();
        let attached = self
            .engine
            .docker
            .attach_container(name, Some(options))
            .await
            .map_err(api("attach"))?;
        self.engine
            .docker
            .start_container(name, None)
            .await
            .map_err(api("start one-off container"))?;
        let mut stdin = attached.input;
        if let Some(input) = input {
            let fed = async {
                stdin.write_all(input).await?;
                stdin.shutdown().await
            };
            if let Err(e) = fed.await {
                warn!(error = %e, what, "docker: writing to the one-off container's stdin failed");
            }
        }
        drop(stdin);
        let mut output = String::new();
        let mut stream = attached.output;
        while let Some(Ok(chunk)) = stream.next().await {
            output.push_str(&chunk.to_string());
        }
        let code = match self.engine.docker.wait_container(name, None).next().await {
            Some(Ok(done)) => done.status_code,
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => code,
            Some(Err(e)) => return Err(api("wait for one-off container")(e)),
            None => -1,
        };
        self.engine.remove_if_ours(name).await?;
        if code != 0 {
            return Err(DockerError::OneOff { what, code, output });
        }
        Ok(output)
    }

    /// Runs `cmd` in a one-off container on the data volume (with the
    /// backup repository and its environment when backups are on).
    pub async fn run_one_off(
        &self,
        what: &'static str,
        cmd: Vec<String>,
    ) -> Result<String, DockerError> {
        self.one_off(what, cmd, None).await
    }

    /// initdb on the volume when it holds no cluster yet, into a scratch
    /// directory renamed into place, so a crash leaves no half cluster.
    async fn initdb(&self) -> Result<(), DockerError> {
        let scratch = format!("{PGDATA}.initdb");
        let script = format!(
            "set -e\n\
             if [ -s {PGDATA}/PG_VERSION ]; then exit 0; fi\n\
             if [ -e {PGDATA} ]; then echo '{PGDATA} exists but is not a cluster' >&2; exit 3; fi\n\
             rm -rf {scratch}\n\
             echo initdb-running\n\
             initdb -D {scratch} {}\n\
             mv {scratch} {PGDATA}\n",
            INITDB_ARGS.join(" ")
        );
        let started = std::time::Instant::now();
        let output = self
            .one_off("initdb", vec!["sh".into(), "-c".into(), script], None)
            .await?;
        if output.contains("initdb-running") {
            info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                volume = %self.engine.names.volume,
                "docker: initdb created the cluster (checksums on)"
            );
        }
        Ok(())
    }

    /// Sets the superuser's SCRAM verifier in single-user mode; the
    /// statement travels over the container's stdin, never in a file,
    /// argument or environment variable, and is not logged.
    async fn set_superuser_verifier(&self, verifier: &ScramVerifier) -> Result<(), DockerError> {
        let statement = superuser_verifier_statement(verifier);
        let cmd = ["postgres", "--single", "-D", PGDATA]
            .into_iter()
            .chain(SINGLE_USER_ARGS)
            .chain(["postgres"]);
        self.one_off(
            "postgres --single (setting the superuser verifier)",
            cmd.map(str::to_string).collect(),
            Some(statement.as_bytes()),
        )
        .await?;
        Ok(())
    }

    pub async fn running(&self) -> Result<bool, DockerError> {
        match self.inspect().await {
            Ok(found) => Ok(found.state.and_then(|s| s.running).unwrap_or(false)),
            Err(e) if not_found(&e) => Ok(false),
            Err(e) => Err(api("inspect container")(e)),
        }
    }

    /// The server container: adopted when it is ours with the current
    /// configuration, recreated when the rendered configuration changed,
    /// created when missing. Never started here.
    /// The server container as the engine sees it now.
    async fn inspect(
        &self,
    ) -> Result<bollard::models::ContainerInspectResponse, bollard::errors::Error> {
        self.engine
            .docker
            .inspect_container(&self.engine.names.container, None)
            .await
    }

    pub async fn ensure_container(&self) -> Result<(), DockerError> {
        self.reconcile_container(true).await
    }

    async fn reconcile_container(&self, announce: bool) -> Result<(), DockerError> {
        match self.inspect().await {
            Ok(found) => {
                let labels = found.config.and_then(|c| c.labels).unwrap_or_default();
                if labels.get(LABEL_NODE) != Some(&self.engine.node_id) {
                    return Err(DockerError::Foreign {
                        name: self.engine.names.container.clone(),
                    });
                }
                if labels.get(LABEL_CONFIG) == Some(&self.engine.fingerprint) {
                    if announce {
                        info!(container = %self.engine.names.container, "docker: adopting the existing container");
                    }
                    return Ok(());
                }
                info!(container = %self.engine.names.container, "docker: the rendered configuration changed; recreating the container");
                self.stop().await;
                self.engine
                    .remove_if_ours(&self.engine.names.container)
                    .await?;
            }
            Err(e) if !not_found(&e) => return Err(api("inspect container")(e)),
            Err(_) => {}
        }
        let cmd = [
            "postgres",
            "-D",
            PGDATA,
            "-c",
            &format!("config_file={CONF_MOUNT}/postgresql.conf"),
            "-c",
            &format!("hba_file={CONF_MOUNT}/pg_hba.conf"),
            "-c",
            &format!("ident_file={CONF_MOUNT}/pg_ident.conf"),
        ];
        self.engine
            .create(
                &self.engine.names.container,
                cmd.iter().map(|s| s.to_string()).collect(),
                false,
                Role::Server(self.user, self.tcp.as_ref()),
            )
            .await?;
        info!(container = %self.engine.names.container, "docker: container created");
        Ok(())
    }

    /// Starts the server container unless it runs already (adopted); in
    /// TCP mode checks the host can reach it at all.
    pub async fn start(&self) -> Result<(), DockerError> {
        self.reconcile_container(false).await?;
        if !self.running().await? {
            self.engine
                .docker
                .start_container(&self.engine.names.container, None)
                .await
                .map_err(api("start container"))?;
        }
        if let Some(net) = &self.tcp
            && !self.engine.host_reaches(net.address).await
        {
            return Err(DockerError::Unreachable {
                network: net.name.clone(),
                address: net.address,
            });
        }
        Ok(())
    }

    /// Why the server container is not running, or None while it runs.
    pub async fn exited(&self) -> Option<String> {
        match self.inspect().await {
            Ok(found) => {
                let state = found.state.unwrap_or_default();
                if state.running.unwrap_or(false) {
                    None
                } else {
                    Some(format!(
                        "container {} exited with code {}{}",
                        self.engine.names.container,
                        state.exit_code.unwrap_or(-1),
                        if state.oom_killed.unwrap_or(false) {
                            " (out of memory)"
                        } else {
                            ""
                        }
                    ))
                }
            }
            Err(e) if not_found(&e) => {
                Some(format!("container {} is gone", self.engine.names.container))
            }
            // The engine is unreachable: nothing is known to have died.
            Err(_) => None,
        }
    }

    /// Stops the server container (fast shutdown, then kill); the data
    /// volume stays.
    pub async fn stop(&self) {
        let seconds = self.shutdown_timeout.as_secs().clamp(1, i32::MAX as u64) as i32;
        let options = StopContainerOptionsBuilder::new().t(seconds).build();
        if let Err(e) = self
            .engine
            .docker
            .stop_container(&self.engine.names.container, Some(options))
            .await
            && !not_found(&e)
        {
            warn!(error = %e, container = %self.engine.names.container, "docker: stopping the container failed");
        }
    }

    /// The last lines the server container wrote (for start failures).
    pub async fn recent_output(&self) -> String {
        let options = LogsOptionsBuilder::new()
            .stdout(true)
            .stderr(true)
            .tail("20")
            .build();
        let mut logs = self
            .engine
            .docker
            .logs(&self.engine.names.container, Some(options));
        let mut text = String::new();
        while let Some(Ok(chunk)) = logs.next().await {
            text.push_str(&chunk.to_string());
        }
        text
    }

    /// The container's security-relevant settings as the engine reports them.
    pub async fn facts(&self) -> Result<ContainerFacts, DockerError> {
        facts_of(&self.engine.docker, &self.engine.names.container).await
    }
}

/// The server certificate, its key and the CA for the container: a
/// 0700 directory owned by the container's user, files 0600.
fn install_tls(dir: &Path, pki: &NodePki, user: ContainerUser) -> Result<(), DockerError> {
    let (uid, gid) = (user.uid, user.gid);
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| DockerError::Io { path, source }
    };
    fsutil::ensure_private_dir(dir).map_err(io(dir))?;
    for (name, text) in pki.server_files() {
        let path = dir.join(name);
        fsutil::write_atomic(&path, text.as_bytes(), Some((uid, gid))).map_err(io(&path))?;
    }
    nix::unistd::chown(
        dir,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )
    .map_err(|e| io(dir)(e.into()))
}

/// Runs `cmd` with `env` in node `node_id`'s running server container
/// (`docker exec`, as the container's user): its exit code and output,
/// each piece also printed as it comes when `echo` (a long backup's
/// progress).
pub async fn exec_in_server(
    node_id: &str,
    cmd: Vec<String>,
    env: Vec<String>,
    echo: bool,
) -> Result<(i64, String), DockerError> {
    let docker = Docker::connect_with_local_defaults().map_err(|e| DockerError::Engine {
        reason: e.to_string(),
    })?;
    let container = DockerNames::for_node(node_id).container;
    let config = bollard::models::ExecConfig {
        cmd: Some(cmd),
        env: Some(env),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        ..Default::default()
    };
    let created = docker.create_exec(&container, config).await.map_err(api(
        "create an exec in the server container (is keepd running?)",
    ))?;
    let mut output = String::new();
    if let bollard::exec::StartExecResults::Attached {
        output: mut stream, ..
    } = docker
        .start_exec(&created.id, None)
        .await
        .map_err(api("start an exec"))?
    {
        while let Some(Ok(chunk)) = stream.next().await {
            let text = chunk.to_string();
            if echo {
                print!("{text}");
            }
            output.push_str(&text);
        }
    }
    let code = docker
        .inspect_exec(&created.id)
        .await
        .map_err(api("inspect an exec"))?
        .exit_code
        .unwrap_or(-1);
    Ok((code, output))
}

/// The security-relevant settings of node `node_id`'s container, from the
/// engine (for `keepd report`).
pub async fn container_facts(node_id: &str) -> Result<ContainerFacts, DockerError> {
    let docker = Docker::connect_with_local_defaults().map_err(|e| DockerError::Engine {
        reason: e.to_string(),
    })?;
    facts_of(&docker, &DockerNames::for_node(node_id).container).await
}

async fn facts_of(docker: &Docker, container: &str) -> Result<ContainerFacts, DockerError> {
    let found = docker
        .inspect_container(container, None)
        .await
        .map_err(api("inspect container"))?;
    let host = found.host_config.unwrap_or_default();
    let published_ports = host
        .port_bindings
        .unwrap_or_default()
        .values()
        .map(|b| b.as_ref().map_or(0, Vec::len))
        .sum();
    Ok(ContainerFacts {
        name: container.to_string(),
        id: found.id.unwrap_or_default(),
        user: found.config.and_then(|c| c.user).unwrap_or_default(),
        network_mode: host.network_mode.unwrap_or_default(),
        cap_drop: host.cap_drop.unwrap_or_default(),
        cap_add: host.cap_add.unwrap_or_default(),
        readonly_rootfs: host.readonly_rootfs.unwrap_or(false),
        security_opt: host.security_opt.unwrap_or_default(),
        published_ports,
        privileged: host.privileged.unwrap_or(false),
    })
}

/// The contents of the first entry in a tar archive (what the engine sends
/// for one path: a file's bytes, nothing for a link). The `tar` crate
/// reads GNU long names and PAX extended headers (a size beyond the ustar
/// field's 8 GiB included); None for an archive it cannot read.
fn single_file_of_tar(tar: &[u8]) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut archive = tar::Archive::new(tar);
    let mut entry = archive
        .entries()
        .ok()?
        .map_while(Result::ok)
        .find(|e| !e.header().entry_type().is_pax_global_extensions())?;
    let mut contents = Vec::new();
    entry.read_to_end(&mut contents).ok()?;
    // An archive cut short reads as fewer bytes, not as an error.
    (contents.len() as u64 == entry.size()).then_some(contents)
}

/// The server's library directory, from a PATH that names its binaries
/// (`/usr/lib/postgresql/N/bin`, as the official and Debian images do).
fn server_lib_dir(path: &str) -> Option<String> {
    path.split(':').find_map(|dir| {
        let major = dir
            .strip_prefix("/usr/lib/postgresql/")?
            .strip_suffix("/bin")?;
        major
            .chars()
            .all(|c| c.is_ascii_digit())
            .then(|| format!("/usr/lib/postgresql/{major}/lib"))
    })
}

/// What `Engine::probe_image` found.
struct ImageFacts {
    user: ContainerUser,
    pgaudit: bool,
}

/// The UID and GID of `postgres` in a passwd file.
fn postgres_ids(passwd: &str) -> Option<(u32, u32)> {
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() >= 4 && fields[0] == "postgres")
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_postgres_user_from_a_tarred_passwd() {
        let passwd =
            b"root:x:0:0:root:/root:/bin/sh\npostgres:x:999:998::/var/lib/postgresql:/bin/sh\n";
        let tar = tarred("passwd", passwd, None);
        let file = single_file_of_tar(&tar).unwrap();
        assert_eq!(file, passwd);
        assert_eq!(
            postgres_ids(&String::from_utf8_lossy(&file)),
            Some((999, 998))
        );
        assert_eq!(postgres_ids("root:x:0:0::/:/bin/sh\n"), None);
        assert_eq!(single_file_of_tar(&tar[..100]), None);
        assert_eq!(single_file_of_tar(&tar[..540]), None, "cut short");
    }

    #[test]
    fn reads_a_file_behind_long_names_and_pax_headers() {
        let long = format!("usr/lib/postgresql/17/lib/{}/pgaudit.so", "x".repeat(120));
        let contents = b"\x7fELF and the rest";
        // GNU: a long name in an `L` entry before the file's header.
        let gnu = tarred(&long, contents, None);
        assert_eq!(single_file_of_tar(&gnu).unwrap(), contents);
        // PAX: a global header, then the path in a local extended header.
        let pax = tarred(&long, contents, Some(("path", long.as_str())));
        assert_eq!(single_file_of_tar(&pax).unwrap(), contents);
        // A link (the engine sends the link itself): present, no bytes.
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        builder
            .append_link(&mut header, "pgaudit.so", "pgaudit.so.17")
            .unwrap();
        let link = builder.into_inner().unwrap();
        assert_eq!(single_file_of_tar(&link).unwrap(), b"");
        assert_eq!(single_file_of_tar(&[0; 1024]), None, "no entry");
    }

    /// A one-file archive as the engine builds it; `pax` puts a global
    /// PAX header and a local one carrying that record first.
    fn tarred(path: &str, contents: &[u8], pax: Option<(&str, &str)>) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        if let Some((key, value)) = pax {
            let record = |key: &str, value: &str| {
                let body = format!(" {key}={value}\n");
                // The length counts its own digits.
                let mut n = body.len() + 1;
                while format!("{n}{body}").len() != n {
                    n += 1;
                }
                format!("{n}{body}").into_bytes()
            };
            for (kind, record) in [
                (
                    tar::EntryType::XGlobalHeader,
                    record("comment", "keepd test"),
                ),
                (tar::EntryType::XHeader, record(key, value)),
            ] {
                let mut header = tar::Header::new_ustar();
                header.set_entry_type(kind);
                header.set_size(record.len() as u64);
                header.set_path("pax_header").unwrap();
                header.set_cksum();
                builder.append(&header, record.as_slice()).unwrap();
            }
            let mut header = tar::Header::new_ustar();
            header.set_size(contents.len() as u64);
            header.set_path("short-name").unwrap();
            header.set_cksum();
            builder.append(&header, contents).unwrap();
        } else {
            let mut header = tar::Header::new_gnu();
            header.set_size(contents.len() as u64);
            builder.append_data(&mut header, path, contents).unwrap();
        }
        builder.into_inner().unwrap()
    }
}
