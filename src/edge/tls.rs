//! The API's own HTTPS: the operator's certificate and key (`api.tls`),
//! loaded and checked at start, and re-read when the files change or on
//! SIGHUP. A reload swaps what new handshakes get; open connections keep
//! theirs. A broken new file keeps the old certificate.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, SupportedProtocolVersion};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tracing::{info, warn};

use crate::config::{ApiTlsConfig, TlsMinVersion};
use crate::shutdown::Shutdown;

/// Why the API's certificate or key cannot be used. Each names the
/// setting, so the operator knows which file to fix.
#[derive(Debug, thiserror::Error)]
pub enum ApiTlsError {
    #[error("api.tls.{key}: cannot read {path}: {source}")]
    Read {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("api.tls.cert: {path} holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)")]
    NoCertificate { path: PathBuf },
    #[error("api.tls.key: {path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {reason}")]
    NoKey { path: PathBuf, reason: String },
    #[error("api.tls.key: {path} is not a key rustls can sign with: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error(
        "api.tls.key: {key} does not belong to the certificate in {cert} (api.tls.cert); \
         install the key issued with that certificate"
    )]
    Mismatch { key: PathBuf, cert: PathBuf },
    #[error("api.tls.cert: the certificate in {path} cannot be parsed: {reason}")]
    Unparsable { path: PathBuf, reason: String },
}

/// What is known of the certificate being served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertificateInfo {
    /// Seconds since the epoch.
    pub not_after: u64,
    pub not_before: u64,
}

impl CertificateInfo {
    /// Whole days until it expires; negative once expired.
    pub fn days_left(&self, now: SystemTime) -> i64 {
        let now = crate::clock::unix_seconds(now);
        (self.not_after as i64 - now as i64).div_euclid(86_400)
    }
}

struct Loaded {
    key: Arc<CertifiedKey>,
    info: CertificateInfo,
    /// Modification times of (cert, key) when read.
    stamps: Stamps,
}

/// The certificate the API serves, swappable while running.
pub struct ApiCertificate {
    config: ApiTlsConfig,
    current: RwLock<Arc<Loaded>>,
    /// The stamps last looked at, so a broken file is reported once, not
    /// at every check.
    seen: std::sync::Mutex<Stamps>,
}

type Stamps = (Option<SystemTime>, Option<SystemTime>);

impl std::fmt::Debug for ApiCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiCertificate")
            .field("cert", &self.config.cert)
            .finish_non_exhaustive()
    }
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, ApiTlsError> {
    std::fs::read(path).map_err(|source| ApiTlsError::Read {
        key,
        path: path.to_owned(),
        source,
    })
}

fn stamp(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn load(config: &ApiTlsConfig) -> Result<Loaded, ApiTlsError> {
    let stamps = (stamp(&config.cert), stamp(&config.key));
    let cert_pem = read("cert", &config.cert)?;
    let key_pem = zeroize::Zeroizing::new(read("key", &config.key)?);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|_| ApiTlsError::NoCertificate {
            path: config.cert.clone(),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(ApiTlsError::NoCertificate {
            path: config.cert.clone(),
        });
    };
    let info = validity(leaf).map_err(|reason| ApiTlsError::Unparsable {
        path: config.cert.clone(),
        reason,
    })?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| ApiTlsError::NoKey {
        path: config.key.clone(),
        reason: e.to_string(),
    })?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&private).map_err(|e| {
        ApiTlsError::BadKey {
            path: config.key.clone(),
            reason: e.to_string(),
        }
    })?;
    let key = CertifiedKey::new(chain, signing);
    // The SPKI comparison: a key from another certificate would make every
    // handshake fail, so it is refused here instead.
    if key.keys_match().is_err() {
        return Err(ApiTlsError::Mismatch {
            key: config.key.clone(),
            cert: config.cert.clone(),
        });
    }
    Ok(Loaded {
        key: Arc::new(key),
        info,
        stamps,
    })
}

fn validity(leaf: &CertificateDer<'_>) -> Result<CertificateInfo, String> {
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(leaf.as_ref()).map_err(|e| e.to_string())?;
    let v = &cert.tbs_certificate.validity;
    Ok(CertificateInfo {
        not_before: v.not_before.to_unix_duration().as_secs(),
        not_after: v.not_after.to_unix_duration().as_secs(),
    })
}

impl ApiCertificate {
    /// Loads and checks `api.tls`; an error names the setting to fix.
    pub fn load(config: &ApiTlsConfig) -> Result<ApiCertificate, ApiTlsError> {
        let loaded = load(config)?;
        Ok(ApiCertificate {
            config: config.clone(),
            seen: std::sync::Mutex::new(loaded.stamps),
            current: RwLock::new(Arc::new(loaded)),
        })
    }

    pub fn info(&self) -> CertificateInfo {
        self.current().info
    }

    pub fn min_version(&self) -> TlsMinVersion {
        self.config.min_version
    }

    fn current(&self) -> Arc<Loaded> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the files; on failure the old certificate stays and the
    /// error says why.
    pub fn reload(&self) -> Result<CertificateInfo, ApiTlsError> {
        let loaded = load(&self.config)?;
        let info = loaded.info;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(loaded);
        Ok(info)
    }

