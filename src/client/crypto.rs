//! What a real client does with keys, none of which keepd ever sees: a
//! key-encryption key derived from the password (Argon2id), a random vault
//! key stored only encrypted under it, AES-256-GCM for every log entry and
//! backup, and an Ed25519 device key that signs backups.

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, KeyInit};
use argon2::Argon2;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signer, SigningKey};
use zeroize::Zeroizing;

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const SALT_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("no randomness from the OS: {0}")]
    Entropy(String),
    #[error("key derivation failed: {0}")]
    Kdf(String),
    #[error("{0} is not valid base64")]
    Base64(&'static str),
    #[error("decryption failed: wrong key or tampered data")]
    Decrypt,
}

pub(super) fn random<const N: usize>() -> Result<[u8; N], CryptoError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|e| CryptoError::Entropy(e.to_string()))?;
    Ok(bytes)
}

fn decode(field: &'static str, value: &str) -> Result<Vec<u8>, CryptoError> {
    BASE64.decode(value).map_err(|_| CryptoError::Base64(field))
}

/// AES-256-GCM under a 32-byte key.
struct Cipher(Aes256Gcm);

impl Cipher {
    fn new(key: &[u8; 32]) -> Cipher {
        Cipher(Aes256Gcm::new_from_slice(key).expect("32-byte key"))
    }

    /// (nonce, ciphertext ‖ tag) under a fresh random nonce.
    fn seal(&self, plaintext: &[u8]) -> Result<([u8; NONCE_LEN], Vec<u8>), CryptoError> {
        let nonce = random::<NONCE_LEN>()?;
        let sealed = self
            .0
            .encrypt(&nonce.into(), plaintext)
            .expect("AES-256-GCM encrypts any length we hold");
        Ok((nonce, sealed))
    }

    fn open(&self, nonce: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| CryptoError::Decrypt)?;
        self.0
            .decrypt(&nonce.into(), sealed)
            .map_err(|_| CryptoError::Decrypt)
    }
}

/// The vault key as `POST /sync/vault-key` stores it: encrypted under a
/// key derived from the password, with the salt and nonce to undo that.
pub struct WrappedVaultKey {
    pub encrypted_vault_key: String,
    pub salt: String,
    pub nonce: String,
    /// The key's check value (`VaultKey::key_check`), sent with it.
    pub key_check: Option<String>,
}

/// What a vault key's check value is the HMAC of.
const KEY_CHECK_LABEL: &[u8] = b"keepd vault key check v1";

/// A vault's symmetric key, held only by clients.
pub struct VaultKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for VaultKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VaultKey(<secret>)")
    }
}

fn password_key(password: &str, salt: &[u8]) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
    let mut key = Zeroizing::new([0u8; 32]);
    Argon2::default()
        .hash_password_into(password.as_bytes(), salt, key.as_mut())
        .map_err(|e| CryptoError::Kdf(e.to_string()))?;
    Ok(key)
}

impl VaultKey {
    pub fn generate() -> Result<VaultKey, CryptoError> {
        Ok(VaultKey(Zeroizing::new(random::<32>()?)))
    }

    /// Encrypts this key under one derived from `password`.
    pub fn wrap(&self, password: &str) -> Result<WrappedVaultKey, CryptoError> {
        let salt = random::<SALT_LEN>()?;
        let kek = password_key(password, &salt)?;
        let (nonce, sealed) = Cipher::new(&kek).seal(self.0.as_ref())?;
        Ok(WrappedVaultKey {
            encrypted_vault_key: BASE64.encode(sealed),
            salt: BASE64.encode(salt),
            nonce: BASE64.encode(nonce),
            key_check: Some(self.key_check()),
        })
    }

    /// Base64 of HMAC-SHA256(key, `keepd vault key check v1`): the server
    /// compares it between the vault's record and a push, so a device with
    /// the wrong key cannot store what no other device could read; it
    /// reveals nothing of the key (HMAC is a PRF).
    pub fn key_check(&self) -> String {
        use hmac::{KeyInit, Mac};
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(self.0.as_ref())
            .expect("HMAC takes a key of any length");
        mac.update(KEY_CHECK_LABEL);
        BASE64.encode(mac.finalize().into_bytes())
    }

