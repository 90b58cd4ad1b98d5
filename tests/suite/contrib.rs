//! The monitoring kit in `contrib/`: the alert rules and the example
//! configuration pass promtool, and a real Prometheus scraping real keepd
//! nodes evaluates every query of the Grafana dashboard and every alert
//! rule against what keepd really exposes. A healthy node fires nothing; a
//! node below its own `security.minimum_level` fires
//! `KeepdSecurityLevelBelowMinimum`.

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Daemon, TestNode, free_port, wait_until};
use serde_json::{Value, json};

const RULES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/contrib/prometheus/keepd-alerts.yml"
);
const EXAMPLE_CONFIG: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/contrib/prometheus/prometheus.yml"
);
const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/grafana/keepd.json");
const OPERATIONS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md");
const UNIT_TESTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/promtool/keepd-alerts.test.yml"
);

const PASSWORD: &str = "correct horse battery";

/// `program ARGS` to its end: (success, stdout + stderr). A program that
/// cannot run is an installation problem, said as such.
fn run_tool(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} cannot run ({e}): run scripts/install-deps.sh"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    if !common::require_tool("promtool", "Debian's prometheus") {
        return;
    }
    let (ok, text) = run_tool("promtool", &["check", "rules", RULES]);
    assert!(ok, "{text}");
    // The example configuration, its rule file pointed at this checkout's.
    let dir = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(EXAMPLE_CONFIG).unwrap();
    let config = example.replace("/etc/prometheus/keepd-alerts.yml", RULES);
    assert_ne!(config, example, "the example loads keepd-alerts.yml");
    let path = dir.path().join("prometheus.yml");
    std::fs::write(&path, config).unwrap();
    let (ok, text) = run_tool("promtool", &["check", "config", path.to_str().unwrap()]);
    assert!(ok, "{text}");

    // The rules' logic on synthetic series (tests/promtool), against a
    // copy without annotations so that the cases state labels only.
    let mut file: Value = serde_norway::from_str(&std::fs::read_to_string(RULES).unwrap()).unwrap();
    let cases = std::fs::read_to_string(UNIT_TESTS).unwrap();
    for group in file["groups"].as_array_mut().unwrap() {
        for rule in group["rules"].as_array_mut().unwrap() {
            let name = rule["alert"].as_str().unwrap().to_string();
            assert!(
                cases.contains(&format!("alertname: {name}\n")),
                "{UNIT_TESTS} has no case for {name}"
            );
            rule.as_object_mut().unwrap().remove("annotations");
        }
    }
    std::fs::write(
        dir.path().join("keepd-alerts.yml"),
        serde_norway::to_string(&file).unwrap(),
    )
    .unwrap();
    let unit_tests = dir.path().join("keepd-alerts.test.yml");
    std::fs::write(&unit_tests, cases).unwrap();
    let (ok, text) = run_tool("promtool", &["test", "rules", unit_tests.to_str().unwrap()]);
    assert!(ok, "{text}");
}

/// One alerting rule of contrib/prometheus/keepd-alerts.yml.
struct Rule {
    name: String,
    expr: String,
}

/// The rules, each checked for what an operator needs when it fires: a
/// severity, a summary, a description and a runbook step that
/// docs/operations.md has.
fn rules() -> Vec<Rule> {
    let text = std::fs::read_to_string(RULES).unwrap();
    let file: Value = serde_norway::from_str(&text).expect("the rule file is YAML");
    let operations = std::fs::read_to_string(OPERATIONS).unwrap();
    let mut rules = Vec::new();
    for group in file["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let name = rule["alert"].as_str().expect("alerting rules only");
            assert!(
                matches!(
                    rule["labels"]["severity"].as_str(),
                    Some("critical" | "warning")
                ),
                "{name}: severity critical or warning"
            );
            assert!(rule["for"].is_string(), "{name}: no `for`");
            for key in ["summary", "description", "runbook"] {
                assert!(
                    rule["annotations"][key]
                        .as_str()
                        .is_some_and(|s| !s.trim().is_empty()),
                    "{name}: no {key} annotation"
                );
            }
            let runbook = rule["annotations"]["runbook"].as_str().unwrap();
            assert!(
                runbook.starts_with("docs/operations.md") && runbook.ends_with(name),
                "{name}: the runbook annotation names its step: {runbook}"
            );
            assert!(
                operations.contains(&format!("#### {name}\n")),
                "docs/operations.md has no step `#### {name}`"
            );
            rules.push(Rule {
                name: name.to_string(),
                expr: rule["expr"].as_str().expect("expr").to_string(),
            });
        }
    }
    rules
}

