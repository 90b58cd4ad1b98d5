//! The checks, measured: settings through `SHOW`, pg_hba through
//! `pg_hba_file_rules`, roles through the catalogs, file modes through
//! `stat`, container facts through the engine, certificates by reading
//! them, and a forbidden connection actually attempted.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::SystemTime;

use tokio_postgres::Client;

use super::volume::Volume;
use super::{Check, Status, Weight};
use crate::backup::{BackupStatus, PgBackRest};
use crate::config::{Config, Layout, LuksConfig, Provider, Topology, Transport};
use crate::edge::CertificateInfo;
use crate::field_crypto::FieldPlan;
use crate::identity::NodeIdentity;
use crate::postgres::docker::ContainerFacts;
use crate::postgres::render::PGAUDIT_SUPERUSER_CLASSES;
use crate::postgres::tls::Endpoint;
use crate::postgres::{AUDITOR_ROLE, GROUP_ROLES, SUPERUSER, describe_error};
use crate::secrets::store::CredentialStore;

/// What `measure` looks at.
pub struct Inputs<'a> {
    pub config: &'a Config,
    pub identity: &'a NodeIdentity,
    /// keepd's superuser (the administrator on an external server), on
    /// keepd's database.
    pub superuser: &'a Endpoint,
    /// The active login role.
    pub login_role: &'a str,
    pub container: Option<&'a ContainerFacts>,
    /// The server certificate keepd issued (its own servers, TCP mode).
    pub server_certificate: Option<&'a str>,
    /// The API's certificate as loaded (`api.tls`); None when TLS is off
    /// or the files cannot be read.
    pub api_certificate: Option<CertificateInfo>,
    /// pgBackRest, with `backup.repository` set (or why it cannot run).
    pub backups: Option<Result<&'a PgBackRest, String>>,
}

pub async fn measure(inputs: &Inputs<'_>) -> Vec<Check> {
    let config = inputs.config;
    let mut checks = vec![
        sealing(inputs),
        api_tls(config, inputs.api_certificate, SystemTime::now()),
        api_exposure(config),
        api_metrics(config),
    ];
    let client = match inputs.superuser.connect().await {
        Ok(client) => client,
        Err(e) => {
            checks.push(
                Check::new(
                    "postgres.reachable",
                    Weight::Critical,
                    Status::Fail,
                    format!("cannot connect: {}", describe_error(&e)),
                )
                .recommend("start keepd (or its server) and run the report again"),
            );
            checks.push(backup_signatures(config));
            return checks;
        }
    };
    checks.push(login_role(&client, inputs.login_role).await);
    checks.push(group_roles(&client).await);
    checks.push(transport(config));
    let tcp = Topology::of(config).is_tcp();
    checks.push(tls_version(&client, tcp).await);
    checks.push(client_certificates(&client, config, tcp).await);
    checks.push(hba_rules(&client, config).await);
    checks.push(
        setting_is(
            &client,
            "auth.password_encryption",
            Weight::Major,
            "password_encryption",
            "scram-sha-256",
        )
        .await,
    );
    checks.push(logging(&client).await);
    checks.push(auth_delay(&client).await);
    checks.push(pgaudit(&client, config).await);
    checks.push(superuser(&client, config).await);
    checks.push(foreign_roles(&client, config).await);
    checks.push(public_privileges(&client, inputs).await);
    checks.push(encryption_at_rest(&client, inputs).await);
    checks.push(audit_chain(&client, inputs).await);
    checks.push(certificate_expiry(inputs.server_certificate));
    checks.push(file_modes(config));
    checks.push(forbidden_connection(config).await);
    checks.push(container(
        inputs.container,
        config,
        inputs.identity.node_id().as_str(),
    ));
    checks.push(backups(&client, inputs).await);
    checks.push(backup_signatures(config));
    checks.push(password_login(config));
    checks.push(identity_protection(config));
    checks.push(cluster_key(&client).await);
    checks.push(memory_settings(&client).await);
    checks
}

/// The memory settings the server runs with (`postgres::tuning` sizes
/// them for the servers keepd runs), as it reports them.
async fn memory_settings(client: &tokio_postgres::Client) -> Check {
    let id = "postgres.memory";
    let names = [
        "shared_buffers",
        "effective_cache_size",
        "work_mem",
        "maintenance_work_mem",
        "max_wal_size",
    ];
    let mut shown = Vec::new();
    for name in names {
        match client.query_one(&format!("SHOW {name}"), &[]).await {
            Ok(row) => shown.push(format!("{name} {}", row.get::<_, String>(0))),
            Err(e) => return Check::new(id, Weight::Minor, Status::Fail, describe_error(&e)),
        }
    }
    Check::new(id, Weight::Minor, Status::Pass, shown.join(", "))
}

/// Whether a node removed from the cluster still knows the current
/// cluster key (it can mint tokens every node accepts and derive the keys
/// of new field versions until the key rotates).
async fn cluster_key(client: &tokio_postgres::Client) -> Check {
    let id = "cluster.key";
    let row = client
        .query_one(
            "SELECT (SELECT string_agg(DISTINCT r.node_id, ', ') FROM keepd.cluster_removals r \
               WHERE r.removed_at > coalesce((SELECT max(rotated_at) FROM keepd.cluster_key_log), \
                                             '-infinity')), \
             coalesce((SELECT max(generation) FROM keepd.cluster_key_log), 1)",
            &[],
        )
        .await;
    match row {
        Err(e) => Check::new(id, Weight::Minor, Status::Fail, describe_error(&e)),
        Ok(row) => {
            let generation: i32 = row.get(1);
            match row.get::<_, Option<String>>(0) {
                Some(removed) => Check::new(
                    id,
                    Weight::Minor,
                    Status::Warn,
                    format!(
                        "generation {generation} is still known to removed node(s) {removed}: \
                         they can mint tokens every node accepts"
                    ),
                )
                .recommend("run `keepd cluster rotate-key` on a member"),
                None => Check::new(
                    id,
                    Weight::Minor,
                    Status::Pass,
                    format!("generation {generation}; no removed node knows it"),
                ),
            }
        }
    }
}

/// How the identity key, which unseals every other secret, is kept at
/// rest: in the clear, whoever copies the state directory (a host backup,
/// a snapshot, a stolen disk) holds everything.
fn identity_protection(config: &Config) -> Check {
    use crate::identity::protection::{IdentityStore, Protection};
    let id = "identity.protection";
    let store = IdentityStore::of(config);
    let protection = store.protection();
    let value = format!("{}: {}", protection.describe(), store.path().display());
    match protection {
        Protection::Plaintext => Check::new(id, Weight::Minor, Status::Warn, value).recommend(
            "seal it: under systemd as an encrypted credential (node.identity.credential, then \
             `keepd identity protect`; docs/operations.md), elsewhere under a passphrase \
             (node.identity.passphrase_file)",
        ),
        Protection::Passphrase | Protection::Credential => {
            Check::new(id, Weight::Minor, Status::Pass, value)
        }
    }
}

