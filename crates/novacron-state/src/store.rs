//! openraft storage on redb: the Raft log, the vote, and the state machine's rows share one
//! database file, each in its own tables.
//!
//! Layout (all values JSON):
//! - `raft_log`:  log index → entry
//! - `raft_meta`: `vote`, `committed`, `last_purged`
//! - `sm_meta`:   `last_applied`, `membership`, `cluster` (the [`ClusterMeta`])
//! - `sm_rows`:   `vm/<id>`, `image/<id>`, `user/<id>`, `token/<id>`, `op/<id>`, `node/<id>`
//! - `snapshot`:  `meta`, `data` (the latest snapshot)
//!
//! Log appends and state-machine writes run on blocking threads (they may wait for redb's write
//! lock or the disk); other redb calls are short and run on the calling task.
//!
//! Durability: votes, purges and snapshots commit with `Durability::Immediate` (fsync before
//! returning). Log appends commit with `Durability::None`, so the entries are readable at once,
//! and a flusher thread then makes them durable with one durable commit shared by every append
//! that arrived meanwhile, and only then tells openraft they are flushed (openraft counts an
//! entry toward a quorum, and a follower acknowledges it, only after that). The state machine's
//! rows commit with `Durability::None`: after a crash redb rolls back to the last durable
//! commit, which is a consistent older state, and openraft re-applies the durable log from
//! `last_applied`. That keeps one fsync per batch of writes without weakening what Raft relies
//! on. It holds because the log and the
//! state machine share one redb database, and redb makes every earlier non-durable commit durable
//! at the next durable one: the state machine can never roll back behind a purged or
//! snapshotted index. Never move the log into a different file without revisiting this.

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
use crate::raft::{StateEvent, TypeConfig};

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

/// The Raft log and vote. Cheap to clone; clones share the database and the flusher.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    flusher: Arc<Mutex<std::sync::mpsc::Sender<IOFlushed<C>>>>,
}

impl LogStore {
    pub fn new(db: Arc<Database>) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<IOFlushed<C>>();
        let flush_db = db.clone();
        std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || flush_appends(flush_db, rx))
            .unwrap_or_else(|e| panic!("cannot start the log flusher thread: {e}"));
        Self {
            db,
            flusher: Arc::new(Mutex::new(tx)),
        }
    }
}

/// Makes appended entries durable, in order, sharing one fsync among every append that arrived
/// meanwhile (group commit), then tells openraft. Appends themselves commit without fsync, so
/// the leader replicates to followers while its own disk flushes. Ends when the store is dropped.
fn flush_appends(db: Arc<Database>, rx: std::sync::mpsc::Receiver<IOFlushed<C>>) {
    while let Ok(first) = rx.recv() {
        let mut waiting = vec![first];
        while let Ok(more) = rx.try_recv() {
            waiting.push(more);
        }
        // A durable commit makes every earlier non-durable commit durable too. It writes a
        // counter so the commit is never empty.
        let flushed = (|| {
            let txn = db.begin_write().map_err(io_err)?;
            {
                let mut t = txn.open_table(RAFT_META).map_err(io_err)?;
                let n = match t.get("flushes").map_err(io_err)? {
                    Some(v) => from_json::<u64>(v.value())?,
                    None => 0,
                };
                t.insert("flushes", to_json(&(n + 1))?.as_slice())
                    .map_err(io_err)?;
            }
            txn.commit().map_err(io_err)
        })();
        for cb in waiting {
            cb.io_completed(match &flushed {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            });
        }
    }
}

impl RaftLogReader<C> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<C>>, io::Error> {
        let txn = self.db.begin_read().map_err(io_err)?;
        let t = txn.open_table(RAFT_LOG).map_err(io_err)?;
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
        let mut out = Vec::new();
        for row in t.range::<u64>((start, end)).map_err(io_err)? {
            let (_, v) = row.map_err(io_err)?;
            out.push(from_json(v.value())?);
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<C>>, io::Error> {
        get_json(&self.db, RAFT_META, "vote")
    }
}

impl RaftLogStorage<C> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<C>, io::Error> {
        let last_purged: Option<LogIdOf<C>> = get_json(&self.db, RAFT_META, "last_purged")?;
        let txn = self.db.begin_read().map_err(io_err)?;
        let t = txn.open_table(RAFT_LOG).map_err(io_err)?;
        let last = match t.last().map_err(io_err)? {
            Some((_, v)) => {
                let e: EntryOf<C> = from_json(v.value())?;
                Some(e.log_id)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<C>) -> Result<(), io::Error> {
        put_json(&self.db, RAFT_META, "vote", vote, true)
    }

    // `save_committed`/`read_committed` keep openraft's defaults (not stored): storing the
    // committed index cost a redb transaction per commit on every host, and after a restart the
    // leader tells each host what is committed within a heartbeat.

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = EntryOf<C>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let rows: io::Result<Vec<(u64, Vec<u8>)>> = entries
            .into_iter()
            .map(|e| Ok((e.log_id.index, to_json(&e)?)))
            .collect();
        // Readable when this returns (openraft's contract), durable when the flusher says so.
        let db = self.db.clone();
        let result = match rows {
            Err(e) => Err(e),
            Ok(rows) => tokio::task::spawn_blocking(move || {
                let mut txn = db.begin_write().map_err(io_err)?;
                txn.set_durability(Durability::None)
                    .map_err(io::Error::other)?;
                {
                    let mut t = txn.open_table(RAFT_LOG).map_err(io_err)?;
                    for (index, row) in rows {
                        t.insert(index, row.as_slice()).map_err(io_err)?;
                    }
                }
                txn.commit().map_err(io_err)
            })
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e))),
        };
        match result {
            Ok(()) => {
                let sent = self
                    .flusher
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .send(callback);
                if let Err(std::sync::mpsc::SendError(callback)) = sent {
                    let e = io::Error::other("the log flusher stopped");
                    callback.io_completed(Err(io::Error::other("the log flusher stopped")));
                    return Err(e);
                }
                Ok(())
            }
            Err(e) => {
                callback.io_completed(Err(io::Error::new(e.kind(), e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        let from = last_log_id.map(|l| l.index + 1).unwrap_or(0);
        let txn = self.db.begin_write().map_err(io_err)?;
        {
            let mut t = txn.open_table(RAFT_LOG).map_err(io_err)?;
            t.retain_in(from.., |_, _| false).map_err(io_err)?;
        }
        txn.commit().map_err(io_err)
    }

    async fn purge(&mut self, log_id: LogIdOf<C>) -> Result<(), io::Error> {
        let txn = self.db.begin_write().map_err(io_err)?;
        {
            // Record the purge point first, in the same transaction as the deletion.
            let mut m = txn.open_table(RAFT_META).map_err(io_err)?;
            m.insert("last_purged", to_json(&Some(log_id))?.as_slice())
                .map_err(io_err)?;
            let mut t = txn.open_table(RAFT_LOG).map_err(io_err)?;
            t.retain_in(..=log_id.index, |_, _| false).map_err(io_err)?;
        }
        txn.commit().map_err(io_err)
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
