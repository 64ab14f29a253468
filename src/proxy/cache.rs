//! The proxy's read-through block cache: [`BlockCache`] (pure, bounded in bytes, LRU by block)
//! and [`CacheActor`], its supervised actor shell.
//!
//! Staleness rule: the cache never serves data older than the client's own acknowledged writes.
//! Two mechanisms make that hold:
//!
//! - a write, trim or zero is applied to the cache (full blocks replaced, partial blocks
//!   dropped) after the cluster acknowledged it and *before* the client gets the reply;
//! - a write is registered when it is sent upstream and finished when its reply is in. The
//!   servers may answer writes in any order (NBD allows it), so the order in which two
//!   overlapping writes finish says nothing of the order they were applied in: a write that
//!   overlapped another in flight drops the blocks it covers instead of replacing them, and
//!   the next read fetches what the servers hold;
//! - a read miss takes a fill ticket; every acknowledged write overlapping the ticket's blocks
//!   poisons it, and a poisoned (or unknown) ticket inserts nothing. A read that raced with a
//!   write to the same block can therefore never put the pre-write data back.
//!
//! Readahead: a miss that continues one of the last [`STREAMS_MAX`] sequential streams reads
//! more than was asked, a window that doubles with each such miss up to the largest cacheable
//! range, and fills the cache with all of it under the same ticket, so the client's next reads
//! hit. Every read upstream waits for a ReadIndex round in the cluster; one round then serves
//! many small sequential reads. A random read is never widened.
//!
//! A crash of the actor (a panic in a handler) restarts it cold: all blocks and tickets are
//! forgotten, so fills from before the crash find no ticket and insert nothing. The record of
//! writes in flight is kept, every one marked overlapped: those writes are still on their way,
//! and a write started after the restart that overlaps one must not replace a block either. While the actor
//! is down, sessions bypass it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::actors::supervisor::{run_guarded, Supervision};
use actix::prelude::*;
use bytes::Bytes;

/// One cached block: (volume key, block index).
type BlockKey = (u64, u64);

/// Result of a lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Every block of the range is cached; the bytes of exactly the requested range.
    Hit(Bytes),
    /// Read `length` bytes upstream from the requested offset (the request itself, or more
    /// when reading ahead), then [`BlockCache::fill`] with this ticket and all of that data.
    Miss { ticket: u64, length: u64 },
    /// The range is not cacheable (unaligned or too large): read upstream, insert nothing.
    Bypass,
}

struct Entry {
    data: Bytes,
    /// Position in the LRU order (`BlockCache::recency`).
    used_at: u64,
}

struct Ticket {
    volume: u64,
    first_block: u64,
    /// Exclusive.
    end_block: u64,
    poisoned: bool,
}

/// A write sent upstream and not yet answered: its blocks `[first_block, end_block)`, and
/// whether another write to any of them was in flight at the same time.
struct InFlightWrite {
    volume: u64,
    first_block: u64,
    /// Exclusive.
    end_block: u64,
    overlapped: bool,
}

/// Writes followed at once. Past it a new write is not recorded (its data is dropped from the
/// cache when it is answered, as for an overlapped write), but still marks the recorded writes
/// it overlaps: no record is ever forgotten while its write is in flight.
const WRITES_IN_FLIGHT_MAX: usize = 4096;

