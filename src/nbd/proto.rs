//! Every number the NBD protocol puts on the wire: magics, flag bits, option and reply codes,
//! information types, command codes, structured reply types and the `base:allocation` state
//! bits.
//!
//! Names are the spec's own (`doc/proto.md` of NetworkBlockDevice/nbd, section "Values" unless
//! noted) so that a reader can grep the spec for any constant used in this crate. Widths match
//! the wire: handshake flags and transmission flags are 16 bits, client flags 32 bits, option
//! numbers and option reply types 32 bits, command numbers, command flags, structured reply flags
//! and types 16 bits. This module holds data only; [`super::handshake`] and
//! [`super::transmission`] give the numbers their meaning.

// ---------------------------------------------------------------------------------------------
// Magics ("Newstyle negotiation", "Fixed newstyle negotiation", "Request message",
// "Simple reply message", "Structured reply chunk message").
// ---------------------------------------------------------------------------------------------

/// ASCII `NBDMAGIC`, the first 8 bytes the server sends (also known as `INIT_PASSWD`).
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// ASCII `IHAVEOPT`: the second 8 bytes of the greeting, and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Prefix of every option reply sent by a fixed newstyle server.
pub const NBD_OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The name the reference implementation uses for [`NBD_OPTION_REPLY_MAGIC`].
pub const NBD_REP_MAGIC: u64 = NBD_OPTION_REPLY_MAGIC;
/// Prefix of every transmission request.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of every simple reply (formerly `NBD_REPLY_MAGIC`).
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of every structured reply chunk.
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Reserved for the experimental `EXTENDED_HEADERS` extension, which this crate does not speak
/// ("Reserved Magic values").
pub const NBD_EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Reserved for the experimental `EXTENDED_HEADERS` extension ("Reserved Magic values").
pub const NBD_EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// ---------------------------------------------------------------------------------------------
// Handshake flags (server → client, 16 bits) and client flags (client → server, 32 bits).
// ---------------------------------------------------------------------------------------------

/// Handshake flag bit 0: the server speaks fixed newstyle.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag bit 1: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;

/// Client flag bit 0: the client speaks fixed newstyle.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag bit 1: the server must not send the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---------------------------------------------------------------------------------------------
// Transmission flags (16 bits, sent after option haggling).
// ---------------------------------------------------------------------------------------------

/// Bit 0: MUST always be 1.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Bit 1: the export is read-only; the server must error write commands.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// Bit 2: exposes `NBD_CMD_FLUSH`.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Bit 3: exposes `NBD_CMD_FLAG_FUA`.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// Bit 4: the export behaves like a rotational medium.
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
/// Bit 5: exposes `NBD_CMD_TRIM`.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// Bit 6: exposes `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_FLAG_NO_HOLE`.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Bit 7: exposes `NBD_CMD_FLAG_DF`; must be clear unless structured replies were negotiated.
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
/// Bit 8: flush and FUA are visible across all connections to the export.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Bit 9: experimental `RESIZE` extension (not implemented here).
pub const NBD_FLAG_SEND_RESIZE: u16 = 1 << 9;
/// Bit 10: the server understands `NBD_CMD_CACHE`.
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
/// Bit 11: exposes `NBD_CMD_FLAG_FAST_ZERO`; must be clear unless `NBD_FLAG_SEND_WRITE_ZEROES`.
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// Bit 12: experimental `EXTENDED_HEADERS` extension (not implemented here).
pub const NBD_FLAG_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

// ---------------------------------------------------------------------------------------------
// Option types ("Option types").
// ---------------------------------------------------------------------------------------------

/// Choose an export and enter transmission; cannot return an error.
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
/// Soft disconnect during option haggling.
pub const NBD_OPT_ABORT: u32 = 2;
/// List the exports.
pub const NBD_OPT_LIST: u32 = 3;
/// Withdrawn experimental option; not in use.
pub const NBD_OPT_PEEK_EXPORT: u32 = 4;
/// Upgrade the connection to TLS.
pub const NBD_OPT_STARTTLS: u32 = 5;
/// Describe one export without entering transmission.
pub const NBD_OPT_INFO: u32 = 6;
/// Describe one export and enter transmission on success.
pub const NBD_OPT_GO: u32 = 7;
/// Use structured replies during transmission.
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
/// List the metadata contexts matching some queries.
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
/// Select the metadata contexts `NBD_CMD_BLOCK_STATUS` reports.
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
/// Experimental `EXTENDED_HEADERS` extension (not implemented here).
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

// ---------------------------------------------------------------------------------------------
// Option reply types ("Option reply types"). Errors have bit 31 set.
// ---------------------------------------------------------------------------------------------

/// The option succeeded, or a list of replies has ended.
pub const NBD_REP_ACK: u32 = 1;
/// One export in reply to `NBD_OPT_LIST`.
pub const NBD_REP_SERVER: u32 = 2;
/// One information item in reply to `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub const NBD_REP_INFO: u32 = 3;
/// One metadata context in reply to `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Bit 31 marks every option error reply.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
/// The option is unknown to this server.
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR + 1;
/// The option is known but forbidden by policy.
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR + 2;
/// The option is syntactically or semantically invalid.
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR + 3;
/// The option is not supported on this platform.
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR + 4;
/// TLS must be initiated first.
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR + 5;
/// The requested export is not available.
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR + 6;
/// The server is shutting down.
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR + 7;
/// The client must request `NBD_INFO_BLOCK_SIZE` first.
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR + 8;
/// The request or the reply is too large to process.
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR + 9;
/// Experimental `EXTENDED_HEADERS` extension (never sent here).
pub const NBD_REP_ERR_EXT_HEADER_REQD: u32 = NBD_REP_FLAG_ERROR + 10;

