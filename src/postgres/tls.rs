//! How keepd reaches Postgres: over the Unix socket, or over TCP with TLS
//! 1.3 only, verifying the server against the node CA and presenting a
//! client certificate issued for the role it logs in as.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::client::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_postgres::{Client, Config};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::pki::{NodePki, Pair, PkiError};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("cannot build the TLS client configuration: {0}")]
    Config(String),
}

/// TLS for one role's connections, or none (Unix socket).
#[derive(Clone)]
pub enum Tls {
    Off,
    On(MakeRustlsConnect),
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tls::Off => "Tls::Off",
            Tls::On(_) => "Tls::On",
        })
    }
}

impl Tls {
    /// TLS 1.3 as `role`, with a client certificate issued for it now.
    pub fn for_role(pki: &NodePki, role: &str) -> Result<Tls, TlsError> {
        let client = pki.issue_client(role)?;
        Ok(Tls::On(MakeRustlsConnect::new(client_config(
            &pki.ca.cert_pem,
            Some(&client),
            &[&rustls::version::TLS13],
        )?)))
    }

    /// TLS when `pki` is given (TCP mode), none otherwise.
    pub fn maybe(pki: Option<&NodePki>, role: &str) -> Result<Tls, TlsError> {
        pki.map_or(Ok(Tls::Off), |pki| Tls::for_role(pki, role))
    }
}

/// Where each role's TLS comes from.
#[derive(Clone)]
pub enum TlsSource {
    /// The Unix socket.
    Off,
    /// keepd's own server over TCP: a client certificate per role.
    NodePki(Arc<NodePki>),
    /// An external server: the same verified TLS for every role.
    Shared(Tls),
}

impl TlsSource {
    /// Client certificates from `pki` when keepd issued the server's
    /// certificate, else the Unix socket.
    pub fn from_pki(pki: Option<&Arc<NodePki>>) -> TlsSource {
        pki.map_or(TlsSource::Off, |pki| TlsSource::NodePki(pki.clone()))
    }

    pub fn for_role(&self, role: &str) -> Result<Tls, TlsError> {
        match self {
            TlsSource::Off => Ok(Tls::Off),
            TlsSource::NodePki(pki) => Tls::for_role(pki, role),
            TlsSource::Shared(tls) => Ok(tls.clone()),
        }
    }
}

/// A rustls client configuration trusting only `ca_pem`, offering
/// `versions`, presenting `client` when given.
pub fn client_config(
    ca_pem: &str,
    client: Option<&Pair>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<ClientConfig, TlsError> {
    let bad = |e: &dyn std::fmt::Display| TlsError::Config(e.to_string());
    let mut roots = RootCertStore::empty();
    let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| bad(&e))?;
    roots.add(ca).map_err(|e| bad(&e))?;
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .map_err(|e| bad(&e))?
            .with_root_certificates(roots);
    match client {
        Some(pair) => {
            let cert =
                CertificateDer::from_pem_slice(pair.cert_pem.as_bytes()).map_err(|e| bad(&e))?;
            let key =
                PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes()).map_err(|e| bad(&e))?;
            builder
                .with_client_auth_cert(vec![cert], key)
                .map_err(|e| bad(&e))
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

/// A server and the way to reach it as one role.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub config: Config,
    pub tls: Tls,
}

impl Endpoint {
    /// Connects and drives the connection in a task of its own.
    pub async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        connect(&self.config, &self.tls).await
    }

    /// The same server and credentials, another database.
    pub fn database(&self, dbname: &str) -> Endpoint {
        let mut config = self.config.clone();
        config.dbname(dbname);
        Endpoint {
            config,
            tls: self.tls.clone(),
        }
    }
}

/// Connects with `config` over `tls`; the connection runs in its own task.
pub async fn connect(config: &Config, tls: &Tls) -> Result<Client, tokio_postgres::Error> {
    match tls {
        Tls::Off => {
            let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            Ok(client)
        }
        Tls::On(make) => {
            let (client, connection) = config.connect(make.clone()).await?;
            tokio::spawn(connection);
            Ok(client)
        }
    }
}
