//! The keepd command line: parse, call the library, map errors to exit codes
//! (0 ok, 1 runtime failure, 2 usage or configuration error).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use keepd::api::operator::{AccountRef, AccountSummary, AccountView};
use keepd::config::{Config, ConfigError};
use keepd::daemon::control::{self, Request};
use keepd::postgres::render::{self, RenderError};
use keepd::recovery::{self, RecoveryError};

/// The closing paragraph of a command's `--help` (and man page): examples,
/// then what its exit status means.
macro_rules! help {
    (codes: $codes:literal; $($example:literal),+ $(,)?) => {
        concat!("Examples:\n", $("  ", $example, "\n",)+ "\nExit status: ", $codes)
    };
    ($($example:literal),+ $(,)?) => {
        help!(codes: "0 done; 1 it failed (the message says why); 2 a usage or configuration error \
                      (bad arguments or keepd.yaml)"; $($example),+)
    };
}

#[derive(Parser)]
#[command(
    name = "keepd",
    version,
    about = "A zero-knowledge sync service on a PostgreSQL instance nobody else can reach",
    after_help = help!(
        "keepd run --config /etc/keepd/keepd.yaml",
        "keepd report",
        "keepd account list"
    )
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
    #[command(after_help = help!(
        codes: "0 stopped by a signal; 1 a runtime failure (Postgres would not start, a port is taken, \
                the report is below security.minimum_level in strict mode); 2 a configuration error";
        "keepd run --config /etc/keepd/keepd.yaml"
    ))]
    Run,
    /// Write postgresql.conf, pg_hba.conf, pg_ident.conf and initdb/*.sql
    /// exactly as `run` would install them, or (--target kubernetes)
    /// manifests for keepd over a CloudNativePG cluster with a kustomization;
    /// changes nothing else.
    #[command(after_help = help!(
        "keepd render --out /tmp/keepd-render",
        "keepd render --target kubernetes --image registry.example/keepd:0.1.0 --out deploy/base"
    ))]
    Render {
        /// Directory to write into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// What to render.
        #[arg(long, value_enum, default_value = "postgres")]
        target: RenderTarget,
        /// keepd's container image, for --target kubernetes.
        #[arg(long, value_name = "IMAGE", default_value = concat!("keepd:", env!("CARGO_PKG_VERSION")))]
        image: String,
    },
    /// Ask the running daemon to rotate its database credentials now: its
    /// login role, or with --superuser its own Postgres superuser's
    /// password.
    #[command(after_help = help!("keepd rotate", "keepd rotate --superuser"))]
    Rotate {
        /// Rotate keepd's Postgres superuser's password (native and docker).
        #[arg(long)]
        superuser: bool,
    },
    /// Measure and print the security report (the live system, not the
    /// configuration).
    #[command(after_help = help!(
        codes: "0 the level is at least security.minimum_level; 1 it is below, or keepd's Postgres \
                cannot be reached; 2 a configuration error";
        "keepd report",
        "keepd report --json | jq .level"
    ))]
    Report {
        /// The stable machine form: level, checks[] (id, status, value,
        /// recommendation) and the threat model.
        #[arg(long)]
        json: bool,
    },
    /// Work with the hash-chained audit trail.
    #[command(after_help = help!("keepd audit verify"))]
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// The schema's migrations (keepd applies them itself at start).
    #[command(after_help = help!("keepd migrate status"))]
    Migrate {
        #[command(subcommand)]
        command: MigrateCommand,
    },
    /// Install, remove or print keepd's service definition (systemd unit,
    /// launchd plist), with its manual page and shell completions.
    #[command(after_help = help!(
        "keepd service install --config /etc/keepd/keepd.yaml",
        "keepd service install --docker --dry-run",
        "keepd service print"
    ))]
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
    #[command(after_help = help!(
        "keepd recovery split --out /media/usb/shares",
        "keepd recovery combine share-1.txt share-3.txt share-4.txt"
    ))]
    Recovery {
        #[command(subcommand)]
        command: RecoveryCommand,
    },
    /// Every key keepd holds or derives: version, age, policy, next renewal.
    #[command(after_help = help!("keepd keys status", "keepd keys status --json"))]
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// The node identity key at rest (node.identity).
    #[command(after_help = help!(
        "keepd identity protect",
        "keepd identity protect --with-key host"
    ))]
    Identity {
        #[command(subcommand)]
        command: IdentityCommand,
    },
    /// Backups with pgBackRest (backup.repository): take one, list them,
    /// verify the repository.
    #[command(after_help = help!("keepd backup now", "keepd backup list", "keepd backup verify"))]
    Backup {
        #[command(subcommand)]
        command: BackupCommand,
    },
    /// Restore the database of this stopped node from the backup
    /// repository: to the end of the WAL archive, or to a moment.
    #[command(after_help = help!(
        "keepd restore --latest",
        "keepd restore --to '2026-12-01 14:05:00+00'"
    ))]
    Restore {
        /// Everything the archive holds.
        #[arg(long, conflicts_with = "to", required_unless_present = "to")]
        latest: bool,
        /// A moment with its offset, as Postgres reads it:
        /// `2026-12-01 14:05:00+00` (also a `T` between, a fraction,
        /// `+05:30`, `Z`); a date or time that does not exist is refused.
        #[arg(long, value_name = "TIMESTAMP")]
        to: Option<String>,
    },
    /// The nodes sharing this node's database: list them, admit a node
    /// that waits, remove one.
    #[command(after_help = help!("keepd cluster status", "keepd cluster admit 3f9a...c2"))]
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Manage the accounts of the running daemon (over its control
    /// socket; the CLI never opens the database for this).
    #[command(after_help = help!("keepd account list", "keepd account disable alice@example.com"))]
    Account {
        #[command(subcommand)]
        command: AccountCommand,
    },
    /// Open psql on keepd's database; credentials are unsealed in memory and
    /// handed over as an in-memory password file, never the command line
    /// or the environment.
    #[command(after_help = help!(
        codes: "0 psql succeeded; 1 psql failed or could not connect; 2 a usage or configuration \
                error (an unknown --role)";
        "keepd psql",
        "keepd psql --role login -- -c 'SELECT count(*) FROM keepd.users'"
    ))]
    Psql {
        /// `superuser` (default), `login` (the active login role) or a login
        /// role name.
        #[arg(long, value_name = "ROLE")]
        role: Option<String>,
        /// Arguments for psql, after `--`.
        #[arg(last = true, value_name = "ARGS")]
        args: Vec<String>,
    },
    /// Print the manual page (roff), or write one page per command into
    /// a directory.
    #[command(after_help = help!("keepd man | man -l -", "keepd man --out /usr/local/share/man/man1"))]
    Man {
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Print the completion script of a shell.
    #[command(after_help = help!(
        "keepd completions bash > /etc/bash_completion.d/keepd",
        "keepd completions zsh > \"${fpath[1]}/_keepd\""
    ))]
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum ServiceCommand {
    /// Write the definition (and create the service user), the manual
    /// pages and completions, and enable it.
    #[command(after_help = help!("keepd service install"))]
    Install,
    /// Disable and remove the definition, manual pages and completions;
    /// state and config stay.
    #[command(after_help = help!("keepd service uninstall"))]
    Uninstall,
    /// Print the definition.
    #[command(after_help = help!("keepd service print --target launchd"))]
    Print,
}

