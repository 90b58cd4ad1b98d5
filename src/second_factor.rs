//! TOTP (RFC 6238) as a second factor, and its recovery codes. Pure: the
//! routes (`api::second_factor`) store the secret sealed and remember the
//! last step accepted, so a code is accepted once.
//!
//! The parameters every authenticator app understands: HMAC-SHA-1, 6
//! digits, 30-second steps, one step of skew either way (RFC 6238 §5.2),
//! a 160-bit secret (RFC 4226 §4).

use sha2::{Digest, Sha256};
use totp_rs::{Algorithm, Builder, Totp};
use zeroize::Zeroizing;

pub const DIGITS: usize = 6;
pub const STEP_SECONDS: u64 = 30;
const SKEW: u16 = 1;
const SECRET_BYTES: usize = 20;
/// Single-use codes for a lost authenticator.
pub const RECOVERY_CODES: usize = 10;
/// Random bytes in one recovery code (80 bits: four groups of five hex
/// digits).
const RECOVERY_BYTES: usize = 10;
const ISSUER: &str = "keepd";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodeError {
    #[error("a TOTP code is {DIGITS} digits")]
    Format,
    #[error("the operating system's random number generator failed: {0}")]
    Entropy(String),
}

fn random<const N: usize>() -> Result<Zeroizing<[u8; N]>, CodeError> {
    let mut bytes = Zeroizing::new([0u8; N]);
    getrandom::fill(bytes.as_mut()).map_err(|e| CodeError::Entropy(e.to_string()))?;
    Ok(bytes)
}

/// A new secret.
pub fn new_secret() -> Result<Zeroizing<Vec<u8>>, CodeError> {
    Ok(Zeroizing::new(random::<SECRET_BYTES>()?.to_vec()))
}

fn totp(secret: &[u8], label: &str) -> Totp {
    Builder::new()
        .with_algorithm(Algorithm::SHA1)
        .with_digits(DIGITS as u8)
        .with_skew(SKEW)
        .with_step_duration(STEP_SECONDS)
        .with_secret(secret.to_vec())
        .with_account_name(label.replace(':', "_"))
        .with_issuer(Some(ISSUER))
        .build()
        .expect("a 160-bit secret and RFC 6238's parameters are valid")
}

/// The `otpauth://` URI an authenticator app reads (its QR code), naming
/// the account `label`.
pub fn uri(secret: &[u8], label: &str) -> String {
    totp(secret, label)
        .to_url()
        .expect("a valid TOTP has a URL")
}

/// The secret as an authenticator app takes it typed in: base32.
pub fn secret_text(secret: &[u8]) -> String {
    totp(secret, "-").secret().to_base32()
}

/// The time step `code` is valid for at `now` (seconds since the epoch),
/// within one step of skew; None when it is not; an error when it is not
/// a code at all.
pub fn check(secret: &[u8], code: &str, now: u64) -> Result<Option<u64>, CodeError> {
    if code.len() != DIGITS || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CodeError::Format);
    }
    Ok(totp(secret, "-").check(code, now))
}

/// The code for `now`, as an authenticator computes it (tests, and the
/// reference client's helper).
pub fn code_at(secret: &[u8], now: u64) -> String {
    totp(secret, "-").generate(now).to_string()
}

/// The same from the base32 secret an enrolment answers; None when it is
/// not base32.
pub fn code_for(secret_base32: &str, now: u64) -> Option<String> {
    let secret = totp_rs::Secret::try_from_base32(secret_base32).ok()?;
    Some(code_at(secret.as_ref(), now))
}

/// New recovery codes, as the user is shown them once, and their hashes
/// as stored.
pub fn recovery_codes() -> Result<Vec<(String, [u8; 32])>, CodeError> {
    (0..RECOVERY_CODES)
        .map(|_| {
            let text = hex::encode(random::<RECOVERY_BYTES>()?.as_ref());
            let grouped = text
                .as_bytes()
                .chunks(5)
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect::<Vec<_>>()
                .join("-");
            let hash = recovery_hash(&grouped);
            Ok((grouped, hash))
        })
        .collect()
}

/// What a recovery code is stored as: SHA-256 of its letters, without the
/// dashes and case-insensitive (80 random bits need no slow hash).
pub fn recovery_hash(code: &str) -> [u8; 32] {
    let letters: String = code
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    Sha256::digest(letters.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 Appendix B, SHA-1, with the crate keepd uses: the 8-digit
    /// values of the RFC, and their last six digits as keepd checks them.
    #[test]
    fn rfc_6238_test_vectors() {
        let secret = b"12345678901234567890";
        let eight = Builder::new()
            .with_algorithm(Algorithm::SHA1)
            .with_digits(8)
            .with_step_duration(30)
            .with_secret(secret.to_vec())
            .build_noncompliant();
        for (time, expected) in [
            (59, "94287082"),
            (1_111_111_109, "07081804"),
            (1_111_111_111, "14050471"),
            (1_234_567_890, "89005924"),
            (2_000_000_000, "69279037"),
            (20_000_000_000, "65353130"),
        ] {
            assert_eq!(eight.generate(time).to_string(), expected, "T = {time}");
            assert_eq!(code_at(secret, time), expected[2..], "T = {time}");
            assert_eq!(check(secret, &expected[2..], time), Ok(Some(time / 30)));
        }
    }

    #[test]
    fn codes_hold_one_step_either_way_and_nothing_else() {
        let secret = new_secret().unwrap();
        let now = 1_800_000_000;
        let code = code_at(&secret, now);
        assert_eq!(check(&secret, &code, now + 30), Ok(Some(now / 30)));
        assert_eq!(check(&secret, &code, now - 30), Ok(Some(now / 30)));
        assert_eq!(check(&secret, &code, now + 90), Ok(None));
        assert_eq!(check(&secret, "12345", now), Err(CodeError::Format));
        assert_eq!(check(&secret, "12345a", now), Err(CodeError::Format));
        assert!(uri(&secret, "ann@example.org").starts_with("otpauth://totp/keepd:ann"));
    }

    #[test]
    fn recovery_codes_are_random_and_hashed_forgivingly() {
        let codes = recovery_codes().unwrap();
        assert_eq!(codes.len(), RECOVERY_CODES);
        let (text, hash) = &codes[0];
        assert_eq!(text.len(), 20 + 3, "{text}");
        assert_eq!(recovery_hash(&text.to_uppercase().replace('-', "")), *hash);
        assert_ne!(codes[0].1, codes[1].1);
    }
}
