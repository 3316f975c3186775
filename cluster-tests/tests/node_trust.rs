//! A node is its certificate: the id a peer claims on the forwarding port (QUIC) and the calls it
//! makes on the cluster port (gRPC) are checked against the node id its certificate is bound to
//! and against the current membership; a revoked or removed node loses its links at once.

use std::time::{Duration, Instant};

use rampart_cluster_tests::{Options, TestCluster};
use rampart_proto::cluster::{ProgressRequest, RaftBytes};
use tonic::Code;

/// Waits until `done` holds, for at most `within`.
async fn eventually(within: Duration, what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what} did not happen within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn log_of(cluster: &TestCluster, node: u64) -> String {
    std::fs::read_to_string(&cluster.node(node).log).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_certificate_speaks_only_for_its_own_id_and_only_as_a_member() -> anyhow::Result<()> {
    // Node 4 has a node certificate of the cluster CA (bound to id 4) but was never added.
    let cluster = TestCluster::start(Options { nodes: 4, initial_members: 3, ..Options::default() })?;
    cluster.wait_until_serving().await?;

    // Forwarding port: a claimed id must be the certificate's, and a member's.
    let hello = |identity: u64, claimed: u64| {
        let cluster = &cluster;
        async move { cluster.quic_hello(1, cluster.node_identity(identity)?, claimed).await }
    };
    let forged = hello(4, 2).await?;
    assert!(forged.contains("is node 4's, but it claims to be node 2"), "{forged}");
    let outsider = hello(4, 4).await?;
    assert!(outsider.contains("node 4 is not a member"), "{outsider}");
    let other_member = hello(2, 3).await?;
    assert!(other_member.contains("is node 2's, but it claims to be node 3"), "{other_member}");
    assert_eq!(hello(2, 2).await?, "Welcome", "a member speaking for itself");

    // Cluster port: a non-member may ask for progress (a node waiting to be added does), nothing else.
    let mut outsider = cluster.node_client(1, cluster.node_identity(4)?).await?;
    outsider.progress(ProgressRequest {}).await?;
    let write = outsider.write(RaftBytes { payload: b"{}".to_vec() }).await.unwrap_err();
    assert_eq!(write.code(), Code::PermissionDenied, "{write:?}");
    assert!(write.message().contains("node 4 (\"node-4\") is not a member"), "{write:?}");
    let mut outsider_raft = cluster.raft_client(1, cluster.node_identity(4)?).await?;
    let append = outsider_raft.append_entries(RaftBytes { payload: b"{}".to_vec() }).await.unwrap_err();
    assert_eq!(append.code(), Code::PermissionDenied, "{append:?}");

    // A member may not send Raft messages on behalf of another member.
    let mut node_2 = cluster.raft_client(1, cluster.node_identity(2)?).await?;
    let vote_as_3 = br#"{"vote":{"leader_id":{"term":99,"node_id":3},"committed":false},"last_log_id":null}"#;
    let vote = node_2.vote(RaftBytes { payload: vote_as_3.to_vec() }).await.unwrap_err();
    assert_eq!(vote.code(), Code::PermissionDenied, "{vote:?}");
    assert!(vote.message().contains("on behalf of node Some(3)"), "{vote:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_node_loses_its_links_at_once_and_is_refused_on_both_ports() -> anyhow::Result<()> {
    let cluster = TestCluster::start(Options::default())?;
    cluster.wait_until_serving().await?;
    let (node_3_cert, _) = &cluster.pki.nodes[2];
    let revoked = cluster.cli(1, &["revoke", "--certificate", node_3_cert.to_str().expect("utf-8"), "--reason", "keyCompromise"]);
    assert!(revoked.status.success(), "{}", String::from_utf8_lossy(&revoked.stderr));
    let link = |node: u64, peer: u64| cluster.metric(node, &format!("rampart_forward_link_up{{peer=\"{peer}\"}}"));
    eventually(Duration::from_secs(5), "the links with node 3 going down", || {
        link(1, 3) == 0 && link(2, 3) == 0 && link(3, 1) <= 0 && link(3, 2) <= 0
    })
    .await;
    assert!(log_of(&cluster, 1).contains("forwarding connection closed"), "node 1 closed node 3's connections");
    // They stay down: node 3 cannot dial in, and nobody dials it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!((link(1, 3), link(2, 3)), (0, 0));
    let refused = cluster.quic_hello(1, cluster.node_identity(3)?, 3).await?;
    assert!(refused.contains("revoked"), "{refused}");
    let mut node_3 = cluster.node_client(1, cluster.node_identity(3)?).await?;
    let progress = node_3.progress(ProgressRequest {}).await.unwrap_err();
    assert_eq!(progress.code(), Code::PermissionDenied, "{progress:?}");
    assert!(progress.message().contains("revoked"), "{progress:?}");
    // Nodes 1 and 2 still link to each other.
    assert_eq!((link(1, 2), link(2, 1)), (1, 1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_member_loses_its_links_and_its_calls_at_once() -> anyhow::Result<()> {
    let cluster = TestCluster::start(Options::default())?;
    cluster.wait_until_serving().await?;
    let removed = cluster.cli(1, &["cluster", "remove-node", "3"]);
    assert!(removed.status.success(), "{}", String::from_utf8_lossy(&removed.stderr));
    let link = |node: u64, peer: u64| cluster.metric(node, &format!("rampart_forward_link_up{{peer=\"{peer}\"}}"));
    eventually(Duration::from_secs(5), "node 1 closing node 3's connections", || {
        link(1, 3) == 0 && log_of(&cluster, 1).contains("no longer a member of this cluster")
    })
    .await;
    let refused = cluster.quic_hello(1, cluster.node_identity(3)?, 3).await?;
    assert!(refused.contains("node 3 is not a member"), "{refused}");
    let mut node_3 = cluster.node_client(1, cluster.node_identity(3)?).await?;
    let write = node_3.write(RaftBytes { payload: b"{}".to_vec() }).await.unwrap_err();
    assert_eq!(write.code(), Code::PermissionDenied, "{write:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(link(3, 1) <= 0, "node 3's link to node 1 stays down");
    Ok(())
}
