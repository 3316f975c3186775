//! Shared pieces of the load generator: latency statistics, payload timestamps and TLS client
//! setup, kept free of IO where possible so they can be unit-tested.

pub mod stats;
pub mod transport;