    /// Reloads when either file's modification time differs from what was
    /// read; logs the outcome. Returns true when a new certificate is in use.
    pub fn reload_if_changed(&self) -> bool {
        let stamps = (stamp(&self.config.cert), stamp(&self.config.key));
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if *seen == stamps {
                return false;
            }
            *seen = stamps;
        }
        self.reload_logged("file changed")
    }

    /// Reloads and logs one line either way.
    pub fn reload_logged(&self, why: &str) -> bool {
        match self.reload() {
            Ok(info) => {
                info!(
                    why,
                    cert = %self.config.cert.display(),
                    days_left = info.days_left(SystemTime::now()),
                    "api certificate loaded"
                );
                true
            }
            Err(e) => {
                warn!(why, error = %e, "api certificate not reloaded; the previous one stays in use");
                false
            }
        }
    }

    /// The rustls configuration: the versions from `api.tls.min_version`,
    /// ALPN h2 and http/1.1, ring's suites (all ECDHE with an AEAD, so
    /// every session is forward secret), certificates from `self`.
    pub fn server_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        let versions: &[&SupportedProtocolVersion] = match self.config.min_version {
            TlsMinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsMinVersion::Tls13 => &[&rustls::version::TLS13],
        };
        let provider = Arc::new(forward_secret_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("ring supports TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// Checks the files every `every` until `stop`, so a certbot or ACME
    /// renewal is picked up without a signal.
    pub async fn watch(self: Arc<Self>, every: Duration, mut stop: Shutdown) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => { self.reload_if_changed(); }
                _ = stop.requested() => return,
            }
        }
    }
}

/// ring's provider with only suites that are forward secret and AEAD
/// (ring's defaults already are; the filter makes it a stated property).
fn forward_secret_provider() -> rustls::crypto::CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .retain(|suite| is_forward_secret_aead(suite.suite()));
    provider
}

fn is_forward_secret_aead(suite: rustls::CipherSuite) -> bool {
    let name = format!("{suite:?}");
    // TLS 1.3 suites are always ECDHE and AEAD; TLS 1.2 ones must say so.
    name.starts_with("TLS13_")
        || (name.starts_with("TLS_ECDHE_")
            && (name.contains("_GCM_") || name.contains("CHACHA20_POLY1305")))
}

#[derive(Debug)]
struct Resolver(Arc<ApiCertificate>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().key.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_forward_secret_aead_suites_are_offered() {
        let provider = forward_secret_provider();
        assert!(!provider.cipher_suites.is_empty());
        assert_eq!(
            provider.cipher_suites.len(),
            rustls::crypto::ring::default_provider().cipher_suites.len(),
            "ring's defaults are all forward secret AEAD suites"
        );
        assert!(!is_forward_secret_aead(
            rustls::CipherSuite::TLS_RSA_WITH_AES_128_GCM_SHA256
        ));
        assert!(!is_forward_secret_aead(
            rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA
        ));
    }

    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.cert.pem()).unwrap();
        std::fs::write(&k, cert.signing_key.serialize_pem()).unwrap();
        (c, k)
    }

    #[test]
    fn bad_files_name_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_a, key_a) = write_pair(dir.path(), "a");
        let (_, key_b) = write_pair(dir.path(), "b");
        let config = |cert: &Path, key: &Path| ApiTlsConfig {
            cert: cert.to_owned(),
            key: key.to_owned(),
            min_version: TlsMinVersion::Tls12,
        };
        assert!(ApiCertificate::load(&config(&cert_a, &key_a)).is_ok());
        let e = ApiCertificate::load(&config(&cert_a, &key_b)).unwrap_err();
        assert!(matches!(e, ApiTlsError::Mismatch { .. }), "{e}");
        assert!(e.to_string().contains("api.tls.key"), "{e}");
        let missing = dir.path().join("missing.crt");
        let e = ApiCertificate::load(&config(&missing, &key_a)).unwrap_err();
        assert!(
            e.to_string().starts_with("api.tls.cert: cannot read"),
            "{e}"
        );
        let e = ApiCertificate::load(&config(&key_a, &key_a)).unwrap_err();
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
        let e = ApiCertificate::load(&config(&cert_a, &cert_a)).unwrap_err();
        assert!(e.to_string().contains("api.tls.key"), "{e}");
    }

    #[test]
    fn a_broken_new_file_keeps_the_old_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_pair(dir.path(), "a");
        let loaded = ApiCertificate::load(&ApiTlsConfig {
            cert: cert.clone(),
            key: key.clone(),
            min_version: TlsMinVersion::Tls13,
        })
        .unwrap();
        let before = loaded.current().key.cert[0].clone();
        std::fs::write(&cert, "not a certificate").unwrap();
        assert!(loaded.reload().is_err());
        assert_eq!(loaded.current().key.cert[0], before);
        let (cert_b, key_b) = write_pair(dir.path(), "b");
        std::fs::rename(cert_b, &cert).unwrap();
        std::fs::rename(key_b, &key).unwrap();
        assert!(loaded.reload_if_changed());
        assert_ne!(loaded.current().key.cert[0], before);
        assert!(!loaded.reload_if_changed(), "nothing changed since");
    }
}
