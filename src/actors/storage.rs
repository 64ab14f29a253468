//! `StorageActor`: the single writer of the image files and of the state machine's RocksDB
//! keys (applied index, volume table, block checksums). It applies committed entries in index
//! order, answers the proposals among them, publishes the volume table to readers through the
//! [`VolumeRegistry`], and checkpoints: fdatasync the images, then record the applied index.
//!
//! Runs on its own arbiter (thread): applying and checkpointing block on disk I/O.
//!
//! On a restart after a crash it reopens the state machine from RocksDB (its applied index
//! falls back to the durable one) and tells the Raft actor, which re-delivers the committed
//! entries after it from the log. Entries it is handed that it already applied are skipped;
//! a gap before an entry is filled from the log. Either way entries are applied exactly in
//! index order.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use parking_lot::RwLock;

use super::messages::*;
use super::raft::ReadGate;
use super::supervisor::{run_guarded, Supervision};
use crate::config::StorageConfig;
use crate::storage::apply::apply_committed;
use crate::storage::raft_log::RaftLogStore;
use crate::storage::snapshot::SnapshotSource;
use crate::storage::state_machine::{CheckpointTicket, StateMachine, VolumeInfo, VolumeReader};
use crate::storage::StorageError;

/// The volume table as seen by readers (NBD sessions, the handshake's export list, the control
/// API): name → reader. Only the storage actor changes it.
#[derive(Clone, Default)]
pub struct VolumeRegistry {
    volumes: Arc<RwLock<BTreeMap<String, VolumeReader>>>,
}

impl VolumeRegistry {
    pub fn get(&self, name: &str) -> Option<VolumeReader> {
        self.volumes.read().get(name).cloned()
    }

    pub fn list(&self) -> Vec<VolumeInfo> {
        self.volumes
            .read()
            .values()
            .map(|reader| reader.info().clone())
            .collect()
    }

    /// The reader of the volume with this id (ids never change; names may be reused).
    pub fn get_by_id(&self, volume_id: u64) -> Option<VolumeReader> {
        self.volumes
            .read()
            .values()
            .find(|reader| reader.info().id == volume_id)
            .cloned()
    }

    pub fn names(&self) -> Vec<String> {
        self.volumes.read().keys().cloned().collect()
    }

    fn replace_all(&self, machine: &StateMachine) {
        let mut table = BTreeMap::new();
        for info in machine.volumes() {
            if let Some(reader) = machine.reader(info.id) {
                table.insert(info.name.clone(), reader);
            }
        }
        *self.volumes.write() = table;
    }
}

pub struct StorageActorParams {
    pub group_id: u64,
    pub data_dir: PathBuf,
    pub db: Arc<rocksdb::DB>,
    pub config: StorageConfig,
    pub log_store: RaftLogStore,
    pub registry: VolumeRegistry,
    /// Published applied index: read by the Raft actor at every Ready and tick, and when it
    /// (re)builds its node.
    pub applied_index: Arc<AtomicU64>,
    /// The Raft actor wants `AppliedUpTo` once the applied index reaches this.
    pub applied_wanted: Arc<AtomicU64>,
    /// Closed by this actor while a restarted instance replays (see [`ReadGate`]).
    pub read_gate: ReadGate,
    pub supervision: Supervision,
}

pub struct StorageActor {
    params: StorageActorParams,
    machine: Option<StateMachine>,
    raft: Option<RaftLink>,
    bytes_since_checkpoint: u64,
    /// The id of the background checkpoint whose fdatasync is running (at most one at a time).
    checkpoint_in_flight: Option<u64>,
    /// Ids tell a checkpoint of this instance from one started before a restart.
    checkpoint_ids: u64,
    /// The highest applied index this process made durable; kept across restarts, so that a
    /// state machine reopened below it (durable state went backwards) is caught as corruption.
    durable_applied_index_max: u64,
    /// After a restart: the index the previous instance had applied. Until the replay reaches
    /// it the images may hold older versions of blocks than reads were already shown, so the
    /// read gate stays closed (reads take a barrier, which waits for the applied index).
    replay_until: Option<u64>,
}

