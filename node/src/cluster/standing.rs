//! Whether this node is a cluster member: waiting to be added, a member, or removed. Only a
//! member serves MQTT clients and reports ready. Raft tells a node when it joins but not always
//! when it is removed (the leader stops replicating to it), so a node that is not the leader
//! also asks the leader, or any member when it knows no leader, whether it is still listed.

use std::sync::Arc;
use std::time::Duration;

use rampart_proto::cluster::ProgressRequest;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Cluster, NodeId};
use crate::auth::store::{AuthStore, NOT_YET_A_MEMBER};

/// How often the standing is re-checked.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long a node may wait to be added before it says so (a clean start takes a moment).
const WAITING_NOTICE_AFTER: Duration = Duration::from_secs(5);
/// Between two "waiting to be added" notices.
const WAITING_NOTICE_EVERY: Duration = Duration::from_secs(60);
const PEER_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a removed node serves no client.
pub const REMOVED: &str = "this node was removed from the cluster";

/// Keeps `auth` out of service unless this node is a member, until shutdown.
pub async fn watch(cluster: Arc<Cluster>, auth: Arc<AuthStore>, mut shutdown: watch::Receiver<bool>) {
    let started = Instant::now();
    let mut next_notice = started + WAITING_NOTICE_AFTER;
    let mut was_member = false;
    let mut metrics = cluster.raft.metrics();
    let mut ask_peers = false;
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let listed_here = cluster.members().iter().any(|(id, _, _)| *id == cluster.id);
        let removed = (was_member && !listed_here) || (ask_peers && listed_here && removed_says_another_member(&cluster).await);
        if removed {
            auth.set_out_of_service(Some(REMOVED.into()));
            tracing::warn!(
                node_id = cluster.id,
                "{REMOVED}: it no longer serves MQTT clients (connected ones were disconnected) and /readyz is false; \
                 stop it and delete its data_dir to decommission it, or add it again with `rampart admin cluster add-node`"
            );
            return;
        }
        if listed_here {
            if !was_member {
                tracing::info!(node_id = cluster.id, "this node is a cluster member; serving clients");
            }
            was_member = true;
            auth.set_out_of_service(None);
        } else if Instant::now() >= next_notice {
            next_notice = Instant::now() + WAITING_NOTICE_EVERY;
            tracing::warn!(
                node_id = cluster.id,
                "{NOT_YET_A_MEMBER}: waiting to be added (refusing MQTT clients, /readyz false); add it with \
                 `rampart admin cluster add-node --id {} --raft-addr HOST:PORT`, or list it in every node's [[cluster.members]] \
                 before the cluster's first start",
                cluster.id
            );
        }
        // Membership changes are seen at once; peers are asked once per CHECK_EVERY.
        ask_peers = tokio::select! {
            changed = metrics.changed() => {
                if changed.is_err() {
                    return;
                }
                false
            }
            _ = tick.tick() => true,
            _ = shutdown.changed() => return,
        };
    }
}

/// Asks the leader (or, with no leader known, every other member) for its membership: true when
/// a leader answers and does not list this node.
async fn removed_says_another_member(cluster: &Cluster) -> bool {
    let leader = cluster.leader();
    if leader.as_ref().is_some_and(|(id, _)| *id == cluster.id) {
        return false;
    }
    let others: Vec<_> = match leader {
        Some((id, node)) => vec![(id, node)],
        None => cluster.members().into_iter().filter(|(id, _, _)| *id != cluster.id).map(|(id, node, _)| (id, node)).collect(),
    };
    for (id, node) in others {
        let ask = async { cluster.node_client(&node).ok()?.progress(ProgressRequest {}).await.ok().map(|r| r.into_inner()) };
        if let Ok(Some(reply)) = tokio::time::timeout(PEER_TIMEOUT, ask).await {
            if leads(id, &reply) && !reply.members.contains(&cluster.id) {
                return true;
            }
        }
    }
    false
}

/// The node answering is the leader by its own account.
fn leads(id: NodeId, reply: &rampart_proto::cluster::ProgressReply) -> bool {
    reply.node_id == id && reply.leader_id == id
}
