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
use keepd::recovery::{self, RecoveryError};

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
        default_value = keepd::config::DEFAULT_CONFIG_PATH
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
    /// Measure and print the security report (the live system, not the
    /// configuration); exit 1 when the level is below
    /// security.minimum_level.
    Report {
        /// The stable machine form: level, checks[] (id, status, value,
        /// recommendation) and the threat model.
        #[arg(long)]
        json: bool,
    },
    /// Work with the hash-chained audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Install, remove or print keepd's service definition (systemd unit,
    /// launchd plist).
    Service {
        #[command(subcommand)]
        command: ServiceCommand,
        /// systemd or launchd (default: this platform's).
        #[arg(long, global = true)]
        target: Option<keepd::service::Target>,
        /// Add what the docker provider needs (systemd drop-in).
        #[arg(long, global = true)]
        docker: bool,
        /// Print the steps instead of carrying them out.
        #[arg(long, global = true)]
        dry_run: bool,
    },
    /// Shamir shares of the node identity key, for recovery.
    Recovery {
        #[command(subcommand)]
        command: RecoveryCommand,
    },
    /// Backups with pgBackRest (backup.repository): take one, list them,
    /// verify the repository.
    Backup {
        #[command(subcommand)]
        command: BackupCommand,
    },
    /// Restore the database of this stopped node from the backup
    /// repository: to the end of the WAL archive, or to a moment.
    Restore {
        /// Everything the archive holds.
        #[arg(long, conflicts_with = "to", required_unless_present = "to")]
        latest: bool,
        /// A moment, as Postgres reads it: `2026-12-01 14:05:00+00`.
        #[arg(long, value_name = "TIMESTAMP")]
        to: Option<String>,
    },
    /// The nodes sharing this node's database: list them, admit a node
    /// that waits, remove one.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Manage accounts.
    Account {
        #[command(subcommand)]
        command: AccountCommand,
    },
    /// Open psql on keepd's database; credentials are unsealed in memory and
    /// handed over as an in-memory password file, never the command line
    /// or the environment.
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
enum ServiceCommand {
    /// Write the definition (and create the service user) and enable it.
    Install,
    /// Disable and remove the definition; state and config stay.
    Uninstall,
    /// Print the definition.
    Print,
}

