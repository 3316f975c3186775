//! Raft replication of the authorization state (openraft): the type configuration, the running
//! member ([`Cluster`]) with bootstrap from the configured member list, writes that go to the
//! leader from any node, membership changes, and progress of every node.

// openraft's error types are large and its traits prescribe them.
#![allow(clippy::result_large_err)]

pub mod backup;
pub mod command;
pub mod log_store;
pub mod network;
pub mod service;
pub mod standing;
pub mod state_machine;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, SnapshotPolicy};
use rampart_proto::cluster::node_client::NodeClient;
use rampart_proto::cluster::{ProgressReply, ProgressRequest, RaftBytes};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use self::command::{AuthCmd, AuthResp, Op};
use self::state_machine::{Replica, StateMachine};
use crate::auth::state::AuthState;
use crate::auth::store::AuthStore;
use crate::config::ClusterConfig;

pub type NodeId = u64;

/// How other members reach a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// host:port of its cluster gRPC port.
    pub raft_addr: String,
    /// host:port of its QUIC forwarding port.
    pub quic_addr: String,
}

impl std::fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.raft_addr)
    }
}

openraft::declare_raft_types!(
    pub TypeConfig: D = AuthCmd, R = AuthResp, NodeId = NodeId, Node = NodeInfo, SnapshotData = Cursor<Vec<u8>>
);

pub type Entry = openraft::Entry<TypeConfig>;
pub type Raft = openraft::Raft<TypeConfig>;

/// A change proposed to the leader; followers forward it there.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Proposal {
    Auth(Box<AuthCmd>),
    AddNode { id: NodeId, node: NodeInfo, learner_only: bool },
    RemoveNode { id: NodeId },
}

/// A committed proposal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Committed {
    pub log_index: u64,
    pub resp: AuthResp,
}

#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
pub enum ProposeError {
    #[error("this node is not the leader")]
    NotLeader,
    /// No leader, no quorum, or the leader cannot be reached: retrying later may work.
    #[error("{0}")]
    Unavailable(String),
    /// The change itself is wrong (for example removing an unknown node).
    #[error("{0}")]
    Invalid(String),
}

impl AuthCmd {
    /// A command made now by `caller`, with a fresh request id.
    pub fn new(caller: impl Into<String>, op: Op) -> AuthCmd {
        use rand_core::RngCore;
        let request_id = (u128::from(rand_core::OsRng.next_u64()) << 64) | u128::from(rand_core::OsRng.next_u64());
        AuthCmd { request_id, caller: caller.into(), at: crate::clock::unix_now(), op }
    }
}

/// Where a committed entry has been applied, as far as the members answered.
#[derive(Debug, Default)]
pub struct Applied {
    pub done: Vec<NodeId>,
    pub pending: Vec<NodeId>,
    pub unreachable: Vec<NodeId>,
}

/// This node's Raft member.
pub struct Cluster {
    pub id: NodeId,
    pub raft: Raft,
    pub replica: Arc<Replica>,
    tls: ClientTlsConfig,
    write_timeout: Duration,
}

/// The TLS client side of node-to-node calls: this node's certificate, the cluster CA.
fn client_tls(config: &ClusterConfig) -> anyhow::Result<ClientTlsConfig> {
    let read = |path: &Path| std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()));
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&config.ca_file)?))
        .identity(Identity::from_pem(read(&config.cert_file)?, read(&config.key_file)?)))
}