/// Every query of the dashboard, rows' nested panels included: (panel
/// title, expr).
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("").to_string();
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push((title.clone(), expr.to_string()));
                }
                assert_eq!(
                    target["datasource"]["uid"], "${datasource}",
                    "panel {title:?} queries the dashboard's data source variable"
                );
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// `expr` as Grafana sends it with `instance` selected. Any other
/// variable left is an error; `$1` and `${1}` (`label_replace`'s groups)
/// are not variables.
fn substitute(expr: &str, instance: &str) -> String {
    let text = expr
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "5s")
        .replace("$__range", "5m")
        .replace("${instance}", instance)
        .replace("$instance", instance);
    for (at, _) in text.match_indices('$') {
        let rest = &text[at + 1..];
        let rest = rest.strip_prefix('{').unwrap_or(rest);
        assert!(
            rest.starts_with(|c: char| c.is_ascii_digit()),
            "a variable the test does not know in {expr}"
        );
    }
    text
}

/// Every vector selector in `expr` naming a metric keepd exposes
/// (`keepd_*`, `process_*`) or `up`: (the name, the name with its label
/// matchers). Quoted strings (label values, `label_replace`'s arguments)
/// are skipped.
fn selectors(expr: &str) -> Vec<(String, String)> {
    let chars: Vec<char> = expr.chars().collect();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    // The index just past the string starting at `at` (a quote).
    let skip_string = |at: usize| {
        let quote = chars[at];
        let mut i = at + 1;
        while i < chars.len() && chars[i] != quote {
            if chars[i] == '\\' && quote != '`' {
                i += 1;
            }
            i += 1;
        }
        i + 1
    };
    let mut found = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`') {
            i = skip_string(i);
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && ident(chars[i]) {
                i += 1;
            }
            let name: String = chars[start..i].iter().collect();
            if !(name.starts_with("keepd_") || name.starts_with("process_") || name == "up") {
                continue;
            }
            let mut selector = name.clone();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            if j < chars.len() && chars[j] == '{' {
                let mut k = j + 1;
                while k < chars.len() && chars[k] != '}' {
                    k = if chars[k] == '"' {
                        skip_string(k)
                    } else {
                        k + 1
                    };
                }
                let end = (k + 1).min(chars.len());
                selector.extend(&chars[j..end]);
                i = end;
            }
            found.push((name, selector));
        } else {
            // Numbers and durations (`5m`, `1e3`) are skipped whole.
            if c.is_ascii_digit() {
                while i < chars.len() && ident(chars[i]) {
                    i += 1;
                }
            } else {
                i += 1;
            }
        }
    }
    found
}

#[test]
fn selectors_are_found_outside_strings() {
    assert_eq!(
        selectors(
            r#"sum by (route) (label_replace(rate(keepd_http_requests_total{instance=~"a}b",status!="5"}[5m]), "class", "${1}xx", "status", "keepd_no(.)")) / up"#
        ),
        vec![
            (
                "keepd_http_requests_total".to_string(),
                r#"keepd_http_requests_total{instance=~"a}b",status!="5"}"#.to_string()
            ),
            ("up".to_string(), "up".to_string()),
        ]
    );
    assert_eq!(
        selectors("time() - process_start_time_seconds > 2 * 3600 and keepd_x == 0"),
        vec![
            (
                "process_start_time_seconds".to_string(),
                "process_start_time_seconds".to_string()
            ),
            ("keepd_x".to_string(), "keepd_x".to_string()),
        ]
    );
}

/// Percent-encoding for a query string value.
fn encode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// An HTTP/1.0 GET, so that the answer is never chunked: (status, body).
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some((status, body.to_string()))
}

/// A Prometheus of the test's own on 127.0.0.1, its files in a temporary
/// directory; killed when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes `targets` every second as job `keepd` (the job the rules
    /// and the dashboard expect) and evaluates contrib's rules every second.
    fn start(targets: &[SocketAddr]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {RULES}\n\
             scrape_configs:\n  - job_name: keepd\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.path().join("prometheus.log");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("prometheus cannot run ({e}): run scripts/install-deps.sh"));
        let prometheus = Prometheus {
            child,
            addr,
            log,
            _dir: dir,
        };
        let ready = wait_until(Duration::from_secs(30), || {
            (get(addr, "/-/ready").map(|(status, _)| status) == Some(200)).then_some(())
        });
        assert!(
            ready.is_some(),
            "Prometheus is not ready on {addr}:\n{}",
            prometheus.log()
        );
        prometheus
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A GET of its HTTP API, as JSON.
    fn api(&self, path: &str) -> Value {
        let (_, body) = get(self.addr, path)
            .unwrap_or_else(|| panic!("Prometheus does not answer {path}:\n{}", self.log()));
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }

    /// An instant query now: its result, or Prometheus's error.
    fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let answer = self.api(&format!("/api/v1/query?query={}", encode(promql)));
        if answer["status"] != "success" {
            return Err(format!("{}: {}", answer["errorType"], answer["error"]));
        }
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Waits until every target has been scraped successfully a few times,
    /// so that rate() and increase() have samples to work on.
    fn wait_scraped(&self, targets: &[SocketAddr]) {
        let scraped = wait_until(Duration::from_secs(60), || {
            let result = self
                .query(r#"count_over_time(up{job="keepd"}[1m]) >= 3 and up{job="keepd"} == 1"#)
                .ok()?;
            targets
                .iter()
                .all(|t| {
                    result
                        .iter()
                        .any(|s| s["metric"]["instance"] == t.to_string())
                })
                .then_some(())
        });
        assert!(
            scraped.is_some(),
            "Prometheus did not scrape {targets:?}: {}\n{}",
            self.api("/api/v1/targets"),
            self.log()
        );
    }

    /// Waits until every rule has been evaluated without an error.
    fn wait_rules_evaluated(&self, count: usize) {
        let evaluated = wait_until(Duration::from_secs(30), || {
            let answer = self.api("/api/v1/rules");
            let rules: Vec<Value> = answer["data"]["groups"]
                .as_array()?
                .iter()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            (rules.len() == count
                && rules.iter().all(|r| {
                    r["health"] == "ok"
                        && r["lastEvaluation"]
                            .as_str()
                            .is_some_and(|t| !t.starts_with("0001-"))
                }))
            .then_some(())
        });
        assert!(
            evaluated.is_some(),
            "the {count} rules were not all evaluated without error: {}\n{}",
            self.api("/api/v1/rules"),
            self.log()
        );
    }

    /// The alerts pending or firing now.
    fn alerts(&self) -> Vec<Value> {
        self.api("/api/v1/alerts")["data"]["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Every selector of `expr` names series Prometheus holds: a
    /// misspelled metric, or a label matcher no series meets, fails.
    fn assert_series(&self, context: &str, expr: &str) {
        let found = selectors(expr);
        assert!(!found.is_empty(), "{context}: no metric in {expr}");
        for (name, selector) in found {
            let named = self
                .query(&name)
                .unwrap_or_else(|e| panic!("{context}: {name}: {e}"));
            assert!(
                !named.is_empty(),
                "{context}: keepd exposes no series named {name} (in {expr})"
            );
            let matching = self
                .query(&selector)
                .unwrap_or_else(|e| panic!("{context}: {selector}: {e}"));
            assert!(
                !matching.is_empty(),
                "{context}: {name} has series, but none match {selector} (in {expr})"
            );
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A few API requests, so that the request metrics have series: an
/// account, a vault, a push, a pull, and an unrouted path.
async fn traffic(daemon: &Daemon) {
    let email = format!("user-{}@example.org", common::uuid());
    let mut client = daemon.client();
    client.register(&email, PASSWORD).await.unwrap();
    client.login(&email, PASSWORD).await.unwrap();
    let key = client.create_vault("metrics", PASSWORD).await.unwrap();
    client
        .push("metrics", &key, &common::labelled(&["one", "two"]), None)
        .await
        .unwrap();
    let page = client.pull("metrics", 0, 10).await.unwrap();
    assert_eq!(page.logs.len(), 2);
    assert_eq!(daemon.get("/no/such/route").map(|(s, _)| s), Some(404));
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_and_alert_rules_query_real_metrics() {
    if !common::require_tool("prometheus", "Debian's prometheus") {
        return;
    }
    let rules = rules();
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).expect("JSON");

    let healthy = TestNode::new();
    let daemon = healthy.start_healthy();
    traffic(&daemon).await;
    // Asking for more than the host gives, in warn mode: it starts anyway,
    // below its minimum (the report test measures this host at high).
    let below = TestNode::with(json!({"security": {
        "fallback_mode": "warn",
        "minimum_level": "maximum",
    }}));
    let below_daemon = below.start_healthy();
    let (a, b) = (daemon.metrics_addr(), below_daemon.metrics_addr());
    let prometheus = Prometheus::start(&[a, b]);
    prometheus.wait_scraped(&[a, b]);
    // More requests while Prometheus watches, so that the rates are not 0.
    traffic(&daemon).await;
    std::thread::sleep(Duration::from_millis(2500));

    // The dashboard's variables: a Prometheus data source, and instances
    // from a metric that has them.
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let variable = |name: &str| {
        variables
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no variable {name}"))
    };
    assert_eq!(variable("datasource")["type"], "datasource");
    assert_eq!(variable("datasource")["query"], "prometheus");
    // Grafana takes the query as a string or as {"query": ...}.
    let instance_variable = variable("instance");
    let instances = instance_variable["query"]
        .as_str()
        .or_else(|| instance_variable["query"]["query"].as_str())
        .expect("the instance variable's query");
    let (metric, label) = instances
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
        .and_then(|q| q.split_once(','))
        .unwrap_or_else(|| panic!("not label_values(METRIC, LABEL): {instances}"));
    let values = prometheus
        .query(&format!("count by ({}) ({})", label.trim(), metric.trim()))
        .unwrap();
    assert!(
        values
            .iter()
            .any(|s| s["metric"][label.trim()] == a.to_string()),
        "{instances} does not list {a}: {values:?}"
    );

    // Every panel's query, with this node selected: valid, an answer, and
    // every metric and label matcher in it real.
    let instance = a.to_string();
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 20, "{} queries", queries.len());
    let mut on_dashboard = String::new();
    for (title, expr) in &queries {
        let expr = substitute(expr, &instance);
        let context = format!("panel {title:?}");
        let result = prometheus
            .query(&expr)
            .unwrap_or_else(|e| panic!("{context}: {expr}: {e}"));
        assert!(!result.is_empty(), "{context}: no series from {expr}");
        prometheus.assert_series(&context, &expr);
        on_dashboard.push_str(&expr);
        on_dashboard.push('\n');
    }
    // And every metric keepd exposes is on the dashboard.
    let names = prometheus
        .query(r#"count by (__name__) ({__name__=~"keepd_.+", job="keepd"})"#)
        .unwrap();
    assert!(names.len() >= 15, "{names:?}");
    let shown = selectors(&on_dashboard);
    for series in &names {
        let name = series["metric"]["__name__"].as_str().unwrap();
        assert!(
            shown.iter().any(|(n, _)| n == name),
            "{name} is on no panel of the dashboard"
        );
    }

    // Every rule: valid, and every metric and label matcher in it real.
    for rule in &rules {
        let context = format!("rule {}", rule.name);
        prometheus
            .query(&rule.expr)
            .unwrap_or_else(|e| panic!("{context}: {}: {e}", rule.expr));
        prometheus.assert_series(&context, &rule.expr);
    }
    let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    for required in [
        "KeepdSecurityLevelBelowMinimum",
        "KeepdPostgresDown",
        "KeepdBackupTooOld",
        "KeepdHigh5xxRate",
        "KeepdPoolSaturated",
        "KeepdWalArchiveFailing",
    ] {
        assert!(names.contains(&required), "no rule {required}: {names:?}");
    }

    // Prometheus loaded the same rules and evaluates them without error.
    prometheus.wait_rules_evaluated(rules.len());

    // The node below its minimum: the condition holds for it alone, and
    // the alert is pending (its `for` has not run out yet) or firing.
    let security = rules
        .iter()
        .find(|r| r.name == "KeepdSecurityLevelBelowMinimum")
        .unwrap();
    let result = prometheus.query(&security.expr).unwrap();
    let flagged: Vec<&Value> = result.iter().map(|s| &s["metric"]["instance"]).collect();
    assert_eq!(flagged, [&Value::from(b.to_string())], "{result:?}");
    let is_expected = |alert: &Value| -> bool {
        alert["labels"]["alertname"] == "KeepdSecurityLevelBelowMinimum"
            && alert["labels"]["instance"] == b.to_string()
    };
    let raised = wait_until(Duration::from_secs(30), || {
        prometheus.alerts().iter().any(is_expected).then_some(())
    });
    assert!(
        raised.is_some(),
        "KeepdSecurityLevelBelowMinimum not raised for {b}: {:?}",
        prometheus.alerts()
    );

    // A few more evaluations: nothing else is pending or firing, for
    // either node (neither has backups configured, so the backup alert
    // stays quiet too).
    std::thread::sleep(Duration::from_secs(3));
    let alerts = prometheus.alerts();
    let others: Vec<&Value> = alerts.iter().filter(|a| !is_expected(a)).collect();
    assert!(others.is_empty(), "alerts on healthy nodes: {others:#?}");
    drop(prometheus);
}

// Kubernetes: contrib/kubernetes is `keepd render --target kubernetes` of
// the example configuration; it passes the Kubernetes API schemas
// (kubernetes-validate), a manifest security scanner (checkov) with no
// failed check and only the skips docs/operations.md explains, and its
// CloudNativePG `Cluster` uses only fields of CloudNativePG 1.30.0's API.

const KUBE_BASE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/kubernetes");
const KUBE_VALIDATE: &str = "/opt/keepd-test/kubernetes-validate/bin/kubernetes-validate";
const CHECKOV: &str = "/opt/keepd-test/checkov/bin/checkov";
const CNPG_FIELDS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/cnpg-1.30.0-cluster-fields.txt"
);
/// The checkov checks the manifests skip, each explained in
/// docs/operations.md ("Running on Kubernetes").
const CHECKOV_SKIPS: &[&str] = &["CKV_K8S_43"];

fn rendered_manifests() -> (tempfile::TempDir, Vec<(String, String)>) {
    // Not a hidden directory: checkov skips those.
    let dir = tempfile::Builder::new().prefix("kube").tempdir().unwrap();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/keepd.example.yaml");
    let out_dir = dir.path().display().to_string();
    let (ok, out) = run_tool(
        common::keepd_bin(),
        &[
            "--config",
            example,
            "render",
            "--target",
            "kubernetes",
            "--out",
            &out_dir,
        ],
    );
    assert!(ok, "{out}");
    let mut files: Vec<(String, String)> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&path).unwrap())
        })
        .collect();
    files.sort();
    (dir, files)
}

#[test]
fn the_kubernetes_base_is_what_the_renderer_writes() {
    let (_dir, files) = rendered_manifests();
    let mut shipped: Vec<String> = std::fs::read_dir(KUBE_BASE)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    shipped.sort();
    let names: Vec<&String> = files.iter().map(|(n, _)| n).collect();
    assert_eq!(shipped.iter().collect::<Vec<_>>(), names);
    for (name, text) in &files {
        let shipped = std::fs::read_to_string(format!("{KUBE_BASE}/{name}")).unwrap();
        assert_eq!(
            &shipped, text,
            "contrib/kubernetes/{name} is stale: run `keepd --config config/keepd.example.yaml \
             render --target kubernetes --out contrib/kubernetes`"
        );
    }
}

#[test]
fn the_kubernetes_manifests_pass_the_api_schemas_and_a_security_scanner() {
    if !common::require_file(KUBE_VALIDATE, "kubernetes-validate (PyPI)")
        || !common::require_file(CHECKOV, "checkov (PyPI)")
    {
        return;
    }
    let (dir, files) = rendered_manifests();
    let core: Vec<String> = files
        .iter()
        .map(|(name, _)| name)
        .filter(|name| {
            *name != "kustomization.yaml"
                && !keepd::kubernetes::CUSTOM_RESOURCES.contains(&name.as_str())
        })
        .map(|name| dir.path().join(name).display().to_string())
        .collect();
    let mut args = vec!["--strict"];
    args.extend(core.iter().map(String::as_str));
    let (ok, out) = run_tool(KUBE_VALIDATE, &args);
    assert!(ok, "{out}");
    assert_eq!(
        out.matches(" passed for resource ").count(),
        core.len(),
        "every manifest validated:\n{out}"
    );

    let path = dir.path().display().to_string();
    let (_, out) = run_tool(
        CHECKOV,
        &["-d", &path, "--framework", "kubernetes", "-o", "json"],
    );
    // The report first; what checkov says after it on stderr is not JSON.
    let report: Value = serde_json::Deserializer::from_str(&out)
        .into_iter::<Value>()
        .next()
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("no report from checkov: {out}"));
    let summary = &report["summary"];
    assert_eq!(summary["failed"], 0, "checkov failed checks:\n{out}");
    assert!(summary["passed"].as_u64().unwrap() > 50, "{summary}");
    let skipped: Vec<&str> = report["results"]["skipped_checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["check_id"].as_str().unwrap())
        .collect();
    for id in &skipped {
        assert!(
            CHECKOV_SKIPS.contains(id),
            "{id} is skipped without a reason in the docs"
        );
    }
    let docs = std::fs::read_to_string(OPERATIONS).unwrap();
    for id in CHECKOV_SKIPS {
        assert!(docs.contains(id), "docs/operations.md explains {id}");
    }
}

/// Every field of the rendered CloudNativePG `Cluster` is one its API
/// defines, with that type (the list: tests/data, from its CRD).
#[test]
fn the_cloudnativepg_cluster_uses_only_fields_of_its_api() {
    let known: std::collections::HashMap<String, String> = std::fs::read_to_string(CNPG_FIELDS)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(' '))
        .map(|(path, kind)| (path.to_string(), kind.to_string()))
        .collect();
    let (_dir, files) = rendered_manifests();
    let text = &files
        .iter()
        .find(|(n, _)| n == "postgres-cluster.yaml")
        .unwrap()
        .1;
    let cluster: Value = serde_norway::from_str(text).unwrap();
    assert_eq!(cluster["apiVersion"], "postgresql.cnpg.io/v1");
    assert_eq!(cluster["kind"], "Cluster");
    let mut fields = Vec::new();
    fn walk(
        value: &Value,
        path: String,
        known: &std::collections::HashMap<String, String>,
        out: &mut Vec<(String, &'static str)>,
    ) {
        let kind = match value {
            Value::Object(_) => "object",
            Value::Array(_) => "array",
            Value::String(_) => "string",
            Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
            Value::Number(_) => "number",
            Value::Bool(_) => "boolean",
            Value::Null => "null",
        };
        out.push((path.clone(), kind));
        match value {
            Value::Object(map) => {
                for (key, sub) in map {
                    // A map's values (parameters) are listed as `.*`.
                    let named = format!("{path}.{key}");
                    let next = if known.contains_key(&named) {
                        named
                    } else {
                        format!("{path}.*")
                    };
                    walk(sub, next, known, out);
                }
            }
            Value::Array(items) => {
                for item in items {
                    walk(item, format!("{path}[]"), known, out);
                }
            }
            _ => {}
        }
    }
    walk(&cluster["spec"], "spec".into(), &known, &mut fields);
    for (path, kind) in &fields {
        let expected = known
            .get(path)
            .unwrap_or_else(|| panic!("{path} is not a field of CloudNativePG 1.30.0's Cluster"));
        let fits = expected == kind
            || (expected == "int-or-string" && (*kind == "string" || *kind == "integer"));
        assert!(
            fits,
            "{path} is a {kind}; CloudNativePG 1.30.0 wants {expected}"
        );
    }
    // Every parameter is a string, even to a YAML 1.1 parser (`on`).
    for (name, value) in cluster["spec"]["postgresql"]["parameters"]
        .as_object()
        .unwrap()
    {
        assert!(
            !["on", "off", "yes", "no", "y", "n"].contains(&value.as_str().unwrap()),
            "{name}: {value} is a boolean to Kubernetes's YAML parser"
        );
    }
}