static NEXT_WRITE_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh id for [`BlockCache::write_started`], unique in the process (so it can be chosen
/// before the cache is asked, and a cache that restarted in between knows none of them).
pub fn next_write_id() -> u64 {
    NEXT_WRITE_ID.fetch_add(1, Ordering::Relaxed)
}

/// Sequential streams followed for readahead, per cache.
pub const STREAMS_MAX: usize = 8;

/// A sequential reader: its next block, the end of the furthest read issued for it, and the
/// blocks its next widened miss reads.
struct Stream {
    volume: u64,
    next_block: u64,
    fetched_end: u64,
    window_blocks: u64,
    used_at: u64,
}

/// A byte-bounded LRU map of blocks, with fill tickets for read-write races.
pub struct BlockCache {
    capacity_bytes: u64,
    block_size_bytes: u64,
    /// Largest range a lookup may cache (bigger reads bypass the cache).
    range_max_bytes: u64,
    /// Tickets outstanding at once; past it the oldest is dropped (its fill inserts nothing).
    tickets_max: usize,
    /// Largest read ahead, in blocks (0: no readahead).
    readahead_blocks_max: u64,
    streams: Vec<Stream>,
    entries: HashMap<BlockKey, Entry>,
    recency: BTreeMap<u64, BlockKey>,
    tickets: BTreeMap<u64, Ticket>,
    writes: BTreeMap<u64, InFlightWrite>,
    clock: u64,
    next_ticket: u64,
    used_bytes: u64,
}

impl BlockCache {
    /// A cache of `capacity_bytes`; with `read_ahead`, sequential misses read up to the
    /// largest cacheable range (a quarter of the cache, at most 1 MiB).
    pub fn new(capacity_bytes: u64, block_size_bytes: u32, read_ahead: bool) -> Self {
        let block_size_bytes = u64::from(block_size_bytes.max(1));
        // A single read may fill at most a quarter of the cache (so one large scan cannot
        // flush it), but always at least one block.
        let range_max_bytes = (capacity_bytes / 4).min(1 << 20).max(block_size_bytes);
        BlockCache {
            capacity_bytes,
            block_size_bytes,
            range_max_bytes,
            tickets_max: 4096,
            readahead_blocks_max: if read_ahead {
                range_max_bytes / block_size_bytes
            } else {
                0
            },
            streams: Vec::new(),
            entries: HashMap::new(),
            recency: BTreeMap::new(),
            tickets: BTreeMap::new(),
            writes: BTreeMap::new(),
            clock: 0,
            next_ticket: 1,
            used_bytes: 0,
        }
    }

    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    /// The blocks `[first, end)` of an aligned range, or `None` if it is not cacheable.
    fn aligned_blocks(&self, offset: u64, length: u64) -> Option<(u64, u64)> {
        let block = self.block_size_bytes;
        if length == 0 || offset % block != 0 || length % block != 0 {
            return None;
        }
        if length > self.range_max_bytes {
            return None;
        }
        Some((offset / block, (offset + length) / block))
    }

    fn touch(&mut self, key: BlockKey) {
        self.clock += 1;
        let clock = self.clock;
        if let Some(entry) = self.entries.get_mut(&key) {
            self.recency.remove(&entry.used_at);
            entry.used_at = clock;
            self.recency.insert(clock, key);
        }
    }

    /// Looks `[offset, offset + length)` of `volume` (of `volume_size_bytes`) up.
    pub fn lookup(
        &mut self,
        volume: u64,
        offset: u64,
        length: u64,
        volume_size_bytes: u64,
    ) -> Lookup {
        let Some((first, end)) = self.aligned_blocks(offset, length) else {
            return Lookup::Bypass;
        };
        self.clock += 1;
        let stream = self
            .streams
            .iter()
            .position(|stream| stream.volume == volume && stream.next_block == first);
        let all_present = (first..end).all(|block| self.entries.contains_key(&(volume, block)));
        if all_present {
            if let Some(index) = stream {
                self.streams[index].next_block = end;
                self.streams[index].used_at = self.clock;
            }
            for block in first..end {
                self.touch((volume, block));
            }
            if end - first == 1 {
                if let Some(entry) = self.entries.get(&(volume, first)) {
                    return Lookup::Hit(entry.data.clone());
                }
            }
            let mut out = Vec::with_capacity(length as usize);
            for block in first..end {
                if let Some(entry) = self.entries.get(&(volume, block)) {
                    out.extend_from_slice(&entry.data);
                }
            }
            return Lookup::Hit(Bytes::from(out));
        }
        let fetch_end = self.read_ahead_end(stream, volume, first, end, volume_size_bytes);
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.tickets.insert(
            ticket,
            Ticket {
                volume,
                first_block: first,
                end_block: fetch_end,
                poisoned: false,
            },
        );
        while self.tickets.len() > self.tickets_max {
            self.tickets.pop_first();
        }
        Lookup::Miss {
            ticket,
            length: (fetch_end - first) * self.block_size_bytes,
        }
    }

    /// Where a miss of blocks `[first, end)` reads up to: further than `end` when it continues
    /// stream `stream` past the stream's furthest read (whose window then doubles), never past
    /// the volume's last whole block or the largest cacheable range. Only a reader that waits
    /// for each read is read ahead for: while another miss near this one is in flight the
    /// client reads at depth, already has its next reads on the way, and a window would only
    /// read them twice. A miss that continues no stream starts one, replacing the least
    /// recently used.
    fn read_ahead_end(
        &mut self,
        stream: Option<usize>,
        volume: u64,
        first: u64,
        end: u64,
        volume_size_bytes: u64,
    ) -> u64 {
        if self.readahead_blocks_max == 0 {
            return end;
        }
        let requested = end - first;
        let Some(index) = stream else {
            let stream = Stream {
                volume,
                next_block: end,
                fetched_end: end,
                window_blocks: requested,
                used_at: self.clock,
            };
            if self.streams.len() < STREAMS_MAX {
                self.streams.push(stream);
            } else if let Some(oldest) = self.streams.iter_mut().min_by_key(|stream| stream.used_at)
            {
                *oldest = stream;
            }
            return end;
        };
        let reach = self.readahead_blocks_max;
        let near_in_flight = self.tickets.values().any(|ticket| {
            ticket.volume == volume
                && ticket.end_block.saturating_add(reach) > first
                && ticket.first_block < end.saturating_add(reach)
        });
        let stream = &mut self.streams[index];
        stream.next_block = end;
        stream.used_at = self.clock;
        if near_in_flight || end <= stream.fetched_end {
            return end;
        }
        stream.window_blocks = stream
            .window_blocks
            .saturating_mul(2)
            .min(self.readahead_blocks_max)
            .max(requested);
        let volume_blocks = volume_size_bytes / self.block_size_bytes;
        let fetch_end = first
            .saturating_add(stream.window_blocks)
            .min(volume_blocks)
            .max(end);
        stream.fetched_end = fetch_end;
        fetch_end
    }

    /// Inserts the data a read returned, unless a write acknowledged since the lookup touched
    /// the same blocks (or the ticket is unknown: abandoned, evicted, or from before a restart).
    /// Returns whether anything was inserted.
    pub fn fill(&mut self, ticket: u64, data: &Bytes) -> bool {
        let Some(ticket) = self.tickets.remove(&ticket) else {
            return false;
        };
        let expected = (ticket.end_block - ticket.first_block) * self.block_size_bytes;
        if ticket.poisoned || data.len() as u64 != expected {
            return false;
        }
        for (index, block) in (ticket.first_block..ticket.end_block).enumerate() {
            let start = index * self.block_size_bytes as usize;
            // Copied into its own allocation so a cached block never pins a whole large read
            // buffer, which keeps the byte bound exact.
            let block_data =
                Bytes::copy_from_slice(&data[start..start + self.block_size_bytes as usize]);
            self.insert((ticket.volume, block), block_data);
        }
        true
    }

    /// A read that took `ticket` failed: forget the ticket.
    pub fn abandon(&mut self, ticket: u64) {
        self.tickets.remove(&ticket);
    }

    /// The blocks a change of `[offset, offset + length)` touches, whole or in part.
    fn touched_blocks(&self, offset: u64, length: u64) -> (u64, u64) {
        let block = self.block_size_bytes;
        (
            offset / block,
            offset.saturating_add(length).div_ceil(block),
        )
    }

    /// Write `write` (an id from [`next_write_id`]) of `[offset, offset + length)` is being
    /// sent upstream. Must reach the cache before the write can be answered.
    pub fn write_started(&mut self, write: u64, volume: u64, offset: u64, length: u64) {
        let (first, end) = self.touched_blocks(offset, length);
        let mut overlapped = false;
        for other in self.writes.values_mut() {
            if other.volume == volume && other.first_block < end && first < other.end_block {
                other.overlapped = true;
                overlapped = true;
            }
        }
        if self.writes.len() < WRITES_IN_FLIGHT_MAX {
            self.writes.insert(
                write,
                InFlightWrite {
                    volume,
                    first_block: first,
                    end_block: end,
                    overlapped,
                },
            );
        }
    }

    /// Write, trim or zero `write` of `[offset, offset + length)` was answered. `data` is the
    /// written data of a WRITE the cluster acknowledged: the blocks it covers fully are
    /// replaced with it, unless another write to them was in flight at the same time (which
    /// of the two was applied last is unknown) or the write is unknown (started before a
    /// restart of the cache, or forgotten). Otherwise (`None`: a trim, a zero, or a write
    /// that failed and may still land) the blocks are dropped. Must run before the client
    /// sees the reply.
    pub fn write_finished(
        &mut self,
        write: u64,
        volume: u64,
        offset: u64,
        length: u64,
        data: Option<&Bytes>,
    ) {
        let known_alone = self
            .writes
            .remove(&write)
            .is_some_and(|record| !record.overlapped);
        if length == 0 {
            return;
        }
        let data = data.filter(|_| known_alone);
        let block = self.block_size_bytes;
        let (first, end) = self.touched_blocks(offset, length);
        for ticket in self.tickets.values_mut() {
            if ticket.volume == volume && ticket.first_block < end && first < ticket.end_block {
                ticket.poisoned = true;
            }
        }
        for index in first..end {
            let block_start = index * block;
            let covered = block_start >= offset && block_start + block <= offset + length;
            let replacement = match data {
                Some(data) if covered && data.len() as u64 == length => {
                    let start = (block_start - offset) as usize;
                    Some(data.slice(start..start + block as usize))
                }
                _ => None,
            };
            match replacement {
                // Only refresh blocks already cached: a large write must not flush the cache.
                Some(new_data) if self.entries.contains_key(&(volume, index)) => {
                    self.insert((volume, index), Bytes::copy_from_slice(&new_data));
                }
                _ => self.remove((volume, index)),
            }
        }
    }

    fn insert(&mut self, key: BlockKey, data: Bytes) {
        if (data.len() as u64) > self.capacity_bytes {
            return;
        }
        self.remove(key);
        self.clock += 1;
        self.used_bytes += data.len() as u64;
        self.recency.insert(self.clock, key);
        self.entries.insert(
            key,
            Entry {
                data,
                used_at: self.clock,
            },
        );
        while self.used_bytes > self.capacity_bytes {
            let Some((_, oldest)) = self.recency.pop_first() else {
                break;
            };
            if let Some(entry) = self.entries.remove(&oldest) {
                self.used_bytes -= entry.data.len() as u64;
            }
        }
    }

    fn remove(&mut self, key: BlockKey) {
        if let Some(entry) = self.entries.remove(&key) {
            self.recency.remove(&entry.used_at);
            self.used_bytes -= entry.data.len() as u64;
        }
    }

    /// Forgets every block of `volume`; reads of it in flight fill nothing.
    pub fn forget_volume(&mut self, volume: u64) {
        for ticket in self.tickets.values_mut() {
            if ticket.volume == volume {
                ticket.poisoned = true;
            }
        }
        let keys: Vec<BlockKey> = self
            .entries
            .keys()
            .filter(|(of, _)| *of == volume)
            .copied()
            .collect();
        for key in keys {
            self.remove(key);
        }
    }

    /// Forgets every block and ticket (a restart). The writes in flight are still in flight:
    /// their records are kept, marked overlapped, so that neither they nor a write started
    /// after the restart that overlaps one of them replace a block.
    pub fn clear(&mut self) {
        let mut writes = std::mem::take(&mut self.writes);
        for write in writes.values_mut() {
            write.overlapped = true;
        }
        *self = BlockCache::new(
            self.capacity_bytes,
            self.block_size_bytes as u32,
            self.readahead_blocks_max > 0,
        );
        self.writes = writes;
    }
}

/// The cache as a supervised actor (`SupervisedActor`). A panic in a handler stops it; its
/// supervisor restarts it at the same address and `restarting` empties it.
pub struct CacheActor {
    cache: BlockCache,
    logger: slog::Logger,
    supervision: Supervision,
    restarts: u64,
}

impl CacheActor {
    pub fn new(capacity_bytes: u64, block_size_bytes: u32, supervision: Supervision) -> Self {
        CacheActor {
            cache: BlockCache::new(capacity_bytes, block_size_bytes, true),
            logger: supervision.logger.clone(),
            supervision,
            restarts: 0,
        }
    }

    /// Runs a handler body; a panic turns into a cold restart of the actor.
    fn guarded<R>(
        &mut self,
        ctx: &mut Context<Self>,
        fallback: R,
        body: impl FnOnce(&mut BlockCache) -> R,
    ) -> R {
        let cache = &mut self.cache;
        run_guarded(&self.supervision, ctx, |_| body(cache)).unwrap_or(fallback)
    }
}

impl Actor for CacheActor {
    type Context = Context<Self>;
}

impl actix::Supervised for CacheActor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.restarts += 1;
        self.cache.clear();
        slog::warn!(self.logger, "cache actor restarted cold"; "restarts" => self.restarts);
    }
}

