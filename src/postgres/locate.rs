//! Where keepd's Postgres is, for a command that did not start it (`keepd
//! psql`, `report`, `audit verify`, `cluster ...`): the address, port and
//! TLS the daemon's provider uses, found from the configuration and what
//! the running daemon recorded, without starting or changing anything.
//! Together with `Server::superuser_endpoint` (the daemon's view) it is
//! the one place outside the providers that knows where each provider's
//! server listens.

use std::path::PathBuf;
use std::sync::Arc;

use super::external::{ExternalError, ExternalServer};
use super::render::socket_dir;
use super::tls::{Endpoint, Tls, TlsError};
use super::{PgAddress, SUPERUSER, endpoint};
use crate::config::{Config, Layout, Provider, Topology};
use crate::pki::{NodePki, PkiError};
use crate::secrets::values::SecretString;

#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    #[error(
        "keepd's Postgres container has no recorded address under {0}: is `keepd run` running \
         on this node?"
    )]
    NotRunning(PathBuf),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    External(#[from] ExternalError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// What `keepd render` writes: the provider's inputs as the daemon would
/// render them (natively, memory as measured here and pgAudit only where
/// the host's binaries carry it; an image or an external server is not
/// looked at).
pub fn render_inputs(config: &Config) -> super::render::RenderInputs {
    let inputs = super::render::RenderInputs::of(config);
    match config.database.postgres.provider {
        Provider::Native => {
            let inputs = match super::tuning::host_memory() {
                Some((bytes, _)) => inputs.with_memory(bytes),
                None => inputs,
            };
            match super::native::pgaudit_installed(config) {
                Some(pgaudit) => inputs.with_pgaudit(pgaudit),
                None => inputs,
            }
        }
        Provider::Docker | Provider::External => inputs,
    }
}

/// A node's Postgres as the CLI reaches it.
pub struct Located {
    pub address: PgAddress,
    /// The port, or libpq's list of ports (an external server's hosts).
    pub ports: String,
    port: u16,
    /// TCP mode on keepd's own server: the node PKI, read only (the
    /// daemon issues and renews; an operator command never does).
    pub pki: Option<NodePki>,
    /// The external provider's server (keepd's superuser there is its
    /// administrator).
    pub external: Option<ExternalServer>,
}

/// Where node `node_id`'s Postgres listens.
pub fn locate(config: &Config, node_id: &str) -> Result<Located, LocateError> {
    let port = config.network.port;
    if let Provider::External = config.database.postgres.provider {
        let server = ExternalServer::from_config(config)?;
        // libpq's list form: every server, tried in order.
        let targets = config.database.postgres.external.targets();
        let hosts: Vec<&str> = targets.iter().map(|(host, _)| host.as_str()).collect();
        return Ok(Located {
            address: PgAddress::Host(hosts.join(",")),
            ports: server.libpq_ports(),
            port,
            pki: None,
            external: Some(server),
        });
    }
    let located = |address, pki| Located {
        address,
        ports: port.to_string(),
        port,
        pki,
        external: None,
    };
    if !Topology::of(config).is_tcp() {
        // The docker provider's socket directory is a bind mount from
        // runtime_dir; socket_dir names its path inside the container.
        let dir = match config.database.postgres.provider {
            Provider::Docker => Layout::of(config).socket_dir(),
            Provider::Native | Provider::External => socket_dir(config),
        };
        return Ok(located(PgAddress::Socket(dir), None));
    }
    let address = match config.database.postgres.provider {
        // The container has an address of its own, recorded at its start.
        Provider::Docker => std::fs::read_to_string(Layout::of(config).docker_address_file())
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .ok_or_else(|| LocateError::NotRunning(config.node.runtime_dir.clone()))?,
        Provider::Native | Provider::External => config.network.bind_address,
    };
    let pki = NodePki::load(&config.node.state_dir, node_id)?;
    Ok(located(PgAddress::Tcp(address), Some(pki)))
}

/// The container as the engine reports it, for the security report, when
/// node `node_id`'s server runs in one (docker).
pub async fn container_facts(
    config: &Config,
    node_id: &str,
) -> Result<Option<super::docker::ContainerFacts>, super::docker::DockerError> {
    match config.database.postgres.provider {
        Provider::Docker => Ok(Some(super::docker::container_facts(node_id).await?)),
        Provider::Native | Provider::External => Ok(None),
    }
}

impl Located {
    /// keepd's superuser (an external server's administrator) on `dbname`.
    pub fn superuser_endpoint(
        &self,
        password: &SecretString,
        dbname: &str,
    ) -> Result<Endpoint, LocateError> {
        if let Some(server) = &self.external {
            return Ok(server.admin_endpoint(dbname));
        }
        let pki = self.pki.clone().map(Arc::new);
        let tls = Tls::maybe(pki.as_ref(), SUPERUSER)?;
        Ok(endpoint(
            &self.address,
            self.port,
            SUPERUSER,
            password,
            dbname,
            tls,
        ))
    }

    /// Who psql logs in as for `user` with `password`: on an external
    /// server keepd's superuser is the operator's administrator.
    pub fn login(&self, user: String, password: SecretString) -> (String, SecretString) {
        match &self.external {
            Some(server) if user == SUPERUSER => {
                let (name, secret) = server.admin();
                (name.to_string(), secret.clone())
            }
            _ => (user, password),
        }
    }
}