/// Wires the Raft actor in once both actors exist (each needs the other).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ConnectRaft(pub RaftLink);

impl StorageActor {
    pub fn new(params: StorageActorParams) -> Self {
        StorageActor {
            params,
            machine: None,
            raft: None,
            bytes_since_checkpoint: 0,
            checkpoint_in_flight: None,
            checkpoint_ids: 0,
            durable_applied_index_max: 0,
            replay_until: None,
        }
    }

    /// Opens the read gate again once the replay after a restart has caught up.
    fn note_replay_progress(&mut self) {
        let Some(target) = self.replay_until else {
            return;
        };
        let applied_index = self.machine.as_ref().map_or(0, StateMachine::applied_index);
        if applied_index >= target {
            self.replay_until = None;
            self.params.read_gate.set_storage_replaying(false);
            slog::info!(self.params.supervision.logger, "replay after the restart caught up";
                "applied_index" => applied_index);
        }
    }

    fn open_machine(&mut self) {
        let images_dir = self.params.data_dir.join("images");
        let machine =
            match StateMachine::open(self.params.db.clone(), &images_dir, self.params.group_id) {
                Ok(machine) => machine,
                // Nothing can be served without the state machine; the supervisor retries.
                Err(error) => panic!("cannot open the state machine: {error}"),
            };
        if machine.applied_index() < self.durable_applied_index_max {
            // Durable state lost entries it had recorded: restarting cannot repair that, and
            // serving from it would undo acknowledged writes. Exit; see ARCHITECTURE.md.
            let reason = format!(
                "corruption: the applied index went backwards from {} to {}",
                self.durable_applied_index_max,
                machine.applied_index()
            );
            self.params.supervision.counters.escalate(reason.clone());
            panic!("{reason}");
        }
        self.params
            .applied_index
            .store(machine.applied_index(), Ordering::SeqCst);
        self.params.registry.replace_all(&machine);
        slog::info!(self.params.supervision.logger, "state machine opened";
            "applied_index" => machine.applied_index(),
            "volumes" => machine.volumes().len());
        self.machine = Some(machine);
        self.bytes_since_checkpoint = 0;
        self.note_replay_progress();
    }

    /// Drops the state machine, to open it again from RocksDB and the images (a restart, or
    /// a failed snapshot install, after which the one in memory may not match the disk).
    /// Reads skip no barrier until the replay has caught up with what this one applied (and
    /// what reads may have seen), and every reader it handed out fails from now on with
    /// `VolumeReplaced`, so that its session takes the new state machine's reader instead of
    /// reading images the new one rewrites without its locks. Both before the new state
    /// machine exists.
    fn drop_machine(&mut self) {
        let applied_index = self.params.applied_index.load(Ordering::SeqCst);
        self.replay_until = Some(self.replay_until.unwrap_or(0).max(applied_index));
        self.params.read_gate.set_storage_replaying(true);
        if let Some(machine) = self.machine.take() {
            machine.retire_readers();
        }
        // A background checkpoint still running reports to the new state machine's actor,
        // which ignores it by its id (its ticket belongs to the old state machine).
        self.checkpoint_in_flight = None;
    }

    fn machine(&mut self) -> &mut StateMachine {
        // Invariant: `started` opens the machine before any message is handled.
        self.machine
            .as_mut()
            .expect("state machine is opened in started()")
    }

    fn announce_started(&mut self) {
        let applied_index = self.machine().applied_index();
        if let Some(raft) = &self.raft {
            raft.storage_started
                .do_send(StorageStarted { applied_index });
        }
    }

