//! The transmission phase of NBD: decoding request headers, deciding whether a request is valid
//! for the negotiated export, and encoding simple replies and structured reply chunks.
//!
//! Everything here is a pure function over byte slices and plain values: the NBD session actor
//! reads bytes from its socket, calls [`parse_request_header`] and [`check_request`], talks to the
//! Raft and storage actors, and writes what the `encode_*` functions append to its output buffer.
//! Section names in comments refer to `doc/proto.md` of NetworkBlockDevice/nbd.
//!
//! A request that fails [`check_request`] is answered with the returned [`Errno`] and the
//! connection stays open ("Error values": a bad request is not a reason to disconnect). The one
//! catch is `NBD_CMD_WRITE`: its payload follows the header on the wire whether or not the request
//! is valid, so the session must read and drop [`write_payload_bytes`] bytes before parsing the
//! next header, or close the connection if that length is absurd (the spec lets either side hard
//! disconnect over a payload large enough to be a denial of service, "Size constraints").

use bytes::BufMut;

use super::handshake::Negotiated;
use super::proto;

/// Size of a (compact, non-extended) request header on the wire ("Request message").
pub const REQUEST_HEADER_BYTES: usize = 28;
/// Size of a simple reply header ("Simple reply message").
pub const SIMPLE_REPLY_HEADER_BYTES: usize = 16;
/// Size of a structured reply chunk header ("Structured reply chunk message").
pub const STRUCTURED_REPLY_HEADER_BYTES: usize = 20;
/// Largest data length one `NBD_REPLY_TYPE_OFFSET_DATA` chunk can carry: its 32-bit length field
/// also covers the 8-byte offset ("Structured reply types").
pub const READ_DATA_CHUNK_DATA_MAX_BYTES: u32 = u32::MAX - 8;
/// Most extents one `NBD_REPLY_TYPE_BLOCK_STATUS` chunk should carry ("SHOULD NOT send more than
/// 2^20 extents in a single reply chunk").
pub const BLOCK_STATUS_EXTENTS_MAX_COUNT: usize = 1 << 20;

/// Every command flag this codec understands; any other bit is an unknown flag ("Error values":
/// the server SHOULD return `NBD_EINVAL` for an unknown command flag).
const COMMAND_FLAGS_KNOWN: u16 = proto::NBD_CMD_FLAG_FUA
    | proto::NBD_CMD_FLAG_NO_HOLE
    | proto::NBD_CMD_FLAG_DF
    | proto::NBD_CMD_FLAG_REQ_ONE
    | proto::NBD_CMD_FLAG_FAST_ZERO;

