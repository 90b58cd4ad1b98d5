//! The security report: checks measured from the live system (`measure`),
//! the level they add up to, and how it is shown (the box of 004_*, or a
//! stable JSON form). Everything here but `measure` is pure.
//!
//! The level is a documented function of the checks (`level`): each check
//! has a weight, and the worst (status × weight) decides.
//!
//! | status \ weight | minor | major    | critical |
//! |-----------------|-------|----------|----------|
//! | pass, n/a       | —     | —        | —        |
//! | warn            | high  | high     | moderate |
//! | fail            | high  | moderate | reduced  |
//!
//! No finding at all is `maximum`.

pub mod measure;
mod volume;

use serde::Serialize;

use crate::config::SecurityLevel;

/// What a check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
    #[serde(rename = "n/a")]
    NotApplicable,
}

/// How much a check matters for the level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Weight {
    Minor,
    Major,
    Critical,
}

/// One measured fact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub id: &'static str,
    /// The CIS PostgreSQL benchmark item the check measures, if one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cis: Option<&'static str>,
    pub status: Status,
    #[serde(skip)]
    pub weight: Weight,
    /// What was measured, in words.
    pub value: String,
    /// What to do about it; empty when nothing.
    pub recommendation: String,
}

impl Check {
    pub fn new(
        id: &'static str,
        weight: Weight,
        status: Status,
        value: impl Into<String>,
    ) -> Check {
        Check {
            id,
            cis: cis_item(id),
            status,
            weight,
            value: value.into(),
            recommendation: String::new(),
        }
    }

    pub fn recommend(mut self, recommendation: impl Into<String>) -> Check {
        self.recommendation = recommendation.into();
        self
    }
}

/// The CIS PostgreSQL benchmark items keepd's checks measure, by check id:
/// one table, so a check and its item cannot drift apart.
const CIS_ITEMS: [(&str, &str); 9] = [
    ("logging.settings", "3.1"),
    ("audit.pgaudit", "3.2"),
    ("privileges.public", "4.10"),
    ("roles.superuser", "5.5"),
    ("auth.delay", "5.7"),
    ("hba.rules", "5.10"),
    ("tls.minimum_version", "6.8"),
    ("tls.client_certificates", "6.8"),
    ("backup", "8.2"),
];

fn cis_item(id: &str) -> Option<&'static str> {
    CIS_ITEMS
        .iter()
        .find(|(check, _)| *check == id)
        .map(|(_, item)| *item)
}

/// The threat model, stated with every report.
pub const THREAT_MODEL: &str = "Credentials and keys are sealed to this node's identity: that \
    protects leaked files, copies of the state directory and backups, not a compromised host. \
    Clients encrypt what they sync; the server stores ciphertext it cannot read.";

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub level: LevelName,
    pub checks: Vec<Check>,
    #[serde(rename = "threatModel")]
    pub threat_model: &'static str,
}

/// `SecurityLevel` as the JSON form spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LevelName {
    Reduced,
    Moderate,
    High,
    Maximum,
}

impl From<SecurityLevel> for LevelName {
    fn from(level: SecurityLevel) -> LevelName {
        match level {
            SecurityLevel::Reduced => LevelName::Reduced,
            SecurityLevel::Moderate => LevelName::Moderate,
            SecurityLevel::High => LevelName::High,
            SecurityLevel::Maximum => LevelName::Maximum,
        }
    }
}

/// The level the checks add up to (the table above).
pub fn level(checks: &[Check]) -> SecurityLevel {
    checks
        .iter()
        .map(|c| match (c.status, c.weight) {
            (Status::Pass | Status::NotApplicable, _) => SecurityLevel::Maximum,
            (Status::Warn, Weight::Minor | Weight::Major) => SecurityLevel::High,
            (Status::Warn, Weight::Critical) => SecurityLevel::Moderate,
            (Status::Fail, Weight::Minor) => SecurityLevel::High,
            (Status::Fail, Weight::Major) => SecurityLevel::Moderate,
            (Status::Fail, Weight::Critical) => SecurityLevel::Reduced,
        })
        .min()
        .unwrap_or(SecurityLevel::Maximum)
}

impl Report {
    pub fn new(checks: Vec<Check>) -> Report {
        Report {
            level: level(&checks).into(),
            checks,
            threat_model: THREAT_MODEL,
        }
    }

    pub fn level(&self) -> SecurityLevel {
        level(&self.checks)
    }

    /// The checks that warn or fail: what decides a level below maximum.
    pub fn findings(&self) -> impl Iterator<Item = &Check> {
        self.checks
            .iter()
            .filter(|c| matches!(c.status, Status::Warn | Status::Fail))
    }

