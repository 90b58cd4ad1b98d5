//! `keepd render --target kubernetes`: manifests for keepd on Kubernetes
//! over a CloudNativePG cluster, from the configuration. Pure: the same
//! configuration renders the same files (contrib/kubernetes is this
//! renderer's output for the example configuration, kept as a kustomize
//! base operators overlay).
//!
//! keepd runs as a StatefulSet: each pod is a node whose identity key
//! lives in a volume of its own (`volumeClaimTemplates`), so a restarted
//! or rescheduled pod is the same node and keeps its admission. (A
//! Deployment would need a Secret per pod made outside Kubernetes, and a
//! new pod would have no identity of its own.) New pods join by token
//! (`cluster.join_token_file` from a Secret). keepd connects through its
//! `external` provider to the CloudNativePG `Cluster` rendered beside it:
//! verify-full TLS with the CA CloudNativePG issues, the superuser
//! credential from its secret, the settings keepd would render for a
//! server of its own (pgAudit, TLS 1.3, scram, auth_delay, tuning), and a
//! pg_hba that admits keepd's roles over TLS only and rejects the rest.
//! NetworkPolicies let only keepd's pods (and the cluster itself and its
//! operator) reach Postgres, and only the ingress controller (and the
//! monitoring namespace, on the metrics port) reach keepd. Every pod runs
//! under the restricted Pod Security profile.

use serde_json::{Value, json};

use crate::config::Config;
use crate::postgres::DATABASE;
use crate::postgres::render::LOGIN_ROLES;
use crate::postgres::tuning::Tuning;

/// Where the manifests put things, named once.
const NAMESPACE: &str = "keepd";
const APP: &str = "keepd";
const DB: &str = "keepd-db";
/// The unprivileged user keepd's container runs as (a high UID, no
/// account in the image needed).
const UID: u64 = 10001;
const STATE: &str = "/var/lib/keepd";
const RUNTIME: &str = "/run/keepd";
const CONFIG_DIR: &str = "/etc/keepd";
const DB_SECRET_DIR: &str = "/etc/keepd/db";
const DB_CA_DIR: &str = "/etc/keepd/db-ca";
const JOIN_DIR: &str = "/etc/keepd/join";
/// keepd's memory bound (docs/benchmarks.md, P5: under 64 MiB measured
/// under load) with room for bursts of large pushes and pulls.
const KEEPD_MEMORY_REQUEST: &str = "128Mi";
const KEEPD_MEMORY_LIMIT: &str = "512Mi";
/// What the Postgres pods may use when the configuration does not say
/// (`database.postgres.memory_mb`).
const POSTGRES_MEMORY_MB: u32 = 2048;

/// What the renderer reads of the configuration and the command line.
#[derive(Debug, Clone)]
pub struct KubeInputs {
    /// keepd's container image (`--image`).
    pub image: String,
    pub api_port: u16,
    pub metrics_port: u16,
    pub max_connections: u32,
    pub postgres_memory_mb: u32,
    pub postgres_instances: u32,
    pub keepd_replicas: u32,
}

impl KubeInputs {
    pub fn of(config: &Config, image: String) -> KubeInputs {
        let pg = &config.database.postgres;
        KubeInputs {
            image,
            api_port: config.api.listen.port(),
            metrics_port: config.api.metrics_listen.map_or(9187, |a| a.port()),
            max_connections: pg.max_connections,
            postgres_memory_mb: pg.memory_mb.unwrap_or(POSTGRES_MEMORY_MB),
            postgres_instances: 3,
            keepd_replicas: 2,
        }
    }
}

/// The manifests as (file name, YAML), and the kustomization listing them.
pub fn render(inputs: &KubeInputs) -> Vec<(String, String)> {
    let objects: Vec<(&str, Value)> = vec![
        ("service-account.yaml", service_account()),
        ("keepd-config.yaml", keepd_config(inputs)),
        ("keepd-statefulset.yaml", statefulset(inputs)),
        ("keepd-service.yaml", keepd_service(inputs)),
        ("keepd-metrics-service.yaml", metrics_service(inputs)),
        ("keepd-servicemonitor.yaml", service_monitor()),
        ("postgres-cluster.yaml", postgres_cluster(inputs)),
        ("networkpolicy-postgres.yaml", postgres_policy()),
        ("networkpolicy-keepd.yaml", keepd_policy(inputs)),
    ];
    let mut files: Vec<(String, String)> = objects
        .iter()
        .map(|(name, object)| (name.to_string(), yaml(object)))
        .collect();
    let kustomization = json!({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": objects.iter().map(|(name, _)| *name).collect::<Vec<_>>(),
    });
    files.push(("kustomization.yaml".into(), yaml(&kustomization)));
    files
}