#[derive(Subcommand)]
enum RecoveryCommand {
    /// Split the identity key (node.state_dir/identity.key) into shares,
    /// any THRESHOLD of which rebuild it; one file per share in DIR.
    #[command(after_help = help!(
        "keepd recovery split --out /media/usb/shares",
        "keepd recovery split --shares 3 --threshold 2 --shareholder ops@example.com \
         --shareholder cto@example.com --shareholder safe --out shares"
    ))]
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
    #[command(after_help = help!(
        "keepd recovery combine share-1.txt share-3.txt share-4.txt",
        "keepd recovery combine --out /tmp/identity.key share-*.txt"
    ))]
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
    #[command(after_help = help!("keepd backup now", "keepd backup now --full"))]
    Now {
        /// A full backup instead.
        #[arg(long)]
        full: bool,
    },
    /// The backups in the repository and the WAL archive's range.
    #[command(after_help = help!("keepd backup list", "keepd backup list --json"))]
    List {
        /// pgBackRest's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check every file of every backup and the WAL archive against the
    /// repository's checksums.
    #[command(after_help = help!(
        codes: "0 every file checks; 1 a file or the archive does not (named), or the repository \
                cannot be read; 2 a configuration error";
        "keepd backup verify"
    ))]
    Verify,
    /// Seal the access key of backup.s3's bucket into db.enc (keepd
    /// stopped); the secret access key is read from stdin, one line.
    #[command(after_help = help!(
        "keepd backup s3-credentials --key-id AKIA... < secret-key.txt"
    ))]
    S3Credentials {
        /// The access key's id.
        #[arg(long, value_name = "ID")]
        key_id: String,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RenderTarget {
    /// Postgres's configuration files and initdb scripts.
    Postgres,
    /// Kubernetes manifests (StatefulSet, CloudNativePG Cluster,
    /// NetworkPolicies, Services, ServiceMonitor) and a kustomization.
    Kubernetes,
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Every node: admitted or pending, its key's fingerprint, who
    /// admitted it and when.
    #[command(after_help = help!("keepd cluster status"))]
    Status,
    /// The nodes waiting to be admitted, with the fingerprint to compare
    /// with what the waiting node logs.
    #[command(after_help = help!("keepd cluster pending"))]
    Pending,
    /// Admit a waiting node: the cluster key, sealed to its public key.
    #[command(after_help = help!("keepd cluster admit 3f9a...c2"))]
    Admit {
        #[arg(value_name = "NODE_ID")]
        node_id: String,
    },
    /// Remove a node: its sealed key and its login roles (its sessions
    /// are ended); run it on another member.
    #[command(after_help = help!("keepd cluster remove 3f9a...c2"))]
    Remove {
        #[arg(value_name = "NODE_ID")]
        node_id: String,
    },
    /// Make a new cluster key and seal it to every admitted node in one
    /// transaction; the nodes adopt it without a restart. Tokens of the
    /// previous key work until they expire (api.jwt_ttl); field values are
    /// re-encrypted in the background. Run it after `cluster remove`.
    #[command(after_help = help!("keepd cluster rotate-key"))]
    RotateKey,
    /// Join tokens: a new node configured with one
    /// (cluster.join_token_file) is admitted by the members, without an
    /// operator, within the token's lifetime and uses.
    #[command(after_help = help!(
        "keepd cluster token create --ttl 1h --uses 3",
        "keepd cluster token list"
    ))]
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Issue a token and print it (once: the cluster keeps only a value
    /// that checks it).
    #[command(after_help = help!(
        "keepd cluster token create --ttl 1h --uses 3 > /run/secrets/keepd-join-token"
    ))]
    Create {
        /// How long it admits nodes (s, m, h, d).
        #[arg(long, default_value = "1h", value_name = "DURATION")]
        ttl: keepd::config::HumanDuration,
        /// How many nodes it admits.
        #[arg(long, default_value_t = 1, value_name = "N",
              value_parser = clap::value_parser!(u32).range(1..=1000))]
        uses: u32,
    },
    /// Every token: its id, when it was made and by which node, when it
    /// expires, uses left, and whether it is valid.
    #[command(after_help = help!("keepd cluster token list"))]
    List,
    /// Revoke a token: no node is admitted by it from now on.
    #[command(after_help = help!("keepd cluster token revoke 5c0ffee0d15ea5e5"))]
    Revoke {
        #[arg(value_name = "TOKEN_ID")]
        id: String,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// List every key: the identity, the cluster root and what derives
    /// from it, field keys, login roles, the superuser password, the
    /// backup passphrase, the TLS CA and certificates.
    #[command(after_help = help!("keepd keys status", "keepd keys status --json"))]
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum IdentityCommand {
    /// Move the plaintext identity.key into the protection node.identity
    /// names (a passphrase or a systemd encrypted credential), check that
    /// it opens, then delete the plaintext file. Run it with keepd
    /// stopped.
    #[command(after_help = help!(
        codes: "0 protected; 1 a failure (nothing deleted); 2 node.identity names no protection, or it cannot open the key";
        "keepd identity protect",
        "keepd identity protect --with-key host"
    ))]
    Protect {
        /// For a credential: what systemd-creds seals it with (auto:
        /// TPM2 and the host key where a TPM2 is present, else the host
        /// key; host; tpm2; host+tpm2).
        #[arg(long, value_name = "KEY", default_value = "auto")]
        with_key: String,
    },
}

