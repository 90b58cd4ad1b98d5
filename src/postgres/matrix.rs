//! The permission matrix: which group role may do what to which table. It
//! is data in this one place; `migrate` grants exactly this at every start
//! (revoking anything else), and a test proves every cell from outside.

/// A table privilege keepd grants or withholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privilege {
    Select,
    Insert,
    Update,
    Delete,
    Truncate,
}

impl Privilege {
    pub const ALL: [Privilege; 5] = [
        Privilege::Select,
        Privilege::Insert,
        Privilege::Update,
        Privilege::Delete,
        Privilege::Truncate,
    ];

    pub fn sql(self) -> &'static str {
        match self {
            Privilege::Select => "SELECT",
            Privilege::Insert => "INSERT",
            Privilege::Update => "UPDATE",
            Privilege::Delete => "DELETE",
            Privilege::Truncate => "TRUNCATE",
        }
    }
}

/// Tables keepd owns, schema-qualified.
pub const TABLES: [&str; 23] = [
    "keepd.users",
    "keepd.sessions",
    "keepd.vaults",
    "keepd.vault_keys",
    "keepd.sync_logs",
    "keepd.push_requests",
    "keepd.devices",
    "keepd.backups",
    "keepd.account_usage",
    "keepd.invites",
    "keepd.login_throttle",
    "keepd.opaque_logins",
    "keepd.recovery_codes",
    // No group role: only the owner's bootstrap sessions (`cluster`).
    "keepd.cluster_members",
    // No group role: only the superuser's heartbeat (`cluster::heartbeat`).
    "keepd.cluster_liveness",
    // No group role: only the superuser's field-key task (`field_keys`).
    "keepd.field_keys",
    // No group role: only the owner's sessions (`cluster::rotate_key`,
    // `cluster::remove`).
    "keepd.cluster_key_log",
    "keepd.cluster_removals",
    // No group role: only the owner's sessions (`cluster::join_tokens`).
    "keepd.cluster_join_tokens",
    // No group role: only the usage functions (as the owner) and the
    // janitor (the superuser).
    "keepd.push_reservations",
    "keepd_audit.audit_log",
    "keepd_audit.audit_chain",
    // Written by the superuser's retention task (`audit::retention`); the
    // sealer reads it.
    "keepd_audit.audit_base",
];

use super::GroupRole;
use Privilege::{Delete as D, Insert as I, Select as S, Update as U};

