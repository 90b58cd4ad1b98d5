//! Shamir share files: any text parses or is refused with a reason.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = keepd::recovery::ShareFile::parse(text, Path::new("share.txt"));
    }
});
