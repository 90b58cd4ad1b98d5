//! The YAML configuration: schema and defaults (here), humane durations
//! (`duration`), validation per section (`validate`), and what is derived
//! from it once: where files live (`layout`) and how Postgres is reached
//! (`topology`).
//!
//! Keys follow `004_*` of the design seeds so its examples load unchanged.
//! Every error names the file, the key, the bad value and what is allowed;
//! unknown keys are errors so a typo never silently falls back to a default.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

mod duration;
mod layout;
mod topology;
mod validate;

pub use duration::HumanDuration;
pub use layout::{Layout, container};
pub use topology::{Topology, Transport};

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}{}", read_hint(path, source))]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config file {path}: `{key}` = {value} is not allowed: {allowed}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        value: String,
        allowed: String,
    },
}

/// What to do about a config file that cannot be read.
fn read_hint(path: &Path, error: &std::io::Error) -> &'static str {
    match error.kind() {
        std::io::ErrorKind::NotFound if path == Path::new(DEFAULT_CONFIG_PATH) => {
            "; copy config/keepd.example.yaml there (the installed default), or pass --config FILE"
        }
        std::io::ErrorKind::NotFound => "; check the path given to --config",
        std::io::ErrorKind::PermissionDenied => {
            "; keepd's user must be able to read it (0640, group keepd)"
        }
        _ => "",
    }
}

/// Where `--config` points when not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/keepd/keepd.yaml";

/// The whole keepd configuration with every default applied.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeConfig,
    pub log: LogConfig,
    pub database: DatabaseConfig,
    pub credentials: CredentialsConfig,
    pub network: NetworkConfig,
    pub security: SecurityConfig,
    pub encryption_at_rest: EncryptionAtRestConfig,
    pub api: ApiConfig,
    pub backup: BackupConfig,
    pub audit: AuditConfig,
    pub cluster: ClusterConfig,
}

/// Joining a cluster of nodes over one Postgres.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// A file holding a join token (`keepd cluster token create`): a node
    /// the cluster does not know yet is admitted by its members without
    /// an operator. Unset: an operator admits it (`keepd cluster admit`).
    #[serde(deserialize_with = "optional_path")]
    pub join_token_file: Option<PathBuf>,
}

/// The audit trail beyond the database.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// A syslog socket (`/dev/log`: journald under systemd, or rsyslog)
    /// each entry is sent to as one JSON line once sealed into the chain;
    /// unset: none.
    #[serde(deserialize_with = "optional_path")]
    pub forward: Option<PathBuf>,
    /// This node's entries older than this are exported (signed JSON
    /// lines in `export_dir`) and pruned from its chain; unset: the chain
    /// is kept whole.
    pub retention: Option<HumanDuration>,
    /// Where pruned entries are exported; unset: `<state_dir>/audit-exports`.
    #[serde(deserialize_with = "optional_path")]
    pub export_dir: Option<PathBuf>,
}

/// Continuous archiving and backups with pgBackRest (native and docker
/// providers; a bucket for native only).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackupConfig {
    /// pgBackRest's repository, a directory; unset (and no `s3`): no
    /// backups and no WAL archiving (the report says so).
    pub repository: Option<PathBuf>,
    /// The repository in an S3-compatible object store instead.
    pub s3: Option<S3Config>,
    /// A full backup at least this often.
    pub full_interval: HumanDuration,
    /// A differential backup at least this often between full ones.
    pub diff_interval: HumanDuration,
    /// Full backups kept (with the differentials and WAL they need).
    pub retention_full: u32,
}

impl BackupConfig {
    /// Whether keepd archives WAL and takes backups at all.
    pub fn enabled(&self) -> bool {
        self.repository.is_some() || self.s3.is_some()
    }
}

/// An S3-compatible bucket as pgBackRest's repository, over HTTPS. The
/// access key is sealed in db.enc (`keepd backup s3-credentials`), never
/// in this file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Host name, with `:port` when not 443 (no scheme: always HTTPS).
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    /// Where in the bucket, an absolute path.
    #[serde(default = "S3Config::default_path")]
    pub path: String,
    #[serde(default)]
    pub uri_style: S3UriStyle,
    /// CA certificates to verify the endpoint with; unset: the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl S3Config {
    fn default_path() -> String {
        "/keepd".into()
    }

    /// The endpoint's host and port.
    pub fn host_port(&self) -> (&str, u16) {
        match self.endpoint.rsplit_once(':') {
            Some((host, port)) => (host, port.parse().unwrap_or(443)),
            None => (&self.endpoint, 443),
        }
    }
}

/// How the bucket is addressed: `bucket.endpoint` (host) or
/// `endpoint/bucket` (path, for stores without virtual hosts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum S3UriStyle {
    #[default]
    Host,
    Path,
}

impl S3UriStyle {
    pub fn as_str(self) -> &'static str {
        match self {
            S3UriStyle::Host => "host",
            S3UriStyle::Path => "path",
        }
    }
}

impl Default for BackupConfig {
    fn default() -> Self {
        Self {
            repository: None,
            s3: None,
            full_interval: HumanDuration(Duration::from_secs(7 * 86_400)),
            diff_interval: HumanDuration(Duration::from_secs(86_400)),
            retention_full: 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Identity key, sealed credentials and the Postgres data directory.
    pub state_dir: PathBuf,
    /// Sockets and other files that do not survive a reboot.
    pub runtime_dir: PathBuf,
    /// How the identity key is kept at rest (`identity::protection`).
    pub identity: IdentityConfig,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/var/lib/keepd"),
            runtime_dir: PathBuf::from("/run/keepd"),
            identity: IdentityConfig::default(),
        }
    }
}