/// (group role, table, privileges). A pair not listed has no privilege.
pub const MATRIX: &[(GroupRole, &str, &[Privilege])] = &[
    // Accounts and sessions: registration, login, logout, erasure.
    (GroupRole::Auth, "keepd.users", &[S, I, U, D]),
    (GroupRole::Auth, "keepd.sessions", &[S, I, U, D]),
    // Registration consumes an invite (api.registration: invite).
    (GroupRole::Auth, "keepd.invites", &[S, U]),
    // Failed attempts, counted before each check (`store::throttle`).
    (GroupRole::Auth, "keepd.login_throttle", &[S, I, U]),
    // OPAQUE logins between their two messages, each read once.
    (GroupRole::Auth, "keepd.opaque_logins", &[S, I, D]),
    // A second factor's recovery codes: made at confirmation, used once,
    // removed when the factor is turned off.
    (GroupRole::Auth, "keepd.recovery_codes", &[S, I, U, D]),
    // Sync: vaults, keys, logs, idempotent pushes, devices, backups.
    // Every transaction for a caller checks the caller's session in it.
    (GroupRole::Sync, "keepd.sessions", &[S]),
    // DELETE: a vault erased with its key and entries (DELETE
    // /sync/vault); UPDATE of a key: re-wrapped under a new password.
    (GroupRole::Sync, "keepd.vaults", &[S, I, U, D]),
    (GroupRole::Sync, "keepd.vault_keys", &[S, I, U]),
    (GroupRole::Sync, "keepd.sync_logs", &[S, I]),
    // UPDATE: an expired Idempotency-Key record is replaced in place.
    (GroupRole::Sync, "keepd.push_requests", &[S, I, U]),
    (GroupRole::Sync, "keepd.devices", &[S, I, U]),
    (GroupRole::Sync, "keepd.backups", &[S, I, D]),
    // Read against api.quotas; only the owner's counting triggers write it.
    (GroupRole::Sync, "keepd.account_usage", &[S]),
    // Reads of synced data.
    (GroupRole::Query, "keepd.sessions", &[S]),
    (GroupRole::Query, "keepd.vaults", &[S]),
    (GroupRole::Query, "keepd.vault_keys", &[S]),
    (GroupRole::Query, "keepd.sync_logs", &[S]),
    (GroupRole::Query, "keepd.devices", &[S]),
    (GroupRole::Query, "keepd.backups", &[S]),
    (GroupRole::Query, "keepd.account_usage", &[S]),
    // The audit trail: append and read, nothing else.
    (GroupRole::Audit, "keepd_audit.audit_log", &[S, I]),
    (GroupRole::Audit, "keepd_audit.audit_chain", &[S, I]),
    (GroupRole::Audit, "keepd_audit.audit_base", &[S]),
    // The operator's account commands (`keepd account`, control socket):
    // every account's row (some columns only: `COLUMNS`), sessions and
    // usage; disabling ends sessions, deleting erases (the rest follows by
    // cascade); invites are issued.
    (GroupRole::Operator, "keepd.users", &[D]),
    (GroupRole::Operator, "keepd.sessions", &[S, U]),
    (GroupRole::Operator, "keepd.account_usage", &[S]),
    (GroupRole::Operator, "keepd.invites", &[I]),
    // The reset of a lost second factor.
    (GroupRole::Operator, "keepd.recovery_codes", &[S, D]),
    // Read-only access to everything.
    (GroupRole::Readonly, "keepd.users", &[S]),
    (GroupRole::Readonly, "keepd.sessions", &[S]),
    (GroupRole::Readonly, "keepd.vaults", &[S]),
    (GroupRole::Readonly, "keepd.vault_keys", &[S]),
    (GroupRole::Readonly, "keepd.sync_logs", &[S]),
    (GroupRole::Readonly, "keepd.push_requests", &[S]),
    (GroupRole::Readonly, "keepd.devices", &[S]),
    (GroupRole::Readonly, "keepd.backups", &[S]),
    (GroupRole::Readonly, "keepd.account_usage", &[S]),
    (GroupRole::Readonly, "keepd.invites", &[S]),
    (GroupRole::Readonly, "keepd.login_throttle", &[S]),
    (GroupRole::Readonly, "keepd.opaque_logins", &[S]),
    (GroupRole::Readonly, "keepd.recovery_codes", &[S]),
    (GroupRole::Readonly, "keepd_audit.audit_log", &[S]),
    (GroupRole::Readonly, "keepd_audit.audit_chain", &[S]),
];

/// Privileges a role holds on some columns of a table only, never the
/// whole table: the operator reads and changes what it manages of an
/// account, never its password hash.
pub const COLUMNS: &[(GroupRole, &str, Privilege, &[&str])] = &[
    (
        GroupRole::Operator,
        "keepd.users",
        S,
        &[
            "id",
            "email_hmac",
            "created_at",
            "disabled_at",
            "totp_confirmed_at",
        ],
    ),
    (
        GroupRole::Operator,
        "keepd.users",
        U,
        &[
            "disabled_at",
            "totp_secret",
            "totp_confirmed_at",
            "totp_last_step",
        ],
    ),
];

/// What pgAudit's object logging watches (`pgaudit.role` =
/// `AUDITOR_ROLE`): any attempt to change or remove audit entries (the
/// triggers refuse it; the log keeps who tried), and every access to the
/// sealed cluster keys. The auditor cannot log in and no role is a member
/// of it, so these grants let nobody do anything.
pub const AUDITED: &[(&str, &[Privilege])] = &[
    ("keepd_audit.audit_log", &[U, D, Privilege::Truncate]),
    ("keepd_audit.audit_chain", &[U, D, Privilege::Truncate]),
    ("keepd.cluster_members", &[S, I, U, D]),
];

