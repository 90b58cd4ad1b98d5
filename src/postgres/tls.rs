//! How keepd reaches Postgres: over the Unix socket, or over TCP with TLS
//! 1.3 only, verifying the server against the node CA and presenting a
//! client certificate issued for the role it logs in as.

use std::sync::Arc;

use rustls::client::{ClientConfig, ResolvesClientCert, WantsClientCert};
use rustls::sign::CertifiedKey;
use rustls::{ConfigBuilder, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config};
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::{info, warn};

use crate::pki::{NodePki, Pair, PkiError};
use crate::secrets::values::SharedPassword;

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
    /// TLS 1.3 as `role`, presenting a client certificate issued for it
    /// now and re-issued in memory before it expires.
    pub fn for_role(pki: &Arc<NodePki>, role: &str) -> Result<Tls, TlsError> {
        let resolver = RenewingClientCert::new(pki.clone(), role)?;
        let config = roots(&pki.ca.cert_pem, &[&rustls::version::TLS13])?
            .with_client_cert_resolver(Arc::new(resolver));
        Ok(Tls::On(MakeRustlsConnect::new(config)))
    }

    /// TLS when `pki` is given (TCP mode), none otherwise.
    pub fn maybe(pki: Option<&Arc<NodePki>>, role: &str) -> Result<Tls, TlsError> {
        pki.map_or(Ok(Tls::Off), |pki| Tls::for_role(pki, role))
    }
}

/// A role's client certificate for every new connection: issued in
/// memory, and issued again once less than a third of its life is left,
/// so a pool that runs for weeks never presents an expired one (the
/// certificates live a day; Postgres checks them at connect only).
struct RenewingClientCert {
    pki: Arc<NodePki>,
    role: String,
    current: std::sync::Mutex<(Arc<CertifiedKey>, u64)>,
}

impl std::fmt::Debug for RenewingClientCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RenewingClientCert({})", self.role)
    }
}

impl RenewingClientCert {
    fn new(pki: Arc<NodePki>, role: &str) -> Result<RenewingClientCert, TlsError> {
        let current = issue(&pki, role)?;
        Ok(RenewingClientCert {
            pki,
            role: role.to_string(),
            current: std::sync::Mutex::new(current),
        })
    }
}

/// A certificate for `role` and when to replace it.
fn issue(pki: &NodePki, role: &str) -> Result<(Arc<CertifiedKey>, u64), TlsError> {
    let bad = |e: &dyn std::fmt::Display| TlsError::Config(e.to_string());
    let pair = pki.issue_client(role)?;
    let cert = CertificateDer::from_pem_slice(pair.cert_pem.as_bytes()).map_err(|e| bad(&e))?;
    let key = PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes()).map_err(|e| bad(&e))?;
    let signer = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| bad(&e))?;
    let not_after = crate::pki::validity(&pair.cert_pem).map_or(0, |v| v.not_after);
    let renew_at = not_after.saturating_sub(pki.client_lifetime().as_secs() / 3);
    Ok((Arc::new(CertifiedKey::new(vec![cert], signer)), renew_at))
}

