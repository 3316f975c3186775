//! The client side of the Raft transport: openraft's requests serialized (JSON) into
//! `rampart.cluster.v1.Raft` calls over mutual TLS with this node's certificate. Snapshots go
//! as typed chunks so their bytes are not inflated. A peer that cannot be reached is logged
//! here, once when it goes, once a minute while it stays away and once when it is back
//! (openraft's own lines for every retry are dropped by `telemetry::quiet`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest, VoteResponse,
};
use rampart_proto::cluster::raft_client::RaftClient;
use rampart_proto::cluster::{RaftBytes, SnapshotChunk};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::{NodeId, NodeInfo, TypeConfig};

/// Largest gRPC message either side accepts (snapshot chunks are kept well below).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// A lazily connecting channel to a peer's cluster port.
pub fn peer_channel(raft_addr: &str, tls: &ClientTlsConfig) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("https://{raft_addr}"))?
        .tls_config(tls.clone())?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .connect_lazy())
}

/// How often a peer that stays unreachable is reported again.
const STILL_UNREACHABLE_EVERY: Duration = Duration::from_secs(60);

/// Creates a [`Peer`] per target node.
pub struct Network {
    pub tls: ClientTlsConfig,
    /// Shared by every [`Peer`] (openraft makes one per replication stream and per election).
    pub unreachable: Arc<Unreachables>,
}

/// The peers whose last Raft call failed in transport: since when, and when that was last logged.
#[derive(Default)]
pub struct Unreachables(Mutex<HashMap<NodeId, (Instant, Instant)>>);

impl Unreachables {
    /// A call to `target` failed before reaching its Raft: logged when the peer was reachable
    /// until now, and again once every [`STILL_UNREACHABLE_EVERY`].
    fn failed(&self, target: NodeId, addr: &str, error: &dyn std::fmt::Display) {
        let now = Instant::now();
        let mut peers = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match peers.get_mut(&target) {
            None => {
                peers.insert(target, (now, now));
                tracing::warn!(peer = target, %addr, %error, "cluster peer unreachable; Raft keeps retrying (reported again every minute while it lasts)");
            }
            Some((since, reported)) if now.duration_since(*reported) >= STILL_UNREACHABLE_EVERY => {
                *reported = now;
                tracing::warn!(peer = target, %addr, %error, unreachable_for_secs = now.duration_since(*since).as_secs(), "cluster peer still unreachable");
            }
            Some(_) => {}
        }
    }

    /// A call to `target` got an answer: logged when it had been unreachable.
    fn answered(&self, target: NodeId) {
        let gone = self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&target);
        if let Some((since, _)) = gone {
            tracing::info!(peer = target, unreachable_for_secs = since.elapsed().as_secs(), "cluster peer reachable again");
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> Peer {
        let client = peer_channel(&node.raft_addr, &self.tls)
            .map(|channel| {
                RaftClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES)
            })
            .map_err(|e| e.to_string());
        Peer { target, addr: node.raft_addr.clone(), client, unreachable: self.unreachable.clone() }
    }
}

pub struct Peer {
    target: NodeId,
    addr: String,
    unreachable: Arc<Unreachables>,
    /// Err: the member's address is unusable (reported on every call).
    client: Result<RaftClient<Channel>, String>,
}

type RpcResult<T, E = openraft::error::Infallible> = Result<T, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>;

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("openraft messages serialize")
}

impl Peer {
    fn client<E: std::error::Error>(&self) -> RpcResult<RaftClient<Channel>, E> {
        self.client.clone().map_err(|e| {
            self.unreachable.failed(self.target, &self.addr, &e);
            RPCError::Unreachable(Unreachable::new(&std::io::Error::other(e)))
        })
    }

    /// Decodes a reply: a transport failure makes the peer unreachable (openraft backs off);
    /// a remote Raft error is passed on as such.
    fn reply<T, E>(&self, reply: Result<tonic::Response<RaftBytes>, tonic::Status>) -> RpcResult<T, E>
    where
        T: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let bytes = match reply {
            Ok(reply) => {
                self.unreachable.answered(self.target);
                reply.into_inner().payload
            }
            Err(status) => {
                self.unreachable.failed(self.target, &self.addr, &transport_error(&status));
                return Err(RPCError::Unreachable(Unreachable::new(&status)));
            }
        };
        match serde_json::from_slice::<Result<T, RaftError<NodeId, E>>>(&bytes) {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }
}

/// A failed call in one line: tonic's message and the innermost cause (such as "Connection
/// refused (os error 111)").
fn transport_error(status: &tonic::Status) -> String {
    let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(status);
    let mut innermost = None;
    while let Some(error) = cause {
        innermost = Some(error);
        cause = error.source();
    }
    match innermost {
        Some(error) => format!("{}: {error}", status.message()),
        None => status.message().to_string(),
    }
}

fn request<T>(message: T, option: &RPCOption) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(option.hard_ttl());
    request
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let reply = self.client()?.append_entries(request(RaftBytes { payload: json(&rpc) }, &option)).await;
        self.reply(reply)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let chunk =
            SnapshotChunk { vote_json: json(&rpc.vote), meta_json: json(&rpc.meta), offset: rpc.offset, data: rpc.data, done: rpc.done };
        let reply = self.client()?.install_snapshot(request(chunk, &option)).await;
        self.reply(reply)
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> RpcResult<VoteResponse<NodeId>> {
        let reply = self.client()?.vote(request(RaftBytes { payload: json(&rpc) }, &option)).await;
        self.reply(reply)
    }
}
