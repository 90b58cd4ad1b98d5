//! The node's own PKI for Postgres over TCP: a CA (ECDSA P-256) and a
//! server certificate with a SAN for every address keepd dials, in
//! `state_dir/pki` (keys 0600), and client certificates issued in memory
//! for each role keepd logs in as, whose CN is the role's name (checked by
//! `clientcert=verify-full`).
//!
//! The server certificate is renewed before it expires by re-signing the
//! same key (30 days ahead), so nothing that pinned its key breaks; one
//! that does not chain to the current CA, outlives it, or lacks an address
//! keepd dials is re-issued. Client certificates never touch the disk.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tracing::info;
use x509_cert::der::Decode;

use crate::fsutil;

const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);
const LEAF_LIFETIME: Duration = Duration::from_secs(365 * 86_400);
/// Leaves are re-signed when less than this is left.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 86_400);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a PEM {what}; remove it to have keepd issue a new one")]
    Corrupt { path: PathBuf, what: &'static str },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path} is missing; start keepd (keepd run) once to issue the node's certificates")]
    Missing { path: PathBuf },
}

/// One certificate and its key, PEM.
#[derive(Clone)]
pub struct Pair {
    pub cert_pem: String,
    pub key_pem: zeroize::Zeroizing<String>,
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pair { cert, key: <secret> }")
    }
}

/// The node's CA and server certificate.
#[derive(Debug, Clone)]
pub struct NodePki {
    pub dir: PathBuf,
    node_id: String,
    ca_end: u64,
    pub ca: Pair,
    pub server: Pair,
}

/// Client certificates are issued per credential in memory; a role is
/// rotated away long before its certificate would end.
const CLIENT_LIFETIME: Duration = LEAF_LIFETIME;

/// What a certificate says about itself, for renewal decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validity {
    pub not_after: u64,
    pub issuer: String,
    pub subject: String,
}

/// Reads validity, issuer and subject from a PEM certificate.
pub fn validity(cert_pem: &str) -> Option<Validity> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).ok()?;
    let cert = x509_cert::Certificate::from_der(der.as_ref()).ok()?;
    let tbs = cert.tbs_certificate;
    Some(Validity {
        not_after: tbs.validity.not_after.to_unix_duration().as_secs(),
        issuer: tbs.issuer.to_string(),
        subject: tbs.subject.to_string(),
    })
}

use crate::clock::unix_seconds as unix;