#[derive(Subcommand)]
enum AccountCommand {
    /// The accounts on this server, in id order: created, state, live
    /// sessions and what each stores. keepd keeps no email, only its HMAC.
    #[command(after_help = help!(
        "keepd account list",
        "keepd account list --after 0192f1c4-... --limit 500",
        "keepd account list --json"
    ))]
    List {
        /// Start after this account id (the last line of the previous page).
        #[arg(long, value_name = "ID")]
        after: Option<uuid::Uuid>,
        /// Accounts per page.
        #[arg(long, value_name = "N", default_value_t = 100,
              value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// One account, by id or email: its usage against api.quotas.
    #[command(after_help = help!(
        "keepd account show alice@example.com",
        "keepd account show 0192f1c4-7f7e-7c3a-9d1e-4f7a2b6c8d90 --json"
    ))]
    Show {
        /// The account's id (a UUID, as `keepd account list` prints) or
        /// its email.
        #[arg(value_name = "ACCOUNT")]
        account: AccountRef,
        #[arg(long)]
        json: bool,
    },
    /// Disable an account: its sessions end at once and it cannot log in
    /// (403 `account_disabled`) until enabled; nothing it stored is lost.
    #[command(after_help = help!("keepd account disable alice@example.com"))]
    Disable {
        /// The account's id (a UUID, as `keepd account list` prints) or
        /// its email.
        #[arg(value_name = "ACCOUNT")]
        account: AccountRef,
    },
    /// Let a disabled account log in again.
    #[command(after_help = help!("keepd account enable alice@example.com"))]
    Enable {
        /// The account's id (a UUID, as `keepd account list` prints) or
        /// its email.
        #[arg(value_name = "ACCOUNT")]
        account: AccountRef,
    },
    /// Erase an account and everything it stored (vaults, entries,
    /// devices, backups); audited as the operator's. Cannot be undone.
    #[command(after_help = help!("keepd account delete alice@example.com --yes"))]
    Delete {
        /// The account's id (a UUID, as `keepd account list` prints) or
        /// its email.
        #[arg(value_name = "ACCOUNT")]
        account: AccountRef,
        /// Confirm the erasure.
        #[arg(long)]
        yes: bool,
    },
    /// Remove an account's second factor (TOTP), as a lost phone demands:
    /// it logs in with its password alone until it enrols again. Audited.
    #[command(after_help = help!("keepd account reset-second-factor alice@example.com"))]
    ResetSecondFactor {
        /// The account's id (a UUID, as `keepd account list` prints) or
        /// its email.
        #[arg(value_name = "ACCOUNT")]
        account: AccountRef,
    },
    /// Print a single-use invite code for `POST /auth/register`
    /// (`inviteCode`), needed when api.registration is `invite`.
    #[command(after_help = help!("keepd account invite", "keepd account invite --ttl 30m"))]
    Invite {
        /// How long the code stays valid: 30m, 7d, ... (at most 365d)
        #[arg(long, value_name = "DURATION", default_value = "7d")]
        ttl: keepd::config::HumanDuration,
    },
}