/// Whether the password routes, which show the server every password
/// that logs in, still answer.
fn password_login(config: &Config) -> Check {
    let id = "api.password_login";
    if config.api.auth.password_login {
        Check::new(
            id,
            Weight::Minor,
            Status::Warn,
            "the password routes answer: every password login shows this server the password \
             (inside TLS), where a compromised node, a debugging proxy or a memory dump sees it",
        )
        .recommend(
            "once every client logs in with OPAQUE (/auth/opaque/...) and every account has \
             moved (POST /auth/opaque/upgrade), set api.auth.password_login: false",
        )
    } else {
        Check::new(
            id,
            Weight::Minor,
            Status::Pass,
            "only OPAQUE logs in: no password reaches this server",
        )
    }
}

/// Whether a backup signed over its ciphertext alone is still accepted:
/// such a signature can be replayed with another nonce, tag or
/// classification.
fn backup_signatures(config: &Config) -> Check {
    let id = "api.backup_signatures";
    if config.api.backups.accept_v1_signatures {
        Check::new(
            id,
            Weight::Minor,
            Status::Warn,
            "legacy version 1 backup signatures (over the ciphertext alone) are accepted: \
             one can be replayed with another nonce, tag or classification",
        )
        .recommend(
            "once every client sends signatureVersion 2, set \
             api.backups.accept_v1_signatures: false",
        )
    } else {
        Check::new(
            id,
            Weight::Minor,
            Status::Pass,
            "only version 2 backup signatures (binding device, classification, nonce and tag) \
             are accepted",
        )
    }
}

/// Backups: the newest one within the schedule, and WAL archived.
async fn backups(client: &Client, inputs: &Inputs<'_>) -> Check {
    let id = "backup";
    let pgbackrest = match &inputs.backups {
        None => return Check::new(id, Weight::Major, Status::NotApplicable, "no backup repository configured: no point-in-time recovery")
            .recommend("set backup.repository or backup.s3 (native provider); an external server is backed up by its cluster's tools"),
        Some(Err(why)) => return Check::new(id, Weight::Major, Status::Fail, format!("backups are configured but cannot run: {why}")),
        Some(Ok(pgbackrest)) => *pgbackrest,
    };
    let backup = &inputs.config.backup;
    let archiver = client
        .query_one(
            "SELECT coalesce(last_failed_time > coalesce(last_archived_time, '-infinity'), false), \
               coalesce(extract(epoch FROM now() - last_archived_time)::int8, -1) FROM pg_stat_archiver",
            &[],
        )
        .await;
    let archive_lag = match archiver {
        Ok(row) if row.get::<_, bool>(0) => {
            return Check::new(id, Weight::Major, Status::Fail, "WAL archiving is failing: commits since the last archived segment are on this disk only, and pg_wal grows")
                .recommend(format!("make {} writable and reachable for Postgres's account; the Postgres log names the error", backup.repository.as_ref().map_or_else(|| backup.s3.as_ref().map_or("the repository".into(), |s3| format!("bucket {} at {}", s3.bucket, s3.endpoint)), |p| p.display().to_string())));
        }
        Ok(row) => row.get::<_, i64>(1),
        Err(e) => {
            return Check::new(
                id,
                Weight::Major,
                Status::Warn,
                format!("cannot read the archiver's state: {}", describe_error(&e)),
            );
        }
    };
    let info = pgbackrest
        .info(true)
        .await
        .and_then(|json| BackupStatus::from_info(&json));
    let now = crate::clock::unix_now();
    let allowed = backup.diff_interval.get().as_secs() + 3600;
    match info {
        Err(e) => Check::new(id, Weight::Major, Status::Warn, format!("cannot read the repository: {e}")),
        Ok(BackupStatus { last_any: None, .. }) => Check::new(id, Weight::Major, Status::Warn, "no backup yet (keepd takes the first one right after it starts)")
            .recommend("wait for the first backup, or run `keepd backup now --full`"),
        Ok(BackupStatus { last_any: Some(at), .. }) if now.saturating_sub(at) > allowed => {
            Check::new(id, Weight::Major, Status::Warn, format!("the newest backup is {} h old; backup.diff_interval asks for one every {}", now.saturating_sub(at) / 3600, backup.diff_interval))
                .recommend("see the log for why backups fail (lines starting `backup:`), or run `keepd backup now`")
        }
        Ok(BackupStatus { last_any: Some(at), .. }) => Check::new(id, Weight::Major, Status::Pass, format!(
            "newest backup {} min old, WAL archived {}",
            now.saturating_sub(at) / 60,
            if archive_lag < 0 { "(no segment yet)".to_string() } else { format!("{archive_lag} s ago") }
        )),
    }
}

fn sealing(inputs: &Inputs<'_>) -> Check {
    let id = "credentials.sealing";
    match CredentialStore::new(Layout::of(inputs.config).credentials().to_owned())
        .load(inputs.identity)
    {
        Ok(Some((_, method))) => Check::new(
            id,
            Weight::Critical,
            Status::Pass,
            format!("db.enc sealed to the node identity ({method:?})").to_lowercase(),
        ),
        Ok(None) => Check::new(id, Weight::Critical, Status::Fail, "db.enc is missing")
            .recommend("restore db.enc from the backup taken with identity.key"),
        Err(e) => Check::new(id, Weight::Critical, Status::Fail, e.to_string())
            .recommend("restore db.enc and identity.key from the same backup"),
    }
}

async fn login_role(client: &Client, role: &str) -> Check {
    let id = "roles.login_role";
    let row = client
        .query_opt(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls, rolinherit \
             FROM pg_roles WHERE rolname = $1",
            &[&role],
        )
        .await;
    match row {
        Ok(Some(row)) => {
            let names = [
                "SUPERUSER",
                "CREATEROLE",
                "CREATEDB",
                "REPLICATION",
                "BYPASSRLS",
                "INHERIT",
            ];
            let held: Vec<&str> = names
                .iter()
                .enumerate()
                .filter(|(i, _)| row.get::<_, bool>(*i))
                .map(|(_, n)| *n)
                .collect();
            if held.is_empty() {
                Check::new(
                    id,
                    Weight::Critical,
                    Status::Pass,
                    format!("{role}: no special attributes, NOINHERIT"),
                )
            } else {
                Check::new(
                    id,
                    Weight::Critical,
                    Status::Fail,
                    format!("{role} has {}", held.join(", ")),
                )
                .recommend("restart keepd: it aligns its login role's attributes at start")
            }
        }
        Ok(None) => Check::new(
            id,
            Weight::Critical,
            Status::Fail,
            format!("{role} does not exist"),
        ),
        Err(e) => Check::new(id, Weight::Critical, Status::Fail, describe_error(&e)),
    }
}

