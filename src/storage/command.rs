//! Encoding of the state-machine commands carried in the data of Raft entries.
//!
//! Pure functions over byte slices: no I/O, no allocation on decode (a `Write` borrows its block
//! data from the entry), and [`decode_command`] never panics on garbage, so a fuzzer can drive
//! it directly. Block data is raw bytes after fixed-size big-endian fields, never serde.
//!
//! Wire format (all integers big-endian):
//!
//! ```text
//! version: u8 = 2, tag: u8, then by tag:
//!   1 Write         volume_id u64, writer_epoch u64, offset u64, data (the rest of the entry)
//!   2 Trim          volume_id u64, writer_epoch u64, offset u64, length u64
//!   3 WriteZeroes   volume_id u64, writer_epoch u64, offset u64, length u64,
//!                   flags u8 (bit 0: may_punch_hole)
//!   4 CreateVolume  size_bytes u64, block_size_bytes u32, name_length u16, name (UTF-8)
//!   5 DeleteVolume  name_length u16, name (UTF-8)
//!   6 Attach        flags u8 (bit 0: force, bit 1: attach_id follows), name_length u16,
//!                   name, client_length u16, client, [attach_id u64]
//!   7 Detach        epoch u64, name_length u16, name (UTF-8)
//!   8 ResizeVolume  size_bytes u64, name_length u16, name (UTF-8)
//! ```
//!
//! Version 1 (before writer fencing) is the same without `writer_epoch` and without tags 6,
//! 7 and 8. It still decodes, with `writer_epoch = 0`, because Raft logs written by version 1 may
//! still hold such entries; only version 2 is ever encoded.
//!
//! Every command except `Write` must end exactly where its fields end, so two encodings of the
//! same command are byte-identical (replicas compare nothing else, but tests and fuzzers can).

/// The format every command is encoded in. Version 2 added `writer_epoch` (writer fencing).
pub const COMMAND_FORMAT_VERSION: u8 = 2;
/// The format before writer fencing, still decoded (see the module doc).
const COMMAND_FORMAT_VERSION_UNFENCED: u8 = 1;

/// Longest volume name a command may carry (the NBD export name of the volume).
pub const VOLUME_NAME_LENGTH_BYTES_MAX: usize = 255;
/// Longest client id an `Attach` may carry.
pub const CLIENT_ID_LENGTH_BYTES_MAX: usize = 255;

const TAG_WRITE: u8 = 1;
const TAG_TRIM: u8 = 2;
const TAG_WRITE_ZEROES: u8 = 3;
const TAG_CREATE_VOLUME: u8 = 4;
const TAG_DELETE_VOLUME: u8 = 5;
const TAG_ATTACH: u8 = 6;
const TAG_DETACH: u8 = 7;
const TAG_RESIZE_VOLUME: u8 = 8;

const FLAG_MAY_PUNCH_HOLE: u8 = 0x01;
const FLAG_FORCE: u8 = 0x01;
const FLAG_ATTACH_ID: u8 = 0x02;

/// Bytes before the data of a `Write`: version, tag, volume id, writer epoch, offset.
pub const WRITE_COMMAND_HEADER_BYTES: usize = 2 + 8 + 8 + 8;

