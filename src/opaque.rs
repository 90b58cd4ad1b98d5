//! OPAQUE (RFC 9807), keepd's side of it: the password never leaves the
//! client. Pure: bytes in, bytes out; the routes (`api::opaque`) store
//! records and login states.
//!
//! Ciphersuite: OPRF ristretto255-SHA512, 3DH over ristretto255 with
//! SHA-512, Argon2id as the client's key-stretching function (`ksf`), the
//! context `CONTEXT`, no identities beyond the default (the public keys).
//!
//! The server setup (OPRF seed, the server's key pair, the fake record's
//! public key) is derived from the cluster key, never stored: every node of
//! a cluster computes the same one, so any node answers any step of any
//! account's exchange. Each part is derived as bytes and then read by
//! opaque-ke's own deserialisation, so the setup does not depend on how a
//! version of the crate consumes a random number generator.

use curve25519_dalek::constants::RISTRETTO_BASEPOINT_POINT;
use curve25519_dalek::scalar::Scalar;
use opaque_ke::argon2::{Algorithm, Argon2, Params, Version};
use opaque_ke::{
    CipherSuite, CredentialFinalization, CredentialRequest, RegistrationRequest,
    RegistrationUpload, Ristretto255, ServerLogin, ServerLoginParameters, ServerRegistration,
    ServerSetup, TripleDh,
};
use rand_core_06::OsRng;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::cluster::{ClusterKey, Purpose};

/// keepd's ciphersuite.
pub struct Suite;

impl CipherSuite for Suite {
    type OprfCs = Ristretto255;
    type KeyExchange = TripleDh<Ristretto255, sha2_010::Sha512>;
    type Ksf = Argon2<'static>;
}

/// Bound into every login's transcript (RFC 9807's context): a keepd
/// login cannot be replayed into another application's OPAQUE.
pub const CONTEXT: &[u8] = b"keepd OPAQUE v1";

/// The client's Argon2id: version 0x13, 19 MiB, 2 passes, 1 lane (OWASP's
/// minimum, what keepd's own password hashing uses); the output is as
/// long as its input (64 bytes), as RFC 9807 §4.3.1 has it.
pub const KSF_MEMORY_KIB: u32 = 19_456;
pub const KSF_PASSES: u32 = 2;
pub const KSF_LANES: u32 = 1;

/// The key-stretching function every client must use.
pub fn ksf() -> Argon2<'static> {
    let params = Params::new(KSF_MEMORY_KIB, KSF_PASSES, KSF_LANES, None)
        .expect("constant, valid Argon2 parameters");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpaqueError {
    #[error("`{0}` is not a valid OPAQUE message of its kind")]
    Malformed(&'static str),
    /// The client's final message does not prove the password.
    #[error("the login did not verify")]
    NotVerified,
    #[error("a stored OPAQUE record or login state is damaged")]
    Damaged,
}

/// The server's half of OPAQUE for one cluster.
pub struct OpaqueServer {
    setup: ServerSetup<Suite>,
}

impl std::fmt::Debug for OpaqueServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OpaqueServer(..)")
    }
}

/// 64 bytes for `label` from the OPAQUE root.
fn expand(root: &[u8; 32], label: &[u8]) -> Zeroizing<[u8; 64]> {
    let mut out = Zeroizing::new([0u8; 64]);
    hkdf::Hkdf::<Sha256>::new(Some(b"keepd opaque"), root)
        .expand(label, out.as_mut())
        .expect("64 bytes is a valid HKDF-SHA256 output length");
    out
}

/// A non-zero scalar from 64 uniform bytes (reduced, as RFC 9496's
/// hash-to-scalar does; zero has probability 2^-252 and is refused).
fn scalar(wide: &[u8; 64]) -> Scalar {
    let s = Scalar::from_bytes_mod_order_wide(wide);
    assert_ne!(s, Scalar::ZERO, "a derived scalar of zero");
    s
}