/// Functions a group role may call (EXECUTE); none other may be called by
/// anyone but their owner (migrations revoke PUBLIC's EXECUTE).
pub const FUNCTIONS: &[(GroupRole, &str)] = &[
    // A push reserves its bytes on its tenant's usage before its
    // transaction, claims them in it, gives them back if it did not commit.
    (
        GroupRole::Sync,
        "keepd.reserve_pushed_bytes(bigint, bigint)",
    ),
    (GroupRole::Sync, "keepd.claim_pushed_bytes(uuid)"),
    (GroupRole::Sync, "keepd.give_back_pushed_bytes(uuid)"),
    // Schema v21's count, which the reservation builds on; still granted
    // for nodes of v22 during a rolling upgrade.
    (GroupRole::Sync, "keepd.add_pushed_bytes(bigint, bigint)"),
];

/// Whether `role` may use `privilege` on `table`.
pub fn allows(role: &str, table: &str, privilege: Privilege) -> bool {
    MATRIX
        .iter()
        .any(|(r, t, ps)| *r == role && *t == table && ps.contains(&privilege))
}

/// Schemas each group role needs USAGE on (derived from the matrix).
pub fn schemas_of(role: &str) -> Vec<&'static str> {
    let mut schemas: Vec<&'static str> = MATRIX
        .iter()
        .filter(|(r, _, _)| *r == role)
        .filter_map(|(_, t, _)| t.split_once('.').map(|(s, _)| s))
        .collect();
    schemas.sort_unstable();
    schemas.dedup();
    schemas
}

/// The statements that make the database's grants exactly the matrix.
pub fn grant_statements() -> Vec<String> {
    let auditor = super::AUDITOR_ROLE;
    let roles = format!("{}, {auditor}", super::GROUP_ROLES.join(", "));
    let mut sql = vec![
        format!("REVOKE ALL ON ALL TABLES IN SCHEMA keepd, keepd_audit FROM PUBLIC, {roles}"),
        format!("REVOKE ALL ON SCHEMA keepd, keepd_audit FROM PUBLIC, {roles}"),
    ];
    for role in super::GROUP_ROLES {
        let schemas = schemas_of(role);
        if !schemas.is_empty() {
            sql.push(format!(
                "GRANT USAGE ON SCHEMA {} TO {role}",
                schemas.join(", ")
            ));
        }
    }
    for (role, table, privileges) in MATRIX {
        let list: Vec<&str> = privileges.iter().map(|p| p.sql()).collect();
        sql.push(format!("GRANT {} ON {table} TO {role}", list.join(", ")));
    }
    for (role, table, privilege, columns) in COLUMNS {
        sql.push(format!(
            "GRANT {} ({}) ON {table} TO {role}",
            privilege.sql(),
            columns.join(", ")
        ));
    }
    for (role, function) in FUNCTIONS {
        sql.push(format!("GRANT EXECUTE ON FUNCTION {function} TO {role}"));
    }
    for (table, privileges) in AUDITED {
        let list: Vec<&str> = privileges.iter().map(|p| p.sql()).collect();
        sql.push(format!("GRANT {} ON {table} TO {auditor}", list.join(", ")));
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cell_names_a_known_role_and_table_once() {
        for (i, (role, table, privileges)) in MATRIX.iter().enumerate() {
            assert!(GroupRole::ALL.contains(role), "{role}");
            assert!(TABLES.contains(table), "{table}");
            assert!(!privileges.is_empty());
            assert!(
                !MATRIX[i + 1..]
                    .iter()
                    .any(|(r, t, _)| r == role && t == table),
                "{role} on {table} listed twice"
            );
        }
    }

    #[test]
    fn nobody_may_rewrite_or_truncate_the_audit_trail() {
        for role in super::super::GROUP_ROLES {
            for table in ["keepd_audit.audit_log", "keepd_audit.audit_chain"] {
                for p in [Privilege::Update, Privilege::Delete, Privilege::Truncate] {
                    assert!(!allows(role, table, p), "{role} {p:?} {table}");
                }
            }
        }
        assert!(
            MATRIX
                .iter()
                .all(|(_, _, ps)| !ps.contains(&Privilege::Truncate))
        );
    }

    #[test]
    fn grants_cover_schemas() {
        assert_eq!(schemas_of("keepd_audit"), ["keepd_audit"]);
        assert_eq!(schemas_of("keepd_readonly"), ["keepd", "keepd_audit"]);
        let sql = grant_statements();
        assert!(
            sql.contains(
                &"GRANT SELECT, INSERT ON keepd_audit.audit_log TO keepd_audit".to_string()
            )
        );
    }
}
