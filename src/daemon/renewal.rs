//! Keeps the TLS server certificate and revocation list of TCP mode
//! current while keepd runs: twice a day, on SIGHUP and when a rotation
//! revoked certificates, the node PKI is checked; a certificate that was
//! renewed (re-signed over the same key) or re-issued, or a changed CRL, is installed
//! where Postgres reads it and applied with a configuration reload, so no
//! connection is dropped and nothing restarts.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tracing::{error, info};

use crate::pki::NodePki;
use crate::postgres::server::Server;
use crate::postgres::tls::Endpoint;
use crate::shutdown::Shutdown;

const EVERY: Duration = Duration::from_secs(12 * 3600);

pub struct CertificateRenewal {
    pub server: Server,
    pub state_dir: PathBuf,
    pub node_id: String,
    pub addresses: Vec<IpAddr>,
    pub superuser: Endpoint,
    /// The server certificate Postgres has now.
    pub installed: String,
    /// The revocation list Postgres has now.
    pub installed_crl: String,
}

impl CertificateRenewal {
    /// The renewal of the server certificate keepd issued (TCP mode on a
    /// server it runs), or None.
    pub fn of(
        server: &Server,
        pki: Option<&Arc<NodePki>>,
        state_dir: &std::path::Path,
        node_id: &str,
        superuser: &Endpoint,
    ) -> Option<CertificateRenewal> {
        let (address, pki) = (server.tls_address()?, pki?);
        Some(CertificateRenewal {
            server: server.clone(),
            state_dir: state_dir.to_owned(),
            node_id: node_id.to_string(),
            addresses: vec![address],
            superuser: superuser.clone(),
            installed: pki.server.cert_pem.clone(),
            installed_crl: pki.crl_pem.clone(),
        })
    }

    /// Installs and applies a changed server certificate or revocation
    /// list; true if one was.
    async fn check(&mut self) -> Result<bool, String> {
        let pki = NodePki::ensure(
            &self.state_dir,
            &self.node_id,
            &self.addresses,
            SystemTime::now(),
        )
        .map_err(|e| e.to_string())?;
        if pki.server.cert_pem == self.installed && pki.crl_pem == self.installed_crl {
            return Ok(false);
        }
        self.server.install_tls(&pki).map_err(|e| e.to_string())?;
        let client = self.superuser.connect().await.map_err(|e| e.to_string())?;
        client
            .query_one("SELECT pg_reload_conf()", &[])
            .await
            .map_err(|e| e.to_string())?;
        self.installed = pki.server.cert_pem.clone();
        self.installed_crl = pki.crl_pem.clone();
        Ok(true)
    }

    pub async fn run(mut self, wake: Arc<Notify>, mut stop: Shutdown) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(EVERY) => {}
                _ = wake.notified() => {}
                _ = stop.requested() => return,
            }
            match self.check().await {
                Ok(true) => {
                    info!(
                        "pki: the new server certificate or revocation list is applied (configuration reloaded)"
                    )
                }
                Ok(false) => info!("pki: the server certificate and revocation list are current"),
                Err(e) => {
                    error!(error = %e, "pki: cannot renew or apply the server certificate; retrying later")
                }
            }
        }
    }
}
