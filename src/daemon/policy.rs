//! `security.fallback_mode` applied to a measured report. What to do is a
//! pure function of the report and the settings (`decide`, table-tested);
//! `apply` shows the report and carries the decision out.

use tracing::{info, warn};

use super::DaemonError;
use crate::config::{Config, FallbackMode, LogFormat, SecurityConfig, SecurityLevel};
use crate::report::{Check, Report, Status};

/// What the start does about a report.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Decision<'a> {
    /// Strict mode and requirements unmet: refuse, naming each.
    Refuse(Vec<String>),
    /// Start, and log each finding (and whether the level is too low).
    Warn {
        findings: Vec<&'a Check>,
        below: Option<SecurityLevel>,
    },
    /// Start quietly.
    Proceed,
}

/// strict refuses a failed check or a level below `security.minimum_level`;
/// warn starts and reports each finding; permissive starts quietly.
pub(super) fn decide<'a>(security: &SecurityConfig, report: &'a Report) -> Decision<'a> {
    let level = report.level();
    let below = level < security.minimum_level;
    let findings: Vec<&Check> = report.findings().collect();
    match security.fallback_mode {
        FallbackMode::Strict => {
            let mut unmet: Vec<String> = findings
                .iter()
                .filter(|c| c.status == Status::Fail)
                .map(|c| format!("{}: {}", c.id, c.value))
                .collect();
            if below {
                unmet.push(format!(
                    "level {level:?} is below security.minimum_level {:?}",
                    security.minimum_level
                ));
            }
            if unmet.is_empty() {
                Decision::Proceed
            } else {
                Decision::Refuse(unmet)
            }
        }
        FallbackMode::Warn => Decision::Warn {
            findings,
            below: below.then_some(level),
        },
        FallbackMode::Permissive => Decision::Proceed,
    }
}

/// Shows the report as configured and carries out `decide`.
pub(super) fn apply(config: &Config, report: &Report) -> Result<(), DaemonError> {
    let security = &config.security;
    if security.log_security_report {
        match config.log.format {
            LogFormat::Human => eprintln!("{}", report.render_box()),
            LogFormat::Json => {
                info!(report = %report.to_json().replace('\n', ""), "security report")
            }
        }
    }
    match decide(security, report) {
        Decision::Refuse(unmet) => return Err(DaemonError::Security(unmet.join("; "))),
        Decision::Warn { findings, below } => {
            for check in findings {
                warn!(
                    check = check.id,
                    status = ?check.status,
                    value = %check.value,
                    recommendation = %check.recommendation,
                    "security fallback"
                );
            }
            if let Some(level) = below {
                warn!(level = ?level, minimum = ?security.minimum_level, "the security level is below security.minimum_level");
            }
        }
        Decision::Proceed => {}
    }
    info!(level = ?report.level(), "security report measured");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Weight;

    fn report(checks: &[(Status, Weight)]) -> Report {
        Report::new(
            checks
                .iter()
                .map(|(status, weight)| Check::new("x.check", *weight, *status, "measured"))
                .collect(),
        )
    }

    fn settings(mode: FallbackMode, minimum: SecurityLevel) -> SecurityConfig {
        SecurityConfig {
            fallback_mode: mode,
            minimum_level: minimum,
            ..SecurityConfig::default()
        }
    }

    #[test]
    fn each_mode_decides_as_documented() {
        use FallbackMode::*;
        use SecurityLevel::*;
        let clean = report(&[(Status::Pass, Weight::Critical)]);
        let warned = report(&[(Status::Warn, Weight::Minor)]);
        let failed = report(&[(Status::Fail, Weight::Major)]);
        assert_eq!(
            decide(&settings(Strict, Maximum), &clean),
            Decision::Proceed
        );
        // A warning lowers the level; strict refuses only below the minimum.
        assert_eq!(decide(&settings(Strict, High), &warned), Decision::Proceed);
        assert!(matches!(
            decide(&settings(Strict, Maximum), &warned),
            Decision::Refuse(unmet) if unmet.len() == 1 && unmet[0].contains("below security.minimum_level")
        ));
        assert!(matches!(
            decide(&settings(Strict, Reduced), &failed),
            Decision::Refuse(unmet) if unmet == vec!["x.check: measured".to_string()]
        ));
        assert!(matches!(
            decide(&settings(Warn, Reduced), &failed),
            Decision::Warn { findings, below: None } if findings.len() == 1
        ));
        assert!(matches!(
            decide(&settings(Warn, Maximum), &failed),
            Decision::Warn {
                below: Some(Moderate),
                ..
            }
        ));
        assert_eq!(
            decide(&settings(Permissive, Maximum), &failed),
            Decision::Proceed
        );
    }
}
