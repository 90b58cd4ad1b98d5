//! The node's own PKI for Postgres over TCP: a CA (ECDSA P-256) and a
//! server certificate with a SAN for every address keepd dials, in
//! `state_dir/pki` (keys 0600), and client certificates issued in memory
//! for each role keepd logs in as, whose CN is the role's name (checked by
//! `clientcert=verify-full`).
//!
//! The server certificate is renewed before it expires by re-signing the
//! same key (30 days ahead), so nothing that pinned its key breaks; one
//! that does not chain to the current CA, outlives it, or lacks an address
//! keepd dials is re-issued. Client certificates are issued in memory (only
//! `keepd psql` writes one, into a private directory under the runtime
//! directory that it removes when psql exits) and live a day at most (`CLIENT_LIFETIME`, or the rotation interval when
//! shorter); those of a retired role are revoked (`NodePki::revoke`) in a
//! CRL Postgres checks (`ssl_crl_file`), kept in `revoked` until they
//! would have expired anyway.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
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
    #[error("the OS random number generator failed: {0}")]
    Entropy(String),
}

/// Files of `state_dir/pki` beside the certificates.
const REVOKED: &str = "revoked";
const CRL: &str = "crl.pem";

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

/// The node's CA, server certificate and CRL, and the client
/// certificates issued from it (clones share that record).
#[derive(Debug, Clone)]
pub struct NodePki {
    pub dir: PathBuf,
    node_id: String,
    ca_end: u64,
    pub ca: Pair,
    pub server: Pair,
    /// The revocation list Postgres checks client certificates against.
    pub crl_pem: String,
    client_lifetime: Duration,
    issued: Arc<Mutex<Vec<Issued>>>,
}

/// Client certificates live a day: a leaked one is useless by tomorrow,
/// and the CRL covers the rest of its day.
pub const CLIENT_LIFETIME: Duration = Duration::from_secs(86_400);
/// The CRL is signed for a week and re-signed when less than half is left
/// (the renewal task looks twice a day).
const CRL_LIFETIME: Duration = Duration::from_secs(7 * 86_400);
const CRL_RENEW_BEFORE: Duration = Duration::from_secs(4 * 86_400);

/// A client certificate issued by this process and not yet expired.
#[derive(Debug, Clone)]
struct Issued {
    role: String,
    serial: Vec<u8>,
    not_after: u64,
}

/// A revoked certificate, listed until it would have expired anyway.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Revoked {
    serial: Vec<u8>,
    not_after: u64,
    at: u64,
}

/// `revoked`: one line per certificate, `serial not_after revoked_at`
/// (hex, unix seconds); those expired by `now` are left out.
fn parse_revoked(text: &str, now: u64) -> Option<Vec<Revoked>> {
    let mut list = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut fields = line.split_whitespace();
        let entry = Revoked {
            serial: hex::decode(fields.next()?).ok()?,
            not_after: fields.next()?.parse().ok()?,
            at: fields.next()?.parse().ok()?,
        };
        if entry.not_after > now {
            list.push(entry);
        }
    }
    Some(list)
}

fn format_revoked(list: &[Revoked]) -> String {
    list.iter()
        .map(|r| format!("{} {} {}\n", hex::encode(&r.serial), r.not_after, r.at))
        .collect()
}

/// The serials a CRL lists and when it must be replaced.
fn crl_contents(pem: &str) -> Option<(Vec<Vec<u8>>, u64)> {
    let der =
        rustls_pki_types::CertificateRevocationListDer::from_pem_slice(pem.as_bytes()).ok()?;
    let crl = x509_cert::crl::CertificateList::from_der(der.as_ref()).ok()?;
    let next = crl.tbs_cert_list.next_update?.to_unix_duration().as_secs();
    let serials = crl
        .tbs_cert_list
        .revoked_certificates
        .unwrap_or_default()
        .iter()
        .map(|r| r.serial_number.as_bytes().to_vec())
        .collect();
    Some((serials, next))
}

/// A CRL of `revoked` signed by the CA.
fn sign_crl(
    revoked: &[Revoked],
    now: u64,
    issuer: &Issuer<'_, &KeyPair>,
) -> Result<String, PkiError> {
    let params = rcgen::CertificateRevocationListParams {
        this_update: offset(now.saturating_sub(3600)),
        next_update: offset(now + CRL_LIFETIME.as_secs()),
        crl_number: rcgen::SerialNumber::from(now),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|r| rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(&r.serial),
                revocation_time: offset(r.at),
                reason_code: Some(rcgen::RevocationReason::Superseded),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(issuer)?.pem()?)
}

/// What a certificate says about itself, for renewal decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validity {
    pub not_before: u64,
    pub not_after: u64,
    pub issuer: String,
    pub subject: String,
    pub serial: Vec<u8>,
}

