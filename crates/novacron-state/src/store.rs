//! openraft storage: the Raft log in append-only segment files ([`crate::wal`], under
//! `DATA/raft-log/`), everything else in one redb database (`DATA/state.redb`).
//!
//! redb layout (all values JSON):
//! - `raft_meta`: `vote`, `last_purged`
//! - `sm_meta`:   `last_applied`, `membership`, `cluster` (the [`ClusterMeta`])
//! - `sm_rows`:   `vm/<id>`, `image/<id>`, `user/<id>`, `token/<id>`, `op/<id>`, `node/<id>`
//! - `snapshot`:  `meta`, `data` (the latest snapshot)
//! - `raft_log`:  empty; read once to move a log written by an older version into the segments
//!
//! Log: every entry not purged is also kept in memory, so replication and apply read no disk.
//! An append puts its entries in memory (readable at once, as openraft requires) and hands their
//! frames to a flusher thread, which writes whatever queued up and syncs once (group commit),
//! and only then tells openraft they are flushed (openraft counts an entry toward a quorum, and a
//! follower acknowledges it, only after that). Truncations are durable when they return.
//!
//! Durability of the rest: votes, purge points and snapshots commit with
//! `Durability::Immediate`. The state machine's rows commit with `Durability::None`: after a
//! crash redb rolls back to the last durable commit, a consistent older state, and openraft
//! re-applies the log from `last_applied`. Two orders make that safe: a purge point is recorded
//! (durably) only after the snapshot that covers it is saved (durably), and segment files are
//! deleted only after the purge point is recorded; so whatever the rows roll back to, the
//! snapshot or the log covers what follows. If the rows end up ahead of the durable log
//! (committed entries this host had not flushed yet), openraft's startup purges up to
//! `last_applied` and the leader sends what follows.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, IOFlushed, RaftLogStorage, RaftStateMachine};
use openraft::type_config::alias::{
    EntryOf, LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf, VoteOf,
};
use openraft::{EntryPayload, LogState, OptionalSend, RaftLogReader, RaftSnapshotBuilder};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::command::{CommandResponse, Touched};
use crate::machine::ClusterState;
use crate::types::{StateEvent, TypeConfig};
use crate::wal::Wal;

type C = TypeConfig;

const RAFT_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const RAFT_META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const SM_META: TableDefinition<&str, &[u8]> = TableDefinition::new("sm_meta");
const SM_ROWS: TableDefinition<&str, &[u8]> = TableDefinition::new("sm_rows");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

/// Version of the snapshot format. Readers accept every version they know.
const SNAPSHOT_FORMAT: u32 = 1;

fn io_err<E: Into<redb::Error>>(e: E) -> io::Error {
    io::Error::other(e.into())
}

fn to_json<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(io::Error::other)
}

