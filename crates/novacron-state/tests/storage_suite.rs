//! openraft's own storage conformance suite, run against our store (log segments + redb).

use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;
use tokio::sync::broadcast;

use novacron_state::TypeConfig;
use novacron_state::store::{LogStore, StateMachineStore, open_database};

struct RedbBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for RedbBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<TypeConfig>> {
        let fail = |e: std::io::Error| StorageError::write(TypeConfig::err_from_error(&e));
        let dir = tempfile::tempdir().map_err(fail)?;
        let db = open_database(&dir.path().join("state.redb")).map_err(fail)?;
        let (events, _) = broadcast::channel(16);
        let sm = StateMachineStore::open(db.clone(), events).map_err(fail)?;
        let log = LogStore::open(db, &dir.path().join("raft-log")).map_err(fail)?;
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redb_store_passes_openraft_storage_suite() {
    Suite::test_all(RedbBuilder).await.expect("storage suite");
}
