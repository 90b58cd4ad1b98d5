//! The credential rotation of `004_*` as a pure state machine over
//! `Credentials`. The nine steps:
//!
//! 1. generate version N+1 (stored as `pending`)
//! 2. create its Postgres role
//! 3. mark N `retiring`, N+1 `active` (stored)
//! 4. switch the pool: new connections use N+1
//! 5. wait for the grace period (from the time stored in step 3)
//! 6. verify no session uses N (terminate what is left)
//! 7. drop N's role
//! 8. mark N `expired` and forget its password (stored)
//! 9. record the rotation in the audit trail (stored as `audited`)
//!
//! Everything a later step needs is in `db.enc` before that step runs, and
//! steps 2, 4, 6 and 7 are idempotent, so after a crash at any point
//! `next_phase` names what is left and the daemon finishes it.

use std::time::Duration;

use super::store::{CredentialStatus, Credentials, LoginCredential};
use crate::secrets::values::SecretString;

/// What the daemon must do next to bring a rotation to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Steps 2-4 for this pending version.
    Activate { version: u32 },
    /// Steps 5-8 for this retiring version, not before `not_before` (unix s).
    Retire { version: u32, not_before: u64 },
    /// Step 9 for this expired version.
    Audit { version: u32 },
    /// No rotation under way.
    Idle,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Phase::Activate { version } => write!(f, "v{version} is being activated"),
            Phase::Retire {
                version,
                not_before,
            } => {
                let left = not_before.saturating_sub(crate::clock::unix_now());
                write!(f, "v{version} retires in {left}s")
            }
            Phase::Audit { version } => write!(f, "the retirement of v{version} is being recorded"),
            Phase::Idle => f.write_str("idle"),
        }
    }
}

pub fn next_phase(credentials: &Credentials, grace: Duration) -> Phase {
    let with = |status: CredentialStatus| {
        credentials
            .login_roles
            .iter()
            .filter(move |c| c.status == status)
            .min_by_key(|c| c.version)
    };
    if let Some(c) = with(CredentialStatus::Pending) {
        return Phase::Activate { version: c.version };
    }
    if let Some(c) = with(CredentialStatus::Retiring) {
        return Phase::Retire {
            version: c.version,
            not_before: c.status_since.saturating_add(grace.as_secs()),
        };
    }
    if let Some(c) = credentials
        .login_roles
        .iter()
        .find(|c| c.status == CredentialStatus::Expired && !c.audited)
    {
        return Phase::Audit { version: c.version };
    }
    Phase::Idle
}

/// Whether a scheduled rotation is due: none under way and the active
/// credential is at least `interval` old.
pub fn is_due(credentials: &Credentials, interval: Duration, now: u64) -> bool {
    next_phase(credentials, Duration::ZERO) == Phase::Idle
        && credentials
            .active()
            .is_some_and(|a| a.status_since.saturating_add(interval.as_secs()) <= now)
}

/// Step 1: adds version N+1 as pending and returns N+1.
pub fn begin(credentials: &mut Credentials, password: SecretString, now: u64) -> u32 {
    let version = credentials
        .login_roles
        .iter()
        .map(|c| c.version)
        .max()
        .unwrap_or(0)
        + 1;
    credentials.login_roles.push(LoginCredential {
        version,
        password: Some(password),
        status: CredentialStatus::Pending,
        created_at: now,
        status_since: now,
        audited: false,
    });
    version
}

/// Step 3: the active version retires and the pending one takes over.
pub fn activate(credentials: &mut Credentials, version: u32, now: u64) {
    for c in &mut credentials.login_roles {
        if c.status == CredentialStatus::Active && c.version != version {
            c.status = CredentialStatus::Retiring;
            c.status_since = now;
        }
    }
    if let Some(c) = credentials.get_mut(version) {
        c.status = CredentialStatus::Active;
        c.status_since = now;
    }
}

/// Step 8: the retired version is expired and its password forgotten.
pub fn expire(credentials: &mut Credentials, version: u32, now: u64) {
    if let Some(c) = credentials.get_mut(version) {
        c.status = CredentialStatus::Expired;
        c.status_since = now;
        c.password = None;
    }
}

/// Step 9 is done for this version.
pub fn mark_audited(credentials: &mut Credentials, version: u32) {
    if let Some(c) = credentials.get_mut(version) {
        c.audited = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(300);

    fn pw() -> SecretString {
        SecretString::new("p".repeat(64))
    }

    #[test]
    fn a_full_rotation_walks_every_phase() {
        let mut c = Credentials::generate(64, 100).unwrap();
        assert_eq!(next_phase(&c, GRACE), Phase::Idle);
        let v2 = begin(&mut c, pw(), 200);
        assert_eq!(v2, 2);
        assert_eq!(next_phase(&c, GRACE), Phase::Activate { version: 2 });
        assert_eq!(c.active().unwrap().version, 1, "pending is not yet used");
        activate(&mut c, 2, 300);
        assert_eq!(c.active().unwrap().version, 2);
        assert_eq!(c.get(1).unwrap().status, CredentialStatus::Retiring);
        assert_eq!(
            next_phase(&c, GRACE),
            Phase::Retire {
                version: 1,
                not_before: 600
            }
        );
        expire(&mut c, 1, 700);
        assert!(c.get(1).unwrap().password.is_none());
        assert_eq!(next_phase(&c, GRACE), Phase::Audit { version: 1 });
        mark_audited(&mut c, 1);
        assert_eq!(next_phase(&c, GRACE), Phase::Idle);
        assert_eq!(c.live().count(), 1);
    }

    #[test]
    fn repeating_a_step_changes_nothing() {
        let mut c = Credentials::generate(64, 100).unwrap();
        begin(&mut c, pw(), 200);
        activate(&mut c, 2, 300);
        activate(&mut c, 2, 999);
        assert_eq!(c.get(1).unwrap().status_since, 300, "retiring time kept");
        assert_eq!(c.active().unwrap().version, 2);
        expire(&mut c, 1, 700);
        expire(&mut c, 1, 800);
        assert_eq!(c.get(1).unwrap().status, CredentialStatus::Expired);
    }

    #[test]
    fn rotations_are_due_after_the_interval_only_when_idle() {
        let day = Duration::from_secs(86400);
        let mut c = Credentials::generate(64, 0).unwrap();
        assert!(!is_due(&c, day, 86399));
        assert!(is_due(&c, day, 86400));
        begin(&mut c, pw(), 86400);
        assert!(!is_due(&c, day, 999_999), "one rotation at a time");
    }

    #[test]
    fn versions_keep_increasing_across_rotations() {
        let mut c = Credentials::generate(64, 0).unwrap();
        for expected in 2..6 {
            let v = begin(&mut c, pw(), 0);
            assert_eq!(v, expected);
            activate(&mut c, v, 0);
            expire(&mut c, v - 1, 0);
            mark_audited(&mut c, v - 1);
        }
        assert_eq!(c.active().unwrap().version, 5);
    }
}
