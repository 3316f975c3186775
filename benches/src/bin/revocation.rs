//! Fleet-wide revocation and bulk import on a real three-node cluster (release processes on
//! loopback, see `rampart-cluster-tests`):
//!
//! - revocation propagation: a device holds live mTLS sessions on nodes 2 and 3; its certificate
//!   is revoked through node 1's admin API; the time from the RPC's return (and from its start)
//!   to each DISCONNECT is recorded, over `--revocations` devices — once on an empty state and
//!   once with the imported credentials loaded;
//! - bulk import: `--import` x509 credentials streamed through `ImportCredentials`, then the time
//!   until every node has applied them, each node's resident memory before and after, and the
//!   latency of an admin read (`GetDefaults` on node 2, every 20 ms) while it runs;
//! - mass revocation: `--mass` live mTLS sessions of 100 devices spread over the three nodes,
//!   revoked by one identity-regex rule through node 1: the time from the RPC's start to each
//!   DISCONNECT, while a publisher on node 1 sends to a subscriber on node 2 (its latency during
//!   the revocation) and the admin API is asked for the revocation list (its latency).
//!
//! Run with `bash benches/revocation.sh` (builds the release binaries first).

use std::time::{Duration, Instant};

use clap::Parser;
use mqttbytes::v5;
use rampart_benches::stats::percentiles;
use rampart_cluster_tests::{mqtt_connect, Options, TestCluster};
use rampart_node::mqtt::codec::Packet;
use rampart_proto::admin::*;

#[derive(Parser)]
struct Args {
    /// Devices revoked (one revocation each) per round.
    #[arg(long, default_value_t = 100)]
    revocations: usize,
    /// Credentials imported.
    #[arg(long, default_value_t = 100_000)]
    import: usize,
    /// Live sessions revoked at once by one rule (0: no mass revocation round).
    #[arg(long, default_value_t = 10_000)]
    mass: usize,
}

/// Devices whose sessions the mass revocation ends (each holds `--mass / MASS_DEVICES`).
const MASS_DEVICES: usize = 100;

/// Opens `count` sessions of the devices `mass-000`… round robin over nodes 1-3, 32 handshakes
/// at a time, and revokes them all with one identity-regex rule through node 1; prints the
/// disconnect times and what a publisher and the admin API saw meanwhile.
async fn mass_round(cluster: &TestCluster, count: usize) -> anyhow::Result<()> {
    let devices: Vec<(std::path::PathBuf, std::path::PathBuf)> =
        (0..MASS_DEVICES).map(|i| cluster.issue_device(&format!("mass-{i:03}"))).collect::<anyhow::Result<_>>()?;
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    let opened = Instant::now();
    let mut connecting = Vec::with_capacity(count);
    for i in 0..count {
        let (cert, key) = devices[i % MASS_DEVICES].clone();
        let (port, ca) = (cluster.node(1 + (i % 3) as u64).ports.mtls, cluster.pki.ca_cert.clone());
        let slot = slots.clone().acquire_owned().await?;
        connecting.push(tokio::spawn(async move {
            let connected = mqtt_connect(port, &ca, &cert, &key, &format!("mass-{:03}-{i}", i % MASS_DEVICES)).await;
            drop(slot);
            connected
        }));
    }
    let mut clients = Vec::with_capacity(count);
    for c in connecting {
        let (code, client) = c.await??;
        anyhow::ensure!(code == 0, "a mass session was refused: {code:#x}");
        clients.push(client);
    }
    println!(
        "
Mass revocation: {count} sessions of {MASS_DEVICES} devices over nodes 1-3 (opened in {:.1} s)
",
        opened.elapsed().as_secs_f64()
    );
    let waiters: Vec<_> = clients.into_iter().map(|c| tokio::spawn(c.wait_disconnect(Duration::from_secs(60)))).collect();
    let (probe_cert, probe_key) = cluster.issue_device("probe-dev")?;
    let ca = &cluster.pki.ca_cert;
    let (_, mut subscriber) = mqtt_connect(cluster.node(2).ports.mtls, ca, &probe_cert, &probe_key, "probe-dev-sub").await?;
    subscriber.subscribe("devices/probe-dev/t").await?;
    let (_, mut publisher) = mqtt_connect(cluster.node(1).ports.mtls, ca, &probe_cert, &probe_key, "probe-dev-pub").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = Instant::now();
    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let publishing = {
        let running = running.clone();
        tokio::spawn(async move {
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                let sent = (base.elapsed().as_micros() as u64).to_string();
                publisher.send(&Packet::Publish(v5::Publish::new("devices/probe-dev/t", mqttbytes::QoS::AtMostOnce, sent))).await?;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            anyhow::Ok(())
        })
    };
    let receiving = {
        let running = running.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(Packet::Publish(p)) = subscriber.next_packet(Duration::from_millis(200)).await? {
                    let sent: u64 = std::str::from_utf8(&p.payload)?.parse()?;
                    latencies.push((base.elapsed().as_micros() as u64).saturating_sub(sent));
                }
            }
            anyhow::Ok(latencies)
        })
    };
    let asking = {
        let (running, mut admin) = (running.clone(), cluster.admin(3).await?);
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                let asked = Instant::now();
                admin.list_revocations(ListRevocationsRequest { page_size: 100, ..Default::default() }).await?;
                latencies.push(ms(asked.elapsed()));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::Ok(latencies)
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut admin = cluster.admin(1).await?;
    let request =
        RevokeCertificatesRequest { identity_regex: Some("mass-.*".into()), reason: "keyCompromise".into(), ..Default::default() };
    let start = Instant::now();
    admin.revoke_certificates(request).await?;
    let rpc = ms(start.elapsed());
    let mut from_start = Vec::with_capacity(count);
    for waiter in waiters {
        let (at, reason) = waiter.await??;
        anyhow::ensure!(reason == Some(0x98), "a mass session ended without DISCONNECT 0x98 ({reason:?})");
        from_start.push(ms(at - start));
    }
    let all_gone = start.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    publishing.await??;
    let (delivered, admin_answers) = (receiving.await??, asking.await??);
    println!("| measure | samples | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|");
    println!("{}", row("RPC duration (node 1)", vec![rpc]));
    println!("{}", row("RPC start → DISCONNECT 0x98 (nodes 1-3)", from_start));
    println!("{}", row("publish node 1 → subscriber node 2, 200 msg/s, during", delivered));
    println!("{}", row("ListRevocations on node 3, during", admin_answers));
    println!("\nEvery session was gone {:.0} ms after the RPC started.", all_gone.as_secs_f64() * 1000.0);
    Ok(())
}

