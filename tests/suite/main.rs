//! keepd's integration tests: the real binary against a real Postgres, one
//! module per area, all in one test binary (so `common` is compiled once
//! and the whole suite links once). Run one area with
//! `cargo nextest run --test suite api::`, one test with its name
//! (`cargo nextest run --test suite api::devices_`).

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
mod native;
mod openapi;
mod package;
mod report;
mod schema;
mod service;
mod tls;
