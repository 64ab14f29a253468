//! Keeps RocksDB's write-ahead log out of the page cache once it is synced.
//!
//! The WAL is read back only when RocksDB opens after a crash, yet every byte appended to it
//! would stay in the page cache until its file is deleted, after the next memtable flush: a
//! node replicating 1 MiB writes fills the cache with hundreds of MiB of log nobody reads,
//! and every append needs a page the kernel has not handed out recently. On a VM that gives
//! freed memory back to its host (virtio-balloon free page reporting), such a page costs
//! about 10 µs on its first touch: with 1 MiB writes the WAL appends of three replicas were
//! half of all CPU. Once a sync has made a range durable, its pages are clean, and dropping
//! them (`POSIX_FADV_DONTNEED`) lets the next appends reuse them at once (bench/RESULTS.md,
//! sixth round).
//!
//! RocksDB does not say which file its current WAL is, so [`WalPageCache`] follows the
//! highest-numbered `*.log` file of the WAL directory. It looks at that file only once
//! [`DROP_STEP_BYTES`] have been written through it since it last did (a `statx` costs about
//! 30 µs on a VM, as much as a tenth of a replicated 4k write), and looks for a newer file
//! whenever the one it follows did not grow in between: writes keep coming, so a log that no
//! longer grows has been replaced. A sync covers every log file written before it, so the
//! replaced file is dropped whole.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::image::fadvise;

/// Synced WAL is dropped in steps of at least this many bytes (one `posix_fadvise` per step).
const DROP_STEP_BYTES: u64 = 256 << 10;

/// Page size assumed for rounding: the last, partly written page stays cached.
const PAGE_BYTES: u64 = 4096;

/// Follows RocksDB's current WAL file and drops its synced pages from the page cache.
pub(crate) struct WalPageCache {
    directory: PathBuf,
    /// Bytes written through [`Self::note_written`] since the followed file was last looked at.
    written_bytes: AtomicU64,
    followed: parking_lot::Mutex<Option<FollowedLog>>,
}

struct FollowedLog {
    number: u64,
    file: File,
    /// Length when it was last looked at.
    seen_bytes: u64,
    /// Everything below this was dropped.
    dropped_bytes: u64,
}

impl WalPageCache {
    /// Follows the WAL files of the RocksDB whose WAL directory is `directory`.
    pub(crate) fn new(directory: &Path) -> Self {
        WalPageCache {
            directory: directory.to_path_buf(),
            written_bytes: AtomicU64::new(0),
            followed: parking_lot::Mutex::new(None),
        }
    }

