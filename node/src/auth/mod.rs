//! Authentication: who a client is (certificate identity) and the CONNECT policy built on it.
//! Reads only in-memory state; never blocks on disk or network.

pub mod acl;
pub mod identity;
pub mod index;
pub mod password;
pub mod password_gate;
pub mod policy;
pub mod state;
pub mod store;
