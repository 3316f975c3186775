//! Backups of the replicated authorization state. `rampart admin snapshot save` writes a file:
//! the line `RAMPART-SNAPSHOT`, a JSON header line (format version, the committed log index the
//! state was applied up to, the node that wrote it, the time, the state's length and a sha256 of
//! header and state) and the state itself, as a Raft snapshot holds it. `rampart cluster restore`
//! checks such a file and installs it, through openraft's state-machine and log-store traits, as
//! the snapshot of a new single-member cluster in an empty data directory.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::{CommittedLeaderId, LogId, Membership, SnapshotMeta, StoredMembership, Vote};
use serde::{Deserialize, Serialize};

use super::command::Replicated;
use super::log_store::{flush, LogStore};
use super::state_machine::{Replica, StateMachine};
use super::{NodeId, NodeInfo};
use crate::auth::index::AuthIndex;
use crate::auth::store::AuthStore;

/// The first line of every backup file.
const MAGIC: &[u8] = b"RAMPART-SNAPSHOT\n";
/// The format this build writes, and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
/// The Raft term of a restored snapshot; the restored node's first election opens the next one.
const RESTORED_TERM: u64 = 1;

/// What a backup file says about the state it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub format: u32,
    /// The committed log index the state was applied up to.
    pub log_index: u64,
    /// The node that answered the save.
    pub node_id: NodeId,
    /// When it was saved, seconds since the Unix epoch.
    pub created: i64,
    /// Length of the state after the header.
    pub state_bytes: u64,
    /// sha256 (hex) of the header line written with this field empty, then the state.
    pub sha256: String,
}

/// Why a file is not a backup this build can restore.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum BackupError {
    #[error("not a Rampart snapshot backup (it does not start with the line RAMPART-SNAPSHOT)")]
    NotABackup,
    #[error("written in snapshot format {found}, newer than this build reads (format {FORMAT_VERSION}): restore it with a newer Rampart")]
    NewerFormat { found: u32 },
    #[error("the header is unreadable: {0}")]
    BadHeader(String),
    #[error("truncated: the header announces {expected} bytes of state, the file holds {found}")]
    Truncated { expected: u64, found: u64 },
    #[error("corrupted: its sha256 is {found}, the header says {expected}")]
    Corrupted { expected: String, found: String },
    #[error("the state it holds is unusable: {0}")]
    BadState(String),
}

/// Only the version, read before the rest: another format may have other fields.
#[derive(Deserialize)]
struct Version {
    format: u32,
}

fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for part in parts {
        context.update(part);
    }
    context.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn header_line(header: &Header) -> Vec<u8> {
    serde_json::to_vec(header).expect("a header always serializes")
}

/// The checksum of `header` (whatever its `sha256` field holds) and `state`.
fn checksum(header: &Header, state: &[u8]) -> String {
    let unsigned = Header { sha256: String::new(), ..header.clone() };
    sha256_hex(&[&header_line(&unsigned), b"\n", state])
}

/// A backup file of `state` (serialized [`Replicated`]) applied up to `log_index` on `node_id`.
pub fn encode(log_index: u64, node_id: NodeId, created: i64, state: &[u8]) -> Vec<u8> {
    let mut header = Header { format: FORMAT_VERSION, log_index, node_id, created, state_bytes: state.len() as u64, sha256: String::new() };
    header.sha256 = checksum(&header, state);
    let line = header_line(&header);
    let mut file = Vec::with_capacity(MAGIC.len() + line.len() + 1 + state.len());
    file.extend_from_slice(MAGIC);
    file.extend_from_slice(&line);
    file.push(b'\n');
    file.extend_from_slice(state);
    file
}

/// A checked backup: its header and the state it holds.
#[derive(Debug)]
pub struct Backup {
    pub header: Header,
    pub state: Replicated,
    /// The state as serialized in the file (and in a Raft snapshot).
    data: Vec<u8>,
}

