//! Snapshots of one Raft group, for a follower too far behind the leader's log.
//!
//! A snapshot is a FUZZY copy plus log replay, never a frozen image:
//! - `RaftLogStore::snapshot` (raft-rs asks for it) answers metadata only: index X0 = the state
//!   machine's applied index at that moment, its term, the current conf state, and a small
//!   descriptor ([`SnapshotDescriptor`]) as `data`. Unavailable (raft-rs retries later) when the
//!   conf state is newer than X0, when raft-rs needs a newer snapshot, or when the term of X0
//!   is no longer in the log.
//! - The transport then streams the bytes separately: [`SnapshotSource`] (made by
//!   `StateMachine::snapshot_source`, on the apply thread) captures the volume table as of the
//!   state machine's applied index A >= X0 (its "covered index") and holds the images open;
//!   [`SnapshotSource::next_chunk`] yields one `Volume` chunk per volume, then `Data` chunks of
//!   the allocated ranges only (SEEK_DATA/SEEK_HOLE; holes are skipped), then an `End` chunk
//!   with the counts. Every chunk carries a crc32c; decoding ([`decode_snapshot_chunk`]) is a
//!   pure function over bytes.
//! - The leader keeps applying while the copy runs, so each block is copied as of some index
//!   I_b >= A, possibly caught in the middle of a write. That is correct because the follower
//!   installs at X0 and then receives every entry after X0 from the leader's log: entries up to
//!   A are already in the copied state and are skipped (the installed state records A as its
//!   "covered index"), and entries after A are applied again over the copy. Writes, trims and
//!   zeroing are overwrites, so replaying the entries after A over a block copied at I_b gives
//!   exactly the block after I_b, and the volume table replays from exactly A, so attach,
//!   detach, fencing, create and delete decide as they did on the leader.
//! - [`SnapshotStaging`] receives the chunks on the follower: it validates every chunk against
//!   what was declared (data only for declared volumes, block aligned, in range, ascending
//!   without overlap, so never more bytes than the declared sizes), writes new image files in a
//!   staging directory under the images directory, and appends the crc32c of every non-zero
//!   block to a staging file (memory stays bounded whatever the volume sizes).
//!   [`SnapshotStaging::finish`] fdatasyncs images, checksum file and directory.
//! - `StateMachine::install_snapshot` switches to the staged state with ONE synced RocksDB
//!   batch; see the state machine's module doc ("Snapshots") for its crash safety.
//!
//! Limits: a chunk carries at most [`SNAPSHOT_CHUNK_DATA_BYTES_MAX`] data bytes, a snapshot at
//! most [`SNAPSHOT_VOLUMES_MAX`] volumes; names and client ids the command limits.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::command::{CLIENT_ID_LENGTH_BYTES_MAX, VOLUME_NAME_LENGTH_BYTES_MAX};
use super::image::{sync_directory, ImageFile};
use super::state_machine::{valid_volume_geometry, Attachment, VolumeInfo, VolumeReader};
use super::StorageError;
use crate::config::MemberConfig;

/// Format of the chunks and of the descriptor.
pub const SNAPSHOT_FORMAT_VERSION: u8 = 1;
/// Most block data bytes one `Data` chunk carries (larger requests are cut to this).
pub const SNAPSHOT_CHUNK_DATA_BYTES_MAX: usize = 4 << 20;
/// Most volumes one snapshot may declare.
pub const SNAPSHOT_VOLUMES_MAX: usize = 4096;

/// version, kind, body length (u32).
const CHUNK_HEADER_BYTES: usize = 1 + 1 + 4;
/// crc32c of header and body.
const CHUNK_TRAILER_BYTES: usize = 4;
/// volume id, offset.
const DATA_CHUNK_FIELDS_BYTES: usize = 8 + 8;
/// The largest encoded chunk: a full `Data` chunk (a `Volume` chunk is far smaller).
pub const SNAPSHOT_CHUNK_BYTES_MAX: usize = CHUNK_HEADER_BYTES
    + DATA_CHUNK_FIELDS_BYTES
    + SNAPSHOT_CHUNK_DATA_BYTES_MAX
    + CHUNK_TRAILER_BYTES;

const KIND_VOLUME: u8 = 1;
const KIND_DATA: u8 = 2;
const KIND_END: u8 = 3;
const FLAG_ATTACHED: u8 = 0x01;
/// The attachment carries the attach id of the request that made it (after the client id).
const FLAG_ATTACH_ID: u8 = 0x02;

/// Bytes of one record of the staged checksum file: volume id, block index, crc32c.
const CHECKSUM_RECORD_BYTES: usize = 8 + 8 + 4;
/// Name prefix of staging directories inside the images directory; the group id follows.
const STAGING_DIRECTORY_PREFIX: &str = "staging-group-";
const CHECKSUM_FILE_NAME: &str = "checksums.bin";

/// Whether `file_name` (in the images directory) is a staging directory of `group_id`.
pub(crate) fn is_staging_directory_of(group_id: u64, file_name: &str) -> bool {
    file_name.starts_with(&format!("{STAGING_DIRECTORY_PREFIX}{group_id}-"))
}

/// The `data` of the raft-rs `Snapshot` message: which group and index the bytes streamed
/// beside it belong to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotDescriptor {
    pub group_id: u64,
    pub snapshot_index: u64,
    /// The member directory at the snapshot's conf state: a node that catches up by snapshot
    /// learns the addresses of members added by entries it never sees.
    pub members: Vec<MemberConfig>,
}

impl SnapshotDescriptor {
    const ENCODED_BYTES: usize = 1 + 8 + 8;

