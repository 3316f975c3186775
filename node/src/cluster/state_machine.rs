//! The Raft state machine: the [`Replicated`] state in memory, its snapshots in sled (tree
//! `sm_snapshot`). Applying committed commands swaps the node's `AuthIndex` (which makes live
//! connections re-check themselves), feeds the audit stream and advances the applied index.
//! After a restart the state comes back from the last snapshot and openraft re-applies the
//! committed log after it.

use std::io::Cursor;
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError, StoredMembership};
use tokio::sync::{broadcast, watch};

use super::command::{AuditEntry, AuthResp, Replicated};
use super::log_store::flush;
use super::{Entry, NodeId, NodeInfo, TypeConfig};
use crate::auth::index::AuthIndex;
use crate::auth::store::AuthStore;

const SNAPSHOT_META: &[u8] = b"meta";
const SNAPSHOT_DATA: &[u8] = b"data";

/// What the rest of the node sees of the replicated state.
pub struct Replica {
    state: Mutex<Replicated>,
    auth: Arc<AuthStore>,
    audit_feed: broadcast::Sender<AuditEntry>,
    applied: watch::Sender<u64>,
}

impl Replica {
    pub fn new(auth: Arc<AuthStore>) -> Arc<Replica> {
        Arc::new(Replica {
            state: Mutex::new(Replicated::default()),
            auth,
            audit_feed: broadcast::channel(1024).0,
            applied: watch::channel(0).0,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Replicated> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Audit entries after a log index, oldest first.
    pub fn audit_after(&self, after: u64, limit: usize) -> Vec<AuditEntry> {
        self.lock().audit.iter().filter(|a| a.log_index > after).take(limit).cloned().collect()
    }

    /// New audit entries as they are applied.
    pub fn audit_feed(&self) -> broadcast::Receiver<AuditEntry> {
        self.audit_feed.subscribe()
    }

    pub fn is_seeded(&self) -> bool {
        self.lock().seeded
    }

    /// The highest log index applied here.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    pub fn auth(&self) -> &Arc<AuthStore> {
        &self.auth
    }

    /// The state applied here, serialized as in a Raft snapshot, and the log index it was
    /// applied up to (a committed index: the two are read together, under the state's lock).
    pub fn export(&self) -> (u64, Vec<u8>) {
        let state = self.lock();
        let index = *self.applied.borrow();
        (index, serde_json::to_vec(&*state).expect("plain data with string keys always serializes"))
    }

    /// Puts the authorization state in force on this node.
    fn install(&self, state: &Replicated) {
        match AuthIndex::rebuild(state.auth.clone()) {
            Ok(index) => self.auth.install(index),
            // Apply validates every command, so this means a bug; keep the last good index.
            Err(e) => tracing::error!(error = %e, "replicated authorization state does not compile; previous state stays in force"),
        }
    }
}

/// The snapshot as stored and sent: the serialized `Replicated` and its metadata.
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, NodeInfo>,
    data: Vec<u8>,
}

pub struct StateMachine {
    db: sled::Db,
    snapshots: sled::Tree,
    replica: Arc<Replica>,
    applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, NodeInfo>,
    snapshot_count: u64,
}

fn read_err(e: impl std::error::Error + Send + Sync + 'static) -> StorageError<NodeId> {
    StorageIOError::read_state_machine(&e).into()
}

fn write_err(e: impl std::error::Error + Send + Sync + 'static) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(&e).into()
}

impl StateMachine {
    /// Opens the state machine, restoring the last snapshot and putting it in force.
    pub fn open(db: &sled::Db, replica: Arc<Replica>) -> Result<StateMachine, StorageError<NodeId>> {
        let snapshots = db.open_tree("sm_snapshot").map_err(read_err)?;
        let mut sm =
            StateMachine { db: db.clone(), snapshots, replica, applied: None, membership: StoredMembership::default(), snapshot_count: 0 };
        if let Some(snapshot) = sm.stored()? {
            sm.restore(&snapshot)?;
        }
        Ok(sm)
    }