/// A state-machine command. Commands that address data carry the volume id (the Raft index of
/// the volume's `CreateVolume` entry), never its name, so a command keeps meaning the same
/// volume even if a volume of the same name is deleted and created again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// `NBD_CMD_WRITE`. `writer_epoch` is the epoch of the writer's attachment (0 for a
    /// session without one); the state machine fences a write whose epoch is not current.
    Write {
        volume_id: u64,
        writer_epoch: u64,
        offset: u64,
        data: &'a [u8],
    },
    /// `NBD_CMD_TRIM`: the range reads as zeroes afterwards (holes are punched).
    Trim {
        volume_id: u64,
        writer_epoch: u64,
        offset: u64,
        length: u64,
    },
    /// `NBD_CMD_WRITE_ZEROES`; `may_punch_hole` is false when the client set `NBD_CMD_FLAG_NO_HOLE`.
    WriteZeroes {
        volume_id: u64,
        writer_epoch: u64,
        offset: u64,
        length: u64,
        may_punch_hole: bool,
    },
    /// Creates a volume; its id will be the index of the entry carrying this command.
    CreateVolume {
        name: &'a str,
        size_bytes: u64,
        block_size_bytes: u32,
    },
    /// Deletes a volume, its checksums and its image file.
    DeleteVolume { name: &'a str },
    /// Attaches the volume read-write to `client`; the new epoch is the index of this entry.
    /// Refused while another client holds it, unless `force` (which fences that client).
    /// `attach_id` names one attach request across all its retries, on any server: an
    /// `Attach` by the holder carrying the id of the current attachment is answered with that
    /// attachment, so a retry that commits late does not fence the attachment it made.
    Attach {
        name: &'a str,
        client: &'a str,
        force: bool,
        attach_id: Option<u64>,
    },
    /// Ends the attachment of the given epoch (refused as fenced for any other epoch).
    Detach { name: &'a str, epoch: u64 },
    /// Grows a volume to `size_bytes` (refused if that is smaller than its size: shrinking
    /// would silently cut off data a client may still address).
    ResizeVolume { name: &'a str, size_bytes: u64 },
}

/// Why a byte string is not a command. Deterministic: every replica rejects the same entry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandDecodeError {
    #[error("empty command")]
    Empty,
    #[error("unsupported command format version {version}")]
    UnsupportedVersion { version: u8 },
    #[error("unknown command tag {tag}")]
    UnknownTag { tag: u8 },
    #[error("command with tag {tag} is truncated: needs {needed_bytes} bytes, has {actual_bytes}")]
    Truncated {
        tag: u8,
        needed_bytes: usize,
        actual_bytes: usize,
    },
    #[error("command with tag {tag} has {extra_bytes} bytes after its fields")]
    TrailingBytes { tag: u8, extra_bytes: usize },
    #[error("reserved flags {flags:#04x} are set")]
    ReservedFlags { flags: u8 },
    #[error("volume name of {length_bytes} bytes is longer than {VOLUME_NAME_LENGTH_BYTES_MAX}")]
    NameTooLong { length_bytes: usize },
    #[error("volume name is not UTF-8")]
    NameNotUtf8,
    #[error("client id of {length_bytes} bytes is longer than {CLIENT_ID_LENGTH_BYTES_MAX}")]
    ClientTooLong { length_bytes: usize },
    #[error("client id is not UTF-8")]
    ClientNotUtf8,
}

/// Encodes any command. For block data prefer [`encode_write_command`], which is the same bytes.
pub fn encode_command(command: &Command<'_>) -> Vec<u8> {
    match command {
        Command::Write {
            volume_id,
            writer_epoch,
            offset,
            data,
        } => encode_write_command(*volume_id, *writer_epoch, *offset, data),
        Command::Trim {
            volume_id,
            writer_epoch,
            offset,
            length,
        } => {
            let mut bytes = Vec::with_capacity(2 + 32);
            bytes.extend_from_slice(&[COMMAND_FORMAT_VERSION, TAG_TRIM]);
            bytes.extend_from_slice(&volume_id.to_be_bytes());
            bytes.extend_from_slice(&writer_epoch.to_be_bytes());
            bytes.extend_from_slice(&offset.to_be_bytes());
            bytes.extend_from_slice(&length.to_be_bytes());
            bytes
        }
        Command::WriteZeroes {
            volume_id,
            writer_epoch,
            offset,
            length,
            may_punch_hole,
        } => {
            let mut bytes = Vec::with_capacity(2 + 33);
            bytes.extend_from_slice(&[COMMAND_FORMAT_VERSION, TAG_WRITE_ZEROES]);
            bytes.extend_from_slice(&volume_id.to_be_bytes());
            bytes.extend_from_slice(&writer_epoch.to_be_bytes());
            bytes.extend_from_slice(&offset.to_be_bytes());
            bytes.extend_from_slice(&length.to_be_bytes());
            bytes.push(if *may_punch_hole {
                FLAG_MAY_PUNCH_HOLE
            } else {
                0
            });
            bytes
        }
        Command::CreateVolume {
            name,
            size_bytes,
            block_size_bytes,
        } => {
            let name = truncated_name(name);
            let mut bytes = Vec::with_capacity(2 + 14 + name.len());
            bytes.extend_from_slice(&[COMMAND_FORMAT_VERSION, TAG_CREATE_VOLUME]);
            bytes.extend_from_slice(&size_bytes.to_be_bytes());
            bytes.extend_from_slice(&block_size_bytes.to_be_bytes());
            push_name(&mut bytes, name);
            bytes
        }
        Command::DeleteVolume { name } => {
            let name = truncated_name(name);
            let mut bytes = Vec::with_capacity(2 + 2 + name.len());
            bytes.extend_from_slice(&[COMMAND_FORMAT_VERSION, TAG_DELETE_VOLUME]);
            push_name(&mut bytes, name);
            bytes
        }
        Command::Attach {
            name,
            client,
            force,
            attach_id,
        } => {
            let name = truncated_name(name);
            let client = truncated_client(client);
            let mut bytes = Vec::with_capacity(2 + 13 + name.len() + client.len());
            bytes.extend_from_slice(&[COMMAND_FORMAT_VERSION, TAG_ATTACH]);
            let mut flags = if *force { FLAG_FORCE } else { 0 };
            if attach_id.is_some() {
                flags |= FLAG_ATTACH_ID;
            }
            bytes.push(flags);
            push_name(&mut bytes, name);
            push_name(&mut bytes, client);
            if let Some(attach_id) = attach_id {
                bytes.extend_from_slice(&attach_id.to_be_bytes());
            }
            bytes
        }
        Command::Detach { name, epoch } => {
            let name = truncated_name(name);
            let mut bytes = Vec::with_capacity(2 + 10 + name.len());
            bytes.extend_from_slice(&[COMMAND_FORMAT_VERSION, TAG_DETACH]);
            bytes.extend_from_slice(&epoch.to_be_bytes());
            push_name(&mut bytes, name);
            bytes
        }
        Command::ResizeVolume { name, size_bytes } => {
            let name = truncated_name(name);
            let mut bytes = Vec::with_capacity(2 + 10 + name.len());
            bytes.extend_from_slice(&[COMMAND_FORMAT_VERSION, TAG_RESIZE_VOLUME]);
            bytes.extend_from_slice(&size_bytes.to_be_bytes());
            push_name(&mut bytes, name);
            bytes
        }
    }
}

/// Encodes a `Write` with one allocation, copying `data` once (the hot path of every NBD write).
pub fn encode_write_command(
    volume_id: u64,
    writer_epoch: u64,
    offset: u64,
    data: &[u8],
) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(WRITE_COMMAND_HEADER_BYTES + data.len());
    bytes.extend_from_slice(&[COMMAND_FORMAT_VERSION, TAG_WRITE]);
    bytes.extend_from_slice(&volume_id.to_be_bytes());
    bytes.extend_from_slice(&writer_epoch.to_be_bytes());
    bytes.extend_from_slice(&offset.to_be_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// Names longer than the limit cannot be decoded; encoding cuts them at a character boundary so
/// the encoder stays infallible (callers validate names before proposing, see
/// [`VOLUME_NAME_LENGTH_BYTES_MAX`]).
fn truncated_name(name: &str) -> &str {
    truncated_at_char_boundary(name, VOLUME_NAME_LENGTH_BYTES_MAX)
}

/// The same for client ids ([`CLIENT_ID_LENGTH_BYTES_MAX`]).
fn truncated_client(client: &str) -> &str {
    truncated_at_char_boundary(client, CLIENT_ID_LENGTH_BYTES_MAX)
}

fn truncated_at_char_boundary(text: &str, length_bytes_max: usize) -> &str {
    if text.len() <= length_bytes_max {
        return text;
    }
    let mut end = length_bytes_max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn push_name(bytes: &mut Vec<u8>, name: &str) {
    // `truncated_name` and `truncated_client` bound the length by 255, which fits a u16.
    let length = u16::try_from(name.len()).unwrap_or(u16::MAX);
    bytes.extend_from_slice(&length.to_be_bytes());
    bytes.extend_from_slice(name.as_bytes());
}

/// A cursor over the fields of one command; every read checks the remaining length.
struct Fields<'a> {
    tag: u8,
    bytes: &'a [u8],
    /// Length of the whole command, for error messages.
    total_bytes: usize,
}

impl<'a> Fields<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8], CommandDecodeError> {
        if self.bytes.len() < count {
            return Err(CommandDecodeError::Truncated {
                tag: self.tag,
                needed_bytes: self.total_bytes - self.bytes.len() + count,
                actual_bytes: self.total_bytes,
            });
        }
        let (head, rest) = self.bytes.split_at(count);
        self.bytes = rest;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64, CommandDecodeError> {
        let mut array = [0u8; 8];
        array.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(array))
    }

    fn u32(&mut self) -> Result<u32, CommandDecodeError> {
        let mut array = [0u8; 4];
        array.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(array))
    }

    fn u16(&mut self) -> Result<u16, CommandDecodeError> {
        let mut array = [0u8; 2];
        array.copy_from_slice(self.take(2)?);
        Ok(u16::from_be_bytes(array))
    }

    fn u8(&mut self) -> Result<u8, CommandDecodeError> {
        Ok(self.take(1)?[0])
    }

    fn name(&mut self) -> Result<&'a str, CommandDecodeError> {
        let length_bytes = usize::from(self.u16()?);
        if length_bytes > VOLUME_NAME_LENGTH_BYTES_MAX {
            return Err(CommandDecodeError::NameTooLong { length_bytes });
        }
        std::str::from_utf8(self.take(length_bytes)?).map_err(|_| CommandDecodeError::NameNotUtf8)
    }

    fn client(&mut self) -> Result<&'a str, CommandDecodeError> {
        let length_bytes = usize::from(self.u16()?);
        if length_bytes > CLIENT_ID_LENGTH_BYTES_MAX {
            return Err(CommandDecodeError::ClientTooLong { length_bytes });
        }
        std::str::from_utf8(self.take(length_bytes)?).map_err(|_| CommandDecodeError::ClientNotUtf8)
    }

    /// The writer epoch of a data command: absent (0) in the unfenced version 1 format.
    fn writer_epoch(&mut self, version: u8) -> Result<u64, CommandDecodeError> {
        if version == COMMAND_FORMAT_VERSION_UNFENCED {
            Ok(0)
        } else {
            self.u64()
        }
    }

    fn finish(self) -> Result<(), CommandDecodeError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(CommandDecodeError::TrailingBytes {
                tag: self.tag,
                extra_bytes: self.bytes.len(),
            })
        }
    }
}

