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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let usage = e
                .chain()
                .any(|c| c.is::<ConfigError>() || c.is::<RenderError>());
            tracing::error!("{e:#}");
            eprintln!("keepd: {e:#}");
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

fn run(config_path: &Path, config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(keepd::daemon::run(config_path, config))?;
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