    /// Version, group id, snapshot index, then the member directory as JSON.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(Self::ENCODED_BYTES + 128 * self.members.len());
        bytes.push(SNAPSHOT_FORMAT_VERSION);
        bytes.extend_from_slice(&self.group_id.to_be_bytes());
        bytes.extend_from_slice(&self.snapshot_index.to_be_bytes());
        serde_json::to_writer(&mut bytes, &self.members).expect("member records serialize");
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, SnapshotChunkDecodeError> {
        if bytes.len() < Self::ENCODED_BYTES {
            return Err(SnapshotChunkDecodeError::BadLength {
                length_bytes: bytes.len(),
            });
        }
        if bytes[0] != SNAPSHOT_FORMAT_VERSION {
            return Err(SnapshotChunkDecodeError::UnsupportedVersion { version: bytes[0] });
        }
        let mut fields = Fields {
            kind: 0,
            bytes: &bytes[1..],
        };
        let group_id = fields.u64()?;
        let snapshot_index = fields.u64()?;
        // Empty: a descriptor without a directory (no members recorded).
        let member_bytes = &bytes[Self::ENCODED_BYTES..];
        let members = if member_bytes.is_empty() {
            Vec::new()
        } else {
            super::raft_log::decode_members(member_bytes).map_err(|_| {
                SnapshotChunkDecodeError::BadLength {
                    length_bytes: bytes.len(),
                }
            })?
        };
        Ok(SnapshotDescriptor {
            group_id,
            snapshot_index,
            members,
        })
    }
}

/// The last chunk of a snapshot stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotEnd {
    pub group_id: u64,
    /// The applied index whose volume table the stream carries (>= the snapshot index).
    pub covered_index: u64,
    pub volume_count: u64,
    pub data_chunk_count: u64,
    pub data_bytes: u64,
}

/// One decoded chunk of a snapshot stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotChunk<'a> {
    /// A row of the volume table (with its attachment).
    Volume(VolumeInfo),
    /// Whole blocks of a volume at `offset`.
    Data {
        volume_id: u64,
        offset: u64,
        data: &'a [u8],
    },
    End(SnapshotEnd),
}

/// Why bytes are not a snapshot chunk (or descriptor).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotChunkDecodeError {
    #[error("{length_bytes} bytes is not a possible chunk length")]
    BadLength { length_bytes: usize },
    #[error("unsupported snapshot format version {version}")]
    UnsupportedVersion { version: u8 },
    #[error("unknown chunk kind {kind}")]
    UnknownKind { kind: u8 },
    #[error("chunk declares a {declared_body_bytes}-byte body but carries {actual_body_bytes}")]
    BodyLengthMismatch {
        declared_body_bytes: usize,
        actual_body_bytes: usize,
    },
    #[error(
        "chunk crc32c {recorded_crc32c:#010x} does not match computed {computed_crc32c:#010x}"
    )]
    ChecksumMismatch {
        recorded_crc32c: u32,
        computed_crc32c: u32,
    },
    #[error("chunk of kind {kind} is truncated")]
    Truncated { kind: u8 },
    #[error("chunk of kind {kind} has {extra_bytes} bytes after its fields")]
    TrailingBytes { kind: u8, extra_bytes: usize },
    #[error("reserved flags {flags:#04x} are set")]
    ReservedFlags { flags: u8 },
    #[error("{field} of {length_bytes} bytes is too long")]
    TextTooLong {
        field: &'static str,
        length_bytes: usize,
    },
    #[error("{field} is not UTF-8")]
    TextNotUtf8 { field: &'static str },
    #[error("data chunk without data")]
    EmptyData,
}

/// A cursor over the body of one chunk; every read checks the remaining length.
struct Fields<'a> {
    kind: u8,
    bytes: &'a [u8],
}

impl<'a> Fields<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8], SnapshotChunkDecodeError> {
        if self.bytes.len() < count {
            return Err(SnapshotChunkDecodeError::Truncated { kind: self.kind });
        }
        let (head, rest) = self.bytes.split_at(count);
        self.bytes = rest;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64, SnapshotChunkDecodeError> {
        let mut array = [0u8; 8];
        array.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(array))
    }

    fn u32(&mut self) -> Result<u32, SnapshotChunkDecodeError> {
        let mut array = [0u8; 4];
        array.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(array))
    }

    fn u8(&mut self) -> Result<u8, SnapshotChunkDecodeError> {
        Ok(self.take(1)?[0])
    }

    fn text(
        &mut self,
        field: &'static str,
        length_bytes_max: usize,
    ) -> Result<&'a str, SnapshotChunkDecodeError> {
        let mut array = [0u8; 2];
        array.copy_from_slice(self.take(2)?);
        let length_bytes = usize::from(u16::from_be_bytes(array));
        if length_bytes > length_bytes_max {
            return Err(SnapshotChunkDecodeError::TextTooLong {
                field,
                length_bytes,
            });
        }
        std::str::from_utf8(self.take(length_bytes)?)
            .map_err(|_| SnapshotChunkDecodeError::TextNotUtf8 { field })
    }

    fn finish(self) -> Result<(), SnapshotChunkDecodeError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(SnapshotChunkDecodeError::TrailingBytes {
                kind: self.kind,
                extra_bytes: self.bytes.len(),
            })
        }
    }
}

