//! The YAML configuration: schema, defaults and validation.
//!
//! Keys follow `004_*` of the design seeds so its examples load unchanged.
//! Every error names the file, the key, the bad value and what is allowed;
//! unknown keys are errors so a typo never silently falls back to a default.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
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
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Identity key, sealed credentials and the Postgres data directory.
    pub state_dir: PathBuf,
    /// Sockets and other files that do not survive a reboot.
    pub runtime_dir: PathBuf,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/var/lib/keepd"),
            runtime_dir: PathBuf::from("/run/keepd"),
        }
    }
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
    /// keepd provisions and supervises the server itself.
    pub managed: bool,
    pub provider: Provider,
    /// Major version to use; the newest installed one when unset.
    pub version: Option<u32>,
    pub max_connections: u32,
    pub log_statement: LogStatement,
    pub native: NativeConfig,
    pub docker: DockerConfig,
    pub external: ExternalConfig,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            managed: true,
            provider: Provider::Native,
            version: None,
            max_connections: 100,
            log_statement: LogStatement::Ddl,
            native: NativeConfig::default(),
            docker: DockerConfig::default(),
            external: ExternalConfig::default(),
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
    pub require_client_cert: bool,
    pub allow_client_cert_fallback: bool,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self {
            fallback_mode: FallbackMode::Warn,
            minimum_level: SecurityLevel::Moderate,
            log_security_report: true,
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
    #[default]
    Application,
    Luks,
    Tde,
    Hybrid,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApplicationEncryptionConfig {
    pub algorithm: FieldAlgorithm,
    pub encrypted_fields: Vec<EncryptedFields>,
    /// The field key new values are sealed under; raising it re-encrypts
    /// existing values in the background.
    pub key_version: u32,
}

impl Default for ApplicationEncryptionConfig {
    fn default() -> Self {
        Self {
            algorithm: FieldAlgorithm::Aes256Gcm,
            encrypted_fields: Vec::new(),
            key_version: 1,
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
pub struct LuksConfig {
    pub volume_size: String,
    pub cipher: String,
    pub key_size: u32,
    pub hash_algorithm: String,
}

impl Default for LuksConfig {
    fn default() -> Self {
        Self {
            volume_size: "50GB".into(),
            cipher: "aes-xts-plain64".into(),
            key_size: 512,
            hash_algorithm: "sha512".into(),
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
    /// Open connections per client address at most (trusted proxies are
    /// exempt).
    pub max_connections_per_client: u32,
    /// Peers whose `Forwarded` / `X-Forwarded-For` are believed (CIDRs).
    pub trusted_proxies: Vec<ProxyNet>,
    pub jwt_ttl: HumanDuration,
    /// Browser origins allowed to call the API (CORS), exactly as the
    /// browser sends them: `https://app.example.org`.
    pub cors_origins: Vec<String>,
    pub rate_limits: RateLimitsConfig,
    /// Largest request body accepted, in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Most log entries one `POST /sync/push` may carry.
    pub max_push_entries: usize,
    /// A request not answered within this is answered 503 (the database
    /// is stalled), instead of hanging.
    pub request_timeout: HumanDuration,
    /// Where `/metrics` is served; empty = nowhere. Never the public
    /// listener.
    #[serde(deserialize_with = "optional_addr")]
    pub metrics_listen: Option<SocketAddr>,
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
            trusted_proxies: Vec::new(),
            jwt_ttl: HumanDuration(Duration::from_secs(7 * 86400)),
            cors_origins: Vec::new(),
            rate_limits: RateLimitsConfig::default(),
            max_body_bytes: 8 * 1024 * 1024,
            max_push_entries: 1000,
            request_timeout: HumanDuration(Duration::from_secs(15)),
            metrics_listen: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 9187))),
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

/// Why `origin` is not a CORS origin as browsers send it, if it is not.
fn origin_problem(origin: &str) -> Option<&'static str> {
    if origin == "*" || origin.contains('*') {
        return Some("name each origin exactly; keepd never allows a wildcard");
    }
    let Some((scheme, authority)) = origin.split_once("://") else {
        return Some("an origin is scheme://host[:port], e.g. https://app.example.org");
    };
    if !matches!(scheme, "http" | "https") {
        return Some("the scheme is http or https");
    }
    if authority.is_empty() {
        return Some("an origin names a host");
    }
    if authority.contains(['/', '?', '#']) {
        return Some("an origin has no path, query or trailing slash: scheme://host[:port] only");
    }
    if authority.contains('@')
        || authority
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Some("an origin has no user information or spaces");
    }
    if authority.chars().any(|c| c.is_ascii_uppercase()) {
        return Some("browsers send origins in lower case; write it so");
    }
    None
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitsConfig {
    /// Login and register attempts per client address per minute.
    pub auth_per_minute: u32,
}

impl Default for RateLimitsConfig {
    fn default() -> Self {
        Self {
            auth_per_minute: 10,
        }
    }
}

/// A duration written the way people write them: `30s`, `5m`, `168h`, `7d`, `1h30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn get(self) -> Duration {
        self.0
    }
}

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let help = || {
            format!(
                "`{text}` is not a duration: write a number followed by ms, s, m, h, d or w, \
                 e.g. `30s`, `5m`, `168h` or `1h30m`"
            )
        };
        let mut rest = text.trim();
        if rest.is_empty() {
            return Err(help());
        }
        let mut total = Duration::ZERO;
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            if digits == 0 {
                return Err(help());
            }
            let value: u64 = rest[..digits].parse().map_err(|_| help())?;
            rest = &rest[digits..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let millis_per_unit: u64 = match &rest[..unit_len] {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                "w" => 604_800_000,
                _ => return Err(help()),
            };
            rest = &rest[unit_len..];
            let millis = value.checked_mul(millis_per_unit).ok_or_else(help)?;
            total = total
                .checked_add(Duration::from_millis(millis))
                .ok_or_else(help)?;
        }
        Ok(HumanDuration(total))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        let units = [
            (604_800_000, "w"),
            (86_400_000, "d"),
            (3_600_000, "h"),
            (60_000, "m"),
            (1_000, "s"),
        ];
        for (size, unit) in units {
            if ms >= size && ms.is_multiple_of(size) {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
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
                let message = if key == "." || key.is_empty() {
                    inner.to_string()
                } else {
                    format!("at `{key}`: {inner}")
                };
                ConfigError::Syntax {
                    path: path.to_owned(),
                    message,
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
        let invalid = |key: &'static str, value: String, allowed: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            value,
            allowed,
        };
        let creds = &self.credentials;
        if creds.password_length < MIN_PASSWORD_LENGTH {
            return Err(invalid(
                "credentials.password_length",
                creds.password_length.to_string(),
                format!("at least {MIN_PASSWORD_LENGTH} (64 recommended)"),
            ));
        }
        if creds.password_length > 1024 {
            return Err(invalid(
                "credentials.password_length",
                creds.password_length.to_string(),
                "at most 1024".into(),
            ));
        }
        if creds.rotation_interval.get() < Duration::from_secs(60) {
            return Err(invalid(
                "credentials.rotation_interval",
                creds.rotation_interval.to_string(),
                "at least 1m".into(),
            ));
        }
        if creds.rotation_grace_period >= creds.rotation_interval {
            return Err(invalid(
                "credentials.rotation_grace_period",
                creds.rotation_grace_period.to_string(),
                format!(
                    "shorter than credentials.rotation_interval ({})",
                    creds.rotation_interval
                ),
            ));
        }
        let pg = &self.database.postgres;
        if !(5..=10_000).contains(&pg.max_connections) {
            return Err(invalid(
                "database.postgres.max_connections",
                pg.max_connections.to_string(),
                "5 to 10000".into(),
            ));
        }
        let pool = &self.database.pool;
        if pool.max_size == 0 || pool.max_size + 5 > pg.max_connections {
            return Err(invalid(
                "database.pool.max_size",
                pool.max_size.to_string(),
                format!(
                    "1 to database.postgres.max_connections - 5 ({}), leaving room for \
                     rotation and administration",
                    pg.max_connections.saturating_sub(5)
                ),
            ));
        }
        let api = &self.api;
        if !(1024..=1024 * 1024 * 1024).contains(&api.max_body_bytes) {
            return Err(invalid(
                "api.max_body_bytes",
                api.max_body_bytes.to_string(),
                "1024 to 1073741824 (1 GiB)".into(),
            ));
        }
        if !(1..=100_000).contains(&api.max_push_entries) {
            return Err(invalid(
                "api.max_push_entries",
                api.max_push_entries.to_string(),
                "1 to 100000".into(),
            ));
        }
        if api.request_timeout.get() < Duration::from_secs(1) {
            return Err(invalid(
                "api.request_timeout",
                api.request_timeout.to_string(),
                "at least 1s".into(),
            ));
        }
        if api.rate_limits.auth_per_minute == 0 {
            return Err(invalid(
                "api.rate_limits.auth_per_minute",
                "0".into(),
                "at least 1 (attempts per client address per minute)".into(),
            ));
        }
        for (key, value) in [
            ("api.header_timeout", api.header_timeout),
            ("api.idle_timeout", api.idle_timeout),
            ("api.body_timeout", api.body_timeout),
        ] {
            if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&value.get()) {
                return Err(invalid(key, value.to_string(), "1s to 1h".into()));
            }
        }
        if !(16..=1_000_000).contains(&api.max_connections) {
            return Err(invalid(
                "api.max_connections",
                api.max_connections.to_string(),
                "16 to 1000000 (and below the process's open-file limit)".into(),
            ));
        }
        if !(1..=api.max_connections).contains(&api.max_connections_per_client) {
            return Err(invalid(
                "api.max_connections_per_client",
                api.max_connections_per_client.to_string(),
                format!("1 to api.max_connections ({})", api.max_connections),
            ));
        }
        for origin in &api.cors_origins {
            if let Some(problem) = origin_problem(origin) {
                return Err(invalid(
                    "api.cors_origins",
                    format!("{origin:?}"),
                    problem.into(),
                ));
            }
        }
        if let Some(metrics) = api.metrics_listen
            && metrics.port() != 0
            && metrics == api.listen
        {
            return Err(invalid(
                "api.metrics_listen",
                metrics.to_string(),
                "an address other than api.listen (metrics are never on the public listener)"
                    .into(),
            ));
        }
        if api.jwt_ttl.get() < Duration::from_secs(60) {
            return Err(invalid(
                "api.jwt_ttl",
                api.jwt_ttl.to_string(),
                "at least 1m".into(),
            ));
        }
        if pool.acquire_timeout.get() < Duration::from_millis(100) {
            return Err(invalid(
                "database.pool.acquire_timeout",
                pool.acquire_timeout.to_string(),
                "at least 100ms".into(),
            ));
        }
        if let Some(v) = pg.version
            && !(13..=99).contains(&v)
        {
            return Err(invalid(
                "database.postgres.version",
                v.to_string(),
                "a PostgreSQL major version of 13 or later, e.g. 15".into(),
            ));
        }
        if !is_os_user_name(&pg.native.run_as) {
            return Err(invalid(
                "database.postgres.native.run_as",
                format!("{:?}", pg.native.run_as),
                "a user name of lowercase letters, digits, `-` and `_`, starting with a letter"
                    .into(),
            ));
        }
        let at_rest = &self.encryption_at_rest;
        if at_rest.application.key_version == 0 {
            return Err(invalid(
                "encryption_at_rest.application.key_version",
                "0".into(),
                "1 or more".into(),
            ));
        }
        if pg.docker.image.trim().is_empty() || pg.docker.image.chars().any(char::is_whitespace) {
            return Err(invalid(
                "database.postgres.docker.image",
                format!("{:?}", pg.docker.image),
                "an image reference such as postgres:15 or registry.example/postgres:15".into(),
            ));
        }
        if pg.docker.memory_mb < 128 {
            return Err(invalid(
                "database.postgres.docker.memory_mb",
                pg.docker.memory_mb.to_string(),
                "at least 128 (MiB)".into(),
            ));
        }
        if pg.docker.pids_limit < 32 {
            return Err(invalid(
                "database.postgres.docker.pids_limit",
                pg.docker.pids_limit.to_string(),
                "at least 32 (Postgres forks a process per connection)".into(),
            ));
        }
        for (key, timeout) in [
            (
                "database.postgres.native.start_timeout",
                pg.native.start_timeout,
            ),
            (
                "database.postgres.docker.start_timeout",
                pg.docker.start_timeout,
            ),
            (
                "database.postgres.external.start_timeout",
                pg.external.start_timeout,
            ),
        ] {
            if timeout.get() < Duration::from_secs(1) {
                return Err(invalid(key, timeout.to_string(), "at least 1s".into()));
            }
        }
        if pg.provider == Provider::External {
            let ext = &pg.external;
            if ext.host.is_none() {
                return Err(invalid(
                    "database.postgres.external.host",
                    "(unset)".into(),
                    "the host name of the external server, required with provider: external".into(),
                ));
            }
            if ext.database != DATABASE_NAME {
                return Err(invalid(
                    "database.postgres.external.database",
                    ext.database.clone(),
                    format!("{DATABASE_NAME} (keepd's schema and grants name its database)"),
                ));
            }
            if ext.admin_password_file.is_some() == ext.admin_password_env.is_some() {
                return Err(invalid(
                    "database.postgres.external.admin_password_file",
                    format!(
                        "{:?} with admin_password_env {:?}",
                        ext.admin_password_file, ext.admin_password_env
                    ),
                    "exactly one of admin_password_file and admin_password_env".into(),
                ));
            }
            if ext.sslmode == ExternalSslMode::VerifyFull && ext.ca_file.is_none() {
                return Err(invalid(
                    "database.postgres.external.ca_file",
                    "(unset)".into(),
                    "the CA certificate (PEM) that signed the server's, required with \
                     sslmode: verify-full"
                        .into(),
                ));
            }
        }
        if self.node.state_dir == self.node.runtime_dir {
            return Err(invalid(
                "node.runtime_dir",
                self.node.runtime_dir.display().to_string(),
                "a directory other than node.state_dir".into(),
            ));
        }
        let shamir = &self.encryption_at_rest.recovery.shamir;
        if shamir.threshold < 2 || shamir.threshold > shamir.total_shares {
            return Err(invalid(
                "encryption_at_rest.recovery.shamir.threshold",
                shamir.threshold.to_string(),
                format!(
                    "from 2 to total_shares ({}); one share alone must not recover the key",
                    shamir.total_shares
                ),
            ));
        }
        if !shamir.shareholder_ids.is_empty()
            && shamir.shareholder_ids.len() != usize::from(shamir.total_shares)
        {
            return Err(invalid(
                "encryption_at_rest.recovery.shamir.shareholder_ids",
                format!("{} names", shamir.shareholder_ids.len()),
                format!(
                    "none, or exactly total_shares ({}) names",
                    shamir.total_shares
                ),
            ));
        }
        if let Err(err) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(invalid(
                "log.level",
                format!("{:?}", self.log.level),
                format!("a level (error, warn, info, debug, trace) or filter directive ({err})"),
            ));
        }
        Ok(())
    }

    /// Where the sealed credentials live.
    pub fn credentials_path(&self) -> PathBuf {
        self.credentials
            .encrypted_path
            .clone()
            .unwrap_or_else(|| self.node.state_dir.join("secrets").join("db.enc"))
    }
}

