//! The client side of NBD as sans-I/O pieces, for the proxy's upstream connections: the fixed
//! newstyle handshake ending in `NBD_OPT_GO` ([`ClientHandshake`], which asks for structured
//! replies and `base:allocation` first), the request encoding (the shared
//! [`super::transmission::encode_request_header`]), and reply decoding: simple replies and
//! structured reply chunks ([`parse_reply_header`]), the chunks of one reply put together by
//! [`ReplyAssembly`].
//!
//! The caller owns the socket: it feeds every byte it reads into [`ClientHandshake::advance`]
//! and writes whatever `advance` appended to its output buffer, until `advance` returns
//! [`ClientHandshakeStep::Done`] with the export's [`ExportInfo`]. Option replies are bounded by
//! [`OPTION_REPLY_MAX_BYTES`] and chunks other than read data by [`CHUNK_PAYLOAD_MAX_BYTES`], so
//! a hostile server cannot make the client buffer more; read data only ever lands inside the
//! requested range.
//!
//! Section names in comments refer to `doc/proto.md` of NetworkBlockDevice/nbd.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::proto;
use super::transmission::{BlockStatusExtent, Command};

/// Bytes of the server's greeting: `NBDMAGIC`, `IHAVEOPT`, 16-bit handshake flags
/// ("Newstyle negotiation").
pub const GREETING_BYTES: usize = 18;
/// Bytes of an option reply header: magic, option, reply type, length ("Fixed newstyle
/// negotiation").
pub const OPTION_REPLY_HEADER_BYTES: usize = 20;
/// Longest option reply payload this client accepts (an `NBD_REP_INFO` is at most a few KiB:
/// names and descriptions are limited to 4096 bytes by "Conventions").
pub const OPTION_REPLY_MAX_BYTES: u32 = 16 * 1024;
/// Bytes of a simple reply header ("Simple reply message").
pub const SIMPLE_REPLY_BYTES: usize = 16;

/// What the server told about the export during `NBD_OPT_GO` ("Option types", `NBD_REP_INFO`),
/// and what the options before it negotiated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub size_bytes: u64,
    pub transmission_flags: u16,
    /// `NBD_INFO_BLOCK_SIZE`, if the server sent it: (minimum, preferred, maximum payload).
    pub block_sizes_bytes: Option<(u32, u32, u32)>,
    /// The server acknowledged `NBD_OPT_STRUCTURED_REPLY`: replies may be structured chunks.
    pub structured_replies: bool,
    /// The id the server gave `base:allocation` in reply to `NBD_OPT_SET_META_CONTEXT`, if it
    /// selected it; `NBD_CMD_BLOCK_STATUS` may be sent only then.
    pub base_allocation_context_id: Option<u32>,
}

/// What to do after [`ClientHandshake::advance`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientHandshakeStep {
    /// Send `out`, read more bytes, call `advance` again.
    NeedMore,
    /// Send `out`; the transmission phase has begun. Bytes left in `input` belong to it.
    Done(ExportInfo),
    /// The server acknowledged `NBD_OPT_STARTTLS`: run the TLS handshake as the client, call
    /// [`ClientHandshake::tls_started`], and go on with the bytes read through TLS (`input`
    /// is empty: the server sends nothing else in plaintext).
    StartTls,
}