fn from_json<T: DeserializeOwned>(b: &[u8]) -> io::Result<T> {
    serde_json::from_slice(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Opens (or creates) the store's database and makes sure every table exists.
pub fn open_database(path: &Path) -> io::Result<Arc<Database>> {
    let db = Database::create(path).map_err(io_err)?;
    let txn = db.begin_write().map_err(io_err)?;
    {
        txn.open_table(RAFT_LOG).map_err(io_err)?;
        txn.open_table(RAFT_META).map_err(io_err)?;
        txn.open_table(SM_META).map_err(io_err)?;
        txn.open_table(SM_ROWS).map_err(io_err)?;
        txn.open_table(SNAPSHOT).map_err(io_err)?;
    }
    txn.commit().map_err(io_err)?;
    Ok(Arc::new(db))
}

fn get_json<T: DeserializeOwned>(
    db: &Database,
    table: TableDefinition<&str, &[u8]>,
    key: &str,
) -> io::Result<Option<T>> {
    let txn = db.begin_read().map_err(io_err)?;
    let t = txn.open_table(table).map_err(io_err)?;
    match t.get(key).map_err(io_err)? {
        Some(v) => Ok(Some(from_json(v.value())?)),
        None => Ok(None),
    }
}

fn put_json<T: Serialize>(
    db: &Database,
    table: TableDefinition<&str, &[u8]>,
    key: &str,
    value: &T,
    durable: bool,
) -> io::Result<()> {
    let mut txn = db.begin_write().map_err(io_err)?;
    if !durable {
        txn.set_durability(Durability::None)
            .map_err(io::Error::other)?;
    }
    {
        let mut t = txn.open_table(table).map_err(io_err)?;
        t.insert(key, to_json(value)?.as_slice()).map_err(io_err)?;
    }
    txn.commit().map_err(io_err)
}

// ---------------------------------------------------------------------------------------------
// Log store

/// Work for the log flusher, in the order openraft asked for it.
enum WalOp {
    Append {
        frames: Vec<(u64, Vec<u8>)>,
        flushed: IOFlushed<C>,
    },
    Truncate {
        from: u64,
        done: tokio::sync::oneshot::Sender<io::Result<()>>,
    },
    Purge {
        upto: u64,
    },
}

/// The entries not purged, in memory, and the last purge point.
#[derive(Default)]
struct LogMemory {
    entries: BTreeMap<u64, EntryOf<C>>,
    last_purged: Option<LogIdOf<C>>,
}

/// The Raft log and vote. Cheap to clone; clones share the memory and the flusher.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    log: Arc<RwLock<LogMemory>>,
    flusher: Arc<Mutex<std::sync::mpsc::Sender<WalOp>>>,
}

impl LogStore {
    /// Opens the log in `dir` (segments) and `db` (vote, purge point), moving a log that an
    /// older version kept in redb into segments first.
    pub fn open(db: Arc<Database>, dir: &Path) -> io::Result<Self> {
        let last_purged: Option<LogIdOf<C>> = get_json(&db, RAFT_META, "last_purged")?.flatten();
        let (mut wal, frames) = Wal::open(dir)?;
        let legacy = legacy_log(&db)?;
        if !legacy.is_empty() {
            if frames.is_empty() {
                for (index, row) in &legacy {
                    wal.append(*index, row)?;
                }
                wal.sync()?;
                tracing::info!(entries = legacy.len(), "moved the Raft log out of redb");
            }
            clear_legacy_log(&db)?;
        }
        let frames = if frames.is_empty() { legacy } else { frames };
        let mut entries = BTreeMap::new();
        let floor = last_purged.map(|l| l.index);
        for (index, payload) in frames {
            if floor.is_some_and(|f| index <= f) {
                continue;
            }
            let entry: EntryOf<C> = from_json(&payload)?;
            entries.insert(index, entry);
        }
        if let Some(f) = floor {
            wal.purge_upto(f)?;
        }
        let (tx, rx) = std::sync::mpsc::channel::<WalOp>();
        std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || flush_log(wal, rx))?;
        Ok(Self {
            db,
            log: Arc::new(RwLock::new(LogMemory {
                entries,
                last_purged,
            })),
            flusher: Arc::new(Mutex::new(tx)),
        })
    }

    fn send(&self, op: WalOp) -> Result<(), WalOp> {
        self.flusher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(op)
            .map_err(|std::sync::mpsc::SendError(op)| op)
    }

    fn memory(&self) -> std::sync::RwLockReadGuard<'_, LogMemory> {
        self.log.read().unwrap_or_else(|p| p.into_inner())
    }

    fn memory_mut(&self) -> std::sync::RwLockWriteGuard<'_, LogMemory> {
        self.log.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Rows of the log as versions before the segment files kept it (in redb).
fn legacy_log(db: &Database) -> io::Result<Vec<(u64, Vec<u8>)>> {
    let txn = db.begin_read().map_err(io_err)?;
    let t = txn.open_table(RAFT_LOG).map_err(io_err)?;
    let mut out = Vec::new();
    for row in t.iter().map_err(io_err)? {
        let (k, v) = row.map_err(io_err)?;
        out.push((k.value(), v.value().to_vec()));
    }
    Ok(out)
}

