//! The client's side of OPAQUE (`crate::opaque` is the server's): the
//! password stays here; keepd sees blinded and masked values only.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use opaque_ke::{
    ClientLogin, ClientLoginFinishParameters, ClientRegistration,
    ClientRegistrationFinishParameters, CredentialResponse, Identifiers, RegistrationResponse,
};
use rand_core_06::OsRng;
use zeroize::Zeroizing;

use super::ClientError;
use crate::opaque::{CONTEXT, Suite, ksf};

fn decode(field: &str, value: &serde_json::Value) -> Result<Vec<u8>, ClientError> {
    value
        .as_str()
        .and_then(|v| BASE64.decode(v).ok())
        .ok_or_else(|| ClientError::Decode(format!("`{field}` is not base64")))
}

/// A registration between its two messages.
pub struct Registration(ClientRegistration<Suite>);

impl Registration {
    /// The state and the request to send (base64).
    pub fn start(password: &str) -> Result<(Registration, String), ClientError> {
        let start = ClientRegistration::<Suite>::start(&mut OsRng, password.as_bytes())
            .map_err(|e| ClientError::Decode(format!("OPAQUE registration: {e}")))?;
        Ok((
            Registration(start.state),
            BASE64.encode(start.message.serialize()),
        ))
    }

    /// The record to upload (base64), from the server's response.
    pub fn finish(
        self,
        password: &str,
        response: &serde_json::Value,
    ) -> Result<String, ClientError> {
        let response =
            RegistrationResponse::deserialize(&decode("registrationResponse", response)?)
                .map_err(|_| ClientError::Decode("`registrationResponse` is not OPAQUE".into()))?;
        let ksf = ksf();
        let finish = self
            .0
            .finish(
                &mut OsRng,
                password.as_bytes(),
                response,
                ClientRegistrationFinishParameters::new(Identifiers::default(), Some(&ksf)),
            )
            .map_err(|e| ClientError::Decode(format!("OPAQUE registration: {e}")))?;
        Ok(BASE64.encode(finish.message.serialize()))
    }
}

/// A login between its two messages.
pub struct Login(ClientLogin<Suite>);

/// What a finished login leaves the client.
pub struct Finished {
    /// The KE3 to send (base64).
    pub finalization: String,
    /// OPAQUE's export key: known to the client only, stable across logins
    /// with the same password; what a client may derive its vault-key
    /// wrapping key from (docs/api.md).
    pub export_key: Zeroizing<Vec<u8>>,
}

impl Login {
    pub fn start(password: &str) -> Result<(Login, String), ClientError> {
        let start = ClientLogin::<Suite>::start(&mut OsRng, password.as_bytes())
            .map_err(|e| ClientError::Decode(format!("OPAQUE login: {e}")))?;
        Ok((Login(start.state), BASE64.encode(start.message.serialize())))
    }

    /// The final message; None when the password is wrong (or no account
    /// has the email: the client cannot tell, and nor can anyone else).
    pub fn finish(
        self,
        password: &str,
        response: &serde_json::Value,
    ) -> Result<Option<Finished>, ClientError> {
        let response = CredentialResponse::deserialize(&decode("credentialResponse", response)?)
            .map_err(|_| ClientError::Decode("`credentialResponse` is not OPAQUE".into()))?;
        let ksf = ksf();
        let finished = self.0.finish(
            &mut OsRng,
            password.as_bytes(),
            response,
            ClientLoginFinishParameters::new(Some(CONTEXT), Identifiers::default(), Some(&ksf)),
        );
        Ok(finished.ok().map(|f| Finished {
            finalization: BASE64.encode(f.message.serialize()),
            export_key: Zeroizing::new(f.export_key.to_vec()),
        }))
    }
}
