//! Secret values in memory: zeroized on drop, invisible to Debug and Display.

use std::fmt;
use std::sync::{Arc, RwLock};

use zeroize::Zeroizing;

/// A password or other secret text. There is no Display, and Debug prints a
/// placeholder, so a secret cannot reach a log line by formatting.
#[derive(Clone)]
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    pub fn new(value: String) -> Self {
        SecretString(Zeroizing::new(value))
    }

    /// The secret itself, for the few places that must hand it on.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString([redacted])")
    }
}

impl serde::Serialize for SecretString {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.expose())
    }
}

impl<'de> serde::Deserialize<'de> for SecretString {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(SecretString::new)
    }
}

/// The superuser's password, shared by every endpoint and program that
/// logs in with it, so a rotation reaches them all at once. During a
/// rotation interrupted between sealing the new password and Postgres
/// taking it, both are held: the one Postgres accepts wins.
#[derive(Clone)]
pub struct SharedPassword(Arc<RwLock<Passwords>>);

struct Passwords {
    current: SecretString,
    next: Option<SecretString>,
}

impl SharedPassword {
    pub fn new(current: SecretString, next: Option<SecretString>) -> SharedPassword {
        SharedPassword(Arc::new(RwLock::new(Passwords { current, next })))
    }

    pub fn current(&self) -> SecretString {
        self.0.read().expect("not poisoned").current.clone()
    }

    /// The password to try when `current` is refused.
    pub fn next(&self) -> Option<SecretString> {
        self.0.read().expect("not poisoned").next.clone()
    }

    /// `next` is being given to Postgres: tried when `current` is refused.
    pub fn stage(&self, next: SecretString) {
        self.0.write().expect("not poisoned").next = Some(next);
    }

    /// From now on, `password` alone.
    pub fn set(&self, password: SecretString) {
        let mut held = self.0.write().expect("not poisoned");
        held.current = password;
        held.next = None;
    }

    /// `next` was accepted: it becomes the current one.
    pub fn promote(&self) {
        let mut held = self.0.write().expect("not poisoned");
        if let Some(next) = held.next.take() {
            held.current = next;
        }
    }
}

impl fmt::Debug for SharedPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedPassword([redacted])")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the operating system's random number generator failed: {0}")]
pub struct EntropyError(String);

/// A password of `length` lowercase hex characters from the OS CSPRNG
/// (4 bits of entropy per character).
pub fn generate_password(length: usize) -> Result<SecretString, EntropyError> {
    let mut bytes = Zeroizing::new(vec![0u8; length.div_ceil(2)]);
    getrandom::fill(&mut bytes).map_err(|e| EntropyError(e.to_string()))?;
    let mut text = Zeroizing::new(hex::encode(&*bytes));
    text.truncate(length);
    Ok(SecretString::new(std::mem::take(&mut *text)))
}

/// A SCRAM-SHA-256 verifier: what Postgres stores instead of a password.
/// Computed here so the plaintext never reaches the server.
pub struct ScramVerifier(Zeroizing<String>);

impl ScramVerifier {
    pub fn of(password: &SecretString) -> ScramVerifier {
        ScramVerifier(Zeroizing::new(postgres_protocol::password::scram_sha_256(
            password.expose().as_bytes(),
        )))
    }

    /// The verifier as a SQL string literal; it holds only base64, digits
    /// and `$:=+/`, so it needs no escaping.
    pub fn sql_literal(&self) -> Zeroizing<String> {
        Zeroizing::new(format!("'{}'", self.0.as_str()))
    }
}

impl fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ScramVerifier([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_have_the_asked_length_and_alphabet() {
        for len in [32, 33, 64, 100] {
            let p = generate_password(len).unwrap();
            assert_eq!(p.expose().len(), len);
            assert!(
                p.expose()
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
            );
        }
        let a = generate_password(64).unwrap();
        let b = generate_password(64).unwrap();
        assert_ne!(a.expose(), b.expose());
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let p = generate_password(64).unwrap();
        assert!(!format!("{p:?}").contains(p.expose()));
        let v = ScramVerifier::of(&p);
        assert!(!format!("{v:?}").contains("SCRAM-SHA-256$"));
    }

    #[test]
    fn verifier_has_the_postgres_format() {
        let v = ScramVerifier::of(&SecretString::new("pw".into()));
        let lit = v.sql_literal();
        assert!(lit.starts_with("'SCRAM-SHA-256$4096:"), "{}", lit.as_str());
        assert!(!lit[1..lit.len() - 1].contains('\''));
        assert!(!lit.contains("pw$"));
    }
}
