//! Fuzzes the MQTT decoder: arbitrary bytes as the first packet of a connection and as the
//! packets after it, in both protocol versions. Every packet that decodes and re-encodes must
//! decode again: the encoder never writes what the decoder rejects.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rampart_node::mqtt::codec::{self, ProtocolVersion};

const MAX_PACKET: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let _ = codec::decode_connect(&mut BytesMut::from(data), MAX_PACKET);
    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let mut input = BytesMut::from(data);
        while let Ok(Some(packet)) = codec::decode(version, &mut input, MAX_PACKET) {
            let mut encoded = BytesMut::new();
            if codec::encode(version, &packet, &mut encoded, None).is_err() {
                continue;
            }
            let again = codec::decode(version, &mut encoded, usize::MAX);
            assert!(matches!(again, Ok(Some(_))), "re-encoded {packet:?} does not decode: {again:?}");
        }
    }
});