    fn stored(&self) -> Result<Option<StoredSnapshot>, StorageError<NodeId>> {
        let (Some(meta), Some(data)) =
            (self.snapshots.get(SNAPSHOT_META).map_err(read_err)?, self.snapshots.get(SNAPSHOT_DATA).map_err(read_err)?)
        else {
            return Ok(None);
        };
        let meta = serde_json::from_slice(&meta).map_err(read_err)?;
        Ok(Some(StoredSnapshot { meta, data: data.to_vec() }))
    }

    fn restore(&mut self, snapshot: &StoredSnapshot) -> Result<(), StorageError<NodeId>> {
        let state: Replicated = serde_json::from_slice(&snapshot.data).map_err(read_err)?;
        self.applied = snapshot.meta.last_log_id;
        self.membership = snapshot.meta.last_membership.clone();
        self.replica.install(&state);
        let mut held = self.replica.lock();
        *held = state;
        // Under the lock, so `Replica::export` reads a state with its own index.
        self.replica.applied.send_replace(self.applied.map_or(0, |l| l.index));
        Ok(())
    }
}

/// Persists a snapshot (fsynced) as the current one.
async fn persist(db: &sled::Db, tree: &sled::Tree, snapshot: &StoredSnapshot) -> Result<(), StorageError<NodeId>> {
    let meta = serde_json::to_vec(&snapshot.meta).map_err(write_err)?;
    let mut batch = sled::Batch::default();
    batch.insert(SNAPSHOT_META, meta);
    batch.insert(SNAPSHOT_DATA, snapshot.data.as_slice());
    tree.apply_batch(batch).map_err(write_err)?;
    flush(db).await.map_err(|e| StorageIOError::write_snapshot(Some(snapshot.meta.signature()), &e).into())
}

pub struct SnapshotBuilder {
    db: sled::Db,
    snapshots: sled::Tree,
    snapshot: Option<StoredSnapshot>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let snapshot = self.snapshot.take().ok_or_else(|| write_err(std::io::Error::other("snapshot already built")))?;
        persist(&self.db, &self.snapshots, &snapshot).await?;
        tracing::info!(last_log_id = ?snapshot.meta.last_log_id, bytes = snapshot.data.len(), "Raft snapshot built");
        Ok(Snapshot { meta: snapshot.meta, snapshot: Box::new(Cursor::new(snapshot.data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, NodeInfo>), StorageError<NodeId>> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<AuthResp>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut responses = Vec::new();
        let mut audited = Vec::new();
        let mut auth_changed = false;
        let mut state = self.replica.lock();
        for entry in entries {
            self.applied = Some(entry.log_id);
            let resp = match entry.payload {
                EntryPayload::Blank => AuthResp::default(),
                EntryPayload::Normal(cmd) => {
                    let (resp, changed) = state.apply(entry.log_id.index, &cmd);
                    auth_changed |= changed;
                    audited.extend(state.audit.back().filter(|a| a.log_index == entry.log_id.index).cloned());
                    resp
                }
                EntryPayload::Membership(membership) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), membership);
                    AuthResp::default()
                }
            };
            responses.push(resp);
        }
        if auth_changed {
            self.replica.install(&state);
        }
        // Under the lock, so `Replica::export` reads a state with its own index.
        self.replica.applied.send_replace(self.applied.map_or(0, |l| l.index));
        drop(state);
        for entry in audited {
            let _ = self.replica.audit_feed.send(entry);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        self.snapshot_count += 1;
        let meta = SnapshotMeta {
            last_log_id: self.applied,
            last_membership: self.membership.clone(),
            snapshot_id: format!("{}-{}", self.applied.map_or(0, |l| l.index), self.snapshot_count),
        };
        // Serialized here, on the state machine's task, so the snapshot is a consistent view.
        let data = serde_json::to_vec(&*self.replica.lock()).expect("plain data with string keys always serializes");
        SnapshotBuilder { db: self.db.clone(), snapshots: self.snapshots.clone(), snapshot: Some(StoredSnapshot { meta, data }) }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let snapshot = StoredSnapshot { meta: meta.clone(), data: snapshot.into_inner() };
        self.restore(&snapshot)?;
        persist(&self.db, &self.snapshots, &snapshot).await?;
        tracing::info!(last_log_id = ?meta.last_log_id, "Raft snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        Ok(self.stored()?.map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}