impl Backup {
    /// Reads a backup file's bytes: its format, checksum, and a state that compiles.
    pub fn decode(file: &[u8]) -> Result<Backup, BackupError> {
        let rest = file.strip_prefix(MAGIC).ok_or(BackupError::NotABackup)?;
        let end = rest.iter().position(|b| *b == b'\n').ok_or_else(|| BackupError::BadHeader("no end of line".into()))?;
        let (line, data) = (&rest[..end], &rest[end + 1..]);
        let version: Version = serde_json::from_slice(line).map_err(|e| BackupError::BadHeader(e.to_string()))?;
        if version.format > FORMAT_VERSION {
            return Err(BackupError::NewerFormat { found: version.format });
        }
        let header: Header = serde_json::from_slice(line).map_err(|e| BackupError::BadHeader(e.to_string()))?;
        if header.state_bytes != data.len() as u64 {
            return Err(BackupError::Truncated { expected: header.state_bytes, found: data.len() as u64 });
        }
        let found = checksum(&header, data);
        if found != header.sha256 {
            return Err(BackupError::Corrupted { expected: header.sha256, found });
        }
        let state: Replicated = serde_json::from_slice(data).map_err(|e| BackupError::BadState(e.to_string()))?;
        AuthIndex::build(state.auth.clone()).map_err(|e| BackupError::BadState(e.to_string()))?;
        Ok(Backup { header, state, data: data.to_vec() })
    }

