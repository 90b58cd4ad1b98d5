//! Bearer tokens: any string verifies or is refused.
#![no_main]

use std::sync::LazyLock;
use std::time::Duration;

use keepd::identity::NodeIdentity;
use keepd::tokens::TokenIssuer;
use libfuzzer_sys::fuzz_target;

static ISSUER: LazyLock<TokenIssuer> = LazyLock::new(|| {
    TokenIssuer::new(
        &NodeIdentity::from_seed(&[7; 32]),
        Duration::from_secs(3600),
    )
});

fuzz_target!(|data: &[u8]| {
    if let Ok(token) = std::str::from_utf8(data) {
        let _ = ISSUER.verify(token);
    }
});
