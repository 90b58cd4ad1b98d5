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

#[cfg(test)]
mod tests {
    use super::*;

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
