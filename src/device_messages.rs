//! What a device signs, byte for byte: the proof that it holds its key
//! when it is registered, and the v2 signature of a backup. Each message
//! starts with its own domain tag (so a signature made for one can never
//! pass for the other, or for anything else the key signs) and frames
//! every variable-length field with its length. Server and reference
//! client both build them here; docs/api.md describes them for other
//! clients and the tests below pin the bytes.

use sha2::{Digest, Sha256};
use uuid::Uuid;

const REGISTRATION_TAG: &[u8] = b"keepd device registration v1\0";
const BACKUP_V2_TAG: &[u8] = b"keepd backup signature v2\0";

/// Signed by a device's key to register it: the account it joins and the
/// key itself.
pub fn registration(account: Uuid, public_key: &[u8; 32]) -> Vec<u8> {
    let mut message = REGISTRATION_TAG.to_vec();
    message.extend_from_slice(account.as_bytes());
    message.extend_from_slice(public_key);
    message
}

/// Signed by a device over a backup (signature version 2): the device,
/// the classification, the nonce, the AEAD tag and the SHA-256 of the
/// ciphertext.
pub fn backup_v2(
    device: Uuid,
    classification: &str,
    nonce: &[u8],
    auth_tag: &[u8],
    ciphertext: &[u8],
) -> Vec<u8> {
    let mut message = BACKUP_V2_TAG.to_vec();
    message.extend_from_slice(device.as_bytes());
    for field in [classification.as_bytes(), nonce, auth_tag] {
        message.extend_from_slice(&(field.len() as u32).to_be_bytes());
        message.extend_from_slice(field);
    }
    message.extend_from_slice(&Sha256::digest(ciphertext));
    message
}

/// A backup as its device signed it.
pub struct SignedBackup<'a> {
    pub device: Uuid,
    pub classification: &'a str,
    pub nonce: &'a [u8],
    pub auth_tag: &'a [u8],
    pub ciphertext: &'a [u8],
}

/// Why a backup's signature was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error("the device's stored key is not an Ed25519 public key")]
    StoredKey,
    #[error("the signature does not verify with the device's key")]
    Mismatch,
}

/// Checks `signature` (version 1: over the ciphertext alone, legacy;
/// version 2: over `backup_v2`) with the device's `public_key`.
pub fn verify_backup(
    public_key: &[u8],
    version: i16,
    backup: &SignedBackup<'_>,
    signature: &ed25519_dalek::Signature,
) -> Result<(), SignatureError> {
    let key = <[u8; 32]>::try_from(public_key)
        .ok()
        .and_then(|bytes| ed25519_dalek::VerifyingKey::from_bytes(&bytes).ok())
        .ok_or(SignatureError::StoredKey)?;
    let message = match version {
        2 => backup_v2(
            backup.device,
            backup.classification,
            backup.nonce,
            backup.auth_tag,
            backup.ciphertext,
        ),
        _ => backup.ciphertext.to_vec(),
    };
    key.verify_strict(&message, signature)
        .map_err(|_| SignatureError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_signatures_verify_by_version_only_over_their_message() {
        use ed25519_dalek::{Signer, SigningKey};
        let device = SigningKey::from_bytes(&[9; 32]);
        let public = device.verifying_key().to_bytes();
        let backup = SignedBackup {
            device: Uuid::from_u128(7),
            classification: "Internal",
            nonce: &[1, 2],
            auth_tag: &[3],
            ciphertext: b"abc",
        };
        let v2 = device.sign(&backup_v2(backup.device, "Internal", &[1, 2], &[3], b"abc"));
        let v1 = device.sign(b"abc");
        assert!(verify_backup(&public, 2, &backup, &v2).is_ok());
        assert!(verify_backup(&public, 1, &backup, &v1).is_ok());
        assert!(matches!(
            verify_backup(&public, 2, &backup, &v1),
            Err(SignatureError::Mismatch)
        ));
        let other = SignedBackup {
            classification: "Public",
            ..backup
        };
        assert!(
            verify_backup(&public, 2, &other, &v2).is_err(),
            "v2 covers the classification"
        );
        assert!(matches!(
            verify_backup(&[0; 31], 2, &backup, &v2),
            Err(SignatureError::StoredKey)
        ));
    }

    #[test]
    fn messages_are_pinned_byte_for_byte() {
        let account = Uuid::from_u128(0x0011_2233_4455_6677_8899_aabb_ccdd_eeff);
        let registration = registration(account, &[7; 32]);
        assert_eq!(
            hex::encode(&registration),
            format!(
                "{}00112233445566778899aabbccddeeff{}",
                hex::encode("keepd device registration v1\0"),
                "07".repeat(32)
            )
        );
        let backup = backup_v2(account, "Internal", &[1, 2], &[3], b"abc");
        assert_eq!(
            hex::encode(&backup),
            format!(
                "{}00112233445566778899aabbccddeeff{}{}{}{}",
                hex::encode("keepd backup signature v2\0"),
                format_args!("00000008{}", hex::encode("Internal")),
                "000000020102",
                "0000000103",
                // SHA-256("abc")
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
            )
        );
    }
}
