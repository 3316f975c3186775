//! MQTT protocol logic: the codec over `mqttbytes`, CONNECT validation and the per-connection
//! session state machine. No IO here.
pub mod codec;
pub mod connect;
pub mod session;