    /// Whether the live system was measured at all: false when keepd's
    /// Postgres could not be reached (the report then holds only what
    /// the configuration and files say).
    pub fn measured(&self) -> bool {
        !self
            .checks
            .iter()
            .any(|c| c.id == "postgres.reachable" && c.status == Status::Fail)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the report serialises")
    }

    /// The report as a box (004_*'s layout): level, passes, findings,
    /// recommendations.
    pub fn render_box(&self) -> String {
        const WIDTH: usize = 72;
        let mut lines = vec![
            format!(
                "Security Level: {}",
                format!("{:?}", self.level).to_uppercase()
            ),
            String::new(),
        ];
        for check in &self.checks {
            let mark = match check.status {
                Status::Pass => "✓",
                Status::Warn => "⚠",
                Status::Fail => "✗",
                Status::NotApplicable => "·",
            };
            lines.push(format!("{mark} {}: {}", check.id, check.value));
        }
        let advice: Vec<&Check> = self
            .checks
            .iter()
            .filter(|c| !c.recommendation.is_empty())
            .collect();
        if !advice.is_empty() {
            lines.push(String::new());
            lines.push("Recommendations:".into());
            for check in advice {
                lines.push(format!("• {}", check.recommendation));
            }
        }
        let mut out = format!("╔{}╗\n", "═".repeat(WIDTH + 2));
        out.push_str(&format!("║ {:^WIDTH$} ║\n", "Security Report"));
        out.push_str(&format!("╠{}╣\n", "═".repeat(WIDTH + 2)));
        for line in lines {
            for piece in wrap(&line, WIDTH) {
                let pad = WIDTH.saturating_sub(piece.chars().count());
                out.push_str(&format!("║ {piece}{} ║\n", " ".repeat(pad)));
            }
        }
        out.push_str(&format!("╚{}╝", "═".repeat(WIDTH + 2)));
        out
    }
}

/// `line` cut into pieces of at most `width` characters, at spaces when
/// it can; continuation lines are indented.
fn wrap(line: &str, width: usize) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut current = String::new();
    for word in line.split(' ') {
        let len = current.chars().count();
        if len > 0 && len + 1 + word.chars().count() > width {
            pieces.push(std::mem::take(&mut current));
            current.push_str("   ");
        } else if len > 0 {
            current.push(' ');
        }
        current.push_str(word);
        while current.chars().count() > width {
            let head: String = current.chars().take(width).collect();
            let tail: String = current.chars().skip(width).collect();
            pieces.push(head);
            current = format!("   {tail}");
        }
    }
    pieces.push(current);
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(status: Status, weight: Weight) -> Check {
        Check::new("x", weight, status, "v")
    }

    #[test]
    fn level_function_table() {
        use SecurityLevel::*;
        use Status::*;
        use Weight::*;
        let cases = [
            (vec![], Maximum),
            (
                vec![check(Pass, Critical), check(NotApplicable, Major)],
                Maximum,
            ),
            (vec![check(Warn, Minor)], High),
            (vec![check(Warn, Major)], High),
            (vec![check(Fail, Minor)], High),
            (vec![check(Warn, Critical)], Moderate),
            (vec![check(Fail, Major), check(Warn, Minor)], Moderate),
            (vec![check(Fail, Critical), check(Pass, Major)], Reduced),
            (vec![check(Warn, Minor), check(Fail, Critical)], Reduced),
        ];
        for (checks, expected) in cases {
            assert_eq!(level(&checks), expected, "{checks:?}");
        }
    }

    #[test]
    fn json_and_box_forms() {
        let report = Report::new(vec![
            check(Status::Pass, Weight::Critical),
            check(Status::Warn, Weight::Minor).recommend("do better"),
            Check::new(
                "long",
                Weight::Minor,
                Status::NotApplicable,
                "word ".repeat(40),
            ),
        ]);
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(json["level"], "high");
        assert_eq!(json["checks"][1]["status"], "warn");
        assert_eq!(json["checks"][2]["status"], "n/a");
        assert_eq!(json["checks"][1]["recommendation"], "do better");
        assert!(
            json["threatModel"]
                .as_str()
                .unwrap()
                .contains("compromised host")
        );
        let text = report.render_box();
        assert!(text.contains("Security Level: HIGH"));
        assert!(text.contains("• do better"));
        let widths: Vec<usize> = text.lines().map(|l| l.chars().count()).collect();
        assert!(
            widths.iter().all(|w| *w == widths[0]),
            "ragged box:\n{text}"
        );
    }
}