/// How the identity key is kept at rest: both unset, a plaintext file
/// (0600) in the state directory; at most one of the two.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// A file holding the passphrase the key is sealed under
    /// (`state_dir/identity.sealed`), as a service manager provides it.
    pub passphrase_file: Option<PathBuf>,
    /// A systemd encrypted credential holding the key (`keepd identity
    /// protect --credential`; the unit loads it with
    /// `LoadCredentialEncrypted=keepd-identity:<this path>`).
    pub credential: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter directive such as `info` or `keepd=debug,warn`.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Human,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub backend: Backend,
    pub postgres: PostgresConfig,
    pub pool: PoolConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Connections keepd keeps to Postgres; also the login role's limit.
    pub max_size: u32,
    /// How long a request waits for a connection before failing with 503.
    pub acquire_timeout: HumanDuration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_size: 16,
            acquire_timeout: HumanDuration(Duration::from_secs(5)),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Postgres,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Whether keepd provisions and supervises the server itself; unset, it
    /// follows `provider` (native and docker: yes; external: no). A value
    /// that contradicts the provider is refused.
    pub managed: Option<bool>,
    pub provider: Provider,
    /// Major version to use; the newest installed one when unset.
    pub version: Option<u32>,
    pub max_connections: u32,
    pub log_statement: LogStatement,
    /// Postgres's log files older than this are deleted (native provider
    /// only; `log_retention()` gives the default).
    pub log_retention: Option<HumanDuration>,
    /// The memory Postgres may use, in MiB, which keepd sizes its memory
    /// settings from (`postgres::tuning`); unset: measured (native: the
    /// cgroup limit or the host's RAM; docker: `docker.memory_mb`).
    pub memory_mb: Option<u32>,
    /// Further postgresql.conf parameters, written after keepd's own (so
    /// they may override the sizes it chose); any that would weaken what
    /// keepd enforces is refused by name.
    pub settings: BTreeMap<String, SettingValue>,
    pub native: NativeConfig,
    pub docker: DockerConfig,
    pub external: ExternalConfig,
}

impl PostgresConfig {
    /// How long the native provider keeps Postgres's log files.
    pub fn log_retention(&self) -> Duration {
        self.log_retention
            .map_or(Duration::from_secs(14 * 86_400), HumanDuration::get)
    }
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            managed: None,
            provider: Provider::Native,
            version: None,
            max_connections: 100,
            log_statement: LogStatement::None,
            log_retention: None,
            memory_mb: None,
            settings: BTreeMap::new(),
            native: NativeConfig::default(),
            docker: DockerConfig::default(),
            external: ExternalConfig::default(),
        }
    }
}

/// A postgresql.conf value as YAML writes it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum SettingValue {
    Bool(bool),
    Integer(i64),
    Float(f64),
    Text(String),
}

impl std::fmt::Display for SettingValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SettingValue::Bool(b) => write!(f, "{}", if *b { "on" } else { "off" }),
            SettingValue::Integer(n) => write!(f, "{n}"),
            SettingValue::Float(x) => write!(f, "{x}"),
            SettingValue::Text(t) => f.write_str(t),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Native,
    Docker,
    External,
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Provider::Native => "native",
            Provider::Docker => "docker",
            Provider::External => "external",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStatement {
    None,
    Ddl,
    Mod,
    All,
}

