//! One sparse image file: the block data of one volume.
//!
//! Created with `ftruncate` (sparse: no block is allocated until written), written and read
//! with positional I/O (`pwrite`/`pread`, safe to share between threads), holes punched with
//! `fallocate(FALLOC_FL_PUNCH_HOLE)`, ranges zeroed with `FALLOC_FL_ZERO_RANGE`, durable with
//! `fdatasync`, and its allocation map read with `FIEMAP` (`lseek(SEEK_DATA/SEEK_HOLE)` where
//! the file system has no `FIEMAP`). Large writes bypass the page cache (`O_DIRECT`, see
//! [`DIRECT_WRITE_MIN_BYTES`]).
//!
//! This module knows nothing of checksums, locks or Raft: the state machine decides what to
//! write and when to sync.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use super::StorageError;

/// Bytes written per `pwrite` when zeroes have to be written by hand (file systems without
/// `fallocate` hole punching): bounds the memory of the zero buffer.
const ZERO_CHUNK_BYTES: usize = 1 << 20;

/// Largest piece of one `pwrite` to an image. The kernel sizes the page-cache folios a write
/// creates by the write's length, and on ext4 (buffer heads, large folios: Linux 6.x) every
/// later small write into a large folio walks all of its blocks. Measured here on a 1 GiB
/// sparse file: after 1 MiB pwrites, a 4 KiB pwrite cost 29–33 µs; after 64 KiB pwrites,
/// 4.3 µs (2.8 µs on a file never written in large pieces), and the 1 MiB of sequential
/// writing itself was no dearer in 64 KiB pieces.
const WRITE_PIECE_BYTES: usize = 64 << 10;

/// A write whose 4 KiB-aligned middle is at least this long writes that middle with
/// `O_DIRECT`, from an aligned buffer: straight to the disk, without page-cache pages. Every
/// replica writes each block to its Raft log and to its image, and on this project's test
/// machines (virtual machines that hand freed memory back to their host) filling a new
/// page-cache page costs about 12 µs: copying into the image's pages was 19 % of all CPU
/// under 1 MiB sequential writes. Small writes stay buffered: a direct one waits for the disk.
/// The checkpoint's fdatasync covers both kinds (it flushes the disk's write cache).
pub const DIRECT_WRITE_MIN_BYTES: usize = 256 << 10;

/// Alignment of offsets, lengths and buffers of direct writes: a multiple of the logical
/// block size of every common disk.
const DIRECT_ALIGN: usize = 4096;

/// Largest piece of one direct write, and the size of each writing thread's aligned buffer.
const DIRECT_PIECE_BYTES: usize = 1 << 20;

thread_local! {
    /// The aligned buffer direct writes copy into, one per writing thread (the storage
    /// actor's, a snapshot receiver's), allocated on first use and then reused: a new
    /// buffer per write would pay for fresh pages again.
    static DIRECT_BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Readahead window of a sequential reader (see [`ImageFile::read_exact_at`]): eight times
/// the read, within these bounds.
const READAHEAD_MIN_BYTES: u64 = 512 << 10;
const READAHEAD_MAX_BYTES: u64 = 2 << 20;
/// Sequential streams followed per image: a read that starts where one of the last this many
/// streams ended continues it. Several readers (or one reader's requests in flight at once,
/// which arrive out of order) each keep their readahead.
const READ_STREAMS_MAX: usize = 8;

/// One sequential stream of reads (see [`ReadStreams`]).
#[derive(Clone, Copy, Debug, Default)]
struct ReadStream {
    /// Where its last read ended: a read starting there continues it.
    end: u64,
    /// The end of the readahead already requested for it.
    readahead_end: u64,
    /// When it was last continued (a tick of [`ReadStreams::clock`]); 0 = unused slot.
    used_at: u64,
}

/// The sequential streams of one image, the least recently continued replaced first.
#[derive(Debug, Default)]
struct ReadStreams {
    streams: [ReadStream; READ_STREAMS_MAX],
    clock: u64,
}

/// Most extents [`ImageFile::allocation_map`] returns in one call (a limit on the reply size
/// of an NBD `BLOCK_STATUS`; the spec lets the server describe a prefix of the range).
pub const EXTENTS_MAX: usize = 1024;

/// `FS_IOC_FIEMAP`: `_IOWR('f', 11, struct fiemap)` in linux/fs.h (`struct fiemap` is 32 bytes).
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
/// `fe_flags` of the file's last extent.
const FIEMAP_EXTENT_LAST: u32 = 0x1;
/// Extents asked for per `FIEMAP` call.
const FIEMAP_EXTENTS_PER_CALL: usize = 128;

/// `struct fiemap_extent` (linux/fiemap.h).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

/// `struct fiemap` with room for [`FIEMAP_EXTENTS_PER_CALL`] extents.
#[repr(C)]
struct Fiemap {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
    fm_extents: [FiemapExtent; FIEMAP_EXTENTS_PER_CALL],
}

/// One run of bytes of the same allocation state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocationExtent {
    pub length_bytes: u64,
    /// A hole: no storage is allocated and the bytes read as zeroes.
    pub hole: bool,
}