fn push_text(bytes: &mut Vec<u8>, text: &str, length_bytes_max: usize) {
    let mut end = text.len().min(length_bytes_max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    // `end` is at most 255, which fits a u16.
    let length = u16::try_from(end).unwrap_or(u16::MAX);
    bytes.extend_from_slice(&length.to_be_bytes());
    bytes.extend_from_slice(&text.as_bytes()[..end]);
}

/// Encodes one chunk: header, body, crc32c. Names and client ids longer than their limits are
/// cut (the state machine never holds such rows: commands carry at most the same limits).
pub fn encode_snapshot_chunk(chunk: &SnapshotChunk<'_>) -> Vec<u8> {
    let (kind, body) = match chunk {
        SnapshotChunk::Volume(info) => {
            let mut body = Vec::with_capacity(64 + info.name.len());
            body.extend_from_slice(&info.id.to_be_bytes());
            body.extend_from_slice(&info.size_bytes.to_be_bytes());
            body.extend_from_slice(&info.block_size_bytes.to_be_bytes());
            push_text(&mut body, &info.name, VOLUME_NAME_LENGTH_BYTES_MAX);
            match &info.attachment {
                None => body.push(0),
                Some(attachment) => {
                    let mut flags = FLAG_ATTACHED;
                    if attachment.attach_id.is_some() {
                        flags |= FLAG_ATTACH_ID;
                    }
                    body.push(flags);
                    body.extend_from_slice(&attachment.epoch.to_be_bytes());
                    push_text(&mut body, &attachment.client, CLIENT_ID_LENGTH_BYTES_MAX);
                    if let Some(attach_id) = attachment.attach_id {
                        body.extend_from_slice(&attach_id.to_be_bytes());
                    }
                }
            }
            (KIND_VOLUME, body)
        }
        SnapshotChunk::Data {
            volume_id,
            offset,
            data,
        } => {
            let mut body = Vec::with_capacity(DATA_CHUNK_FIELDS_BYTES + data.len());
            body.extend_from_slice(&volume_id.to_be_bytes());
            body.extend_from_slice(&offset.to_be_bytes());
            body.extend_from_slice(data);
            (KIND_DATA, body)
        }
        SnapshotChunk::End(end) => {
            let mut body = Vec::with_capacity(40);
            for value in [
                end.group_id,
                end.covered_index,
                end.volume_count,
                end.data_chunk_count,
                end.data_bytes,
            ] {
                body.extend_from_slice(&value.to_be_bytes());
            }
            (KIND_END, body)
        }
    };
    let mut bytes = Vec::with_capacity(CHUNK_HEADER_BYTES + body.len() + CHUNK_TRAILER_BYTES);
    bytes.push(SNAPSHOT_FORMAT_VERSION);
    bytes.push(kind);
    // Bodies are bounded far below 4 GiB (the data of a chunk by the source).
    bytes.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    bytes.extend_from_slice(&body);
    let crc32c = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc32c.to_be_bytes());
    bytes
}

/// Decodes one chunk; a `Data` chunk borrows its data. Never panics; rejects anything
/// malformed (length outside the bounds, checksum, version, kind, field shapes).
pub fn decode_snapshot_chunk(bytes: &[u8]) -> Result<SnapshotChunk<'_>, SnapshotChunkDecodeError> {
    if bytes.len() < CHUNK_HEADER_BYTES + CHUNK_TRAILER_BYTES
        || bytes.len() > SNAPSHOT_CHUNK_BYTES_MAX
    {
        return Err(SnapshotChunkDecodeError::BadLength {
            length_bytes: bytes.len(),
        });
    }
    let (covered, trailer) = bytes.split_at(bytes.len() - CHUNK_TRAILER_BYTES);
    let mut recorded = [0u8; 4];
    recorded.copy_from_slice(trailer);
    let recorded_crc32c = u32::from_be_bytes(recorded);
    let computed_crc32c = crc32c::crc32c(covered);
    if recorded_crc32c != computed_crc32c {
        return Err(SnapshotChunkDecodeError::ChecksumMismatch {
            recorded_crc32c,
            computed_crc32c,
        });
    }
    let version = covered[0];
    if version != SNAPSHOT_FORMAT_VERSION {
        return Err(SnapshotChunkDecodeError::UnsupportedVersion { version });
    }
    let kind = covered[1];
    let mut length = [0u8; 4];
    length.copy_from_slice(&covered[2..CHUNK_HEADER_BYTES]);
    let declared_body_bytes = usize::try_from(u32::from_be_bytes(length)).unwrap_or(usize::MAX);
    let body = &covered[CHUNK_HEADER_BYTES..];
    if declared_body_bytes != body.len() {
        return Err(SnapshotChunkDecodeError::BodyLengthMismatch {
            declared_body_bytes,
            actual_body_bytes: body.len(),
        });
    }
    let mut fields = Fields { kind, bytes: body };
    let chunk = match kind {
        KIND_VOLUME => {
            let id = fields.u64()?;
            let size_bytes = fields.u64()?;
            let block_size_bytes = fields.u32()?;
            let name = fields
                .text("volume name", VOLUME_NAME_LENGTH_BYTES_MAX)?
                .to_string();
            let flags = fields.u8()?;
            let attached = flags & FLAG_ATTACHED != 0;
            if flags & !(FLAG_ATTACHED | FLAG_ATTACH_ID) != 0
                || (!attached && flags & FLAG_ATTACH_ID != 0)
            {
                return Err(SnapshotChunkDecodeError::ReservedFlags { flags });
            }
            let attachment = if attached {
                let epoch = fields.u64()?;
                let client = fields
                    .text("client id", CLIENT_ID_LENGTH_BYTES_MAX)?
                    .to_string();
                let attach_id = if flags & FLAG_ATTACH_ID != 0 {
                    Some(fields.u64()?)
                } else {
                    None
                };
                Some(Attachment {
                    client,
                    epoch,
                    attach_id,
                })
            } else {
                None
            };
            SnapshotChunk::Volume(VolumeInfo {
                id,
                name,
                size_bytes,
                block_size_bytes,
                attachment,
            })
        }
        KIND_DATA => {
            let volume_id = fields.u64()?;
            let offset = fields.u64()?;
            let data = std::mem::take(&mut fields.bytes);
            if data.is_empty() {
                return Err(SnapshotChunkDecodeError::EmptyData);
            }
            SnapshotChunk::Data {
                volume_id,
                offset,
                data,
            }
        }
        KIND_END => SnapshotChunk::End(SnapshotEnd {
            group_id: fields.u64()?,
            covered_index: fields.u64()?,
            volume_count: fields.u64()?,
            data_chunk_count: fields.u64()?,
            data_bytes: fields.u64()?,
        }),
        kind => return Err(SnapshotChunkDecodeError::UnknownKind { kind }),
    };
    fields.finish()?;
    Ok(chunk)
}