#[derive(Subcommand)]
enum MigrateCommand {
    /// Every migration: applied (when), pending (the next start applies
    /// it), changed since it was applied, or unknown to this keepd.
    #[command(after_help = help!(
        codes: "0 every applied migration is this keepd's; 1 one was changed or comes from a newer \
                keepd, or the database cannot be reached; 2 a configuration error";
        "keepd migrate status",
        "keepd migrate status --json"
    ))]
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Recompute the chain and check the signed checkpoint, or check an
    /// export that `audit.retention` wrote before pruning.
    #[command(after_help = help!(
        codes: "0 the chain (or the export) is intact; 1 it is not (the first bad entry is named), \
                or the database cannot be reached; 2 a configuration error";
        "keepd audit verify",
        "keepd audit verify --export /var/lib/keepd/audit-exports/audit-<node>-000000000001-000000010000.jsonl"
    ))]
    Verify {
        /// An export file: its signature and every link are checked
        /// with this node's identity; the database is not read.
        #[arg(long, value_name = "FILE")]
        export: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Documentation needs no configuration (a package build has none).
    match &cli.command {
        Command::Man { out } => return finish(manual(out.as_deref())),
        Command::Completions { shell } => {
            return finish(to_stdout(completions(*shell).as_bytes()));
        }
        _ => {}
    }
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
        Command::Render {
            out,
            target: RenderTarget::Postgres,
            ..
        } => write_rendered(&config, &out),
        Command::Render {
            out,
            target: RenderTarget::Kubernetes,
            image,
        } => write_files(
            &keepd::kubernetes::render(&keepd::kubernetes::KubeInputs::of(&config, image)),
            &out,
        )
        .map(|count| println!("wrote {count} manifests to {}", out.display())),
        Command::Rotate { superuser } => rotate(&config, superuser),
        Command::Report { json } => {
            match runtime().and_then(|rt| Ok(rt.block_on(keepd::admin::report(&config))?)) {
                Ok(report) => {
                    if json {
                        println!("{}", report.to_json());
                    } else {
                        println!("{}", report.render_box());
                    }
                    if report.level() < config.security.minimum_level || !report.measured() {
                        return ExitCode::from(1);
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }
        Command::Migrate {
            command: MigrateCommand::Status { json },
        } => match migrate_status(&config, json) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(1),
            Err(e) => Err(e),
        },
        Command::Audit {
            command: AuditCommand::Verify { export: Some(file) },
        } => match keepd::admin::audit_verify_export(&config, &file) {
            Ok(verdict) => {
                println!("{verdict}");
                Ok(())
            }
            Err(e @ keepd::admin::AdminError::Audit(_)) => {
                eprintln!("keepd: {e}");
                return ExitCode::from(1);
            }
            Err(e) => Err(e.into()),
        },
        Command::Audit {
            command: AuditCommand::Verify { export: None },
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
        Command::Identity {
            command: IdentityCommand::Protect { with_key },
        } => protect_identity(&config, &with_key),
        Command::Keys {
            command: KeysCommand::Status { json },
        } => keys_status(&config, json),
        Command::Account { command } => account(&config, command),
        Command::Cluster { command } => cluster(&config, command),
        Command::Backup { command } => backup(&config, command),
        Command::Restore { latest: _, to } => restore(&config, to),
        Command::Service {
            command,
            target,
            docker,
            dry_run,
        } => service(
            &cli.config,
            config.node.identity.credential.as_deref(),
            command,
            target,
            docker,
            dry_run,
        ),
        Command::Psql { role, args } => match keepd::admin::psql(&config, role.as_deref(), &args) {
            // keepd's codes, not psql's: its 2 (cannot connect) is a
            // runtime failure here, where 2 means a usage error.
            Ok(status) if status.success() => return ExitCode::SUCCESS,
            Ok(_) => return ExitCode::from(1),
            Err(e) => Err(e.into()),
        },
        Command::Man { .. } | Command::Completions { .. } => unreachable!("answered above"),
    };
    finish(result)
}

/// A mistake in how keepd was called that clap cannot see (a missing
/// confirmation, say): exit 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

/// The exit code of a command's outcome, its error printed.
fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let usage = e.chain().any(|c| {
                c.is::<ConfigError>()
                    || c.is::<UsageError>()
                    || c.is::<RenderError>()
                    || c.downcast_ref::<keepd::daemon::DaemonError>()
                        .is_some_and(keepd::daemon::DaemonError::is_configuration)
                    || c.downcast_ref::<keepd::identity::IdentityError>()
                        .is_some_and(keepd::identity::IdentityError::is_configuration)
                    || c.downcast_ref::<keepd::admin::AdminError>()
                        .is_some_and(keepd::admin::AdminError::is_usage)
                    || c.downcast_ref::<keepd::backup::BackupError>()
                        .is_some_and(keepd::backup::BackupError::is_configuration)
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

fn account(config: &Config, command: AccountCommand) -> anyhow::Result<()> {
    /// How the answer's data is printed.
    enum Shown {
        Page(u32),
        Account,
        Gone,
        Invite,
    }
    let (request, shown, json) = match command {
        AccountCommand::List { after, limit, json } => (
            Request::AccountList { after, limit },
            Shown::Page(limit),
            json,
        ),
        AccountCommand::Show { account, json } => {
            (Request::AccountShow { account }, Shown::Account, json)
        }
        AccountCommand::Disable { account } => {
            (Request::AccountDisable { account }, Shown::Account, false)
        }
        AccountCommand::Enable { account } => {
            (Request::AccountEnable { account }, Shown::Account, false)
        }
        AccountCommand::ResetSecondFactor { account } => (
            Request::AccountResetSecondFactor { account },
            Shown::Account,
            false,
        ),
        AccountCommand::Delete { account, yes } => {
            if !yes {
                return Err(UsageError(format!(
                    "deleting {account} erases it and everything it stored, for good; \
                     repeat with --yes to confirm"
                ))
                .into());
            }
            (Request::AccountDelete { account }, Shown::Gone, false)
        }
        AccountCommand::Invite { ttl } => {
            if ttl.get() > keepd::api::operator::MAX_INVITE_TTL {
                return Err(UsageError(format!(
                    "--ttl {ttl} is too long: an invite code stays valid for at most 365d"
                ))
                .into());
            }
            let ttl_seconds = ttl.get().as_secs().max(1);
            (Request::AccountInvite { ttl_seconds }, Shown::Invite, false)
        }
    };
    let answer = runtime()?.block_on(control::request(
        &keepd::config::Layout::of(config).control_socket(),
        &request,
    ))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&answer.data)?);
        return Ok(());
    }
    match shown {
        Shown::Page(limit) => {
            let page: Vec<AccountSummary> = serde_json::from_value(answer.data)?;
            print!("{}", account_table(&page));
            if let Some(last) = page.last().filter(|_| page.len() == limit as usize) {
                println!("more: keepd account list --after {}", last.id);
            }
        }
        Shown::Account => {
            let view: AccountView = serde_json::from_value(answer.data)?;
            print!("{}", account_card(&view));
            if answer.message != "account" {
                println!("{}", answer.message);
            }
        }
        Shown::Gone => {
            let gone: AccountSummary = serde_json::from_value(answer.data)?;
            println!("account {}: {}", gone.id, answer.message);
        }
        Shown::Invite => {
            if config.api.registration != keepd::config::Registration::Invite {
                eprintln!(
                    "keepd: note: api.registration is not `invite`; registration does not ask for this code"
                );
            }
            println!("{}", answer.data.as_str().unwrap_or_default());
        }
    }
    Ok(())
}

fn account_table(page: &[AccountSummary]) -> String {
    let mut out = format!(
        "{:<36}  {:<20}  {:<8}  {:>8}  {:>6}  {:>7}  {:>7}  {:>10}\n",
        "ID", "CREATED", "STATE", "SESSIONS", "VAULTS", "DEVICES", "BACKUPS", "STORED"
    );
    for a in page {
        out.push_str(&format!(
            "{:<36}  {:<20}  {:<8}  {:>8}  {:>6}  {:>7}  {:>7}  {:>10}\n",
            a.id,
            a.created_at,
            if a.disabled_at.is_some() {
                "disabled"
            } else {
                "active"
            },
            a.live_sessions,
            a.usage.vaults,
            a.usage.devices,
            a.usage.backups,
            bytes(a.usage.storage_bytes)
        ));
    }
    if page.is_empty() {
        out.push_str("no account\n");
    }
    out
}

/// One account against its quotas (0: no limit).
fn account_card(view: &AccountView) -> String {
    let a = &view.account;
    let of = |used: String, limit: u64, shown: String| {
        if limit == 0 {
            format!("{used} (no limit)")
        } else {
            format!("{used} of {shown}")
        }
    };
    let state = match &a.disabled_at {
        Some(at) => format!("disabled since {at}"),
        None => "active".to_string(),
    };
    let q = &view.quotas;
    let factor = if a.second_factor { "TOTP" } else { "none" };
    format!(
        "account   {}\ncreated   {}\nstate     {state}\n2fa       {factor}\nsessions  {} live\nstored    {}\n\
         vaults    {}\ndevices   {}\nbackups   {}\n",
        a.id,
        a.created_at,
        a.live_sessions,
        of(
            bytes(a.usage.storage_bytes),
            q.storage_bytes,
            bytes(q.storage_bytes)
        ),
        of(a.usage.vaults.to_string(), q.vaults, q.vaults.to_string()),
        of(
            a.usage.devices.to_string(),
            q.devices,
            q.devices.to_string()
        ),
        of(
            a.usage.backups.to_string(),
            q.backups,
            q.backups.to_string()
        ),
    )
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// The manual: keepd(1) on stdout, or a page per command in `out`.
fn manual(out: Option<&Path>) -> anyhow::Result<()> {
    let pages = man_pages();
    match out {
        None => to_stdout(pages[0].1.as_bytes())?,
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            for (name, roff) in &pages {
                let path = dir.join(name);
                std::fs::write(&path, roff)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            println!("wrote {} manual pages to {}", pages.len(), dir.display());
        }
    }
    Ok(())
}

/// Writes `bytes` to stdout; a reader that stopped early (`| head`) is
/// not a failure.
fn to_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    match std::io::stdout().write_all(bytes) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write to stdout")
        }
        _ => Ok(()),
    }
}