    fn apply_committed(&mut self, msg: ApplyCommitted, ctx: &mut Context<Self>) {
        let ApplyCommitted {
            entries,
            responders,
        } = msg;
        let first_index = entries.first().map(|entry| entry.index);
        let log_store = self.params.log_store.clone();
        let applied = match apply_committed(self.machine(), &log_store, entries, responders) {
            Ok(applied) => applied,
            Err((error, responders)) => {
                // An I/O error while applying: fail nothing for good, restart and replay.
                slog::error!(self.params.supervision.logger, "applying committed entries failed";
                    "error" => %error, "first_index" => first_index);
                for responder in responders {
                    let _ = responder.send(Err(ProposalError::Storage(error.clone())));
                }
                panic!("apply failed: {error}");
            }
        };
        for (responder, answer) in applied.replies {
            let _ = responder.send(answer);
        }
        if applied.volumes_changed {
            let machine = self.machine.as_ref().expect("opened in started()");
            self.params.registry.replace_all(machine);
        }
        let applied_bytes = applied.applied_bytes;
        let applied_index = self.machine().applied_index();
        self.params
            .applied_index
            .store(applied_index, Ordering::SeqCst);
        if applied_index >= self.params.applied_wanted.load(Ordering::SeqCst) {
            if let Some(raft) = &self.raft {
                raft.applied_up_to.do_send(AppliedUpTo);
            }
        }
        self.note_replay_progress();
        self.bytes_since_checkpoint += applied_bytes;
        if self.bytes_since_checkpoint >= self.params.config.checkpoint_bytes {
            self.start_background_checkpoint(ctx);
        }
    }

    /// Starts a checkpoint whose fdatasync runs on the blocking pool, so applying (and thus
    /// every write's acknowledgement) never waits for the images to reach the disk.
    fn start_background_checkpoint(&mut self, ctx: &mut Context<Self>) {
        if self.checkpoint_in_flight.is_some() {
            return;
        }
        let Some(ticket) = self.machine().begin_checkpoint() else {
            return;
        };
        self.checkpoint_ids += 1;
        let checkpoint_id = self.checkpoint_ids;
        self.checkpoint_in_flight = Some(checkpoint_id);
        self.bytes_since_checkpoint = 0;
        let address = ctx.address();
        let logger = self.params.supervision.logger.clone();
        actix_rt::spawn(async move {
            let result = tokio::task::spawn_blocking(move || {
                let started_at = std::time::Instant::now();
                let result = ticket.sync_images();
                crate::logging::record_fsync(&logger, started_at.elapsed());
                (ticket, result)
            })
            .await;
            if let Ok((ticket, result)) = result {
                address.do_send(CheckpointSynced {
                    checkpoint_id,
                    ticket,
                    result,
                });
            }
        });
    }

    fn finish_background_checkpoint(&mut self, msg: CheckpointSynced) {
        self.checkpoint_in_flight = None;
        if let Err(error) = msg.result {
            self.machine().abort_checkpoint(msg.ticket);
            // The image data is not known to be on disk: nothing may be recorded, and the
            // state in memory cannot be trusted to match the disk. Restart and replay.
            panic!("fdatasync of the images failed: {error}");
        }
        let durable_index = match self.machine().finish_checkpoint(msg.ticket) {
            Ok(index) => index,
            Err(error) => panic!("recording the applied index failed: {error}"),
        };
        self.durable_applied_index_max = self.durable_applied_index_max.max(durable_index);
        if let Some(raft) = &self.raft {
            raft.durable_applied.do_send(DurableApplied {
                index: durable_index,
            });
        }
    }

    /// fdatasync the images, then record the applied index (the durability rule), and let the
    /// Raft actor compact the log below it.
    fn checkpoint(&mut self) -> u64 {
        let started_at = std::time::Instant::now();
        let durable_index = match self.machine().make_durable() {
            Ok(index) => index,
            Err(error) => panic!("checkpoint failed: {error}"),
        };
        crate::logging::record_fsync(&self.params.supervision.logger, started_at.elapsed());
        self.bytes_since_checkpoint = 0;
        self.durable_applied_index_max = self.durable_applied_index_max.max(durable_index);
        if let Some(raft) = &self.raft {
            raft.durable_applied.do_send(DurableApplied {
                index: durable_index,
            });
        }
        durable_index
    }