async fn group_roles(client: &Client) -> Check {
    let id = "roles.group_roles";
    let names: Vec<String> = GROUP_ROLES.iter().map(|s| s.to_string()).collect();
    match client
        .query(
            "SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname = ANY($1) ORDER BY 1",
            &[&names],
        )
        .await
    {
        Ok(rows) => {
            let login: Vec<String> = rows
                .iter()
                .filter(|r| r.get::<_, bool>(1))
                .map(|r| r.get(0))
                .collect();
            match (rows.len() == names.len(), login.is_empty()) {
                (true, true) => Check::new(
                    id,
                    Weight::Major,
                    Status::Pass,
                    format!(
                        "{} least-privilege group roles, none can log in",
                        rows.len()
                    ),
                ),
                (false, _) => Check::new(
                    id,
                    Weight::Major,
                    Status::Fail,
                    format!("{} of {} group roles exist", rows.len(), names.len()),
                ),
                (true, false) => Check::new(
                    id,
                    Weight::Major,
                    Status::Fail,
                    format!("group roles that can log in: {}", login.join(", ")),
                ),
            }
        }
        Err(e) => Check::new(id, Weight::Major, Status::Fail, describe_error(&e)),
    }
}

fn transport(config: &Config) -> Check {
    let id = "network.transport";
    let topology = Topology::of(config);
    match (topology.provider, topology.transport) {
        (Provider::External, _) => Check::new(
            id,
            Weight::Minor,
            Status::Warn,
            "TCP to an external server (its network exposure is not keepd's to verify)",
        )
        .recommend("keep the external server on a private network"),
        (_, Transport::UnixSocket) => Check::new(
            id,
            Weight::Minor,
            Status::Pass,
            "Unix socket only, no TCP listener",
        ),
        (Provider::Docker, Transport::Tcp) => Check::new(
            id,
            Weight::Minor,
            Status::Warn,
            "TCP on the container's internal network",
        )
        .recommend("use network.use_unix_socket: true where the platform allows it"),
        (Provider::Native, Transport::Tcp) => Check::new(
            id,
            Weight::Minor,
            Status::Warn,
            format!(
                "TCP on {}:{}",
                config.network.bind_address, config.network.port
            ),
        )
        .recommend("use network.use_unix_socket: true where the platform allows it"),
    }
}

async fn show(client: &Client, setting: &str) -> Result<String, String> {
    client
        .query_one(&format!("SHOW {setting}"), &[])
        .await
        .map(|r| r.get(0))
        .map_err(|e| describe_error(&e))
}

async fn tls_version(client: &Client, tcp: bool) -> Check {
    let id = "tls.minimum_version";
    if !tcp {
        return Check::new(
            id,
            Weight::Critical,
            Status::NotApplicable,
            "no TCP: nothing to encrypt on the wire",
        );
    }
    match (
        show(client, "ssl").await,
        show(client, "ssl_min_protocol_version").await,
    ) {
        (Ok(ssl), _) if ssl != "on" => Check::new(id, Weight::Critical, Status::Fail, "ssl = off")
            .recommend(
                "turn TLS on: a TCP connection without it exposes passwords' exchanges and data",
            ),
        (Ok(_), Ok(v)) if v == "TLSv1.3" => {
            Check::new(id, Weight::Critical, Status::Pass, "TLS 1.3 enforced")
        }
        (Ok(_), Ok(v)) => Check::new(
            id,
            Weight::Critical,
            Status::Warn,
            format!("ssl_min_protocol_version = {v}"),
        )
        .recommend("set ssl_min_protocol_version = 'TLSv1.3'"),
        (Err(e), _) | (_, Err(e)) => Check::new(id, Weight::Critical, Status::Fail, e),
    }
}

/// The rules Postgres loaded: (type, auth method, options, error).
async fn hba(
    client: &Client,
) -> Result<Vec<(String, String, Vec<String>, Option<String>)>, String> {
    client
        .query(
            "SELECT type, coalesce(auth_method, ''), coalesce(options, '{}'), error \
             FROM pg_hba_file_rules ORDER BY line_number",
            &[],
        )
        .await
        .map(|rows| {
            rows.iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
                .collect()
        })
        .map_err(|e| describe_error(&e))
}

async fn client_certificates(client: &Client, config: &Config, tcp: bool) -> Check {
    let id = "tls.client_certificates";
    if !tcp {
        return Check::new(
            id,
            Weight::Major,
            Status::NotApplicable,
            "no TCP: the socket's directory mode guards it (security.require_client_cert and \
             allow_client_cert_fallback apply to TCP only)",
        );
    }
    if config.database.postgres.provider == Provider::External {
        return Check::new(
            id,
            Weight::Major,
            Status::NotApplicable,
            "an external server's client-certificate policy is its own (cannot verify)",
        );
    }
    match hba(client).await {
        Ok(rules) => {
            let open: Vec<_> = rules
                .iter()
                .filter(|(kind, method, _, _)| kind.starts_with("host") && method != "reject")
                .collect();
            let all_verify = !open.is_empty()
                && open.iter().all(|(_, _, options, _)| {
                    options.iter().any(|o| o == "clientcert=verify-full")
                });
            let crl = show(client, "ssl_crl_file").await.unwrap_or_default();
            if all_verify && crl.is_empty() {
                Check::new(
                    id,
                    Weight::Major,
                    Status::Warn,
                    "client certificates required, but no revocation list is checked (ssl_crl_file)",
                )
                .recommend("restart keepd: its rendered configuration names the node's CRL")
            } else if all_verify {
                Check::new(
                    id,
                    Weight::Major,
                    Status::Pass,
                    format!(
                        "client certificate required (verify-full) on every TCP rule; keepd's live \
                         {} h at most, revoked ones listed in {crl}",
                        crate::pki::CLIENT_LIFETIME.as_secs() / 3600
                    ),
                )
            } else {
                Check::new(
                    id,
                    Weight::Major,
                    Status::Fail,
                    "TCP rules accept connections without a verified client certificate",
                )
                .recommend(
                    "set security.require_client_cert: true and allow_client_cert_fallback: false",
                )
            }
        }
        Err(e) => Check::new(id, Weight::Major, Status::Fail, e),
    }
}

