//! The MQTT codec: decoding and encoding a 64-byte-payload PUBLISH in MQTT 3.1.1 and 5.0.

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mqttbytes::v5;
use mqttbytes::QoS;
use rampart_node::mqtt::codec::{self, Packet, ProtocolVersion};

fn publish() -> Packet {
    let mut p = v5::Publish::from_bytes("site/42/device/420/telemetry", QoS::AtLeastOnce, Bytes::from(vec![7u8; 64]));
    p.pkid = 17;
    Packet::Publish(p)
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec_publish_64b");
    group.throughput(Throughput::Elements(1));
    for (name, version) in [("v311", ProtocolVersion::V311), ("v5", ProtocolVersion::V5)] {
        let packet = publish();
        let mut encoded = BytesMut::new();
        codec::encode(version, &packet, &mut encoded, None).expect("encode");
        let encoded = encoded.freeze();
        group.bench_function(format!("encode_{name}"), |b| {
            let mut out = BytesMut::with_capacity(256);
            b.iter(|| {
                out.clear();
                codec::encode(version, &packet, &mut out, None).expect("encode")
            })
        });
        group.bench_function(format!("decode_{name}"), |b| {
            b.iter(|| {
                let mut input = BytesMut::from(&encoded[..]);
                codec::decode(version, &mut input, usize::MAX).expect("decode").expect("complete")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
