//! Every key keepd holds or derives, as `keepd keys status` and the
//! `keepd_key_*` gauges show it: its version, when it was made, how it is
//! renewed and when next. `facts` reads what the files and db.enc say
//! (never a key's value); `statuses` is pure.

use std::path::Path;

use serde::Serialize;

use crate::config::{Config, Layout};
use crate::field_keys::{FieldKeyVersion, RotationPolicy};
use crate::identity::protection::IdentityStore;
use crate::secrets::store::{CredentialStatus, Credentials};

/// One key's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyStatus {
    pub key: String,
    /// A version, an algorithm or a fingerprint: what tells two
    /// generations apart.
    pub version: String,
    /// When it was made (seconds since the epoch), where keepd knows.
    pub created_at: Option<u64>,
    pub age_seconds: Option<u64>,
    /// How it is renewed.
    pub policy: String,
    /// When it is next renewed (seconds since the epoch), where it is on
    /// a schedule.
    pub next_rotation: Option<u64>,
}

/// What `admin::keys_status` found.
#[derive(Debug, Clone)]
pub struct KeyFacts {
    /// How the identity is kept, and when its file was written.
    pub identity: (String, Option<u64>),
    /// The pinned cluster root's fingerprint, its generation and when it
    /// was made (the founding, or its rotation).
    pub cluster: Option<(String, u32, Option<u64>)>,
    /// The cluster's field key versions not retired (the database's
    /// word; the configured `key_version` with no age when it was not read).
    pub field_keys: Vec<FieldKeyVersion>,
    pub field_policy: RotationPolicy,
    /// (version, made, active) of each login role keepd holds.
    pub login_roles: Vec<(u32, u64, bool)>,
    pub rotation_interval_seconds: u64,
    /// keepd's own superuser's password: made when, renewed how often;
    /// None for an external server's administrator.
    pub superuser: Option<(u64, u64)>,
    pub backup_passphrase: bool,
    /// (name, not before, not after, renewed this long before expiry).
    pub certificates: Vec<(String, u64, u64, Option<u64>)>,
}

fn written(path: &Path) -> Option<u64> {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .map(crate::clock::unix_seconds)
}

/// What only the database knows of the keys.
#[derive(Debug, Clone, Default)]
pub struct DatabaseFacts {
    /// When the cluster was founded: its first member's admission.
    pub founded: Option<u64>,
    /// The pinned root's generation and when it was made, if a rotation
    /// made it.
    pub rotated: Option<(u32, u64)>,
    pub field_keys: Vec<FieldKeyVersion>,
}

impl DatabaseFacts {
    /// Read as the superuser, for the node of `config` (its pinned root);
    /// what cannot be read stays unknown.
    pub async fn read(superuser: &tokio_postgres::Client, config: &Config) -> DatabaseFacts {
        let pinned = std::fs::read_to_string(Layout::of(config).cluster_pin())
            .map(|pin| pin.trim().to_string())
            .unwrap_or_default();
        let founded = superuser
            .query_one(
                "SELECT extract(epoch FROM min(admitted_at))::int8 FROM keepd.cluster_members",
                &[],
            )
            .await
            .ok()
            .and_then(|row| row.get::<_, Option<i64>>(0))
            .and_then(|s| u64::try_from(s).ok());
        let field_keys = crate::field_keys::versions(superuser)
            .await
            .unwrap_or_default();
        let rotated = superuser
            .query_opt(
                "SELECT generation, extract(epoch FROM rotated_at)::int8 \
                 FROM keepd.cluster_key_log WHERE fingerprint = $1",
                &[&pinned],
            )
            .await
            .ok()
            .flatten()
            .map(|row| {
                (
                    u32::try_from(row.get::<_, i32>(0)).unwrap_or(1),
                    u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
                )
            });
        DatabaseFacts {
            founded,
            rotated,
            field_keys,
        }
    }
}