/// Where a [`SnapshotSource`] is in its stream.
enum SourcePosition {
    /// Next: the `Volume` chunk of volume `0`.
    Volume(usize),
    /// Next: data of volume `0` at or after offset `1` (block aligned).
    Data(usize, u64),
    End,
    Done,
}

/// The sending side of a snapshot: see the module doc. `Send + 'static`, so the transport can
/// run it on any thread; it holds the images open (readers), so a volume deleted meanwhile is
/// simply skipped, and one replaced by an installed snapshot fails the stream.
pub struct SnapshotSource {
    group_id: u64,
    covered_index: u64,
    volumes: Vec<(VolumeInfo, VolumeReader)>,
    position: SourcePosition,
    data_chunk_count: u64,
    data_bytes: u64,
}

impl SnapshotSource {
    pub(crate) fn new(
        group_id: u64,
        covered_index: u64,
        volumes: Vec<(VolumeInfo, VolumeReader)>,
    ) -> Self {
        SnapshotSource {
            group_id,
            covered_index,
            volumes,
            position: SourcePosition::Volume(0),
            data_chunk_count: 0,
            data_bytes: 0,
        }
    }

    /// The applied index whose volume table this source carries (>= any snapshot index
    /// taken before it).
    pub fn covered_index(&self) -> u64 {
        self.covered_index
    }

    /// The next encoded chunk, with at most `data_bytes_max` data bytes (cut to
    /// [`SNAPSHOT_CHUNK_DATA_BYTES_MAX`], and never less than one volume block); `None` after
    /// the `End` chunk.
    pub fn next_chunk(&mut self, data_bytes_max: usize) -> Result<Option<Vec<u8>>, StorageError> {
        loop {
            match self.position {
                SourcePosition::Volume(index) => {
                    let Some((info, _)) = self.volumes.get(index) else {
                        self.position = SourcePosition::Data(0, 0);
                        continue;
                    };
                    let chunk = encode_snapshot_chunk(&SnapshotChunk::Volume(info.clone()));
                    self.position = SourcePosition::Volume(index + 1);
                    return Ok(Some(chunk));
                }
                SourcePosition::Data(index, offset) => {
                    let Some((info, reader)) = self.volumes.get(index) else {
                        self.position = SourcePosition::End;
                        continue;
                    };
                    let next_volume = SourcePosition::Data(index + 1, 0);
                    let range = match reader.next_data_range(offset, info.size_bytes) {
                        Ok(range) => range,
                        // Deleted since the table was captured: see below.
                        Err(StorageError::VolumeDeleted { .. }) => None,
                        Err(error) => return Err(error),
                    };
                    let Some((start, end)) = range else {
                        self.position = next_volume;
                        continue;
                    };
                    // Whole volume blocks: the receiver checksums blocks.
                    let block_bytes = u64::from(info.block_size_bytes);
                    let start = start / block_bytes * block_bytes;
                    let end = end.div_ceil(block_bytes).saturating_mul(block_bytes);
                    let end = end.min(info.size_bytes);
                    let chunk_bytes_max =
                        (data_bytes_max.min(SNAPSHOT_CHUNK_DATA_BYTES_MAX) as u64) / block_bytes
                            * block_bytes;
                    let length = (end - start).min(chunk_bytes_max.max(block_bytes));
                    let mut data = vec![0u8; length as usize];
                    match reader.read(start, &mut data) {
                        Ok(()) => {}
                        // Deleted since the table was captured: the follower replays the
                        // delete (its index is above the covered index), so its data is moot.
                        Err(StorageError::VolumeDeleted { .. }) => {
                            self.position = next_volume;
                            continue;
                        }
                        Err(error) => return Err(error),
                    }
                    self.position = SourcePosition::Data(index, start + length);
                    self.data_chunk_count += 1;
                    self.data_bytes += length;
                    return Ok(Some(encode_snapshot_chunk(&SnapshotChunk::Data {
                        volume_id: info.id,
                        offset: start,
                        data: &data,
                    })));
                }
                SourcePosition::End => {
                    self.position = SourcePosition::Done;
                    return Ok(Some(encode_snapshot_chunk(&SnapshotChunk::End(
                        SnapshotEnd {
                            group_id: self.group_id,
                            covered_index: self.covered_index,
                            volume_count: self.volumes.len() as u64,
                            data_chunk_count: self.data_chunk_count,
                            data_bytes: self.data_bytes,
                        },
                    ))));
                }
                SourcePosition::Done => return Ok(None),
            }
        }
    }
}

/// A staging directory that is removed when dropped, unless it was emptied by an install.
struct StagingDirectory {
    path: PathBuf,
}