/// Session → cache: is `[offset, offset + length)` of `volume` cached?
#[derive(Message)]
#[rtype(result = "Lookup")]
pub struct CacheLookup {
    pub volume: u64,
    pub offset: u64,
    pub length: u64,
    /// Bounds readahead.
    pub volume_size_bytes: u64,
}

/// Session → cache: the data a missed read returned.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CacheFill {
    pub ticket: u64,
    pub data: Bytes,
}

/// Session → cache: the missed read failed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CacheAbandon {
    pub ticket: u64,
}

/// Session → cache, before the request goes upstream: write `write` (an id from
/// [`next_write_id`]) of the range is being sent. Sent without waiting: the mailbox delivers it
/// before the [`CacheWriteFinished`] the same session sends after the reply.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CacheWriteStarted {
    pub write: u64,
    pub volume: u64,
    pub offset: u64,
    pub length: u64,
}

/// Session → cache, awaited before replying to the client: write `write` was acknowledged
/// (`data` its data), or a trim, a zeroing or a write whose outcome is unknown (it failed,
/// but may still land) changed the range (`data` none: the blocks are dropped).
#[derive(Message)]
#[rtype(result = "()")]
pub struct CacheWriteFinished {
    pub write: u64,
    pub volume: u64,
    pub offset: u64,
    pub length: u64,
    pub data: Option<Bytes>,
}

