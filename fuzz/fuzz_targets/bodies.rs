//! Every JSON request body type: any bytes parse or are refused.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = keepd::api::parse_request_bodies(data);
});
