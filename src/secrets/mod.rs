//! Credentials sealed to the node identity: the only module that reads or
//! writes `db.enc`. `values` holds the secret values themselves (zeroized,
//! never printed), `seal` the pure cryptography, `store` the file, and
//! `rotation` the pure state machine of a credential rotation.

pub mod rotation;
pub mod seal;
pub mod store;
pub mod values;