async fn hba_rules(client: &Client, config: &Config) -> Check {
    let id = "hba.rules";
    let weight = Weight::Critical;
    match hba(client).await {
        Err(_) if config.database.postgres.provider == Provider::External => Check::new(
            id,
            weight,
            Status::NotApplicable,
            "pg_hba_file_rules is not readable on the external server (cannot verify)",
        ),
        Err(e) => Check::new(id, weight, Status::Fail, e),
        Ok(rules) => {
            let errors = rules.iter().filter(|r| r.3.is_some()).count();
            let weak: Vec<&str> = rules
                .iter()
                .map(|r| r.1.as_str())
                .filter(|m| !matches!(*m, "scram-sha-256" | "reject" | "cert"))
                .collect();
            // Scope (CIS 5.10): on keepd's own servers only its superuser
            // may reach every database; an external server's rules are
            // its operator's.
            let wide = match config.database.postgres.provider {
                Provider::External => Vec::new(),
                Provider::Native | Provider::Docker => wide_rules(client).await,
            };
            if errors > 0 {
                Check::new(
                    id,
                    weight,
                    Status::Fail,
                    format!("{errors} rule(s) in error"),
                )
            } else if !wide.is_empty() {
                Check::new(
                    id,
                    weight,
                    Status::Fail,
                    format!("rules let {} reach every database", wide.join(", ")),
                )
                .recommend("scope every rule but the superuser's to database keepd")
            } else if !weak.is_empty() {
                Check::new(
                    id,
                    weight,
                    Status::Fail,
                    format!("weak methods allowed: {}", weak.join(", ")),
                )
                .recommend("allow only scram-sha-256 (or cert); reject everything else")
            } else {
                Check::new(
                    id,
                    weight,
                    Status::Pass,
                    format!(
                        "{} rules: scram-sha-256 or reject only; login roles reach database keepd only",
                        rules.len()
                    ),
                )
            }
        }
    }
}

/// The users of allowing rules that name every database, the superuser
/// apart.
async fn wide_rules(client: &Client) -> Vec<String> {
    client
        .query(
            "SELECT array_to_string(user_name, ',') FROM pg_hba_file_rules \
             WHERE coalesce(auth_method, '') <> 'reject' AND 'all' = ANY(database) \
               AND user_name <> ARRAY[$1::text]",
            &[&SUPERUSER],
        )
        .await
        .map(|rows| rows.iter().map(|r| r.get(0)).collect())
        .unwrap_or_else(|e| vec![format!("(unreadable: {})", describe_error(&e))])
}

async fn setting_is(
    client: &Client,
    id: &'static str,
    weight: Weight,
    setting: &str,
    wanted: &str,
) -> Check {
    match show(client, setting).await {
        Ok(v) if v == wanted => Check::new(id, weight, Status::Pass, format!("{setting} = {v}")),
        Ok(v) => Check::new(id, weight, Status::Fail, format!("{setting} = {v}"))
            .recommend(format!("set {setting} = '{wanted}'")),
        Err(e) => Check::new(id, weight, Status::Fail, e),
    }
}

/// CIS 3.1: what is logged, and where: connections, disconnections and
/// replication commands with verbose errors, no statement text with data,
/// to private files outside the data directory rotated daily (keepd deletes them after
/// `database.postgres.log_retention`).
async fn logging(client: &Client) -> Check {
    let id = "logging.settings";
    let mut values = Vec::new();
    for name in [
        "log_connections",
        "log_disconnections",
        "log_replication_commands",
        "log_error_verbosity",
        "log_statement",
        "logging_collector",
        "log_directory",
        "log_file_mode",
        "log_rotation_age",
    ] {
        match show(client, name).await {
            Ok(v) => values.push((name, v)),
            Err(_) => {
                return Check::new(
                    id,
                    Weight::Minor,
                    Status::Warn,
                    "logging settings not readable",
                );
            }
        }
    }
    let wanted = |name: &str, value: &str| match name {
        "log_connections"
        | "log_disconnections"
        | "log_replication_commands"
        | "logging_collector" => value == "on",
        "log_error_verbosity" => value == "verbose",
        "log_statement" => value != "all",
        // A relative directory is inside the data directory (CIS 3.1.3):
        // a copy of the data would carry the log, a restore replace it.
        "log_directory" => value.starts_with('/'),
        "log_file_mode" => value == "0600",
        // At most a day per file, so retention deletes by day.
        "log_rotation_age" => matches!(value, "1d" | "1h" | "24h"),
        _ => true,
    };
    let off: Vec<String> = values
        .iter()
        .filter(|(name, value)| !wanted(name, value))
        .map(|(name, value)| format!("{name} = {value}"))
        .collect();
    let statement = values
        .iter()
        .find(|(name, _)| *name == "log_statement")
        .map_or("", |(_, value)| value.as_str());
    if off.is_empty() {
        Check::new(
            id,
            Weight::Minor,
            Status::Pass,
            format!(
                "connections, disconnections and replication commands logged, errors verbose, \
                 log_statement = {statement}, daily files 0600"
            ),
        )
    } else {
        Check::new(id, Weight::Minor, Status::Warn, off.join(", ")).recommend(
            "log connections, disconnections and replication commands with verbose errors to \
             0600 files rotated daily; avoid log_statement = all (statements carry data)",
        )
    }
}

/// Failed authentications answered only after a delay (auth_delay).
async fn auth_delay(client: &Client) -> Check {
    let id = "auth.delay";
    match show(client, "auth_delay.milliseconds").await {
        Ok(ms) if ms.trim_end_matches("ms").parse::<u64>().is_ok_and(|n| n >= 100) => Check::new(
            id,
            Weight::Minor,
            Status::Pass,
            format!("a failed authentication waits {ms} before its answer"),
        ),
        Ok(ms) => Check::new(id, Weight::Minor, Status::Warn, format!("auth_delay.milliseconds = {ms}"))
            .recommend("load auth_delay with at least 100 ms (keepd's rendered configuration does)"),
        Err(_) => Check::new(id, Weight::Minor, Status::Warn, "auth_delay is not loaded: failed logins are answered at once")
            .recommend("add auth_delay to shared_preload_libraries (keepd's rendered configuration does; on an external server, its operator)"),
    }
}

