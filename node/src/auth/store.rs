//! The node's current `AuthIndex`: read lock-free by every CONNECT, swapped whole when the state
//! file is re-read (SIGHUP), with a change signal that live connections watch to re-check their
//! client (revoked, disabled, deleted: disconnected; otherwise new permissions apply).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::index::AuthIndex;
use super::state::AuthState;

pub struct AuthStore {
    file: Option<PathBuf>,
    current: ArcSwap<AuthIndex>,
    changed: watch::Sender<u64>,
}

/// Reads and compiles a state file; errors name the file and the key.
pub fn load_state(path: &Path) -> anyhow::Result<AuthIndex> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let state: AuthState = serde_path_to_error::deserialize(toml::Deserializer::new(&text))
        .map_err(|e| anyhow::anyhow!("{}: {}: {}", path.display(), e.path(), e.inner().message()))?;
    AuthIndex::build(state).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

impl AuthStore {
    /// Loads `file` (or no authorization when `None`).
    pub fn open(file: Option<PathBuf>) -> anyhow::Result<AuthStore> {
        let index = match &file {
            Some(path) => load_state(path)?,
            None => AuthIndex::open(),
        };
        Ok(AuthStore { file, current: ArcSwap::from_pointee(index), changed: watch::channel(0).0 })
    }

    pub fn current(&self) -> Arc<AuthIndex> {
        self.current.load_full()
    }

    /// A receiver that changes whenever a new index is in force.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Re-reads the state file; on error the index in force stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let Some(path) = &self.file else { return Ok(()) };
        self.current.store(Arc::new(load_state(path)?));
        self.changed.send_modify(|generation| *generation += 1);
        Ok(())
    }
}
