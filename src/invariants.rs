//! Architecture invariants kept by code rather than by review
//! (docs/ARCHITECTURE.md): this test reads keepd's own source and fails
//! when a module reaches past a boundary. Test modules (everything after a
//! file's `#[cfg(test)]`) are not read.

use std::path::{Path, PathBuf};

/// Every `.rs` file under `src/`, without its test module.
fn sources() -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&root, &mut files);
    files
        .into_iter()
        .filter(|path| !path.ends_with("invariants.rs"))
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let code = match text.find("#[cfg(test)]") {
                Some(at) => text[..at].to_string(),
                None => text,
            };
            let relative = path.strip_prefix(&root).unwrap().to_owned();
            (relative, code)
        })
        .collect()
}

/// The lines of code (comments left out) that match `found`.
fn offending(allowed: impl Fn(&Path) -> bool, found: impl Fn(&str) -> bool) -> Vec<String> {
    let mut hits = Vec::new();
    for (path, code) in sources() {
        if allowed(&path) {
            continue;
        }
        for (n, line) in code.lines().enumerate() {
            let line = line.trim();
            if !line.starts_with("//") && found(line) {
                hits.push(format!("src/{}:{}: {line}", path.display(), n + 1));
            }
        }
    }
    hits
}

#[test]
fn only_layout_names_files_under_the_state_and_runtime_directories() {
    let hits = offending(
        |path| path.starts_with("config"),
        |line| {
            ["state_dir.join(", "runtime_dir.join(", "state_dir().join("]
                .iter()
                .any(|p| line.contains(p))
        },
    );
    assert!(
        hits.is_empty(),
        "name the path in config::Layout:\n{}",
        hits.join("\n")
    );
}

#[test]
fn only_the_credential_store_reads_or_writes_db_enc() {
    let io = [
        "fs::read",
        "fs::write",
        "write_atomic",
        "File::open",
        "File::create",
        "OpenOptions",
    ];
    let hits = offending(
        |path| path == Path::new("secrets/store.rs"),
        |line| line.contains("credentials()") && io.iter().any(|call| line.contains(call)),
    );
    assert!(
        hits.is_empty(),
        "go through secrets::store::CredentialStore:\n{}",
        hits.join("\n")
    );
}

/// Where the provider is matched outside `postgres/` (and `config/`, which
/// defines it and derives the topology), and why.
const PROVIDER_MATCHED: &[(&str, &str)] = &[
    // Each provider is a different attack surface: the checks differ by
    // what they measure.
    (
        "report/measure.rs",
        "the security report's per-provider checks",
    ),
    // pgBackRest's paths as the pgBackRest that runs sees them: the
    // container's or the host's (a pure description, below the providers).
    (
        "repository.rs",
        "the repository's paths inside a container or on the host",
    ),
    // The restore replays in place (native) or in a one-off container
    // (docker); the container's facts feed the report.
    (
        "admin.rs",
        "keepd restore's replay and the report's container facts",
    ),
];

#[test]
fn the_provider_is_matched_only_behind_the_provider_boundary() {
    let hits = offending(
        |path| {
            path.starts_with("postgres")
                || path.starts_with("config")
                || PROVIDER_MATCHED
                    .iter()
                    .any(|(file, _)| path == Path::new(file))
        },
        |line| line.contains("Provider::"),
    );
    assert!(
        hits.is_empty(),
        "ask postgres (Server, CommandRunner, locate) instead of matching the provider:\n{}",
        hits.join("\n")
    );
}

#[test]
fn the_backup_module_sits_above_the_providers() {
    // The repository's description is below them (crate::repository); the
    // providers never import `backup`, and `backup` runs programs through
    // postgres::CommandRunner rather than reaching into a provider.
    let providers = offending(
        |path| !path.starts_with("postgres") && path != Path::new("repository.rs"),
        |line| line.contains("crate::backup"),
    );
    assert!(providers.is_empty(), "{}", providers.join("\n"));
    let backup = offending(
        |path| path != Path::new("backup.rs"),
        |line| line.contains("postgres::docker") || line.contains("exec_in_server"),
    );
    assert!(backup.is_empty(), "{}", backup.join("\n"));
}

/// The edge knows neither routes nor the database (docs/ARCHITECTURE.md,
/// `edge`): the paths it answers as streams are handed to it.
#[test]
fn the_edge_knows_no_route_and_no_database() {
    let hits = offending(
        |path| !path.starts_with("edge"),
        |line| {
            ["crate::api", "crate::postgres", "\"/sync", "\"/auth"]
                .iter()
                .any(|name| line.contains(name))
        },
    );
    assert!(
        hits.is_empty(),
        "the edge is handed what it needs (EdgeSettings, the router):\n{}",
        hits.join("\n")
    );
}
