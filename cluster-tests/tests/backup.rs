//! Backup and restore of the replicated authorization state: `rampart admin snapshot save` from
//! a running three-node cluster, every node's data destroyed, `rampart cluster restore` into the
//! first node of a new cluster and the others added: credentials, roles, revocations (the
//! revoked device is still refused), providers and the audit trail are back on every node. A
//! corrupted copy of the file is refused, naming the file.

use std::time::{Duration, Instant};

use rampart_cluster_tests::{mqtt_connect, mqtt_connect_revoked, rampart, TestCluster};
use rampart_proto::admin::*;

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// What the test compares before and after: credentials, roles, revocations, providers, audit.
async fn state_on(cluster: &TestCluster, node: u64) -> anyhow::Result<(Credential, Vec<Role>, Vec<Revocation>, String, Vec<AuditEntry>)> {
    let mut admin = cluster.admin(node).await?;
    let credential = admin.get_credential(NameRequest { name: "plc-1".into(), options: None }).await?.into_inner();
    let roles = admin.list_roles(ListRolesRequest {}).await?.into_inner().roles;
    let revocations = admin.list_revocations(ListRevocationsRequest::default()).await?.into_inner().revocations;
    let providers = text(&cluster.cli(node, &["providers", "get"]));
    let audit = admin.list_audit(ListAuditRequest { after_index: 0, limit: 1000 }).await?.into_inner().entries;
    Ok((credential, roles, revocations, providers, audit))
}

async fn wait_for_leader_on(cluster: &TestCluster, node: u64, leader: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = async { anyhow::Ok(cluster.admin(node).await?.cluster_status(ClusterStatusRequest {}).await?.into_inner()) };
        if status.await.is_ok_and(|s| s.leader_id == leader) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "node {node} does not see node {leader} lead");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_snapshot_restores_a_destroyed_cluster_with_its_state() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(Default::default())?;
    cluster.wait_until_serving().await?;
    let cli = |cluster: &TestCluster, args: &[&str]| {
        let out = cluster.cli(1, args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        text(&out)
    };
    cli(&cluster, &["role", "put", "--name", "operators", "--allow", "readwrite:plants/#"]);
    cli(&cluster, &["credential", "put", "--name", "plc-1", "--identity", "plc-1", "--role", "operators"]);
    let (sensor_cert, sensor_key) = cluster.issue_device("sensor-7")?;
    cli(&cluster, &["revoke", "--certificate", sensor_cert.to_str().expect("utf-8"), "--reason", "keyCompromise"]);
    let providers = cluster.dir.path().join("providers.toml");
    std::fs::write(
        &providers,
        "[providers]\norder = [\"x509\", \"jwt\"]\n[providers.jwt]\nhmac_secret = \"backup-test-secret-backup-test-secret\"\n\
         rules = [{ access = \"write\", pattern = \"apps/%u/#\" }]\n",
    )?;
    cli(&cluster, &["--wait", "providers", "set", providers.to_str().expect("utf-8")]);
    let before = state_on(&cluster, 2).await?;
    assert_eq!(before.2.len(), 1, "one revocation: {:?}", before.2);

    // Saved through node 2: progress on stderr, a summary on stdout; the file checks offline.
    let file = cluster.dir.path().join("rampart.snapshot");
    let file_arg = file.to_str().expect("utf-8");
    let saved = cluster.cli(2, &["snapshot", "save", file_arg]);
    assert!(saved.status.success(), "{}", text(&saved));
    assert!(String::from_utf8_lossy(&saved.stderr).contains("received"), "{}", text(&saved));
    assert!(String::from_utf8_lossy(&saved.stdout).contains("1 revocations"), "{}", text(&saved));
    let verified = rampart().args(["cluster", "verify", file_arg]).output()?;
    assert!(verified.status.success() && text(&verified).contains("a usable backup"), "{}", text(&verified));

    // Every node's data is destroyed.
    for id in 1..=3 {
        cluster.stop(id);
        std::fs::remove_dir_all(cluster.dir.path().join(format!("data-{id}")))?;
    }

    // A corrupted copy is refused with the file's name and what is wrong, and leaves nothing.
    let data_1 = cluster.dir.path().join("data-1");
    let node_1 = cluster.node(1).ports;
    let restore = |from: &str| {
        rampart()
            .args(["cluster", "restore", from, "--data-dir", data_1.to_str().expect("utf-8"), "--node-id", "1"])
            .args(["--raft-addr", &format!("127.0.0.1:{}", node_1.cluster), "--quic-addr", &format!("127.0.0.1:{}", node_1.quic)])
            .output()
    };
    let mut bytes = std::fs::read(&file)?;
    let last = bytes.len() - 3;
    bytes[last] ^= 0x20;
    let corrupted = cluster.dir.path().join("corrupted.snapshot");
    std::fs::write(&corrupted, bytes)?;
    let refused = restore(corrupted.to_str().expect("utf-8"))?;
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(text(&refused).contains("corrupted.snapshot: corrupted"), "{}", text(&refused));
    assert!(!data_1.join("raft").exists());

    // Restored into node 1, which forms a new cluster; nodes 2 and 3 start empty and are added.
    let restored = restore(file_arg)?;
    assert!(restored.status.success(), "{}", text(&restored));
    for id in 1..=3 {
        cluster.start_node(id)?;
    }
    wait_for_leader_on(&cluster, 1, 1).await?;
    for id in [2, 3] {
        let ports = cluster.node(id).ports;
        let (raft_addr, quic_addr) = (format!("127.0.0.1:{}", ports.cluster), format!("127.0.0.1:{}", ports.quic));
        cli(&cluster, &["--wait", "cluster", "add-node", "--id", &id.to_string(), "--raft-addr", &raft_addr, "--quic-addr", &quic_addr]);
    }
    cluster.wait_until_serving().await?;

    let ca = &cluster.pki.ca_cert;
    for node in 1..=3 {
        let after = state_on(&cluster, node).await?;
        assert_eq!(after.0, before.0, "node {node}: the credential");
        assert_eq!(after.0.roles, ["operators"], "node {node}");
        assert_eq!(after.1, before.1, "node {node}: the roles");
        assert_eq!(after.2, before.2, "node {node}: the revocations");
        assert_eq!(after.3, before.3, "node {node}: the providers");
        assert!(after.3.contains("order = [\"x509\", \"jwt\"]"), "node {node}: {}", after.3);
        // The audit trail from before, then the membership changes of the new cluster.
        assert_eq!(after.4[..before.4.len()], before.4[..], "node {node}: the audit trail");
        let port = cluster.node(node).ports.mtls;
        let refused = mqtt_connect_revoked(port, ca, &sensor_cert, &sensor_key, "sensor-7").await;
        assert_eq!(refused, Ok(()), "node {node} still refuses the revoked device");
    }
    let (plc_cert, plc_key) = cluster.issue_device("plc-1")?;
    assert_eq!(mqtt_connect(cluster.node(3).ports.mtls, ca, &plc_cert, &plc_key, "plc-1").await?.0, 0);
    Ok(())
}
