//! keepd: a zero-knowledge sync service that owns a hardened PostgreSQL
//! instance end to end. See docs/ARCHITECTURE.md for the map of modules.

pub mod admin;
pub mod api;
pub mod audit;
pub mod backoff;
pub mod backup;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod device_messages;
pub mod edge;
pub mod field_crypto;
pub mod field_keys;
pub mod fsutil;
pub mod identity;
pub mod keys;
pub mod kubernetes;
pub mod logging;
pub mod metrics;
pub mod opaque;
pub mod passwords;
pub mod pki;
pub mod postgres;
pub mod recovery;
pub mod report;
pub mod repository;
pub mod second_factor;
pub mod secrets;
pub mod service;
pub mod shutdown;
pub mod state_lock;
pub mod tokens;

#[cfg(test)]
mod invariants;