/// Reads validity, issuer and subject from a PEM certificate.
pub fn validity(cert_pem: &str) -> Option<Validity> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).ok()?;
    let cert = x509_cert::Certificate::from_der(der.as_ref()).ok()?;
    let tbs = cert.tbs_certificate;
    Some(Validity {
        not_before: tbs.validity.not_before.to_unix_duration().as_secs(),
        not_after: tbs.validity.not_after.to_unix_duration().as_secs(),
        issuer: tbs.issuer.to_string(),
        subject: tbs.subject.to_string(),
        serial: tbs.serial_number.as_bytes().to_vec(),
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
    lifetime: Duration,
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
        let dir = crate::config::Layout::pki_dir_in(state_dir);
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
        let crl_pem = Self::crl(&files, now, &issuer, ca_new)?;
        Ok(NodePki {
            dir,
            node_id: node_id.to_string(),
            ca_end,
            ca: Pair {
                cert_pem: ca_cert,
                key_pem: zeroize::Zeroizing::new(ca_key.serialize_pem()),
            },
            server,
            crl_pem,
            client_lifetime: CLIENT_LIFETIME,
            issued: Arc::default(),
        })
    }

    /// The revoked list without what has expired, and a CRL of exactly
    /// it: the one in `crl.pem` while it lists the same serials, was
    /// signed by this CA and has more than `CRL_RENEW_BEFORE` left, else a
    /// new one.
    fn crl(
        files: &Files,
        now: u64,
        issuer: &Issuer<'_, &KeyPair>,
        ca_new: bool,
    ) -> Result<String, PkiError> {
        let revoked = Self::revoked(files, now)?;
        if files.read(REVOKED)?.as_deref() != Some(format_revoked(&revoked).as_str()) {
            files.write(REVOKED, &format_revoked(&revoked))?;
        }
        let wanted: Vec<&[u8]> = revoked.iter().map(|r| r.serial.as_slice()).collect();
        let current = files.read(CRL)?.filter(|pem| {
            !ca_new
                && crl_contents(pem).is_some_and(|(serials, next)| {
                    serials.iter().map(Vec::as_slice).eq(wanted.iter().copied())
                        && next > now + CRL_RENEW_BEFORE.as_secs()
                })
        });
        match current {
            Some(pem) => Ok(pem),
            None => {
                let pem = sign_crl(&revoked, now, issuer)?;
                files.write(CRL, &pem)?;
                info!(revoked = revoked.len(), "pki: signed the revocation list");
                Ok(pem)
            }
        }
    }

    fn revoked(files: &Files, now: u64) -> Result<Vec<Revoked>, PkiError> {
        match files.read(REVOKED)? {
            None => Ok(Vec::new()),
            Some(text) => parse_revoked(&text, now).ok_or_else(|| PkiError::Corrupt {
                path: files.path(REVOKED),
                what: "revocation record",
            }),
        }
    }

    /// Client certificates live `max` when that is less than a day (a
    /// rotation interval shorter than a day).
    pub fn with_client_lifetime(mut self, max: Duration) -> NodePki {
        self.client_lifetime = CLIENT_LIFETIME.min(max).max(Duration::from_secs(60));
        self
    }

    pub fn client_lifetime(&self) -> Duration {
        self.client_lifetime
    }

    /// Revokes every unexpired client certificate this process issued to
    /// `role` (a retired login role): recorded in `revoked` and signed
    /// into `crl.pem`; the caller installs and applies it (a reload).
    /// Returns how many were revoked.
    pub fn revoke(&self, role: &str) -> Result<usize, PkiError> {
        let now = unix(SystemTime::now());
        let files = Files {
            dir: self.dir.clone(),
        };
        let taken: Vec<Issued> = {
            let mut issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
            let (taken, kept) = issued
                .drain(..)
                .filter(|i| i.not_after > now)
                .partition(|i| i.role == role);
            *issued = kept;
            taken
        };
        let mut revoked = Self::revoked(&files, now)?;
        revoked.extend(taken.iter().map(|i| Revoked {
            serial: i.serial.clone(),
            not_after: i.not_after,
            at: now,
        }));
        files.write(REVOKED, &format_revoked(&revoked))?;
        let ca_key = self.ca_key()?;
        let issuer = Issuer::new(ca_params(&self.node_id, now), &ca_key);
        files.write(CRL, &sign_crl(&revoked, now, &issuer)?)?;
        Ok(taken.len())
    }

    fn ca_key(&self) -> Result<KeyPair, PkiError> {
        KeyPair::from_pem(&self.ca.key_pem).map_err(|_| PkiError::Corrupt {
            path: self.dir.join("ca.key"),
            what: "private key",
        })
    }

    /// The files Postgres reads, by the names the rendered
    /// postgresql.conf gives them.
    pub fn server_files(&self) -> [(&'static str, &str); 4] {
        [
            ("server.crt", &self.server.cert_pem),
            ("server.key", &self.server.key_pem),
            ("ca.crt", &self.ca.cert_pem),
            ("crl.pem", &self.crl_pem),
        ]
    }

    /// The PKI in `state_dir/pki` as the daemon left it, for operator
    /// commands: read only, never issued, renewed or written.
    pub fn load(state_dir: &Path, node_id: &str) -> Result<NodePki, PkiError> {
        let files = Files {
            dir: crate::config::Layout::pki_dir_in(state_dir),
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
        let now = unix(SystemTime::now());
        // A state directory from before CRLs: one signed in memory.
        let crl_pem = match files.read(CRL)? {
            Some(pem) => pem,
            None => {
                let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(|_| PkiError::Corrupt {
                    path: files.path("ca.key"),
                    what: "private key",
                })?;
                let issuer = Issuer::new(ca_params(node_id, now), &ca_key);
                sign_crl(&Self::revoked(&files, now)?, now, &issuer)?
            }
        };
        Ok(NodePki {
            server: pair("server")?,
            dir: files.dir.clone(),
            node_id: node_id.to_string(),
            ca_end,
            ca,
            crl_pem,
            client_lifetime: CLIENT_LIFETIME,
            issued: Arc::default(),
        })
    }

    /// A client certificate for `role` (its CN), with a fresh key and a
    /// random serial, living `client_lifetime`; held in memory only, its
    /// serial remembered for `revoke`.
    pub fn issue_client(&self, role: &str) -> Result<Pair, PkiError> {
        let now = unix(SystemTime::now());
        let ca_key = self.ca_key()?;
        let issuer = Issuer::new(ca_params(&self.node_id, now), &ca_key);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut serial = [0u8; 16];
        getrandom::fill(&mut serial).map_err(|e| PkiError::Entropy(e.to_string()))?;
        // Positive and minimal as a DER INTEGER.
        serial[0] = (serial[0] & 0x7f).max(1);
        let mut params = leaf_params(role, &[], false, now, self.ca_end, self.client_lifetime);
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let not_after = (now + self.client_lifetime.as_secs()).min(self.ca_end);
        let cert = params.signed_by(&key, &issuer)?;
        let mut issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        issued.retain(|i| i.not_after > now);
        issued.push(Issued {
            role: role.to_string(),
            serial: serial.to_vec(),
            not_after,
        });
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
                let pem = leaf_params(cn, sans, server, now, ca_end, LEAF_LIFETIME)
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
    fn client_certificates_live_a_day_or_the_rotation_interval() {
        let dir = tempfile::tempdir().unwrap();
        let pki = NodePki::ensure(dir.path(), "abcd", &LOOPBACK, SystemTime::now()).unwrap();
        let now = unix(SystemTime::now());
        let lives = |pki: &NodePki| {
            validity(&pki.issue_client("r").unwrap().cert_pem)
                .unwrap()
                .not_after
                .saturating_sub(now)
        };
        assert!((86_000..=86_400).contains(&lives(&pki)));
        let short = pki.with_client_lifetime(Duration::from_secs(3600));
        assert!((3_500..=3_600).contains(&lives(&short)));
    }

    #[test]
    fn revocation_lists_a_roles_certificates_until_they_expire() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::now();
        let pki = NodePki::ensure(dir.path(), "abcd", &LOOPBACK, t0).unwrap();
        assert_eq!(crl_contents(&pki.crl_pem).unwrap().0.len(), 0);
        let old = validity(&pki.issue_client("keepd_abcd_v1").unwrap().cert_pem).unwrap();
        let new = validity(&pki.issue_client("keepd_abcd_v2").unwrap().cert_pem).unwrap();
        assert_ne!(old.serial, new.serial, "random serials");
        assert_eq!(pki.revoke("keepd_abcd_v1").unwrap(), 1);
        assert_eq!(pki.revoke("keepd_abcd_v1").unwrap(), 0, "taken once");

        // The next ensure keeps the CRL written by revoke: it lists exactly
        // the revoked serial and has a week left.
        let again = NodePki::ensure(dir.path(), "abcd", &LOOPBACK, t0).unwrap();
        let (serials, _) = crl_contents(&again.crl_pem).unwrap();
        assert_eq!(serials, vec![old.serial.clone()]);
        let kept = NodePki::ensure(dir.path(), "abcd", &LOOPBACK, t0).unwrap();
        assert_eq!(
            kept.crl_pem, again.crl_pem,
            "nothing changed: not re-signed"
        );

        // Four days on the CRL is re-signed; two days on the certificate
        // has expired and leaves the list.
        let later = NodePki::ensure(
            dir.path(),
            "abcd",
            &LOOPBACK,
            t0 + Duration::from_secs(86_400 + 60),
        )
        .unwrap();
        assert!(crl_contents(&later.crl_pem).unwrap().0.is_empty());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("pki/revoked")).unwrap(),
            ""
        );
    }

    #[test]
    fn a_damaged_revocation_record_is_named() {
        let dir = tempfile::tempdir().unwrap();
        NodePki::ensure(dir.path(), "abcd", &LOOPBACK, SystemTime::now()).unwrap();
        std::fs::write(dir.path().join("pki/revoked"), "zz not a record\n").unwrap();
        let err = NodePki::ensure(dir.path(), "abcd", &LOOPBACK, SystemTime::now()).unwrap_err();
        assert!(err.to_string().contains("pki/revoked"), "{err}");
    }

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