fn clear_legacy_log(db: &Database) -> io::Result<()> {
    let txn = db.begin_write().map_err(io_err)?;
    {
        let mut t = txn.open_table(RAFT_LOG).map_err(io_err)?;
        t.retain(|_, _| false).map_err(io_err)?;
    }
    txn.commit().map_err(io_err)
}

/// Carries out the log's file work in order, sharing one sync among everything that queued up
/// meanwhile (group commit), then tells openraft. Appends themselves only queue frames, so the
/// leader replicates to followers while its own disk syncs. After an I/O error every later
/// operation fails too (the files' state is unknown). Ends when the store is dropped.
fn flush_log(mut wal: Wal, rx: std::sync::mpsc::Receiver<WalOp>) {
    let mut broken: Option<String> = None;
    while let Ok(first) = rx.recv() {
        let mut flushed = Vec::new();
        let mut truncated = Vec::new();
        let mut next = Some(first);
        while let Some(op) = next {
            let r = match &broken {
                Some(e) => Err(io::Error::other(e.clone())),
                None => match &op {
                    WalOp::Append { frames, .. } => frames
                        .iter()
                        .try_for_each(|(index, frame)| wal.append(*index, frame)),
                    WalOp::Truncate { from, .. } => wal.truncate_from(*from),
                    WalOp::Purge { upto } => wal.purge_upto(*upto),
                },
            };
            if let Err(e) = r {
                broken.get_or_insert_with(|| format!("the Raft log's files failed: {e}"));
            }
            match op {
                WalOp::Append { flushed: cb, .. } => flushed.push(cb),
                WalOp::Truncate { done, .. } => truncated.push(done),
                WalOp::Purge { .. } => {}
            }
            next = rx.try_recv().ok();
        }
        if broken.is_none()
            && let Err(e) = wal.sync()
        {
            broken = Some(format!("the Raft log's files failed: {e}"));
        }
        let result = || match &broken {
            Some(e) => Err(io::Error::other(e.clone())),
            None => Ok(()),
        };
        for cb in flushed {
            cb.io_completed(result());
        }
        for done in truncated {
            let _ = done.send(result());
        }
    }
}

impl RaftLogReader<C> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<C>>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(i) => Bound::Included(*i),
            Bound::Excluded(i) => Bound::Excluded(*i),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(*i),
            Bound::Excluded(i) => Bound::Excluded(*i),
            Bound::Unbounded => Bound::Unbounded,
        };
        Ok(self
            .memory()
            .entries
            .range((start, end))
            .map(|(_, e)| e.clone())
            .collect())
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<C>>, io::Error> {
        get_json(&self.db, RAFT_META, "vote")
    }
}