impl LogStatement {
    pub fn as_str(self) -> &'static str {
        match self {
            LogStatement::None => "none",
            LogStatement::Ddl => "ddl",
            LogStatement::Mod => "mod",
            LogStatement::All => "all",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NativeConfig {
    /// Directory holding `initdb` and `postgres`; searched for when unset.
    pub bin_dir: Option<PathBuf>,
    /// Unprivileged OS user Postgres runs as when keepd itself runs as root.
    pub run_as: String,
    pub start_timeout: HumanDuration,
    pub shutdown_timeout: HumanDuration,
}

impl Default for NativeConfig {
    fn default() -> Self {
        Self {
            bin_dir: None,
            run_as: "keepd-postgres".into(),
            start_timeout: HumanDuration(Duration::from_secs(60)),
            shutdown_timeout: HumanDuration(Duration::from_secs(15)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerConfig {
    pub image: String,
    /// Memory limit of the container, in MiB.
    pub memory_mb: u32,
    /// Most processes the container may run.
    pub pids_limit: u32,
    pub start_timeout: HumanDuration,
    pub shutdown_timeout: HumanDuration,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            image: "postgres:15".into(),
            memory_mb: 1024,
            pids_limit: 256,
            start_timeout: HumanDuration(Duration::from_secs(120)),
            shutdown_timeout: HumanDuration(Duration::from_secs(15)),
        }
    }
}

/// The database keepd's schema lives in (also `postgres::DATABASE`).
const DATABASE_NAME: &str = "keepd";

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExternalConfig {
    pub host: Option<String>,
    pub port: u16,
    /// Several servers as `host:port` (an HA cluster): keepd uses whichever
    /// is the writable primary. Instead of `host` and `port`.
    pub hosts: Vec<String>,
    pub database: String,
    /// The bootstrap administrator keepd creates its roles and schema as.
    pub admin_user: String,
    /// A file holding the administrator's password (one line).
    pub admin_password_file: Option<PathBuf>,
    /// Or an environment variable holding it.
    pub admin_password_env: Option<String>,
    pub sslmode: ExternalSslMode,
    /// The CA that signed the server's certificate (verify-full).
    pub ca_file: Option<PathBuf>,
    /// How long keepd waits for the server to accept connections at start.
    pub start_timeout: HumanDuration,
}

impl Default for ExternalConfig {
    fn default() -> Self {
        Self {
            host: None,
            port: 5432,
            hosts: Vec::new(),
            database: "keepd".into(),
            admin_user: "postgres".into(),
            admin_password_file: None,
            admin_password_env: None,
            sslmode: ExternalSslMode::VerifyFull,
            ca_file: None,
            start_timeout: HumanDuration(Duration::from_secs(60)),
        }
    }
}

impl ExternalConfig {
    /// The servers to try, in order: `hosts`, or `host` and `port`. Entries
    /// are checked by validation; one that does not parse is left out.
    pub fn targets(&self) -> Vec<(String, u16)> {
        if self.hosts.is_empty() {
            return self
                .host
                .iter()
                .map(|host| (host.clone(), self.port))
                .collect();
        }
        self.hosts
            .iter()
            .filter_map(|h| parse_host_port(h))
            .collect()
    }
}

/// `host:port`, `[v6 address]:port`.
pub fn parse_host_port(text: &str) -> Option<(String, u16)> {
    let (host, port) = text.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
    (!host.is_empty() && !host.contains(['[', ']', ',', ' '])).then(|| (host.to_string(), port))
}

/// How keepd talks to an external server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExternalSslMode {
    /// TLS, the server's certificate checked against `ca_file` and its name.
    VerifyFull,
    /// No TLS at all (a private network you trust; the report says so).
    Disable,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CredentialsConfig {
    pub encryption_method: SealMethod,
    pub rotation_interval: HumanDuration,
    pub rotation_grace_period: HumanDuration,
    /// How often keepd's own Postgres superuser gets a new password
    /// (native and docker; an external server's administrator is the
    /// operator's).
    pub superuser_rotation_interval: HumanDuration,
    pub password_length: usize,
    /// `secrets/db.enc` under the state directory when unset or empty.
    #[serde(deserialize_with = "optional_path")]
    pub encrypted_path: Option<PathBuf>,
}

impl Default for CredentialsConfig {
    fn default() -> Self {
        Self {
            encryption_method: SealMethod::Hybrid,
            rotation_interval: HumanDuration(Duration::from_secs(168 * 3600)),
            rotation_grace_period: HumanDuration(Duration::from_secs(300)),
            superuser_rotation_interval: HumanDuration(Duration::from_secs(30 * 86_400)),
            password_length: 64,
            encrypted_path: None,
        }
    }
}

/// The shortest password keepd will generate: 128 bits as hex.
pub const MIN_PASSWORD_LENGTH: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SealMethod {
    X25519,
    Hkdf,
    Hybrid,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    pub use_unix_socket: bool,
    pub bind_address: IpAddr,
    pub port: u16,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            use_unix_socket: true,
            bind_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 5432,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    pub fallback_mode: FallbackMode,
    pub minimum_level: SecurityLevel,
    pub log_security_report: bool,
    /// How often the running daemon measures the report again (the
    /// `keepd_security_level` gauge follows it).
    pub remeasure_interval: HumanDuration,
    pub require_client_cert: bool,
    pub allow_client_cert_fallback: bool,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self {
            fallback_mode: FallbackMode::Warn,
            minimum_level: SecurityLevel::Moderate,
            log_security_report: true,
            remeasure_interval: HumanDuration(Duration::from_secs(300)),
            require_client_cert: true,
            allow_client_cert_fallback: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FallbackMode {
    Strict,
    Warn,
    Permissive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecurityLevel {
    Reduced,
    Moderate,
    High,
    Maximum,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncryptionAtRestConfig {
    pub enabled: bool,
    pub method: AtRestMethod,
    pub application: ApplicationEncryptionConfig,
    pub luks: LuksConfig,
    pub recovery: RecoveryConfig,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AtRestMethod {
    /// keepd encrypts the configured columns (AES-256-GCM).
    #[default]
    Application,
    /// The data directory must sit on a dm-crypt volume as `luks` says.
    Luks,
    /// Both.
    Hybrid,
}

impl AtRestMethod {
    pub fn encrypts_fields(self) -> bool {
        matches!(self, AtRestMethod::Application | AtRestMethod::Hybrid)
    }

    pub fn needs_volume(self) -> bool {
        matches!(self, AtRestMethod::Luks | AtRestMethod::Hybrid)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApplicationEncryptionConfig {
    pub algorithm: FieldAlgorithm,
    pub encrypted_fields: Vec<EncryptedFields>,
    /// The lowest field key version new values are sealed under; raising
    /// it rotates at once (existing values are re-encrypted in the
    /// background).
    pub key_version: u32,
    /// A field key older than this is replaced by the next version.
    pub rotate_after: HumanDuration,
    /// A field key that sealed this many values, counted across the
    /// cluster, is replaced by the next version.
    pub rotate_after_uses: u64,
}

impl Default for ApplicationEncryptionConfig {
    fn default() -> Self {
        Self {
            algorithm: FieldAlgorithm::Aes256Gcm,
            encrypted_fields: Vec::new(),
            key_version: 1,
            rotate_after: HumanDuration(Duration::from_secs(90 * 86_400)),
            rotate_after_uses: 1_000_000,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum FieldAlgorithm {
    #[default]
    #[serde(rename = "aes-256-gcm")]
    Aes256Gcm,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptedFields {
    pub table: String,
    pub columns: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
/// What the dm-crypt volume under the data directory must be (methods
/// luks and hybrid): keepd measures the running mapping, it does not
/// create or open one.
pub struct LuksConfig {
    /// The kernel's cipher spec, as `cryptsetup status` shows it.
    pub cipher: String,
    /// The least key size, in bits.
    pub key_size: u32,
}

impl Default for LuksConfig {
    fn default() -> Self {
        Self {
            cipher: "aes-xts-plain64".into(),
            key_size: 512,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecoveryConfig {
    pub method: RecoveryMethod,
    pub shamir: ShamirConfig,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecoveryMethod {
    #[default]
    Shamir,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShamirConfig {
    pub total_shares: u8,
    pub threshold: u8,
    pub shareholder_ids: Vec<String>,
}

impl Default for ShamirConfig {
    fn default() -> Self {
        Self {
            total_shares: 5,
            threshold: 3,
            shareholder_ids: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address the HTTP API listens on; port 0 picks a free port (logged).
    pub listen: SocketAddr,
    /// HTTPS: keepd terminates TLS itself; unset = plain HTTP (loopback or
    /// behind a TLS proxy).
    pub tls: Option<ApiTlsConfig>,
    /// A client must send a request's headers within this (slow-header
    /// clients are closed).
    pub header_timeout: HumanDuration,
    /// A connection that moves no byte and has no request open for this
    /// long is closed.
    pub idle_timeout: HumanDuration,
    /// A request body must arrive within this (408 beyond).
    pub body_timeout: HumanDuration,
    /// Open connections at most; past it new ones are closed at once.
    pub max_connections: u32,
    /// Open connections per client at most (trusted proxies are exempt);
    /// a client is an address grouped by the two prefixes below.
    pub max_connections_per_client: u32,
    /// IPv4 clients are grouped by this prefix length for every per-client
    /// limit (32: each address on its own).
    pub client_prefix_v4: u8,
    /// IPv6 clients are grouped by this prefix length (64: a subscriber's
    /// whole /64 is one client, since it can use 2^64 addresses).
    pub client_prefix_v6: u8,
    /// Bytes of response bodies this node holds for clients that have not
    /// read them yet, at most (a pull past it waits, then 503).
    pub max_response_bytes: usize,
    /// The same, per client.
    pub max_response_bytes_per_client: usize,
    /// The same, per connection.
    pub max_response_bytes_per_connection: usize,
    /// Peers whose `Forwarded` / `X-Forwarded-For` are believed (CIDRs).
    pub trusted_proxies: Vec<ProxyNet>,
    pub jwt_ttl: HumanDuration,
    /// Browser origins allowed to call the API (CORS), exactly as the
    /// browser sends them: `https://app.example.org`.
    pub cors_origins: Vec<String>,
    pub rate_limits: RateLimitsConfig,
    /// What one account may store (413 `quota_exceeded` past it).
    pub quotas: QuotasConfig,
    /// Encrypted backups (`POST /backups`).
    pub backups: ApiBackupsConfig,
    /// Who may create an account: `open`, `invite` or `closed`.
    pub registration: Registration,
    /// How accounts log in.
    pub auth: ApiAuthConfig,
    /// Largest request body accepted, in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Most log entries one `POST /sync/push` may carry.
    pub max_push_entries: usize,
    /// Largest log entry (its decoded `encryptedData`), in bytes (413
    /// beyond).
    pub max_entry_bytes: usize,
    /// Bytes one pull answers at most: fewer entries and `hasMore: true`
    /// past it (always at least one entry), so a pull's memory is bounded.
    pub max_pull_bytes: usize,
    /// A request not answered within this is answered 503 (the database
    /// is stalled), instead of hanging.
    pub request_timeout: HumanDuration,
    /// How long an `Idempotency-Key` names its first request; expired
    /// records (and expired sessions) are deleted in the background.
    pub idempotency_ttl: HumanDuration,
    /// Where `/metrics` is served; empty = nowhere. Never the public
    /// listener.
    #[serde(deserialize_with = "optional_addr")]
    pub metrics_listen: Option<SocketAddr>,
    /// Live updates (`GET /sync/events`, Server-Sent Events).
    pub events: EventsConfig,
}

/// The bounds of live-update streams.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Streams open on this node at most (429 `too_many_streams` past it).
    pub max_streams: u32,
    /// Streams one account may hold open at most.
    pub max_streams_per_account: u32,
    /// Streams one client (address, grouped by `api.client_prefix_*`) may
    /// hold open at most.
    pub max_streams_per_client: u32,
    /// A stream that has sent no event for this long is ended (the client
    /// reconnects with `Last-Event-ID`), so an idle stream has a bounded
    /// life.
    pub max_idle: HumanDuration,
    /// A comment line this often keeps proxies from closing an idle stream
    /// (under `api.idle_timeout`).
    pub heartbeat: HumanDuration,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            max_streams: 1000,
            max_streams_per_account: 5,
            max_streams_per_client: 100,
            max_idle: HumanDuration(Duration::from_secs(3600)),
            heartbeat: HumanDuration(Duration::from_secs(15)),
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8787)),
            tls: None,
            header_timeout: HumanDuration(Duration::from_secs(10)),
            idle_timeout: HumanDuration(Duration::from_secs(60)),
            body_timeout: HumanDuration(Duration::from_secs(30)),
            max_connections: 1024,
            max_connections_per_client: 64,
            client_prefix_v4: 32,
            client_prefix_v6: 64,
            max_response_bytes: 256 * 1024 * 1024,
            max_response_bytes_per_client: 64 * 1024 * 1024,
            max_response_bytes_per_connection: 32 * 1024 * 1024,
            trusted_proxies: Vec::new(),
            jwt_ttl: HumanDuration(Duration::from_secs(7 * 86400)),
            cors_origins: Vec::new(),
            rate_limits: RateLimitsConfig::default(),
            quotas: QuotasConfig::default(),
            backups: ApiBackupsConfig::default(),
            registration: Registration::Open,
            auth: ApiAuthConfig::default(),
            max_body_bytes: 8 * 1024 * 1024,
            max_push_entries: 10_000,
            max_entry_bytes: 1024 * 1024,
            max_pull_bytes: 8 * 1024 * 1024,
            request_timeout: HumanDuration(Duration::from_secs(15)),
            idempotency_ttl: HumanDuration(Duration::from_secs(24 * 3600)),
            metrics_listen: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 9187))),
            events: EventsConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiTlsConfig {
    /// The certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    #[serde(default)]
    pub min_version: TlsMinVersion,
}

/// The oldest TLS version the API accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum TlsMinVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

impl fmt::Display for TlsMinVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsMinVersion::Tls12 => "TLS 1.2",
            TlsMinVersion::Tls13 => "TLS 1.3",
        })
    }
}

/// A network of trusted reverse proxies: `10.0.0.0/8`, `::1/128`, or one
/// address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyNet(pub ipnet::IpNet);

impl ProxyNet {
    pub fn contains(&self, addr: IpAddr) -> bool {
        self.0.contains(&addr)
    }
}

impl FromStr for ProxyNet {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Ok(net) = text.parse::<ipnet::IpNet>() {
            return Ok(ProxyNet(net));
        }
        if let Ok(addr) = text.parse::<IpAddr>() {
            return Ok(ProxyNet(ipnet::IpNet::from(addr)));
        }
        Err(format!(
            "`{text}` is not a network: write an address with a prefix length such as \
             10.0.0.0/8 or fd00::/8, or a single address such as 127.0.0.1"
        ))
    }
}

impl fmt::Display for ProxyNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> Deserialize<'de> for ProxyNet {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitsConfig {
    /// Authentication attempts (login, register, password change, account
    /// erasure) per client address per minute.
    pub auth_per_minute: u32,
    /// Requests per second per account on authenticated routes...
    pub account_per_second: u32,
    /// ...and how many more may come at once.
    pub account_burst: u32,
    /// Requests per second per client address on unauthenticated routes
    /// (and requests whose token is refused)...
    pub address_per_second: u32,
    /// ...and how many more may come at once.
    pub address_burst: u32,
    /// Failed logins to one account from addresses it has not logged in
    /// from before each further attempt from such an address waits.
    pub login_failures_free: u32,
    /// The longest such wait; it doubles per failure from 1 s.
    pub login_delay_max: HumanDuration,
}

impl Default for RateLimitsConfig {
    fn default() -> Self {
        Self {
            auth_per_minute: 10,
            account_per_second: 20,
            account_burst: 100,
            address_per_second: 20,
            address_burst: 100,
            login_failures_free: 5,
            login_delay_max: HumanDuration(Duration::from_secs(15 * 60)),
        }
    }
}

/// What one account may store; 0 = unlimited.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotasConfig {
    /// Bytes of log entries and backups as the client sent them, decoded
    /// (docs/api.md, "Limits").
    pub storage_bytes: u64,
    pub vaults: u32,
    /// Devices, revoked ones included until they are purged.
    pub devices: u32,
    pub backups: u32,
    /// A revoked device is deleted this long after its revocation (and
    /// stops counting against `devices`), unless backups it signed are
    /// still stored.
    pub revoked_device_retention: HumanDuration,
}

impl Default for QuotasConfig {
    fn default() -> Self {
        Self {
            storage_bytes: 1024 * 1024 * 1024,
            vaults: 100,
            devices: 50,
            backups: 1000,
            revoked_device_retention: HumanDuration(Duration::from_secs(30 * 86_400)),
        }
    }
}

/// What `POST /backups` accepts.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiBackupsConfig {
    /// Accept signature version 1 (legacy: over the ciphertext alone, so a
    /// device's signature can be replayed with another nonce, tag or
    /// classification). On for clients written to the HaexHub shapes; the
    /// security report warns while it is.
    pub accept_v1_signatures: bool,
}

impl Default for ApiBackupsConfig {
    fn default() -> Self {
        Self {
            accept_v1_signatures: true,
        }
    }
}

/// How accounts log in (`api.auth`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiAuthConfig {
    /// The password routes (`/auth/register`, `/auth/login`, and the
    /// current password of `/auth/password` and `DELETE /account`), which
    /// show the server the password. On for clients written to the
    /// HaexHub routes; the security report warns while it is. Off, only
    /// OPAQUE logs in (`/auth/opaque/...`).
    pub password_login: bool,
    /// Every account must have a confirmed second factor (TOTP) and log
    /// in with it before any sync route answers (403
    /// `second_factor_required` until then).
    pub require_second_factor: bool,
}

impl Default for ApiAuthConfig {
    fn default() -> Self {
        Self {
            password_login: true,
            require_second_factor: false,
        }
    }
}

/// Who may create an account.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Registration {
    /// Anyone.
    #[default]
    Open,
    /// Whoever holds a code from `keepd account invite`.
    Invite,
    /// Nobody: no account can be created.
    Closed,
}

fn optional_addr<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<SocketAddr>, D::Error> {
    let text: Option<String> = Option::deserialize(deserializer)?;
    match text.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(addr) => addr.parse().map(Some).map_err(|_| {
            serde::de::Error::custom(format!(
                "`{addr}` is not an address: write host:port such as 127.0.0.1:9187, or \"\" for none"
            ))
        }),
    }
}

fn optional_path<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<PathBuf>, D::Error> {
    let text: Option<String> = Option::deserialize(deserializer)?;
    Ok(text.filter(|t| !t.trim().is_empty()).map(PathBuf::from))
}

/// A parse error as an operator reads it: the key path once (none when
/// the YAML itself is broken, where the parser's line and column say
/// where), and kinds in words instead of Rust's type names.
fn humane(key: &str, error: &serde_norway::Error) -> String {
    let mut text = error.to_string();
    // The parser's message may start with the path already.
    if let Some(rest) = text.strip_prefix(&format!("{key}: ")) {
        text = rest.to_string();
    }
    for (rust, words) in [
        ("expected u8", "expected a whole number from 0 to 255"),
        ("expected u16", "expected a whole number from 0 to 65535"),
        (
            "expected u32",
            "expected a whole number from 0 to 4294967295",
        ),
        ("expected u64", "expected a whole number, 0 or more"),
        ("expected usize", "expected a whole number, 0 or more"),
        ("expected i16", "expected a whole number"),
        ("expected i32", "expected a whole number"),
        ("expected i64", "expected a whole number"),
        ("expected f64", "expected a number"),
        ("expected a boolean", "expected true or false"),
    ] {
        text = text.replace(rust, words);
    }
    if let Some(start) = text.find("expected struct ") {
        // `expected struct NodeConfig`: a section of settings.
        let end = text[start + 16..]
            .find(|c: char| !c.is_alphanumeric())
            .map_or(text.len(), |i| start + 16 + i);
        text.replace_range(start..end, "expected a section of settings (a mapping)");
    }
    let broken = key.is_empty() || key == "." || key.contains('?');
    match (broken, error.location()) {
        (true, Some(at)) if !text.contains("line ") => format!(
            "invalid YAML at line {}, column {}: {text}",
            at.line(),
            at.column()
        ),
        (true, _) => format!("invalid YAML: {text}"),
        (false, _) => format!("at `{key}`: {text}"),
    }
}

impl Config {
    /// Reads, parses and validates a config file; relative paths are taken
    /// from the working directory so `config/dev.yaml` keeps state beside it.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let cwd = std::env::current_dir().map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_yaml(&text, path, &cwd)
    }

    /// Parses and validates YAML text; `path` is only used in messages.
    pub fn from_yaml(text: &str, path: &Path, base: &Path) -> Result<Config, ConfigError> {
        let mut config = if text.lines().all(|l| {
            let l = l.trim();
            l.is_empty() || l.starts_with('#') || l == "---"
        }) {
            Config::default()
        } else {
            let deserializer = serde_norway::Deserializer::from_str(text);
            serde_path_to_error::deserialize(deserializer).map_err(|err| {
                let key = err.path().to_string();
                let inner = err.into_inner();
                ConfigError::Syntax {
                    path: path.to_owned(),
                    message: humane(&key, &inner),
                }
            })?
        };
        config.resolve_paths(base);
        config.validate(path)?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let absolute = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        absolute(&mut self.node.state_dir);
        absolute(&mut self.node.runtime_dir);
        if let Some(p) = self.credentials.encrypted_path.as_mut() {
            absolute(p);
        }
        if let Some(p) = self.backup.repository.as_mut() {
            absolute(p);
        }
        if let Some(p) = self.database.postgres.native.bin_dir.as_mut() {
            absolute(p);
        }
        if let Some(tls) = self.api.tls.as_mut() {
            absolute(&mut tls.cert);
            absolute(&mut tls.key);
        }
        let external = &mut self.database.postgres.external;
        for p in [&mut external.admin_password_file, &mut external.ca_file]
            .into_iter()
            .flatten()
        {
            absolute(p);
        }
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let sections = [
            validate::node(&self.node),
            validate::log(&self.log),
            validate::credentials(&self.credentials),
            validate::database(&self.database),
            validate::encryption_at_rest(&self.encryption_at_rest),
            validate::security(&self.security),
            validate::api(&self.api),
            validate::quotas(&self.api.quotas),
            validate::backup(&self.backup, self.database.postgres.provider),
            validate::audit(&self.audit),
        ];
        for result in sections {
            result.map_err(|e| ConfigError::Invalid {
                path: path.to_owned(),
                key: e.key,
                value: e.value,
                allowed: e.allowed,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_yaml(text, Path::new("test.yaml"), Path::new("/base"))
    }

    fn error(text: &str) -> String {
        parse(text)
            .expect_err("config should be rejected")
            .to_string()
    }

    #[test]
    fn managed_follows_the_provider_and_a_contradiction_is_refused() {
        for provider in ["native", "docker"] {
            let yaml =
                format!("database:\n  postgres:\n    managed: true\n    provider: {provider}\n");
            parse(&yaml).unwrap();
            let yaml =
                format!("database:\n  postgres:\n    managed: false\n    provider: {provider}\n");
            let says = error(&yaml);
            assert!(
                says.contains("database.postgres.managed") && says.contains("provider: external"),
                "{says}"
            );
        }
        let external = "database:\n  postgres:\n    provider: external\n    managed: true\n    \
                        external:\n      host: db.example.org\n      admin_password_file: /p\n";
        let says = error(external);
        assert!(says.contains("database.postgres.managed"), "{says}");
    }

    #[test]
    fn an_s3_repository_is_checked_field_by_field() {
        let s3 = |fields: &str| {
            format!(
                "backup:\n  s3:\n    endpoint: s3.example.org\n    bucket: b\n    region: eu-1\n{fields}"
            )
        };
        let ok = parse(&s3("    path: /keepd/node-a\n    uri_style: path\n")).unwrap();
        assert!(ok.backup.enabled());
        assert_eq!(
            ok.backup.s3.as_ref().unwrap().host_port(),
            ("s3.example.org", 443)
        );
        for (yaml, key, says) in [
            (
                "backup:\n  repository: /r\n  s3:\n    endpoint: e\n    bucket: b\n    region: r\n"
                    .to_string(),
                "backup.s3",
                "not both",
            ),
            (
                s3("").replace("s3.example.org", "https://s3.example.org"),
                "backup.s3.endpoint",
                "without a scheme",
            ),
            (
                s3("").replace("s3.example.org", "s3.example.org:99999"),
                "backup.s3.endpoint",
                ":port",
            ),
            (
                s3("").replace("bucket: b", "bucket: 'a b'"),
                "backup.s3.bucket",
                "bucket name",
            ),
            (
                s3("    path: relative\n"),
                "backup.s3.path",
                "absolute path",
            ),
            (
                s3("    uri_style: virtual\n"),
                "backup.s3.uri_style",
                "host",
            ),
        ] {
            let msg = error(&yaml);
            assert!(msg.contains(key) && msg.contains(says), "{yaml}: {msg}");
        }
    }

    #[test]
    fn errors_name_the_key_once_in_plain_words() {
        let msg = error("database:\n  postgres:\n    max_connections: lots\n");
        assert!(
            msg.contains("at `database.postgres.max_connections`"),
            "{msg}"
        );
        assert_eq!(msg.matches("max_connections").count(), 1, "{msg}");
        assert!(
            msg.contains("a whole number") && !msg.contains("u32"),
            "{msg}"
        );
        let msg = error("node:\n\tstate_dir: /a\n");
        assert!(msg.contains("line 2 column 1"), "{msg}");
        assert!(!msg.contains('?'), "{msg}");
        for level in ["verbose", "", "keepd=loud", "debug,chatty"] {
            let msg = error(&format!("log:\n  level: {level:?}\n"));
            assert!(
                msg.contains("log.level") && msg.contains("off, error, warn"),
                "{level}: {msg}"
            );
        }
        for level in ["info", "WARN", "keepd=debug,warn", "off"] {
            parse(&format!("log:\n  level: {level}\n")).unwrap();
        }
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = parse("# nothing\n").unwrap();
        assert_eq!(c.database.postgres.provider, Provider::Native);
        assert!(c.network.use_unix_socket);
        assert_eq!(c.credentials.password_length, 64);
        assert_eq!(c.credentials.encryption_method, SealMethod::Hybrid);
        assert_eq!(c.node.state_dir, PathBuf::from("/var/lib/keepd"));
        assert_eq!(
            Layout::of(&c).credentials(),
            PathBuf::from("/var/lib/keepd/secrets/db.enc")
        );
    }

    #[test]
    fn seed_example_parses_unchanged() {
        let text = r#"
# Storage security configuration
database:
  backend: postgres
  postgres:
    managed: true

credentials:
  encryption_method: "hybrid"
  rotation_interval: 168h
  rotation_grace_period: 5m
  password_length: 64
  encrypted_path: ""

encryption_at_rest:
  enabled: true
  method: "application"
  application:
    algorithm: "aes-256-gcm"
    encrypted_fields:
      - table: datasets
        columns: [content, metadata]
  recovery:
    method: "shamir"
    shamir:
      total_shares: 5
      threshold: 3

network:
  use_unix_socket: false
  bind_address: "127.0.0.1"

security:
  fallback_mode: "warn"
  minimum_level: "moderate"
  log_security_report: true
  require_client_cert: true
  allow_client_cert_fallback: false
"#;
        let c = parse(text).unwrap();
        assert_eq!(
            c.credentials.rotation_interval.get(),
            Duration::from_secs(168 * 3600)
        );
        assert_eq!(
            c.credentials.rotation_grace_period.get(),
            Duration::from_secs(300)
        );
        assert_eq!(c.credentials.encrypted_path, None);
        assert!(c.encryption_at_rest.enabled);
        assert_eq!(c.encryption_at_rest.application.encrypted_fields.len(), 1);
        assert!(!c.network.use_unix_socket);
        assert_eq!(c.security.minimum_level, SecurityLevel::Moderate);
    }

    #[test]
    fn relative_paths_resolve_against_base() {
        let c = parse("node:\n  state_dir: .keepd/state\n  runtime_dir: /run/x\n").unwrap();
        assert_eq!(c.node.state_dir, PathBuf::from("/base/.keepd/state"));
        assert_eq!(c.node.runtime_dir, PathBuf::from("/run/x"));
    }

    #[test]
    fn unknown_key_is_named() {
        let msg = error("node:\n  stat_dir: /x\n");
        assert!(msg.contains("test.yaml"), "{msg}");
        assert!(msg.contains("stat_dir"), "{msg}");
        assert!(msg.contains("state_dir"), "should list allowed keys: {msg}");
    }

    #[test]
    fn unknown_top_level_key_is_named() {
        let msg = error("databse:\n  backend: postgres\n");
        assert!(msg.contains("databse"), "{msg}");
    }

    #[test]
    fn bad_enum_value_names_key_and_choices() {
        let msg = error("database:\n  postgres:\n    provider: nativ\n");
        assert!(msg.contains("database.postgres.provider"), "{msg}");
        assert!(msg.contains("nativ"), "{msg}");
        assert!(msg.contains("native") && msg.contains("docker"), "{msg}");
    }

    #[test]
    fn bad_duration_names_key_and_format() {
        let msg = error("credentials:\n  rotation_interval: 7 days\n");
        assert!(msg.contains("credentials.rotation_interval"), "{msg}");
        assert!(msg.contains("7 days"), "{msg}");
        assert!(msg.contains("168h"), "{msg}");
    }

    #[test]
    fn short_password_rejected() {
        let msg = error("credentials:\n  password_length: 16\n");
        assert!(msg.contains("credentials.password_length"), "{msg}");
        assert!(msg.contains("16"), "{msg}");
        assert!(msg.contains("at least 32"), "{msg}");
    }

    #[test]
    fn grace_must_be_shorter_than_interval() {
        let msg = error("credentials:\n  rotation_interval: 1h\n  rotation_grace_period: 2h\n");
        assert!(msg.contains("rotation_grace_period"), "{msg}");
    }

    #[test]
    fn revoked_device_retention_is_bounded() {
        for bad in ["0s", "366d"] {
            let msg = error(&format!(
                "api:\n  quotas:\n    revoked_device_retention: {bad}\n"
            ));
            assert!(
                msg.contains("api.quotas.revoked_device_retention") && msg.contains("1s to 365d"),
                "{msg}"
            );
        }
        let ok = parse("api:\n  quotas:\n    revoked_device_retention: 7d\n").unwrap();
        assert_eq!(
            ok.api.quotas.revoked_device_retention.get(),
            Duration::from_secs(7 * 86_400)
        );
    }

    #[test]
    fn shamir_threshold_checked() {
        let msg = error(
            "encryption_at_rest:\n  recovery:\n    shamir:\n      total_shares: 3\n      threshold: 4\n",
        );
        assert!(msg.contains("threshold"), "{msg}");
        let msg = error("encryption_at_rest:\n  recovery:\n    shamir:\n      threshold: 1\n");
        assert!(msg.contains("threshold"), "{msg}");
    }

    #[test]
    fn wrong_type_is_named() {
        let msg = error("network:\n  port: lots\n");
        assert!(msg.contains("network.port"), "{msg}");
        let msg = error("api:\n  listen: not-an-address\n");
        assert!(msg.contains("api.listen"), "{msg}");
    }

    #[test]
    fn bad_run_as_user_rejected() {
        let msg = error("database:\n  postgres:\n    native:\n      run_as: \"root; rm\"\n");
        assert!(msg.contains("run_as"), "{msg}");
    }

    #[test]
    fn external_needs_host() {
        let msg = error("database:\n  postgres:\n    provider: external\n");
        assert!(msg.contains("database.postgres.external.host"), "{msg}");
    }

    #[test]
    fn external_hosts_are_host_port_pairs() {
        let ext = |rest: &str| {
            format!(
                "database:\n  postgres:\n    provider: external\n    external:\n      \
                 admin_password_env: PW\n      sslmode: disable\n{rest}"
            )
        };
        let msg = error(&ext("      hosts: [\"db1:5432\", \"db2\"]\n"));
        assert!(
            msg.contains("database.postgres.external.hosts") && msg.contains("db2"),
            "{msg}"
        );
        let msg = error(&ext("      host: db0\n      hosts: [\"db1:5432\"]\n"));
        assert!(msg.contains("not both"), "{msg}");
        let mut config = ExternalConfig {
            hosts: vec!["db1:5432".into(), "[2001:db8::1]:5433".into()],
            ..ExternalConfig::default()
        };
        assert_eq!(
            config.targets(),
            vec![("db1".into(), 5432), ("2001:db8::1".into(), 5433)]
        );
        config.hosts.clear();
        config.host = Some("db0".into());
        assert_eq!(config.targets(), vec![("db0".into(), 5432)]);
        for bad in ["db1", "db1:0", ":5432", "db1:port", "a,b:5432"] {
            assert_eq!(parse_host_port(bad), None, "{bad}");
        }
    }

    #[test]
    fn api_edge_settings_are_checked() {
        let msg = error("api:\n  trusted_proxies: [10.0.0.0/33]\n");
        assert!(
            msg.contains("api.trusted_proxies") && msg.contains("10.0.0.0/33"),
            "{msg}"
        );
        let msg = error("api:\n  trusted_proxies: [proxy.example]\n");
        assert!(msg.contains("not a network"), "{msg}");
        let ok = parse("api:\n  trusted_proxies: [10.0.0.0/8, \"::1\", 192.0.2.7]\n").unwrap();
        assert!(ok.api.trusted_proxies[1].contains("::1".parse().unwrap()));
        assert!(ok.api.trusted_proxies[2].contains("192.0.2.7".parse().unwrap()));
        assert!(!ok.api.trusted_proxies[2].contains("192.0.2.8".parse().unwrap()));
        for (origin, says) in [
            ("https://app.example.org/path", "no path"),
            ("https://app.example.org/", "no path"),
            ("*", "wildcard"),
            ("app.example.org", "scheme://host"),
            ("ftp://app.example.org", "http or https"),
        ] {
            let msg = error(&format!("api:\n  cors_origins: [\"{origin}\"]\n"));
            assert!(
                msg.contains("api.cors_origins") && msg.contains(origin) && msg.contains(says),
                "{origin}: {msg}"
            );
        }
        let ok = parse("api:\n  cors_origins: [\"https://app.example.org:8443\"]\n").unwrap();
        assert_eq!(ok.api.cors_origins.len(), 1);
        let msg = error("api:\n  tls:\n    cert: a\n    key: b\n    min_version: \"1.1\"\n");
        assert!(
            msg.contains("api.tls.min_version") && msg.contains("1.3"),
            "{msg}"
        );
        let msg = error("api:\n  max_connections: 4\n");
        assert!(msg.contains("api.max_connections"), "{msg}");
        let msg = error("api:\n  header_timeout: 0s\n");
        assert!(msg.contains("api.header_timeout"), "{msg}");
        let off = parse("api:\n  metrics_listen: \"\"\n").unwrap();
        assert_eq!(off.api.metrics_listen, None);
        let msg = error("api:\n  listen: 127.0.0.1:9000\n  metrics_listen: 127.0.0.1:9000\n");
        assert!(msg.contains("api.metrics_listen"), "{msg}");
    }

    #[test]
    fn yaml_syntax_error_reported() {
        let msg = error("node: [unclosed\n");
        assert!(msg.contains("test.yaml"), "{msg}");
    }

    #[test]
    fn shipped_example_sets_every_default() {
        let text = include_str!("../../config/keepd.example.yaml");
        let example =
            Config::from_yaml(text, Path::new("keepd.example.yaml"), Path::new("/")).unwrap();
        assert_eq!(example, Config::default());
    }

    #[test]
    fn shipped_dev_config_loads() {
        let text = include_str!("../../config/dev.yaml");
        let dev = Config::from_yaml(text, Path::new("dev.yaml"), Path::new("/w")).unwrap();
        assert_eq!(dev.node.state_dir, PathBuf::from("/w/.keepd/state"));
        assert_eq!(dev.node.runtime_dir, PathBuf::from("/w/.keepd/run"));
    }
}