/// An open image file.
#[derive(Debug)]
pub struct ImageFile {
    path: PathBuf,
    file: File,
    /// The same file opened with `O_DIRECT`; `None` where the file system refuses it.
    direct: Option<File>,
    /// Cleared when a direct write is refused (`EINVAL`): every later write is buffered.
    direct_usable: AtomicBool,
    /// The sequential read streams, for readahead.
    read_streams: Mutex<ReadStreams>,
}

impl ImageFile {
    /// Creates the image at `path` as a sparse file of `size_bytes`, replacing whatever file
    /// was there, and makes the file and its directory entry durable: a volume-table row that
    /// names this image is only written after this returns.
    pub fn create(path: &Path, size_bytes: u64) -> Result<Self, StorageError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|error| StorageError::io(path, error))?;
        // ftruncate: the file gets its size without allocating a single block.
        file.set_len(size_bytes)
            .map_err(|error| StorageError::io(path, error))?;
        // fsync (not fdatasync): the new size is metadata that must survive a crash.
        file.sync_all()
            .map_err(|error| StorageError::io(path, error))?;
        super::durability::synced(super::durability::Synced::File(path));
        if let Some(directory) = path.parent() {
            sync_directory(directory)?;
        }
        Ok(ImageFile::with_access_pattern(path, file))
    }

    /// Opens an existing image for reading and writing.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|error| StorageError::io(path, error))?;
        Ok(ImageFile::with_access_pattern(path, file))
    }

    /// Turns the kernel's readahead off for the image (`POSIX_FADV_RANDOM`): it fills the
    /// page cache with large folios (up to the device's `read_ahead_kb`), and every later
    /// small write into one costs several times a write into a small one (see
    /// [`WRITE_PIECE_BYTES`]). Measured through the proxy after reading the whole volume:
    /// 4k randwrite qd32 3848/5399 IOPS with the kernel's readahead, 7493/6255 with this
    /// (bench/RESULTS.md, 2026-12-02 third round). Sequential readers get readahead from [`Self::read_exact_at`] instead, whose
    /// `POSIX_FADV_WILLNEED` fills small folios. Hints only: a file system that ignores
    /// them serves the image the same.
    fn with_access_pattern(path: &Path, file: File) -> ImageFile {
        fadvise(&file, 0, 0, libc::POSIX_FADV_RANDOM);
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        ImageFile {
            path: path.to_path_buf(),
            file,
            direct_usable: AtomicBool::new(direct.is_some()),
            direct,
            read_streams: Mutex::new(ReadStreams::default()),
        }
    }

    /// Notes a read of `[offset, offset + length)`. A read that starts where a recent one
    /// ended continues that stream; any other starts a new stream, replacing the one least
    /// recently continued. For a continuing read that `may_read_ahead`, returns the range to
    /// read ahead (up to a window past the read's end), unless enough of it was requested
    /// already. Random reads almost never start exactly where another ended, so they read
    /// without readahead.
    fn note_read(&self, offset: u64, length: u64, may_read_ahead: bool) -> Option<(u64, u64)> {
        let end = offset + length;
        let mut table = self.read_streams.lock();
        table.clock += 1;
        let now = table.clock;
        let continued = table
            .streams
            .iter()
            .position(|stream| stream.used_at != 0 && stream.end == offset);
        let Some(index) = continued else {
            // A new stream starts here: nothing of it is requested beyond this read.
            let oldest = table
                .streams
                .iter_mut()
                .min_by_key(|stream| stream.used_at)
                .expect("the table has slots");
            *oldest = ReadStream {
                end,
                readahead_end: end,
                used_at: now,
            };
            return None;
        };
        let stream = &mut table.streams[index];
        stream.end = end;
        stream.used_at = now;
        if !may_read_ahead {
            return None;
        }
        let window = length
            .saturating_mul(8)
            .clamp(READAHEAD_MIN_BYTES, READAHEAD_MAX_BYTES);
        if stream.readahead_end >= end + window / 2 {
            return None;
        }
        let start = stream.readahead_end.max(offset);
        stream.readahead_end = end + window;
        Some((start, end + window - start))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Grows the file to `size_bytes` (sparse: the new range reads as zeroes and allocates
    /// nothing) and makes the new size durable before returning.
    pub fn grow(&self, size_bytes: u64) -> Result<(), StorageError> {
        self.file
            .set_len(size_bytes)
            .map_err(|error| self.io_error(error))?;
        // fsync (not fdatasync): the size is metadata.
        self.file.sync_all().map_err(|error| self.io_error(error))?;
        super::durability::synced(super::durability::Synced::File(&self.path));
        Ok(())
    }

    /// Shrinks the file back to `size_bytes`: only for undoing a grow whose volume row was
    /// never written (see `StateMachine::open`).
    pub fn truncate_to(&self, size_bytes: u64) -> Result<(), StorageError> {
        self.grow(size_bytes)
    }

    /// The file size (the volume size).
    pub fn size_bytes(&self) -> Result<u64, StorageError> {
        Ok(self
            .file
            .metadata()
            .map_err(|error| self.io_error(error))?
            .len())
    }

    fn io_error(&self, source: std::io::Error) -> StorageError {
        StorageError::io(&self.path, source)
    }

    /// pwrite of all of `data` at `offset`: its aligned middle directly when it is at least
    /// [`DIRECT_WRITE_MIN_BYTES`] long, the rest through the page cache.
    pub fn write_all_at(&self, offset: u64, data: &[u8]) -> Result<(), StorageError> {
        let align = DIRECT_ALIGN as u64;
        let end = offset + data.len() as u64;
        let middle_start = offset.div_ceil(align) * align;
        let middle_end = end / align * align;
        if middle_end >= middle_start + DIRECT_WRITE_MIN_BYTES as u64
            && self.direct_usable.load(Ordering::Relaxed)
        {
            let head = (middle_start - offset) as usize;
            let middle = (middle_end - offset) as usize;
            self.write_buffered(offset, &data[..head])?;
            self.write_direct(middle_start, &data[head..middle])?;
            return self.write_buffered(middle_end, &data[middle..]);
        }
        self.write_buffered(offset, data)
    }

    /// Writes `data` (aligned offset and length) with `O_DIRECT`, in pieces of at most
    /// [`DIRECT_PIECE_BYTES`] copied into this thread's aligned buffer. Once the file system
    /// refuses a direct write, it and everything after it go through the page cache.
    fn write_direct(&self, offset: u64, data: &[u8]) -> Result<(), StorageError> {
        let Some(direct) = &self.direct else {
            return self.write_buffered(offset, data);
        };
        DIRECT_BUFFER.with(|buffer| {
            let mut buffer = buffer.borrow_mut();
            if buffer.len() < DIRECT_PIECE_BYTES + DIRECT_ALIGN {
                buffer.resize(DIRECT_PIECE_BYTES + DIRECT_ALIGN, 0);
            }
            let skip = buffer.as_ptr().align_offset(DIRECT_ALIGN);
            let aligned = &mut buffer[skip..skip + DIRECT_PIECE_BYTES];
            let mut position = offset;
            for piece in data.chunks(DIRECT_PIECE_BYTES) {
                let staged = &mut aligned[..piece.len()];
                staged.copy_from_slice(piece);
                match direct.write_all_at(staged, position) {
                    Ok(()) => {}
                    Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                        self.direct_usable.store(false, Ordering::Relaxed);
                        let done = (position - offset) as usize;
                        return self.write_buffered(position, &data[done..]);
                    }
                    Err(error) => return Err(self.io_error(error)),
                }
                position += piece.len() as u64;
            }
            Ok(())
        })
    }

    /// pwrite of all of `data` at `offset` through the page cache, in pieces of at most
    /// [`WRITE_PIECE_BYTES`].
    fn write_buffered(&self, offset: u64, data: &[u8]) -> Result<(), StorageError> {
        let mut position = offset;
        for piece in data.chunks(WRITE_PIECE_BYTES) {
            self.file
                .write_all_at(piece, position)
                .map_err(|error| self.io_error(error))?;
            position += piece.len() as u64;
        }
        Ok(())
    }

    /// pread of exactly `buf.len()` bytes at `offset` (holes read as zeroes). A read that
    /// continues a sequential stream first asks the kernel to read ahead
    /// (`POSIX_FADV_WILLNEED`, which returns once the reads are queued).
    pub fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), StorageError> {
        if let Some((start, length)) = self.note_read(offset, buf.len() as u64, true) {
            fadvise(&self.file, start, length, libc::POSIX_FADV_WILLNEED);
        }
        self.file
            .read_exact_at(buf, offset)
            .map_err(|error| self.io_error(error))
    }

    /// Like [`Self::read_exact_at`], but only from the page cache (`preadv2` with
    /// `RWF_NOWAIT`): `Ok(false)` when part of the range is not cached and reading it would
    /// wait for the disk; `buf` then holds nothing meaningful. Lets a caller on an event loop
    /// serve cached reads inline and hand only the others to a blocking thread. It follows
    /// the sequential stream but never reads ahead: that is the blocking read's job.
    pub fn read_exact_at_cached(&self, offset: u64, buf: &mut [u8]) -> Result<bool, StorageError> {
        let mut done = 0usize;
        while done < buf.len() {
            let remaining = &mut buf[done..];
            let iov = libc::iovec {
                iov_base: remaining.as_mut_ptr().cast(),
                iov_len: remaining.len(),
            };
            // Offsets are below the image size, which is far below i64::MAX.
            let position = (offset + done as u64) as libc::off_t;
            // SAFETY: `iov` describes `remaining`, which is valid for writes of `iov_len` bytes
            // and not otherwise borrowed during the call; the descriptor belongs to
            // `self.file`, which outlives the call.
            let read = unsafe {
                libc::preadv2(self.file.as_raw_fd(), &iov, 1, position, libc::RWF_NOWAIT)
            };
            if read < 0 {
                let error = std::io::Error::last_os_error();
                match error.raw_os_error() {
                    Some(libc::EAGAIN) | Some(libc::EOPNOTSUPP) => return Ok(false),
                    Some(libc::EINTR) => continue,
                    _ => return Err(self.io_error(error)),
                }
            }
            if read == 0 {
                return Err(self.io_error(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)));
            }
            done += read as usize;
        }
        self.note_read(offset, buf.len() as u64, false);
        Ok(true)
    }

    /// Deallocates `[offset, offset + length)` so it reads as zeroes; partial file-system
    /// blocks at the edges are zeroed by the file system. Falls back to writing zeroes where
    /// hole punching is not supported.
    pub fn punch_hole(&self, offset: u64, length: u64) -> Result<(), StorageError> {
        self.fallocate_or_write_zeroes(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            length,
        )
    }

    /// Makes `[offset, offset + length)` read as zeroes while keeping it allocated (NBD
    /// `WRITE_ZEROES` with `NO_HOLE`), as qemu's file driver does; falls back to writing zeroes.
    pub fn zero_range(&self, offset: u64, length: u64) -> Result<(), StorageError> {
        self.fallocate_or_write_zeroes(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            length,
        )
    }

    fn fallocate_or_write_zeroes(
        &self,
        mode: libc::c_int,
        offset: u64,
        length: u64,
    ) -> Result<(), StorageError> {
        if length == 0 {
            return Ok(());
        }
        let (Ok(offset_signed), Ok(length_signed)) =
            (libc::off_t::try_from(offset), libc::off_t::try_from(length))
        else {
            return Err(self.io_error(std::io::Error::from(std::io::ErrorKind::InvalidInput)));
        };
        // SAFETY: `fallocate` only reads its integer arguments; the descriptor is owned by
        // `self.file`, which outlives the call.
        let result =
            unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset_signed, length_signed) };
        if result == 0 {
            return Ok(());
        }
        let error = std::io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => self.write_zeroes(offset, length),
            _ => Err(self.io_error(error)),
        }
    }

    /// Writes zero bytes over the range, in bounded chunks.
    fn write_zeroes(&self, offset: u64, length: u64) -> Result<(), StorageError> {
        let zeroes = vec![0u8; ZERO_CHUNK_BYTES.min(usize::try_from(length).unwrap_or(usize::MAX))];
        let mut position = offset;
        let end = offset + length;
        while position < end {
            let chunk = usize::try_from(end - position)
                .unwrap_or(usize::MAX)
                .min(zeroes.len());
            self.write_all_at(position, &zeroes[..chunk])?;
            position += chunk as u64;
        }
        Ok(())
    }

    /// fdatasync: the written data (and the size, if it changed) reach the disk.
    pub fn sync_data(&self) -> Result<(), StorageError> {
        self.file
            .sync_data()
            .map_err(|error| self.io_error(error))?;
        super::durability::synced(super::durability::Synced::File(&self.path));
        Ok(())
    }

    /// The allocation state of `[offset, offset + length)`, as extents in order. Covers the
    /// whole range unless it would take more than [`EXTENTS_MAX`] extents, in which case it
    /// covers a prefix. Granularity is the file system's block size. Allocated means any
    /// extent `FIEMAP` reports: written, unwritten (`FALLOC_FL_ZERO_RANGE`) or delayed
    /// (written to the page cache, not yet to the disk), whatever the page cache holds.
    pub fn allocation_map(
        &self,
        offset: u64,
        length: u64,
    ) -> Result<Vec<AllocationExtent>, StorageError> {
        let end = offset.saturating_add(length);
        let Some(ranges) = self.allocated_ranges(offset, end, EXTENTS_MAX)? else {
            return self.allocation_map_by_seek(offset, end);
        };
        let mut extents: Vec<AllocationExtent> = Vec::new();
        let mut position = offset;
        for (start, range_end) in ranges {
            if extents.len() >= EXTENTS_MAX {
                break;
            }
            if start > position {
                push_extent(&mut extents, start - position, true);
            }
            push_extent(&mut extents, range_end - start, false);
            position = range_end;
        }
        if position < end && extents.len() < EXTENTS_MAX {
            push_extent(&mut extents, end - position, true);
        }
        extents.truncate(EXTENTS_MAX);
        Ok(extents)
    }

    /// [`Self::allocation_map`] from `SEEK_DATA`/`SEEK_HOLE`, for file systems without
    /// `FIEMAP`. On ext4 these count an unwritten extent as data only while pages of it are
    /// cached, which is why `FIEMAP` comes first.
    fn allocation_map_by_seek(
        &self,
        offset: u64,
        end: u64,
    ) -> Result<Vec<AllocationExtent>, StorageError> {
        let mut extents: Vec<AllocationExtent> = Vec::new();
        let mut position = offset;
        while position < end && extents.len() < EXTENTS_MAX {
            let data_start = match self.seek(position, libc::SEEK_DATA)? {
                Some(data_start) => data_start.min(end),
                // ENXIO: no data at or after `position`; the rest is one hole.
                None => end,
            };
            if data_start > position {
                push_extent(&mut extents, data_start - position, true);
                position = data_start;
                continue;
            }
            // `position` is in data: it runs to the next hole (there is always a virtual hole
            // at the end of the file).
            let hole_start = self
                .seek(position, libc::SEEK_HOLE)?
                .unwrap_or(end)
                .min(end);
            let data_end = hole_start.max(position + 1).min(end);
            push_extent(&mut extents, data_end - position, false);
            position = data_end;
        }
        Ok(extents)
    }

    /// The first allocated range `[start, end)` at or after `position`, clamped to `limit`
    /// (allocated as in [`Self::allocation_map`]); `None` when only holes follow. What a
    /// snapshot copies: holes are skipped.
    pub fn next_data_range(
        &self,
        position: u64,
        limit: u64,
    ) -> Result<Option<(u64, u64)>, StorageError> {
        if position >= limit {
            return Ok(None);
        }
        if let Some(ranges) = self.allocated_ranges(position, limit, 1)? {
            return Ok(ranges.first().copied());
        }
        let Some(data_start) = self.seek(position, libc::SEEK_DATA)? else {
            return Ok(None);
        };
        if data_start >= limit {
            return Ok(None);
        }
        // There is always a virtual hole at the end of the file.
        let hole_start = self
            .seek(data_start, libc::SEEK_HOLE)?
            .unwrap_or(limit)
            .clamp(data_start + 1, limit);
        Ok(Some((data_start, hole_start)))
    }

    /// The allocated ranges in `[start, end)` from `FIEMAP`, in order, clamped to the range,
    /// adjacent ones merged; at most `ranges_max` of them (a prefix of the range when there
    /// are more). `None` when the file system has no `FIEMAP`.
    fn allocated_ranges(
        &self,
        start: u64,
        end: u64,
        ranges_max: usize,
    ) -> Result<Option<Vec<(u64, u64)>>, StorageError> {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut map = Box::new(Fiemap {
            fm_start: 0,
            fm_length: 0,
            fm_flags: 0,
            fm_mapped_extents: 0,
            fm_extent_count: FIEMAP_EXTENTS_PER_CALL as u32,
            fm_reserved: 0,
            fm_extents: [FiemapExtent::default(); FIEMAP_EXTENTS_PER_CALL],
        });
        let mut position = start;
        while position < end {
            map.fm_start = position;
            map.fm_length = end - position;
            map.fm_flags = 0;
            map.fm_mapped_extents = 0;
            map.fm_extent_count = FIEMAP_EXTENTS_PER_CALL as u32;
            // SAFETY: `map` is a `struct fiemap` followed by room for `fm_extent_count`
            // extents, as the ioctl expects; the kernel writes at most that many. The
            // descriptor belongs to `self.file`, which outlives the call.
            let result = unsafe {
                libc::ioctl(
                    self.file.as_raw_fd(),
                    FS_IOC_FIEMAP as _,
                    &mut *map as *mut Fiemap,
                )
            };
            if result < 0 {
                let error = std::io::Error::last_os_error();
                return match error.raw_os_error() {
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::ENOSYS) => Ok(None),
                    _ => Err(self.io_error(error)),
                };
            }
            let mapped = (map.fm_mapped_extents as usize).min(FIEMAP_EXTENTS_PER_CALL);
            if mapped == 0 {
                break;
            }
            let mut last_extent = false;
            for extent in &map.fm_extents[..mapped] {
                let extent_start = extent.fe_logical.max(position);
                let extent_end = extent.fe_logical.saturating_add(extent.fe_length).min(end);
                last_extent |= extent.fe_flags & FIEMAP_EXTENT_LAST != 0;
                if extent_start >= extent_end {
                    continue;
                }
                match ranges.last_mut() {
                    Some(last) if last.1 >= extent_start => last.1 = last.1.max(extent_end),
                    _ => {
                        if ranges.len() == ranges_max {
                            return Ok(Some(ranges));
                        }
                        ranges.push((extent_start, extent_end));
                    }
                }
            }
            let reached = map.fm_extents[mapped - 1]
                .fe_logical
                .saturating_add(map.fm_extents[mapped - 1].fe_length);
            if last_extent || mapped < FIEMAP_EXTENTS_PER_CALL || reached <= position {
                break;
            }
            position = reached;
        }
        Ok(Some(ranges))
    }

    /// `lseek(fd, position, whence)`; `None` on ENXIO (no data/hole at or after `position`).
    fn seek(&self, position: u64, whence: libc::c_int) -> Result<Option<u64>, StorageError> {
        let Ok(position_signed) = libc::off_t::try_from(position) else {
            return Ok(None);
        };
        // SAFETY: `lseek` only reads its integer arguments and the descriptor, which `self.file`
        // keeps open. Concurrent lseeks only race on the file offset, which nothing here uses
        // (all I/O is positional), and each call returns its own result.
        let result = unsafe { libc::lseek(self.file.as_raw_fd(), position_signed, whence) };
        if result >= 0 {
            return Ok(Some(result as u64));
        }
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(self.io_error(error))
        }
    }
}

