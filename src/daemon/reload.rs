//! SIGHUP: re-read the configuration. Settings that can change live are
//! applied (log level, the auth rate limit; the TLS certificate check runs
//! too); every other changed section is named in one line saying it takes
//! a restart. A file that does not load is reported and the running
//! configuration kept.

use std::path::Path;
use std::sync::Arc;

use tracing::{error, info, warn};

use crate::api::Api;
use crate::config::Config;
use crate::logging;

pub struct Reloader {
    pub api: Arc<Api>,
    pub running: Config,
}

/// The sections of `new` that differ from `old` and need a restart.
fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut api = new.api.clone();
    api.rate_limits = old.api.rate_limits.clone();
    let sections = [
        ("node", format!("{:?}", old.node), format!("{:?}", new.node)),
        (
            "log.format",
            format!("{:?}", old.log.format),
            format!("{:?}", new.log.format),
        ),
        (
            "database",
            format!("{:?}", old.database),
            format!("{:?}", new.database),
        ),
        (
            "credentials",
            format!("{:?}", old.credentials),
            format!("{:?}", new.credentials),
        ),
        (
            "network",
            format!("{:?}", old.network),
            format!("{:?}", new.network),
        ),
        (
            "security",
            format!("{:?}", old.security),
            format!("{:?}", new.security),
        ),
        (
            "encryption_at_rest",
            format!("{:?}", old.encryption_at_rest),
            format!("{:?}", new.encryption_at_rest),
        ),
        ("api", format!("{:?}", old.api), format!("{:?}", api)),
    ];
    sections
        .into_iter()
        .filter(|(_, a, b)| a != b)
        .map(|(name, _, _)| name)
        .collect()
}

impl Reloader {
    pub fn reload(&mut self, path: &Path) {
        let new = match Config::load(path) {
            Ok(new) => new,
            Err(e) => {
                error!(error = %e, "SIGHUP: the new configuration is invalid; keeping the running one");
                return;
            }
        };
        if new.log.level != self.running.log.level {
            match logging::set_level(&new.log.level) {
                Ok(true) => info!(level = %new.log.level, "SIGHUP: log level applied"),
                Ok(false) => info!("SIGHUP: KEEPD_LOG overrides log.level; unchanged"),
                Err(e) => error!(error = %e, "SIGHUP: log.level not applied"),
            }
        }
        let per_minute = new.api.rate_limits.auth_per_minute;
        if per_minute != self.running.api.rate_limits.auth_per_minute {
            self.api.set_auth_per_minute(per_minute);
            info!(
                auth_per_minute = per_minute,
                "SIGHUP: auth rate limit applied"
            );
        }
        let restart = needs_restart(&self.running, &new);
        if !restart.is_empty() {
            warn!(sections = ?restart, "SIGHUP: these settings changed and take effect at the next restart");
        }
        let mut applied = new;
        // What was not applied stays as it runs, so the next SIGHUP
        // compares against the truth.
        for section in &restart {
            match *section {
                "node" => applied.node = self.running.node.clone(),
                "log.format" => applied.log.format = self.running.log.format,
                "database" => applied.database = self.running.database.clone(),
                "credentials" => applied.credentials = self.running.credentials.clone(),
                "network" => applied.network = self.running.network.clone(),
                "security" => applied.security = self.running.security.clone(),
                "encryption_at_rest" => {
                    applied.encryption_at_rest = self.running.encryption_at_rest.clone()
                }
                _ => {
                    let limits = applied.api.rate_limits.clone();
                    applied.api = self.running.api.clone();
                    applied.api.rate_limits = limits;
                }
            }
        }
        self.running = applied;
    }
}