impl OpaqueServer {
    /// The cluster's setup, from its key.
    pub fn new(cluster: &ClusterKey) -> OpaqueServer {
        let root = cluster.derive(Purpose::Opaque);
        let seed = expand(&root, b"oprf seed");
        let server_sk = scalar(&expand(&root, b"server private key"));
        let dummy_pk = (RISTRETTO_BASEPOINT_POINT * scalar(&expand(&root, b"fake record key")))
            .compress()
            .to_bytes();
        // ServerSetup's serialised form: seed ‖ private key ‖ fake record's key.
        let mut bytes = Zeroizing::new(Vec::with_capacity(128));
        bytes.extend_from_slice(seed.as_ref());
        bytes.extend_from_slice(server_sk.as_bytes());
        bytes.extend_from_slice(&dummy_pk);
        let setup = ServerSetup::<Suite>::deserialize(&bytes)
            .expect("derived setup bytes are a valid ristretto255 setup");
        OpaqueServer { setup }
    }

    /// The server's registration response to `request` for the account
    /// `credential` (stateless: the same request gives the same answer).
    pub fn registration_response(
        &self,
        request: &[u8],
        credential: &[u8],
    ) -> Result<Vec<u8>, OpaqueError> {
        let request = RegistrationRequest::<Suite>::deserialize(request)
            .map_err(|_| OpaqueError::Malformed("registrationRequest"))?;
        let answer = ServerRegistration::<Suite>::start(&self.setup, request, credential)
            .map_err(|_| OpaqueError::Malformed("registrationRequest"))?;
        Ok(answer.message.serialize().to_vec())
    }

    /// The record to store from the client's registration upload.
    pub fn record(upload: &[u8]) -> Result<Vec<u8>, OpaqueError> {
        let upload = RegistrationUpload::<Suite>::deserialize(upload)
            .map_err(|_| OpaqueError::Malformed("registrationRecord"))?;
        Ok(ServerRegistration::finish(upload).serialize().to_vec())
    }

    /// Answers a login's first message; `record` is None for an account
    /// that does not exist or has no OPAQUE record, and then a fake record
    /// answers, indistinguishable from a real one. The state to keep until
    /// the finish, and the answer.
    pub fn login_start(
        &self,
        record: Option<&[u8]>,
        request: &[u8],
        credential: &[u8],
    ) -> Result<(Zeroizing<Vec<u8>>, Vec<u8>), OpaqueError> {
        let record = record
            .map(ServerRegistration::<Suite>::deserialize)
            .transpose()
            .map_err(|_| OpaqueError::Damaged)?;
        let request = CredentialRequest::<Suite>::deserialize(request)
            .map_err(|_| OpaqueError::Malformed("credentialRequest"))?;
        let started = ServerLogin::start(
            &mut OsRng,
            &self.setup,
            record,
            request,
            credential,
            parameters(),
        )
        .map_err(|_| OpaqueError::Malformed("credentialRequest"))?;
        Ok((
            Zeroizing::new(started.state.serialize().to_vec()),
            started.message.serialize().to_vec(),
        ))
    }

    /// Checks a login's final message against the state its start kept.
    pub fn login_finish(state: &[u8], finalization: &[u8]) -> Result<(), OpaqueError> {
        let state = ServerLogin::<Suite>::deserialize(state).map_err(|_| OpaqueError::Damaged)?;
        let finalization = CredentialFinalization::<Suite>::deserialize(finalization)
            .map_err(|_| OpaqueError::Malformed("credentialFinalization"))?;
        state
            .finish(finalization, parameters())
            .map(|_| ())
            .map_err(|_| OpaqueError::NotVerified)
    }
}

fn parameters() -> ServerLoginParameters<'static, 'static> {
    ServerLoginParameters {
        context: Some(CONTEXT),
        ..ServerLoginParameters::default()
    }
}