/// The manifests that use only Kubernetes's own API (the others are the
/// custom resources of CloudNativePG and the Prometheus operator).
pub const CUSTOM_RESOURCES: [&str; 2] = ["keepd-servicemonitor.yaml", "postgres-cluster.yaml"];

fn yaml(object: &Value) -> String {
    format!(
        "# Rendered by `keepd render --target kubernetes`; overlay it with kustomize rather than\n\
         # editing it.\n{}",
        serde_norway::to_string(object).expect("a JSON value is YAML")
    )
}

fn labels() -> Value {
    json!({"app.kubernetes.io/name": APP, "app.kubernetes.io/component": "server"})
}

fn meta(name: &str) -> Value {
    json!({"name": name, "namespace": NAMESPACE, "labels": labels()})
}

fn service_account() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": meta(APP),
        // keepd never talks to the Kubernetes API.
        "automountServiceAccountToken": false,
    })
}

/// keepd's configuration: the external provider against the CNPG
/// cluster's read-write service, its CA and superuser secret as files.
fn keepd_config(inputs: &KubeInputs) -> Value {
    let config = json!({
        "node": {"state_dir": STATE, "runtime_dir": RUNTIME},
        "log": {"format": "json"},
        "api": {
            "listen": format!("0.0.0.0:{}", inputs.api_port),
            "metrics_listen": format!("0.0.0.0:{}", inputs.metrics_port),
        },
        "database": {"postgres": {
            "provider": "external",
            "max_connections": inputs.max_connections,
            "external": {
                "host": format!("{DB}-rw"),
                "port": 5432,
                "database": DATABASE,
                "admin_user": "postgres",
                "admin_password_file": format!("{DB_SECRET_DIR}/password"),
                "sslmode": "verify-full",
                "ca_file": format!("{DB_CA_DIR}/ca.crt"),
            },
        }},
        "cluster": {"join_token_file": format!("{JOIN_DIR}/token")},
    });
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta("keepd-config"),
        "data": {"keepd.yaml": serde_norway::to_string(&config).expect("a JSON value is YAML")},
    })
}

fn statefulset(inputs: &KubeInputs) -> Value {
    let secret_volume = |name: &str, secret: &str, items: Value, optional: bool| {
        json!({"name": name, "secret": {
            "secretName": secret, "items": items, "defaultMode": 0o400, "optional": optional,
        }})
    };
    let container = json!({
        "name": APP,
        "image": inputs.image,
        "imagePullPolicy": "Always",
        "args": ["run", "--config", format!("{CONFIG_DIR}/keepd.yaml")],
        "ports": [
            {"name": "api", "containerPort": inputs.api_port},
            {"name": "metrics", "containerPort": inputs.metrics_port},
        ],
        // Alive while the process answers at all; ready once admitted and
        // serving (a node waiting for admission answers /health 503).
        "livenessProbe": {
            "tcpSocket": {"port": "api"},
            "periodSeconds": 10, "failureThreshold": 6,
        },
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": "api"},
            "periodSeconds": 5, "failureThreshold": 2,
        },
        "startupProbe": {
            "tcpSocket": {"port": "api"},
            "periodSeconds": 5, "failureThreshold": 60,
        },
        "resources": {
            "requests": {"cpu": "250m", "memory": KEEPD_MEMORY_REQUEST},
            "limits": {"cpu": "2", "memory": KEEPD_MEMORY_LIMIT},
        },
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": UID,
            "runAsGroup": UID,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "state", "mountPath": STATE},
            {"name": "runtime", "mountPath": RUNTIME},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": true},
            {"name": "db-superuser", "mountPath": DB_SECRET_DIR, "readOnly": true},
            {"name": "db-ca", "mountPath": DB_CA_DIR, "readOnly": true},
            {"name": "join-token", "mountPath": JOIN_DIR, "readOnly": true},
        ],
    });
    let mut metadata = meta(APP);
    metadata["annotations"] = json!({
        // Explained in docs/operations.md ("Running on Kubernetes").
        "checkov.io/skip1": "CKV_K8S_43=the image is named by tag: an overlay pins a digest for its registry",
    });
    json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata,
        "spec": {
            "serviceName": APP,
            "replicas": inputs.keepd_replicas,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": labels()},
            "template": {
                "metadata": {"labels": labels()},
                "spec": {
                    "serviceAccountName": APP,
                    "automountServiceAccountToken": false,
                    "securityContext": {
                        "runAsNonRoot": true,
                        "runAsUser": UID,
                        "runAsGroup": UID,
                        "fsGroup": UID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": [
                        {"name": "runtime", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                        {"name": "config", "configMap": {"name": "keepd-config", "defaultMode": 0o444}},
                        secret_volume("db-superuser", &format!("{DB}-superuser"),
                            json!([{"key": "password", "path": "password"}]), false),
                        secret_volume("db-ca", &format!("{DB}-ca"),
                            json!([{"key": "ca.crt", "path": "ca.crt"}]), false),
                        // Created by the operator from `keepd cluster token
                        // create`; without it a new pod waits for `keepd
                        // cluster admit`.
                        secret_volume("join-token", "keepd-join-token",
                            json!([{"key": "token", "path": "token"}]), true),
                    ],
                },
            },
            "volumeClaimTemplates": [{
                "metadata": {"name": "state", "labels": labels()},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            }],
        },
    })
}