/// Session → cache: the volume was lost to another writer; forget every block of it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CacheForgetVolume {
    pub volume: u64,
}

/// Anyone → cache: panic inside a handler (drills and tests of the restart path).
#[derive(Message)]
#[rtype(result = "()")]
pub struct CacheCrash;

impl Handler<CacheLookup> for CacheActor {
    type Result = MessageResult<CacheLookup>;
    fn handle(&mut self, msg: CacheLookup, ctx: &mut Context<Self>) -> Self::Result {
        let lookup = self.guarded(ctx, Lookup::Bypass, |cache| {
            fail::fail_point!("proxy_cache_lookup", |_| {
                panic!("failpoint proxy_cache_lookup");
            });
            cache.lookup(msg.volume, msg.offset, msg.length, msg.volume_size_bytes)
        });
        let metrics = crate::metrics::global();
        match &lookup {
            Lookup::Hit(_) => &metrics.proxy_cache_hits_total,
            _ => &metrics.proxy_cache_misses_total,
        }
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        MessageResult(lookup)
    }
}

impl Handler<CacheFill> for CacheActor {
    type Result = ();
    fn handle(&mut self, msg: CacheFill, ctx: &mut Context<Self>) {
        self.guarded(ctx, (), |cache| {
            cache.fill(msg.ticket, &msg.data);
        });
    }
}

