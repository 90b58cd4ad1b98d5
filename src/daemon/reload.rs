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

/// The sections of `new` that differ from `running` (which already holds
/// the live settings of `new`), so need a restart.
fn needs_restart(running: &Config, new: &Config) -> Vec<&'static str> {
    [
        ("node", running.node == new.node),
        ("log.format", running.log.format == new.log.format),
        ("database", running.database == new.database),
        ("credentials", running.credentials == new.credentials),
        ("network", running.network == new.network),
        ("security", running.security == new.security),
        (
            "encryption_at_rest",
            running.encryption_at_rest == new.encryption_at_rest,
        ),
        ("api", running.api == new.api),
    ]
    .into_iter()
    .filter(|(_, same)| !same)
    .map(|(name, _)| name)
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
        if new.api.rate_limits != self.running.api.rate_limits {
            self.api.set_rate_limits(&new.api.rate_limits);
            info!("SIGHUP: api.rate_limits applied");
        }
        // What runs now: the old configuration with the live settings
        // replaced, so the next SIGHUP compares against the truth.
        self.running.log.level = new.log.level.clone();
        self.running.api.rate_limits = new.api.rate_limits.clone();
        let restart = needs_restart(&self.running, &new);
        if !restart.is_empty() {
            warn!(sections = ?restart, "SIGHUP: these settings changed and take effect at the next restart");
        }
    }
}