/// pgAudit loaded and configured as keepd renders it: every session's
/// role and DDL statements, everything of other superuser sessions, object
/// logging through `AUDITOR_ROLE`, no parameter values.
async fn pgaudit(client: &Client, config: &Config) -> Check {
    let id = "audit.pgaudit";
    let managed = config.database.postgres.provider != Provider::External;
    let major = show(client, "server_version_num")
        .await
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .map_or("N".to_string(), |v| (v / 10_000).to_string());
    let missing = |value: String| {
        match managed {
        true => Check::new(id, Weight::Major, Status::Fail, value).recommend(format!(
            "install pgAudit beside the server (Debian: postgresql-{major}-pgaudit; docker: an \
             image that carries it) and restart keepd, which loads and configures it"
        )),
        false => Check::new(id, Weight::Major, Status::Warn, value).recommend(
            "load pgAudit on the external server (shared_preload_libraries, pgaudit.log = 'role, ddl'); \
             that is its operator's job",
        ),
    }
    };
    let preload = match show(client, "shared_preload_libraries").await {
        Ok(v) => v,
        Err(e) => return missing(e),
    };
    if !preload.split(',').any(|l| l.trim() == "pgaudit") {
        return missing(
            "pgAudit is not loaded: what a session does to data is not logged (CIS 3.2)".into(),
        );
    }
    let mut unmet = Vec::new();
    // keepd's servers: this session asked for keepd's own classes, so the
    // server-wide value is what the configuration files say. An external
    // server's is whatever its administrator's session sees.
    let server_wide = match managed {
        true => client
            .query_opt(
                "SELECT setting FROM pg_file_settings WHERE name = 'pgaudit.log' AND applied",
                &[],
            )
            .await
            .map(|row| row.map(|r| r.get::<_, String>(0)).unwrap_or_default())
            .map_err(|e| describe_error(&e)),
        false => show(client, "pgaudit.log").await,
    };
    let wanted: &[&str] = if managed { &["all"] } else { &["role", "ddl"] };
    match server_wide {
        Ok(value) => {
            let classes: Vec<String> = value.split(',').map(|c| c.trim().to_lowercase()).collect();
            let has = |c: &str| classes.iter().any(|x| x == c || x == "all");
            if !wanted.iter().all(|c| has(c)) {
                unmet.push(format!(
                    "pgaudit.log = {value:?} server-wide (wants {})",
                    wanted.join(", ")
                ));
            }
        }
        Err(e) => unmet.push(e),
    }
    match show(client, "pgaudit.log_parameter").await {
        Ok(v) if v == "off" => {}
        Ok(v) => unmet.push(format!(
            "pgaudit.log_parameter = {v} (parameters can hold secrets)"
        )),
        Err(e) => unmet.push(e),
    }
    let extension = client
        .query_opt("SELECT 1 FROM pg_extension WHERE extname = 'pgaudit'", &[])
        .await;
    if !matches!(extension, Ok(Some(_))) {
        unmet.push("extension pgaudit not created in database keepd".into());
    }
    if managed {
        match show(client, "pgaudit.role").await {
            Ok(v) if v == AUDITOR_ROLE => {}
            Ok(v) => unmet.push(format!("pgaudit.role = {v:?} (wants {AUDITOR_ROLE})")),
            Err(e) => unmet.push(e),
        }
        let superuser_setting = format!("pgaudit.log={PGAUDIT_SUPERUSER_CLASSES}");
        let logged = client
            .query_opt(
                "SELECT 1 FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole \
                 WHERE r.rolname = $1 AND s.setdatabase = 0 AND $2 = ANY(s.setconfig)",
                &[&SUPERUSER, &superuser_setting],
            )
            .await;
        if !matches!(logged, Ok(Some(_))) {
            unmet.push(format!("{SUPERUSER} lacks {superuser_setting}"));
        }
    }
    if unmet.is_empty() {
        Check::new(
            id,
            Weight::Major,
            Status::Pass,
            match managed {
                true => {
                    "pgAudit logs every statement of every session but keepd's own (their role \
                     and DDL statements), audit-trail tampering and cluster-key reads; no \
                     parameters"
                }
                false => "pgAudit logs role and DDL statements; no parameters",
            },
        )
    } else {
        Check::new(id, Weight::Major, Status::Fail, unmet.join("; "))
            .recommend("restart keepd: its rendered configuration and bootstrap set pgAudit up")
    }
}

/// Roles that can log in, or are superusers, and that keepd did not make:
/// what an intruder (or a hurried operator) leaves behind. keepd makes one
/// superuser and, per node, login roles `keepd_<node>_v<N>` with no
/// attribute beyond LOGIN.
async fn foreign_roles(client: &Client, config: &Config) -> Check {
    let id = "roles.foreign";
    let weight = Weight::Critical;
    if config.database.postgres.provider == Provider::External {
        return Check::new(
            id,
            weight,
            Status::NotApplicable,
            "an external server's roles are its operator's (other applications may share it)",
        );
    }
    let rows = client
        .query(
            "SELECT rolname || CASE WHEN rolsuper THEN ' (superuser)' ELSE '' END \
             FROM pg_roles \
             WHERE (rolcanlogin OR rolsuper) AND rolname <> $1 \
               AND NOT (rolname ~ '^keepd_[0-9a-f]{16}_v[0-9]+$' AND NOT rolsuper \
                        AND NOT rolcreaterole AND NOT rolcreatedb AND NOT rolreplication \
                        AND NOT rolbypassrls) \
             ORDER BY 1",
            &[&SUPERUSER],
        )
        .await;
    match rows {
        Err(e) => Check::new(id, weight, Status::Fail, describe_error(&e)),
        Ok(rows) if rows.is_empty() => Check::new(
            id,
            weight,
            Status::Pass,
            format!("only keepd's roles can log in: {SUPERUSER} and its login roles"),
        ),
        Ok(rows) => {
            let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            Check::new(
                id,
                weight,
                Status::Fail,
                format!("roles keepd did not make can log in: {}", names.join(", ")),
            )
            .recommend(
                "find out who made them and why; then DROP ROLE them (or ALTER ROLE ... NOLOGIN \
                 NOSUPERUSER) with `keepd psql`",
            )
        }
    }
}