fn is_os_user_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && name.len() <= 32
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
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
    fn empty_file_gives_defaults() {
        let c = parse("# nothing\n").unwrap();
        assert_eq!(c.database.postgres.provider, Provider::Native);
        assert!(c.network.use_unix_socket);
        assert_eq!(c.credentials.password_length, 64);
        assert_eq!(c.credentials.encryption_method, SealMethod::Hybrid);
        assert_eq!(c.node.state_dir, PathBuf::from("/var/lib/keepd"));
        assert_eq!(
            c.credentials_path(),
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
        let text = include_str!("../config/keepd.example.yaml");
        let example =
            Config::from_yaml(text, Path::new("keepd.example.yaml"), Path::new("/")).unwrap();
        assert_eq!(example, Config::default());
    }

    #[test]
    fn shipped_dev_config_loads() {
        let text = include_str!("../config/dev.yaml");
        let dev = Config::from_yaml(text, Path::new("dev.yaml"), Path::new("/w")).unwrap();
        assert_eq!(dev.node.state_dir, PathBuf::from("/w/.keepd/state"));
        assert_eq!(dev.node.runtime_dir, PathBuf::from("/w/.keepd/run"));
    }

    #[test]
    fn durations_parse() {
        let d = |s: &str| s.parse::<HumanDuration>().map(|d| d.get());
        assert_eq!(d("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(d("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(d("168h"), Ok(Duration::from_secs(168 * 3600)));
        assert_eq!(d("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert_eq!(d("1w"), Ok(Duration::from_secs(7 * 86400)));
        assert_eq!(d("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(d("250ms"), Ok(Duration::from_millis(250)));
        for bad in ["", "5", "m", "5x", "-5m", "5 m", "99999999999999999999w"] {
            assert!(d(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn durations_display_round_trip() {
        for text in ["30s", "5m", "168h", "7d", "2w", "250ms"] {
            let d: HumanDuration = text.parse().unwrap();
            let again: HumanDuration = d.to_string().parse().unwrap();
            assert_eq!(d, again, "{text}");
        }
    }
}