impl Cluster {
    /// Opens the Raft storage under `data_dir/raft`, starts the member and, on the member with
    /// the lowest configured id, initializes a new cluster. `seed` is proposed as the first
    /// state once a leader exists, if the cluster has none yet.
    pub async fn start(
        config: &ClusterConfig,
        data_dir: &Path,
        auth: Arc<AuthStore>,
        seed: Option<AuthState>,
    ) -> anyhow::Result<Arc<Cluster>> {
        let path = data_dir.join("raft");
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(32 << 20)
            .open()
            .map_err(|e| anyhow::anyhow!("{}: cannot open the Raft store: {e}", path.display()))?;
        let log_store = log_store::LogStore::open(&db)?;
        let replica = Replica::new(auth);
        let state_machine = StateMachine::open(&db, replica.clone())?;
        let raft_config = openraft::Config {
            cluster_name: "rampart".into(),
            heartbeat_interval: config.heartbeat_ms,
            election_timeout_min: config.election_timeout_min_ms,
            election_timeout_max: config.election_timeout_max_ms,
            install_snapshot_timeout: 10_000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every),
            max_in_snapshot_log_to_keep: config.snapshot_every / 2,
            snapshot_max_chunk_size: 1024 * 1024,
            ..Default::default()
        }
        .validate()?;
        let tls = client_tls(config)?;
        let network = network::Network { tls: tls.clone(), unreachable: Default::default() };
        let raft = Raft::new(config.node_id, Arc::new(raft_config), network, log_store, state_machine).await?;
        let cluster =
            Arc::new(Cluster { id: config.node_id, raft, replica, tls, write_timeout: Duration::from_millis(config.write_timeout_ms) });
        let members: BTreeMap<NodeId, NodeInfo> =
            config.members.iter().map(|m| (m.id, NodeInfo { raft_addr: m.raft_addr.clone(), quic_addr: m.quic_addr.clone() })).collect();
        if members.keys().next() == Some(&config.node_id) && !cluster.raft.is_initialized().await? {
            tokio::spawn(initialize_when_reachable(cluster.clone(), members));
        }
        if let Some(seed) = seed {
            tokio::spawn(propose_seed(cluster.clone(), seed));
        }
        Ok(cluster)
    }

    /// The current leader and how to reach it.
    pub fn leader(&self) -> Option<(NodeId, NodeInfo)> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let leader = metrics.current_leader?;
        let node = metrics.membership_config.membership().get_node(&leader)?.clone();
        Some((leader, node))
    }

    /// Every member (voters and learners) with its address, and whether it votes.
    pub fn members(&self) -> Vec<(NodeId, NodeInfo, bool)> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        membership.nodes().map(|(id, node)| (*id, node.clone(), voters.contains(id))).collect()
    }

    /// Proposes a change: here when this node leads, else forwarded to the leader. Retries
    /// through elections until the configured write timeout.
    pub async fn propose(&self, proposal: Proposal) -> Result<Committed, ProposeError> {
        let deadline = Instant::now() + self.write_timeout;
        loop {
            let attempt = async {
                match self.leader() {
                    Some((id, _)) if id == self.id => self.propose_here(proposal.clone()).await,
                    Some((_, node)) => self.forward(&node, &proposal).await,
                    None => Err(ProposeError::NotLeader),
                }
            };
            let error = match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Ok(committed)) => return Ok(committed),
                Ok(Err(ProposeError::Invalid(e))) => return Err(ProposeError::Invalid(e)),
                Ok(Err(e)) => e,
                Err(_) => ProposeError::Unavailable("no quorum: the write was not committed in time (it may still apply)".into()),
            };
            if Instant::now() >= deadline {
                return Err(match error {
                    ProposeError::NotLeader => ProposeError::Unavailable("no leader elected (is a majority of nodes up?)".into()),
                    other => other,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Proposes on this node, which must be the leader.
    pub async fn propose_here(&self, proposal: Proposal) -> Result<Committed, ProposeError> {
        let unacknowledged = |r: openraft::raft::ClientWriteResponse<TypeConfig>| Committed { log_index: r.log_id.index, resp: r.data };
        let result = match proposal {
            Proposal::Auth(cmd) => self.raft.client_write(*cmd).await,
            Proposal::AddNode { id, node, learner_only } => {
                let added = self.raft.add_learner(id, node, true).await;
                if learner_only || added.is_err() {
                    added
                } else {
                    self.raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false).await
                }
            }
            Proposal::RemoveNode { id } => {
                let is_voter = self.members().iter().any(|(member, _, voter)| *member == id && *voter);
                let change = if is_voter {
                    ChangeMembers::RemoveVoters(BTreeSet::from([id]))
                } else {
                    ChangeMembers::RemoveNodes(BTreeSet::from([id]))
                };
                self.raft.change_membership(change, false).await
            }
        };
        result.map(unacknowledged).map_err(|e| match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => ProposeError::NotLeader,
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => ProposeError::Invalid(e.to_string()),
            RaftError::Fatal(e) => ProposeError::Unavailable(format!("Raft stopped: {e}")),
        })
    }

    async fn forward(&self, leader: &NodeInfo, proposal: &Proposal) -> Result<Committed, ProposeError> {
        let payload = serde_json::to_vec(proposal).expect("proposals serialize");
        let mut client = self.node_client(leader).map_err(|e| ProposeError::Unavailable(e.to_string()))?;
        let reply = client
            .write(RaftBytes { payload })
            .await
            .map_err(|s| ProposeError::Unavailable(format!("leader at {leader}: {}", s.message())))?;
        serde_json::from_slice(&reply.into_inner().payload)
            .map_err(|e| ProposeError::Unavailable(format!("leader at {leader}: bad reply: {e}")))?
    }

    /// A client for a member's node service.
    pub fn node_client(&self, node: &NodeInfo) -> Result<NodeClient<Channel>, tonic::transport::Error> {
        let channel = network::peer_channel(&node.raft_addr, &self.tls)?;
        Ok(NodeClient::new(channel).max_decoding_message_size(network::MAX_MESSAGE_BYTES))
    }

    /// This node's Raft progress.
    pub fn progress(&self) -> ProgressReply {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        ProgressReply {
            node_id: self.id,
            applied_index: *self.replica.applied().borrow(),
            term: metrics.current_term,
            leader_id: metrics.current_leader.unwrap_or_default(),
            members: metrics.membership_config.membership().nodes().map(|(id, _)| *id).collect(),
        }
    }

    /// The progress of every member; `None` for those that did not answer within `timeout`.
    pub async fn progress_of_all(&self, timeout: Duration) -> Vec<(NodeId, NodeInfo, bool, Option<ProgressReply>)> {
        let asks = self.members().into_iter().map(|(id, node, voter)| async move {
            if id == self.id {
                return (id, node, voter, Some(self.progress()));
            }
            let ask = async {
                let mut client = self.node_client(&node).ok()?;
                client.progress(ProgressRequest {}).await.ok().map(|r| r.into_inner())
            };
            let reply = tokio::time::timeout(timeout, ask).await.ok().flatten();
            (id, node, voter, reply)
        });
        futures_util::future::join_all(asks).await
    }

    /// Waits until every member that answers has applied `index`, or `timeout` passes. Returns
    /// the members that have applied it, those that answered but have not, and those that did
    /// not answer (down or cut off: not waited for).
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> Applied {
        let deadline = Instant::now() + timeout;
        loop {
            let mut applied = Applied::default();
            for (id, _, _, reply) in self.progress_of_all(Duration::from_millis(500)).await {
                match reply {
                    Some(reply) if reply.applied_index >= index => applied.done.push(id),
                    Some(_) => applied.pending.push(id),
                    None => applied.unreachable.push(id),
                }
            }
            if applied.pending.is_empty() || Instant::now() >= deadline {
                return applied;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "Raft did not stop cleanly");
        }
    }
}