#[cfg(test)]
mod tests {
    use opaque_ke::{
        ClientLogin, ClientLoginFinishParameters, ClientRegistration,
        ClientRegistrationFinishParameters, CredentialResponse, Identifiers, RegistrationResponse,
    };

    use super::*;

    fn register(server: &OpaqueServer, password: &[u8], credential: &[u8]) -> Vec<u8> {
        let start = ClientRegistration::<Suite>::start(&mut OsRng, password).unwrap();
        let response = server
            .registration_response(&start.message.serialize(), credential)
            .unwrap();
        let ksf = ksf();
        let finish = start
            .state
            .finish(
                &mut OsRng,
                password,
                RegistrationResponse::deserialize(&response).unwrap(),
                ClientRegistrationFinishParameters::new(Identifiers::default(), Some(&ksf)),
            )
            .unwrap();
        OpaqueServer::record(&finish.message.serialize()).unwrap()
    }

    /// A login with `password`: whether the client could finish, and
    /// whether the server verified it.
    fn login(
        server: &OpaqueServer,
        record: Option<&[u8]>,
        password: &[u8],
        credential: &[u8],
    ) -> (bool, bool) {
        let start = ClientLogin::<Suite>::start(&mut OsRng, password).unwrap();
        let (state, response) = server
            .login_start(record, &start.message.serialize(), credential)
            .unwrap();
        let ksf = ksf();
        let Ok(finish) = start.state.finish(
            &mut OsRng,
            password,
            CredentialResponse::deserialize(&response).unwrap(),
            ClientLoginFinishParameters::new(Some(CONTEXT), Identifiers::default(), Some(&ksf)),
        ) else {
            return (false, false);
        };
        let verified = OpaqueServer::login_finish(&state, &finish.message.serialize()).is_ok();
        (true, verified)
    }

    #[test]
    fn every_node_of_a_cluster_serves_every_step() {
        let key = ClusterKey::generate().unwrap();
        let (a, b) = (OpaqueServer::new(&key), OpaqueServer::new(&key));
        let record = register(&a, b"correct horse", b"account");
        assert_eq!(
            login(&b, Some(&record), b"correct horse", b"account"),
            (true, true)
        );
        assert_eq!(
            login(&b, Some(&record), b"wrong horse", b"account"),
            (false, false)
        );
        // Another cluster's setup does not know the record.
        let other = OpaqueServer::new(&ClusterKey::generate().unwrap());
        assert_eq!(
            login(&other, Some(&record), b"correct horse", b"account"),
            (false, false)
        );
        // No record: the fake one answers, and nothing verifies.
        assert_eq!(
            login(&a, None, b"correct horse", b"account"),
            (false, false)
        );
    }

    #[test]
    fn garbage_is_refused_by_name() {
        let server = OpaqueServer::new(&ClusterKey::generate().unwrap());
        assert_eq!(
            server.registration_response(b"short", b"c"),
            Err(OpaqueError::Malformed("registrationRequest"))
        );
        assert_eq!(
            OpaqueServer::record(&[0u8; 10]),
            Err(OpaqueError::Malformed("registrationRecord"))
        );
        assert_eq!(
            server.login_start(None, &[1u8; 96], b"c").err(),
            Some(OpaqueError::Malformed("credentialRequest"))
        );
        let start = ClientLogin::<Suite>::start(&mut OsRng, b"pw").unwrap();
        let (state, _) = server
            .login_start(None, &start.message.serialize(), b"c")
            .unwrap();
        assert_eq!(
            OpaqueServer::login_finish(&state, &[0u8; 3]),
            Err(OpaqueError::Malformed("credentialFinalization"))
        );
        assert_eq!(
            OpaqueServer::login_finish(&state, &[7u8; 64]),
            Err(OpaqueError::NotVerified)
        );
        assert_eq!(
            OpaqueServer::login_finish(b"not a state", &[7u8; 64]),
            Err(OpaqueError::Damaged)
        );
    }
}
