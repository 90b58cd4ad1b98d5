//! Log output: one line per event, human-readable or JSON, to stderr.

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

type SetLevel = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// Changes the running filter (SIGHUP); set once by `init`.
static RELOAD: OnceLock<SetLevel> = OnceLock::new();

/// `level` as a filter. The HTTP/2 library logs a warning for each
/// connection a client misuses (rapid reset, say): an attacker could write
/// the log at will, so below `error` it is heard only when the level names
/// it; the edge counts those connections and logs a summary instead.
fn filter(level: &str) -> Result<EnvFilter, String> {
    let mut filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
    if !level.split(',').any(|d| d.trim_start().starts_with("h2")) {
        filter = filter.add_directive("h2=error".parse().expect("a valid directive"));
    }
    Ok(filter)
}

/// `KEEPD_LOG`, when set, overrides `log.level` (e.g. `KEEPD_LOG=debug`).
pub fn init(config: &LogConfig) {
    let filter = std::env::var("KEEPD_LOG")
        .ok()
        .and_then(|v| filter(&v).ok())
        .or_else(|| filter(&config.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
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
    let filter = filter(level)?;
    match RELOAD.get() {
        Some(reload) => reload(filter).map(|()| true),
        None => Ok(false),
    }
}
