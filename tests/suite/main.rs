//! keepd's integration tests: the real binary against a real Postgres, one
//! module per area, all in one test binary (so `common` is compiled once
//! and the whole suite links once). Run one area with
//! `cargo nextest run --test suite api::`, one test with its name
//! (`cargo nextest run --test suite api::devices_`).
//!
//! A test that needs a tool or an engine this machine lacks says so through
//! `common::require`: with `CI` set that is a failure naming what is
//! missing; elsewhere the test prints `SKIPPED: <reason>` and passes.
//! What this kind of machine can never provide is `#[ignore = "why"]`.

mod common;

mod api;
mod at_rest;
mod backup;
mod bounds;
mod cli;
mod contrib;
mod credentials;
mod docker;
mod edge;
mod external;
mod faults;
mod ha;
mod identity;
mod native;
mod opaque;
mod openapi;
mod package;
mod report;
mod schema;
mod second_factor;
mod service;
mod tls;