// ---------------------------------------------------------------------------------------------
// Information types for `NBD_REP_INFO` (16 bits).
// ---------------------------------------------------------------------------------------------

/// Export size and transmission flags; mandatory before a successful `NBD_REP_ACK`.
pub const NBD_INFO_EXPORT: u16 = 0;
/// The server's canonical export name.
pub const NBD_INFO_NAME: u16 = 1;
/// A human-readable description of the export.
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// Minimum block, preferred block and maximum payload sizes.
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------------------------
// Command types ("Request types", 16 bits).
// ---------------------------------------------------------------------------------------------

/// Read `length` bytes at `offset`.
pub const NBD_CMD_READ: u16 = 0;
/// Write the `length` bytes that follow the header at `offset`.
pub const NBD_CMD_WRITE: u16 = 1;
/// Soft disconnect; no reply.
pub const NBD_CMD_DISC: u16 = 2;
/// Persist every write already replied to.
pub const NBD_CMD_FLUSH: u16 = 3;
/// The range is no longer needed.
pub const NBD_CMD_TRIM: u16 = 4;
/// The client plans to access the range.
pub const NBD_CMD_CACHE: u16 = 5;
/// Zero the range without a payload.
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
/// Report metadata (e.g. allocation) for the range.
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;
/// Experimental `RESIZE` extension (not implemented here).
pub const NBD_CMD_RESIZE: u16 = 8;

// ---------------------------------------------------------------------------------------------
// Command flags ("Command flags", 16 bits).
// ---------------------------------------------------------------------------------------------

/// Bit 0: reply only once the command's writes are persistent.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
/// Bit 1: `NBD_CMD_WRITE_ZEROES` must not create a hole.
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Bit 2: `NBD_CMD_READ` must be answered with at most one content chunk.
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
/// Bit 3: `NBD_CMD_BLOCK_STATUS` wants exactly one extent per context.
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Bit 4: `NBD_CMD_WRITE_ZEROES` must fail with `NBD_ENOTSUP` unless it is fast.
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Bit 5: experimental `EXTENDED_HEADERS` extension (never valid here).
pub const NBD_CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// ---------------------------------------------------------------------------------------------
// Structured replies ("Structured reply flags", "Structured reply types").
// ---------------------------------------------------------------------------------------------

/// Structured reply flag bit 0: this is the final chunk of the reply.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;

/// No payload; only as the final chunk.
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
/// 64-bit offset followed by data.
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// 64-bit offset and 32-bit size of a range that reads as zeroes.
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// 32-bit metadata context id followed by (length, flags) extent descriptors.
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Experimental `EXTENDED_HEADERS` extension (never sent here).
pub const NBD_REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Bit 15 marks every error chunk type.
pub const NBD_REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
/// Error code, message length and message.
pub const NBD_REPLY_TYPE_ERROR: u16 = NBD_REPLY_TYPE_FLAG_ERROR + 1;
/// Error code, message length, message and the 64-bit offset where the error happened.
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = NBD_REPLY_TYPE_FLAG_ERROR + 2;

// ---------------------------------------------------------------------------------------------
// Error values ("Error values"); [`super::transmission::Errno`] is the typed form.
// ---------------------------------------------------------------------------------------------

/// Operation not permitted.
pub const NBD_EPERM: u32 = 1;
/// Input/output error.
pub const NBD_EIO: u32 = 5;
/// Cannot allocate memory.
pub const NBD_ENOMEM: u32 = 12;
/// Invalid argument.
pub const NBD_EINVAL: u32 = 22;
/// No space left on device.
pub const NBD_ENOSPC: u32 = 28;
/// Value too large.
pub const NBD_EOVERFLOW: u32 = 75;
/// Operation not supported.
pub const NBD_ENOTSUP: u32 = 95;
/// Server is in the process of being shut down.
pub const NBD_ESHUTDOWN: u32 = 108;

// ---------------------------------------------------------------------------------------------
// Metadata contexts ("Metadata querying", "The `base:` metadata namespace").
// ---------------------------------------------------------------------------------------------

/// The only metadata context the spec defines.
pub const BASE_ALLOCATION_CONTEXT_NAME: &str = "base:allocation";
/// The `base:` namespace prefix, which is also the wildcard query during
/// `NBD_OPT_LIST_META_CONTEXT`.
pub const BASE_NAMESPACE_PREFIX: &str = "base:";
/// `base:allocation` state bit 0: the extent is a hole (not allocated).
pub const NBD_STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` state bit 1: the extent reads as zeroes.
pub const NBD_STATE_ZERO: u32 = 1 << 1;

// ---------------------------------------------------------------------------------------------
// Sizes fixed by the spec.
// ---------------------------------------------------------------------------------------------

/// Length of the reserved zero padding after the `NBD_OPT_EXPORT_NAME` reply
/// ("Newstyle negotiation").
pub const EXPORT_NAME_REPLY_ZEROES_BYTES: usize = 124;
/// Longest string (export name, error message, query) the spec allows ("Conventions").
pub const STRING_LENGTH_MAX_BYTES: usize = 4096;
/// Largest read or write payload every server should accept without calling it a denial of
/// service, and the default maximum payload ("Size constraints").
pub const PAYLOAD_DEFAULT_MAX_BYTES: u32 = 1 << 25;