impl Drop for StagingDirectory {
    fn drop(&mut self) {
        // Best effort: a leftover is removed by the next `StateMachine::open`.
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn staged_image_path(directory: &Path, volume_id: u64) -> PathBuf {
    directory.join(format!("volume-{volume_id}.img"))
}

struct StagingVolume {
    info: VolumeInfo,
    image: ImageFile,
    /// Data chunks must arrive in ascending order without overlap: the next allowed offset.
    next_offset: u64,
}

/// The receiving side of a snapshot: see the module doc.
pub struct SnapshotStaging {
    directory: StagingDirectory,
    group_id: u64,
    snapshot_index: u64,
    volumes: BTreeMap<u64, StagingVolume>,
    names: BTreeSet<String>,
    data_started: bool,
    end: Option<SnapshotEnd>,
    data_chunk_count: u64,
    data_bytes: u64,
    checksums: BufWriter<File>,
    checksum_path: PathBuf,
}

/// Makes staging directory names unique within the process (several attempts may overlap).
static STAGING_SEQUENCE: AtomicU64 = AtomicU64::new(0);

impl SnapshotStaging {
    /// Creates an empty staging directory for the snapshot of `group_id` at
    /// `snapshot_index` under `images_dir`.
    pub fn begin(
        images_dir: &Path,
        group_id: u64,
        snapshot_index: u64,
    ) -> Result<Self, StorageError> {
        std::fs::create_dir_all(images_dir).map_err(|error| StorageError::io(images_dir, error))?;
        let sequence = STAGING_SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let path = images_dir.join(format!(
            "{STAGING_DIRECTORY_PREFIX}{group_id}-index-{snapshot_index}-{}-{sequence}",
            std::process::id()
        ));
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(StorageError::io(&path, error)),
        }
        std::fs::create_dir(&path).map_err(|error| StorageError::io(&path, error))?;
        let directory = StagingDirectory { path };
        let checksum_path = directory.path.join(CHECKSUM_FILE_NAME);
        let checksum_file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&checksum_path)
            .map_err(|error| StorageError::io(&checksum_path, error))?;
        Ok(SnapshotStaging {
            directory,
            group_id,
            snapshot_index,
            volumes: BTreeMap::new(),
            names: BTreeSet::new(),
            data_started: false,
            end: None,
            data_chunk_count: 0,
            data_bytes: 0,
            checksums: BufWriter::new(checksum_file),
            checksum_path,
        })
    }

    fn stream_error(&self, detail: impl Into<String>) -> StorageError {
        StorageError::SnapshotStream {
            group_id: self.group_id,
            snapshot_index: self.snapshot_index,
            detail: detail.into(),
        }
    }

    /// Validates one encoded chunk and writes it into the staging area.
    pub fn stage(&mut self, encoded_chunk: &[u8]) -> Result<(), StorageError> {
        let chunk = decode_snapshot_chunk(encoded_chunk)?;
        if self.end.is_some() {
            return Err(self.stream_error("a chunk after the end chunk"));
        }
        match chunk {
            SnapshotChunk::Volume(info) => self.stage_volume(info),
            SnapshotChunk::Data {
                volume_id,
                offset,
                data,
            } => self.stage_data(volume_id, offset, data),
            SnapshotChunk::End(end) => self.stage_end(end),
        }
    }

    fn stage_volume(&mut self, info: VolumeInfo) -> Result<(), StorageError> {
        if self.data_started {
            return Err(self.stream_error("a volume chunk after data chunks"));
        }
        if self.volumes.len() >= SNAPSHOT_VOLUMES_MAX {
            return Err(self.stream_error(format!("more than {SNAPSHOT_VOLUMES_MAX} volumes")));
        }
        if !valid_volume_geometry(&info.name, info.size_bytes, info.block_size_bytes) {
            return Err(self.stream_error(format!("volume {} has invalid geometry", info.id)));
        }
        if self.volumes.contains_key(&info.id) || self.names.contains(&info.name) {
            return Err(
                self.stream_error(format!("volume {} ({}) declared twice", info.id, info.name))
            );
        }
        let image = ImageFile::create(
            &staged_image_path(&self.directory.path, info.id),
            info.size_bytes,
        )?;
        self.names.insert(info.name.clone());
        self.volumes.insert(
            info.id,
            StagingVolume {
                info,
                image,
                next_offset: 0,
            },
        );
        Ok(())
    }

    fn stage_data(&mut self, volume_id: u64, offset: u64, data: &[u8]) -> Result<(), StorageError> {
        self.data_started = true;
        let Some(volume) = self.volumes.get(&volume_id) else {
            return Err(self.stream_error(format!("data for undeclared volume {volume_id}")));
        };
        let block_bytes = u64::from(volume.info.block_size_bytes);
        let length = data.len() as u64;
        let in_order_and_range = offset >= volume.next_offset
            && offset % block_bytes == 0
            && length % block_bytes == 0
            && offset
                .checked_add(length)
                .is_some_and(|end| end <= volume.info.size_bytes);
        if !in_order_and_range {
            return Err(self.stream_error(format!(
                "data {offset}+{length} of volume {volume_id} is unaligned, out of order or \
                 outside its {} bytes",
                volume.info.size_bytes
            )));
        }
        volume.image.write_all_at(offset, data)?;
        let first_block = offset / block_bytes;
        for (position, block) in data.chunks_exact(block_bytes as usize).enumerate() {
            // An absent checksum means an all-zero block, as in the state machine.
            if block.iter().all(|&byte| byte == 0) {
                continue;
            }
            let mut record = [0u8; CHECKSUM_RECORD_BYTES];
            record[..8].copy_from_slice(&volume_id.to_be_bytes());
            record[8..16].copy_from_slice(&(first_block + position as u64).to_be_bytes());
            record[16..].copy_from_slice(&crc32c::crc32c(block).to_be_bytes());
            self.checksums
                .write_all(&record)
                .map_err(|error| StorageError::io(&self.checksum_path, error))?;
        }
        if let Some(volume) = self.volumes.get_mut(&volume_id) {
            volume.next_offset = offset + length;
        }
        self.data_chunk_count += 1;
        self.data_bytes += length;
        Ok(())
    }