fn push_extent(extents: &mut Vec<AllocationExtent>, length_bytes: u64, hole: bool) {
    match extents.last_mut() {
        Some(last) if last.hole == hole => last.length_bytes += length_bytes,
        _ => extents.push(AllocationExtent { length_bytes, hole }),
    }
}

/// `posix_fadvise`; a refusal is ignored, since the advice changes no result.
pub(crate) fn fadvise(file: &File, offset: u64, length: u64, advice: libc::c_int) {
    // Offsets and lengths are file sizes, far below i64::MAX.
    // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is owned by
    // `file`, which outlives the call.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            offset as libc::off_t,
            length as libc::off_t,
            advice,
        );
    }
}

/// fsync of a directory: makes the creation or removal of an entry in it durable.
pub fn sync_directory(directory: &Path) -> Result<(), StorageError> {
    File::open(directory)
        .and_then(|handle| handle.sync_all())
        .map_err(|error| StorageError::io(directory, error))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn allocated_bytes(image: &ImageFile) -> u64 {
        use std::os::unix::fs::MetadataExt;
        image.file.metadata().unwrap().blocks() * 512
    }

    #[test]
    fn a_new_image_is_sparse_and_reads_zeroes() {
        let directory = tempfile::tempdir().unwrap();
        let image = ImageFile::create(&directory.path().join("a.img"), 64 * MIB).unwrap();
        assert_eq!(image.size_bytes().unwrap(), 64 * MIB);
        assert_eq!(allocated_bytes(&image), 0);
        let mut buf = vec![1u8; 8192];
        image.read_exact_at(10 * MIB, &mut buf).unwrap();
        assert!(buf.iter().all(|&byte| byte == 0));
        assert_eq!(
            image.allocation_map(0, 64 * MIB).unwrap(),
            vec![AllocationExtent {
                length_bytes: 64 * MIB,
                hole: true
            }]
        );
    }

    #[test]
    fn write_then_read_at_unaligned_offsets() {
        let directory = tempfile::tempdir().unwrap();
        let image = ImageFile::create(&directory.path().join("a.img"), MIB).unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|value| value as u8).collect();
        image.write_all_at(12_345, &data).unwrap();
        let mut buf = vec![0u8; data.len()];
        image.read_exact_at(12_345, &mut buf).unwrap();
        assert_eq!(buf, data);
        // A write of several pieces (and a partial last one) lands whole and in order.
        let long: Vec<u8> = (0..(3 * WRITE_PIECE_BYTES + 777) as u32)
            .map(|value| (value % 251) as u8)
            .collect();
        image.write_all_at(100_001, &long).unwrap();
        let mut long_back = vec![0u8; long.len()];
        image.read_exact_at(100_001, &mut long_back).unwrap();
        assert_eq!(long_back, long);
        // Reading past the end of the file is an error, not a short read.
        let mut past_end = vec![0u8; 10];
        assert!(image.read_exact_at(MIB - 5, &mut past_end).is_err());
    }

    #[test]
    fn a_large_write_goes_around_the_page_cache_and_reads_back_whole() {
        let directory = tempfile::tempdir().unwrap();
        let image = ImageFile::create(&directory.path().join("a.img"), 8 * MIB).unwrap();
        // In the page cache first: the direct write must replace what it holds there.
        image.write_all_at(0, &vec![7u8; 4 * MIB as usize]).unwrap();
        let mut cached = vec![0u8; 4 * MIB as usize];
        image.read_exact_at(0, &mut cached).unwrap();
        // Unaligned at both ends and longer than one direct piece.
        let offset = 12_345u64;
        let data: Vec<u8> = (0..(DIRECT_PIECE_BYTES + DIRECT_WRITE_MIN_BYTES + 999) as u32)
            .map(|value| (value % 253) as u8)
            .collect();
        image.write_all_at(offset, &data).unwrap();
        if image.direct.is_some() {
            // Each test runs on its own thread: only a direct write allocates its buffer.
            let buffer_bytes = DIRECT_BUFFER.with(|buffer| buffer.borrow().len());
            assert!(buffer_bytes >= DIRECT_PIECE_BYTES, "the write went direct");
        }
        let mut back = vec![0u8; data.len() + 8192];
        image.read_exact_at(offset - 4096, &mut back).unwrap();
        assert!(
            back[..4096].iter().all(|&byte| byte == 7),
            "the bytes before"
        );
        assert_eq!(&back[4096..4096 + data.len()], &data[..]);
        assert!(
            back[4096 + data.len()..].iter().all(|&byte| byte == 7),
            "the bytes after"
        );
        // Once the file system refused a direct write, writes go through the page cache.
        image.direct_usable.store(false, Ordering::Relaxed);
        let second: Vec<u8> = data.iter().map(|byte| byte ^ 0xff).collect();
        image.write_all_at(offset, &second).unwrap();
        let mut again = vec![0u8; second.len()];
        image.read_exact_at(offset, &mut again).unwrap();
        assert_eq!(again, second);
    }

    #[test]
    fn only_a_sequential_stream_is_read_ahead_and_each_range_once() {
        let directory = tempfile::tempdir().unwrap();
        let image = ImageFile::create(&directory.path().join("a.img"), 64 * MIB).unwrap();
        let window = READAHEAD_MIN_BYTES;
        // The first read starts a stream; the one after it continues it and reads ahead from
        // itself to a window past it.
        assert_eq!(image.note_read(0, 4096, true), None);
        assert_eq!(
            image.note_read(4096, 4096, true),
            Some((4096, 4096 + window))
        );
        // Its successors are covered until less than half a window is left ahead of them.
        let mut offset = 8192;
        while offset + 4096 + window / 2 <= 8192 + window {
            assert_eq!(image.note_read(offset, 4096, true), None, "offset {offset}");
            offset += 4096;
        }
        let (start, length) = image.note_read(offset, 4096, true).unwrap();
        assert_eq!(start, 8192 + window, "only what was not requested yet");
        assert_eq!(start + length, offset + 4096 + window);
        // A read elsewhere starts another stream; the next one there continues it.
        assert_eq!(image.note_read(32 * MIB, 4096, true), None);
        let continued = image.note_read(32 * MIB + 4096, 4096, true).unwrap();
        assert_eq!(continued, (32 * MIB + 4096, 4096 + window));
        // Large reads get a larger window, up to the bound.
        let big = MIB;
        let (start, length) = image.note_read(32 * MIB + 8192, big, true).unwrap();
        assert_eq!(start, 32 * MIB + 8192 + window);
        assert_eq!(start + length, 32 * MIB + 8192 + big + READAHEAD_MAX_BYTES);
        // Reads served from the page cache are followed without reading ahead; the blocking
        // read that continues them does.
        assert_eq!(image.note_read(40 * MIB, 4096, false), None);
        assert_eq!(image.note_read(40 * MIB + 4096, 4096, false), None);
        assert_eq!(
            image.note_read(40 * MIB + 8192, 4096, true),
            Some((40 * MIB + 8192, 4096 + window))
        );
    }

    /// Interleaved sequential readers, and one reader whose requests arrive out of order,
    /// each keep their readahead; random reads get none; the stream continued least
    /// recently is the one a new stream replaces.
    #[test]
    fn interleaved_and_reordered_streams_each_read_ahead() {
        let directory = tempfile::tempdir().unwrap();
        let image = ImageFile::create(&directory.path().join("a.img"), 64 * MIB).unwrap();
        let chunk = 64 * 1024;
        let bases = [0, 16 * MIB, 32 * MIB];
        for base in bases {
            assert_eq!(image.note_read(base, chunk, true), None);
        }
        for base in bases {
            let (start, _) = image
                .note_read(base + chunk, chunk, true)
                .expect("each interleaved stream reads ahead");
            assert_eq!(start, base + chunk);
        }
        // Requests 0, 2, 1, 3 of a reader with two in flight at 48 MiB: each starts where
        // an earlier one ended, so the stream goes on.
        let at = |index: u64| 48 * MIB + index * chunk;
        assert_eq!(image.note_read(at(0), chunk, true), None);
        assert_eq!(image.note_read(at(2), chunk, true), None);
        assert!(
            image.note_read(at(1), chunk, true).is_some(),
            "1 continues 0"
        );
        assert!(
            image.note_read(at(3), chunk, true).is_some(),
            "3 continues 2"
        );
        // Random reads start streams but continue none.
        for block in [7u64, 1301, 555, 9000, 42, 3333, 12000, 640] {
            assert_eq!(image.note_read(block * 4096 + 1, 4096, true), None);
        }
        // Eight random streams replaced every older one.
        assert_eq!(image.note_read(bases[0] + 2 * chunk, chunk, true), None);
    }

    #[test]
    fn a_punched_hole_reads_zeroes_and_shows_in_the_allocation_map() {
        let directory = tempfile::tempdir().unwrap();
        let image = ImageFile::create(&directory.path().join("a.img"), 4 * MIB).unwrap();
        image
            .write_all_at(0, &vec![0xabu8; 4 * MIB as usize])
            .unwrap();
        image.sync_data().unwrap();
        assert_eq!(
            image.allocation_map(0, 4 * MIB).unwrap(),
            vec![AllocationExtent {
                length_bytes: 4 * MIB,
                hole: false
            }]
        );
        image.punch_hole(MIB, MIB).unwrap();
        let mut buf = vec![1u8; MIB as usize];
        image.read_exact_at(MIB, &mut buf).unwrap();
        assert!(buf.iter().all(|&byte| byte == 0));
        let map = image.allocation_map(0, 4 * MIB).unwrap();
        assert_eq!(
            map,
            vec![
                AllocationExtent {
                    length_bytes: MIB,
                    hole: false
                },
                AllocationExtent {
                    length_bytes: MIB,
                    hole: true
                },
                AllocationExtent {
                    length_bytes: 2 * MIB,
                    hole: false
                },
            ]
        );
        // A sub-range starting inside the hole.
        let map = image.allocation_map(MIB + 4096, MIB).unwrap();
        assert_eq!(
            map,
            vec![
                AllocationExtent {
                    length_bytes: MIB - 4096,
                    hole: true
                },
                AllocationExtent {
                    length_bytes: 4096,
                    hole: false
                },
            ]
        );
    }

    #[test]
    fn an_unaligned_punch_zeroes_exactly_its_range() {
        let directory = tempfile::tempdir().unwrap();
        let image = ImageFile::create(&directory.path().join("a.img"), 64 * 1024).unwrap();
        image.write_all_at(0, &[0x55u8; 64 * 1024]).unwrap();
        image.punch_hole(1000, 10_000).unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        image.read_exact_at(0, &mut buf).unwrap();
        for (position, &byte) in buf.iter().enumerate() {
            let expected = if (1000..11_000).contains(&position) {
                0
            } else {
                0x55
            };
            assert_eq!(byte, expected, "byte {position}");
        }
    }

    #[test]
    fn zero_range_reads_zeroes() {
        let directory = tempfile::tempdir().unwrap();
        let image = ImageFile::create(&directory.path().join("a.img"), 64 * 1024).unwrap();
        image.write_all_at(0, &[0x77u8; 64 * 1024]).unwrap();
        image.zero_range(4096, 3 * 4096 + 7).unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        image.read_exact_at(0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&byte| byte == 0x77));
        assert!(buf[4096..4 * 4096 + 7].iter().all(|&byte| byte == 0));
        assert!(buf[4 * 4096 + 7..].iter().all(|&byte| byte == 0x77));
    }

    #[test]
    fn the_manual_zero_fallback_writes_zeroes() {
        let directory = tempfile::tempdir().unwrap();
        let image = ImageFile::create(&directory.path().join("a.img"), 3 * MIB).unwrap();
        image.write_all_at(0, &vec![9u8; 3 * MIB as usize]).unwrap();
        image.write_zeroes(100, 2 * MIB + 50).unwrap();
        let mut buf = vec![0u8; 3 * MIB as usize];
        image.read_exact_at(0, &mut buf).unwrap();
        assert!(buf[..100].iter().all(|&byte| byte == 9));
        assert!(buf[100..100 + 2 * MIB as usize + 50]
            .iter()
            .all(|&byte| byte == 0));
        assert!(buf[100 + 2 * MIB as usize + 50..]
            .iter()
            .all(|&byte| byte == 9));
    }

    #[test]
    fn next_data_range_skips_holes() {
        let directory = tempfile::tempdir().unwrap();
        let image = ImageFile::create(&directory.path().join("a.img"), 4 * MIB).unwrap();
        assert_eq!(image.next_data_range(0, 4 * MIB).unwrap(), None);
        image.write_all_at(MIB, &vec![1u8; 8192]).unwrap();
        image.write_all_at(3 * MIB, &vec![2u8; 4096]).unwrap();
        let (start, end) = image.next_data_range(0, 4 * MIB).unwrap().unwrap();
        assert!(
            start <= MIB && (MIB + 8192..=3 * MIB).contains(&end),
            "{start}..{end}"
        );
        let (start, end) = image.next_data_range(end, 4 * MIB).unwrap().unwrap();
        assert!(start <= 3 * MIB && end >= 3 * MIB + 4096, "{start}..{end}");
        assert_eq!(image.next_data_range(end, 4 * MIB).unwrap(), None);
        // The limit clamps the range.
        let (_, end) = image.next_data_range(0, MIB + 4096).unwrap().unwrap();
        assert_eq!(end, MIB + 4096);
    }

    #[test]
    fn a_range_zeroed_in_place_stays_allocated_whatever_the_page_cache_holds() {
        let directory = tempfile::tempdir().unwrap();
        let image = ImageFile::create(&directory.path().join("a.img"), 4 * MIB).unwrap();
        image.write_all_at(0, &vec![5u8; 256 * 1024]).unwrap();
        // NO_HOLE zeroing leaves unwritten extents; a punch leaves a hole.
        image.zero_range(64 * 1024, 64 * 1024).unwrap();
        image.punch_hole(192 * 1024, 64 * 1024).unwrap();
        image.sync_data().unwrap();
        // Clean pages dropped: ext4's SEEK_DATA would now call the unwritten range a hole.
        fadvise(&image.file, 0, 0, libc::POSIX_FADV_DONTNEED);
        if image
            .allocated_ranges(0, 4 * MIB, EXTENTS_MAX)
            .unwrap()
            .is_none()
        {
            eprintln!("no FIEMAP on this file system: the lseek fallback cannot tell");
            return;
        }
        let extents = image.allocation_map(0, 4 * MIB).unwrap();
        assert_eq!(
            extents,
            vec![
                AllocationExtent {
                    length_bytes: 192 * 1024,
                    hole: false
                },
                AllocationExtent {
                    length_bytes: 4 * MIB - 192 * 1024,
                    hole: true
                },
            ]
        );
        assert_eq!(
            image.next_data_range(0, 4 * MIB).unwrap(),
            Some((0, 192 * 1024))
        );
        assert_eq!(image.next_data_range(192 * 1024, 4 * MIB).unwrap(), None);
    }

    #[test]
    fn create_replaces_an_existing_file() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("a.img");
        let image = ImageFile::create(&path, 8192).unwrap();
        image.write_all_at(0, &[1u8; 8192]).unwrap();
        drop(image);
        let image = ImageFile::create(&path, 4096).unwrap();
        assert_eq!(image.size_bytes().unwrap(), 4096);
        let mut buf = [1u8; 4096];
        image.read_exact_at(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&byte| byte == 0));
        let reopened = ImageFile::open(&path).unwrap();
        assert_eq!(reopened.size_bytes().unwrap(), 4096);
    }
}