/// keepd.1 first, then keepd-account.1, keepd-account-list.1, ... (the
/// names clap_mangen gives: the command path joined by dashes).
fn man_pages() -> Vec<(String, String)> {
    fn walk(command: &clap::Command, pages: &mut Vec<(String, String)>) {
        let mut roff = Vec::new();
        clap_mangen::Man::new(command.clone())
            .render(&mut roff)
            .expect("rendering into memory cannot fail");
        let name = command.get_display_name().unwrap_or(command.get_name());
        pages.push((
            format!("{name}.1"),
            String::from_utf8(roff).expect("roff is text"),
        ));
        for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
            walk(sub, pages);
        }
    }
    use clap::CommandFactory;
    let mut command = Cli::command().disable_help_subcommand(true);
    command.build();
    let mut pages = Vec::new();
    walk(&command, &mut pages);
    pages
}

/// What `keepd service install` puts beside the service.
fn documentation() -> keepd::service::Documentation {
    use clap_complete::Shell;
    keepd::service::Documentation {
        man_pages: man_pages(),
        completions: [
            ("bash", Shell::Bash),
            ("zsh", Shell::Zsh),
            ("fish", Shell::Fish),
        ]
        .into_iter()
        .map(|(name, shell)| (name, completions(shell)))
        .collect(),
    }
}