    fn stage_end(&mut self, end: SnapshotEnd) -> Result<(), StorageError> {
        let expected = SnapshotEnd {
            group_id: self.group_id,
            covered_index: end.covered_index,
            volume_count: self.volumes.len() as u64,
            data_chunk_count: self.data_chunk_count,
            data_bytes: self.data_bytes,
        };
        if end != expected {
            return Err(self.stream_error(format!(
                "end chunk {end:?} does not match the stream {expected:?}"
            )));
        }
        if end.covered_index < self.snapshot_index {
            // The copy would miss entries the follower's log will not have.
            return Err(self.stream_error(format!(
                "the stream covers index {} only",
                end.covered_index
            )));
        }
        self.end = Some(end);
        Ok(())
    }

    /// Makes the staged images, the checksum file and the directory durable (fdatasync,
    /// fsync), after the end chunk arrived.
    pub fn finish(mut self) -> Result<StagedSnapshot, StorageError> {
        let Some(end) = self.end else {
            return Err(self.stream_error("finished before the end chunk"));
        };
        self.checksums
            .flush()
            .map_err(|error| StorageError::io(&self.checksum_path, error))?;
        // fdatasync: the install batch will name these files; their data must be on disk first.
        self.checksums
            .get_ref()
            .sync_data()
            .map_err(|error| StorageError::io(&self.checksum_path, error))?;
        for volume in self.volumes.values() {
            volume.image.sync_data()?;
        }
        sync_directory(&self.directory.path)?;
        Ok(StagedSnapshot {
            group_id: self.group_id,
            snapshot_index: self.snapshot_index,
            covered_index: end.covered_index,
            volumes: self
                .volumes
                .values()
                .map(|volume| volume.info.clone())
                .collect(),
            directory: self.directory,
        })
    }
}

/// A complete, durable staged snapshot, ready for `StateMachine::install_snapshot`. Dropping
/// it removes its files.
pub struct StagedSnapshot {
    directory: StagingDirectory,
    group_id: u64,
    snapshot_index: u64,
    covered_index: u64,
    volumes: Vec<VolumeInfo>,
}

impl StagedSnapshot {
    pub fn group_id(&self) -> u64 {
        self.group_id
    }

    pub fn snapshot_index(&self) -> u64 {
        self.snapshot_index
    }

    /// The applied index whose volume table the snapshot carries (>= the snapshot index).
    pub fn covered_index(&self) -> u64 {
        self.covered_index
    }

    pub fn volumes(&self) -> &[VolumeInfo] {
        &self.volumes
    }

    pub(crate) fn image_path(&self, volume_id: u64) -> PathBuf {
        staged_image_path(&self.directory.path, volume_id)
    }