fn offset(t: u64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(t as i64).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn ca_params(node_id: &str, now: u64) -> CertificateParams {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("keepd node CA {node_id}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = offset(now.saturating_sub(3600));
    params.not_after = offset(now + CA_LIFETIME.as_secs());
    params
}

/// Parameters of a leaf valid from `now` (never past the CA's end).
fn leaf_params(
    cn: &str,
    sans: &[SanType],
    server: bool,
    now: u64,
    ca_end: u64,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.subject_alt_names = sans.to_vec();
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    params.not_before = offset(now.saturating_sub(3600));
    let lifetime = if server {
        LEAF_LIFETIME
    } else {
        CLIENT_LIFETIME
    };
    params.not_after = offset((now + lifetime.as_secs()).min(ca_end));
    params
}

fn server_sans(addresses: &[IpAddr]) -> Vec<SanType> {
    let mut sans = vec![SanType::DnsName("localhost".try_into().expect("ASCII"))];
    for addr in addresses {
        sans.push(SanType::IpAddress(*addr));
    }
    sans
}

struct Files {
    dir: PathBuf,
}

impl Files {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn read(&self, name: &str) -> Result<Option<String>, PkiError> {
        let path = self.path(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(PkiError::Read { path, source }),
        }
    }

    fn write(&self, name: &str, text: &str) -> Result<(), PkiError> {
        let path = self.path(name);
        fsutil::write_atomic(&path, text.as_bytes(), None)
            .map_err(|source| PkiError::Write { path, source })
    }

    fn key(&self, name: &str) -> Result<Option<KeyPair>, PkiError> {
        match self.read(name)? {
            None => Ok(None),
            Some(pem) => KeyPair::from_pem(&pem)
                .map(Some)
                .map_err(|_| PkiError::Corrupt {
                    path: self.path(name),
                    what: "private key",
                }),
        }
    }

    /// The key at `name`, generated and written when missing.
    fn key_or_new(&self, name: &str) -> Result<KeyPair, PkiError> {
        if let Some(key) = self.key(name)? {
            return Ok(key);
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        self.write(name, &key.serialize_pem())?;
        Ok(key)
    }
}

impl NodePki {
    /// Loads the PKI in `state_dir/pki`, issuing or renewing what is
    /// missing, expiring, foreign to the CA or lacking an address.
    pub fn ensure(
        state_dir: &Path,
        node_id: &str,
        addresses: &[IpAddr],
        now: SystemTime,
    ) -> Result<NodePki, PkiError> {
        let dir = state_dir.join("pki");
        fsutil::ensure_private_dir(&dir).map_err(|source| PkiError::Write {
            path: dir.clone(),
            source,
        })?;
        let files = Files { dir: dir.clone() };
        let now = unix(now);

        let ca_key = files.key_or_new("ca.key")?;
        let ca_wanted = format!("CN=keepd node CA {node_id}");
        let mut ca_new = false;
        let ca_cert = match files.read("ca.crt")?.filter(|pem| {
            validity(pem).is_some_and(|v| {
                v.subject == ca_wanted && v.not_after > now + LEAF_LIFETIME.as_secs()
            })
        }) {
            Some(pem) => pem,
            None => {
                let pem = ca_params(node_id, now).self_signed(&ca_key)?.pem();
                files.write("ca.crt", &pem)?;
                info!("pki: issued the node CA");
                ca_new = true;
                pem
            }
        };
        let ca_end = validity(&ca_cert).map_or(now, |v| v.not_after);
        let issuer = Issuer::new(ca_params(node_id, now), &ca_key);

        let sans = server_sans(addresses);
        let san_text: Vec<String> = addresses.iter().map(IpAddr::to_string).collect();
        // Leaves of a CA issued just now were signed by another key.
        let server = Self::leaf(
            &files,
            "server",
            "keepd-postgres",
            &sans,
            true,
            now,
            ca_end,
            &ca_wanted,
            &issuer,
            |pem| !ca_new && san_text.iter().all(|a| cert_has_ip(pem, a)),
        )?;
        Ok(NodePki {
            dir,
            node_id: node_id.to_string(),
            ca_end,
            ca: Pair {
                cert_pem: ca_cert,
                key_pem: zeroize::Zeroizing::new(ca_key.serialize_pem()),
            },
            server,
        })
    }

    /// The PKI in `state_dir/pki` as the daemon left it, for operator
    /// commands: read only, never issued, renewed or written.
    pub fn load(state_dir: &Path, node_id: &str) -> Result<NodePki, PkiError> {
        let files = Files {
            dir: state_dir.join("pki"),
        };
        let read = |name: &str| {
            files.read(name)?.ok_or_else(|| PkiError::Missing {
                path: files.path(name),
            })
        };
        let pair = |name: &str| -> Result<Pair, PkiError> {
            let key_name = format!("{name}.key");
            let key = read(&key_name)?;
            if KeyPair::from_pem(&key).is_err() {
                return Err(PkiError::Corrupt {
                    path: files.path(&key_name),
                    what: "private key",
                });
            }
            Ok(Pair {
                cert_pem: read(&format!("{name}.crt"))?,
                key_pem: zeroize::Zeroizing::new(key),
            })
        };
        let ca = pair("ca")?;
        let ca_end =
            validity(&ca.cert_pem)
                .map(|v| v.not_after)
                .ok_or_else(|| PkiError::Corrupt {
                    path: files.path("ca.crt"),
                    what: "certificate",
                })?;
        Ok(NodePki {
            server: pair("server")?,
            dir: files.dir.clone(),
            node_id: node_id.to_string(),
            ca_end,
            ca,
        })
    }

    /// A client certificate for `role` (its CN), with a fresh key; held in
    /// memory only.
    pub fn issue_client(&self, role: &str) -> Result<Pair, PkiError> {
        let now = unix(SystemTime::now());
        let ca_key = KeyPair::from_pem(&self.ca.key_pem).map_err(|_| PkiError::Corrupt {
            path: self.dir.join("ca.key"),
            what: "private key",
        })?;
        let issuer = Issuer::new(ca_params(&self.node_id, now), &ca_key);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = leaf_params(role, &[], false, now, self.ca_end).signed_by(&key, &issuer)?;
        Ok(Pair {
            cert_pem: cert.pem(),
            key_pem: zeroize::Zeroizing::new(key.serialize_pem()),
        })
    }

    /// A leaf kept while it chains to the CA, is not due for renewal and
    /// passes `fits`; else re-signed over the same key.
    #[allow(clippy::too_many_arguments)]
    fn leaf(
        files: &Files,
        name: &str,
        cn: &str,
        sans: &[SanType],
        server: bool,
        now: u64,
        ca_end: u64,
        ca_subject: &str,
        issuer: &Issuer<'_, &KeyPair>,
        fits: impl Fn(&str) -> bool,
    ) -> Result<Pair, PkiError> {
        let key = files.key_or_new(&format!("{name}.key"))?;
        let current = files.read(&format!("{name}.crt"))?;
        let keep = current.as_deref().is_some_and(|pem| match validity(pem) {
            Some(v) => {
                v.issuer == ca_subject
                    && v.not_after <= ca_end
                    && v.not_after > now + RENEW_BEFORE.as_secs()
                    && fits(pem)
            }
            None => false,
        });
        let cert_pem = match current {
            Some(pem) if keep => pem,
            previous => {
                let pem = leaf_params(cn, sans, server, now, ca_end)
                    .signed_by(&key, issuer)?
                    .pem();
                files.write(&format!("{name}.crt"), &pem)?;
                info!(
                    certificate = name,
                    renewed = previous.is_some(),
                    "pki: issued the {name} certificate"
                );
                pem
            }
        };
        Ok(Pair {
            cert_pem,
            key_pem: zeroize::Zeroizing::new(key.serialize_pem()),
        })
    }
}

/// Whether the certificate carries `ip` as an IP-address SAN.
fn cert_has_ip(cert_pem: &str, ip: &str) -> bool {
    let Ok(addr) = ip.parse::<IpAddr>() else {
        return false;
    };
    let octets = match addr {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    let Ok(der) = CertificateDer::from_pem_slice(cert_pem.as_bytes()) else {
        return false;
    };
    // An iPAddress SAN is context tag 7 followed by the raw octets.
    let mut needle = vec![0x87, octets.len() as u8];
    needle.extend_from_slice(&octets);
    der.as_ref()
        .windows(needle.len())
        .any(|w| w == needle.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOOPBACK: [IpAddr; 1] = [IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)];

    #[test]
    fn issues_once_then_keeps_and_renews_over_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::now();
        let first = NodePki::ensure(dir.path(), "abcd", &LOOPBACK, t0).unwrap();
        assert_eq!(
            fsutil::mode_of(&dir.path().join("pki/server.key")).unwrap() & 0o777,
            0o600
        );
        assert!(cert_has_ip(&first.server.cert_pem, "127.0.0.1"));
        let client = validity(&first.issue_client("keepd_abcd_v1").unwrap().cert_pem).unwrap();
        assert_eq!(client.subject, "CN=keepd_abcd_v1");
        assert_eq!(client.issuer, "CN=keepd node CA abcd");
        assert!(std::fs::read_dir(dir.path().join("pki")).unwrap().all(|f| {
            !f.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("client")
        }));

        let again = NodePki::ensure(dir.path(), "abcd", &LOOPBACK, t0).unwrap();
        assert_eq!(
            again.server.cert_pem, first.server.cert_pem,
            "nothing is due"
        );

        // 340 days on: within 30 days of the end, re-signed, same key.
        let later = t0 + Duration::from_secs(340 * 86_400);
        let renewed = NodePki::ensure(dir.path(), "abcd", &LOOPBACK, later).unwrap();
        assert_ne!(renewed.server.cert_pem, first.server.cert_pem);
        assert_eq!(*renewed.server.key_pem, *first.server.key_pem);
        assert!(
            validity(&renewed.server.cert_pem).unwrap().not_after
                > validity(&first.server.cert_pem).unwrap().not_after
        );
    }

    #[test]
    fn a_new_address_or_a_foreign_leaf_is_reissued() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let first = NodePki::ensure(dir.path(), "abcd", &LOOPBACK, now).unwrap();
        let wider = [LOOPBACK[0], "10.1.2.3".parse().unwrap()];
        let second = NodePki::ensure(dir.path(), "abcd", &wider, now).unwrap();
        assert_ne!(second.server.cert_pem, first.server.cert_pem);
        assert!(cert_has_ip(&second.server.cert_pem, "10.1.2.3"));

        // A leaf from another CA in place of ours is detected and replaced.
        let other = tempfile::tempdir().unwrap();
        let foreign = NodePki::ensure(other.path(), "ffff", &LOOPBACK, now).unwrap();
        std::fs::write(dir.path().join("pki/server.crt"), &foreign.server.cert_pem).unwrap();
        let fixed = NodePki::ensure(dir.path(), "abcd", &wider, now).unwrap();
        assert_eq!(
            validity(&fixed.server.cert_pem).unwrap().issuer,
            "CN=keepd node CA abcd"
        );

        std::fs::write(dir.path().join("pki/ca.key"), "garbage").unwrap();
        let e = NodePki::ensure(dir.path(), "abcd", &wider, now).unwrap_err();
        assert!(e.to_string().contains("ca.key"), "{e}");
    }

    #[test]
    fn operator_commands_load_without_writing() {
        let dir = tempfile::tempdir().unwrap();
        let e = NodePki::load(dir.path(), "abcd").unwrap_err();
        assert!(matches!(e, PkiError::Missing { .. }), "{e}");
        assert!(!dir.path().join("pki").exists(), "load created files");
        let issued = NodePki::ensure(dir.path(), "abcd", &LOOPBACK, SystemTime::now()).unwrap();
        let stamps = || {
            std::fs::read_dir(dir.path().join("pki"))
                .unwrap()
                .map(|f| f.unwrap().metadata().unwrap().modified().unwrap())
                .collect::<Vec<_>>()
        };
        let before = stamps();
        let loaded = NodePki::load(dir.path(), "abcd").unwrap();
        assert_eq!(loaded.server.cert_pem, issued.server.cert_pem);
        assert!(loaded.issue_client("keepd_superuser").is_ok());
        assert_eq!(stamps(), before, "load wrote to the PKI");
    }
}
