//! MQTT protocol logic: the codec over `mqttbytes`, CONNECT validation with its AUTH exchange and the per-connection
//! session state machine. No IO here.
pub mod auth_exchange;
pub mod codec;
pub mod connect;
pub mod session;