    /// Counts `bytes` just written to the WAL (by a write batch), for the next [`Self::sync`].
    pub(crate) fn note_written(&self, bytes: usize) {
        self.written_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Runs `sync` (a WAL sync) and then drops what it made durable. Two syncs at once are
    /// allowed: the second one drops nothing.
    pub(crate) fn sync<E>(&self, sync: impl FnOnce() -> Result<(), E>) -> Result<(), E> {
        if self.written_bytes.load(Ordering::Relaxed) < DROP_STEP_BYTES {
            return sync();
        }
        let Some(mut followed) = self.followed.try_lock() else {
            return sync();
        };
        self.written_bytes.store(0, Ordering::Relaxed);
        let replaced = self.follow_current(&mut followed);
        // Written before the sync starts, so the sync covers it.
        let covered_bytes = followed.as_ref().map_or(0, |log| log.seen_bytes);
        sync()?;
        if let Some(replaced) = replaced {
            fadvise(&replaced, 0, 0, libc::POSIX_FADV_DONTNEED);
        }
        if let Some(log) = followed.as_mut() {
            let end = covered_bytes & !(PAGE_BYTES - 1);
            if end > log.dropped_bytes {
                // From 0 each time: a large folio straddling the previous end was skipped then.
                fadvise(&log.file, 0, end, libc::POSIX_FADV_DONTNEED);
                log.dropped_bytes = end;
            }
        }
        Ok(())
    }

    /// Updates the followed log's length, or moves to a newer log file when it did not grow;
    /// returns the file it stopped following.
    fn follow_current(&self, followed: &mut Option<FollowedLog>) -> Option<File> {
        if let Some(log) = followed.as_mut() {
            match log.file.metadata() {
                Ok(metadata) if metadata.len() != log.seen_bytes => {
                    log.seen_bytes = metadata.len();
                    return None;
                }
                _ => {}
            }
        }
        let (number, path) = newest_log_file(&self.directory)?;
        if followed.as_ref().is_some_and(|log| log.number >= number) {
            return None;
        }
        // Gone already (RocksDB deletes obsolete logs): the next sync looks again.
        let file = File::open(path).ok()?;
        let seen_bytes = file.metadata().ok()?.len();
        let previous = followed.replace(FollowedLog {
            number,
            file,
            seen_bytes,
            dropped_bytes: 0,
        });
        previous.map(|log| log.file)
    }
}

/// The highest-numbered RocksDB log file (`000123.log`) in `directory`.
fn newest_log_file(directory: &Path) -> Option<(u64, PathBuf)> {
    std::fs::read_dir(directory)
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let name = entry.file_name();
            let number = name.to_str()?.strip_suffix(".log")?.parse::<u64>().ok()?;
            Some((number, entry.path()))
        })
        .max_by_key(|(number, _)| *number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::raft_log::RaftLogStore;
    use crate::storage::{open_db, StorageOptions};
    use raft::prelude::Entry;
    use std::os::unix::io::AsRawFd;

    /// Bytes of `path` in the page cache (`mincore` over a shared read-only mapping).
    fn cached_bytes(path: &Path) -> u64 {
        let file = File::open(path).unwrap();
        let length = file.metadata().unwrap().len() as usize;
        if length == 0 {
            return 0;
        }
        let pages = length.div_ceil(PAGE_BYTES as usize);
        let mut residency = vec![0u8; pages];
        // SAFETY: a shared read-only mapping of a file we hold open, unmapped before return;
        // mincore writes one byte per page into `residency`, which has one per page.
        unsafe {
            let address = libc::mmap(
                std::ptr::null_mut(),
                length,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(address, libc::MAP_FAILED);
            assert_eq!(libc::mincore(address, length, residency.as_mut_ptr()), 0);
            libc::munmap(address, length);
        }
        residency.iter().filter(|page| *page & 1 == 1).count() as u64 * PAGE_BYTES
    }

    fn log_files(directory: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(directory)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|extension| extension == "log"))
            .collect();
        files.sort();
        files
    }

    fn entry(index: u64, bytes: usize) -> Entry {
        Entry {
            index,
            term: 1,
            data: vec![index as u8; bytes].into(),
            ..Default::default()
        }
    }

    #[test]
    fn synced_log_leaves_the_page_cache_and_a_replaced_log_file_is_followed() {
        let directory = tempfile::tempdir().unwrap();
        let db = open_db(directory.path(), &StorageOptions::default()).unwrap();
        let store = RaftLogStore::open(db.clone(), 1).unwrap();
        let wal_directory = db.path().to_path_buf();
        const ENTRY_BYTES: usize = 1 << 20;

        for index in 1..=16 {
            store
                .persist_ready(&[entry(index, ENTRY_BYTES)], None, true)
                .unwrap();
        }
        let first_log = log_files(&wal_directory).pop().unwrap();
        let written = std::fs::metadata(&first_log).unwrap().len();
        assert!(written >= 16 << 20, "the WAL holds the entries: {written}");
        let cached = cached_bytes(&first_log);
        assert!(
            cached <= 2 * DROP_STEP_BYTES + ENTRY_BYTES as u64,
            "{cached} of {written} WAL bytes still cached after the syncs"
        );

        // A memtable flush makes RocksDB start a new log file; the next syncs follow it.
        db.flush_cf(super::super::column_family(&db, super::super::keys::CF_RAFT_LOG).unwrap())
            .unwrap();
        for index in 17..=32 {
            store
                .persist_ready(&[entry(index, ENTRY_BYTES)], None, false)
                .unwrap();
            store.sync_wal().unwrap();
        }
        let second_log = log_files(&wal_directory).pop().unwrap();
        assert_ne!(first_log, second_log, "the flush switched the log file");
        let written = std::fs::metadata(&second_log).unwrap().len();
        assert!(written >= 16 << 20);
        let cached = cached_bytes(&second_log);
        assert!(
            cached <= 2 * DROP_STEP_BYTES + ENTRY_BYTES as u64,
            "{cached} of {written} bytes of the new WAL still cached"
        );
        if first_log.exists() {
            assert!(cached_bytes(&first_log) <= PAGE_BYTES);
        }

        // Small entries: the file is looked at once a step's worth was written, and the
        // cached part stays within about one step.
        for index in 33..=1056 {
            store
                .persist_ready(&[entry(index, 4096)], None, true)
                .unwrap();
        }
        let cached = cached_bytes(&log_files(&wal_directory).pop().unwrap());
        assert!(
            cached <= DROP_STEP_BYTES + 64 * PAGE_BYTES,
            "{cached} bytes of the WAL cached after 4 MiB of small entries"
        );

        // Nothing dropped is lost: the log reads back after a reopen.
        drop(store);
        drop(db);
        let db = open_db(directory.path(), &StorageOptions::default()).unwrap();
        let store = RaftLogStore::open(db, 1).unwrap();
        assert_eq!(store.last_log_index(), 1056);
        let entries =
            raft::Storage::entries(&store, 1, 1057, None, raft::GetEntriesContext::empty(false))
                .unwrap();
        assert_eq!(entries.len(), 1056);
        assert!(entries.iter().all(|entry| {
            let bytes = if entry.index <= 32 { ENTRY_BYTES } else { 4096 };
            entry.data.len() == bytes && entry.data.iter().all(|byte| *byte == entry.index as u8)
        }));
    }
}