fn completions(shell: clap_complete::Shell) -> String {
    use clap::CommandFactory;
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "keepd", &mut out);
    String::from_utf8(out).expect("completion scripts are text")
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
            let waiting = |waited: std::time::Duration| {
                eprintln!(
                    "another backup is running (the schedule's, or another `keepd backup now`); \
                     waiting for it to end ({}s so far)",
                    waited.as_secs()
                );
            };
            runtime()?.block_on(pgbackrest()?.backup(kind, waiting))?;
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

/// Prints the migrations; false when one was changed or is unknown.
fn migrate_status(config: &Config, json: bool) -> anyhow::Result<bool> {
    use keepd::postgres::migrate::MigrationState;
    let migrations = runtime()?.block_on(keepd::admin::migrate_status(config))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&migrations)?);
    } else {
        println!(
            "{:>7}  {:<20}  {:<8}  {:<19}  CHECKSUM",
            "VERSION", "NAME", "STATE", "APPLIED"
        );
        for m in &migrations {
            let state = serde_json::to_value(m.state)?;
            println!(
                "{:>7}  {:<20}  {:<8}  {:<19}  {}",
                m.version,
                m.name,
                state.as_str().unwrap_or_default(),
                m.applied_at.as_deref().unwrap_or("-"),
                m.checksum.as_deref().map_or("-", |c| &c[..16]),
            );
        }
    }
    Ok(migrations
        .iter()
        .all(|m| matches!(m.state, MigrationState::Applied | MigrationState::Pending)))
}