/// A request type ("Request types"). Numbers this codec does not implement, including the
/// experimental `NBD_CMD_RESIZE`, decode as [`Command::Unknown`] so the session can answer them
/// with `NBD_EINVAL` instead of dropping the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    /// `NBD_CMD_READ`
    Read,
    /// `NBD_CMD_WRITE`
    Write,
    /// `NBD_CMD_DISC`
    Disc,
    /// `NBD_CMD_FLUSH`
    Flush,
    /// `NBD_CMD_TRIM`
    Trim,
    /// `NBD_CMD_CACHE`
    Cache,
    /// `NBD_CMD_WRITE_ZEROES`
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS`
    BlockStatus,
    /// Any other type number, kept for logging and for the `NBD_EINVAL` reply.
    Unknown(u16),
}

impl Command {
    /// Decodes the 16-bit type field of a request.
    pub fn from_code(code: u16) -> Command {
        match code {
            proto::NBD_CMD_READ => Command::Read,
            proto::NBD_CMD_WRITE => Command::Write,
            proto::NBD_CMD_DISC => Command::Disc,
            proto::NBD_CMD_FLUSH => Command::Flush,
            proto::NBD_CMD_TRIM => Command::Trim,
            proto::NBD_CMD_CACHE => Command::Cache,
            proto::NBD_CMD_WRITE_ZEROES => Command::WriteZeroes,
            proto::NBD_CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    /// The 16-bit type field that encodes this command.
    pub fn code(self) -> u16 {
        match self {
            Command::Read => proto::NBD_CMD_READ,
            Command::Write => proto::NBD_CMD_WRITE,
            Command::Disc => proto::NBD_CMD_DISC,
            Command::Flush => proto::NBD_CMD_FLUSH,
            Command::Trim => proto::NBD_CMD_TRIM,
            Command::Cache => proto::NBD_CMD_CACHE,
            Command::WriteZeroes => proto::NBD_CMD_WRITE_ZEROES,
            Command::BlockStatus => proto::NBD_CMD_BLOCK_STATUS,
            Command::Unknown(code) => code,
        }
    }

    /// Whether the command changes the export's contents (the commands a read-only export must
    /// refuse, "Transmission flags" / `NBD_FLAG_READ_ONLY`).
    pub fn is_write(self) -> bool {
        matches!(self, Command::Write | Command::Trim | Command::WriteZeroes)
    }
}

/// A decoded request header ("Request message"). `cookie` is opaque and must be echoed in every
/// reply to this request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// The request type.
    pub command: Command,
    /// Opaque client value echoed in the reply (formerly "handle").
    pub cookie: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Byte length of the range (and, for `NBD_CMD_WRITE`, of the payload that follows).
    pub length: u32,
}

/// Errors that make the transmission byte stream unusable; the session closes the connection.
#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub enum TransmissionError {
    /// The request did not start with `NBD_REQUEST_MAGIC`: the stream is out of step (or speaks
    /// the unsupported extended headers), so no later byte can be trusted.
    #[error("bad request magic {0:#010x} (expected {expected:#010x})", expected = proto::NBD_REQUEST_MAGIC)]
    BadMagic(u32),
    /// Fewer than [`REQUEST_HEADER_BYTES`] bytes were passed to [`parse_request_header`].
    #[error("request header needs {REQUEST_HEADER_BYTES} bytes, got {length_bytes}")]
    HeaderTooShort {
        /// How many bytes were given.
        length_bytes: usize,
    },
}

/// Limits on requests that the server enforces beyond the export size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestLimits {
    /// Longest `NBD_CMD_READ`, `NBD_CMD_WRITE` or `NBD_CMD_CACHE` accepted. Commands without a
    /// payload (`NBD_CMD_TRIM`, `NBD_CMD_WRITE_ZEROES`, `NBD_CMD_BLOCK_STATUS`) may ask for more,
    /// up to `u32::MAX` ("Size constraints"). Values above [`READ_DATA_CHUNK_DATA_MAX_BYTES`] act
    /// as that value, so every accepted read fits one data chunk.
    pub request_max_bytes: u32,
}

impl Default for RequestLimits {
    /// 32 MiB, the largest payload the spec says must not be treated as a denial of service.
    fn default() -> Self {
        RequestLimits {
            request_max_bytes: proto::PAYLOAD_DEFAULT_MAX_BYTES,
        }
    }
}

/// The error values of the spec ("Error values"); each maps to one 32-bit code on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Errno {
    /// `NBD_EPERM` (1): operation not permitted, e.g. a write to a read-only export.
    Perm,
    /// `NBD_EIO` (5): input/output error.
    Io,
    /// `NBD_ENOMEM` (12): cannot allocate memory (the spec asks servers to avoid it).
    NoMem,
    /// `NBD_EINVAL` (22): invalid argument.
    Inval,
    /// `NBD_ENOSPC` (28): no space left, e.g. a write past the end of the export.
    NoSpc,
    /// `NBD_EOVERFLOW` (75): value too large.
    Overflow,
    /// `NBD_ENOTSUP` (95): operation not supported (fast zero refused).
    NotSup,
    /// `NBD_ESHUTDOWN` (108): the server is shutting down.
    Shutdown,
}

impl Errno {
    /// The value sent in the error field of a reply.
    pub fn code(self) -> u32 {
        match self {
            Errno::Perm => proto::NBD_EPERM,
            Errno::Io => proto::NBD_EIO,
            Errno::NoMem => proto::NBD_ENOMEM,
            Errno::Inval => proto::NBD_EINVAL,
            Errno::NoSpc => proto::NBD_ENOSPC,
            Errno::Overflow => proto::NBD_EOVERFLOW,
            Errno::NotSup => proto::NBD_ENOTSUP,
            Errno::Shutdown => proto::NBD_ESHUTDOWN,
        }
    }

    /// Decodes a reply error field; `None` for zero (success) and for values the spec does not
    /// define (which a client should treat as `NBD_EINVAL`).
    pub fn from_code(code: u32) -> Option<Errno> {
        match code {
            proto::NBD_EPERM => Some(Errno::Perm),
            proto::NBD_EIO => Some(Errno::Io),
            proto::NBD_ENOMEM => Some(Errno::NoMem),
            proto::NBD_EINVAL => Some(Errno::Inval),
            proto::NBD_ENOSPC => Some(Errno::NoSpc),
            proto::NBD_EOVERFLOW => Some(Errno::Overflow),
            proto::NBD_ENOTSUP => Some(Errno::NotSup),
            proto::NBD_ESHUTDOWN => Some(Errno::Shutdown),
            _ => None,
        }
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Errno::Perm => "NBD_EPERM",
            Errno::Io => "NBD_EIO",
            Errno::NoMem => "NBD_ENOMEM",
            Errno::Inval => "NBD_EINVAL",
            Errno::NoSpc => "NBD_ENOSPC",
            Errno::Overflow => "NBD_EOVERFLOW",
            Errno::NotSup => "NBD_ENOTSUP",
            Errno::Shutdown => "NBD_ESHUTDOWN",
        };
        formatter.write_str(name)
    }
}

/// Decodes the first [`REQUEST_HEADER_BYTES`] bytes of `buf` ("Request message"). Bytes after the
/// header are not looked at; the caller consumes exactly `REQUEST_HEADER_BYTES` on success.
pub fn parse_request_header(buf: &[u8]) -> Result<RequestHeader, TransmissionError> {
    let header: &[u8; REQUEST_HEADER_BYTES] = buf
        .get(..REQUEST_HEADER_BYTES)
        .and_then(|prefix| prefix.try_into().ok())
        .ok_or(TransmissionError::HeaderTooShort {
            length_bytes: buf.len(),
        })?;
    let magic = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    if magic != proto::NBD_REQUEST_MAGIC {
        return Err(TransmissionError::BadMagic(magic));
    }
    let flags = u16::from_be_bytes([header[4], header[5]]);
    let command = Command::from_code(u16::from_be_bytes([header[6], header[7]]));
    let mut cookie_bytes = [0u8; 8];
    cookie_bytes.copy_from_slice(&header[8..16]);
    let mut offset_bytes = [0u8; 8];
    offset_bytes.copy_from_slice(&header[16..24]);
    let length = u32::from_be_bytes([header[24], header[25], header[26], header[27]]);
    Ok(RequestHeader {
        flags,
        command,
        cookie: u64::from_be_bytes(cookie_bytes),
        offset: u64::from_be_bytes(offset_bytes),
        length,
    })
}

/// Appends the wire form of a request header; the client side of [`parse_request_header`], used
/// by anything that forwards NBD requests and by tests.
pub fn encode_request_header(out: &mut Vec<u8>, header: &RequestHeader) {
    out.put_u32(proto::NBD_REQUEST_MAGIC);
    out.put_u16(header.flags);
    out.put_u16(header.command.code());
    out.put_u64(header.cookie);
    out.put_u64(header.offset);
    out.put_u32(header.length);
}

/// Bytes of payload that follow this header on the wire: `length` for `NBD_CMD_WRITE`, zero for
/// every other command ("Request message"). The session must consume them even when
/// [`check_request`] rejects the request.
pub fn write_payload_bytes(header: &RequestHeader) -> u32 {
    match header.command {
        Command::Write => header.length,
        _ => 0,
    }
}

/// Decides whether a request may be executed against an export of `export_size_bytes` with the
/// transmission flags that were actually sent to the client. `Ok(())` means "execute it"; a
/// zero-length `READ`, `WRITE`, `TRIM`, `WRITE_ZEROES` or `CACHE` is valid and should be answered
/// as a successful no-op (the spec leaves it unspecified but says the server SHOULD NOT
/// disconnect). `NBD_CMD_DISC` is always `Ok`: it has no reply, and its offset and length are
/// ignored.
///
/// `Err(errno)` means: reply with `errno` and keep the connection. For `NBD_CMD_WRITE` the payload
/// is still on the wire (see [`write_payload_bytes`]).
///
/// This function cannot know whether a metadata context was selected or what the minimum block
/// size is; [`check_request_negotiated`] adds those checks and is what a session should call.
pub fn check_request(
    header: &RequestHeader,
    export_size_bytes: u64,
    transmission_flags: u16,
    structured_replies: bool,
    limits: &RequestLimits,
) -> Result<(), Errno> {
    let command = header.command;
    let flags = header.flags;
    let has = |flag: u16| transmission_flags & flag != 0;

    // "Error values": "The server SHOULD return NBD_EINVAL if it receives an unknown command."
    // NBD_CMD_DISC has no reply and its offset/length are reserved; nothing to check.
    match command {
        Command::Unknown(_) => return Err(Errno::Inval),
        Command::Disc => return Ok(()),
        _ => {}
    }

    // A command the transmission flags did not expose: "A client MUST NOT send a flush request
    // unless NBD_FLAG_SEND_FLUSH was set" (NBD_CMD_FLUSH), likewise NBD_CMD_TRIM and
    // NBD_CMD_WRITE_ZEROES; NBD_CMD_BLOCK_STATUS needs structured replies (its reply "MUST be
    // sent as a structured reply"). NBD_CMD_CACHE is accepted without NBD_FLAG_SEND_CACHE because
    // "client implementations exist which attempt to send a cache request even when
    // NBD_FLAG_SEND_CACHE was not set".
    let command_exposed = match command {
        Command::Flush => has(proto::NBD_FLAG_SEND_FLUSH),
        Command::Trim => has(proto::NBD_FLAG_SEND_TRIM),
        Command::WriteZeroes => has(proto::NBD_FLAG_SEND_WRITE_ZEROES),
        Command::BlockStatus => structured_replies,
        _ => true,
    };
    if !command_exposed {
        return Err(Errno::Inval);
    }

    // "Command flags" and "Error values": NBD_EINVAL for an unknown flag or "a flag not
    // explicitly documented as applicable to the given request".
    if flags & !COMMAND_FLAGS_KNOWN != 0 {
        return Err(Errno::Inval);
    }
    // NBD_CMD_FLAG_FUA "is valid for all commands, provided NBD_FLAG_SEND_FUA has been
    // negotiated".
    if flags & proto::NBD_CMD_FLAG_FUA != 0 && !has(proto::NBD_FLAG_SEND_FUA) {
        return Err(Errno::Inval);
    }
    // NBD_CMD_FLAG_NO_HOLE is "valid during NBD_CMD_WRITE_ZEROES" only.
    if flags & proto::NBD_CMD_FLAG_NO_HOLE != 0 && command != Command::WriteZeroes {
        return Err(Errno::Inval);
    }
    // NBD_CMD_FLAG_DF is "valid during NBD_CMD_READ" and "MUST NOT be set unless the
    // transmission flags include NBD_FLAG_SEND_DF", which in turn requires structured replies.
    if flags & proto::NBD_CMD_FLAG_DF != 0
        && (command != Command::Read || !has(proto::NBD_FLAG_SEND_DF) || !structured_replies)
    {
        return Err(Errno::Inval);
    }
    // NBD_CMD_FLAG_REQ_ONE is "valid during NBD_CMD_BLOCK_STATUS" only.
    if flags & proto::NBD_CMD_FLAG_REQ_ONE != 0 && command != Command::BlockStatus {
        return Err(Errno::Inval);
    }
    // NBD_CMD_FLAG_FAST_ZERO is "valid during NBD_CMD_WRITE_ZEROES"; without
    // NBD_FLAG_SEND_FAST_ZERO the server "SHOULD fail with NBD_EINVAL if the
    // NBD_CMD_FLAG_FAST_ZERO flag was set".
    if flags & proto::NBD_CMD_FLAG_FAST_ZERO != 0
        && (command != Command::WriteZeroes || !has(proto::NBD_FLAG_SEND_FAST_ZERO))
    {
        return Err(Errno::Inval);
    }

    // "Transmission flags" / NBD_FLAG_READ_ONLY: "the server MUST error subsequent write
    // operations"; "Error values": "SHOULD return NBD_EPERM if it receives a write or trim
    // request on a read-only export"; NBD_CMD_WRITE_ZEROES: "SHOULD return NBD_EPERM if it
    // receives a write zeroes request on a read-only export".
    if command.is_write() && has(proto::NBD_FLAG_READ_ONLY) {
        return Err(Errno::Perm);
    }

    // "For a flush request, length and offset are reserved": ignored rather than rejected, as
    // clients are not known to set them and nothing depends on them.
    if command == Command::Flush {
        return Ok(());
    }

    // Payload-bearing commands are bounded by the maximum payload size ("Size constraints").
    // NBD_CMD_READ with structured replies: "the server is also permitted to reject large read
    // requests up front with NBD_EOVERFLOW"; with simple replies "any client request with a
    // length larger than the maximum payload size will fail", and NBD_EOVERFLOW is reserved for
    // the structured case ("Error values"), so NBD_EINVAL. NBD_CMD_WRITE: NBD_EINVAL (its payload
    // is still on the wire). NBD_CMD_CACHE carries no payload, and "Error values" documents
    // NBD_EOVERFLOW "when a command without payload requests a length larger than an advertised
    // maximum payload length".
    // A read that passes must also fit one NBD_REPLY_TYPE_OFFSET_DATA chunk, whatever the
    // configured limit.
    let request_max_bytes = limits.request_max_bytes.min(READ_DATA_CHUNK_DATA_MAX_BYTES);
    if header.length > request_max_bytes {
        match command {
            Command::Read if structured_replies => return Err(Errno::Overflow),
            Command::Read | Command::Write => return Err(Errno::Inval),
            Command::Cache => return Err(Errno::Overflow),
            _ => {}
        }
    }

    // "Size constraints": the client "MUST NOT use a length which, when added to offset, would
    // exceed the export size". "Error values": NBD_ENOSPC for a write "including one or more
    // sectors beyond the size of the device", NBD_EINVAL for read or trim; NBD_CMD_WRITE_ZEROES
    // "SHOULD return NBD_ENOSPC", NBD_CMD_BLOCK_STATUS "SHOULD return NBD_EINVAL". NBD_CMD_CACHE
    // behaves as a read. An offset+length that overflows u64 is past the end too.
    let within_export = header
        .offset
        .checked_add(u64::from(header.length))
        .is_some_and(|end_bytes| end_bytes <= export_size_bytes);
    if !within_export {
        return match command {
            Command::Write | Command::WriteZeroes => Err(Errno::NoSpc),
            _ => Err(Errno::Inval),
        };
    }

    // NBD_CMD_BLOCK_STATUS with length 0 is unspecified ("SHOULD NOT request a status length of
    // 0"), but the reply must contain at least one non-zero extent no longer than the request
    // when REQ_ONE is set, so there is nothing valid to answer: NBD_EINVAL.
    if command == Command::BlockStatus && header.length == 0 {
        return Err(Errno::Inval);
    }

    Ok(())
}

/// [`check_request`] with everything the handshake negotiated, plus the checks that need it:
///
/// - `NBD_CMD_BLOCK_STATUS` without a selected metadata context → `NBD_EINVAL` ("Metadata
///   querying": "Servers SHOULD reply with NBD_EINVAL to clients sending NBD_CMD_BLOCK_STATUS
///   without selecting at least one metadata context").
/// - offset and length not multiples of the export's minimum block size → `NBD_EINVAL` ("Size
///   constraints": "The server SHOULD report an NBD_EINVAL error if the client's request is not
///   aligned to advertised minimum block size boundaries"). A request ending exactly at the end
///   of an export whose size is not a multiple of the block size is accepted, since the client
///   could not otherwise reach the final bytes. For `NBD_CMD_BLOCK_STATUS` only the offset is
///   checked: its length is a hint.
pub fn check_request_negotiated(
    header: &RequestHeader,
    negotiated: &Negotiated,
    limits: &RequestLimits,
) -> Result<(), Errno> {
    let export = &negotiated.export;
    check_request(
        header,
        export.size_bytes,
        export.transmission_flags,
        negotiated.structured_replies,
        limits,
    )?;
    if header.command == Command::BlockStatus && negotiated.base_allocation_context_id.is_none() {
        return Err(Errno::Inval);
    }
    let block_size_min_bytes = u64::from(export.block_size_min_bytes);
    let addresses_range = matches!(
        header.command,
        Command::Read
            | Command::Write
            | Command::Trim
            | Command::Cache
            | Command::WriteZeroes
            | Command::BlockStatus
    );
    if addresses_range && block_size_min_bytes > 1 {
        let offset_aligned = header.offset % block_size_min_bytes == 0;
        // check_request already proved offset + length does not overflow and fits the export.
        let end_bytes = header.offset.saturating_add(u64::from(header.length));
        let length_aligned = header.command == Command::BlockStatus
            || u64::from(header.length) % block_size_min_bytes == 0
            || end_bytes == export.size_bytes;
        if !offset_aligned || !length_aligned {
            return Err(Errno::Inval);
        }
    }
    Ok(())
}

/// Appends a simple reply header ("Simple reply message"). On success of `NBD_CMD_READ` the
/// caller appends exactly `length` bytes of data after it; on error nothing may follow.
pub fn encode_simple_reply(out: &mut Vec<u8>, cookie: u64, errno: Option<Errno>) {
    out.put_u32(proto::NBD_SIMPLE_REPLY_MAGIC);
    out.put_u32(errno.map_or(0, Errno::code));
    out.put_u64(cookie);
}

/// Appends a structured reply chunk header ("Structured reply chunk message").
fn encode_chunk_header(
    out: &mut Vec<u8>,
    cookie: u64,
    reply_type: u16,
    done: bool,
    payload_length_bytes: u32,
) {
    out.put_u32(proto::NBD_STRUCTURED_REPLY_MAGIC);
    out.put_u16(if done { proto::NBD_REPLY_FLAG_DONE } else { 0 });
    out.put_u16(reply_type);
    out.put_u64(cookie);
    out.put_u32(payload_length_bytes);
}

/// Appends the header and offset of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk ("Structured reply
/// types"); the caller appends exactly `data_len` bytes of data after it.
///
/// A content chunk "MUST describe at least one byte", so for `data_len == 0` (a zero-length
/// read, which [`check_request`] accepts) no data chunk is written: nothing at all if `done` is
/// false, or the `NBD_REPLY_TYPE_NONE` chunk that ends the reply if `done` is true.
///
/// # Panics
/// If `data_len` exceeds [`READ_DATA_CHUNK_DATA_MAX_BYTES`]: a caller bug, since
/// [`check_request`] never lets a longer read through.
pub fn encode_read_data_chunk_header(
    out: &mut Vec<u8>,
    cookie: u64,
    offset: u64,
    data_len: u32,
    done: bool,
) {
    assert!(
        data_len <= READ_DATA_CHUNK_DATA_MAX_BYTES,
        "NBD_REPLY_TYPE_OFFSET_DATA carries at most {READ_DATA_CHUNK_DATA_MAX_BYTES} bytes, got {data_len}"
    );
    if data_len == 0 {
        if done {
            encode_structured_done(out, cookie);
        }
        return;
    }
    encode_chunk_header(
        out,
        cookie,
        proto::NBD_REPLY_TYPE_OFFSET_DATA,
        done,
        data_len + 8,
    );
    out.put_u64(offset);
}

/// Appends an `NBD_REPLY_TYPE_OFFSET_HOLE` chunk: `hole_len` bytes at `offset` read as zeroes.
///
/// The hole size "MUST be nonzero", so for `hole_len == 0` no hole chunk is written: nothing if
/// `done` is false, or the `NBD_REPLY_TYPE_NONE` chunk that ends the reply if `done` is true.
pub fn encode_hole_chunk(out: &mut Vec<u8>, cookie: u64, offset: u64, hole_len: u32, done: bool) {
    if hole_len == 0 {
        if done {
            encode_structured_done(out, cookie);
        }
        return;
    }
    encode_chunk_header(out, cookie, proto::NBD_REPLY_TYPE_OFFSET_HOLE, done, 12);
    out.put_u64(offset);
    out.put_u32(hole_len);
}

/// The longest prefix of `message` that fits the spec's string limit without splitting a UTF-8
/// character ("Conventions": strings "MUST be no longer than 4096 bytes").
fn truncate_message(message: &str) -> &str {
    if message.len() <= proto::STRING_LENGTH_MAX_BYTES {
        return message;
    }
    let mut end = proto::STRING_LENGTH_MAX_BYTES;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

/// Appends an `NBD_REPLY_TYPE_ERROR` chunk with the DONE flag: the final chunk of a failed
/// structured reply. `message` is for a human and is cut to 4096 bytes ("Structured reply
/// types": "message length MUST NOT exceed the 4096 bytes string length limit").
pub fn encode_structured_error(out: &mut Vec<u8>, cookie: u64, errno: Errno, message: &str) {
    let message = truncate_message(message);
    // At most 4096 bytes after truncation, so both conversions are lossless.
    let message_length_bytes = message.len() as u16;
    encode_chunk_header(
        out,
        cookie,
        proto::NBD_REPLY_TYPE_ERROR,
        true,
        6 + u32::from(message_length_bytes),
    );
    out.put_u32(errno.code());
    out.put_u16(message_length_bytes);
    out.put_slice(message.as_bytes());
}

/// Appends an `NBD_REPLY_TYPE_ERROR_OFFSET` chunk (without DONE): the part of a read or write at
/// `offset` failed, and other chunks may follow ("Structured reply types").
pub fn encode_structured_error_offset(
    out: &mut Vec<u8>,
    cookie: u64,
    errno: Errno,
    message: &str,
    offset: u64,
) {
    let message = truncate_message(message);
    let message_length_bytes = message.len() as u16;
    encode_chunk_header(
        out,
        cookie,
        proto::NBD_REPLY_TYPE_ERROR_OFFSET,
        false,
        14 + u32::from(message_length_bytes),
    );
    out.put_u32(errno.code());
    out.put_u16(message_length_bytes);
    out.put_slice(message.as_bytes());
    out.put_u64(offset);
}

/// Appends an `NBD_REPLY_TYPE_NONE` chunk with the DONE flag, which ends a structured reply and,
/// if no error chunk preceded it, declares success.
pub fn encode_structured_done(out: &mut Vec<u8>, cookie: u64) {
    encode_chunk_header(out, cookie, proto::NBD_REPLY_TYPE_NONE, true, 0);
}

/// One `base:allocation` (or other context) descriptor of an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockStatusExtent {
    /// Length of the extent; "MUST be nonzero".
    pub length_bytes: u32,
    /// Status flags defined by the context, e.g. `NBD_STATE_HOLE | NBD_STATE_ZERO`.
    pub flags: u32,
}

/// Appends an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for one metadata context ("Structured reply
/// types"). A successful `NBD_CMD_BLOCK_STATUS` needs exactly one such chunk per selected context.
///
/// # Panics
/// If `extents` is empty or longer than [`BLOCK_STATUS_EXTENTS_MAX_COUNT`], or an extent has
/// length 0: the spec requires "one or more descriptors", each "MUST be nonzero", and at most 2^20
/// of them. These are caller bugs.
pub fn encode_block_status(
    out: &mut Vec<u8>,
    cookie: u64,
    context_id: u32,
    extents: &[BlockStatusExtent],
    done: bool,
) {
    assert!(
        !extents.is_empty() && extents.len() <= BLOCK_STATUS_EXTENTS_MAX_COUNT,
        "NBD_REPLY_TYPE_BLOCK_STATUS needs 1..={BLOCK_STATUS_EXTENTS_MAX_COUNT} extents, got {}",
        extents.len()
    );
    assert!(
        extents.iter().all(|extent| extent.length_bytes > 0),
        "NBD_REPLY_TYPE_BLOCK_STATUS extents must have nonzero length"
    );
    // At most 4 + 8 * 2^20 bytes, far below u32::MAX.
    let payload_length_bytes = 4 + 8 * extents.len() as u32;
    encode_chunk_header(
        out,
        cookie,
        proto::NBD_REPLY_TYPE_BLOCK_STATUS,
        done,
        payload_length_bytes,
    );
    out.put_u32(context_id);
    for extent in extents {
        out.put_u32(extent.length_bytes);
        out.put_u32(extent.flags);
    }
}

#[cfg(test)]
mod tests {
    //! Each test names the section of `doc/proto.md` it checks.

    use super::*;
    use crate::nbd::handshake::ExportDescription;
    use proptest::prelude::*;

    const EXPORT_SIZE_BYTES: u64 = 1 << 30;
    const REQUEST_MAX_BYTES: u32 = 32 << 20;
    const LIMITS: RequestLimits = RequestLimits {
        request_max_bytes: REQUEST_MAX_BYTES,
    };
    /// Every feature exposed, as a read-write raftblk export would.
    const ALL_FLAGS: u16 = proto::NBD_FLAG_HAS_FLAGS
        | proto::NBD_FLAG_SEND_FLUSH
        | proto::NBD_FLAG_SEND_FUA
        | proto::NBD_FLAG_SEND_TRIM
        | proto::NBD_FLAG_SEND_WRITE_ZEROES
        | proto::NBD_FLAG_SEND_DF
        | proto::NBD_FLAG_CAN_MULTI_CONN
        | proto::NBD_FLAG_SEND_CACHE
        | proto::NBD_FLAG_SEND_FAST_ZERO;

    fn request(command: Command, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            cookie: 0x0102_0304_0506_0708,
            offset,
            length,
        }
    }

    /// `check_request` against a 1 GiB export with every feature and structured replies.
    fn check(command: Command, flags: u16, offset: u64, length: u32) -> Result<(), Errno> {
        check_request(
            &request(command, flags, offset, length),
            EXPORT_SIZE_BYTES,
            ALL_FLAGS,
            true,
            &LIMITS,
        )
    }

    /// `check_request` with explicit transmission flags and structured-reply state.
    fn check_with(
        command: Command,
        flags: u16,
        transmission_flags: u16,
        structured_replies: bool,
    ) -> Result<(), Errno> {
        check_request(
            &request(command, flags, 4096, 4096),
            EXPORT_SIZE_BYTES,
            transmission_flags,
            structured_replies,
            &LIMITS,
        )
    }

    const DATA_COMMANDS: [Command; 6] = [
        Command::Read,
        Command::Write,
        Command::Trim,
        Command::Cache,
        Command::WriteZeroes,
        Command::BlockStatus,
    ];

    /// Reference: proto.md, "Request message": magic, flags, type, cookie, offset, length, all
    /// big-endian.
    #[test]
    fn request_header_decodes_big_endian_fields() {
        let mut bytes = vec![0x25, 0x60, 0x95, 0x13, 0x00, 0x01, 0x00, 0x01];
        bytes.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        bytes.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x10, 0]);
        bytes.extend_from_slice(&[0, 0, 2, 0]);
        bytes.extend_from_slice(b"payload is not looked at");
        assert_eq!(
            parse_request_header(&bytes),
            Ok(RequestHeader {
                flags: proto::NBD_CMD_FLAG_FUA,
                command: Command::Write,
                cookie: 0x0102_0304_0506_0708,
                offset: 4096,
                length: 512,
            })
        );
        let mut encoded = Vec::new();
        encode_request_header(&mut encoded, &request(Command::Write, 1, 4096, 512));
        assert_eq!(encoded, bytes[..REQUEST_HEADER_BYTES]);
    }

    /// Reference: proto.md, "Request message": a header without `NBD_REQUEST_MAGIC` means the
    /// stream is out of step (fatal); a short buffer is reported, not read past.
    #[test]
    fn bad_magic_and_short_header_are_errors() {
        let mut bytes = vec![0u8; REQUEST_HEADER_BYTES];
        bytes[..4].copy_from_slice(&proto::NBD_EXTENDED_REQUEST_MAGIC.to_be_bytes());
        assert_eq!(
            parse_request_header(&bytes),
            Err(TransmissionError::BadMagic(
                proto::NBD_EXTENDED_REQUEST_MAGIC
            ))
        );
        assert_eq!(
            parse_request_header(&bytes[..27]),
            Err(TransmissionError::HeaderTooShort { length_bytes: 27 })
        );
    }

    /// Reference: proto.md, "Request types": numbers 0..=7; 8 (`NBD_CMD_RESIZE`, experimental)
    /// and others are unknown here.
    #[test]
    fn command_codes_round_trip() {
        for code in 0..=u16::MAX {
            assert_eq!(Command::from_code(code).code(), code);
        }
        assert_eq!(Command::from_code(7), Command::BlockStatus);
        assert_eq!(
            Command::from_code(proto::NBD_CMD_RESIZE),
            Command::Unknown(8)
        );
    }

    /// Reference: proto.md, "Error values": EPERM 1, EIO 5, ENOMEM 12, EINVAL 22, ENOSPC 28,
    /// EOVERFLOW 75, ENOTSUP 95, ESHUTDOWN 108.
    #[test]
    fn errno_codes_match_the_spec() {
        let all = [
            (Errno::Perm, 1),
            (Errno::Io, 5),
            (Errno::NoMem, 12),
            (Errno::Inval, 22),
            (Errno::NoSpc, 28),
            (Errno::Overflow, 75),
            (Errno::NotSup, 95),
            (Errno::Shutdown, 108),
        ];
        for (errno, code) in all {
            assert_eq!(errno.code(), code);
            assert_eq!(Errno::from_code(code), Some(errno));
        }
        assert_eq!(Errno::from_code(0), None);
        assert_eq!(Errno::from_code(2), None);
        assert_eq!(Errno::Inval.to_string(), "NBD_EINVAL");
    }

    /// Reference: proto.md, "Request types" and "Error values": every known command with valid
    /// arguments passes.
    #[test]
    fn valid_requests_pass() {
        for command in DATA_COMMANDS {
            assert_eq!(check(command, 0, 0, 4096), Ok(()), "{command:?}");
            assert_eq!(
                check(command, 0, EXPORT_SIZE_BYTES - 512, 512),
                Ok(()),
                "{command:?}"
            );
        }
        assert_eq!(check(Command::Flush, 0, 0, 0), Ok(()));
    }

    /// Reference: proto.md, "Error values": "The server SHOULD return NBD_EINVAL if it receives
    /// an unknown command."
    #[test]
    fn unknown_command_is_einval() {
        assert_eq!(check(Command::Unknown(8), 0, 0, 0), Err(Errno::Inval));
        assert_eq!(
            check(Command::Unknown(0xffff), 0, 0, 512),
            Err(Errno::Inval)
        );
    }

    /// Reference: proto.md, `NBD_CMD_DISC`: no reply, the server closes; offset and length
    /// are reserved and ignored here.
    #[test]
    fn disc_is_always_accepted() {
        assert_eq!(check(Command::Disc, 0xffff, u64::MAX, u32::MAX), Ok(()));
    }

    /// Reference: proto.md, `NBD_CMD_FLUSH` ("A client MUST NOT send a flush request unless
    /// NBD_FLAG_SEND_FLUSH was set"); its reserved offset and length are ignored.
    #[test]
    fn flush_needs_send_flush_and_ignores_offset_and_length() {
        assert_eq!(
            check_with(
                Command::Flush,
                0,
                ALL_FLAGS & !proto::NBD_FLAG_SEND_FLUSH,
                true
            ),
            Err(Errno::Inval)
        );
        assert_eq!(check(Command::Flush, 0, u64::MAX, u32::MAX), Ok(()));
    }

    /// Reference: proto.md, `NBD_CMD_TRIM` ("MUST NOT send a trim request unless
    /// NBD_FLAG_SEND_TRIM"), `NBD_CMD_WRITE_ZEROES` (likewise `NBD_FLAG_SEND_WRITE_ZEROES`),
    /// `NBD_CMD_BLOCK_STATUS` ("requires the client to first negotiate structured replies").
    #[test]
    fn unexposed_commands_are_einval() {
        assert_eq!(
            check_with(
                Command::Trim,
                0,
                ALL_FLAGS & !proto::NBD_FLAG_SEND_TRIM,
                true
            ),
            Err(Errno::Inval)
        );
        assert_eq!(
            check_with(
                Command::WriteZeroes,
                0,
                ALL_FLAGS & !proto::NBD_FLAG_SEND_WRITE_ZEROES,
                true
            ),
            Err(Errno::Inval)
        );
        assert_eq!(
            check_with(Command::BlockStatus, 0, ALL_FLAGS, false),
            Err(Errno::Inval)
        );
    }

    /// Reference: proto.md, `NBD_CMD_CACHE`: "client implementations exist which attempt to send
    /// a cache request even when NBD_FLAG_SEND_CACHE was not set".
    #[test]
    fn cache_is_accepted_without_send_cache() {
        assert_eq!(
            check_with(Command::Cache, 0, proto::NBD_FLAG_HAS_FLAGS, false),
            Ok(())
        );
    }

    /// Reference: proto.md, "Error values": "SHOULD return NBD_EINVAL if it receives an unknown
    /// command flag" (bit 5 `NBD_CMD_FLAG_PAYLOAD_LEN` belongs to an extension not negotiated).
    #[test]
    fn unknown_command_flags_are_einval() {
        for flag in [proto::NBD_CMD_FLAG_PAYLOAD_LEN, 1 << 6, 1 << 15] {
            for command in DATA_COMMANDS {
                assert_eq!(
                    check(command, flag, 0, 512),
                    Err(Errno::Inval),
                    "{command:?}"
                );
            }
        }
    }

    /// Reference: proto.md, "Command flags" / `NBD_CMD_FLAG_FUA`: "valid for all commands,
    /// provided NBD_FLAG_SEND_FUA has been negotiated".
    #[test]
    fn fua_needs_send_fua() {
        for command in DATA_COMMANDS {
            assert_eq!(
                check(command, proto::NBD_CMD_FLAG_FUA, 0, 512),
                Ok(()),
                "{command:?}"
            );
            assert_eq!(
                check_with(
                    command,
                    proto::NBD_CMD_FLAG_FUA,
                    ALL_FLAGS & !proto::NBD_FLAG_SEND_FUA,
                    true
                ),
                Err(Errno::Inval),
                "{command:?}"
            );
        }
        assert_eq!(check(Command::Flush, proto::NBD_CMD_FLAG_FUA, 0, 0), Ok(()));
    }

    /// Reference: proto.md, "Command flags": `NBD_CMD_FLAG_NO_HOLE` is "valid during
    /// NBD_CMD_WRITE_ZEROES"; "Error values": a flag "not explicitly documented as applicable to
    /// the given request" is `NBD_EINVAL`.
    #[test]
    fn no_hole_only_on_write_zeroes() {
        assert_eq!(
            check(Command::WriteZeroes, proto::NBD_CMD_FLAG_NO_HOLE, 0, 512),
            Ok(())
        );
        for command in [Command::Read, Command::Write, Command::Trim, Command::Cache] {
            assert_eq!(
                check(command, proto::NBD_CMD_FLAG_NO_HOLE, 0, 512),
                Err(Errno::Inval),
                "{command:?}"
            );
        }
        assert_eq!(
            check(Command::Flush, proto::NBD_CMD_FLAG_NO_HOLE, 0, 0),
            Err(Errno::Inval)
        );
    }

    /// Reference: proto.md, `NBD_CMD_FLAG_DF`: "valid during NBD_CMD_READ", "MUST NOT be set
    /// unless the transmission flags include NBD_FLAG_SEND_DF", which requires structured
    /// replies.
    #[test]
    fn df_only_on_read_with_send_df_and_structured_replies() {
        let df = proto::NBD_CMD_FLAG_DF;
        assert_eq!(check(Command::Read, df, 0, 65536), Ok(()));
        assert_eq!(
            check_with(
                Command::Read,
                df,
                ALL_FLAGS & !proto::NBD_FLAG_SEND_DF,
                true
            ),
            Err(Errno::Inval)
        );
        assert_eq!(
            check_with(Command::Read, df, ALL_FLAGS, false),
            Err(Errno::Inval)
        );
        assert_eq!(check(Command::Write, df, 0, 512), Err(Errno::Inval));
        assert_eq!(check(Command::BlockStatus, df, 0, 512), Err(Errno::Inval));
    }

    /// Reference: proto.md, `NBD_CMD_FLAG_REQ_ONE`: "valid during NBD_CMD_BLOCK_STATUS".
    #[test]
    fn req_one_only_on_block_status() {
        let req_one = proto::NBD_CMD_FLAG_REQ_ONE;
        assert_eq!(check(Command::BlockStatus, req_one, 0, 512), Ok(()));
        assert_eq!(check(Command::Read, req_one, 0, 512), Err(Errno::Inval));
        assert_eq!(
            check(Command::WriteZeroes, req_one, 0, 512),
            Err(Errno::Inval)
        );
    }

    /// Reference: proto.md, `NBD_CMD_WRITE_ZEROES`: without `NBD_FLAG_SEND_FAST_ZERO` the server
    /// "SHOULD fail with NBD_EINVAL if the NBD_CMD_FLAG_FAST_ZERO flag was set"; the flag is
    /// "valid during NBD_CMD_WRITE_ZEROES" only.
    #[test]
    fn fast_zero_needs_send_fast_zero_and_write_zeroes() {
        let fast_zero = proto::NBD_CMD_FLAG_FAST_ZERO;
        assert_eq!(check(Command::WriteZeroes, fast_zero, 0, 512), Ok(()));
        assert_eq!(
            check_with(
                Command::WriteZeroes,
                fast_zero,
                ALL_FLAGS & !proto::NBD_FLAG_SEND_FAST_ZERO,
                true
            ),
            Err(Errno::Inval)
        );
        assert_eq!(check(Command::Write, fast_zero, 0, 512), Err(Errno::Inval));
        assert_eq!(check(Command::Trim, fast_zero, 0, 512), Err(Errno::Inval));
    }

    /// Reference: proto.md, `NBD_FLAG_READ_ONLY` ("the server MUST error subsequent write
    /// operations") and "Error values" ("SHOULD return NBD_EPERM if it receives a write or trim
    /// request on a read-only export"; `NBD_CMD_WRITE_ZEROES` likewise).
    #[test]
    fn writes_to_read_only_export_are_eperm() {
        let read_only = ALL_FLAGS | proto::NBD_FLAG_READ_ONLY;
        for command in [Command::Write, Command::Trim, Command::WriteZeroes] {
            assert_eq!(
                check_with(command, 0, read_only, true),
                Err(Errno::Perm),
                "{command:?}"
            );
        }
        for command in [
            Command::Read,
            Command::Cache,
            Command::BlockStatus,
            Command::Flush,
        ] {
            assert_eq!(
                check_with(command, 0, read_only, true),
                Ok(()),
                "{command:?}"
            );
        }
    }

    /// Reference: proto.md, "Error values": "SHOULD return NBD_ENOSPC if it receives a write
    /// request including one or more sectors beyond the size of the device ... NBD_EINVAL if it
    /// receives a read or trim request" beyond it; `NBD_CMD_WRITE_ZEROES` "SHOULD return
    /// NBD_ENOSPC"; `NBD_CMD_BLOCK_STATUS` "SHOULD return NBD_EINVAL".
    #[test]
    fn requests_past_the_end() {
        let expected = [
            (Command::Read, Errno::Inval),
            (Command::Write, Errno::NoSpc),
            (Command::Trim, Errno::Inval),
            (Command::Cache, Errno::Inval),
            (Command::WriteZeroes, Errno::NoSpc),
            (Command::BlockStatus, Errno::Inval),
        ];
        for (command, errno) in expected {
            assert_eq!(
                check(command, 0, EXPORT_SIZE_BYTES - 511, 512),
                Err(errno),
                "{command:?}"
            );
            assert_eq!(
                check(command, 0, EXPORT_SIZE_BYTES, 1),
                Err(errno),
                "{command:?}"
            );
            // offset + length overflows u64.
            assert_eq!(check(command, 0, u64::MAX, 2), Err(errno), "{command:?}");
            assert_eq!(
                check(command, 0, EXPORT_SIZE_BYTES - 512, 512),
                Ok(()),
                "{command:?}"
            );
        }
    }

    /// Reference: proto.md, "Size constraints" and `NBD_CMD_READ`: with structured replies "the
    /// server is also permitted to reject large read requests up front with NBD_EOVERFLOW";
    /// with simple replies a longer read "will fail" (`NBD_EINVAL`, as "Error values" keeps
    /// `NBD_EOVERFLOW` for the documented cases).
    #[test]
    fn read_longer_than_limit() {
        let too_long = REQUEST_MAX_BYTES + 1;
        assert_eq!(
            check_with_length(Command::Read, too_long, true),
            Err(Errno::Overflow)
        );
        assert_eq!(
            check_with_length(Command::Read, too_long, false),
            Err(Errno::Inval)
        );
        assert_eq!(
            check_with_length(Command::Read, REQUEST_MAX_BYTES, false),
            Ok(())
        );
    }

    /// Reference: proto.md, "Size constraints": "the client MUST NOT request a length larger
    /// than the maximum payload size" for `NBD_CMD_WRITE`.
    #[test]
    fn write_longer_than_limit_is_einval() {
        let too_long = REQUEST_MAX_BYTES + 1;
        assert_eq!(
            check_with_length(Command::Write, too_long, true),
            Err(Errno::Inval)
        );
        assert_eq!(
            check_with_length(Command::Write, too_long, false),
            Err(Errno::Inval)
        );
        assert_eq!(
            check_with_length(Command::Write, REQUEST_MAX_BYTES, true),
            Ok(())
        );
    }

    /// Reference: proto.md, "Size constraints": commands without payload "MAY request an effect
    /// length larger than the maximum payload size"; "Error values": `NBD_EOVERFLOW` "when a
    /// command without payload requests a length larger than an advertised maximum" (applied to
    /// `NBD_CMD_CACHE`, which is bounded like a read).
    #[test]
    fn payloadless_commands_may_exceed_the_limit_except_cache() {
        let long = REQUEST_MAX_BYTES * 4;
        for command in [Command::Trim, Command::WriteZeroes, Command::BlockStatus] {
            assert_eq!(
                check_with_length(command, long, true),
                Ok(()),
                "{command:?}"
            );
        }
        assert_eq!(
            check_with_length(Command::Cache, long, true),
            Err(Errno::Overflow)
        );
    }

    fn check_with_length(command: Command, length: u32, structured: bool) -> Result<(), Errno> {
        check_request(
            &request(command, 0, 0, length),
            EXPORT_SIZE_BYTES,
            ALL_FLAGS,
            structured,
            &LIMITS,
        )
    }

    /// Reference: proto.md, `NBD_CMD_READ`/`WRITE`/`TRIM`/`WRITE_ZEROES`: a length of 0 is
    /// unspecified but "the server SHOULD NOT disconnect": accepted as a no-op.
    /// `NBD_CMD_BLOCK_STATUS` with length 0 has no valid reply (extents are nonzero and must
    /// not exceed the request with REQ_ONE), so `NBD_EINVAL`.
    #[test]
    fn zero_length_requests() {
        for command in [
            Command::Read,
            Command::Write,
            Command::Trim,
            Command::WriteZeroes,
            Command::Cache,
        ] {
            assert_eq!(check(command, 0, 4096, 0), Ok(()), "{command:?}");
            assert_eq!(
                check(command, 0, EXPORT_SIZE_BYTES, 0),
                Ok(()),
                "{command:?}"
            );
        }
        assert_eq!(check(Command::BlockStatus, 0, 4096, 0), Err(Errno::Inval));
    }

    /// Reference: proto.md, "Request message": only `NBD_CMD_WRITE` is followed by `length`
    /// bytes of data.
    #[test]
    fn only_write_has_a_payload() {
        assert_eq!(
            write_payload_bytes(&request(Command::Write, 0, 0, 4096)),
            4096
        );
        for command in [
            Command::Read,
            Command::Disc,
            Command::Flush,
            Command::Trim,
            Command::Cache,
            Command::WriteZeroes,
            Command::BlockStatus,
            Command::Unknown(9),
        ] {
            assert_eq!(
                write_payload_bytes(&request(command, 0, 0, 4096)),
                0,
                "{command:?}"
            );
        }
    }

    fn negotiated(base_allocation_context_id: Option<u32>) -> Negotiated {
        Negotiated {
            export: ExportDescription {
                name: "vol0".to_owned(),
                description: String::new(),
                // Deliberately not a multiple of the minimum block size.
                size_bytes: EXPORT_SIZE_BYTES + 100,
                transmission_flags: ALL_FLAGS,
                block_size_min_bytes: 512,
                block_size_preferred_bytes: 4096,
                block_size_max_bytes: REQUEST_MAX_BYTES,
            },
            structured_replies: true,
            base_allocation_context_id,
        }
    }

    /// Reference: proto.md, "Metadata querying": "Servers SHOULD reply with NBD_EINVAL to
    /// clients sending NBD_CMD_BLOCK_STATUS without selecting at least one metadata context."
    #[test]
    fn block_status_needs_a_selected_context() {
        let header = request(Command::BlockStatus, 0, 0, 4096);
        assert_eq!(
            check_request_negotiated(&header, &negotiated(None), &LIMITS),
            Err(Errno::Inval)
        );
        assert_eq!(
            check_request_negotiated(&header, &negotiated(Some(1)), &LIMITS),
            Ok(())
        );
    }

    /// Reference: proto.md, "Size constraints": "The server SHOULD report an NBD_EINVAL error if
    /// the client's request is not aligned to advertised minimum block size boundaries".
    #[test]
    fn misaligned_requests_are_einval() {
        let export = negotiated(Some(1));
        let checked = |command, offset, length| {
            check_request_negotiated(&request(command, 0, offset, length), &export, &LIMITS)
        };
        for command in [
            Command::Read,
            Command::Write,
            Command::Trim,
            Command::Cache,
            Command::WriteZeroes,
        ] {
            assert_eq!(checked(command, 512, 1024), Ok(()), "{command:?}");
            assert_eq!(checked(command, 100, 512), Err(Errno::Inval), "{command:?}");
            assert_eq!(checked(command, 512, 100), Err(Errno::Inval), "{command:?}");
            // The unaligned tail of the export is reachable.
            assert_eq!(
                checked(command, EXPORT_SIZE_BYTES, 100),
                Ok(()),
                "{command:?}"
            );
        }
        // BLOCK_STATUS lengths are hints; only the offset must be aligned.
        assert_eq!(checked(Command::BlockStatus, 512, 100), Ok(()));
        assert_eq!(checked(Command::BlockStatus, 100, 512), Err(Errno::Inval));
        assert_eq!(checked(Command::Flush, 0, 0), Ok(()));
    }

    /// Reference: proto.md, "Simple reply message": magic 0x67446698, error, cookie.
    #[test]
    fn simple_reply_bytes() {
        let mut out = Vec::new();
        encode_simple_reply(&mut out, 0x0102_0304_0506_0708, None);
        encode_simple_reply(&mut out, 7, Some(Errno::NoSpc));
        assert_eq!(
            out,
            [
                &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8][..],
                &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 28, 0, 0, 0, 0, 0, 0, 0, 7][..],
            ]
            .concat()
        );
    }

    /// Decodes one structured chunk: (flags, type, cookie, payload).
    fn chunk(bytes: &[u8]) -> (u16, u16, u64, &[u8]) {
        assert_eq!(bytes[..4], proto::NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
        let flags = u16::from_be_bytes([bytes[4], bytes[5]]);
        let reply_type = u16::from_be_bytes([bytes[6], bytes[7]]);
        let cookie = u64::from_be_bytes(bytes[8..16].try_into().unwrap());
        let length = u32::from_be_bytes(bytes[16..20].try_into().unwrap()) as usize;
        (flags, reply_type, cookie, &bytes[20..20 + length])
    }

    /// Reference: proto.md, `NBD_REPLY_TYPE_OFFSET_DATA`: length is 8 + data, payload starts
    /// with the 64-bit offset; `NBD_REPLY_FLAG_DONE` marks the final chunk.
    #[test]
    fn read_data_chunk_header_bytes() {
        let mut out = Vec::new();
        encode_read_data_chunk_header(&mut out, 9, 4096, 3, false);
        out.extend_from_slice(b"abc");
        assert_eq!(out.len(), STRUCTURED_REPLY_HEADER_BYTES + 8 + 3);
        let (flags, reply_type, cookie, payload) = chunk(&out);
        assert_eq!(
            (flags, reply_type, cookie),
            (0, proto::NBD_REPLY_TYPE_OFFSET_DATA, 9)
        );
        assert_eq!(payload[..8], 4096u64.to_be_bytes());
        assert_eq!(&payload[8..], b"abc");

        let mut out = Vec::new();
        encode_read_data_chunk_header(&mut out, 9, 0, 1, true);
        assert_eq!(
            chunk(&[&out[..], b"x"].concat()).0,
            proto::NBD_REPLY_FLAG_DONE
        );
    }

    /// Reference: proto.md, `NBD_CMD_READ` structured replies: "each chunk MUST describe at
    /// least one byte"; `NBD_REPLY_TYPE_OFFSET_HOLE`: "hole size (unsigned, MUST be nonzero)".
    /// Empty content chunks are never written; a final one becomes `NBD_REPLY_TYPE_NONE`.
    #[test]
    fn empty_content_chunks_become_nothing_or_done() {
        let mut out = Vec::new();
        encode_read_data_chunk_header(&mut out, 9, 0, 0, false);
        encode_hole_chunk(&mut out, 9, 0, 0, false);
        assert!(out.is_empty());
        let mut expected = Vec::new();
        encode_structured_done(&mut expected, 9);
        encode_read_data_chunk_header(&mut out, 9, 0, 0, true);
        assert_eq!(out, expected);
        out.clear();
        encode_hole_chunk(&mut out, 9, 0, 0, true);
        assert_eq!(out, expected);
    }

    /// Reference: proto.md, `NBD_CMD_READ`: "a request for more than 2^32 - 8 bytes containing
    /// data ... MUST be split"; a limit above that is clamped so every accepted read fits one
    /// chunk.
    #[test]
    fn read_limit_is_clamped_to_one_data_chunk() {
        let unlimited = RequestLimits {
            request_max_bytes: u32::MAX,
        };
        let read = |length| {
            check_request(
                &request(Command::Read, 0, 0, length),
                u64::MAX,
                ALL_FLAGS,
                true,
                &unlimited,
            )
        };
        assert_eq!(read(READ_DATA_CHUNK_DATA_MAX_BYTES), Ok(()));
        assert_eq!(
            read(READ_DATA_CHUNK_DATA_MAX_BYTES + 1),
            Err(Errno::Overflow)
        );
    }

    /// Reference: proto.md, `NBD_REPLY_TYPE_OFFSET_HOLE`: "length MUST be exactly 12": offset
    /// and hole size.
    #[test]
    fn hole_chunk_bytes() {
        let mut out = Vec::new();
        encode_hole_chunk(&mut out, 5, 8192, 65536, true);
        assert_eq!(out.len(), STRUCTURED_REPLY_HEADER_BYTES + 12);
        let (flags, reply_type, cookie, payload) = chunk(&out);
        assert_eq!(
            (flags, reply_type, cookie),
            (
                proto::NBD_REPLY_FLAG_DONE,
                proto::NBD_REPLY_TYPE_OFFSET_HOLE,
                5
            )
        );
        assert_eq!(
            payload,
            [&8192u64.to_be_bytes()[..], &65536u32.to_be_bytes()[..]].concat()
        );
    }

    /// Reference: proto.md, `NBD_REPLY_TYPE_ERROR`: error, 16-bit message length, message; the
    /// message "MUST NOT exceed the 4096 bytes string length limit".
    #[test]
    fn structured_error_bytes_and_message_limit() {
        let mut out = Vec::new();
        encode_structured_error(&mut out, 3, Errno::Io, "disk on fire");
        let (flags, reply_type, cookie, payload) = chunk(&out);
        assert_eq!(
            (flags, reply_type, cookie),
            (proto::NBD_REPLY_FLAG_DONE, proto::NBD_REPLY_TYPE_ERROR, 3)
        );
        assert_eq!(payload[..4], 5u32.to_be_bytes());
        assert_eq!(payload[4..6], 12u16.to_be_bytes());
        assert_eq!(&payload[6..], b"disk on fire");

        // 4095 ASCII bytes then a 2-byte character: cut before the character.
        let long = format!("{}é{}", "a".repeat(4095), "b".repeat(100));
        let mut out = Vec::new();
        encode_structured_error(&mut out, 3, Errno::Io, &long);
        let (_, _, _, payload) = chunk(&out);
        assert_eq!(payload[4..6], 4095u16.to_be_bytes());
        assert_eq!(payload.len(), 6 + 4095);
    }

    /// Reference: proto.md, `NBD_REPLY_TYPE_ERROR_OFFSET`: error, message length, message,
    /// 64-bit offset.
    #[test]
    fn structured_error_offset_bytes() {
        let mut out = Vec::new();
        encode_structured_error_offset(&mut out, 4, Errno::Io, "bad", 1 << 20);
        let (flags, reply_type, _, payload) = chunk(&out);
        assert_eq!((flags, reply_type), (0, proto::NBD_REPLY_TYPE_ERROR_OFFSET));
        assert_eq!(payload.len(), 14 + 3);
        assert_eq!(&payload[6..9], b"bad");
        assert_eq!(payload[9..], (1u64 << 20).to_be_bytes());
    }

    /// Reference: proto.md, `NBD_REPLY_TYPE_NONE`: "length MUST be 0" and the DONE flag "MUST
    /// always be set".
    #[test]
    fn structured_done_bytes() {
        let mut out = Vec::new();
        encode_structured_done(&mut out, 0xfeed);
        assert_eq!(out.len(), STRUCTURED_REPLY_HEADER_BYTES);
        assert_eq!(
            chunk(&out),
            (
                proto::NBD_REPLY_FLAG_DONE,
                proto::NBD_REPLY_TYPE_NONE,
                0xfeed,
                &[][..]
            )
        );
    }

    /// Reference: proto.md, `NBD_REPLY_TYPE_BLOCK_STATUS`: "length MUST be 4 + (a positive
    /// integer multiple of 8)": context id, then (length, flags) per extent.
    #[test]
    fn block_status_bytes() {
        let extents = [
            BlockStatusExtent {
                length_bytes: 4096,
                flags: 0,
            },
            BlockStatusExtent {
                length_bytes: 1 << 20,
                flags: proto::NBD_STATE_HOLE | proto::NBD_STATE_ZERO,
            },
        ];
        let mut out = Vec::new();
        encode_block_status(&mut out, 11, 1, &extents, true);
        let (flags, reply_type, cookie, payload) = chunk(&out);
        assert_eq!(
            (flags, reply_type, cookie),
            (
                proto::NBD_REPLY_FLAG_DONE,
                proto::NBD_REPLY_TYPE_BLOCK_STATUS,
                11
            )
        );
        assert_eq!(
            payload,
            [
                &1u32.to_be_bytes()[..],
                &4096u32.to_be_bytes()[..],
                &0u32.to_be_bytes()[..],
                &(1u32 << 20).to_be_bytes()[..],
                &3u32.to_be_bytes()[..],
            ]
            .concat()
        );
    }

    proptest! {
        /// `parse_request_header` never panics and either fails or decodes exactly what
        /// `encode_request_header` would produce from the result.
        #[test]
        fn parse_request_header_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            match parse_request_header(&bytes) {
                Ok(header) => {
                    let mut encoded = Vec::new();
                    encode_request_header(&mut encoded, &header);
                    prop_assert_eq!(&encoded[..], &bytes[..REQUEST_HEADER_BYTES]);
                }
                Err(TransmissionError::BadMagic(magic)) => {
                    prop_assert!(bytes.len() >= REQUEST_HEADER_BYTES);
                    prop_assert_ne!(magic, proto::NBD_REQUEST_MAGIC);
                }
                Err(TransmissionError::HeaderTooShort { length_bytes }) => {
                    prop_assert!(length_bytes < REQUEST_HEADER_BYTES);
                }
            }
        }

        /// Headers with the right magic but arbitrary fields decode and can be checked without
        /// panicking, against any export.
        #[test]
        fn check_request_never_panics(
            flags in any::<u16>(),
            code in any::<u16>(),
            offset in any::<u64>(),
            length in any::<u32>(),
            export_size_bytes in any::<u64>(),
            transmission_flags in any::<u16>(),
            structured_replies in any::<bool>(),
            request_max_bytes in any::<u32>(),
        ) {
            let mut bytes = Vec::new();
            encode_request_header(&mut bytes, &RequestHeader {
                flags, command: Command::from_code(code), cookie: 1, offset, length,
            });
            let header = parse_request_header(&bytes).unwrap();
            let limits = RequestLimits { request_max_bytes };
            let verdict = check_request(
                &header, export_size_bytes, transmission_flags, structured_replies, &limits);
            if verdict.is_ok() && header.command != Command::Disc && header.command != Command::Flush {
                prop_assert!(offset.checked_add(u64::from(length)).is_some_and(|end| end <= export_size_bytes));
            }
        }
    }
}