impl ResolvesClientCert for RenewingClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if crate::clock::unix_now() >= current.1 {
            match issue(&self.pki, &self.role) {
                Ok(renewed) => {
                    *current = renewed;
                    info!(role = %self.role, "pki: client certificate renewed");
                }
                // The current one may still have hours left.
                Err(e) => {
                    warn!(role = %self.role, error = %e, "pki: cannot renew the client certificate")
                }
            }
        }
        Some(current.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
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
/// `versions`, up to its client certificate.
fn roots(
    ca_pem: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<ConfigBuilder<ClientConfig, WantsClientCert>, TlsError> {
    let bad = |e: &dyn std::fmt::Display| TlsError::Config(e.to_string());
    let mut roots = RootCertStore::empty();
    let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| bad(&e))?;
    roots.add(ca).map_err(|e| bad(&e))?;
    Ok(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .map_err(|e| bad(&e))?
            .with_root_certificates(roots),
    )
}

/// A rustls client configuration trusting only `ca_pem`, offering
/// `versions`, presenting `client` when given.
pub fn client_config(
    ca_pem: &str,
    client: Option<&Pair>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<ClientConfig, TlsError> {
    let bad = |e: &dyn std::fmt::Display| TlsError::Config(e.to_string());
    let builder = roots(ca_pem, versions)?;
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
    /// The superuser's rotating password, read at each connection (over
    /// the one in `config`).
    pub shared: Option<SharedPassword>,
}

impl Endpoint {
    pub fn new(config: Config, tls: Tls) -> Endpoint {
        Endpoint {
            config,
            tls,
            shared: None,
        }
    }

    /// The same, logging in with `password` as it rotates.
    pub fn sharing(self, password: &SharedPassword) -> Endpoint {
        Endpoint {
            shared: Some(password.clone()),
            ..self
        }
    }

    /// Connects and drives the connection in a task of its own.
    pub async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        let Some(shared) = &self.shared else {
            return connect(&self.config, &self.tls).await;
        };
        let mut config = self.config.clone();
        config.password(shared.current().expose());
        match (connect(&config, &self.tls).await, shared.next()) {
            // A rotation was interrupted after Postgres took the new one.
            (Err(e), Some(next)) if e.code() == Some(&SqlState::INVALID_PASSWORD) => {
                config.password(next.expose());
                let client = connect(&config, &self.tls).await?;
                shared.promote();
                Ok(client)
            }
            (result, _) => result,
        }
    }

    /// Connects, LISTENs on `channels` and hands each notification's
    /// channel and payload to `on_notify`; the client (dropped: the
    /// connection ends) and the connection's task, which ends when the
    /// connection does.
    pub async fn listen(
        &self,
        channels: &[&'static str],
        on_notify: impl Fn(&str, &str) + Send + 'static,
    ) -> Result<(Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
        let mut config = self.config.clone();
        if let Some(shared) = &self.shared {
            config.password(shared.current().expose());
        }
        let (client, task) = match &self.tls {
            Tls::Off => {
                let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
                (client, tokio::spawn(forward(connection, on_notify)))
            }
            Tls::On(make) => {
                let (client, connection) = config.connect(make.clone()).await?;
                (client, tokio::spawn(forward(connection, on_notify)))
            }
        };
        for channel in channels {
            client.batch_execute(&format!("LISTEN {channel}")).await?;
        }
        Ok((client, task))
    }

    /// The same server and credentials, another database.
    pub fn database(&self, dbname: &str) -> Endpoint {
        let mut config = self.config.clone();
        config.dbname(dbname);
        Endpoint {
            config,
            tls: self.tls.clone(),
            shared: self.shared.clone(),
        }
    }
}

/// Drives a connection, handing notifications to `on_notify`, until it ends.
async fn forward<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    on_notify: impl Fn(&str, &str),
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::StreamExt;
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    while let Some(Ok(message)) = messages.next().await {
        if let tokio_postgres::AsyncMessage::Notification(note) = message {
            on_notify(note.channel(), note.payload());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_certificate_due_for_renewal_is_issued_again() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Arc::new(
            NodePki::ensure(
                dir.path(),
                "abcd",
                &["127.0.0.1".parse().unwrap()],
                std::time::SystemTime::now(),
            )
            .unwrap(),
        );
        let resolver = RenewingClientCert::new(pki, "keepd_abcd_v1").unwrap();
        let first = resolver.resolve(&[], &[]).unwrap();
        let again = resolver.resolve(&[], &[]).unwrap();
        assert!(Arc::ptr_eq(&first, &again), "not due: the same certificate");
        let renew_at = resolver.current.lock().unwrap().1;
        let now = crate::clock::unix_now();
        // Renewed with a third of its day left.
        assert!(
            (now + 57_000..=now + 57_600).contains(&renew_at),
            "{renew_at}"
        );
        resolver.current.lock().unwrap().1 = 0;
        let renewed = resolver.resolve(&[], &[]).unwrap();
        assert!(!Arc::ptr_eq(&first, &renewed));
        assert_ne!(first.cert[0], renewed.cert[0]);
    }
}