/// Microseconds from the RPC's start and from its return to each disconnect.
struct Round {
    from_start: Vec<u64>,
    from_return: Vec<u64>,
    before_return: usize,
    rpc: Vec<u64>,
}

async fn revocation_round(cluster: &TestCluster, devices: usize, tag: &str) -> anyhow::Result<Round> {
    let mut admin = cluster.admin(1).await?;
    let mut round = Round { from_start: vec![], from_return: vec![], before_return: 0, rpc: vec![] };
    for i in 0..devices {
        let id = format!("{tag}-{i:04}");
        let (cert, key) = cluster.issue_device(&id)?;
        let mut waiters = Vec::new();
        for node in [2, 3] {
            let (code, client) =
                mqtt_connect(cluster.node(node).ports.mtls, &cluster.pki.ca_cert, &cert, &key, &format!("{id}-{node}")).await?;
            anyhow::ensure!(code == 0, "{id} refused on node {node}: {code:#x}");
            waiters.push(tokio::spawn(client.wait_disconnect(Duration::from_secs(10))));
        }
        let der = rampart_node::pki::pem_to_der(&std::fs::read(&cert)?)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&der)?;
        let request = RevokeCertificatesRequest {
            issuer: Some(parsed.issuer().to_string()),
            serials: vec![rampart_node::auth::serial::format_serial(parsed.raw_serial())],
            reason: "superseded".into(),
            ..Default::default()
        };
        let start = Instant::now();
        admin.revoke_certificates(request).await?;
        let returned = Instant::now();
        round.rpc.push(ms(returned - start));
        for waiter in waiters {
            let (at, reason) = waiter.await??;
            anyhow::ensure!(reason == Some(0x98), "{id}: disconnected without DISCONNECT 0x98 ({reason:?})");
            round.from_start.push(ms(at - start));
            match at.checked_duration_since(returned) {
                Some(after) => round.from_return.push(ms(after)),
                None => {
                    round.before_return += 1;
                    round.from_return.push(0);
                }
            }
        }
    }
    Ok(round)
}

fn ms(d: Duration) -> u64 {
    d.as_micros() as u64
}

fn row(label: &str, mut samples: Vec<u64>) -> String {
    let p = percentiles(&mut samples);
    let ms = |us: u64| us as f64 / 1000.0;
    format!("| {label} | {} | {:.1} | {:.1} | {:.1} |", samples.len(), ms(p.p50), ms(p.p99), ms(p.max))
}