    fn guarded<R>(
        &mut self,
        ctx: &mut Context<Self>,
        body: impl FnOnce(&mut Self, &mut Context<Self>) -> R,
    ) -> Option<R> {
        let supervision = self.params.supervision.clone();
        run_guarded(&supervision, ctx, |ctx| body(self, ctx))
    }
}

impl StorageActor {
    /// How the Raft actor and the peer transport address this actor.
    pub fn link(address: &Addr<StorageActor>) -> StorageLink {
        StorageLink {
            apply: address.clone().recipient(),
            install: address.clone().recipient(),
            open_snapshot: address.clone().recipient(),
        }
    }
}

impl Actor for StorageActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.open_machine();
        self.announce_started();
        let interval = Duration::from_millis(self.params.config.checkpoint_interval_ms);
        ctx.run_interval(interval, |_, ctx| ctx.notify(CheckpointTick));
    }
}

impl actix::Supervised for StorageActor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        // `started` reopens from RocksDB and the images.
        self.drop_machine();
    }
}

impl Handler<ConnectRaft> for StorageActor {
    type Result = ();
    fn handle(&mut self, msg: ConnectRaft, ctx: &mut Context<Self>) {
        self.raft = Some(msg.0);
        self.guarded(ctx, |actor, _| actor.announce_started());
    }
}

impl Handler<ApplyCommitted> for StorageActor {
    type Result = ();
    fn handle(&mut self, msg: ApplyCommitted, ctx: &mut Context<Self>) {
        self.guarded(ctx, |actor, ctx| {
            fail::fail_point!("storage_actor_apply", |_| {
                panic!("failpoint storage_actor_apply");
            });
            actor.apply_committed(msg, ctx)
        });
    }
}

impl Handler<Checkpoint> for StorageActor {
    type Result = Result<u64, StorageRequestError>;
    fn handle(&mut self, _: Checkpoint, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, |actor, _| actor.checkpoint())
            .ok_or(StorageRequestError::Crashed("checkpointing"))
    }
}

impl Handler<OpenSnapshotSource> for StorageActor {
    type Result = Result<SnapshotSource, StorageRequestError>;
    fn handle(&mut self, _: OpenSnapshotSource, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, |actor, _| Ok(actor.machine().snapshot_source()?))
            .unwrap_or(Err(StorageRequestError::Crashed("opening a snapshot")))
    }
}

impl Handler<InstallSnapshot> for StorageActor {
    type Result = Result<(), StorageRequestError>;
    fn handle(&mut self, msg: InstallSnapshot, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, |actor, _| {
            let log_store = actor.params.log_store.clone();
            // A background checkpoint of the old images must not record anything after the
            // switch; the install records its own applied index durably.
            actor.checkpoint_in_flight = None;
            let installed = actor.machine().install_snapshot(
                msg.staged,
                &log_store,
                &msg.metadata,
                &msg.members,
            );
            if let Err(error) = installed {
                // On disk either the old state or the new one is complete, but the state
                // machine in memory may match neither: open it again (and replay), as after a
                // crash. The Raft actor restarts too and is sent the snapshot again.
                slog::error!(actor.params.supervision.logger, "installing a snapshot failed";
                    "error" => %error, "index" => msg.metadata.index);
                actor.drop_machine();
                actor.open_machine();
                actor.announce_started();
                return Err(error.into());
            }
            let machine = actor.machine.as_ref().expect("opened in started()");
            actor.params.registry.replace_all(machine);
            let applied_index = machine.applied_index();
            let volumes = machine.volumes().len();
            actor
                .params
                .applied_index
                .store(applied_index, Ordering::SeqCst);
            actor.bytes_since_checkpoint = 0;
            actor.note_replay_progress();
            slog::info!(actor.params.supervision.logger, "snapshot installed";
                "applied_index" => applied_index, "volumes" => volumes);
            Ok(())
        })
        .unwrap_or(Err(StorageRequestError::Crashed("installing a snapshot")))
    }
}

