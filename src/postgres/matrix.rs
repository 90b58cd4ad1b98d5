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
pub const TABLES: [&str; 13] = [
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
    // No group role: only the owner's bootstrap sessions (`cluster`).
    "keepd.cluster_members",
    "keepd_audit.audit_log",
    "keepd_audit.audit_chain",
];

use Privilege::{Delete as D, Insert as I, Select as S, Update as U};

/// (group role, table, privileges). A pair not listed has no privilege.
pub const MATRIX: &[(&str, &str, &[Privilege])] = &[
    // Accounts and sessions: registration, login, logout, erasure.
    ("keepd_auth", "keepd.users", &[S, I, U, D]),
    ("keepd_auth", "keepd.sessions", &[S, I, U, D]),
    // Registration consumes an invite (api.registration: invite).
    ("keepd_auth", "keepd.invites", &[S, U]),
    // Sync: vaults, keys, logs, idempotent pushes, devices, backups.
    // Every transaction for a caller checks the caller's session in it.
    ("keepd_sync", "keepd.sessions", &[S]),
    // DELETE: a vault erased with its key and entries (DELETE
    // /sync/vault); UPDATE of a key: re-wrapped under a new password.
    ("keepd_sync", "keepd.vaults", &[S, I, U, D]),
    ("keepd_sync", "keepd.vault_keys", &[S, I, U]),
    ("keepd_sync", "keepd.sync_logs", &[S, I]),
    // UPDATE: an expired Idempotency-Key record is replaced in place.
    ("keepd_sync", "keepd.push_requests", &[S, I, U]),
    ("keepd_sync", "keepd.devices", &[S, I, U]),
    ("keepd_sync", "keepd.backups", &[S, I]),
    // Read against api.quotas; only the owner's counting triggers write it.
    ("keepd_sync", "keepd.account_usage", &[S]),
    // Reads of synced data.
    ("keepd_query", "keepd.sessions", &[S]),
    ("keepd_query", "keepd.vaults", &[S]),
    ("keepd_query", "keepd.vault_keys", &[S]),
    ("keepd_query", "keepd.sync_logs", &[S]),
    ("keepd_query", "keepd.devices", &[S]),
    ("keepd_query", "keepd.backups", &[S]),
    ("keepd_query", "keepd.account_usage", &[S]),
    // The audit trail: append and read, nothing else.
    ("keepd_audit", "keepd_audit.audit_log", &[S, I]),
    ("keepd_audit", "keepd_audit.audit_chain", &[S, I]),
    // The operator's account commands (`keepd account`, control socket):
    // every account's row (some columns only: `COLUMNS`), sessions and
    // usage; disabling ends sessions, deleting erases (the rest follows by
    // cascade); invites are issued.
    ("keepd_operator", "keepd.users", &[D]),
    ("keepd_operator", "keepd.sessions", &[S, U]),
    ("keepd_operator", "keepd.account_usage", &[S]),
    ("keepd_operator", "keepd.invites", &[I]),
    // Read-only access to everything.
    ("keepd_readonly", "keepd.users", &[S]),
    ("keepd_readonly", "keepd.sessions", &[S]),
    ("keepd_readonly", "keepd.vaults", &[S]),
    ("keepd_readonly", "keepd.vault_keys", &[S]),
    ("keepd_readonly", "keepd.sync_logs", &[S]),
    ("keepd_readonly", "keepd.push_requests", &[S]),
    ("keepd_readonly", "keepd.devices", &[S]),
    ("keepd_readonly", "keepd.backups", &[S]),
    ("keepd_readonly", "keepd.account_usage", &[S]),
    ("keepd_readonly", "keepd.invites", &[S]),
    ("keepd_readonly", "keepd_audit.audit_log", &[S]),
    ("keepd_readonly", "keepd_audit.audit_chain", &[S]),
];

/// Privileges a role holds on some columns of a table only, never the
/// whole table: the operator reads and changes what it manages of an
/// account, never its password hash.
pub const COLUMNS: &[(&str, &str, Privilege, &[&str])] = &[
    (
        "keepd_operator",
        "keepd.users",
        S,
        &["id", "email_hmac", "created_at", "disabled_at"],
    ),
    ("keepd_operator", "keepd.users", U, &["disabled_at"]),
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
            assert!(super::super::GROUP_ROLES.contains(role), "{role}");
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