/// What the configuration, the state directory, `credentials` and the
/// database (where it was read) say of every key.
pub fn facts(config: &Config, credentials: &Credentials, database: &DatabaseFacts) -> KeyFacts {
    let (generation, made) = match database.rotated {
        Some((generation, at)) => (generation, Some(at)),
        None => (1, database.founded),
    };
    let identities = IdentityStore::of(config);
    let layout = Layout::of(config);
    let cluster = std::fs::read_to_string(layout.cluster_pin())
        .ok()
        .map(|pin| (pin.trim().to_string(), generation, made));
    let mut certificates = Vec::new();
    let renew = Some(crate::pki::RENEW_BEFORE.as_secs());
    for (name, file) in [
        ("internal CA", "ca.crt"),
        ("Postgres server certificate", "server.crt"),
    ] {
        if let Some(v) = std::fs::read_to_string(layout.pki_dir().join(file))
            .ok()
            .and_then(|pem| crate::pki::validity(&pem))
        {
            certificates.push((name.to_string(), v.not_before, v.not_after, renew));
        }
    }
    if let Some(tls) = &config.api.tls
        && let Ok(cert) = crate::edge::ApiCertificate::load(tls)
    {
        let info = cert.info();
        certificates.push((
            "API certificate".into(),
            info.not_before,
            info.not_after,
            None,
        ));
    }
    KeyFacts {
        identity: (
            identities.protection().describe().to_string(),
            written(identities.path()),
        ),
        cluster,
        field_keys: match database.field_keys.is_empty() {
            false => database
                .field_keys
                .iter()
                .filter(|v| v.retired_at.is_none())
                .cloned()
                .collect(),
            true => vec![FieldKeyVersion {
                version: config.encryption_at_rest.application.key_version,
                created_at: 0,
                age_seconds: 0,
                uses: 0,
                reason: "configured".into(),
                retired_at: None,
                generation: 1,
            }],
        },
        field_policy: RotationPolicy::of(config),
        login_roles: credentials
            .login_roles
            .iter()
            .filter(|c| c.password.is_some())
            .map(|c| {
                (
                    c.version,
                    c.created_at,
                    c.status == CredentialStatus::Active,
                )
            })
            .collect(),
        rotation_interval_seconds: config.credentials.rotation_interval.get().as_secs(),
        superuser: crate::config::Topology::of(config)
            .owns_superuser()
            .then(|| {
                (
                    credentials.superuser_created_at,
                    config
                        .credentials
                        .superuser_rotation_interval
                        .get()
                        .as_secs(),
                )
            }),
        backup_passphrase: credentials.backup_passphrase.is_some(),
        certificates,
    }
}

impl KeyStatus {
    /// How old it may grow before its policy renews it, where it is on a
    /// schedule.
    pub fn max_age(&self) -> Option<u64> {
        Some(self.next_rotation?.saturating_sub(self.created_at?))
    }

    fn new(key: impl Into<String>, version: impl Into<String>, created_at: Option<u64>) -> Self {
        KeyStatus {
            key: key.into(),
            version: version.into(),
            created_at,
            age_seconds: None,
            policy: String::new(),
            next_rotation: None,
        }
    }

    fn policy(mut self, policy: impl Into<String>, next: Option<u64>) -> Self {
        self.policy = policy.into();
        self.next_rotation = next;
        self
    }
}

/// Every key, from `facts`, aged at `now`.
pub fn statuses(facts: &KeyFacts, now: u64) -> Vec<KeyStatus> {
    let (protection, identity_made) = &facts.identity;
    let mut keys =
        vec![KeyStatus::new("identity", "ed25519", *identity_made).policy(
        format!("never rotated (everything this node seals is sealed to it); kept as {protection}"),
        None,
    )];
    if let Some((fingerprint, generation, made)) = &facts.cluster {
        let short: String = fingerprint.chars().take(16).collect();
        let version = format!("g{generation} {short}");
        keys.push(
            KeyStatus::new("cluster root", version.clone(), *made).policy(
                "by hand: `keepd cluster rotate-key` (after removing a node)",
                None,
            ),
        );
        for derived in ["token key", "audit identifier key"] {
            keys.push(KeyStatus::new(derived, version.clone(), *made).policy(
                "derived from the cluster root (HKDF): changes with it",
                None,
            ));
        }
        for carried in ["email HMAC key", "OPAQUE setup"] {
            keys.push(KeyStatus::new(carried, version.clone(), *made).policy(
                "carried across rotations (what was made with it depends on it)",
                None,
            ));
        }
    }
    let newest = facts.field_keys.last().map(|v| v.version);
    for v in &facts.field_keys {
        let sealing = Some(v.version) == newest;
        let state = if sealing { "sealing" } else { "retiring" };
        let made = (v.created_at > 0).then_some(v.created_at);
        let policy = &facts.field_policy;
        let next = made
            .filter(|_| sealing)
            .map(|made| made + policy.after.as_secs());
        keys.push(
            KeyStatus::new(
                format!("field key v{} ({state})", v.version),
                v.version.to_string(),
                made,
            )
            .policy(
                match sealing {
                    true => format!(
                        "every {} or {} values sealed (now {}), whichever comes first",
                        human(policy.after.as_secs()),
                        policy.after_uses,
                        v.uses
                    ),
                    false => {
                        "retired once no value uses it (re-encrypted in the background)".into()
                    }
                },
                next,
            ),
        );
    }
    for (version, made, active) in &facts.login_roles {
        let next = active.then(|| made + facts.rotation_interval_seconds);
        let state = if *active { "active" } else { "retiring" };
        keys.push(
            KeyStatus::new(
                format!("login role v{version} ({state})"),
                version.to_string(),
                Some(*made),
            )
            .policy(
                format!(
                    "every {} (credentials.rotation_interval), with no failed request",
                    human(facts.rotation_interval_seconds)
                ),
                next,
            ),
        );
    }
    match facts.superuser {
        Some((made, every)) => {
            // 0: a file from before the superuser rotated (due at once).
            let made = (made > 0).then_some(made);
            keys.push(KeyStatus::new("superuser password", "-", made).policy(
                format!(
                    "every {} (credentials.superuser_rotation_interval); open sessions stay",
                    human(every)
                ),
                Some(made.unwrap_or(0) + every),
            ));
        }
        None => keys.push(KeyStatus::new("superuser password", "-", None).policy(
            "the external server's administrator: rotate it on the server and in the configuration",
            None,
        )),
    }
    if facts.backup_passphrase {
        keys.push(
            KeyStatus::new("backup repository passphrase", "1", None).policy(
                "not rotated: pgBackRest cannot re-key a repository in place (docs/operations.md)",
                None,
            ),
        );
    }
    for (name, not_before, not_after, renew_before) in &facts.certificates {
        let (policy, next) = match renew_before {
            Some(before) => (
                format!("renewed by keepd {} before it expires", human(*before)),
                Some(not_after.saturating_sub(*before)),
            ),
            None => (
                "the operator's: replaced on disk, reloaded by keepd".to_string(),
                Some(*not_after),
            ),
        };
        keys.push(
            KeyStatus::new(
                name.clone(),
                format!("expires {}", date(*not_after)),
                Some(*not_before),
            )
            .policy(policy, next),
        );
    }
    for key in &mut keys {
        key.age_seconds = key.created_at.map(|made| now.saturating_sub(made));
    }
    keys
}