/// Control API → storage actor: a digest of this node's copy of a volume, at this node's
/// applied index, to compare replicas. Reads the whole volume (holes cost nothing), blocking
/// applies meanwhile: a diagnostic, not a data path.
#[derive(Message)]
#[rtype(result = "Result<VolumeDigest, StorageRequestError>")]
pub struct ComputeVolumeDigest {
    pub name: String,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct VolumeDigest {
    pub applied_index: u64,
    pub size_bytes: u64,
    /// crc32c of the volume's contents, as hex.
    pub digest: String,
    pub allocated_bytes: u64,
}

fn volume_digest(reader: &VolumeReader, applied_index: u64) -> Result<VolumeDigest, StorageError> {
    const WINDOW_BYTES: u64 = 1 << 20;
    let size_bytes = reader.info().size_bytes;
    let zeroes = vec![0u8; WINDOW_BYTES as usize];
    let mut buffer = vec![0u8; WINDOW_BYTES as usize];
    let mut crc = 0u32;
    let mut allocated_bytes = 0u64;
    let mut offset = 0u64;
    while offset < size_bytes {
        let length = WINDOW_BYTES.min(size_bytes - offset);
        let extents = reader.block_status(offset, length)?;
        let all_hole = extents.len() == 1 && extents[0].hole && extents[0].length_bytes >= length;
        if all_hole {
            crc = crc32c::crc32c_append(crc, &zeroes[..length as usize]);
        } else {
            allocated_bytes += length;
            reader.read(offset, &mut buffer[..length as usize])?;
            crc = crc32c::crc32c_append(crc, &buffer[..length as usize]);
        }
        offset += length;
    }
    Ok(VolumeDigest {
        applied_index,
        size_bytes,
        digest: format!("{crc:08x}"),
        allocated_bytes,
    })
}

impl Handler<ComputeVolumeDigest> for StorageActor {
    type Result = Result<VolumeDigest, StorageRequestError>;
    fn handle(&mut self, msg: ComputeVolumeDigest, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, |actor, _| {
            let machine = actor.machine();
            let applied_index = machine.applied_index();
            let reader = machine
                .volume_by_name(&msg.name)
                .and_then(|info| machine.reader(info.id))
                .ok_or_else(|| StorageRequestError::NoSuchVolume(msg.name.clone()))?;
            Ok(volume_digest(&reader, applied_index)?)
        })
        .unwrap_or(Err(StorageRequestError::Crashed("computing a digest")))
    }
}

/// Timer → storage actor: time for a background checkpoint.
#[derive(Message)]
#[rtype(result = "()")]
struct CheckpointTick;

/// Blocking pool → storage actor: a background checkpoint's images are synced (or not).
#[derive(Message)]
#[rtype(result = "()")]
struct CheckpointSynced {
    checkpoint_id: u64,
    ticket: CheckpointTicket,
    result: Result<(), StorageError>,
}

impl Handler<CheckpointTick> for StorageActor {
    type Result = ();
    fn handle(&mut self, _: CheckpointTick, ctx: &mut Context<Self>) {
        self.guarded(ctx, |actor, ctx| actor.start_background_checkpoint(ctx));
    }
}