#[derive(Subcommand)]
enum RecoveryCommand {
    /// Split the identity key (node.state_dir/identity.key) into shares,
    /// any THRESHOLD of which rebuild it; one file per share in DIR.
    Split {
        /// Default: encryption_at_rest.recovery.shamir.total_shares.
        #[arg(long, value_name = "N")]
        shares: Option<u32>,
        /// Default: encryption_at_rest.recovery.shamir.threshold.
        #[arg(long, value_name = "T")]
        threshold: Option<u32>,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Who holds each share (repeat once per share), e.g. an email.
        /// Default: encryption_at_rest.recovery.shamir.shareholder_ids.
        #[arg(long = "shareholder", value_name = "ID")]
        shareholders: Vec<String>,
    },
    /// Rebuild the identity key from share files and write it to
    /// node.state_dir/identity.key (or --out), never overwriting a key.
    Combine {
        #[arg(required = true, value_name = "SHARE")]
        shares: Vec<PathBuf>,
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum BackupCommand {
    /// Take a backup now: differential (full when there is none yet),
    /// with its progress.
    Now {
        /// A full backup instead.
        #[arg(long)]
        full: bool,
    },
    /// The backups in the repository and the WAL archive's range.
    List {
        /// pgBackRest's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check every file of every backup and the WAL archive against the
    /// repository's checksums.
    Verify,
    /// Seal the access key of backup.s3's bucket into db.enc (keepd
    /// stopped); the secret access key is read from stdin, one line.
    S3Credentials {
        /// The access key's id.
        #[arg(long, value_name = "ID")]
        key_id: String,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Every node: admitted or pending, its key's fingerprint, who
    /// admitted it and when.
    Status,
    /// The nodes waiting to be admitted, with the fingerprint to compare
    /// with what the waiting node logs.
    Pending,
    /// Admit a waiting node: the cluster key, sealed to its public key.
    Admit {
        #[arg(value_name = "NODE_ID")]
        node_id: String,
    },
    /// Remove a node: its sealed key and its login roles (its sessions
    /// are ended); run it on another member.
    Remove {
        #[arg(value_name = "NODE_ID")]
        node_id: String,
    },
}

#[derive(Subcommand)]
enum AccountCommand {
    /// Print a single-use invite code for `POST /auth/register`
    /// (`inviteCode`), needed when api.registration is `invite`.
    Invite {
        /// How long the code stays valid: 30m, 7d, ...
        #[arg(long, value_name = "DURATION", default_value = "7d")]
        ttl: keepd::config::HumanDuration,
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
        Command::Report { json } => {
            match runtime().and_then(|rt| Ok(rt.block_on(keepd::admin::report(&config))?)) {
                Ok(report) => {
                    if json {
                        println!("{}", report.to_json());
                    } else {
                        println!("{}", report.render_box());
                    }
                    if report.level() < config.security.minimum_level {
                        return ExitCode::from(1);
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }
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
        Command::Recovery { command } => recovery(&config, command),
        Command::Account {
            command: AccountCommand::Invite { ttl },
        } => invite(&config, ttl.get()),
        Command::Cluster { command } => cluster(&config, command),
        Command::Backup { command } => backup(&config, command),
        Command::Restore { latest: _, to } => restore(&config, to),
        Command::Service {
            command,
            target,
            docker,
            dry_run,
        } => service(&cli.config, command, target, docker, dry_run),
        Command::Psql { role, args } => match keepd::admin::psql(&config, role.as_deref(), &args) {
            // keepd's codes, not psql's: its 2 (cannot connect) is a
            // runtime failure here, where 2 means a usage error.
            Ok(status) if status.success() => return ExitCode::SUCCESS,
            Ok(_) => return ExitCode::from(1),
            Err(e) => Err(e.into()),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let usage = e.chain().any(|c| {
                c.is::<ConfigError>()
                    || c.is::<RenderError>()
                    || c.downcast_ref::<keepd::daemon::DaemonError>()
                        .is_some_and(keepd::daemon::DaemonError::is_configuration)
                    || c.downcast_ref::<keepd::admin::AdminError>()
                        .is_some_and(|a| {
                            matches!(
                                a,
                                keepd::admin::AdminError::UnknownRole { .. }
                                    | keepd::admin::AdminError::BadS3Key(_)
                            )
                        })
                    || c.downcast_ref::<RecoveryError>().is_some_and(|r| {
                        matches!(
                            r,
                            RecoveryError::Counts { .. }
                                | RecoveryError::Shareholders { .. }
                                | RecoveryError::DuplicateShareholder(_)
                                | RecoveryError::ShareholderName(_)
                        )
                    })
            });
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
    release_large_buffers();
    runtime()?.block_on(keepd::daemon::run(config_path, config))?;
    Ok(())
}

/// Buffers of 256 KiB and more (pull answers reach api.max_pull_bytes) are
/// mapped and unmapped on their own, so what a burst of large pulls used
/// goes back to the system. Left alone, glibc raises its mmap threshold
/// after the first large frees (up to 32 MiB) and keeps such buffers in
/// its heaps, where the memory stays held.
fn release_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it is called before
    // any other thread exists.
    unsafe {
        nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

fn invite(config: &Config, ttl: std::time::Duration) -> anyhow::Result<()> {
    let code = runtime()?.block_on(keepd::admin::invite(config, ttl))?;
    if config.api.registration != keepd::config::Registration::Invite {
        eprintln!(
            "keepd: note: api.registration is not `invite`; registration does not ask for this code"
        );
    }
    println!("{code}");
    Ok(())
}

fn backup(config: &Config, command: BackupCommand) -> anyhow::Result<()> {
    use keepd::backup::BackupKind;
    let pgbackrest = || keepd::admin::backups(config);
    match command {
        BackupCommand::Now { full } => {
            let kind = if full {
                BackupKind::Full
            } else {
                BackupKind::Differential
            };
            runtime()?.block_on(pgbackrest()?.backup(kind))?;
            println!("backup complete");
        }
        BackupCommand::List { json } => {
            print!("{}", runtime()?.block_on(pgbackrest()?.info(json))?)
        }
        BackupCommand::Verify => {
            print!("{}", runtime()?.block_on(pgbackrest()?.verify())?);
            println!("backup repository verified");
        }
        BackupCommand::S3Credentials { key_id } => {
            let mut line = zeroize::Zeroizing::new(String::new());
            std::io::stdin()
                .read_line(&mut line)
                .context("cannot read the secret access key from stdin")?;
            let secret = keepd::secrets::values::SecretString::new(
                line.trim_end_matches(['\n', '\r']).to_string(),
            );
            keepd::admin::set_s3_credentials(config, &key_id, secret)?;
            println!("the S3 access key is sealed in db.enc; start keepd");
        }
    }
    Ok(())
}

fn restore(config: &Config, to: Option<String>) -> anyhow::Result<()> {
    use keepd::backup::RestoreTarget;
    let target = match to {
        Some(time) => RestoreTarget::time(&time)?,
        None => RestoreTarget::Latest,
    };
    let restored = runtime()?.block_on(keepd::admin::restore(config, target.clone()))?;
    println!(
        "restored to {target}; the audit chain continues from seq {} (the checkpoint was at {}); \
         start keepd",
        restored.chain_head,
        restored
            .checkpoint_before
            .map_or_else(|| "none".to_string(), |seq| format!("seq {seq}"))
    );
    Ok(())
}

fn cluster(config: &Config, command: ClusterCommand) -> anyhow::Result<()> {
    use keepd::admin::ClusterAction;
    let (action, only_pending) = match &command {
        ClusterCommand::Status => (ClusterAction::Status, false),
        ClusterCommand::Pending => (ClusterAction::Status, true),
        ClusterCommand::Admit { node_id } => (ClusterAction::Admit(node_id), false),
        ClusterCommand::Remove { node_id } => (ClusterAction::Remove(node_id), false),
    };
    let members = runtime()?.block_on(keepd::admin::cluster(config, action))?;
    match &command {
        ClusterCommand::Admit { node_id } => println!("admitted {node_id}"),
        ClusterCommand::Remove { node_id } => println!("removed {node_id}"),
        ClusterCommand::Status | ClusterCommand::Pending => {}
    }
    let shown: Vec<_> = members
        .iter()
        .filter(|m| !only_pending || !m.admitted)
        .collect();
    if shown.is_empty() {
        println!(
            "{}",
            if only_pending {
                "no node is waiting"
            } else {
                "no member yet"
            }
        );
    }
    for m in shown {
        let state = match (&m.admitted_at, &m.admitted_by) {
            (Some(at), Some(by)) => format!("admitted {at} UTC by {by}"),
            _ => format!("pending since {} UTC", m.requested_at),
        };
        println!("{}  {}  {state}", m.node_id, m.fingerprint);
    }
    Ok(())
}

fn rotate(config: &Config) -> anyhow::Result<()> {
    let request = keepd::daemon::control::Request::Rotate;
    let message = runtime()?.block_on(keepd::daemon::control::request(
        &keepd::config::Layout::of(config).control_socket(),
        &request,
    ))?;
    println!("{message}");
    Ok(())
}

fn service(
    config_path: &Path,
    command: ServiceCommand,
    target: Option<keepd::service::Target>,
    docker: bool,
    dry_run: bool,
) -> anyhow::Result<()> {
    use keepd::service::{self, Target};
    let target = target.unwrap_or_else(Target::native);
    let binary = std::env::current_exe().context("cannot find keepd's own path")?;
    let config = std::path::absolute(config_path).context("cannot resolve --config")?;
    let steps = match command {
        ServiceCommand::Print => {
            match target {
                Target::Systemd => {
                    print!("{}", service::systemd_unit(&binary, &config));
                    if docker {
                        print!("\n{}", service::systemd_docker_dropin());
                    }
                }
                Target::Launchd => print!("{}", service::launchd_plist(&binary, &config)),
            }
            return Ok(());
        }
        ServiceCommand::Install => service::install_steps(target, &binary, &config, docker),
        ServiceCommand::Uninstall => service::uninstall_steps(target),
    };
    if dry_run {
        for step in &steps {
            println!("{step}");
        }
        return Ok(());
    }
    service::apply(&steps)?;
    println!("done: {} steps", steps.len());
    Ok(())
}

fn recovery(config: &Config, command: RecoveryCommand) -> anyhow::Result<()> {
    let key_path = keepd::config::Layout::of(config).identity_key();
    match command {
        RecoveryCommand::Split {
            shares,
            threshold,
            out,
            shareholders,
        } => {
            // The configuration's Shamir settings are the defaults; flags
            // override them.
            let shamir = &config.encryption_at_rest.recovery.shamir;
            let shares = shares.unwrap_or(u32::from(shamir.total_shares));
            let threshold = threshold.unwrap_or(u32::from(shamir.threshold));
            let shareholders = if shareholders.is_empty() {
                shamir.shareholder_ids.clone()
            } else {
                shareholders
            };
            let identity = keepd::identity::NodeIdentity::load(&key_path)?;
            let dealt = recovery::split(&identity, shares, threshold, &shareholders)?;
            let paths = recovery::write_shares(&out, &dealt)?;
            println!(
                "wrote {} shares of node {} to {} (any {threshold} rebuild the key):",
                paths.len(),
                identity.node_id(),
                out.display()
            );
            for path in paths {
                println!("  {}", path.display());
            }
        }
        RecoveryCommand::Combine { shares, out } => {
            let parsed = shares
                .iter()
                .map(|path| Ok((path.clone(), recovery::read_share(path)?)))
                .collect::<Result<Vec<_>, RecoveryError>>()?;
            let identity = recovery::combine(&parsed)?;
            let target = out.unwrap_or(key_path);
            recovery::restore(&identity, &target)?;
            println!(
                "rebuilt the identity key of node {} into {}",
                identity.node_id(),
                target.display()
            );
        }
    }
    Ok(())
}

fn write_rendered(config: &Config, out: &Path) -> anyhow::Result<()> {
    let rendered = render::render(&render::RenderInputs::of(config))?;
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
