//! The points where the storage layer makes something durable, reported to a watcher of the
//! calling thread.
//!
//! Production installs no watcher: each report is a thread-local lookup. The deterministic
//! simulation installs one on its own thread and remembers, per node, what each sync made
//! durable (the size of the write-ahead log, the content of an image file), so that it can
//! cut the power: truncate the log to what was synced and roll back image sectors written
//! since their last sync, then restart the node on what a disk would have kept.
//!
//! Reported: every RocksDB write made with sync and every WAL sync ([`Synced::Wal`], after it
//! returned), and every fsync/fdatasync of an image file ([`Synced::File`]). Not reported: the
//! syncs RocksDB makes on its own (SST files, the MANIFEST, the WAL of a flushed memtable) and
//! directory fsyncs; a watcher must treat what they cover as durable.

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;

/// What a sync made durable.
#[derive(Clone, Copy, Debug)]
pub enum Synced<'a> {
    /// Everything written so far to the write-ahead log of the RocksDB database at this path.
    Wal(&'a Path),
    /// The data and size of the file at this path, as they are now.
    File(&'a Path),
}

/// Called on the thread that synced, right after the sync returned.
pub type Watcher = Rc<dyn Fn(Synced<'_>)>;

thread_local! {
    static WATCHER: RefCell<Option<Watcher>> = const { RefCell::new(None) };
}

/// Installs (or with `None` removes) the watcher of the calling thread's syncs.
pub fn watch_this_thread(watcher: Option<Watcher>) {
    WATCHER.with(|slot| *slot.borrow_mut() = watcher);
}

/// Reports a sync to the calling thread's watcher, if it has one.
pub(crate) fn synced(what: Synced<'_>) {
    let watcher = WATCHER.with(|slot| slot.borrow().clone());
    if let Some(watcher) = watcher {
        watcher(what);
    }
}

/// A RocksDB write with sync: durable, and so is the WAL before it.
pub(crate) fn write_synced(
    db: &rocksdb::DB,
    batch: rocksdb::WriteBatch,
) -> Result<(), rocksdb::Error> {
    let mut options = rocksdb::WriteOptions::default();
    options.set_sync(true);
    db.write_opt(batch, &options)?;
    synced(Synced::Wal(db.path()));
    Ok(())
}

/// fsync of RocksDB's write-ahead log: every write made before it is durable.
pub(crate) fn sync_wal(db: &rocksdb::DB) -> Result<(), rocksdb::Error> {
    db.flush_wal(true)?;
    synced(Synced::Wal(db.path()));
    Ok(())
}
