//! The other nodes of the cluster as the broker sees them ([`Remote`], implemented by the
//! forwarding plane), and [`RemoteAcks`], what a publisher waits for under the `cluster` PUBACK
//! policy.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

use super::message::Message;
use super::persist::{MovedMessage, MovedSession};
use super::retained::Stamp;
use super::AttachError;
use crate::auth::policy::Owner;

/// What a remote claim on a client id yields: the sessions moved from the nodes that held one
/// (normally at most one), with those nodes' ids.
pub type ClaimFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<(u64, MovedSession)>, AttachError>> + Send + 'a>>;

/// What the old node of a moved session collected for it since the move began; `None` when it
/// could not be had.
pub type TailFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Option<Vec<MovedMessage>>> + Send + 'a>>;

/// What waiting for the other nodes to learn this node's routes is.
pub type BarrierFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

/// What the publisher of a forwarded message waits for.
#[derive(Default)]
pub struct Forwarding {
    /// Room for the message with live peers whose queues are full (the back-pressure of slow
    /// subscribers, bounded in time), before the publisher reads its next packet.
    pub room: Option<BarrierFuture<'static>>,
    /// The acknowledgements to wait for before the publisher's PUBACK, when the cluster's PUBACK
    /// policy asks for them.
    pub acks: Option<Arc<RemoteAcks>>,
}

/// The other nodes of the cluster, as the broker needs them (the forwarding plane).
pub trait Remote: Send + Sync + 'static {
    /// A message published on this node, after it was routed to the local sessions; a retained
    /// one with the stamp it got in the retained store.
    fn forward(&self, message: &Arc<Message>, retained: Option<Stamp>) -> Forwarding;

    /// Makes `client_id` this node's, cluster-wide, before a client of `owner` attaches here:
    /// refused when another node holds it for another principal; a live connection elsewhere is
    /// taken over, and a persistent session there moves here (unless `clean_start`). Every
    /// session it returns must be settled ([`Remote::settle_move`]); when it fails, the sessions
    /// already released are given back to their nodes.
    fn claim<'a>(&'a self, client_id: &'a str, owner: &'a Owner, clean_start: bool) -> ClaimFuture<'a>;

    /// The second phase of a session move: once every peer with a live link routes by this
    /// node's routes as of `version` (bounded in time), asks node `from` to stop collecting for
    /// `client_id` and returns what it collected (`None` if it cannot be had).
    fn complete_move<'a>(&'a self, from: u64, client_id: &'a str, version: u64) -> TailFuture<'a>;

    /// Ends the move of `client_id` from node `from`: this node holds the session and its tail
    /// (`installed`: the old node drops its copy), or could not take it (the old node takes its
    /// session back).
    fn settle_move(&self, from: u64, client_id: &str, installed: bool);

    /// Completes once the other nodes route by this node's routes as of `version` (as the
    /// cluster's SUBACK barrier setting says, and bounded in time).
    fn routes_announced(&self, version: u64) -> BarrierFuture<'_>;

    /// Waits for `acks` (the cluster's PUBACK policy), bounded in time.
    fn wait_acks(&self, acks: Vec<Arc<RemoteAcks>>) -> BarrierFuture<'_>;

    /// Passes a message on, once, to another node with members of the shared group `route`
    /// (`$share/<group>/<filter>`), after no member here took it. Returns false when no other
    /// node has members.
    fn redispatch(&self, message: &Arc<Message>, route: &str) -> bool;
}

/// The peers that have yet to acknowledge one forwarded message (queued it for their
/// subscribers), and whether one of them will never get it; one waiter.
#[derive(Debug)]
pub struct RemoteAcks {
    left: AtomicUsize,
    lost: AtomicBool,
    done: Notify,
}

impl RemoteAcks {
    pub fn new(peers: usize) -> RemoteAcks {
        RemoteAcks { left: AtomicUsize::new(peers), lost: AtomicBool::new(false), done: Notify::new() }
    }

    /// One peer will never get the message (dropped on its way there): the publisher must not
    /// be told it is held.
    pub fn lost(&self) {
        self.lost.store(true, Ordering::Release);
        self.acknowledged();
    }

    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// One peer acknowledged the message.
    pub fn acknowledged(&self) {
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_one();
        }
    }

    /// Completes when every peer acknowledged.
    pub async fn all(&self) {
        if self.left.load(Ordering::Acquire) > 0 {
            self.done.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn completes_after_the_last_acknowledgement_whenever_it_comes() {
        let acks = Arc::new(RemoteAcks::new(2));
        acks.acknowledged();
        let waiting = tokio::spawn({
            let acks = acks.clone();
            async move { acks.all().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        acks.acknowledged();
        tokio::time::timeout(std::time::Duration::from_secs(1), waiting).await.unwrap().unwrap();
        let early = RemoteAcks::new(1);
        early.acknowledged();
        tokio::time::timeout(std::time::Duration::from_secs(1), early.all()).await.expect("acknowledged before anyone waited");
        assert!(!early.is_lost());
        let dropped = RemoteAcks::new(2);
        dropped.acknowledged();
        dropped.lost();
        tokio::time::timeout(std::time::Duration::from_secs(1), dropped.all()).await.expect("a lost message ends the wait");
        assert!(dropped.is_lost());
    }
}