/// Why a client handshake failed; the connection is unusable afterwards.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum ClientHandshakeError {
    #[error("server greeting magic {magic:#018x}/{option_magic:#018x} is not NBDMAGIC/IHAVEOPT")]
    GreetingMagicBad { magic: u64, option_magic: u64 },
    #[error("server does not speak fixed newstyle (handshake flags {handshake_flags:#06x})")]
    NotFixedNewstyle { handshake_flags: u16 },
    #[error("option reply magic {magic:#018x} is wrong")]
    OptionReplyMagicBad { magic: u64 },
    #[error("option reply for option {option}, but {expected} was sent")]
    OptionReplyUnexpected { option: u32, expected: u32 },
    #[error("option reply of {length_bytes} bytes exceeds {OPTION_REPLY_MAX_BYTES}")]
    OptionReplyTooLong { length_bytes: u32 },
    #[error("NBD_REP_INFO reply is malformed")]
    InfoMalformed,
    #[error("NBD_REP_META_CONTEXT reply is malformed")]
    MetaContextMalformed,
    /// The server refused `NBD_OPT_GO` with an error reply; `message` is the server's text.
    #[error("server refused export {export_name:?} (reply type {reply_type:#010x}): {message}")]
    Refused {
        export_name: String,
        reply_type: u32,
        message: String,
    },
    #[error("server acknowledged NBD_OPT_GO without NBD_INFO_EXPORT")]
    ExportInfoMissing,
    #[error("export name of {length_bytes} bytes exceeds the 4096-byte string limit")]
    ExportNameTooLong { length_bytes: usize },
    #[error("handshake already finished")]
    AlreadyFinished,
    /// TLS was required and the server answered `NBD_OPT_STARTTLS` with an error: never go on
    /// in plaintext (a man in the middle could have sent that error).
    #[error("the server refused NBD_OPT_STARTTLS (reply type {reply_type:#010x}): {message}")]
    TlsRefused { reply_type: u32, message: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClientState {
    Greeting,
    /// Waiting for the reply to this option (one option at a time, in the order
    /// `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_SET_META_CONTEXT`, `NBD_OPT_GO`).
    OptionReply(u32),
    Finished,
}

/// The client side of one connection's handshake: fixed newstyle; if
/// [`ClientHandshake::asking_structured_replies`], structured replies and `base:allocation`
/// asked for (a server may refuse either, then the connection uses simple replies or goes
/// without block status); `NBD_OPT_GO` for one export with `NBD_INFO_BLOCK_SIZE` requested.
#[derive(Debug)]
pub struct ClientHandshake {
    export_name: String,
    asks_structured_replies: bool,
    requires_tls: bool,
    state: ClientState,
    size_and_flags: Option<(u64, u16)>,
    block_sizes_bytes: Option<(u32, u32, u32)>,
    structured_replies: bool,
    base_allocation_context_id: Option<u32>,
}

impl ClientHandshake {
    pub fn new(export_name: &str) -> Result<Self, ClientHandshakeError> {
        if export_name.len() > proto::STRING_LENGTH_MAX_BYTES {
            return Err(ClientHandshakeError::ExportNameTooLong {
                length_bytes: export_name.len(),
            });
        }
        Ok(ClientHandshake {
            export_name: export_name.to_owned(),
            asks_structured_replies: false,
            requires_tls: false,
            state: ClientState::Greeting,
            size_and_flags: None,
            block_sizes_bytes: None,
            structured_replies: false,
            base_allocation_context_id: None,
        })
    }

    /// Asks for structured replies and the `base:allocation` context before `NBD_OPT_GO`.
    pub fn asking_structured_replies(mut self) -> Self {
        self.asks_structured_replies = true;
        self
    }

    /// Sends `NBD_OPT_STARTTLS` as the first option and refuses to go on without TLS ("a
    /// client which only wishes to use TLS SHOULD terminate the session if the
    /// NBD_OPT_STARTTLS replies with an error").
    pub fn requiring_tls(mut self) -> Self {
        self.requires_tls = true;
        self
    }

    /// The caller completed the TLS handshake after [`ClientHandshakeStep::StartTls`]: the
    /// options go on, through TLS.
    pub fn tls_started(&mut self, out: &mut Vec<u8>) {
        self.send_first_options(out);
    }

    fn send_first_options(&mut self, out: &mut Vec<u8>) {
        if self.asks_structured_replies {
            // NBD_OPT_STRUCTURED_REPLY has no data ("Option types").
            write_option(out, proto::NBD_OPT_STRUCTURED_REPLY, &[]);
            self.state = ClientState::OptionReply(proto::NBD_OPT_STRUCTURED_REPLY);
        } else {
            self.send_go(out);
        }
    }

    /// Consumes what it can of `input`, appends bytes to send to `out`. Any `Err` is fatal.
    pub fn advance(
        &mut self,
        input: &mut BytesMut,
        out: &mut Vec<u8>,
    ) -> Result<ClientHandshakeStep, ClientHandshakeError> {
        let result = self.advance_inner(input, out);
        if !matches!(
            result,
            Ok(ClientHandshakeStep::NeedMore | ClientHandshakeStep::StartTls)
        ) {
            self.state = ClientState::Finished;
        }
        result
    }

    fn advance_inner(
        &mut self,
        input: &mut BytesMut,
        out: &mut Vec<u8>,
    ) -> Result<ClientHandshakeStep, ClientHandshakeError> {
        loop {
            match self.state {
                ClientState::Greeting => {
                    if input.len() < GREETING_BYTES {
                        return Ok(ClientHandshakeStep::NeedMore);
                    }
                    let magic = input.get_u64();
                    let option_magic = input.get_u64();
                    let handshake_flags = input.get_u16();
                    if magic != proto::NBDMAGIC || option_magic != proto::IHAVEOPT {
                        return Err(ClientHandshakeError::GreetingMagicBad {
                            magic,
                            option_magic,
                        });
                    }
                    // NBD_OPT_GO needs fixed newstyle ("Fixed newstyle negotiation").
                    if handshake_flags & proto::NBD_FLAG_FIXED_NEWSTYLE == 0 {
                        return Err(ClientHandshakeError::NotFixedNewstyle { handshake_flags });
                    }
                    // "Client flags": only flags the server advertised may be set.
                    let mut client_flags = proto::NBD_FLAG_C_FIXED_NEWSTYLE;
                    if handshake_flags & proto::NBD_FLAG_NO_ZEROES != 0 {
                        client_flags |= proto::NBD_FLAG_C_NO_ZEROES;
                    }
                    out.put_u32(client_flags);
                    if self.requires_tls {
                        write_option(out, proto::NBD_OPT_STARTTLS, &[]);
                        self.state = ClientState::OptionReply(proto::NBD_OPT_STARTTLS);
                    } else {
                        self.send_first_options(out);
                    }
                }
                ClientState::OptionReply(option) => {
                    if input.len() < OPTION_REPLY_HEADER_BYTES {
                        return Ok(ClientHandshakeStep::NeedMore);
                    }
                    let header = &input[..OPTION_REPLY_HEADER_BYTES];
                    let magic = u64::from_be_bytes(array8(&header[0..8]));
                    let replied_option = u32::from_be_bytes(array4(&header[8..12]));
                    let reply_type = u32::from_be_bytes(array4(&header[12..16]));
                    let length_bytes = u32::from_be_bytes(array4(&header[16..20]));
                    if magic != proto::NBD_OPTION_REPLY_MAGIC {
                        return Err(ClientHandshakeError::OptionReplyMagicBad { magic });
                    }
                    if replied_option != option {
                        return Err(ClientHandshakeError::OptionReplyUnexpected {
                            option: replied_option,
                            expected: option,
                        });
                    }
                    if length_bytes > OPTION_REPLY_MAX_BYTES {
                        return Err(ClientHandshakeError::OptionReplyTooLong { length_bytes });
                    }
                    let total_bytes = OPTION_REPLY_HEADER_BYTES + length_bytes as usize;
                    if input.len() < total_bytes {
                        return Ok(ClientHandshakeStep::NeedMore);
                    }
                    input.advance(OPTION_REPLY_HEADER_BYTES);
                    let payload = input.split_to(length_bytes as usize);
                    let step = match option {
                        proto::NBD_OPT_STARTTLS => {
                            if reply_type != proto::NBD_REP_ACK {
                                return Err(ClientHandshakeError::TlsRefused {
                                    reply_type,
                                    message: String::from_utf8_lossy(&payload).into_owned(),
                                });
                            }
                            return Ok(ClientHandshakeStep::StartTls);
                        }
                        proto::NBD_OPT_STRUCTURED_REPLY => {
                            self.handle_structured_reply_reply(reply_type, out)
                        }
                        proto::NBD_OPT_SET_META_CONTEXT => {
                            self.handle_meta_context_reply(reply_type, &payload, out)?
                        }
                        _ => self.handle_go_reply(reply_type, &payload)?,
                    };
                    if let Some(step) = step {
                        return Ok(step);
                    }
                }
                ClientState::Finished => return Err(ClientHandshakeError::AlreadyFinished),
            }
        }
    }

    /// `NBD_REP_ACK` turns structured replies on and asks for `base:allocation`; any other
    /// reply (an error such as `NBD_REP_ERR_UNSUP`) leaves simple replies and goes on to GO.
    fn handle_structured_reply_reply(
        &mut self,
        reply_type: u32,
        out: &mut Vec<u8>,
    ) -> Option<ClientHandshakeStep> {
        if reply_type == proto::NBD_REP_ACK {
            self.structured_replies = true;
            // NBD_OPT_SET_META_CONTEXT data: 32-bit export name length, name, 32-bit number
            // of queries, then each query as a 32-bit length and the string. The name must be
            // the one GO uses ("the final time [it] was sent, it referred to the same export
            // name used to enter transmission phase").
            let name = self.export_name.as_bytes();
            let query = proto::BASE_ALLOCATION_CONTEXT_NAME.as_bytes();
            let mut data = Vec::with_capacity(4 + name.len() + 8 + query.len());
            // The name is at most 4096 bytes (checked in `new`).
            data.put_u32(name.len() as u32);
            data.put_slice(name);
            data.put_u32(1);
            data.put_u32(query.len() as u32);
            data.put_slice(query);
            write_option(out, proto::NBD_OPT_SET_META_CONTEXT, &data);
            self.state = ClientState::OptionReply(proto::NBD_OPT_SET_META_CONTEXT);
        } else {
            self.send_go(out);
        }
        None
    }

    /// Zero or more `NBD_REP_META_CONTEXT` replies end with `NBD_REP_ACK`; an error reply ends
    /// the option too, with no context selected.
    fn handle_meta_context_reply(
        &mut self,
        reply_type: u32,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Option<ClientHandshakeStep>, ClientHandshakeError> {
        if reply_type == proto::NBD_REP_META_CONTEXT {
            // 32-bit context id, then the context's name.
            let (Some(id), Some(name)) = (payload.get(..4), payload.get(4..)) else {
                return Err(ClientHandshakeError::MetaContextMalformed);
            };
            if name == proto::BASE_ALLOCATION_CONTEXT_NAME.as_bytes() {
                self.base_allocation_context_id = Some(u32::from_be_bytes(array4(id)));
            }
            return Ok(None);
        }
        if reply_type != proto::NBD_REP_ACK && reply_type & proto::NBD_REP_FLAG_ERROR == 0 {
            // An unknown non-error reply does not end the option.
            return Ok(None);
        }
        if reply_type != proto::NBD_REP_ACK {
            self.base_allocation_context_id = None;
        }
        self.send_go(out);
        Ok(None)
    }

    fn send_go(&mut self, out: &mut Vec<u8>) {
        // NBD_OPT_GO data: 32-bit name length, name, 16-bit number of information requests,
        // then the requests ("Option types").
        let name = self.export_name.as_bytes();
        let mut data = Vec::with_capacity(4 + name.len() + 4);
        // The name is at most 4096 bytes (checked in `new`).
        data.put_u32(name.len() as u32);
        data.put_slice(name);
        data.put_u16(1);
        data.put_u16(proto::NBD_INFO_BLOCK_SIZE);
        write_option(out, proto::NBD_OPT_GO, &data);
        self.state = ClientState::OptionReply(proto::NBD_OPT_GO);
    }

    fn handle_go_reply(
        &mut self,
        reply_type: u32,
        payload: &[u8],
    ) -> Result<Option<ClientHandshakeStep>, ClientHandshakeError> {
        match reply_type {
            proto::NBD_REP_INFO => {
                let Some(info_type) = payload.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]))
                else {
                    return Err(ClientHandshakeError::InfoMalformed);
                };
                let data = &payload[2..];
                match info_type {
                    // NBD_INFO_EXPORT: 64-bit size, 16-bit transmission flags.
                    proto::NBD_INFO_EXPORT => {
                        if data.len() != 10 {
                            return Err(ClientHandshakeError::InfoMalformed);
                        }
                        let size_bytes = u64::from_be_bytes(array8(&data[0..8]));
                        let flags = u16::from_be_bytes([data[8], data[9]]);
                        self.size_and_flags = Some((size_bytes, flags));
                    }
                    // NBD_INFO_BLOCK_SIZE: minimum, preferred, maximum payload (32 bits each).
                    proto::NBD_INFO_BLOCK_SIZE => {
                        if data.len() != 12 {
                            return Err(ClientHandshakeError::InfoMalformed);
                        }
                        self.block_sizes_bytes = Some((
                            u32::from_be_bytes(array4(&data[0..4])),
                            u32::from_be_bytes(array4(&data[4..8])),
                            u32::from_be_bytes(array4(&data[8..12])),
                        ));
                    }
                    // "The client MUST ignore information replies it does not understand."
                    _ => {}
                }
                Ok(None)
            }
            proto::NBD_REP_ACK => {
                let Some((size_bytes, transmission_flags)) = self.size_and_flags else {
                    return Err(ClientHandshakeError::ExportInfoMissing);
                };
                Ok(Some(ClientHandshakeStep::Done(ExportInfo {
                    size_bytes,
                    transmission_flags,
                    block_sizes_bytes: self.block_sizes_bytes,
                    structured_replies: self.structured_replies,
                    base_allocation_context_id: self.base_allocation_context_id,
                })))
            }
            reply_type if reply_type & proto::NBD_REP_FLAG_ERROR != 0 => {
                // "All error replies MAY have some data set, in which case that data is an
                // error message string".
                Err(ClientHandshakeError::Refused {
                    export_name: self.export_name.clone(),
                    reply_type,
                    message: String::from_utf8_lossy(payload).into_owned(),
                })
            }
            // Unknown non-error replies are skipped ("the client SHOULD ignore" unknown replies
            // it did not ask for is the conservative reading).
            _ => Ok(None),
        }
    }
}

