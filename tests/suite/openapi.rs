//! The OpenAPI document as the contract a generated client relies on:
//! schemathesis (PyPI, installed by scripts/install-deps.sh) runs against
//! a live keepd with every check on, through its coverage, fuzzing and
//! stateful phases, and must find nothing: every status a route answers is
//! documented, every constraint the server enforces is stated, and every
//! request the document calls valid is accepted. Its configuration, and
//! the one check it turns off for two routes and why, is
//! tests/schemathesis/schemathesis.toml.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::TestNode;

const SCHEMATHESIS: &str = "/opt/keepd-test/schemathesis/bin/schemathesis";

#[test]
fn schemathesis_finds_no_conformance_failure() {
    if !common::require_file(
        SCHEMATHESIS,
        "schemathesis (PyPI, in /opt/keepd-test/schemathesis)",
    ) {
        return;
    }
    let node = TestNode::with(common::unlimited_rates());
    let daemon = node.start_healthy();
    let token = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut client = daemon.client();
        client
            .register("schemathesis@example.org", "a long password here")
            .await
            .unwrap();
        client
            .login("schemathesis@example.org", "a long password here")
            .await
            .unwrap();
        client.token().unwrap().to_string()
    });
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/schemathesis/schemathesis.toml");
    let scratch = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(SCHEMATHESIS)
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(format!("http://{}/openapi.json", daemon.addr()))
        .args(["-H", &format!("Authorization: Bearer {token}")])
        // Logging out would end the session the run authenticates with.
        .args(["--exclude-path", "/auth/logout"])
        .args(["--max-examples", "30", "--seed", "1", "--no-color"])
        .current_dir(scratch.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("Stateful"),
        "schemathesis found failures:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for phase in ["Coverage", "Fuzzing", "Stateful"] {
        assert!(
            text.lines().any(|l| l.contains(phase) && l.contains('✅')),
            "{phase} did not pass:\n{text}"
        );
    }
    assert!(
        daemon.wait_health(200, Duration::from_secs(5)),
        "keepd is still healthy"
    );
}