impl RaftLogStorage<C> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<C>, io::Error> {
        let log = self.memory();
        Ok(LogState {
            last_purged_log_id: log.last_purged,
            last_log_id: log
                .entries
                .last_key_value()
                .map(|(_, e)| e.log_id)
                .or(log.last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<C>) -> Result<(), io::Error> {
        put_json(&self.db, RAFT_META, "vote", vote, true)
    }

    // `save_committed`/`read_committed` keep openraft's defaults (not stored): after a restart
    // the leader tells each host what is committed within a heartbeat.

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = EntryOf<C>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<EntryOf<C>> = entries.into_iter().collect();
        let frames: io::Result<Vec<(u64, Vec<u8>)>> = entries
            .iter()
            .map(|e| Ok((e.log_id.index, to_json(e)?)))
            .collect();
        let frames = match frames {
            Ok(f) => f,
            Err(e) => {
                callback.io_completed(Err(io::Error::new(e.kind(), e.to_string())));
                return Err(e);
            }
        };
        // Readable when this returns (openraft's contract), durable when the flusher says so.
        self.memory_mut()
            .entries
            .extend(entries.into_iter().map(|e| (e.log_id.index, e)));
        if let Err(WalOp::Append { flushed, .. }) = self.send(WalOp::Append {
            frames,
            flushed: callback,
        }) {
            flushed.io_completed(Err(io::Error::other("the log flusher stopped")));
            return Err(io::Error::other("the log flusher stopped"));
        }
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        let from = last_log_id.map(|l| l.index + 1).unwrap_or(0);
        self.memory_mut().entries.split_off(&from);
        let (done, answer) = tokio::sync::oneshot::channel();
        self.send(WalOp::Truncate { from, done })
            .map_err(|_| io::Error::other("the log flusher stopped"))?;
        answer
            .await
            .map_err(|_| io::Error::other("the log flusher stopped"))?
    }

    async fn purge(&mut self, log_id: LogIdOf<C>) -> Result<(), io::Error> {
        // The purge point first (durably), then memory, then the files.
        put_json(&self.db, RAFT_META, "last_purged", &Some(log_id), true)?;
        {
            let mut log = self.memory_mut();
            let keep = log.entries.split_off(&(log_id.index + 1));
            log.entries = keep;
            log.last_purged = Some(log_id);
        }
        self.send(WalOp::Purge { upto: log_id.index })
            .map_err(|_| io::Error::other("the log flusher stopped"))
    }
}

// ---------------------------------------------------------------------------------------------
// State machine

/// The state machine's in-memory view; the redb rows mirror it.
#[derive(Default)]
pub struct Applied {
    pub state: ClusterState,
    pub last_applied: Option<LogIdOf<C>>,
    pub membership: StoredMembershipOf<C>,
}

#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    format: u32,
    last_applied: Option<LogIdOf<C>>,
    membership: StoredMembershipOf<C>,
    state: ClusterState,
}

#[derive(Clone)]
struct StoredSnapshot {
    meta: SnapshotMetaOf<C>,
    data: Vec<u8>,
}

/// The state machine. Clones share everything; the server keeps one to read state.
#[derive(Clone)]
pub struct StateMachineStore {
    db: Arc<Database>,
    applied: Arc<RwLock<Applied>>,
    snapshot: Arc<RwLock<Option<StoredSnapshot>>>,
    events: broadcast::Sender<StateEvent>,
    persister: Arc<Mutex<std::sync::mpsc::Sender<Persist>>>,
}

/// Work for the row persister.
enum Persist {
    /// These rows changed (their values are read from the state when written).
    Rows(Vec<Touched>),
    /// Answered once everything sent before it is written.
    Barrier(tokio::sync::oneshot::Sender<()>),
}

/// Writes applied rows in the background, merging whatever queued up into one transaction.
/// Rows are never fsynced (see the module doc), so this only has to keep them in order: a
/// crash loses at most what the log re-applies. Ends when the store is dropped.
fn persist_rows(
    db: Arc<Database>,
    applied: Arc<RwLock<Applied>>,
    rx: std::sync::mpsc::Receiver<Persist>,
) {
    while let Ok(first) = rx.recv() {
        // `apply` sends its touched rows while it still holds the write lock. So, with the read
        // lock held, the queue holds the rows of every change the state reflects: drain it now
        // and the rows written match the applied index written with them.
        let guard = applied.read().unwrap_or_else(|p| p.into_inner());
        let mut touched = std::collections::BTreeSet::new();
        let mut changed = false;
        let mut barriers = Vec::new();
        let mut next = Some(first);
        while let Some(msg) = next {
            match msg {
                Persist::Rows(t) => {
                    changed = true;
                    touched.extend(t);
                }
                Persist::Barrier(tx) => barriers.push(tx),
            }
            next = rx.try_recv().ok();
        }
        let batch = changed.then(|| {
            let touched: Vec<Touched> = touched.into_iter().collect();
            RowBatch::prepare(&guard, &touched)
        });
        drop(guard);
        if let Some(batch) = batch
            && let Err(e) = batch.and_then(|b| b.write(&db, false, false, None))
        {
            tracing::error!("writing state rows: {e} (the log will re-apply them after a restart)");
        }
        for b in barriers {
            let _ = b.send(());
        }
    }
}

