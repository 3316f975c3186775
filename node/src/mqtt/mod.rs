//! MQTT protocol logic: the codec over `mqttbytes` and the per-connection session state machine.
pub mod codec;