/// How long the first member waits for the others before it initializes a new cluster anyway.
const INITIALIZE_PATIENCE: Duration = Duration::from_secs(30);

/// Initializes a new cluster once every configured member answers on its cluster port, so the
/// first election asks no node that is still starting (openraft logs each failed vote request
/// as an error). After [`INITIALIZE_PATIENCE`] it goes ahead with whoever is up: a majority
/// elects a leader, the others catch up when they start.
async fn initialize_when_reachable(cluster: Arc<Cluster>, members: BTreeMap<NodeId, NodeInfo>) {
    let started = Instant::now();
    let mut told = false;
    loop {
        let asks = members.iter().filter(|(id, _)| **id != cluster.id).map(|(id, node)| {
            let cluster = &cluster;
            async move {
                let ask = async { cluster.node_client(node).ok()?.progress(ProgressRequest {}).await.ok() };
                tokio::time::timeout(Duration::from_secs(1), ask).await.ok().flatten().is_none().then_some(*id)
            }
        });
        let missing: Vec<NodeId> = futures_util::future::join_all(asks).await.into_iter().flatten().collect();
        if missing.is_empty() || started.elapsed() >= INITIALIZE_PATIENCE {
            break;
        }
        if !told && started.elapsed() >= Duration::from_secs(5) {
            told = true;
            tracing::info!(?missing, "waiting for every configured member to start before initializing the cluster");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tracing::info!(members = ?members.keys().collect::<Vec<_>>(), "initializing a new cluster");
    if let Err(e) = cluster.raft.initialize(members).await {
        tracing::error!(error = %e, "initializing the cluster failed");
    }
}

/// Proposes the state file as the cluster's first state once this node leads, unless the
/// cluster already has one.
async fn propose_seed(cluster: Arc<Cluster>, seed: AuthState) {
    let cmd = AuthCmd::new("bootstrap", Op::Seed(Box::new(seed)));
    let mut metrics = cluster.raft.metrics();
    loop {
        if cluster.replica.is_seeded() {
            return;
        }
        let leads = metrics.borrow().current_leader == Some(cluster.id);
        if leads {
            match cluster.propose_here(Proposal::Auth(Box::new(cmd.clone()))).await {
                Ok(c) if c.resp.error.is_none() => {
                    tracing::info!(log_index = c.log_index, "initial authorization state from the state file")
                }
                Ok(c) => tracing::info!(reason = ?c.resp.error, "state file not used: the cluster already has a state"),
                Err(e) => tracing::warn!(error = %e, "proposing the initial state failed; will retry"),
            }
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}