fn row_key(t: &Touched) -> String {
    match t {
        Touched::Meta => "meta".to_string(),
        Touched::Node(id) => format!("node/{id}"),
        Touched::Vm(id) => format!("vm/{id}"),
        Touched::Image(id) => format!("image/{id}"),
        Touched::User(id) => format!("user/{id}"),
        Touched::Token(id) => format!("token/{id}"),
        Touched::Operation(id) => format!("op/{id}"),
        Touched::Pool(name) => format!("pool/{name}"),
        Touched::Volume(id) => format!("volume/{id}"),
    }
}

/// The current JSON of a row, or `None` when the entity no longer exists.
fn row_value(s: &ClusterState, t: &Touched) -> io::Result<Option<Vec<u8>>> {
    Ok(match t {
        Touched::Meta => Some(to_json(&s.meta)?),
        Touched::Node(id) => s.nodes.get(id).map(to_json).transpose()?,
        Touched::Vm(id) => s.vms.get(id).map(to_json).transpose()?,
        Touched::Image(id) => s.images.get(id).map(to_json).transpose()?,
        Touched::User(id) => s.users.get(id).map(to_json).transpose()?,
        Touched::Token(id) => s.tokens.get(id).map(to_json).transpose()?,
        Touched::Operation(id) => s.operations.get(id).map(to_json).transpose()?,
        Touched::Pool(name) => s.pools.get(name).map(to_json).transpose()?,
        Touched::Volume(id) => s.volumes.get(id).map(to_json).transpose()?,
    })
}

fn load_rows(db: &Database) -> io::Result<ClusterState> {
    let mut s = ClusterState::default();
    let txn = db.begin_read().map_err(io_err)?;
    let t = txn.open_table(SM_ROWS).map_err(io_err)?;
    for row in t.iter().map_err(io_err)? {
        let (k, v) = row.map_err(io_err)?;
        let key = k.value();
        let v = v.value();
        match key.split_once('/') {
            None if key == "meta" => s.meta = from_json(v)?,
            Some(("node", _)) => {
                let n: novacron_types::NodeInfo = from_json(v)?;
                s.nodes.insert(n.id.0, n);
            }
            Some(("vm", _)) => {
                let vm: novacron_types::Vm = from_json(v)?;
                s.vms.insert(vm.id, vm);
            }
            Some(("image", _)) => {
                let i: novacron_types::Image = from_json(v)?;
                s.images.insert(i.id, i);
            }
            Some(("user", _)) => {
                let u: novacron_types::User = from_json(v)?;
                s.users.insert(u.id, u);
            }
            Some(("token", _)) => {
                let t: novacron_types::ApiToken = from_json(v)?;
                s.tokens.insert(t.id, t);
            }
            Some(("op", _)) => {
                let o: novacron_types::Operation = from_json(v)?;
                s.operations.insert(o.id, o);
            }
            Some(("pool", _)) => {
                let p: novacron_types::StoragePool = from_json(v)?;
                s.pools.insert(p.name.clone(), p);
            }
            Some(("volume", _)) => {
                let v: novacron_types::Volume = from_json(v)?;
                s.volumes.insert(v.id, v);
            }
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unknown state row '{key}'"),
                ));
            }
        }
    }
    Ok(s)
}

/// Rows serialized from the state (under its lock), written later (without it).
struct RowBatch {
    rows: Vec<(String, Option<Vec<u8>>)>,
    last_applied: Vec<u8>,
    membership: Vec<u8>,
}

impl RowBatch {
    fn prepare(applied: &Applied, touched: &[Touched]) -> io::Result<Self> {
        Ok(Self {
            rows: touched
                .iter()
                .map(|t| Ok((row_key(t), row_value(&applied.state, t)?)))
                .collect::<io::Result<_>>()?,
            last_applied: to_json(&applied.last_applied)?,
            membership: to_json(&applied.membership)?,
        })
    }