fn human(seconds: u64) -> String {
    match seconds {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s => format!("{s}s"),
    }
}

fn date(seconds: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(seconds as i64)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!("[year]-[month]-[day]"))
                .ok()
        })
        .unwrap_or_else(|| seconds.to_string())
}

/// The table `keepd keys status` prints.
pub fn table(keys: &[KeyStatus]) -> String {
    let mut out = format!(
        "{:<34}  {:<18}  {:>8}  {:<12}  {}\n",
        "KEY", "VERSION", "AGE", "NEXT", "POLICY"
    );
    for k in keys {
        let age = k
            .age_seconds
            .map_or("unknown".to_string(), |s| format!("{}d", s / 86_400));
        let next = k.next_rotation.map_or("-".to_string(), date);
        out.push_str(&format!(
            "{:<34}  {:<18}  {:>8}  {:<12}  {}\n",
            k.key, k.version, age, next, k.policy
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_listed_with_its_schedule() {
        let day = 86_400;
        let facts = KeyFacts {
            identity: ("a plaintext file (mode 0600)".into(), Some(10 * day)),
            cluster: Some(("ab".repeat(32), 1, Some(11 * day))),
            field_keys: vec![
                FieldKeyVersion {
                    version: 1,
                    created_at: 5 * day,
                    age_seconds: 16 * day,
                    uses: 7,
                    reason: "configured".into(),
                    retired_at: None,
                    generation: 1,
                },
                FieldKeyVersion {
                    version: 2,
                    created_at: 20 * day,
                    age_seconds: day,
                    uses: 3,
                    reason: "age".into(),
                    retired_at: None,
                    generation: 1,
                },
            ],
            field_policy: RotationPolicy {
                after: std::time::Duration::from_secs(90 * day),
                after_uses: 1_000_000,
            },
            login_roles: vec![(3, 20 * day, true), (2, 13 * day, false)],
            rotation_interval_seconds: 7 * day,
            superuser: Some((15 * day, 30 * day)),
            backup_passphrase: true,
            certificates: vec![
                ("internal CA".into(), 10 * day, 3660 * day, Some(30 * day)),
                ("API certificate".into(), 10 * day, 100 * day, None),
            ],
        };
        let keys = statuses(&facts, 21 * day);
        let names: Vec<&str> = keys.iter().map(|k| k.key.as_str()).collect();
        assert_eq!(
            names,
            [
                "identity",
                "cluster root",
                "token key",
                "audit identifier key",
                "email HMAC key",
                "OPAQUE setup",
                "field key v1 (retiring)",
                "field key v2 (sealing)",
                "login role v3 (active)",
                "login role v2 (retiring)",
                "superuser password",
                "backup repository passphrase",
                "internal CA",
                "API certificate",
            ]
        );
        assert_eq!(keys[6].next_rotation, None, "a retiring one is not renewed");
        assert_eq!(keys[7].next_rotation, Some(110 * day), "made + 90d");
        assert!(keys[7].policy.contains("1000000 values sealed (now 3)"));
        let active = &keys[8];
        assert_eq!(active.age_seconds, Some(day));
        assert_eq!(active.next_rotation, Some(27 * day), "made + 7d");
        assert_eq!(keys[9].next_rotation, None, "a retiring one is not renewed");
        assert_eq!(
            keys[12].next_rotation,
            Some(3630 * day),
            "30 days before expiry"
        );
        assert_eq!(
            keys[10].next_rotation,
            Some(45 * day),
            "superuser: made + 30d"
        );
        assert_eq!(keys[1].version, "g1 abababababababab");
        assert!(table(&keys).lines().count() == keys.len() + 1);
    }
}