/// keepd's superuser (CIS 5.5): a connection limit, and reachable only
/// over the socket or the provider's private channel with a client
/// certificate (loopback for native, the internal network for docker).
async fn superuser(client: &Client, config: &Config) -> Check {
    let id = "roles.superuser";
    let weight = Weight::Major;
    if config.database.postgres.provider == Provider::External {
        return Check::new(
            id,
            weight,
            Status::NotApplicable,
            "the external server's administrator and its limits are its operator's",
        );
    }
    let limit = client
        .query_one(
            "SELECT rolconnlimit FROM pg_roles WHERE rolname = $1",
            &[&SUPERUSER],
        )
        .await
        .map(|r| r.get::<_, i32>(0));
    // Every rule that lets the superuser in over TCP.
    let tcp = client
        .query(
            "SELECT coalesce(address, ''), coalesce(array_to_string(options, ','), '') \
             FROM pg_hba_file_rules WHERE type <> 'local' AND auth_method <> 'reject' \
               AND (user_name && ARRAY[$1::text, 'all'])",
            &[&SUPERUSER],
        )
        .await;
    let (limit, tcp) = match (limit, tcp) {
        (Ok(limit), Ok(rows)) => (
            limit,
            rows.iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
                .collect::<Vec<_>>(),
        ),
        (Err(e), _) | (_, Err(e)) => {
            return Check::new(id, weight, Status::Fail, describe_error(&e));
        }
    };
    let private = |address: &str| matches!(address, "127.0.0.1" | "::1" | "samenet");
    let open: Vec<String> = tcp
        .iter()
        .filter(|(address, options)| {
            !private(address) || !options.contains("clientcert=verify-full")
        })
        .map(|(address, options)| format!("{address} {options}").trim().to_string())
        .collect();
    let channel = match tcp.is_empty() {
        true => "the Unix socket only".to_string(),
        false => format!(
            "{} with a client certificate only",
            tcp.iter()
                .map(|(a, _)| a.as_str())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    if limit < 0 {
        Check::new(
            id,
            weight,
            Status::Fail,
            format!("{SUPERUSER} has no connection limit"),
        )
        .recommend("restart keepd: its bootstrap sets the limit")
    } else if !open.is_empty() {
        Check::new(id, weight, Status::Fail, format!("{SUPERUSER} can log in over TCP from {}", open.join("; ")))
            .recommend("keep network.bind_address on loopback with client certificates required, or use the socket")
    } else {
        Check::new(
            id,
            weight,
            Status::Pass,
            format!(
                "connection limit {limit} (stated: Postgres does not hold superusers to it), \
                 reachable over {channel}"
            ),
        )
    }
}

/// PUBLIC (every role, present and future) may not connect to the
/// cluster's databases, nor use schema public in keepd's.
async fn public_privileges(client: &Client, inputs: &Inputs<'_>) -> Check {
    let id = "privileges.public";
    // Schema public of keepd's server's other databases, each measured
    // in its own session.
    let mut others = Vec::new();
    if Topology::of(inputs.config).owns_superuser() {
        for database in crate::postgres::bootstrap::OTHER_DATABASES {
            let granted = match inputs.superuser.database(database).connect().await {
                Ok(other) => other
                    .query_one(
                        "SELECT n.nspacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(n.nspacl) a \
                           WHERE a.grantee = 0) FROM pg_namespace n WHERE n.nspname = 'public'",
                        &[],
                    )
                    .await
                    .map(|row| row.get::<_, bool>(0)),
                Err(e) => Err(e),
            };
            match granted {
                Ok(false) => {}
                Ok(true) => others.push(format!("schema public in {database}")),
                Err(e) => others.push(format!("{database} (not readable: {})", describe_error(&e))),
            }
        }
    }
    let open = client
        .query(
            "SELECT d.datname FROM pg_database d WHERE d.datname IN ('keepd', 'postgres', 'template1') \
               AND (d.datacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(d.datacl) a \
                    WHERE a.grantee = 0 AND a.privilege_type = 'CONNECT')) \
             UNION ALL SELECT 'schema public' FROM pg_namespace n WHERE n.nspname = 'public' \
               AND (n.nspacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(n.nspacl) a WHERE a.grantee = 0)) \
             ORDER BY 1",
            &[],
        )
        .await;
    match open {
        Ok(rows) if rows.is_empty() && others.is_empty() => Check::new(
            id,
            Weight::Minor,
            Status::Pass,
            "PUBLIC cannot connect to keepd, postgres or template1, nor use schema public in any \
             of them",
        ),
        Ok(rows) => {
            let mut names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            names.extend(others);
            Check::new(id, Weight::Minor, Status::Warn, format!("PUBLIC keeps privileges on: {}", names.join(", ")))
                .recommend("REVOKE ALL ON DATABASE ... FROM PUBLIC and REVOKE ALL ON SCHEMA public FROM PUBLIC (keepd's hardening script does at every start)")
        }
        Err(e) => Check::new(
            id,
            Weight::Minor,
            Status::Warn,
            format!("privileges not readable: {}", describe_error(&e)),
        ),
    }
}

async fn encryption_at_rest(client: &Client, inputs: &Inputs<'_>) -> Check {
    let id = "encryption_at_rest";
    let config = inputs.config;
    let at_rest = &config.encryption_at_rest;
    // Measured only where the outcome depends on it (sysfs and dmsetup).
    let volume = || match Topology::of(config).provider {
        Provider::Native => Some(super::volume::under(&Layout::of(config).data_dir())),
        // The data is in a Docker volume or on another server: its disk
        // is not this node's to measure.
        Provider::Docker | Provider::External => None,
    };
    if !at_rest.enabled {
        return match volume() {
            Some(Volume::Encrypted(v)) if v.encrypts() => Check::new(id, Weight::Minor, Status::Pass, format!("the data directory is on {v}")),
            _ => Check::new(
                id,
                Weight::Minor,
                Status::Warn,
                "not enabled: table data is plaintext on disk (client payloads are ciphertext anyway)",
            )
            .recommend("put the data directory on an encrypted volume (LUKS) for defense in depth"),
        };
    }
    if at_rest.method.needs_volume() {
        let v = match volume_meets(volume().as_ref(), &at_rest.luks) {
            Ok(v) => v,
            Err(unmet) => return unmet,
        };
        if !at_rest.method.encrypts_fields() {
            return Check::new(
                id,
                Weight::Major,
                Status::Pass,
                format!("the data directory is on {v}"),
            );
        }
    }
    let fields = FieldPlan::new(inputs.config);
    // The version the cluster seals under now (field keys rotate).
    let version = match crate::field_keys::versions(client).await {
        Ok(versions) => versions.last().map_or(fields.floor(), |v| v.version),
        Err(e) => return Check::new(id, Weight::Minor, Status::Fail, describe_error(&e)),
    };
    if fields.configured().next().is_none() {
        return Check::new(
            id,
            Weight::Minor,
            Status::Warn,
            "application encryption enabled, but no column of keepd's schema is configured",
        )
        .recommend(format!(
            "list columns under encrypted_fields: {}",
            crate::field_crypto::supported_list()
        ));
    }
    let columns: Vec<_> = fields.columns().collect();
    // Values not (yet) under the current key, measured.
    let mut behind = 0i64;
    for column in &columns {
        let count = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM {} WHERE {}",
                    column.column().table,
                    FieldPlan::stale_values(*column, version)
                ),
                &[],
            )
            .await;
        match count {
            Ok(row) => behind += row.get::<_, i64>(0),
            Err(e) => return Check::new(id, Weight::Minor, Status::Fail, describe_error(&e)),
        }
    }
    let names: Vec<String> = columns.iter().map(|c| c.column().short_name()).collect();
    let unsupported = fields.unsupported();
    if behind > 0 {
        Check::new(
            id,
            Weight::Minor,
            Status::Warn,
            format!(
                "AES-256-GCM on {}; {behind} value(s) not yet under key v{version} (re-encryption runs in the background)",
                names.join(", ")
            ),
        )
    } else if !unsupported.is_empty() {
        Check::new(
            id,
            Weight::Minor,
            Status::Warn,
            format!(
                "AES-256-GCM on {} under key v{version}; ignored (not keepd's): {}",
                names.join(", "),
                unsupported.join(", ")
            ),
        )
    } else {
        Check::new(
            id,
            Weight::Minor,
            Status::Pass,
            format!("AES-256-GCM on {} under key v{version}", names.join(", ")),
        )
    }
}