fn rotate_cluster_key(config: &Config) -> anyhow::Result<()> {
    let rotated = runtime()?.block_on(keepd::admin::cluster_rotate_key(config))?;
    println!(
        "the cluster key is now generation {} (fingerprint {}), sealed to {} member(s); every \
         node adopts it within seconds, tokens of the previous key work until they expire \
         (api.jwt_ttl), and field values are re-encrypted in the background",
        rotated.generation, rotated.fingerprint, rotated.members
    );
    Ok(())
}

fn join_tokens(config: &Config, command: &TokenCommand) -> anyhow::Result<()> {
    use keepd::admin::TokenAction;
    let action = match command {
        TokenCommand::Create { ttl, uses } => TokenAction::Create {
            ttl: ttl.get(),
            uses: *uses,
        },
        TokenCommand::List => TokenAction::List,
        TokenCommand::Revoke { id } => TokenAction::Revoke(id),
    };
    let (token, listed) = runtime()?.block_on(keepd::admin::join_tokens(config, action))?;
    if let Some(token) = token {
        // The token alone on stdout, for a file or a secret store.
        println!("{}", token.expose().as_str());
        eprintln!(
            "keepd: join token {} issued; give it to the new node as cluster.join_token_file \
             (it is shown only now)",
            token.id()
        );
        return Ok(());
    }
    if let TokenCommand::Revoke { id } = command {
        println!("revoked {id}");
    }
    if listed.is_empty() {
        println!("no join token");
    }
    for t in listed {
        println!(
            "{}  {:8}  uses left {:<4} expires {} UTC  made {} UTC by {}",
            t.id, t.state, t.uses_left, t.expires_at, t.created_at, t.created_by
        );
    }
    Ok(())
}

fn cluster(config: &Config, command: ClusterCommand) -> anyhow::Result<()> {
    use keepd::admin::ClusterAction;
    let (action, only_pending) = match &command {
        ClusterCommand::Status => (ClusterAction::Status, false),
        ClusterCommand::Pending => (ClusterAction::Status, true),
        ClusterCommand::Admit { node_id } => (ClusterAction::Admit(node_id), false),
        ClusterCommand::Remove { node_id } => (ClusterAction::Remove(node_id), false),
        ClusterCommand::RotateKey => return rotate_cluster_key(config),
        ClusterCommand::Token { command } => return join_tokens(config, command),
    };
    let members = runtime()?.block_on(keepd::admin::cluster(config, action))?;
    match &command {
        ClusterCommand::Admit { node_id } => println!("admitted {node_id}"),
        ClusterCommand::Remove { node_id } => println!(
            "removed {node_id}; it still knows the cluster key: run `keepd cluster rotate-key` \
             so that its tokens stop working and it can derive nothing new"
        ),
        ClusterCommand::Status
        | ClusterCommand::Pending
        | ClusterCommand::RotateKey
        | ClusterCommand::Token { .. } => {}
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

fn rotate(config: &Config, superuser: bool) -> anyhow::Result<()> {
    let answer = runtime()?.block_on(control::request(
        &keepd::config::Layout::of(config).control_socket(),
        &Request::Rotate { superuser },
    ))?;
    println!("{}", answer.message);
    Ok(())
}

fn service(
    config_path: &Path,
    identity_credential: Option<&Path>,
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
                    if let Some(credential) = identity_credential {
                        print!("\n{}", service::systemd_identity_dropin(credential));
                    }
                }
                Target::Launchd => print!("{}", service::launchd_plist(&binary, &config)),
            }
            return Ok(());
        }
        ServiceCommand::Install => {
            let units = service::Units {
                docker,
                identity_credential,
            };
            service::install_steps(target, &binary, &config, units, &documentation())
        }
        ServiceCommand::Uninstall => service::uninstall_steps(target, &documentation()),
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

