//! Subscription index: routing one PUBLISH topic through 100 000 subscriptions, and the cost of
//! adding a subscription to an index of that size.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mqttbytes::QoS;
use rampart_node::broker::index::{Subscriber, SubscriptionIndex, SubscriptionOptions};
use rampart_node::broker::mailbox::Mailbox;

const SUBSCRIPTIONS: u64 = 100_000;

fn subscriber(session: u64) -> Subscriber {
    Subscriber {
        session,
        mailbox: Arc::new(Mailbox::new(10)),
        options: SubscriptionOptions { qos: QoS::AtLeastOnce, no_local: false, retain_as_published: false, subscription_id: None },
    }
}

/// 100k subscriptions shaped like a fleet: per-device exact filters, per-site `+` filters and a
/// few `#` monitors.
fn fleet_index() -> SubscriptionIndex {
    let index = SubscriptionIndex::new();
    for i in 0..SUBSCRIPTIONS {
        let site = i % 100;
        let device = i / 100;
        let filter = match i % 10 {
            0 => format!("site/{site}/+/telemetry"),
            1 => format!("site/{site}/device/{device}/#"),
            _ => format!("site/{site}/device/{device}/telemetry"),
        };
        index.subscribe(&filter, None, subscriber(i));
    }
    index.subscribe("#", None, subscriber(SUBSCRIPTIONS));
    index
}

fn route(c: &mut Criterion) {
    let index = fleet_index();
    let mut group = c.benchmark_group("route_100k_subscriptions");
    group.throughput(Throughput::Elements(1));
    for topic in ["site/42/device/420/telemetry", "site/42/device/999999/telemetry", "other/topic/without/match"] {
        group.bench_with_input(BenchmarkId::from_parameter(topic), topic, |b, topic| {
            b.iter(|| {
                let mut n = 0usize;
                index.route(topic, None, true, |_| n += 1);
                n
            })
        });
    }
    group.finish();
}

fn subscribe(c: &mut Criterion) {
    let index = fleet_index();
    let mut next = SUBSCRIPTIONS + 1;
    c.bench_function("subscribe_into_100k_index", |b| {
        b.iter(|| {
            next += 1;
            index.subscribe(&format!("site/7/device/{next}/cmd"), None, subscriber(next))
        })
    });
}

criterion_group!(benches, route, subscribe);
criterion_main!(benches);
