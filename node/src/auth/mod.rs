//! Authentication: who a client is (certificate identity, password, token — the provider
//! chain) and the CONNECT policy built on it. Reads only in-memory state; never blocks on disk
//! or network.

pub mod acl;
pub mod authenticator;
pub mod chain;
pub mod credentials;
pub mod http;
pub mod identity;
pub mod index;
pub mod jwt;
pub mod password;
pub mod password_gate;
pub mod policy;
pub mod sasl;
pub mod scram;
pub mod serial;
pub mod state;
pub mod store;

use mqttbytes::v5::ConnectReturnCode;

/// Why a CONNECT is refused; `code` goes into the CONNACK (mapped to a 3.1.1 return code by the codec).
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub code: ConnectReturnCode,
    pub reason: String,
}