    /// The key back from its stored form, given the password.
    pub fn unwrap(wrapped: &WrappedVaultKey, password: &str) -> Result<VaultKey, CryptoError> {
        let kek = password_key(password, &decode("salt", &wrapped.salt)?)?;
        let plain = Zeroizing::new(Cipher::new(&kek).open(
            &decode("nonce", &wrapped.nonce)?,
            &decode("encryptedVaultKey", &wrapped.encrypted_vault_key)?,
        )?);
        let key: [u8; 32] = plain
            .as_slice()
            .try_into()
            .map_err(|_| CryptoError::Decrypt)?;
        Ok(VaultKey(Zeroizing::new(key)))
    }

    /// (encryptedData, nonce), base64, for one log entry.
    pub fn encrypt_entry(&self, plaintext: &[u8]) -> Result<(String, String), CryptoError> {
        let (nonce, sealed) = Cipher::new(&self.0).seal(plaintext)?;
        Ok((BASE64.encode(sealed), BASE64.encode(nonce)))
    }

    pub fn decrypt_entry(&self, encrypted_data: &str, nonce: &str) -> Result<Vec<u8>, CryptoError> {
        Cipher::new(&self.0).open(
            &decode("nonce", nonce)?,
            &decode("encryptedData", encrypted_data)?,
        )
    }

    /// A backup: ciphertext, nonce and tag apart, as `POST /backups` takes them.
    pub fn encrypt_backup(&self, plaintext: &[u8]) -> Result<EncryptedBackup, CryptoError> {
        let (nonce, mut sealed) = Cipher::new(&self.0).seal(plaintext)?;
        let tag = sealed.split_off(sealed.len() - TAG_LEN);
        Ok(EncryptedBackup {
            ciphertext: sealed,
            nonce: nonce.to_vec(),
            auth_tag: tag,
        })
    }

    pub fn decrypt_backup(&self, backup: &EncryptedBackup) -> Result<Vec<u8>, CryptoError> {
        let mut sealed = backup.ciphertext.clone();
        sealed.extend_from_slice(&backup.auth_tag);
        Cipher::new(&self.0).open(&backup.nonce, &sealed)
    }
}

pub struct EncryptedBackup {
    pub ciphertext: Vec<u8>,
    pub nonce: Vec<u8>,
    pub auth_tag: Vec<u8>,
}

/// A device's signing key; only its public half is registered.
pub struct DeviceKey(SigningKey);

impl DeviceKey {
    pub fn generate() -> Result<DeviceKey, CryptoError> {
        let seed = Zeroizing::new(random::<32>()?);
        Ok(DeviceKey(SigningKey::from_bytes(&seed)))
    }

    /// Base64 of the public key, for `POST /devices`.
    pub fn public_key(&self) -> String {
        BASE64.encode(self.0.verifying_key().as_bytes())
    }

    /// Base64 Ed25519 signature over `message` (see `crate::device_messages`).
    pub fn sign(&self, message: &[u8]) -> String {
        BASE64.encode(self.0.sign(message).to_bytes())
    }

    /// The proof for `POST /devices` that this key joins `account`.
    pub fn registration_proof(&self, account: uuid::Uuid) -> String {
        let public = self.0.verifying_key().to_bytes();
        self.sign(&crate::device_messages::registration(account, &public))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vault_key_wraps_and_entries_round_trip() {
        let key = VaultKey::generate().unwrap();
        let wrapped = key.wrap("pass phrase").unwrap();
        let back = VaultKey::unwrap(&wrapped, "pass phrase").unwrap();
        assert!(VaultKey::unwrap(&wrapped, "wrong").is_err());
        let (data, nonce) = key.encrypt_entry(b"entry").unwrap();
        assert_eq!(back.decrypt_entry(&data, &nonce).unwrap(), b"entry");
        let backup = key.encrypt_backup(b"backup bytes").unwrap();
        assert_eq!(backup.auth_tag.len(), TAG_LEN);
        assert_eq!(back.decrypt_backup(&backup).unwrap(), b"backup bytes");
        let mut tampered = backup;
        tampered.ciphertext[0] ^= 1;
        assert!(back.decrypt_backup(&tampered).is_err());
    }
}