/// Decodes one command; a `Write` borrows its data from `data`.
pub fn decode_command(data: &[u8]) -> Result<Command<'_>, CommandDecodeError> {
    let (&version, rest) = data.split_first().ok_or(CommandDecodeError::Empty)?;
    if version != COMMAND_FORMAT_VERSION && version != COMMAND_FORMAT_VERSION_UNFENCED {
        return Err(CommandDecodeError::UnsupportedVersion { version });
    }
    let (&tag, body) = rest.split_first().ok_or(CommandDecodeError::Truncated {
        tag: 0,
        needed_bytes: 2,
        actual_bytes: data.len(),
    })?;
    let mut fields = Fields {
        tag,
        bytes: body,
        total_bytes: data.len(),
    };
    let command = match tag {
        TAG_WRITE => {
            let volume_id = fields.u64()?;
            let writer_epoch = fields.writer_epoch(version)?;
            let offset = fields.u64()?;
            // The data is the rest of the entry: nothing can trail it.
            let data = std::mem::take(&mut fields.bytes);
            Command::Write {
                volume_id,
                writer_epoch,
                offset,
                data,
            }
        }
        TAG_TRIM => Command::Trim {
            volume_id: fields.u64()?,
            writer_epoch: fields.writer_epoch(version)?,
            offset: fields.u64()?,
            length: fields.u64()?,
        },
        TAG_WRITE_ZEROES => {
            let volume_id = fields.u64()?;
            let writer_epoch = fields.writer_epoch(version)?;
            let offset = fields.u64()?;
            let length = fields.u64()?;
            let flags = fields.u8()?;
            if flags & !FLAG_MAY_PUNCH_HOLE != 0 {
                return Err(CommandDecodeError::ReservedFlags { flags });
            }
            Command::WriteZeroes {
                volume_id,
                writer_epoch,
                offset,
                length,
                may_punch_hole: flags & FLAG_MAY_PUNCH_HOLE != 0,
            }
        }
        TAG_CREATE_VOLUME => {
            let size_bytes = fields.u64()?;
            let block_size_bytes = fields.u32()?;
            let name = fields.name()?;
            Command::CreateVolume {
                name,
                size_bytes,
                block_size_bytes,
            }
        }
        TAG_DELETE_VOLUME => Command::DeleteVolume {
            name: fields.name()?,
        },
        TAG_ATTACH if version == COMMAND_FORMAT_VERSION => {
            let flags = fields.u8()?;
            if flags & !(FLAG_FORCE | FLAG_ATTACH_ID) != 0 {
                return Err(CommandDecodeError::ReservedFlags { flags });
            }
            let name = fields.name()?;
            let client = fields.client()?;
            let attach_id = if flags & FLAG_ATTACH_ID != 0 {
                Some(fields.u64()?)
            } else {
                None
            };
            Command::Attach {
                name,
                client,
                force: flags & FLAG_FORCE != 0,
                attach_id,
            }
        }
        TAG_DETACH if version == COMMAND_FORMAT_VERSION => {
            let epoch = fields.u64()?;
            Command::Detach {
                epoch,
                name: fields.name()?,
            }
        }
        TAG_RESIZE_VOLUME if version == COMMAND_FORMAT_VERSION => {
            let size_bytes = fields.u64()?;
            Command::ResizeVolume {
                size_bytes,
                name: fields.name()?,
            }
        }
        tag => return Err(CommandDecodeError::UnknownTag { tag }),
    };
    fields.finish()?;
    Ok(command)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// (tag, three integers, the writer epoch, a flag, data, a name, a client id).
    type CommandParts = (u8, u64, u64, u64, u64, bool, Vec<u8>, String, String);

    fn command_strategy() -> impl Strategy<Value = CommandParts> {
        (
            1u8..=8,
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..600),
            "\\PC{0,40}",
            "\\PC{0,40}",
        )
    }

    fn build<'a>(parts: &'a CommandParts) -> Command<'a> {
        let (tag, a, b, c, writer_epoch, flag, ref data, ref name, ref client) = *parts;
        match tag {
            1 => Command::Write {
                volume_id: a,
                writer_epoch,
                offset: b,
                data,
            },
            2 => Command::Trim {
                volume_id: a,
                writer_epoch,
                offset: b,
                length: c,
            },
            3 => Command::WriteZeroes {
                volume_id: a,
                writer_epoch,
                offset: b,
                length: c,
                may_punch_hole: flag,
            },
            4 => Command::CreateVolume {
                name,
                size_bytes: a,
                block_size_bytes: b as u32,
            },
            5 => Command::DeleteVolume { name },
            6 => Command::Attach {
                name,
                client,
                force: flag,
                attach_id: (a % 2 == 1).then_some(c),
            },
            7 => Command::Detach { name, epoch: a },
            _ => Command::ResizeVolume {
                name,
                size_bytes: a,
            },
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn every_command_round_trips(parts in command_strategy()) {
            let command = build(&parts);
            let encoded = encode_command(&command);
            prop_assert_eq!(decode_command(&encoded), Ok(command));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            // Only the absence of a panic is checked here; a result is always returned.
            let _ = decode_command(&bytes);
        }

        #[test]
        fn garbage_after_a_valid_header_never_panics(tag in any::<u8>(), rest in proptest::collection::vec(any::<u8>(), 0..80)) {
            let mut bytes = vec![COMMAND_FORMAT_VERSION, tag];
            bytes.extend_from_slice(&rest);
            if let Ok(command) = decode_command(&bytes) {
                // (Version 1 entries decode too, but are never encoded; this header is v2.)
                // Whatever decodes must encode back to the same bytes: the format has one
                // encoding per command.
                prop_assert_eq!(encode_command(&command), bytes);
            }
        }

        #[test]
        fn every_strict_prefix_of_a_fixed_size_command_is_rejected(parts in command_strategy()) {
            let command = build(&parts);
            let encoded = encode_command(&command);
            let minimum = if parts.0 == 1 { WRITE_COMMAND_HEADER_BYTES } else { encoded.len() };
            for length in 0..minimum {
                prop_assert!(decode_command(&encoded[..length]).is_err());
            }
        }
    }

    #[test]
    fn write_command_borrows_its_data() {
        let encoded = encode_write_command(9, 3, 4096, b"hello");
        assert_eq!(encoded.len(), WRITE_COMMAND_HEADER_BYTES + 5);
        match decode_command(&encoded) {
            Ok(Command::Write {
                volume_id: 9,
                writer_epoch: 3,
                offset: 4096,
                data,
            }) => {
                // Zero-copy: the decoded slice points into the entry.
                assert_eq!(
                    data.as_ptr(),
                    encoded[WRITE_COMMAND_HEADER_BYTES..].as_ptr()
                );
            }
            other => panic!("decoded {other:?}"),
        }
    }

    #[test]
    fn specific_errors() {
        assert_eq!(decode_command(&[]), Err(CommandDecodeError::Empty));
        assert_eq!(
            decode_command(&[3, TAG_WRITE]),
            Err(CommandDecodeError::UnsupportedVersion { version: 3 })
        );
        assert_eq!(
            decode_command(&[2, 99]),
            Err(CommandDecodeError::UnknownTag { tag: 99 })
        );
        let mut trim = encode_command(&Command::Trim {
            volume_id: 1,
            writer_epoch: 0,
            offset: 2,
            length: 3,
        });
        trim.push(0);
        assert_eq!(
            decode_command(&trim),
            Err(CommandDecodeError::TrailingBytes {
                tag: TAG_TRIM,
                extra_bytes: 1
            })
        );
        let mut zeroes = encode_command(&Command::WriteZeroes {
            volume_id: 1,
            writer_epoch: 0,
            offset: 2,
            length: 3,
            may_punch_hole: true,
        });
        let last = zeroes.len() - 1;
        zeroes[last] = 0x81;
        assert_eq!(
            decode_command(&zeroes),
            Err(CommandDecodeError::ReservedFlags { flags: 0x81 })
        );
        let bad_name = [2, TAG_DELETE_VOLUME, 0, 1, 0xff];
        assert_eq!(
            decode_command(&bad_name),
            Err(CommandDecodeError::NameNotUtf8)
        );
        let long_name = [2, TAG_DELETE_VOLUME, 1, 0];
        assert_eq!(
            decode_command(&long_name),
            Err(CommandDecodeError::NameTooLong { length_bytes: 256 })
        );
        let bad_client = [2, TAG_ATTACH, 0, 0, 1, b'd', 0, 1, 0xff];
        assert_eq!(
            decode_command(&bad_client),
            Err(CommandDecodeError::ClientNotUtf8)
        );
        let long_client = [2, TAG_ATTACH, 0, 0, 1, b'd', 1, 0];
        assert_eq!(
            decode_command(&long_client),
            Err(CommandDecodeError::ClientTooLong { length_bytes: 256 })
        );
        let mut attach = encode_command(&Command::Attach {
            name: "d",
            client: "c",
            force: true,
            attach_id: None,
        });
        attach[2] = 0x05;
        assert_eq!(
            decode_command(&attach),
            Err(CommandDecodeError::ReservedFlags { flags: 0x05 })
        );
        // The attach_id flag without its eight bytes is a truncated command.
        attach[2] = 0x03;
        assert!(decode_command(&attach).is_err());
    }

    /// Entries written before writer fencing (format version 1) decode with epoch 0; the
    /// fencing commands did not exist in that format.
    #[test]
    fn version_1_data_commands_decode_with_writer_epoch_zero() {
        let mut write = vec![1, TAG_WRITE];
        write.extend_from_slice(&7u64.to_be_bytes());
        write.extend_from_slice(&512u64.to_be_bytes());
        write.extend_from_slice(b"abc");
        assert_eq!(
            decode_command(&write),
            Ok(Command::Write {
                volume_id: 7,
                writer_epoch: 0,
                offset: 512,
                data: b"abc"
            })
        );
        let mut zeroes = vec![1, TAG_WRITE_ZEROES];
        for value in [7u64, 512, 4096] {
            zeroes.extend_from_slice(&value.to_be_bytes());
        }
        zeroes.push(FLAG_MAY_PUNCH_HOLE);
        assert_eq!(
            decode_command(&zeroes),
            Ok(Command::WriteZeroes {
                volume_id: 7,
                writer_epoch: 0,
                offset: 512,
                length: 4096,
                may_punch_hole: true
            })
        );
        let mut detach = vec![1, TAG_DETACH];
        detach.extend_from_slice(&5u64.to_be_bytes());
        detach.extend_from_slice(&[0, 1, b'd']);
        assert_eq!(
            decode_command(&detach),
            Err(CommandDecodeError::UnknownTag { tag: TAG_DETACH })
        );
    }

    #[test]
    fn over_long_names_are_cut_at_a_character_boundary() {
        let name = "é".repeat(200); // 400 bytes
        let encoded = encode_command(&Command::DeleteVolume { name: &name });
        match decode_command(&encoded) {
            Ok(Command::DeleteVolume { name: decoded }) => {
                assert!(decoded.len() <= VOLUME_NAME_LENGTH_BYTES_MAX);
                assert!(name.starts_with(decoded));
            }
            other => panic!("decoded {other:?}"),
        }
    }
}