    fn write(
        &self,
        db: &Database,
        durable: bool,
        replace: bool,
        snapshot: Option<&StoredSnapshot>,
    ) -> io::Result<()> {
        let mut txn = db.begin_write().map_err(io_err)?;
        if !durable {
            txn.set_durability(Durability::None)
                .map_err(io::Error::other)?;
        }
        {
            let mut rows = txn.open_table(SM_ROWS).map_err(io_err)?;
            if replace {
                rows.retain(|_, _| false).map_err(io_err)?;
            }
            for (key, value) in &self.rows {
                match value {
                    Some(v) => {
                        rows.insert(key.as_str(), v.as_slice()).map_err(io_err)?;
                    }
                    None => {
                        rows.remove(key.as_str()).map_err(io_err)?;
                    }
                }
            }
            let mut meta = txn.open_table(SM_META).map_err(io_err)?;
            meta.insert("last_applied", self.last_applied.as_slice())
                .map_err(io_err)?;
            meta.insert("membership", self.membership.as_slice())
                .map_err(io_err)?;
        }
        if let Some(snap) = snapshot {
            let mut t = txn.open_table(SNAPSHOT).map_err(io_err)?;
            t.insert("meta", to_json(&snap.meta)?.as_slice())
                .map_err(io_err)?;
            t.insert("data", snap.data.as_slice()).map_err(io_err)?;
        }
        txn.commit().map_err(io_err)
    }
}

impl StateMachineStore {
    /// Loads the state machine from its rows.
    pub fn open(db: Arc<Database>, events: broadcast::Sender<StateEvent>) -> io::Result<Self> {
        let state = load_rows(&db)?;
        let last_applied = get_json::<Option<LogIdOf<C>>>(&db, SM_META, "last_applied")?.flatten();
        let membership = get_json(&db, SM_META, "membership")?.unwrap_or_default();
        let snap_meta: Option<SnapshotMetaOf<C>> = get_json(&db, SNAPSHOT, "meta")?;
        let snapshot = match snap_meta {
            Some(meta) => {
                let txn = db.begin_read().map_err(io_err)?;
                let t = txn.open_table(SNAPSHOT).map_err(io_err)?;
                let data = t
                    .get("data")
                    .map_err(io_err)?
                    .map(|v| v.value().to_vec())
                    .unwrap_or_default();
                Some(StoredSnapshot { meta, data })
            }
            None => None,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let applied = Arc::new(RwLock::new(Applied {
            state,
            last_applied,
            membership,
        }));
        let (persist_db, persist_applied) = (db.clone(), applied.clone());
        std::thread::Builder::new()
            .name("state-rows".into())
            .spawn(move || persist_rows(persist_db, persist_applied, rx))?;
        Ok(Self {
            db,
            applied,
            snapshot: Arc::new(RwLock::new(snapshot)),
            events,
            persister: Arc::new(Mutex::new(tx)),
        })
    }

    /// Waits until every row batch sent so far is written.
    async fn rows_written(&self) -> io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.persister
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Persist::Barrier(tx))
            .map_err(|_| io::Error::other("the row persister stopped"))?;
        rx.await
            .map_err(|_| io::Error::other("the row persister stopped"))
    }

    /// Runs `f` on the current state. Never call back into the store from `f`.
    pub fn read<T>(&self, f: impl FnOnce(&Applied) -> T) -> T {
        let guard = self.applied.read().unwrap_or_else(|p| p.into_inner());
        f(&guard)
    }

    /// Writes the touched rows (after clearing all rows, if `replace`) and the applied state, in
    /// one transaction.
    fn write_rows(
        &self,
        applied: &Applied,
        touched: &[Touched],
        durable: bool,
        replace: bool,
        snapshot: Option<&StoredSnapshot>,
    ) -> io::Result<()> {
        let batch = RowBatch::prepare(applied, touched)?;
        batch.write(&self.db, durable, replace, snapshot)
    }

    /// Replaces every row with `applied`'s, in one durable transaction.
    fn persist_all(&self, applied: &Applied, snapshot: Option<&StoredSnapshot>) -> io::Result<()> {
        let s = &applied.state;
        let mut all = vec![Touched::Meta];
        all.extend(s.nodes.keys().map(|k| Touched::Node(*k)));
        all.extend(s.vms.keys().map(|k| Touched::Vm(*k)));
        all.extend(s.images.keys().map(|k| Touched::Image(*k)));
        all.extend(s.users.keys().map(|k| Touched::User(*k)));
        all.extend(s.tokens.keys().map(|k| Touched::Token(*k)));
        all.extend(s.operations.keys().map(|k| Touched::Operation(*k)));
        all.extend(s.pools.keys().map(|k| Touched::Pool(k.clone())));
        all.extend(s.volumes.keys().map(|k| Touched::Volume(*k)));
        self.write_rows(applied, &all, true, true, snapshot)
    }

    fn save_snapshot(&self, snap: &StoredSnapshot) -> io::Result<()> {
        let txn = self.db.begin_write().map_err(io_err)?;
        {
            let mut t = txn.open_table(SNAPSHOT).map_err(io_err)?;
            t.insert("meta", to_json(&snap.meta)?.as_slice())
                .map_err(io_err)?;
            t.insert("data", snap.data.as_slice()).map_err(io_err)?;
        }
        txn.commit().map_err(io_err)?;
        *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = Some(snap.clone());
        Ok(())
    }
}

