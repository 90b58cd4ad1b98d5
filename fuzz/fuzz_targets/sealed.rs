//! The sealed-credential envelope: any bytes open or fail cleanly.
#![no_main]

use std::sync::LazyLock;

use keepd::identity::NodeIdentity;
use libfuzzer_sys::fuzz_target;

static IDENTITY: LazyLock<NodeIdentity> = LazyLock::new(|| NodeIdentity::from_seed(&[7; 32]));

fuzz_target!(|data: &[u8]| {
    let _ = keepd::secrets::seal::open(&IDENTITY, data);
});
