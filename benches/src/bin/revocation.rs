//! Fleet-wide revocation and bulk import on a real three-node cluster (release processes on
//! loopback, see `rampart-cluster-tests`):
//!
//! - revocation propagation: a device holds live mTLS sessions on nodes 2 and 3; its certificate
//!   is revoked through node 1's admin API; the time from the RPC's return (and from its start)
//!   to each DISCONNECT is recorded, over `--revocations` devices — once on an empty state and
//!   once with the imported credentials loaded;
//! - bulk import: `--import` x509 credentials streamed through `ImportCredentials`, then the time
//!   until every node has applied them, each node's resident memory before and after, and the
//!   latency of an admin read (`GetDefaults` on node 2, every 20 ms) while it runs.
//!
//! Run with `bash benches/revocation.sh` (builds the release binaries first).

use std::time::{Duration, Instant};

use clap::Parser;
use rampart_benches::stats::percentiles;
use rampart_cluster_tests::{mqtt_connect, Options, TestCluster};
use rampart_proto::admin::*;

#[derive(Parser)]
struct Args {
    /// Devices revoked (one revocation each) per round.
    #[arg(long, default_value_t = 100)]
    revocations: usize,
    /// Credentials imported.
    #[arg(long, default_value_t = 100_000)]
    import: usize,
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
    let cluster = TestCluster::start(Options::default())?;
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
    Ok(())
}