    /// Streams the staged checksums (volume id, block index, crc32c) to `sink`, with bounded
    /// memory; records that do not belong to a staged volume block are corruption.
    pub(crate) fn for_each_checksum(
        &self,
        mut sink: impl FnMut(u64, u64, u32),
    ) -> Result<(), StorageError> {
        let path = self.directory.path.join(CHECKSUM_FILE_NAME);
        let file = File::open(&path).map_err(|error| StorageError::io(&path, error))?;
        let mut reader = BufReader::new(file);
        let blocks: BTreeMap<u64, u64> = self
            .volumes
            .iter()
            .map(|info| (info.id, info.size_bytes / u64::from(info.block_size_bytes)))
            .collect();
        let mut record = [0u8; CHECKSUM_RECORD_BYTES];
        loop {
            let at_end = reader
                .fill_buf()
                .map_err(|error| StorageError::io(&path, error))?
                .is_empty();
            if at_end {
                break;
            }
            // A partial record at the end is an error here, not the end of the file.
            reader
                .read_exact(&mut record)
                .map_err(|error| StorageError::io(&path, error))?;
            let mut volume_id = [0u8; 8];
            volume_id.copy_from_slice(&record[..8]);
            let volume_id = u64::from_be_bytes(volume_id);
            let mut block_index = [0u8; 8];
            block_index.copy_from_slice(&record[8..16]);
            let block_index = u64::from_be_bytes(block_index);
            let mut crc32c = [0u8; 4];
            crc32c.copy_from_slice(&record[16..]);
            let in_a_staged_volume = blocks
                .get(&volume_id)
                .is_some_and(|&block_count| block_index < block_count);
            if !in_a_staged_volume {
                return Err(StorageError::Corruption {
                    what: "staged snapshot checksum",
                    detail: format!("volume {volume_id} block {block_index}"),
                });
            }
            sink(volume_id, block_index, u32::from_be_bytes(crc32c));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn volume(id: u64, name: &str, size_bytes: u64, block_size_bytes: u32) -> VolumeInfo {
        VolumeInfo {
            id,
            name: name.to_string(),
            size_bytes,
            block_size_bytes,
            attachment: None,
        }
    }

    fn volume_chunk(info: &VolumeInfo) -> Vec<u8> {
        encode_snapshot_chunk(&SnapshotChunk::Volume(info.clone()))
    }

    fn data_chunk(volume_id: u64, offset: u64, data: &[u8]) -> Vec<u8> {
        encode_snapshot_chunk(&SnapshotChunk::Data {
            volume_id,
            offset,
            data,
        })
    }

    fn end_chunk(
        covered_index: u64,
        volume_count: u64,
        data_chunk_count: u64,
        data_bytes: u64,
    ) -> Vec<u8> {
        encode_snapshot_chunk(&SnapshotChunk::End(SnapshotEnd {
            group_id: 1,
            covered_index,
            volume_count,
            data_chunk_count,
            data_bytes,
        }))
    }

    fn sample_chunks() -> Vec<Vec<u8>> {
        let mut attached = volume(4, "disk", 8192, 4096);
        attached.attachment = Some(Attachment {
            client: "host-é".to_string(),
            epoch: 9,
            attach_id: None,
        });
        let mut attached_with_id = volume(5, "disk2", 8192, 4096);
        attached_with_id.attachment = Some(Attachment {
            client: "host-b".to_string(),
            epoch: 11,
            attach_id: Some(u64::MAX - 3),
        });
        vec![
            volume_chunk(&volume(3, "plain", 4096, 512)),
            volume_chunk(&attached),
            volume_chunk(&attached_with_id),
            data_chunk(4, 4096, &[7u8; 4096]),
            end_chunk(12, 2, 1, 4096),
        ]
    }

    #[test]
    fn chunks_round_trip() {
        for encoded in sample_chunks() {
            let decoded = decode_snapshot_chunk(&encoded).unwrap();
            assert_eq!(encode_snapshot_chunk(&decoded), encoded);
        }
        let mut descriptor = SnapshotDescriptor {
            group_id: 3,
            snapshot_index: 77,
            members: Vec::new(),
        };
        assert_eq!(
            SnapshotDescriptor::decode(&descriptor.encode()),
            Ok(descriptor.clone())
        );
        descriptor.members.push(MemberConfig {
            id: 4,
            peer: "10.0.0.4:10811".into(),
            nbd: "10.0.0.4:10809".into(),
            control: "10.0.0.4:10810".into(),
        });
        assert_eq!(
            SnapshotDescriptor::decode(&descriptor.encode()),
            Ok(descriptor.clone())
        );
        assert!(SnapshotDescriptor::decode(&[1, 2, 3]).is_err());
        // A damaged member list is an error, not an empty directory.
        let mut damaged = descriptor.encode();
        damaged.truncate(damaged.len() - 3);
        assert!(SnapshotDescriptor::decode(&damaged).is_err());
    }

    /// crc32c detects every error burst of up to 32 bits, so every single-byte corruption
    /// of a chunk is rejected (as a checksum mismatch or, for the length prefix, earlier).
    #[test]
    fn every_single_byte_corruption_is_rejected() {
        for encoded in sample_chunks() {
            for position in 0..encoded.len() {
                for flip in [0x01u8, 0x80, 0xff] {
                    let mut corrupted = encoded.clone();
                    corrupted[position] ^= flip;
                    assert!(
                        decode_snapshot_chunk(&corrupted).is_err(),
                        "byte {position} ^ {flip:#x} of {encoded:02x?}"
                    );
                }
            }
            assert!(decode_snapshot_chunk(&encoded[..encoded.len() - 1]).is_err());
        }
    }

    /// Re-seals `body` of kind `kind` with a valid header and checksum, so the field checks
    /// behind the checksum are reached.
    fn sealed(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut bytes = vec![SNAPSHOT_FORMAT_VERSION, kind];
        bytes.extend_from_slice(&(body.len() as u32).to_be_bytes());
        bytes.extend_from_slice(body);
        let crc32c = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc32c.to_be_bytes());
        bytes
    }

    #[test]
    fn well_sealed_but_malformed_chunks_are_rejected_with_their_reason() {
        assert_eq!(
            decode_snapshot_chunk(&sealed(9, &[])),
            Err(SnapshotChunkDecodeError::UnknownKind { kind: 9 })
        );
        assert_eq!(
            decode_snapshot_chunk(&sealed(KIND_DATA, &[0u8; 16])),
            Err(SnapshotChunkDecodeError::EmptyData)
        );
        assert_eq!(
            decode_snapshot_chunk(&sealed(KIND_END, &[0u8; 39])),
            Err(SnapshotChunkDecodeError::Truncated { kind: KIND_END })
        );
        assert_eq!(
            decode_snapshot_chunk(&sealed(KIND_END, &[0u8; 41])),
            Err(SnapshotChunkDecodeError::TrailingBytes {
                kind: KIND_END,
                extra_bytes: 1
            })
        );
        let mut volume_body = Vec::new();
        volume_body.extend_from_slice(&[0u8; 20]);
        volume_body.extend_from_slice(&[1, 0]); // name length 256
        assert_eq!(
            decode_snapshot_chunk(&sealed(KIND_VOLUME, &volume_body)),
            Err(SnapshotChunkDecodeError::TextTooLong {
                field: "volume name",
                length_bytes: 256
            })
        );
        let mut volume_body = vec![0u8; 20];
        volume_body.extend_from_slice(&[0, 1, b'd', 0x02]);
        assert_eq!(
            decode_snapshot_chunk(&sealed(KIND_VOLUME, &volume_body)),
            Err(SnapshotChunkDecodeError::ReservedFlags { flags: 0x02 })
        );
        let mut wrong_length = sealed(KIND_END, &[0u8; 40]);
        wrong_length[5] = 41;
        let crc_start = wrong_length.len() - 4;
        let crc32c = crc32c::crc32c(&wrong_length[..crc_start]);
        wrong_length[crc_start..].copy_from_slice(&crc32c.to_be_bytes());
        assert_eq!(
            decode_snapshot_chunk(&wrong_length),
            Err(SnapshotChunkDecodeError::BodyLengthMismatch {
                declared_body_bytes: 41,
                actual_body_bytes: 40
            })
        );
        let mut version = sealed(KIND_END, &[0u8; 40]);
        version[0] = 2;
        let crc32c = crc32c::crc32c(&version[..crc_start]);
        version[crc_start..].copy_from_slice(&crc32c.to_be_bytes());
        assert_eq!(
            decode_snapshot_chunk(&version),
            Err(SnapshotChunkDecodeError::UnsupportedVersion { version: 2 })
        );
        assert_eq!(
            decode_snapshot_chunk(&vec![0u8; SNAPSHOT_CHUNK_BYTES_MAX + 1]),
            Err(SnapshotChunkDecodeError::BadLength {
                length_bytes: SNAPSHOT_CHUNK_BYTES_MAX + 1
            })
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            // Only the absence of a panic is checked: a result is always returned.
            let _ = decode_snapshot_chunk(&bytes);
        }

        /// Random bodies behind a valid seal reach every field check; whatever decodes must
        /// encode back to the same bytes (one encoding per chunk).
        #[test]
        fn random_sealed_bodies_never_panic(kind in 0u8..5, body in proptest::collection::vec(any::<u8>(), 0..120)) {
            let bytes = sealed(kind, &body);
            if let Ok(chunk) = decode_snapshot_chunk(&bytes) {
                prop_assert_eq!(encode_snapshot_chunk(&chunk), bytes);
            }
        }

        #[test]
        fn mutated_chunks_never_panic(which in 0usize..4, position in any::<usize>(), value in any::<u8>(), cut in any::<usize>()) {
            let mut bytes = sample_chunks()[which].clone();
            let position = position % bytes.len();
            bytes[position] = value;
            let cut = cut % (bytes.len() + 1);
            let _ = decode_snapshot_chunk(&bytes[..cut]);
            let _ = decode_snapshot_chunk(&bytes);
        }
    }

    fn staging() -> (tempfile::TempDir, SnapshotStaging) {
        let directory = tempfile::tempdir().unwrap();
        let staging = SnapshotStaging::begin(directory.path(), 1, 10).unwrap();
        (directory, staging)
    }

    fn assert_stream_error(result: Result<(), StorageError>) {
        assert!(
            matches!(result, Err(StorageError::SnapshotStream { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn staging_rejects_chunks_that_do_not_fit_the_stream() {
        let (_directory, mut staging) = staging();
        let disk = volume(3, "disk", 16384, 4096);
        staging.stage(&volume_chunk(&disk)).unwrap();
        assert_stream_error(staging.stage(&volume_chunk(&disk)));
        assert_stream_error(staging.stage(&volume_chunk(&volume(5, "disk", 4096, 4096))));
        assert_stream_error(staging.stage(&volume_chunk(&volume(6, "bad", 4097, 4096))));
        assert_stream_error(staging.stage(&data_chunk(99, 0, &[1u8; 4096])));
        assert_stream_error(staging.stage(&data_chunk(3, 100, &[1u8; 4096])));
        assert_stream_error(staging.stage(&data_chunk(3, 0, &[1u8; 100])));
        assert_stream_error(staging.stage(&data_chunk(3, 16384, &[1u8; 4096])));
        assert_stream_error(staging.stage(&data_chunk(3, u64::MAX - 4095, &[1u8; 4096])));
        staging.stage(&data_chunk(3, 4096, &[1u8; 8192])).unwrap();
        // Overlapping or going back: more bytes than the volume could be sent otherwise.
        assert_stream_error(staging.stage(&data_chunk(3, 8192, &[1u8; 4096])));
        assert_stream_error(staging.stage(&data_chunk(3, 0, &[1u8; 4096])));
        assert_stream_error(staging.stage(&volume_chunk(&volume(7, "late", 4096, 4096))));
        // Counts that do not match, or an index below the snapshot's.
        assert_stream_error(staging.stage(&end_chunk(12, 1, 2, 8192)));
        assert_stream_error(staging.stage(&end_chunk(9, 1, 1, 8192)));
        staging.stage(&end_chunk(12, 1, 1, 8192)).unwrap();
        assert_stream_error(staging.stage(&data_chunk(3, 12288, &[1u8; 4096])));
        assert!(matches!(
            staging.stage(&[0u8; 3]),
            Err(StorageError::SnapshotChunk(_))
        ));
        let staged = staging.finish().unwrap();
        assert_eq!(staged.covered_index(), 12);
        let mut checksums = Vec::new();
        staged
            .for_each_checksum(|volume_id, block_index, crc32c| {
                checksums.push((volume_id, block_index, crc32c))
            })
            .unwrap();
        let crc32c = crc32c::crc32c(&[1u8; 4096]);
        assert_eq!(checksums, vec![(3, 1, crc32c), (3, 2, crc32c)]);
    }

    #[test]
    fn finish_before_the_end_chunk_is_an_error() {
        let (_directory, mut staging) = staging();
        staging
            .stage(&volume_chunk(&volume(3, "disk", 4096, 4096)))
            .unwrap();
        assert!(matches!(
            staging.finish(),
            Err(StorageError::SnapshotStream { .. })
        ));
    }

    /// All-zero blocks get no checksum, as in the state machine (absent = zero block).
    #[test]
    fn zero_blocks_are_written_but_not_checksummed() {
        let (_directory, mut staging) = staging();
        staging
            .stage(&volume_chunk(&volume(3, "disk", 8192, 4096)))
            .unwrap();
        let mut data = vec![0u8; 8192];
        data[5000] = 1;
        staging.stage(&data_chunk(3, 0, &data)).unwrap();
        staging.stage(&end_chunk(10, 1, 1, 8192)).unwrap();
        let staged = staging.finish().unwrap();
        let mut blocks = Vec::new();
        staged
            .for_each_checksum(|_, block_index, _| blocks.push(block_index))
            .unwrap();
        assert_eq!(blocks, vec![1]);
        let image = ImageFile::open(&staged.image_path(3)).unwrap();
        let mut read_back = vec![1u8; 8192];
        image.read_exact_at(0, &mut read_back).unwrap();
        assert_eq!(read_back, data);
    }
}