fn keepd_service(inputs: &KubeInputs) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(APP),
        "spec": {
            "selector": labels(),
            "ports": [{"name": "api", "port": inputs.api_port, "targetPort": "api"}],
        },
    })
}

fn metrics_service(inputs: &KubeInputs) -> Value {
    let mut metadata = meta("keepd-metrics");
    metadata["labels"]["app.kubernetes.io/component"] = json!("metrics");
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "selector": labels(),
            "ports": [{"name": "metrics", "port": inputs.metrics_port, "targetPort": "metrics"}],
        },
    })
}

fn service_monitor() -> Value {
    json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": meta(APP),
        "spec": {
            "selector": {"matchLabels": {
                "app.kubernetes.io/name": APP, "app.kubernetes.io/component": "metrics",
            }},
            "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "30s"}],
        },
    })
}

/// The CloudNativePG cluster with the settings keepd renders for a server
/// of its own, where CloudNativePG lets them be set (it fixes listening,
/// logging's destination and TLS files itself, and preloads pgAudit when
/// pgaudit.* is set).
fn postgres_cluster(inputs: &KubeInputs) -> Value {
    let tuning = Tuning::for_memory(
        u64::from(inputs.postgres_memory_mb) << 20,
        inputs.max_connections,
    );
    let mut parameters = serde_json::Map::new();
    for (name, value) in tuning.settings() {
        parameters.insert(name.into(), json!(value.trim_matches('\'')));
    }
    let fixed = [
        ("max_connections", inputs.max_connections.to_string()),
        ("password_encryption", "scram-sha-256".into()),
        ("ssl_min_protocol_version", "TLSv1.3".into()),
        ("auth_delay.milliseconds", "500".into()),
        ("log_connections", "on".into()),
        ("log_disconnections", "on".into()),
        ("log_error_verbosity", "verbose".into()),
        ("log_statement", "none".into()),
        (
            "pgaudit.log",
            crate::postgres::render::PGAUDIT_SUPERUSER_CLASSES.into(),
        ),
        ("pgaudit.log_catalog", "off".into()),
        ("pgaudit.log_parameter", "off".into()),
        ("pgaudit.log_relation", "on".into()),
    ];
    for (name, value) in fixed {
        // `on` and `off` are booleans to YAML 1.1 (Kubernetes's parser),
        // and CloudNativePG takes strings: Postgres's other spelling.
        let value = match value.as_str() {
            "on" => "true".to_string(),
            "off" => "false".to_string(),
            _ => value,
        };
        parameters.insert(name.into(), json!(value));
    }
    json!({
        "apiVersion": "postgresql.cnpg.io/v1",
        "kind": "Cluster",
        "metadata": meta(DB),
        "spec": {
            "instances": inputs.postgres_instances,
            "primaryUpdateStrategy": "unsupervised",
            // keepd administers its database as the superuser (the
            // external provider's admin), from CloudNativePG's secret.
            "enableSuperuserAccess": true,
            "bootstrap": {"initdb": {"database": DATABASE, "dataChecksums": true}},
            "postgresql": {
                "shared_preload_libraries": ["auth_delay"],
                "parameters": parameters,
                // Before CloudNativePG's own final rule (any role, any
                // address, with a password): keepd's roles over TLS, the
                // superuser over TLS, nothing else.
                "pg_hba": [
                    format!("hostssl {DATABASE} {LOGIN_ROLES} all scram-sha-256"),
                    "hostssl all postgres all scram-sha-256".to_string(),
                    "host all all all reject".to_string(),
                ],
            },
            "storage": {"size": "10Gi"},
            "resources": {
                "requests": {"memory": format!("{}Mi", inputs.postgres_memory_mb), "cpu": "500m"},
                "limits": {"memory": format!("{}Mi", inputs.postgres_memory_mb)},
            },
            "monitoring": {"enablePodMonitor": true},
        },
    })
}