/// Appends an option request: `IHAVEOPT`, the option, the data's length, the data.
fn write_option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    out.put_u64(proto::IHAVEOPT);
    out.put_u32(option);
    // Option data here is at most a name and a short query (a few KiB).
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

/// A decoded simple reply header ("Simple reply message"). For a successful `NBD_CMD_READ`,
/// exactly the requested length of data follows; after an error, nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimpleReply {
    pub cookie: u64,
    /// 0 on success, otherwise an `NBD_E*` value ("Error values").
    pub error: u32,
}

/// A decoded structured reply chunk header ("Structured reply chunk message"); `length_bytes`
/// of payload follow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub chunk_type: u16,
    pub cookie: u64,
    pub length_bytes: u32,
}

/// The header of one reply, told apart by its magic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple(SimpleReply),
    Chunk(ChunkHeader),
}

#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum ReplyError {
    #[error("reply magic {magic:#010x} is neither the simple nor the structured reply magic")]
    MagicBad { magic: u32 },
    #[error("reply header needs {needed} bytes, got {length_bytes}")]
    TooShort { needed: usize, length_bytes: usize },
    #[error("structured reply chunk type {chunk_type} with {length_bytes} bytes is malformed")]
    ChunkMalformed { chunk_type: u16, length_bytes: u32 },
    #[error("chunk of {length_bytes} bytes exceeds the {CHUNK_PAYLOAD_MAX_BYTES}-byte bound")]
    ChunkTooLong { length_bytes: u32 },
    #[error("a {chunk_type} chunk for a request that cannot carry it")]
    ChunkUnexpected { chunk_type: u16 },
    #[error("content chunk at {offset} of {length_bytes} bytes lies outside the request")]
    ChunkOutOfRange { offset: u64, length_bytes: u64 },
    #[error("block status for context {context_id}, which was not selected")]
    ContextUnknown { context_id: u32 },
    #[error("successful reply covers {covered_bytes} of {length_bytes} requested bytes")]
    Incomplete {
        covered_bytes: u64,
        length_bytes: u64,
    },
}