/// Whether the volume under the data directory is what methods luks and
/// hybrid ask for (`encryption_at_rest.luks`): the volume as the report
/// names it, or the failing check.
fn volume_meets(volume: Option<&Volume>, wanted: &LuksConfig) -> Result<String, Check> {
    let id = "encryption_at_rest";
    let fail = |value: String, fix: &str| {
        Err(Check::new(id, Weight::Major, Status::Fail, value).recommend(fix.to_string()))
    };
    let build = "move the data directory onto a dm-crypt volume (cryptsetup luksFormat --type luks2; see docs/operations.md), or use method: application";
    match volume {
        None => fail(
            "method luks: the data is not on this node's disk (docker or external provider), so keepd cannot measure its volume".into(),
            "use method: application, and encrypt the Docker host's or the server's disk yourself",
        ),
        Some(Volume::Plain(device)) => fail(format!("method luks, but the data directory is on {device}, which is not dm-crypt"), build),
        Some(Volume::Unknown(why)) => fail(format!("method luks, but the volume is unknown: {why}"), build),
        Some(Volume::Encrypted(v)) => match &v.table {
            Err(why) => Err(Check::new(
                id,
                Weight::Major,
                Status::Warn,
                format!("the data directory is on {v}; its cipher and key size are not readable here: {why}"),
            )
            .recommend("run `keepd report` as root to measure the cipher and key size")),
            Ok(_) if !v.encrypts() => fail(
                format!("the data directory is on {v}, which encrypts nothing"),
                build,
            ),
            Ok(t) if t.cipher != wanted.cipher || t.key_bits < wanted.key_size => fail(
                format!(
                    "the data directory is on {v}, not {} with at least a {}-bit key (encryption_at_rest.luks)",
                    wanted.cipher, wanted.key_size
                ),
                "re-encrypt the volume (cryptsetup reencrypt) or change encryption_at_rest.luks",
            ),
            Ok(_) => Ok(v.to_string()),
        },
    }
}

async fn audit_chain(client: &Client, inputs: &Inputs<'_>) -> Check {
    let id = "audit.chain";
    let checkpoint = Layout::of(inputs.config).audit_checkpoint();
    match crate::audit::verify(client, inputs.identity, &checkpoint).await {
        Ok(verdict @ crate::audit::Verdict::Intact { .. }) => Check::new(id, Weight::Critical, Status::Pass, verdict.to_string()),
        Ok(verdict) => Check::new(id, Weight::Critical, Status::Fail, verdict.to_string())
            .recommend("investigate: the audit trail was altered; keep the database and checkpoint as evidence"),
        Err(e) => Check::new(id, Weight::Critical, Status::Fail, e.to_string()),
    }
}

/// The API's HTTPS: on, its minimum version, days until its certificate
/// expires.
fn api_tls(config: &Config, cert: Option<CertificateInfo>, now: SystemTime) -> Check {
    let id = "api.tls";
    let Some(tls) = &config.api.tls else {
        return Check::new(
            id,
            Weight::Major,
            Status::NotApplicable,
            "plain HTTP (api.tls unset); see api.exposure",
        );
    };
    let Some(cert) = cert else {
        return Check::new(
            id,
            Weight::Major,
            Status::Fail,
            format!("{} cannot be read or used", tls.cert.display()),
        )
        .recommend("fix api.tls.cert and api.tls.key; keepd run names what is wrong");
    };
    let days = cert.days_left(now);
    let what = format!("HTTPS, {} or later", tls.min_version);
    match days {
        d if d < 0 => Check::new(
            id,
            Weight::Major,
            Status::Fail,
            format!("{what}; the certificate expired {} days ago", -d),
        )
        .recommend("renew the certificate; keepd picks up the new files by itself"),
        d if d < 14 => Check::new(
            id,
            Weight::Major,
            Status::Warn,
            format!("{what}; the certificate expires in {d} days"),
        )
        .recommend("renew the certificate; keepd picks up the new files by itself"),
        d => Check::new(
            id,
            Weight::Major,
            Status::Pass,
            format!("{what}; certificate valid for {d} more days"),
        ),
    }
}

/// Whether clients' tokens could cross a network in the clear.
fn api_exposure(config: &Config) -> Check {
    let id = "api.exposure";
    let api = &config.api;
    let addr = api.listen;
    if api.tls.is_some() {
        return Check::new(
            id,
            Weight::Critical,
            Status::Pass,
            format!("HTTPS on {addr}"),
        );
    }
    if addr.ip().is_loopback() {
        return Check::new(
            id,
            Weight::Critical,
            Status::Pass,
            format!("plain HTTP on loopback {addr} only"),
        );
    }
    if !api.trusted_proxies.is_empty() {
        let proxies: Vec<String> = api.trusted_proxies.iter().map(|p| p.to_string()).collect();
        return Check::new(
            id,
            Weight::Minor,
            Status::Warn,
            format!(
                "plain HTTP on {addr} behind trusted proxies {}",
                proxies.join(", ")
            ),
        )
        .recommend("keep the hop from the proxy to keepd on a private network, or set api.tls");
    }
    Check::new(
        id,
        Weight::Critical,
        Status::Fail,
        format!("plain HTTP on {addr}, a non-loopback address, with no TLS and no trusted proxy"),
    )
    .recommend("set api.tls, or listen on loopback behind a TLS proxy named in api.trusted_proxies")
}

/// Where `/metrics` can be read without authentication.
fn api_metrics(config: &Config) -> Check {
    let id = "api.metrics";
    match config.api.metrics_listen {
        None => Check::new(id, Weight::Minor, Status::Pass, "metrics are off"),
        Some(addr) if addr.ip().is_loopback() => Check::new(
            id,
            Weight::Minor,
            Status::Pass,
            format!("/metrics on loopback {addr} only; the public listener answers 404"),
        ),
        Some(addr) => Check::new(
            id,
            Weight::Minor,
            Status::Warn,
            format!("/metrics on {addr}, reachable from the network without authentication"),
        )
        .recommend("keep api.metrics_listen on loopback, or firewall it to the scraper"),
    }
}

fn certificate_expiry(certificate: Option<&str>) -> Check {
    let id = "tls.certificate_expiry";
    let Some(pem) = certificate else {
        return Check::new(
            id,
            Weight::Major,
            Status::NotApplicable,
            "keepd issues no server certificate in this mode",
        );
    };
    let now = crate::clock::unix_now();
    match crate::pki::validity(pem) {
        Some(v) if v.not_after > now + crate::pki::RENEW_BEFORE.as_secs() => Check::new(
            id,
            Weight::Major,
            Status::Pass,
            format!(
                "server certificate valid for {} more days",
                (v.not_after - now) / 86_400
            ),
        ),
        Some(v) if v.not_after > now => Check::new(
            id,
            Weight::Major,
            Status::Warn,
            format!(
                "server certificate ends in {} days",
                (v.not_after - now) / 86_400
            ),
        )
        .recommend("send keepd SIGHUP to renew it now"),
        _ => Check::new(
            id,
            Weight::Major,
            Status::Fail,
            "server certificate expired or unreadable",
        ),
    }
}