/// Postgres: reachable by keepd's pods, the cluster's own instances
/// (replication) and CloudNativePG's operator (its status port), nothing
/// else.
fn postgres_policy() -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta("keepd-db-ingress"),
        "spec": {
            "podSelector": {"matchLabels": {"cnpg.io/cluster": DB}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": labels()}}],
                    "ports": [{"protocol": "TCP", "port": 5432}],
                },
                {
                    "from": [{"podSelector": {"matchLabels": {"cnpg.io/cluster": DB}}}],
                    "ports": [{"protocol": "TCP", "port": 5432}, {"protocol": "TCP", "port": 8000}],
                },
                {
                    "from": [{"namespaceSelector": {"matchLabels": {
                        "kubernetes.io/metadata.name": "cnpg-system",
                    }}}],
                    "ports": [{"protocol": "TCP", "port": 8000}, {"protocol": "TCP", "port": 5432}],
                },
            ],
        },
    })
}

/// keepd: its API from the ingress controller's namespace only, its
/// metrics from the monitoring namespace only.
fn keepd_policy(inputs: &KubeInputs) -> Value {
    let from_namespace = |name: &str| json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}]);
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta("keepd-ingress"),
        "spec": {
            "podSelector": {"matchLabels": labels()},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": from_namespace("ingress-nginx"),
                    "ports": [{"protocol": "TCP", "port": inputs.api_port}],
                },
                {
                    "from": from_namespace("monitoring"),
                    "ports": [{"protocol": "TCP", "port": inputs.metrics_port}],
                },
            ],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn inputs() -> KubeInputs {
        let config = Config::from_yaml("", Path::new("t.yaml"), Path::new("/srv")).unwrap();
        KubeInputs::of(&config, "keepd:test".into())
    }

    fn object(name: &str) -> Value {
        let files = render(&inputs());
        let text = &files.iter().find(|(n, _)| n == name).unwrap().1;
        serde_norway::from_str(text).unwrap()
    }

    #[test]
    fn the_pod_runs_under_the_restricted_profile() {
        let set = object("keepd-statefulset.yaml");
        let pod = &set["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        assert_eq!(pod["automountServiceAccountToken"], false);
        for container in pod["containers"].as_array().unwrap() {
            let sc = &container["securityContext"];
            assert_eq!(sc["readOnlyRootFilesystem"], true);
            assert_eq!(sc["allowPrivilegeEscalation"], false);
            assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
            assert!(sc["runAsUser"].as_u64().unwrap() >= 10000);
            assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/health");
            assert!(container["resources"]["limits"]["memory"].is_string());
        }
    }

    #[test]
    fn keepd_reaches_the_cluster_over_verified_tls_with_its_secrets() {
        let config = object("keepd-config.yaml");
        let keepd: Value =
            serde_norway::from_str(config["data"]["keepd.yaml"].as_str().unwrap()).unwrap();
        let external = &keepd["database"]["postgres"]["external"];
        assert_eq!(external["host"], "keepd-db-rw");
        assert_eq!(external["sslmode"], "verify-full");
        // The rendered configuration is one keepd accepts.
        let text = config["data"]["keepd.yaml"].as_str().unwrap();
        Config::from_yaml(text, Path::new("k.yaml"), Path::new("/")).unwrap();
        let hba = object("postgres-cluster.yaml")["spec"]["postgresql"]["pg_hba"].clone();
        assert_eq!(
            hba.as_array().unwrap().last().unwrap(),
            "host all all all reject"
        );
    }

    #[test]
    fn the_kustomization_lists_every_manifest() {
        let files = render(&inputs());
        let kustomization: Value = serde_norway::from_str(&files.last().unwrap().1).unwrap();
        let listed: Vec<&str> = kustomization["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let names: Vec<&str> = files[..files.len() - 1]
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(listed, names);
    }
}
