//! The external provider: an existing server keepd does not run. keepd
//! connects as a bootstrap administrator (its password from a file or an
//! environment variable, never the config itself), over TLS verified
//! against the configured CA and the server's name by default, and then
//! manages its roles, schema and rotation there exactly as on its own
//! servers. It renders and installs nothing.

use std::time::Duration;

use tokio_postgres_rustls::MakeRustlsConnect;

use super::tls::{Endpoint, Tls, TlsError, client_config};
use super::{PgAddress, endpoint};
use crate::config::{Config, ExternalSslMode};
use crate::secrets::values::SecretString;

#[derive(Debug, thiserror::Error)]
pub enum ExternalError {
    #[error(
        "cannot read the administrator password from {path} (database.postgres.external.admin_password_file): {source}"
    )]
    PasswordFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the environment variable {0} (database.postgres.external.admin_password_env) is not set"
    )]
    PasswordEnv(String),
    #[error("the administrator password is empty; set it in the file or variable the config names")]
    EmptyPassword,
    #[error("cannot read the CA certificate {path} (database.postgres.external.ca_file): {source}")]
    CaFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the CA certificate {path} is not usable: {source}")]
    Ca {
        path: std::path::PathBuf,
        source: TlsError,
    },
}

pub struct ExternalServer {
    /// Tried in order; the first writable one is used.
    targets: Vec<(String, u16)>,
    admin_user: String,
    admin_password: SecretString,
    tls: Tls,
    pub start_timeout: Duration,
}

impl ExternalServer {
    pub fn from_config(config: &Config) -> Result<ExternalServer, ExternalError> {
        let ext = &config.database.postgres.external;
        let password = match (&ext.admin_password_file, &ext.admin_password_env) {
            (Some(path), _) => std::fs::read_to_string(path)
                .map_err(|source| ExternalError::PasswordFile {
                    path: path.clone(),
                    source,
                })?
                .trim_end_matches(['\r', '\n'])
                .to_string(),
            (None, Some(var)) => {
                std::env::var(var).map_err(|_| ExternalError::PasswordEnv(var.clone()))?
            }
            (None, None) => String::new(),
        };
        if password.is_empty() {
            return Err(ExternalError::EmptyPassword);
        }
        let tls = match (ext.sslmode, &ext.ca_file) {
            (ExternalSslMode::VerifyFull, Some(path)) => {
                let pem =
                    std::fs::read_to_string(path).map_err(|source| ExternalError::CaFile {
                        path: path.clone(),
                        source,
                    })?;
                // Managed servers may still top out at TLS 1.2.
                let versions = [&rustls::version::TLS13, &rustls::version::TLS12];
                let config =
                    client_config(&pem, None, &versions).map_err(|source| ExternalError::Ca {
                        path: path.clone(),
                        source,
                    })?;
                Tls::On(MakeRustlsConnect::new(config))
            }
            _ => Tls::Off,
        };
        Ok(ExternalServer {
            targets: ext.targets(),
            admin_user: ext.admin_user.clone(),
            admin_password: SecretString::new(password),
            tls,
            start_timeout: ext.start_timeout.get(),
        })
    }

    /// TLS for any role keepd logs in as (no client certificate).
    pub fn tls(&self) -> Tls {
        self.tls.clone()
    }

    /// The bootstrap administrator on `dbname`, on whichever server is the
    /// writable primary (as libpq's `target_session_attrs=read-write`): a
    /// connection made after a failover reaches the new primary.
    pub fn admin_endpoint(&self, dbname: &str) -> Endpoint {
        let (first, rest) = self
            .targets
            .split_first()
            .expect("validated: host or hosts is set");
        let mut endpoint = endpoint(
            &PgAddress::Host(first.0.clone()),
            first.1,
            &self.admin_user,
            &self.admin_password,
            dbname,
            self.tls.clone(),
        );
        for (host, port) in rest {
            endpoint.config.host(host).port(*port);
        }
        endpoint
            .config
            .target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
        endpoint
    }

    /// The administrator's name and password (for `keepd psql`).
    pub fn admin(&self) -> (&str, &SecretString) {
        (&self.admin_user, &self.admin_password)
    }

    /// The servers' ports as libpq's list (PGPORT), in `targets` order.
    pub fn libpq_ports(&self) -> String {
        let ports: Vec<String> = self
            .targets
            .iter()
            .map(|(_, port)| port.to_string())
            .collect();
        ports.join(",")
    }

    pub fn describe(&self) -> String {
        let targets: Vec<String> = self
            .targets
            .iter()
            .map(|(host, port)| format!("{host}:{port}"))
            .collect();
        targets.join(", ")
    }
}