impl Handler<CheckpointSynced> for StorageActor {
    type Result = ();
    fn handle(&mut self, msg: CheckpointSynced, ctx: &mut Context<Self>) {
        if self.checkpoint_in_flight != Some(msg.checkpoint_id) {
            // Started by an instance that has since restarted: its state machine is gone, and
            // the new one knows nothing of the ticket.
            return;
        }
        self.guarded(ctx, |actor, _| actor.finish_background_checkpoint(msg));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::supervisor::{ActorKind, RestartCounters};
    use crate::storage::command::{encode_command, encode_write_command, Command};
    use crate::storage::state_machine::ApplyOutcome;
    use crate::storage::{open_db, StorageOptions};
    use raft::prelude::{ConfState, Entry};
    use raft::Storage as _;

    const BLOCK: usize = 4096;

    fn proposal_context(node_id: u64, proposal_id: u64, term: u64) -> bytes::Bytes {
        crate::raft::entry::ProposalContext {
            node_id,
            proposal_id,
            term,
        }
        .encode()
    }

    fn entry(index: u64, term: u64, context: bytes::Bytes, data: Vec<u8>) -> Entry {
        Entry {
            index,
            term,
            context,
            data: data.into(),
            ..Default::default()
        }
    }

    /// The storage actor of one node, on a log written by the test.
    struct Harness {
        _directory: tempfile::TempDir,
        registry: VolumeRegistry,
        applied_index: Arc<AtomicU64>,
        storage: Addr<StorageActor>,
    }

    /// RocksDB with small buffers in a new directory, and group 1's log, bootstrapped with
    /// one voter.
    fn open_store() -> (tempfile::TempDir, Arc<rocksdb::DB>, RaftLogStore) {
        let directory = tempfile::tempdir().unwrap();
        let options = StorageOptions {
            block_cache_bytes: 1 << 20,
            write_buffer_bytes: 1 << 20,
            max_background_jobs: 1,
        };
        let db = open_db(directory.path(), &options).unwrap();
        let log_store = RaftLogStore::open(db.clone(), 1).unwrap();
        let voters = ConfState {
            voters: vec![1],
            ..Default::default()
        };
        log_store.bootstrap(voters, &[]).unwrap();
        (directory, db, log_store)
    }

    fn start(log_entries: &[Entry]) -> Harness {
        let (directory, db, log_store) = open_store();
        log_store.persist_ready(log_entries, None, true).unwrap();
        let config = crate::config::Config::load(None, &[]).unwrap();
        let registry = VolumeRegistry::default();
        let applied_index = Arc::new(AtomicU64::new(0));
        let params = StorageActorParams {
            group_id: 1,
            data_dir: directory.path().to_path_buf(),
            db,
            config: config.storage,
            log_store,
            registry: registry.clone(),
            applied_index: applied_index.clone(),
            applied_wanted: Arc::new(AtomicU64::new(u64::MAX)),
            read_gate: ReadGate::default(),
            supervision: Supervision {
                kind: ActorKind::Storage,
                logger: slog::Logger::root(slog::Discard, slog::o!()),
                counters: RestartCounters::new(),
            },
        };
        let storage = StorageActor::new(params).start();
        Harness {
            _directory: directory,
            registry,
            applied_index,
            storage,
        }
    }

    /// A leader's storage, driven by hand: log and state machine in a directory of its own.
    struct Leader {
        _directory: tempfile::TempDir,
        log: RaftLogStore,
        machine: StateMachine,
        applied_index: Arc<AtomicU64>,
    }

    impl Leader {
        fn new() -> Leader {
            let (directory, db, log) = open_store();
            let applied_index = Arc::new(AtomicU64::new(0));
            log.set_applied_index_source(applied_index.clone());
            let machine = StateMachine::open(db, &directory.path().join("images"), 1).unwrap();
            Leader {
                _directory: directory,
                log,
                machine,
                applied_index,
            }
        }

        /// Appends `command` as the next entry (term 1) and applies it.
        fn propose(&mut self, command: Vec<u8>) -> (Entry, ApplyOutcome) {
            let index = self.log.last_log_index() + 1;
            let entry = entry(index, 1, proposal_context(1, index, 1), command);
            let hard_state = raft::prelude::HardState {
                term: 1,
                vote: 1,
                commit: index,
                ..Default::default()
            };
            self.log
                .persist_ready(std::slice::from_ref(&entry), Some(&hard_state), true)
                .unwrap();
            let outcome = self
                .machine
                .apply_batch(&[(index, &entry.data[..])])
                .unwrap()
                .remove(0);
            self.applied_index.store(index, Ordering::Release);
            (entry, outcome)
        }
    }

    /// A proposal of this node whose entry an installed snapshot already covers: its effect
    /// (or its rejection) is in the copied state, and this node cannot tell which. Here the
    /// entry is a write the leader rejected as fenced; the proposer must not be told it
    /// succeeded, only to ask again.
    #[actix_rt::test]
    async fn a_proposal_covered_by_an_installed_snapshot_is_not_acknowledged() {
        let mut leader = Leader::new();
        leader.propose(encode_command(&Command::CreateVolume {
            name: "v",
            size_bytes: 1 << 20,
            block_size_bytes: BLOCK as u32,
        }));
        leader.propose(encode_command(&Command::Attach {
            name: "v",
            client: "holder",
            force: false,
            attach_id: Some(1),
        }));
        let metadata = leader.log.snapshot(0, 2).unwrap().get_metadata().clone();
        // After the snapshot's index, inside what the (fuzzy) copy covers: an unattached write.
        let (fenced, outcome) = leader.propose(encode_write_command(1, 0, 0, &[0xcc; BLOCK]));
        assert_eq!(
            outcome,
            ApplyOutcome::Rejected(crate::storage::state_machine::ApplyRejection::Fenced)
        );
        let mut source = leader.machine.snapshot_source().unwrap();
        assert_eq!(source.covered_index(), fenced.index);

        let follower = start(&[]);
        // Opened (which clears stray staging areas) before this one is staged.
        follower.storage.send(Checkpoint).await.unwrap().unwrap();
        let mut staging = crate::storage::snapshot::SnapshotStaging::begin(
            &follower._directory.path().join("images"),
            1,
            metadata.index,
        )
        .unwrap();
        while let Some(chunk) = source.next_chunk(64 * 1024).unwrap() {
            staging.stage(&chunk).unwrap();
        }
        follower
            .storage
            .send(InstallSnapshot {
                staged: staging.finish().unwrap(),
                metadata,
                members: Vec::new(),
            })
            .await
            .unwrap()
            .unwrap();
        let (responder, answer) = tokio::sync::oneshot::channel();
        follower
            .storage
            .send(ApplyCommitted {
                entries: vec![fenced.clone()],
                responders: vec![(fenced.index, responder)],
            })
            .await
            .unwrap();
        let answer = answer.await.expect("the proposal is answered");
        assert_eq!(
            answer,
            Err(ProposalError::Dropped),
            "a write the leader fenced was answered {answer:?}"
        );
    }

    /// A write forwarded in term 1 and appended by the leader of term 2 (its stale twin: its
    /// proposer was told to retry) must be a no-op on every replica however it reaches the
    /// state machine, including the entries a storage actor reads from the log itself to fill
    /// a gap after a restart.
    #[actix_rt::test]
    async fn a_stale_twin_read_from_the_log_is_applied_as_a_no_op() {
        let create = encode_command(&Command::CreateVolume {
            name: "v",
            size_bytes: 1 << 20,
            block_size_bytes: BLOCK as u32,
        });
        let log = vec![
            entry(1, 1, proposal_context(1, 1, 1), create),
            entry(
                2,
                1,
                proposal_context(1, 2, 1),
                encode_write_command(1, 0, 0, &[0xaa; BLOCK]),
            ),
            // Proposed in term 1, appended in term 2.
            entry(
                3,
                2,
                proposal_context(2, 7, 1),
                encode_write_command(1, 0, 0, &[0xbb; BLOCK]),
            ),
            entry(4, 2, proposal_context(1, 3, 2), Vec::new()),
        ];
        let harness = start(&log);
        // Handed entry 4 only: entries 1 to 3 are read from the log.
        harness
            .storage
            .send(ApplyCommitted {
                entries: vec![log[3].clone()],
                responders: Vec::new(),
            })
            .await
            .unwrap();
        assert_eq!(harness.applied_index.load(Ordering::SeqCst), 4);
        let reader = harness.registry.get("v").expect("volume v exists");
        let mut block = vec![0u8; BLOCK];
        reader.read(0, &mut block).unwrap();
        assert!(
            block.iter().all(|byte| *byte == 0xaa),
            "the stale twin was applied: block 0 starts {:02x?}",
            &block[..4]
        );
    }
}