fn keys_status(config: &Config, json: bool) -> anyhow::Result<()> {
    let keys = runtime()?.block_on(keepd::admin::keys_status(config))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&keys)?);
    } else {
        print!("{}", keepd::keys::table(&keys));
    }
    Ok(())
}

fn protect_identity(config: &Config, with_key: &str) -> anyhow::Result<()> {
    let _lock = keepd::state_lock::StateLock::acquire(&config.node.state_dir)?;
    let store = keepd::identity::protection::IdentityStore::of(config);
    let node = store.protect(with_key)?;
    println!(
        "node {node}: the identity is now {} ({}); {} is deleted",
        store.protection().describe(),
        store.path().display(),
        store.plain_path().display()
    );
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
            let identity = keepd::identity::protection::IdentityStore::of(config).load()?;
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
    let rendered = render::render(&keepd::postgres::locate::render_inputs(config))?;
    let files: Vec<(String, String)> = rendered
        .files()
        .into_iter()
        .map(|(name, text)| (name, text.to_string()))
        .collect();
    let count = write_files(&files, out)?;
    println!(
        "wrote {count} files to {} (fingerprint {})",
        out.display(),
        rendered.fingerprint()
    );
    Ok(())
}

/// Writes each (relative name, text) under `out`, 0600; how many.
fn write_files(files: &[(String, String)], out: &Path) -> anyhow::Result<usize> {
    for (name, text) in files {
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
    Ok(files.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_command_has_examples_and_exit_codes() {
        fn walk(command: &clap::Command, path: &str) {
            let help = command
                .get_after_help()
                .map(|h| h.to_string())
                .unwrap_or_default();
            assert!(
                help.contains("Examples:\n  keepd") && help.contains("\nExit status: 0 "),
                "`{path} --help` lacks examples or exit codes: {help:?}"
            );
            for sub in command.get_subcommands().filter(|s| s.get_name() != "help") {
                walk(sub, &format!("{path} {}", sub.get_name()));
            }
        }
        Cli::command().debug_assert();
        walk(&Cli::command(), "keepd");
    }

    #[test]
    fn a_manual_page_per_command() {
        let pages = man_pages();
        let names: Vec<&str> = pages.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names[0], "keepd.1");
        for expected in [
            "keepd-account.1",
            "keepd-account-disable.1",
            "keepd-backup-verify.1",
        ] {
            assert!(names.contains(&expected), "{names:?}");
        }
        assert!(!names.iter().any(|n| n.contains("help")), "{names:?}");
        let (_, disable) = pages
            .iter()
            .find(|(name, _)| name == "keepd-account-disable.1")
            .unwrap();
        assert!(disable.contains(".TH keepd-account-disable 1"), "{disable}");
        assert!(disable.contains("account_disabled") && disable.contains("Exit status"));
    }

    #[test]
    fn an_impossible_restore_moment_is_refused_before_anything_is_touched() {
        // A node with backups whose state directory does not exist: were
        // the moment read after the identity is loaded or the lock taken,
        // this would fail otherwise (no identity) or create the directory.
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.node.state_dir = dir.path().join("state");
        config.node.runtime_dir = dir.path().join("run");
        config.backup.repository = Some(dir.path().join("repository"));
        for moment in ["2026-13-45 99:99:99+00", "2026-02-29 10:00:00+00"] {
            let error = restore(&config, Some(moment.into())).unwrap_err();
            let refused = error.downcast_ref::<keepd::backup::BackupError>();
            assert!(
                refused.is_some_and(|e| e.is_configuration()),
                "{moment}: {error:#}"
            );
            assert!(
                format!("{error}").contains("YYYY-MM-DD HH:MM:SS"),
                "{error}"
            );
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn completions_know_the_commands() {
        let bash = completions(clap_complete::Shell::Bash);
        assert!(
            bash.contains("_keepd()") && bash.contains("disable"),
            "{bash}"
        );
        assert!(completions(clap_complete::Shell::Zsh).starts_with("#compdef keepd"));
    }
}
