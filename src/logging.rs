//! Log output: one line per event, human-readable or JSON, to stderr.

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

type SetLevel = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// Changes the running filter (SIGHUP); set once by `init`.
static RELOAD: OnceLock<SetLevel> = OnceLock::new();

/// `KEEPD_LOG`, when set, overrides `log.level` (e.g. `KEEPD_LOG=debug`).
pub fn init(config: &LogConfig) {
    let filter = std::env::var("KEEPD_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new(&config.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.format {
        LogFormat::Human => {
            let builder = builder
                .with_ansi(std::io::stderr().is_terminal())
                .with_filter_reloading();
            let handle = builder.reload_handle();
            let _ = RELOAD.set(Box::new(move |f| {
                handle.reload(f).map_err(|e| e.to_string())
            }));
            builder.init();
        }
        LogFormat::Json => {
            let builder = builder.json().flatten_event(true).with_filter_reloading();
            let handle = builder.reload_handle();
            let _ = RELOAD.set(Box::new(move |f| {
                handle.reload(f).map_err(|e| e.to_string())
            }));
            builder.init();
        }
    }
}

/// Applies a new `log.level` to the running process; `KEEPD_LOG`, when
/// set, keeps precedence. Returns whether the filter changed.
pub fn set_level(level: &str) -> Result<bool, String> {
    if std::env::var_os("KEEPD_LOG").is_some() {
        return Ok(false);
    }
    let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
    match RELOAD.get() {
        Some(reload) => reload(filter).map(|()| true),
        None => Ok(false),
    }
}