    /// Reads and checks a backup file; the error names the file.
    pub fn read(path: &Path) -> anyhow::Result<Backup> {
        let file = std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Backup::decode(&file).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// One line about what the backup holds.
    pub fn summary(&self) -> String {
        let auth = &self.state.auth;
        format!(
            "log index {}, saved by node {} at {} (Unix time); {} credentials, {} roles, {} revocations, {} audit entries; sha256 {}",
            self.header.log_index,
            self.header.node_id,
            self.header.created,
            auth.credentials.len(),
            auth.roles.len(),
            auth.revocations.len(),
            self.state.audit.len(),
            self.header.sha256,
        )
    }

    /// Installs the backup as the Raft snapshot of a new cluster whose only member is
    /// `node_id`, reached at `node`, in `data_dir` (which must hold no Raft store yet). The
    /// node started on that directory elects itself and serves the restored state; other
    /// nodes join it with `rampart admin cluster add-node`.
    pub async fn restore(&self, data_dir: &Path, node_id: NodeId, node: NodeInfo) -> anyhow::Result<()> {
        let path = data_dir.join("raft");
        if std::fs::read_dir(&path).is_ok_and(|mut entries| entries.next().is_some()) {
            anyhow::bail!(
                "{} already holds a Raft store: restore seeds the first node of a new cluster into an empty data directory \
                 (stop the node and move that directory away first)",
                path.display()
            );
        }
        let installed = self.install(&path, node_id, node).await;
        if installed.is_err() {
            // Created here, where there was none: nothing else is removed.
            let _ = std::fs::remove_dir_all(&path);
        }
        installed
    }

    async fn install(&self, path: &Path, node_id: NodeId, node: NodeInfo) -> anyhow::Result<()> {
        let db =
            sled::Config::new().path(path).open().map_err(|e| anyhow::anyhow!("{}: cannot create the Raft store: {e}", path.display()))?;
        let log_id = LogId::new(CommittedLeaderId::new(RESTORED_TERM, node_id), self.header.log_index);
        let membership = Membership::new(vec![BTreeSet::from([node_id])], BTreeMap::from([(node_id, node)]));
        let meta = SnapshotMeta {
            last_log_id: Some(log_id),
            last_membership: StoredMembership::new(Some(log_id), membership),
            snapshot_id: format!("restored-{}", self.header.log_index),
        };
        let mut state_machine = StateMachine::open(&db, Replica::new(Arc::new(AuthStore::replicated())))?;
        state_machine.install_snapshot(&meta, Box::new(Cursor::new(self.data.clone()))).await?;
        // The vote of the restored term: the first election opens a later one, so the node's
        // new entries follow the snapshot's.
        LogStore::open(&db)?.save_vote(&Vote::new(RESTORED_TERM, node_id)).await?;
        flush(&db).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::state::{AuthState, Role};

    fn state() -> Vec<u8> {
        let mut replicated = Replicated { seeded: true, next_revocation_id: 3, ..Replicated::default() };
        replicated.auth = AuthState { roles: vec![Role { name: "reader".into(), rules: Vec::new() }], ..AuthState::default() };
        serde_json::to_vec(&replicated).unwrap()
    }

    #[test]
    fn a_saved_state_reads_back_with_its_header() {
        let file = encode(42, 2, 1_700_000_000, &state());
        let backup = Backup::decode(&file).unwrap();
        assert_eq!((backup.header.format, backup.header.log_index, backup.header.node_id), (FORMAT_VERSION, 42, 2));
        assert_eq!(backup.header.created, 1_700_000_000);
        assert_eq!(backup.state.auth.roles[0].name, "reader");
        assert_eq!(backup.state.next_revocation_id, 3);
        assert_eq!(backup.data, state());
    }

    #[test]
    fn a_changed_byte_anywhere_after_the_first_line_is_refused() {
        let file = encode(42, 2, 1_700_000_000, &state());
        let last = file.len() - 2;
        let mut in_state = file.clone();
        in_state[last] ^= 0x01;
        assert!(matches!(Backup::decode(&in_state), Err(BackupError::Corrupted { .. })), "{:?}", Backup::decode(&in_state));
        // The index in the header: "log_index":42 becomes 43.
        let at = file.windows(3).position(|w| w == b"42,").unwrap();
        let mut in_header = file.clone();
        in_header[at + 1] = b'3';
        assert!(matches!(Backup::decode(&in_header), Err(BackupError::Corrupted { .. })));
    }

    #[test]
    fn a_newer_format_another_file_or_a_cut_file_is_refused() {
        let file = encode(42, 2, 1_700_000_000, &state());
        let newer = String::from_utf8(file.clone()).unwrap().replacen("\"format\":1,", "\"format\":2,", 1);
        assert_eq!(Backup::decode(newer.as_bytes()).unwrap_err(), BackupError::NewerFormat { found: 2 });
        assert!(Backup::decode(newer.as_bytes()).unwrap_err().to_string().contains("format 2"));
        assert_eq!(Backup::decode(b"[auth]\ncredentials = []\n").unwrap_err(), BackupError::NotABackup);
        let cut = &file[..file.len() - 10];
        assert!(matches!(Backup::decode(cut), Err(BackupError::Truncated { .. })));
    }

    #[test]
    fn a_state_that_does_not_compile_is_refused_even_with_a_good_checksum() {
        let mut replicated = Replicated::default();
        replicated.auth.roles = vec![Role { name: String::new(), rules: Vec::new() }; 2];
        let file = encode(1, 1, 0, &serde_json::to_vec(&replicated).unwrap());
        assert!(matches!(Backup::decode(&file), Err(BackupError::BadState(_))), "{:?}", Backup::decode(&file));
    }

    #[tokio::test]
    async fn a_restored_directory_opens_with_the_state_at_its_index_and_one_member() {
        let dir = tempfile::tempdir().unwrap();
        let backup = Backup::decode(&encode(42, 2, 0, &state())).unwrap();
        let node = NodeInfo { raft_addr: "127.0.0.1:7070".into(), quic_addr: "127.0.0.1:7071".into() };
        backup.restore(dir.path(), 5, node.clone()).await.unwrap();
        let again = backup.restore(dir.path(), 5, node.clone()).await.unwrap_err();
        assert!(again.to_string().contains("already holds a Raft store"), "{again}");

        let db = sled::Config::new().path(dir.path().join("raft")).open().unwrap();
        let replica = Replica::new(Arc::new(AuthStore::replicated()));
        let mut state_machine = StateMachine::open(&db, replica.clone()).unwrap();
        let (applied, membership) = state_machine.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(42));
        assert_eq!(membership.membership().nodes().collect::<Vec<_>>(), vec![(&5, &node)]);
        assert_eq!(replica.export(), (42, state()));
        assert_eq!(LogStore::open(&db).unwrap().read_vote().await.unwrap(), Some(Vote::new(RESTORED_TERM, 5)));
    }
}
