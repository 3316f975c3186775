//! Rampart broker library: everything the `rampart` binary runs, organised by concern.
pub mod mqtt;