/// Bytes of the magic that starts every reply; the rest of the header follows it
/// ([`SIMPLE_REPLY_BYTES`] or [`CHUNK_HEADER_BYTES`] in all).
pub const REPLY_MAGIC_BYTES: usize = 4;
/// Bytes of a structured reply chunk header.
pub const CHUNK_HEADER_BYTES: usize = 20;
/// Longest payload accepted in a chunk that is not read data (block status, errors, unknown
/// types): 131071 extents, far more than a server sends for one request here.
pub const CHUNK_PAYLOAD_MAX_BYTES: u32 = 1 << 20;

/// The header length that follows from `magic` (the first [`REPLY_MAGIC_BYTES`] of a reply).
pub fn reply_header_bytes(magic: [u8; 4]) -> Result<usize, ReplyError> {
    match u32::from_be_bytes(magic) {
        proto::NBD_SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_BYTES),
        proto::NBD_STRUCTURED_REPLY_MAGIC => Ok(CHUNK_HEADER_BYTES),
        magic => Err(ReplyError::MagicBad { magic }),
    }
}

/// Decodes a whole reply header, simple or structured.
pub fn parse_reply_header(buf: &[u8]) -> Result<ReplyHeader, ReplyError> {
    let magic = buf.get(..REPLY_MAGIC_BYTES).ok_or(ReplyError::TooShort {
        needed: REPLY_MAGIC_BYTES,
        length_bytes: buf.len(),
    })?;
    let needed = reply_header_bytes(array4(magic))?;
    let Some(header) = buf.get(..needed) else {
        return Err(ReplyError::TooShort {
            needed,
            length_bytes: buf.len(),
        });
    };
    if needed == SIMPLE_REPLY_BYTES {
        return Ok(ReplyHeader::Simple(SimpleReply {
            error: u32::from_be_bytes(array4(&header[4..8])),
            cookie: u64::from_be_bytes(array8(&header[8..16])),
        }));
    }
    Ok(ReplyHeader::Chunk(ChunkHeader {
        flags: u16::from_be_bytes([header[4], header[5]]),
        chunk_type: u16::from_be_bytes([header[6], header[7]]),
        cookie: u64::from_be_bytes(array8(&header[8..16])),
        length_bytes: u32::from_be_bytes(array4(&header[16..20])),
    }))
}

/// Decodes the first [`SIMPLE_REPLY_BYTES`] of `buf`, which must be a simple reply.
pub fn parse_simple_reply(buf: &[u8]) -> Result<SimpleReply, ReplyError> {
    match parse_reply_header(buf)? {
        ReplyHeader::Simple(reply) => Ok(reply),
        ReplyHeader::Chunk(_) => Err(ReplyError::MagicBad {
            magic: proto::NBD_STRUCTURED_REPLY_MAGIC,
        }),
    }
}

/// What a successful request returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplyAnswer {
    Done,
    /// `NBD_CMD_READ`: exactly the requested length.
    Data(Bytes),
    /// `NBD_CMD_BLOCK_STATUS`: `base:allocation` extents from the request's offset, covering
    /// at most the requested length.
    Extents(Vec<BlockStatusExtent>),
}

/// Where a chunk's payload goes once its header is parsed ([`ReplyAssembly::chunk`]).
#[derive(Debug, PartialEq, Eq)]
pub enum ChunkPayload {
    /// Read the 8-byte offset of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk, pass it to
    /// [`ReplyAssembly::data_slot`], and read the data into the slot it returns.
    DataOffset,
    /// Read `length_bytes` into a buffer and pass it to [`ReplyAssembly::payload`].
    Whole { length_bytes: u32 },
}

/// The chunks of one structured reply, put together into one answer ("Structured reply
/// chunk message"). Read data chunks may come in any order and must not overlap, so a
/// successful read must cover exactly the requested length; holes read as zeroes.
#[derive(Debug)]
pub struct ReplyAssembly {
    command: Command,
    offset: u64,
    length_bytes: u32,
    data: Option<BytesMut>,
    covered_bytes: u64,
    extents: Option<Vec<BlockStatusExtent>>,
    /// The first error chunk's errno; a reply with one failed whatever else it carried.
    error: u32,
    /// The chunk whose payload [`ReplyAssembly::payload`] expects.
    current: Option<ChunkHeader>,
}

impl ReplyAssembly {
    /// For the request `command` of `length_bytes` at `offset`.
    pub fn new(command: Command, offset: u64, length_bytes: u32) -> Self {
        ReplyAssembly {
            command,
            offset,
            length_bytes,
            data: None,
            covered_bytes: 0,
            extents: None,
            error: 0,
            current: None,
        }
    }

    /// Checks a chunk header of this reply and says how to read its payload.
    pub fn chunk(&mut self, header: ChunkHeader) -> Result<ChunkPayload, ReplyError> {
        let length_bytes = header.length_bytes;
        let malformed = ReplyError::ChunkMalformed {
            chunk_type: header.chunk_type,
            length_bytes,
        };
        self.current = Some(header);
        match header.chunk_type {
            proto::NBD_REPLY_TYPE_NONE => {
                // "This chunk type MUST always be used with the NBD_REPLY_FLAG_DONE bit set",
                // and it has no payload.
                if length_bytes != 0 || header.flags & proto::NBD_REPLY_FLAG_DONE == 0 {
                    return Err(malformed);
                }
                Ok(ChunkPayload::Whole { length_bytes: 0 })
            }
            proto::NBD_REPLY_TYPE_OFFSET_DATA => {
                if self.command != Command::Read {
                    return Err(ReplyError::ChunkUnexpected {
                        chunk_type: header.chunk_type,
                    });
                }
                // An offset and at least one byte ("MUST describe at least one byte").
                if length_bytes <= 8 {
                    return Err(malformed);
                }
                Ok(ChunkPayload::DataOffset)
            }
            proto::NBD_REPLY_TYPE_OFFSET_HOLE | proto::NBD_REPLY_TYPE_BLOCK_STATUS => {
                let expected_command = if header.chunk_type == proto::NBD_REPLY_TYPE_OFFSET_HOLE {
                    Command::Read
                } else {
                    Command::BlockStatus
                };
                if self.command != expected_command {
                    return Err(ReplyError::ChunkUnexpected {
                        chunk_type: header.chunk_type,
                    });
                }
                self.bounded(length_bytes)
            }
            // Error chunks, and unknown types (skipped unless they are errors: "a client MUST
            // NOT ignore an unknown error type").
            _ => self.bounded(length_bytes),
        }
    }