impl Handler<CacheAbandon> for CacheActor {
    type Result = ();
    fn handle(&mut self, msg: CacheAbandon, ctx: &mut Context<Self>) {
        self.guarded(ctx, (), |cache| cache.abandon(msg.ticket));
    }
}

impl Handler<CacheWriteStarted> for CacheActor {
    type Result = ();
    fn handle(&mut self, msg: CacheWriteStarted, ctx: &mut Context<Self>) {
        self.guarded(ctx, (), |cache| {
            cache.write_started(msg.write, msg.volume, msg.offset, msg.length)
        });
    }
}

impl Handler<CacheWriteFinished> for CacheActor {
    type Result = ();
    fn handle(&mut self, msg: CacheWriteFinished, ctx: &mut Context<Self>) {
        self.guarded(ctx, (), |cache| {
            cache.write_finished(
                msg.write,
                msg.volume,
                msg.offset,
                msg.length,
                msg.data.as_ref(),
            )
        });
    }
}

impl Handler<CacheForgetVolume> for CacheActor {
    type Result = ();
    fn handle(&mut self, msg: CacheForgetVolume, ctx: &mut Context<Self>) {
        self.guarded(ctx, (), |cache| cache.forget_volume(msg.volume));
    }
}

impl Handler<CacheCrash> for CacheActor {
    type Result = ();
    fn handle(&mut self, _: CacheCrash, ctx: &mut Context<Self>) {
        self.guarded(ctx, (), |_| panic!("cache crash requested"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::supervisor::{ActorKind, SupervisedActor};

    /// Size of the volume the tests read.
    const VOLUME: u64 = 1 << 30;

    fn block(fill: u8) -> Bytes {
        Bytes::from(vec![fill; 4096])
    }

    /// A write, trim or zero that was alone in flight, started and answered.
    fn write_alone(
        cache: &mut BlockCache,
        volume: u64,
        offset: u64,
        length: u64,
        data: Option<&Bytes>,
    ) {
        let write = next_write_id();
        cache.write_started(write, volume, offset, length);
        cache.write_finished(write, volume, offset, length, data);
    }

    /// Misses `[offset, offset + length)` and fills what the miss says to read, block `b` of
    /// the volume holding the byte `b % 251`. Returns the length read.
    fn miss_and_fill(cache: &mut BlockCache, offset: u64, length: u64, volume_size: u64) -> u64 {
        let Lookup::Miss {
            ticket,
            length: read,
        } = cache.lookup(1, offset, length, volume_size)
        else {
            panic!("expected a miss at {offset}");
        };
        let data: Vec<u8> = (offset / 4096..(offset + read) / 4096)
            .flat_map(|block| vec![(block % 251) as u8; 4096])
            .collect();
        assert!(cache.fill(ticket, &Bytes::from(data)));
        read
    }

    #[test]
    fn a_forgotten_volume_has_no_block_left_and_its_reads_in_flight_fill_nothing() {
        let mut cache = BlockCache::new(8 << 20, 4096, false);
        miss_and_fill(&mut cache, 0, 4096, VOLUME);
        let Lookup::Miss { ticket, .. } = cache.lookup(1, 8192, 4096, VOLUME) else {
            panic!("expected a miss");
        };
        // Another volume's block stays.
        let Lookup::Miss { ticket: other, .. } = cache.lookup(2, 0, 4096, VOLUME) else {
            panic!("expected a miss");
        };
        assert!(cache.fill(other, &block(7)));
        cache.forget_volume(1);
        assert!(
            !cache.fill(ticket, &block(9)),
            "a read in flight must fill nothing"
        );
        assert!(matches!(
            cache.lookup(1, 0, 4096, VOLUME),
            Lookup::Miss { .. }
        ));
        assert!(matches!(
            cache.lookup(1, 8192, 4096, VOLUME),
            Lookup::Miss { .. }
        ));
        assert!(matches!(cache.lookup(2, 0, 4096, VOLUME), Lookup::Hit(_)));
    }

    #[test]
    fn sequential_misses_read_ahead_in_doubling_windows_and_random_ones_do_not() {
        let mut cache = BlockCache::new(8 << 20, 4096, true);
        const K: u64 = 1024;
        // The first read of a stream is not widened; each further miss doubles the window
        // up to 1 MiB, and the reads in between hit.
        assert_eq!(miss_and_fill(&mut cache, 0, 128 * K, VOLUME), 128 * K);
        assert_eq!(miss_and_fill(&mut cache, 128 * K, 128 * K, VOLUME), 256 * K);
        let Lookup::Hit(hit) = cache.lookup(1, 256 * K, 128 * K, VOLUME) else {
            panic!("read ahead");
        };
        assert_eq!(hit[0], 64, "block 64");
        assert_eq!(miss_and_fill(&mut cache, 384 * K, 128 * K, VOLUME), 512 * K);
        let mut offset = 512 * K;
        let mut reads = Vec::new();
        while offset < 8 << 20 {
            match cache.lookup(1, offset, 128 * K, VOLUME) {
                Lookup::Hit(_) => {}
                Lookup::Miss { ticket, length } => {
                    reads.push(length);
                    let data: Vec<u8> = (offset / 4096..(offset + length) / 4096)
                        .flat_map(|block| vec![(block % 251) as u8; 4096])
                        .collect();
                    assert!(cache.fill(ticket, &Bytes::from(data)));
                }
                Lookup::Bypass => panic!("cacheable"),
            }
            offset += 128 * K;
        }
        // 7.5 MiB from 512 KiB on in 1 MiB windows: 1 MiB, then 128 KiB hits until the next.
        assert_eq!(reads, vec![1 << 20; 8], "windows past 512 KiB");
        // A random read continues no stream: it reads only what it asked for.
        let Lookup::Miss { length, .. } = cache.lookup(1, 100 << 20, 4096, VOLUME) else {
            panic!("cold");
        };
        assert_eq!(length, 4096);
        // Readahead stops at the volume's end.
        let volume = (64 << 20) + 8192;
        assert_eq!(miss_and_fill(&mut cache, 64 << 20, 4096, volume), 4096);
        assert_eq!(
            miss_and_fill(&mut cache, (64 << 20) + 4096, 4096, volume),
            4096,
            "one block left"
        );
    }

    #[test]
    fn a_reader_at_depth_is_not_read_ahead_for() {
        let mut cache = BlockCache::new(8 << 20, 4096, true);
        const K: u64 = 128 * 1024;
        // Eight sequential 128 KiB reads in flight at once: each miss finds the ones before it
        // still in flight, so none is widened.
        let mut tickets = Vec::new();
        for index in 0..8 {
            match cache.lookup(1, index * K, K, VOLUME) {
                Lookup::Miss { ticket, length } => {
                    assert_eq!(length, K, "read {index}");
                    tickets.push(ticket);
                }
                other => panic!("cold, got {other:?}"),
            }
        }
        // Once the reader waits for its reads, the stream is read ahead for again.
        for ticket in tickets {
            cache.abandon(ticket);
        }
        let Lookup::Miss { length, .. } = cache.lookup(1, 8 * K, K, VOLUME) else {
            panic!("cold");
        };
        assert_eq!(length, 2 * K);
    }

    #[test]
    fn a_write_inside_the_read_ahead_window_keeps_the_whole_fill_out() {
        let mut cache = BlockCache::new(8 << 20, 4096, true);
        miss_and_fill(&mut cache, 0, 4096, VOLUME);
        let Lookup::Miss { ticket, length } = cache.lookup(1, 4096, 4096, VOLUME) else {
            panic!("cold");
        };
        assert_eq!(length, 8192, "window doubled");
        // Acknowledged while the widened read was in flight, past the requested block.
        write_alone(&mut cache, 1, 8192, 4096, Some(&block(9)));
        assert!(!cache.fill(ticket, &Bytes::from(vec![0u8; 8192])));
        assert!(matches!(
            cache.lookup(1, 8192, 4096, VOLUME),
            Lookup::Miss { .. }
        ));
    }

    #[test]
    fn no_read_ahead_without_it_and_streams_are_bounded() {
        let mut cache = BlockCache::new(8 << 20, 4096, false);
        for index in 0..4 {
            assert_eq!(miss_and_fill(&mut cache, index * 4096, 4096, VOLUME), 4096);
        }
        let mut cache = BlockCache::new(8 << 20, 4096, true);
        // STREAMS_MAX + 1 interleaved readers, 1 MiB apart: the oldest stream is forgotten.
        let readers = STREAMS_MAX as u64 + 1;
        for reader in 0..readers {
            miss_and_fill(&mut cache, reader << 20, 4096, VOLUME);
        }
        assert_eq!(
            miss_and_fill(&mut cache, 4096, 4096, VOLUME),
            4096,
            "reader 0's stream was replaced"
        );
        assert_eq!(
            miss_and_fill(&mut cache, ((readers - 1) << 20) + 4096, 4096, VOLUME),
            8192,
            "the newest stream continues"
        );
    }

    #[test]
    fn read_through_then_hit() {
        let mut cache = BlockCache::new(1 << 20, 4096, false);
        let Lookup::Miss { ticket, .. } = cache.lookup(1, 8192, 4096, VOLUME) else {
            panic!("a cold cache misses");
        };
        assert!(cache.fill(ticket, &block(7)));
        assert_eq!(cache.lookup(1, 8192, 4096, VOLUME), Lookup::Hit(block(7)));
        // Another volume's block at the same offset is a different block.
        assert!(matches!(
            cache.lookup(2, 8192, 4096, VOLUME),
            Lookup::Miss { .. }
        ));
        // Unaligned ranges are not cached.
        assert_eq!(cache.lookup(1, 100, 4096, VOLUME), Lookup::Bypass);
    }

    /// The race the tickets exist for: a read misses, a write to the same block is
    /// acknowledged, then the read's (older) data arrives. It must not be inserted.
    #[test]
    fn fill_that_raced_with_an_acknowledged_write_inserts_nothing() {
        let mut cache = BlockCache::new(1 << 20, 4096, false);
        let Lookup::Miss { ticket, .. } = cache.lookup(1, 0, 8192, VOLUME) else {
            panic!("miss");
        };
        write_alone(&mut cache, 1, 4096, 512, None);
        assert!(!cache.fill(ticket, &Bytes::from(vec![1u8; 8192])));
        assert!(matches!(
            cache.lookup(1, 0, 4096, VOLUME),
            Lookup::Miss { .. }
        ));
        // A write to another volume or another block does not poison the ticket.
        let Lookup::Miss { ticket, .. } = cache.lookup(1, 0, 4096, VOLUME) else {
            panic!("miss");
        };
        write_alone(&mut cache, 2, 0, 4096, Some(&block(9)));
        write_alone(&mut cache, 1, 4096, 4096, Some(&block(9)));
        assert!(cache.fill(ticket, &block(1)));
        assert_eq!(cache.lookup(1, 0, 4096, VOLUME), Lookup::Hit(block(1)));
    }

    /// An acknowledged write replaces cached full blocks and drops partially written ones, so
    /// a later read never sees pre-write data.
    #[test]
    fn acknowledged_writes_update_or_drop_cached_blocks() {
        let mut cache = BlockCache::new(1 << 20, 4096, false);
        for index in 0..3u64 {
            let Lookup::Miss { ticket, .. } = cache.lookup(1, index * 4096, 4096, VOLUME) else {
                panic!("miss");
            };
            assert!(cache.fill(ticket, &block(1)));
        }
        // Writes 4096..12288 + 100: block 1 fully, block 2 fully, block 3 partially... block 3
        // was never cached; block 2 is covered only in part here.
        let mut data = vec![5u8; 4096 + 100];
        data[0] = 6;
        write_alone(&mut cache, 1, 4096, 4096 + 100, Some(&Bytes::from(data)));
        let Lookup::Hit(hit) = cache.lookup(1, 4096, 4096, VOLUME) else {
            panic!("block 1 was replaced, not dropped");
        };
        assert_eq!(hit[0], 6);
        assert_eq!(hit[1], 5);
        assert!(matches!(
            cache.lookup(1, 8192, 4096, VOLUME),
            Lookup::Miss { .. }
        ));
        assert_eq!(cache.lookup(1, 0, 4096, VOLUME), Lookup::Hit(block(1)));
        write_alone(&mut cache, 1, 0, 4096, None);
        assert!(matches!(
            cache.lookup(1, 0, 4096, VOLUME),
            Lookup::Miss { .. }
        ));
    }

    #[test]
    fn bounded_in_bytes_with_least_recently_used_eviction() {
        let mut cache = BlockCache::new(3 * 4096, 4096, false);
        for index in 0..3u64 {
            let Lookup::Miss { ticket, .. } = cache.lookup(1, index * 4096, 4096, VOLUME) else {
                panic!("miss");
            };
            assert!(cache.fill(ticket, &block(index as u8)));
        }
        // Use block 0 so block 1 becomes the least recently used.
        assert!(matches!(cache.lookup(1, 0, 4096, VOLUME), Lookup::Hit(_)));
        let Lookup::Miss { ticket, .. } = cache.lookup(1, 3 * 4096, 4096, VOLUME) else {
            panic!("miss");
        };
        assert!(cache.fill(ticket, &block(3)));
        assert_eq!(cache.used_bytes(), 3 * 4096);
        assert!(matches!(
            cache.lookup(1, 4096, 4096, VOLUME),
            Lookup::Miss { .. }
        ));
        assert!(matches!(cache.lookup(1, 0, 4096, VOLUME), Lookup::Hit(_)));
    }

    /// A restart forgets tickets too: a fill started before it inserts nothing.
    #[test]
    fn tickets_do_not_survive_a_restart() {
        let mut cache = BlockCache::new(1 << 20, 4096, false);
        let Lookup::Miss { ticket, .. } = cache.lookup(1, 0, 4096, VOLUME) else {
            panic!("miss");
        };
        cache.clear();
        assert!(!cache.fill(ticket, &block(1)));
        assert_eq!(cache.used_bytes(), 0);
    }

    #[test]
    fn writes_that_overlapped_in_flight_drop_their_blocks_whatever_order_they_finish_in() {
        let mut cache = BlockCache::new(8 << 20, 4096, false);
        miss_and_fill(&mut cache, 0, 3 * 4096, VOLUME);
        let (first, second, elsewhere) = (next_write_id(), next_write_id(), next_write_id());
        cache.write_started(first, 1, 0, 4096);
        // Overlaps `first` in its second block only.
        cache.write_started(second, 1, 0, 2 * 4096);
        cache.write_started(elsewhere, 1, 2 * 4096, 4096);
        cache.write_finished(second, 1, 0, 2 * 4096, Some(&Bytes::from(vec![0xbb; 8192])));
        cache.write_finished(first, 1, 0, 4096, Some(&block(0xaa)));
        cache.write_finished(elsewhere, 1, 2 * 4096, 4096, Some(&block(0xcc)));
        assert!(matches!(
            cache.lookup(1, 0, 4096, VOLUME),
            Lookup::Miss { .. }
        ));
        assert!(matches!(
            cache.lookup(1, 4096, 4096, VOLUME),
            Lookup::Miss { .. }
        ));
        assert_eq!(
            cache.lookup(1, 2 * 4096, 4096, VOLUME),
            Lookup::Hit(block(0xcc))
        );
        // Once neither is in flight, a write replaces its block again.
        write_alone(&mut cache, 1, 2 * 4096, 4096, Some(&block(0xdd)));
        assert_eq!(
            cache.lookup(1, 2 * 4096, 4096, VOLUME),
            Lookup::Hit(block(0xdd))
        );
    }

    /// The servers applied B, then A (both to block 0); A is answered first and a read then
    /// fills block 0 with A's data, the servers' current content; B's answer must not replace
    /// it, whether A was pushed out of the record of writes in flight or the cache restarted
    /// between the two starts.
    fn b_must_not_replace_a(cache: &mut BlockCache, a: u64, b: u64) {
        cache.write_finished(a, 1, 0, 4096, Some(&block(0xaa)));
        let Lookup::Miss { ticket, .. } = cache.lookup(1, 0, 4096, VOLUME) else {
            panic!("A's block was dropped");
        };
        assert!(cache.fill(ticket, &block(0xaa)));
        cache.write_finished(b, 1, 0, 4096, Some(&block(0xbb)));
        assert_ne!(
            cache.lookup(1, 0, 4096, VOLUME),
            Lookup::Hit(block(0xbb)),
            "the cache holds B's data while the servers hold A's"
        );
    }

    #[test]
    fn a_write_overlapping_one_pushed_out_of_the_record_does_not_replace_newer_data() {
        let mut cache = BlockCache::new(8 << 20, 4096, false);
        let a = next_write_id();
        cache.write_started(a, 1, 0, 4096);
        for index in 0..WRITES_IN_FLIGHT_MAX as u64 {
            cache.write_started(next_write_id(), 1, (index + 1) * 4096, 4096);
        }
        let b = next_write_id();
        cache.write_started(b, 1, 0, 4096);
        b_must_not_replace_a(&mut cache, a, b);
    }

    #[test]
    fn a_write_started_after_a_restart_does_not_replace_newer_data() {
        let mut cache = BlockCache::new(8 << 20, 4096, false);
        let a = next_write_id();
        cache.write_started(a, 1, 0, 4096);
        cache.clear();
        let b = next_write_id();
        cache.write_started(b, 1, 0, 4096);
        b_must_not_replace_a(&mut cache, a, b);
    }

    #[test]
    fn a_write_the_cache_never_saw_start_drops_its_blocks() {
        let mut cache = BlockCache::new(8 << 20, 4096, false);
        miss_and_fill(&mut cache, 0, 4096, VOLUME);
        // As after a restart of the cache between the start and the reply.
        cache.write_finished(next_write_id(), 1, 0, 4096, Some(&block(0xaa)));
        assert!(matches!(
            cache.lookup(1, 0, 4096, VOLUME),
            Lookup::Miss { .. }
        ));
    }

    /// The actor shell: a panic restarts it cold at the same address, and it keeps serving.
    #[actix_rt::test]
    async fn actor_restarts_cold_after_a_panic() {
        let supervision = Supervision {
            kind: ActorKind::Cache,
            logger: slog::Logger::root(slog::Discard, slog::o!()),
            counters: crate::actors::supervisor::RestartCounters::new(),
        };
        let cache = SupervisedActor::start(supervision.clone(), move |_| {
            CacheActor::new(1 << 20, 4096, supervision)
        });
        let Ok(Lookup::Miss { ticket, .. }) = cache
            .send(CacheLookup {
                volume: 1,
                offset: 0,
                length: 4096,
                volume_size_bytes: VOLUME,
            })
            .await
        else {
            panic!("miss");
        };
        cache.do_send(CacheFill {
            ticket,
            data: block(4),
        });
        let hit = cache
            .send(CacheLookup {
                volume: 1,
                offset: 0,
                length: 4096,
                volume_size_bytes: VOLUME,
            })
            .await
            .expect("alive");
        assert_eq!(hit, Lookup::Hit(block(4)));
        let _ = cache.send(CacheCrash).await;
        let after = cache
            .send(CacheLookup {
                volume: 1,
                offset: 0,
                length: 4096,
                volume_size_bytes: VOLUME,
            })
            .await
            .expect("restarted at the same address");
        assert!(matches!(after, Lookup::Miss { .. }));
    }
}
