//! The configuration loader: any text is a config or a named error.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = keepd::config::Config::from_yaml(text, Path::new("fuzz.yaml"), Path::new("/"));
    }
});