    fn bounded(&self, length_bytes: u32) -> Result<ChunkPayload, ReplyError> {
        if length_bytes > CHUNK_PAYLOAD_MAX_BYTES {
            return Err(ReplyError::ChunkTooLong { length_bytes });
        }
        Ok(ChunkPayload::Whole { length_bytes })
    }

    /// The part of the read buffer an `NBD_REPLY_TYPE_OFFSET_DATA` chunk at `chunk_offset`
    /// fills (its data length follows from the chunk header).
    pub fn data_slot(&mut self, chunk_offset: u64) -> Result<&mut [u8], ReplyError> {
        let Some(header) = self.current else {
            return Err(ReplyError::ChunkUnexpected {
                chunk_type: proto::NBD_REPLY_TYPE_OFFSET_DATA,
            });
        };
        let data_bytes = u64::from(header.length_bytes - 8);
        let start = self.claim(chunk_offset, data_bytes)?;
        let length = self.length_bytes as usize;
        let data = self.data.get_or_insert_with(|| BytesMut::zeroed(length));
        // `claim` checked the range lies inside the request.
        Ok(&mut data[start..start + data_bytes as usize])
    }

    /// Marks `[chunk_offset, +length)` of the read as answered; its start in the buffer.
    fn claim(&mut self, chunk_offset: u64, length_bytes: u64) -> Result<usize, ReplyError> {
        let out_of_range = ReplyError::ChunkOutOfRange {
            offset: chunk_offset,
            length_bytes,
        };
        let start = chunk_offset
            .checked_sub(self.offset)
            .ok_or(out_of_range.clone())?;
        if !start
            .checked_add(length_bytes)
            .is_some_and(|end| end <= u64::from(self.length_bytes))
        {
            return Err(out_of_range);
        }
        self.covered_bytes += length_bytes;
        if self.covered_bytes > u64::from(self.length_bytes) {
            // Chunks "MUST NOT overlap": more bytes than requested means some did.
            return Err(out_of_range);
        }
        Ok(start as usize)
    }