fn print_round(title: &str, round: Round) {
    println!("\n{title}\n");
    println!("| measure | samples | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|");
    println!("{}", row("RPC duration (node 1)", round.rpc));
    println!("{}", row("RPC start → DISCONNECT (nodes 2, 3)", round.from_start));
    println!("{}", row("RPC return → DISCONNECT (nodes 2, 3)", round.from_return));
    println!("\n{} disconnects arrived before the RPC returned (counted as 0 ms above).", round.before_return);
}

async fn import(cluster: &TestCluster, count: usize) -> anyhow::Result<()> {
    let credentials: Vec<Credential> = (0..count)
        .map(|i| Credential {
            name: format!("imported-{i:06}"),
            enabled: true,
            client_type: ClientType::Device as i32,
            x509: Some(X509Match { identity: Some(format!("imported-{i:06}")), ..Default::default() }),
            rules: vec![Rule { access: Access::ReadWrite as i32, pattern: Some("devices/%u/#".into()), ..Default::default() }],
            ..Default::default()
        })
        .collect();
    let messages: Vec<ImportCredentialsRequest> =
        credentials.chunks(1000).map(|c| ImportCredentialsRequest { credentials: c.to_vec() }).collect();
    let rss_before: Vec<Option<u64>> = (1..=3).map(|node| cluster.rss(node)).collect();
    let mut reader = cluster.admin(2).await?;
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let probing = tokio::spawn(async move {
        let mut samples = Vec::new();
        while !*stopped.borrow() {
            let asked = Instant::now();
            reader.get_defaults(GetDefaultsRequest::default()).await?;
            samples.push(ms(asked.elapsed()));
            let _ = tokio::time::timeout(Duration::from_millis(20), stopped.changed()).await;
        }
        anyhow::Ok(samples)
    });
    let mut admin = cluster.admin(1).await?;
    let start = Instant::now();
    let reply = admin.import_credentials(tokio_stream::iter(messages)).await?.into_inner();
    let committed = start.elapsed();
    let probe = PutCredentialRequest {
        credential: Some(Credential {
            name: "probe".into(),
            enabled: true,
            x509: Some(X509Match { identity: Some("probe".into()), ..Default::default() }),
            ..Default::default()
        }),
        create_only: false,
        options: Some(WriteOptions { wait_all_nodes: true, wait_timeout_ms: 60_000 }),
    };
    let everywhere = admin.put_credential(probe).await?.into_inner();
    anyhow::ensure!(everywhere.not_applied_on.is_empty(), "not applied on {:?}", everywhere.not_applied_on);
    let applied = start.elapsed();
    stop.send_replace(true);
    let reads = probing.await??;
    println!("\nBulk import through node 1: {} credentials in {} batches\n", reply.imported, reply.batches);
    println!("| measure | seconds | credentials/s |\n|---|---|---|");
    println!("| committed (RPC returned) | {:.2} | {:.0} |", committed.as_secs_f64(), count as f64 / committed.as_secs_f64());
    println!("| applied on all 3 nodes | {:.2} | {:.0} |", applied.as_secs_f64(), count as f64 / applied.as_secs_f64());
    println!("\nAdmin reads during the import (GetDefaults on node 2, every 20 ms):\n");
    println!("| measure | samples | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|");
    println!("{}", row("GetDefaults", reads));
    println!("\n| node | RSS before MiB | RSS after MiB | bytes per credential |\n|---|---|---|---|");
    for (node, before) in (1..=3).zip(rss_before) {
        let (Some(before), Some(after)) = (before, cluster.rss(node)) else { continue };
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        println!("| {node} | {:.0} | {:.0} | {:.0} |", mib(before), mib(after), after.saturating_sub(before) as f64 / count as f64);
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The mass revocation's devices hold up to --mass / 100 sessions each.
    let cluster = TestCluster::start(Options { limits: "max_sessions_per_identity = 100000", ..Options::default() })?;
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await?;
    println!("Three release nodes on loopback; leader is node {leader}; revocations are sent to node 1.");
    print_round(
        &format!("Revocation propagation, {} devices, empty state:", args.revocations),
        revocation_round(&cluster, args.revocations, "empty").await?,
    );
    import(&cluster, args.import).await?;
    print_round(
        &format!("Revocation propagation, {} devices, {} credentials loaded:", args.revocations, args.import),
        revocation_round(&cluster, args.revocations, "loaded").await?,
    );
    if args.mass > 0 {
        mass_round(&cluster, args.mass).await?;
    }
    Ok(())
}