impl RaftSnapshotBuilder<C> for StateMachineStore {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<C, Vec<u8>>, io::Error> {
        let (file, meta) = self.read(|a| {
            let meta = SnapshotMetaOf::<C> {
                last_log_id: a.last_applied,
                last_membership: a.membership.clone(),
            };
            let file = SnapshotFile {
                format: SNAPSHOT_FORMAT,
                last_applied: a.last_applied,
                membership: a.membership.clone(),
                state: a.state.clone(),
            };
            (file, meta)
        });
        let data = to_json(&file)?;
        let snap = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        self.save_snapshot(&snap)?;
        Ok(SnapshotOf::<C, Vec<u8>> {
            meta,
            snapshot: data,
        })
    }
}

impl RaftStateMachine<C> for StateMachineStore {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogIdOf<C>>, StoredMembershipOf<C>), io::Error> {
        Ok(self.read(|a| (a.last_applied, a.membership.clone())))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<C>, io::Error>> + Unpin + OptionalSend,
    {
        // Take the whole batch first (the stream is async; the state lock is not held across
        // awaits), apply it in memory, hand the touched rows to the persister, then answer.
        let mut batch = Vec::new();
        while let Some(item) = entries.try_next().await? {
            batch.push(item);
        }
        let mut responses = Vec::with_capacity(batch.len());
        let mut touched_all = Vec::new();
        let mut last_index = None;
        {
            let mut guard = self.applied.write().unwrap_or_else(|p| p.into_inner());
            let applied = &mut *guard;
            for (entry, responder) in batch {
                applied.last_applied = Some(entry.log_id);
                last_index = Some(entry.log_id.index);
                let response = match entry.payload {
                    EntryPayload::Blank => CommandResponse::ok(),
                    EntryPayload::Normal(cmd) => {
                        let (resp, touched) = applied.state.apply(&cmd);
                        touched_all.extend(touched);
                        resp
                    }
                    EntryPayload::Membership(m) => {
                        applied.membership = StoredMembershipOf::<C>::new(Some(entry.log_id), m);
                        CommandResponse::ok()
                    }
                };
                responses.push((responder, response));
            }
            touched_all.sort();
            touched_all.dedup();
            // Written in the background; sent under the write lock (see `persist_rows`).
            // Readers already see the new state (rows are not fsynced anyway: module doc).
            self.persister
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .send(Persist::Rows(touched_all.clone()))
                .map_err(|_| io::Error::other("the row persister stopped"))?;
        }
        for (responder, response) in responses {
            if let Some(r) = responder {
                r.send(response);
            }
        }
        if let Some(index) = last_index {
            // Nobody listening is fine.
            let _ = self.events.send(StateEvent::Applied {
                index,
                touched: Arc::new(touched_all),
            });
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<C>,
        snapshot: Vec<u8>,
    ) -> Result<(), io::Error> {
        let file: SnapshotFile = from_json(&snapshot)?;
        if file.format > SNAPSHOT_FORMAT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "snapshot format {} is newer than this binary knows",
                    file.format
                ),
            ));
        }
        let applied = Applied {
            state: file.state,
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        let snap = StoredSnapshot {
            meta: meta.clone(),
            data: snapshot,
        };
        // Rows, applied index and the snapshot itself in one durable transaction; memory after.
        // Older row batches first, so none lands on top of the snapshot.
        self.rows_written().await?;
        self.persist_all(&applied, Some(&snap))?;
        *self.applied.write().unwrap_or_else(|p| p.into_inner()) = applied;
        *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = Some(snap);
        let index = meta.last_log_id.map(|l| l.index).unwrap_or(0);
        let _ = self.events.send(StateEvent::SnapshotInstalled { index });
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<SnapshotOf<C, Vec<u8>>>, io::Error> {
        let snap = self
            .snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Ok(snap.map(|s| SnapshotOf::<C, Vec<u8>> {
            meta: s.meta,
            snapshot: s.data,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::testing::blank_ent;

    async fn entries(log: &mut LogStore) -> Vec<u64> {
        log.try_get_log_entries(..)
            .await
            .expect("log store")
            .iter()
            .map(|e| e.log_id.index)
            .collect()
    }

    #[tokio::test]
    async fn a_log_kept_in_redb_by_an_older_version_moves_into_segments() {
        let dir = tempfile::tempdir().expect("log store");
        let db = open_database(&dir.path().join("state.redb")).expect("log store");
        {
            let txn = db.begin_write().expect("log store");
            {
                let mut t = txn.open_table(RAFT_LOG).expect("log store");
                for i in 1..=5 {
                    let row = to_json(&blank_ent::<C>(1, 1, i)).expect("log store");
                    t.insert(i, row.as_slice()).expect("log store");
                }
            }
            txn.commit().expect("log store");
        }
        let log_dir = dir.path().join("raft-log");
        let mut log = LogStore::open(db.clone(), &log_dir).expect("log store");
        assert_eq!(entries(&mut log).await, vec![1, 2, 3, 4, 5]);
        assert!(
            legacy_log(&db).expect("log store").is_empty(),
            "redb's copy is cleared"
        );
        let state = log.get_log_state().await.expect("log store");
        assert_eq!(state.last_log_id.map(|l| l.index), Some(5));
        drop(log);
        // Opened again: the entries come from the segments now.
        let mut log = LogStore::open(db, &log_dir).expect("log store");
        assert_eq!(entries(&mut log).await, vec![1, 2, 3, 4, 5]);
    }

    #[tokio::test]
    async fn purged_entries_stay_purged_after_reopening() {
        let dir = tempfile::tempdir().expect("log store");
        let db = open_database(&dir.path().join("state.redb")).expect("log store");
        let log_dir = dir.path().join("raft-log");
        let mut log = LogStore::open(db.clone(), &log_dir).expect("log store");
        use openraft::type_config::TypeConfigExt;
        let (tx, rx) = C::oneshot();
        let flushed = IOFlushed::<C>::signal(tx);
        log.append((1..=10).map(|i| blank_ent::<C>(1, 1, i)), flushed)
            .await
            .expect("log store");
        rx.await.expect("log store").expect("log store");
        log.purge(openraft::testing::log_id::<C>(1, 1, 4))
            .await
            .expect("log store");
        log.truncate_after(Some(openraft::testing::log_id::<C>(1, 1, 8)))
            .await
            .expect("log store");
        drop(log);
        let mut log = LogStore::open(db, &log_dir).expect("log store");
        assert_eq!(entries(&mut log).await, vec![5, 6, 7, 8]);
        let state = log.get_log_state().await.expect("log store");
        assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(4));
    }
}
