//! The Raft log in sled: entries by big-endian index in `raft_log`; vote, committed index and
//! last purged id in `raft_meta`. Every write that Raft relies on (append, vote, truncate,
//! purge) is fsynced before it is reported done — on a blocking thread, never with sled's
//! `flush_async` (sled #1308 deadlocks under load).

use std::fmt::Debug;
use std::ops::RangeBounds;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogId, LogState, RaftLogReader, StorageError, StorageIOError, Vote};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Entry, NodeId, TypeConfig};

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";

#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
}

fn io_err(e: impl std::error::Error + Send + Sync + 'static) -> StorageError<NodeId> {
    StorageIOError::write(&e).into()
}

/// Writes sled's buffers and fsyncs them.
pub async fn flush(db: &sled::Db) -> Result<(), std::io::Error> {
    let db = db.clone();
    match tokio::task::spawn_blocking(move || db.flush()).await {
        Ok(result) => result.map(|_| ()).map_err(std::io::Error::other),
        Err(e) => Err(std::io::Error::other(e)),
    }
}

impl LogStore {
    pub fn open(db: &sled::Db) -> Result<LogStore, sled::Error> {
        Ok(LogStore { db: db.clone(), log: db.open_tree("raft_log")?, meta: db.open_tree("raft_meta")? })
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError<NodeId>> {
        let Some(bytes) = self.meta.get(key).map_err(io_err)? else { return Ok(None) };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| StorageIOError::read(&e).into())
    }

    fn put_meta<T: Serialize>(&self, key: &[u8], value: &T) -> Result<(), StorageError<NodeId>> {
        let bytes = serde_json::to_vec(value).map_err(io_err)?;
        self.meta.insert(key, bytes).map_err(io_err)?;
        Ok(())
    }

    async fn sync(&self) -> Result<(), StorageError<NodeId>> {
        flush(&self.db).await.map_err(|e| StorageIOError::write_logs(&e).into())
    }

    /// Removes the entries whose index is in `range`.
    fn remove(&self, range: impl RangeBounds<u64>) -> Result<(), StorageError<NodeId>> {
        let keys = self.log.range(key_range(range)).keys();
        let mut batch = sled::Batch::default();
        for key in keys {
            batch.remove(key.map_err(io_err)?);
        }
        self.log.apply_batch(batch).map_err(io_err)
    }
}

fn key_range(range: impl RangeBounds<u64>) -> (std::ops::Bound<[u8; 8]>, std::ops::Bound<[u8; 8]>) {
    use std::ops::Bound;
    let map = |b: Bound<&u64>| match b {
        Bound::Included(i) => Bound::Included(i.to_be_bytes()),
        Bound::Excluded(i) => Bound::Excluded(i.to_be_bytes()),
        Bound::Unbounded => Bound::Unbounded,
    };
    (map(range.start_bound()), map(range.end_bound()))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError<NodeId>> {
        self.log
            .range(key_range(range))
            .values()
            .map(|v| {
                let bytes = v.map_err(|e| StorageIOError::read_logs(&e))?;
                serde_json::from_slice(&bytes).map_err(|e| StorageIOError::read_logs(&e).into())
            })
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.get_meta(LAST_PURGED)?;
        let last = match self.log.last().map_err(io_err)? {
            Some((_, bytes)) => Some(serde_json::from_slice::<Entry>(&bytes).map_err(|e| StorageIOError::read_logs(&e))?.log_id),
            None => None,
        };
        Ok(LogState { last_purged_log_id, last_log_id: last.or(last_purged_log_id) })
    }

    async fn get_log_reader(&mut self) -> LogStore {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.put_meta(VOTE, vote)?;
        flush(&self.db).await.map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.get_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), StorageError<NodeId>> {
        // Made durable by the next fsync; after a crash openraft re-learns it from the leader.
        self.put_meta(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.get_meta::<Option<LogId<NodeId>>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            batch.insert(&entry.log_id.index.to_be_bytes(), serde_json::to_vec(&entry).map_err(io_err)?);
        }
        self.log.apply_batch(batch).map_err(io_err)?;
        // Raft may acknowledge the entries once this returns: they must be on disk first.
        let synced = flush(&self.db).await;
        callback.log_io_completed(synced);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.remove(log_id.index..)?;
        self.sync().await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        // Record the purge point first, so a crash between the two never leaves a hole.
        self.put_meta(LAST_PURGED, &log_id)?;
        self.sync().await?;
        self.remove(..=log_id.index)?;
        self.sync().await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use openraft::testing::{StoreBuilder, Suite};

    use super::*;
    use crate::auth::store::AuthStore;
    use crate::cluster::state_machine::{Replica, StateMachine};

    struct TempStore;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for TempStore {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<NodeId>> {
            let dir = tempfile::tempdir().map_err(io_err)?;
            let db = sled::Config::new().path(dir.path()).cache_capacity(8 << 20).open().map_err(io_err)?;
            let state_machine = StateMachine::open(&db, Replica::new(Arc::new(AuthStore::replicated())))?;
            Ok((dir, LogStore::open(&db).map_err(io_err)?, state_machine))
        }
    }

    /// openraft's own conformance suite for storage implementations.
    #[test]
    fn passes_the_openraft_storage_suite() {
        Suite::test_all(TempStore).unwrap();
    }
}
