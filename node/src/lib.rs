//! Rampart broker library: everything the `rampart` binary runs, organised by concern.
pub mod admin;
pub mod auth;
pub mod broker;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod dev_cluster;
pub mod forward;
pub mod listener;
pub mod mqtt;
pub mod pki;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod topic;
