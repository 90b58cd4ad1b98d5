//! The keepd command line: parse, call the library, map errors to exit codes
//! (0 ok, 1 runtime failure, 2 usage or configuration error).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use keepd::config::{Config, ConfigError};
use keepd::postgres::render::{self, RenderError};

#[derive(Parser)]
#[command(
    name = "keepd",
    version,
    about = "A zero-knowledge sync service on a PostgreSQL instance nobody else can reach"
)]
struct Cli {
    /// The configuration file (YAML).
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        default_value = "/etc/keepd/keepd.yaml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground until SIGTERM or SIGINT.
    Run,
    /// Write postgresql.conf, pg_hba.conf, pg_ident.conf and initdb/*.sql
    /// exactly as `run` would install them; changes nothing else.
    Render {
        /// Directory to write into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Ask the running daemon to rotate its database credentials now.
    Rotate,
    /// Work with the hash-chained audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Open psql on keepd's database; credentials are unsealed in memory and
    /// passed through the environment, never the command line.
    Psql {
        /// `superuser` (default), `login` (the active login role) or a login
        /// role name.
        #[arg(long, value_name = "ROLE")]
        role: Option<String>,
        /// Arguments for psql, after `--`.
        #[arg(last = true, value_name = "ARGS")]
        args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Recompute the chain and check the signed checkpoint: exit 0 when
    /// intact, 1 naming the first bad entry.
    Verify,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("keepd: {e}");
            return ExitCode::from(2);
        }
    };
    keepd::logging::init(&config.log);
    let result = match cli.command {
        Command::Run => run(&cli.config, config),
        Command::Render { out } => write_rendered(&config, &out),
        Command::Rotate => rotate(&config),
        Command::Audit {
            command: AuditCommand::Verify,
        } => match runtime().and_then(|rt| Ok(rt.block_on(keepd::admin::audit_verify(&config))?)) {
            Ok(verdict @ keepd::audit::Verdict::Intact { .. }) => {
                println!("{verdict}");
                Ok(())
            }
            Ok(verdict) => {
                eprintln!("keepd: {verdict}");
                return ExitCode::from(1);
            }
            Err(e) => Err(e),
        },
        Command::Psql { role, args } => match keepd::admin::psql(&config, role.as_deref(), &args) {
            Ok(status) => return ExitCode::from(status.code().unwrap_or(1).clamp(0, 255) as u8),
            Err(e) => Err(e.into()),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let usage = e
                .chain()
                .any(|c| c.is::<ConfigError>() || c.is::<RenderError>());
            eprintln!("keepd: {}", describe(&e));
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

/// The error and its causes, skipping causes a message already quotes
/// (most of keepd's errors name their cause inline).
fn describe(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run(config_path: &Path, config: Config) -> anyhow::Result<()> {
    runtime()?.block_on(keepd::daemon::run(config_path, config))?;
    Ok(())
}

fn rotate(config: &Config) -> anyhow::Result<()> {
    let request = keepd::daemon::control::Request::Rotate;
    let message = runtime()?.block_on(keepd::daemon::control::request(
        &config.node.runtime_dir,
        &request,
    ))?;
    println!("{message}");
    Ok(())
}

fn write_rendered(config: &Config, out: &Path) -> anyhow::Result<()> {
    let rendered = render::render(config)?;
    let files = rendered.files();
    for (name, text) in &files {
        let path = out.join(name);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        file.write_all(text.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!(
        "wrote {} files to {} (fingerprint {})",
        files.len(),
        out.display(),
        rendered.fingerprint()
    );
    Ok(())
}