fn mode(path: &Path) -> Option<u32> {
    std::fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o777)
}

fn file_modes(config: &Config) -> Check {
    let id = "files.modes";
    let layout = Layout::of(config);
    // (path, the bits it must not have)
    let expected = [
        ("state", layout.state_dir().to_owned(), 0o027),
        ("runtime", layout.runtime_dir().to_owned(), 0o027),
        ("identity", layout.identity_key(), 0o077),
        ("identity.sealed", layout.identity_sealed(), 0o077),
        ("db.enc", layout.credentials().to_owned(), 0o077),
        ("data", layout.data_dir(), 0o077),
        ("pki", layout.pki_dir(), 0o077),
        ("logs", layout.postgres_log_dir(), 0o077),
    ];
    let mut exposed = Vec::new();
    // Only what exists is counted and named (no pki in socket mode, no
    // data directory on an external server).
    let mut checked = Vec::new();
    for (name, path, forbidden) in expected {
        if let Some(m) = mode(&path) {
            checked.push(name);
            if m & forbidden != 0 {
                exposed.push(format!("{} is {m:o}", path.display()));
            }
        }
    }
    if exposed.is_empty() {
        Check::new(
            id,
            Weight::Major,
            Status::Pass,
            format!("{} paths private ({})", checked.len(), checked.join(", ")),
        )
    } else {
        Check::new(id, Weight::Major, Status::Fail, exposed.join("; "))
            .recommend("chmod them back (0700 directories, 0600 files); keepd creates them so")
    }
}

async fn forbidden_connection(config: &Config) -> Check {
    let id = "network.forbidden_connection";
    let port = config.network.port;
    let topology = Topology::of(config);
    match (topology.provider, topology.transport) {
        (Provider::External, _) | (Provider::Docker, Transport::Tcp) => Check::new(
            id,
            Weight::Critical,
            Status::NotApplicable,
            "no address keepd could probe from here without it being legitimate",
        ),
        (_, Transport::UnixSocket) => {
            // No TCP listener at all: a connection to the port is refused.
            match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Check::new(
                    id,
                    Weight::Critical,
                    Status::Pass,
                    format!("TCP 127.0.0.1:{port} refused: Postgres listens on no TCP port"),
                ),
                Err(e) => Check::new(
                    id,
                    Weight::Critical,
                    Status::Pass,
                    format!("TCP 127.0.0.1:{port} unreachable ({e})"),
                ),
                Ok(_) => Check::new(
                    id,
                    Weight::Critical,
                    Status::Warn,
                    format!("something listens on 127.0.0.1:{port}"),
                )
                .recommend("check that it is not a Postgres serving keepd's data"),
            }
        }
        (Provider::Native, Transport::Tcp) => {
            // A plain (non-TLS) connection must be refused by pg_hba.
            let mut plain = tokio_postgres::Config::new();
            plain
                .host(config.network.bind_address.to_string())
                .port(port)
                .user(crate::postgres::SUPERUSER)
                .dbname(crate::postgres::DATABASE)
                .ssl_mode(tokio_postgres::config::SslMode::Disable)
                .connect_timeout(std::time::Duration::from_secs(3));
            match plain.connect(tokio_postgres::NoTls).await {
                Err(e) if e.code().is_some() => Check::new(
                    id,
                    Weight::Critical,
                    Status::Pass,
                    format!(
                        "a plain TCP connection was refused ({})",
                        describe_error(&e)
                    ),
                ),
                Err(e) => Check::new(
                    id,
                    Weight::Critical,
                    Status::Warn,
                    format!("probe inconclusive: {e}"),
                ),
                Ok(_) => Check::new(
                    id,
                    Weight::Critical,
                    Status::Fail,
                    "a plain TCP connection was accepted",
                )
                .recommend("pg_hba.conf must accept only hostssl with client certificates"),
            }
        }
    }
}

fn container(facts: Option<&ContainerFacts>, config: &Config, node_id: &str) -> Check {
    let id = "docker.container";
    let Some(f) = facts else {
        return Check::new(id, Weight::Major, Status::NotApplicable, "no container");
    };
    let mut problems = Vec::new();
    let network_ok = if Topology::of(config).is_tcp() {
        f.network_mode == crate::postgres::docker::DockerNames::for_node(node_id).network
    } else {
        f.network_mode == "none"
    };
    if !network_ok {
        problems.push(format!("network mode {}", f.network_mode));
    }
    if f.cap_drop != ["ALL"] || !f.cap_add.is_empty() {
        problems.push(format!(
            "capabilities dropped {:?}, added {:?}",
            f.cap_drop, f.cap_add
        ));
    }
    if !f.readonly_rootfs {
        problems.push("writable root filesystem".into());
    }
    if f.published_ports > 0 || f.privileged {
        problems.push("published ports or privileged".into());
    }
    if f.user.is_empty() || f.user == "root" || f.user.starts_with("0:") {
        problems.push(format!("runs as {:?}", f.user));
    }
    if problems.is_empty() {
        Check::new(
            id,
            Weight::Major,
            Status::Pass,
            format!(
                "as inspected: network {}, no capabilities, read-only root, no ports, user {}",
                f.network_mode, f.user
            ),
        )
    } else {
        Check::new(id, Weight::Major, Status::Fail, problems.join("; "))
            .recommend("let keepd recreate its container (remove it; keepd creates it hardened)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_backup_signatures_warn_while_accepted() {
        let mut config = Config::default();
        assert!(config.api.backups.accept_v1_signatures, "the default");
        let check = backup_signatures(&config);
        assert_eq!(
            (check.id, check.status, check.weight),
            ("api.backup_signatures", Status::Warn, Weight::Minor)
        );
        assert!(check.value.contains("version 1"), "{}", check.value);
        assert!(
            check
                .recommendation
                .contains("api.backups.accept_v1_signatures: false"),
            "{}",
            check.recommendation
        );
        // A minor warning: the level is high at best, never lower.
        assert_eq!(
            super::super::level(&[check]),
            crate::config::SecurityLevel::High
        );
        config.api.backups.accept_v1_signatures = false;
        let check = backup_signatures(&config);
        assert_eq!(check.status, Status::Pass);
        assert!(check.recommendation.is_empty());
    }

    #[test]
    fn password_login_warns_while_on() {
        let mut config = Config::default();
        let check = password_login(&config);
        assert_eq!(
            (check.id, check.status, check.weight),
            ("api.password_login", Status::Warn, Weight::Minor)
        );
        assert!(
            check
                .recommendation
                .contains("api.auth.password_login: false")
        );
        config.api.auth.password_login = false;
        assert_eq!(password_login(&config).status, Status::Pass);
    }
}