    /// The payload of the current chunk (of the length [`ReplyAssembly::chunk`] asked for).
    /// `base_allocation_context_id` is the id the handshake selected.
    pub fn payload(
        &mut self,
        payload: &[u8],
        base_allocation_context_id: Option<u32>,
    ) -> Result<(), ReplyError> {
        let Some(header) = self.current else {
            return Ok(());
        };
        let malformed = ReplyError::ChunkMalformed {
            chunk_type: header.chunk_type,
            length_bytes: header.length_bytes,
        };
        match header.chunk_type {
            proto::NBD_REPLY_TYPE_OFFSET_HOLE => {
                // 64-bit offset, 32-bit nonzero hole size; the buffer is zeroes already.
                if payload.len() != 12 {
                    return Err(malformed);
                }
                let offset = u64::from_be_bytes(array8(&payload[0..8]));
                let hole_bytes = u32::from_be_bytes(array4(&payload[8..12]));
                if hole_bytes == 0 {
                    return Err(malformed);
                }
                self.claim(offset, u64::from(hole_bytes))?;
            }
            proto::NBD_REPLY_TYPE_BLOCK_STATUS => {
                // 32-bit context id, then (32-bit length, 32-bit flags) descriptors, at least
                // one.
                if payload.len() < 12 || (payload.len() - 4) % 8 != 0 {
                    return Err(malformed);
                }
                let context_id = u32::from_be_bytes(array4(&payload[0..4]));
                if Some(context_id) != base_allocation_context_id || self.extents.is_some() {
                    // Only one context was selected, and it gets exactly one chunk.
                    return Err(ReplyError::ContextUnknown { context_id });
                }
                // The answer covers at most the request: a last extent reaching past it is
                // cut (a prefix is always a valid answer).
                let mut remaining = self.length_bytes;
                let mut extents = Vec::with_capacity((payload.len() - 4) / 8);
                for descriptor in payload[4..].chunks_exact(8) {
                    let length_bytes = u32::from_be_bytes(array4(&descriptor[0..4]));
                    let flags = u32::from_be_bytes(array4(&descriptor[4..8]));
                    if length_bytes == 0 {
                        return Err(malformed);
                    }
                    if remaining == 0 {
                        break;
                    }
                    let length_bytes = length_bytes.min(remaining);
                    remaining -= length_bytes;
                    extents.push(BlockStatusExtent {
                        length_bytes,
                        flags,
                    });
                }
                self.extents = Some(extents);
            }
            chunk_type if chunk_type & proto::NBD_REPLY_TYPE_FLAG_ERROR != 0 => {
                // 32-bit errno, 16-bit message length, message (then, for ERROR_OFFSET, the
                // offset). An errno of 0 is not an error and is read as EINVAL.
                if payload.len() < 6 {
                    return Err(malformed);
                }
                if self.error == 0 {
                    let errno = u32::from_be_bytes(array4(&payload[0..4]));
                    self.error = if errno == 0 { proto::NBD_EINVAL } else { errno };
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// After the chunk with `NBD_REPLY_FLAG_DONE`: the errno (0 for success) and the answer.
    pub fn finish(self) -> Result<(u32, ReplyAnswer), ReplyError> {
        if self.error != 0 {
            return Ok((self.error, ReplyAnswer::Done));
        }
        match self.command {
            Command::Read => {
                if self.covered_bytes != u64::from(self.length_bytes) {
                    return Err(ReplyError::Incomplete {
                        covered_bytes: self.covered_bytes,
                        length_bytes: u64::from(self.length_bytes),
                    });
                }
                let data = self.data.unwrap_or_default().freeze();
                Ok((0, ReplyAnswer::Data(data)))
            }
            Command::BlockStatus => match self.extents {
                Some(extents) if !extents.is_empty() => Ok((0, ReplyAnswer::Extents(extents))),
                _ => Err(ReplyError::Incomplete {
                    covered_bytes: 0,
                    length_bytes: u64::from(self.length_bytes),
                }),
            },
            _ => Ok((0, ReplyAnswer::Done)),
        }
    }
}

fn array4(bytes: &[u8]) -> [u8; 4] {
    let mut array = [0u8; 4];
    array.copy_from_slice(&bytes[..4]);
    array
}

fn array8(bytes: &[u8]) -> [u8; 8] {
    let mut array = [0u8; 8];
    array.copy_from_slice(&bytes[..8]);
    array
}

#[cfg(test)]
mod tests {
    //! Each test names the section of `doc/proto.md` it checks. The server side is this crate's
    //! own handshake codec, so the two halves are checked against each other as well.

    use super::*;
    use crate::nbd::handshake::{
        ExportCatalog, ExportDescription, Handshake, HandshakeLimits, HandshakeStep,
    };
    use crate::nbd::transmission::{
        encode_block_status, encode_hole_chunk, encode_read_data_chunk_header, encode_simple_reply,
        encode_structured_error, Errno,
    };

    struct OneExport;
    impl ExportCatalog for OneExport {
        fn export_names(&self) -> Vec<String> {
            vec!["disk0".into()]
        }
        fn export(&self, name: &str) -> Option<ExportDescription> {
            (name == "disk0").then(|| ExportDescription {
                name: "disk0".into(),
                description: "test".into(),
                size_bytes: 1 << 30,
                transmission_flags: proto::NBD_FLAG_SEND_FLUSH,
                block_size_min_bytes: 512,
                block_size_preferred_bytes: 4096,
                block_size_max_bytes: 1 << 25,
            })
        }
    }

    /// Runs both halves against each other until the client finishes.
    fn converse(export_name: &str) -> Result<ExportInfo, ClientHandshakeError> {
        converse_with(ClientHandshake::new(export_name)?)
    }

    fn converse_with(mut client: ClientHandshake) -> Result<ExportInfo, ClientHandshakeError> {
        let mut server = Handshake::new(HandshakeLimits::default());
        let mut to_client = BytesMut::new();
        let mut to_server = BytesMut::new();
        let mut out = Vec::new();
        server.greeting(&mut out);
        to_client.extend_from_slice(&out);
        for _ in 0..16 {
            out.clear();
            let step = client.advance(&mut to_client, &mut out)?;
            to_server.extend_from_slice(&out);
            if let ClientHandshakeStep::Done(info) = step {
                return Ok(info);
            }
            out.clear();
            let server_step = server
                .advance(&mut to_server, &OneExport, &mut out)
                .expect("server accepts the client's bytes");
            to_client.extend_from_slice(&out);
            if matches!(server_step, HandshakeStep::Done(_)) {
                assert!(to_server.is_empty());
            }
        }
        panic!("handshake did not finish");
    }

    /// "Option types", NBD_OPT_GO: the server sends NBD_REP_INFO (NBD_INFO_EXPORT is mandatory,
    /// NBD_INFO_BLOCK_SIZE was requested) and then NBD_REP_ACK; the client ends with the size,
    /// the transmission flags and the block sizes.
    #[test]
    fn go_reads_export_and_block_size_info() {
        let info = converse("disk0").expect("handshake succeeds");
        assert_eq!(info.size_bytes, 1 << 30);
        assert_ne!(info.transmission_flags & proto::NBD_FLAG_HAS_FLAGS, 0);
        assert_ne!(info.transmission_flags & proto::NBD_FLAG_SEND_FLUSH, 0);
        assert_eq!(info.block_sizes_bytes, Some((512, 4096, 1 << 25)));
        assert!(!info.structured_replies);
        assert_eq!(info.base_allocation_context_id, None);
    }

    /// "Option types": NBD_OPT_STRUCTURED_REPLY, then NBD_OPT_SET_META_CONTEXT for the export
    /// GO names ("base:allocation"); the client learns the context id the server chose.
    #[test]
    fn structured_replies_and_base_allocation_are_negotiated_before_go() {
        let client = ClientHandshake::new("disk0")
            .expect("short name")
            .asking_structured_replies();
        let info = converse_with(client).expect("handshake succeeds");
        assert!(info.structured_replies);
        assert!(info.base_allocation_context_id.is_some());
        assert_ne!(info.transmission_flags & proto::NBD_FLAG_SEND_FLUSH, 0);
        assert_eq!(info.size_bytes, 1 << 30);
    }

    /// "Option reply types": a server that does not know NBD_OPT_STRUCTURED_REPLY answers
    /// NBD_REP_ERR_UNSUP; the client goes on to GO with simple replies and no block status.
    #[test]
    fn a_server_without_structured_replies_still_gets_go() {
        let mut client = ClientHandshake::new("disk0")
            .expect("short name")
            .asking_structured_replies();
        let mut input = BytesMut::new();
        input.put_u64(proto::NBDMAGIC);
        input.put_u64(proto::IHAVEOPT);
        input.put_u16(proto::NBD_FLAG_FIXED_NEWSTYLE);
        let mut out = Vec::new();
        assert_eq!(
            client.advance(&mut input, &mut out),
            Ok(ClientHandshakeStep::NeedMore)
        );
        assert_eq!(
            &out[12..16],
            &proto::NBD_OPT_STRUCTURED_REPLY.to_be_bytes(),
            "the first option asks for structured replies"
        );
        out.clear();
        let option_reply = |input: &mut BytesMut, option: u32, reply_type: u32, data: &[u8]| {
            input.put_u64(proto::NBD_OPTION_REPLY_MAGIC);
            input.put_u32(option);
            input.put_u32(reply_type);
            input.put_u32(data.len() as u32);
            input.put_slice(data);
        };
        option_reply(
            &mut input,
            proto::NBD_OPT_STRUCTURED_REPLY,
            proto::NBD_REP_ERR_UNSUP,
            b"no",
        );
        assert_eq!(
            client.advance(&mut input, &mut out),
            Ok(ClientHandshakeStep::NeedMore)
        );
        assert_eq!(&out[8..12], &proto::NBD_OPT_GO.to_be_bytes(), "then GO");
        let mut export = Vec::new();
        export.put_u16(proto::NBD_INFO_EXPORT);
        export.put_u64(4096);
        export.put_u16(proto::NBD_FLAG_HAS_FLAGS);
        option_reply(&mut input, proto::NBD_OPT_GO, proto::NBD_REP_INFO, &export);
        option_reply(&mut input, proto::NBD_OPT_GO, proto::NBD_REP_ACK, &[]);
        let Ok(ClientHandshakeStep::Done(info)) = client.advance(&mut input, &mut out) else {
            panic!("GO finishes the handshake");
        };
        assert!(!info.structured_replies);
        assert_eq!(info.base_allocation_context_id, None);
        assert_eq!(info.size_bytes, 4096);
    }

    fn chunk(cookie: u64, chunk_type: u16, done: bool, length_bytes: u32) -> ChunkHeader {
        ChunkHeader {
            flags: if done { proto::NBD_REPLY_FLAG_DONE } else { 0 },
            chunk_type,
            cookie,
            length_bytes,
        }
    }

    /// Feeds one OFFSET_DATA chunk of `data` at `offset` into `assembly`.
    fn data_chunk(
        assembly: &mut ReplyAssembly,
        offset: u64,
        data: &[u8],
        done: bool,
    ) -> Result<(), ReplyError> {
        let header = chunk(
            7,
            proto::NBD_REPLY_TYPE_OFFSET_DATA,
            done,
            8 + data.len() as u32,
        );
        assert_eq!(assembly.chunk(header)?, ChunkPayload::DataOffset);
        assembly.data_slot(offset)?.copy_from_slice(data);
        Ok(())
    }

    /// "Structured reply chunk message": the server's own encoders and the assembly agree; a
    /// read may come as several data and hole chunks in any order, and reads whole.
    #[test]
    fn a_read_put_together_from_chunks_in_any_order() {
        // The server's encoding of one whole read, parsed back.
        let mut wire = Vec::new();
        encode_read_data_chunk_header(&mut wire, 7, 4096, 4, true);
        match parse_reply_header(&wire).expect("valid header") {
            ReplyHeader::Chunk(header) => {
                assert_eq!(
                    header,
                    chunk(7, proto::NBD_REPLY_TYPE_OFFSET_DATA, true, 12)
                );
                assert_eq!(
                    u64::from_be_bytes(array8(&wire[CHUNK_HEADER_BYTES..])),
                    4096,
                    "the offset follows the header"
                );
            }
            other => panic!("not a chunk: {other:?}"),
        }

        let mut assembly = ReplyAssembly::new(Command::Read, 4096, 12);
        data_chunk(&mut assembly, 4096 + 8, b"tail", false).expect("last part first");
        let mut hole = Vec::new();
        encode_hole_chunk(&mut hole, 7, 4096 + 4, 4, false);
        let ReplyHeader::Chunk(header) = parse_reply_header(&hole).expect("valid") else {
            panic!("not a chunk");
        };
        assert_eq!(
            assembly.chunk(header),
            Ok(ChunkPayload::Whole { length_bytes: 12 })
        );
        assembly
            .payload(&hole[CHUNK_HEADER_BYTES..], None)
            .expect("hole in range");
        data_chunk(&mut assembly, 4096, b"head", false).expect("first part");
        assembly
            .chunk(chunk(7, proto::NBD_REPLY_TYPE_NONE, true, 0))
            .expect("done");
        assert_eq!(
            assembly.finish(),
            Ok((
                0,
                ReplyAnswer::Data(Bytes::from_static(b"head\0\0\0\0tail"))
            ))
        );
    }

    /// Content chunks "MUST NOT overlap" and lie within the request; a successful read must
    /// cover all of it. Each violation is a protocol error, never data handed on.
    #[test]
    fn read_chunks_outside_the_request_overlapping_or_missing_are_refused() {
        let mut assembly = ReplyAssembly::new(Command::Read, 4096, 8);
        assert!(matches!(
            data_chunk(&mut assembly, 4095, b"x", false),
            Err(ReplyError::ChunkOutOfRange { .. })
        ));
        let mut assembly = ReplyAssembly::new(Command::Read, 4096, 8);
        assert!(matches!(
            data_chunk(&mut assembly, 4096 + 4, b"12345", false),
            Err(ReplyError::ChunkOutOfRange { .. })
        ));
        let mut assembly = ReplyAssembly::new(Command::Read, 4096, 8);
        data_chunk(&mut assembly, 4096, b"123456", false).expect("in range");
        assert!(matches!(
            data_chunk(&mut assembly, 4096 + 4, b"5678", false),
            Err(ReplyError::ChunkOutOfRange { .. })
        ));
        let mut assembly = ReplyAssembly::new(Command::Read, 4096, 8);
        data_chunk(&mut assembly, 4096, b"1234", true).expect("in range");
        assert_eq!(
            assembly.finish(),
            Err(ReplyError::Incomplete {
                covered_bytes: 4,
                length_bytes: 8
            })
        );
        // Data for a write is not a reply it can have.
        let mut assembly = ReplyAssembly::new(Command::Write, 0, 8);
        assert!(matches!(
            assembly.chunk(chunk(7, proto::NBD_REPLY_TYPE_OFFSET_DATA, true, 16)),
            Err(ReplyError::ChunkUnexpected { .. })
        ));
        // A non-data chunk longer than the bound is refused before it is buffered.
        let mut assembly = ReplyAssembly::new(Command::BlockStatus, 0, 8);
        assert_eq!(
            assembly.chunk(chunk(
                7,
                proto::NBD_REPLY_TYPE_BLOCK_STATUS,
                true,
                CHUNK_PAYLOAD_MAX_BYTES + 4
            )),
            Err(ReplyError::ChunkTooLong {
                length_bytes: CHUNK_PAYLOAD_MAX_BYTES + 4
            })
        );
    }

    /// "Structured reply types", NBD_REPLY_TYPE_ERROR: the reply failed with its errno, even if
    /// data came first.
    #[test]
    fn an_error_chunk_fails_the_reply() {
        let mut assembly = ReplyAssembly::new(Command::Read, 0, 8);
        data_chunk(&mut assembly, 0, b"1234", false).expect("in range");
        let mut error = Vec::new();
        encode_structured_error(&mut error, 7, Errno::Shutdown, "no quorum");
        let ReplyHeader::Chunk(header) = parse_reply_header(&error).expect("valid") else {
            panic!("not a chunk");
        };
        assembly.chunk(header).expect("error chunk");
        assembly
            .payload(&error[CHUNK_HEADER_BYTES..], None)
            .expect("well formed");
        assert_eq!(
            assembly.finish(),
            Ok((proto::NBD_ESHUTDOWN, ReplyAnswer::Done))
        );
    }

    /// "base:allocation" extents from the server's encoder come back as sent, cut to the
    /// requested length; a chunk for a context that was not selected is refused.
    #[test]
    fn block_status_extents_are_read_and_cut_to_the_request() {
        let extents = [
            BlockStatusExtent {
                length_bytes: 4096,
                flags: 0,
            },
            BlockStatusExtent {
                length_bytes: 8192,
                flags: proto::NBD_STATE_HOLE | proto::NBD_STATE_ZERO,
            },
            BlockStatusExtent {
                length_bytes: 4096,
                flags: 0,
            },
        ];
        let mut wire = Vec::new();
        encode_block_status(&mut wire, 7, 1, &extents, true);
        let ReplyHeader::Chunk(header) = parse_reply_header(&wire).expect("valid") else {
            panic!("not a chunk");
        };
        let mut assembly = ReplyAssembly::new(Command::BlockStatus, 0, 10_000);
        assembly.chunk(header).expect("block status chunk");
        assembly
            .payload(&wire[CHUNK_HEADER_BYTES..], Some(1))
            .expect("selected context");
        assert_eq!(
            assembly.finish(),
            Ok((
                0,
                ReplyAnswer::Extents(vec![
                    extents[0],
                    BlockStatusExtent {
                        length_bytes: 10_000 - 4096,
                        flags: extents[1].flags,
                    }
                ])
            ))
        );
        let mut assembly = ReplyAssembly::new(Command::BlockStatus, 0, 10_000);
        assembly.chunk(header).expect("block status chunk");
        assert_eq!(
            assembly.payload(&wire[CHUNK_HEADER_BYTES..], Some(2)),
            Err(ReplyError::ContextUnknown { context_id: 1 })
        );
    }

    /// "Option reply types": NBD_REP_ERR_UNKNOWN for an export that does not exist, with a
    /// message; the client reports the reply type and the server's message.
    #[test]
    fn go_refusal_carries_the_servers_message() {
        let error = converse("nope").expect_err("unknown export is refused");
        match error {
            ClientHandshakeError::Refused {
                reply_type,
                message,
                export_name,
            } => {
                assert_eq!(reply_type, proto::NBD_REP_ERR_UNKNOWN);
                assert!(message.contains("nope"), "{message}");
                assert_eq!(export_name, "nope");
            }
            other => panic!("unexpected error {other:?}"),
        }
    }

    /// The shipping server codec against the client codec, both with TLS: the client's first
    /// option is STARTTLS; after the (here notional) upgrade both go on to GO. Against a
    /// server without TLS the client stops instead of going on in plaintext.
    #[test]
    fn a_client_requiring_tls_upgrades_first_and_never_falls_back() {
        use crate::nbd::handshake::TlsOffer;
        let mut client = ClientHandshake::new("disk0")
            .expect("short name")
            .asking_structured_replies()
            .requiring_tls();
        let mut server = Handshake::with_tls(HandshakeLimits::default(), TlsOffer::Required);
        let (mut to_client, mut to_server, mut out) =
            (BytesMut::new(), BytesMut::new(), Vec::new());
        server.greeting(&mut out);
        to_client.extend_from_slice(&out);
        let mut upgrades = 0;
        let info = 'talk: {
            for _ in 0..16 {
                out.clear();
                match client
                    .advance(&mut to_client, &mut out)
                    .expect("the client goes on")
                {
                    ClientHandshakeStep::Done(info) => break 'talk info,
                    ClientHandshakeStep::StartTls => {
                        upgrades += 1;
                        client.tls_started(&mut out);
                    }
                    ClientHandshakeStep::NeedMore => {}
                }
                to_server.extend_from_slice(&out);
                out.clear();
                match server.advance(&mut to_server, &OneExport, &mut out) {
                    Ok(HandshakeStep::StartTls) => server.tls_started(),
                    Ok(_) => {}
                    Err(error) => panic!("the server refused: {error}"),
                }
                to_client.extend_from_slice(&out);
            }
            panic!("handshake did not finish");
        };
        assert_eq!(upgrades, 1);
        assert!(info.structured_replies);

        let refusing = ClientHandshake::new("disk0")
            .expect("short name")
            .requiring_tls();
        assert!(matches!(
            converse_with(refusing),
            Err(ClientHandshakeError::TlsRefused { .. })
        ));
    }

    /// "Newstyle negotiation": a server without NBD_FLAG_FIXED_NEWSTYLE cannot do NBD_OPT_GO,
    /// and a wrong magic is not NBD at all.
    #[test]
    fn greeting_checks() {
        let mut client = ClientHandshake::new("disk0").expect("short name");
        let mut input = BytesMut::new();
        input.put_u64(proto::NBDMAGIC);
        input.put_u64(proto::IHAVEOPT);
        input.put_u16(0);
        let mut out = Vec::new();
        assert_eq!(
            client.advance(&mut input, &mut out),
            Err(ClientHandshakeError::NotFixedNewstyle { handshake_flags: 0 })
        );
        let mut client = ClientHandshake::new("disk0").expect("short name");
        let mut input = BytesMut::from(&[0u8; GREETING_BYTES][..]);
        assert!(matches!(
            client.advance(&mut input, &mut out),
            Err(ClientHandshakeError::GreetingMagicBad { .. })
        ));
    }

    /// "Fixed newstyle negotiation": option replies longer than the client's bound are refused
    /// before they are buffered.
    #[test]
    fn oversized_option_reply_is_refused() {
        let mut client = ClientHandshake::new("disk0").expect("short name");
        let mut input = BytesMut::new();
        input.put_u64(proto::NBDMAGIC);
        input.put_u64(proto::IHAVEOPT);
        input.put_u16(proto::NBD_FLAG_FIXED_NEWSTYLE);
        input.put_u64(proto::NBD_OPTION_REPLY_MAGIC);
        input.put_u32(proto::NBD_OPT_GO);
        input.put_u32(proto::NBD_REP_INFO);
        input.put_u32(OPTION_REPLY_MAX_BYTES + 1);
        let mut out = Vec::new();
        assert_eq!(
            client.advance(&mut input, &mut out),
            Err(ClientHandshakeError::OptionReplyTooLong {
                length_bytes: OPTION_REPLY_MAX_BYTES + 1
            })
        );
        // Without NBD_FLAG_NO_ZEROES advertised, the client must not set NBD_FLAG_C_NO_ZEROES
        // ("Client flags").
        assert_eq!(&out[..4], &proto::NBD_FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    }

    /// "Simple reply message": magic, error, cookie; the server's encoder and this parser agree.
    #[test]
    fn simple_replies_round_trip() {
        let mut out = Vec::new();
        encode_simple_reply(&mut out, 0x1122_3344_5566_7788, Some(Errno::Shutdown));
        let reply = parse_simple_reply(&out).expect("valid reply");
        assert_eq!(reply.cookie, 0x1122_3344_5566_7788);
        assert_eq!(reply.error, proto::NBD_ESHUTDOWN);
        assert_eq!(
            parse_simple_reply(&out[..15]),
            Err(ReplyError::TooShort {
                needed: SIMPLE_REPLY_BYTES,
                length_bytes: 15
            })
        );
        out[0] ^= 0xff;
        assert!(matches!(
            parse_simple_reply(&out),
            Err(ReplyError::MagicBad { .. })
        ));
    }
}
