//! The server side of the NBD fixed newstyle handshake as a sans-I/O state machine.
//!
//! The session actor sends [`Handshake::greeting`], then feeds every byte it reads into
//! [`Handshake::advance`] and writes out whatever `advance` appended to its output buffer, until
//! `advance` returns [`HandshakeStep::Done`] (enter transmission with the [`Negotiated`] export)
//! or [`HandshakeStep::Close`]. The export table is consulted through the [`ExportCatalog`] trait,
//! so this module performs no I/O and knows nothing of volumes or Raft.
//!
//! Memory stays bounded whatever the client sends: an option payload is buffered (by the caller)
//! only up to [`HandshakeLimits::option_length_max_bytes`]; a longer one is consumed and dropped
//! as it arrives and then answered with `NBD_REP_ERR_TOO_BIG`. The number of options per
//! connection is bounded by [`HandshakeLimits::options_max_count`].
//!
//! TLS ("TLS support"): with [`TlsOffer::None`] `NBD_OPT_STARTTLS` is answered with
//! `NBD_REP_ERR_UNSUP` ("NOTLS mode"). With [`TlsOffer::Optional`] (SELECTIVETLS with no
//! TLS-only export) and [`TlsOffer::Required`] (FORCEDTLS) it is acknowledged and `advance`
//! returns [`HandshakeStep::StartTls`]: the caller runs the TLS handshake on its transport,
//! calls [`Handshake::tls_started`] (which forgets what was negotiated before, so nothing
//! said in plaintext survives the upgrade) and goes on feeding `advance` the decrypted bytes.
//! In FORCEDTLS every option but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` is refused with
//! `NBD_REP_ERR_TLS_REQD` until then (`NBD_OPT_INFO` and `NBD_OPT_GO` too, so which exports
//! exist is not revealed), and `NBD_OPT_EXPORT_NAME`, which cannot be refused, ends the
//! session.
//!
//! Section names in comments refer to `doc/proto.md` of NetworkBlockDevice/nbd.

use bytes::{Buf, BufMut, BytesMut};

use super::proto;

/// The metadata context id handed out for `base:allocation` by `NBD_OPT_SET_META_CONTEXT`. The
/// spec makes ids opaque and per-connection; a fixed nonzero value keeps replies reproducible
/// (zero is what `NBD_OPT_LIST_META_CONTEXT` sends, where the id is reserved).
pub const BASE_ALLOCATION_CONTEXT_ID: u32 = 1;

/// Bytes of the client flags field that follows the greeting.
const CLIENT_FLAGS_BYTES: usize = 4;
/// Bytes of an option header: `IHAVEOPT`, option number, payload length.
const OPTION_HEADER_BYTES: usize = 16;
/// Every client flag this server understands ("Client flags").
const CLIENT_FLAGS_KNOWN: u32 = proto::NBD_FLAG_C_FIXED_NEWSTYLE | proto::NBD_FLAG_C_NO_ZEROES;
/// The handshake flags this server sends in its greeting.
const HANDSHAKE_FLAGS: u16 = proto::NBD_FLAG_FIXED_NEWSTYLE | proto::NBD_FLAG_NO_ZEROES;
/// Transmission flags this codec cannot honour whatever the export wants: the experimental
/// `RESIZE` and `EXTENDED_HEADERS` extensions, whose commands and headers it does not parse
/// ("Transmission flags": "The server MUST NOT set the flag for features it does not support").
const TRANSMISSION_FLAGS_UNSUPPORTED: u16 =
    proto::NBD_FLAG_SEND_RESIZE | proto::NBD_FLAG_BLOCK_STATUS_PAYLOAD;

/// What the server offers for one export name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportDescription {
    /// Canonical name, as listed by `NBD_OPT_LIST` and sent as `NBD_INFO_NAME`.
    pub name: String,
    /// Human-readable description (`NBD_INFO_DESCRIPTION`, and the `NBD_REP_SERVER` detail).
    pub description: String,
    /// Export size in bytes.
    pub size_bytes: u64,
    /// The transmission flags the server wants. The codec always adds `NBD_FLAG_HAS_FLAGS` and
    /// removes flags the spec forbids in the negotiated situation (see [`Negotiated::export`]).
    pub transmission_flags: u16,
    /// Minimum block size ("Size constraints"): a power of two, at most 64 KiB.
    pub block_size_min_bytes: u32,
    /// Preferred block size: a power of two, at least max(minimum, 512).
    pub block_size_preferred_bytes: u32,
    /// Maximum payload of one request: at least the preferred block size.
    pub block_size_max_bytes: u32,
}

/// The exports a server offers; implemented by whatever owns the volume table.
pub trait ExportCatalog {
    /// Names returned by `NBD_OPT_LIST`, in the order they should be listed.
    fn export_names(&self) -> Vec<String>;
    /// The export called `name`, or `None` if there is none. `""` asks for the default export
    /// ("A special, "empty", name ... is reserved for a "default" export"): the catalog decides
    /// whether there is one.
    fn export(&self, name: &str) -> Option<ExportDescription>;
    /// Why `name` is refused, for an export that exists but may not be used now (a proxy whose
    /// attach was refused because another client holds the volume). Consulted only when
    /// [`ExportCatalog::export`] returned `None`; the message goes to the client with
    /// `NBD_REP_ERR_POLICY` ("The option is known but forbidden by policy") instead of
    /// `NBD_REP_ERR_UNKNOWN`.
    fn export_refusal(&self, _name: &str) -> Option<String> {
        None
    }
}

/// Bounds on what a client may make the handshake hold or do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Longest option payload buffered; longer ones are discarded and answered with
    /// `NBD_REP_ERR_TOO_BIG`. Should be at least a few KiB: `NBD_OPT_GO` with a 4096-byte name
    /// (the spec's string limit) is 4102 bytes plus information requests.
    pub option_length_max_bytes: u32,
    /// Most options accepted on one connection before it is closed as a denial of service
    /// ("Termination of the session during option haggling": the server MAY initiate a hard
    /// disconnect if it believes a client's behaviour constitutes a denial of service).
    pub options_max_count: u32,
}

impl Default for HandshakeLimits {
    /// 64 KiB per option (room for a maximal name plus many metadata queries) and 1024 options
    /// (real clients send fewer than ten).
    fn default() -> Self {
        HandshakeLimits {
            option_length_max_bytes: 64 * 1024,
            options_max_count: 1024,
        }
    }
}

/// Everything the transmission phase needs from the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// The chosen export. Its `transmission_flags` are the ones actually sent to the client:
    /// `NBD_FLAG_HAS_FLAGS` added, `NBD_FLAG_SEND_DF` removed without structured replies,
    /// `NBD_FLAG_SEND_FAST_ZERO` removed without `NBD_FLAG_SEND_WRITE_ZEROES`, and the
    /// experimental `NBD_FLAG_SEND_RESIZE` / `NBD_FLAG_BLOCK_STATUS_PAYLOAD` removed.
    pub export: ExportDescription,
    /// Whether `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    pub structured_replies: bool,
    /// The id to put in `NBD_REPLY_TYPE_BLOCK_STATUS` chunks; `Some` only if the last
    /// `NBD_OPT_SET_META_CONTEXT` selected `base:allocation` for this very export name.
    pub base_allocation_context_id: Option<u32>,
}

/// How the server offers TLS on a connection ("TLS support").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsOffer {
    /// NOTLS: `NBD_OPT_STARTTLS` is not supported.
    None,
    /// TLS is available and no export requires it.
    Optional,
    /// FORCEDTLS: nothing but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` before TLS.
    Required,
}

/// What the session should do after [`Handshake::advance`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandshakeStep {
    /// Send `out`, read more bytes, call `advance` again.
    NeedMore,
    /// Send `out` and enter the transmission phase. Bytes still in `input` belong to it.
    Done(Negotiated),
    /// The client sent `NBD_OPT_ABORT` (the `NBD_REP_ACK` is in `out`): send `out`, then close.
    Close,
    /// The client sent `NBD_OPT_STARTTLS` and `out` holds its `NBD_REP_ACK`: send `out`, run
    /// the TLS handshake as the server, call [`Handshake::tls_started`], and go on with the
    /// bytes read through TLS. A client may not send anything between the option and its TLS
    /// handshake, so bytes still in `input` are a protocol error.
    StartTls,
}

/// Fatal handshake errors: the session closes the connection without further replies.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    /// "The server MUST drop the TCP connection if the client sets an unknown flag."
    #[error("client flags {client_flags:#010x} contain unknown bits")]
    ClientFlagsUnknown {
        /// The flags as received.
        client_flags: u32,
    },
    /// An option did not start with `IHAVEOPT`, so the stream is out of step.
    #[error("option magic {magic:#018x} is not IHAVEOPT")]
    OptionMagicBad {
        /// The 8 bytes found instead.
        magic: u64,
    },
    /// The client sent more options than [`HandshakeLimits::options_max_count`].
    #[error("more than {options_max_count} options on one connection")]
    OptionsTooMany {
        /// The limit that was exceeded.
        options_max_count: u32,
    },
    /// `NBD_OPT_EXPORT_NAME` named no export: "If the chosen export does not exist ... the server
    /// MUST terminate the session" (the option has no error reply).
    #[error("NBD_OPT_EXPORT_NAME asked for unknown export {export_name:?}")]
    ExportNameUnknown {
        /// The requested name (lossily decoded if it was not UTF-8).
        export_name: String,
    },
    /// `NBD_OPT_EXPORT_NAME` longer than [`HandshakeLimits::option_length_max_bytes`]: it cannot
    /// name an export and cannot be answered with an error, so the session is terminated.
    #[error("NBD_OPT_EXPORT_NAME of {length_bytes} bytes exceeds {option_length_max_bytes}")]
    ExportNameTooLong {
        /// The option length the client announced.
        length_bytes: u32,
        /// The configured limit.
        option_length_max_bytes: u32,
    },
    /// `advance` was called after it had returned `Done`, `Close` or an error.
    #[error("handshake already finished")]
    AlreadyFinished,
    /// `NBD_OPT_EXPORT_NAME` before TLS on a server that requires it ("FORCEDTLS mode": as this
    /// request cannot error, the server MUST terminate the session).
    #[error("NBD_OPT_EXPORT_NAME without TLS on a server that requires TLS")]
    TlsRequired,
}

/// Where the state machine is in the byte stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Waiting for the 32-bit client flags.
    ClientFlags,
    /// Waiting for a 16-byte option header.
    OptionHeader,
    /// Waiting for the whole payload of an option that fits the limit.
    OptionPayload { option: u32, length_bytes: u32 },
    /// Dropping the payload of an option longer than the limit as it arrives.
    OptionDiscard { option: u32, remaining_bytes: u32 },
    /// `Done`, `Close` or a fatal error has been returned.
    Finished,
}

/// The result of handling one option.
enum OptionOutcome {
    /// Replies written; wait for the next option.
    Continue,
    /// Replies written; the handshake is over.
    Finish(HandshakeStep),
}

/// `base:allocation` as selected by the last `NBD_OPT_SET_META_CONTEXT`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct MetaContextSelection {
    /// The export name the selection was made for; it only counts if transmission is entered
    /// with the same name ("Metadata querying").
    export_name: String,
    context_id: u32,
}

/// The server side of one connection's handshake.
#[derive(Debug)]
pub struct Handshake {
    limits: HandshakeLimits,
    state: State,
    /// `NBD_FLAG_C_NO_ZEROES` was set: omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    no_zeroes: bool,
    structured_replies: bool,
    meta_context_selection: Option<MetaContextSelection>,
    options_received_count: u32,
    tls: TlsOffer,
    /// The client set `NBD_FLAG_C_FIXED_NEWSTYLE`: without it the server "MUST operate in
    /// NOTLS mode".
    client_fixed_newstyle: bool,
    /// `NBD_OPT_STARTTLS` was acknowledged and the caller upgraded the transport.
    tls_active: bool,
}

/// A bounds-checked reader over an option payload; every method returns `None` instead of reading
/// past the end, which the option handlers turn into `NBD_REP_ERR_INVALID`.
struct PayloadReader<'a> {
    remaining: &'a [u8],
}

impl<'a> PayloadReader<'a> {
    fn new(payload: &'a [u8]) -> Self {
        PayloadReader { remaining: payload }
    }

    fn bytes(&mut self, length_bytes: usize) -> Option<&'a [u8]> {
        if length_bytes > self.remaining.len() {
            return None;
        }
        let (taken, rest) = self.remaining.split_at(length_bytes);
        self.remaining = rest;
        Some(taken)
    }

    fn u16(&mut self) -> Option<u16> {
        let bytes = self.bytes(2)?;
        Some(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    fn u32(&mut self) -> Option<u32> {
        let bytes = self.bytes(4)?;
        Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    /// A string of `length_bytes` that is valid UTF-8 and within the spec's 4096-byte limit
    /// ("Conventions").
    fn string(&mut self, length_bytes: u32) -> Option<&'a str> {
        let length_bytes = usize::try_from(length_bytes).ok()?;
        if length_bytes > proto::STRING_LENGTH_MAX_BYTES {
            return None;
        }
        std::str::from_utf8(self.bytes(length_bytes)?).ok()
    }

    fn is_empty(&self) -> bool {
        self.remaining.is_empty()
    }
}

/// Appends one fixed newstyle option reply ("Fixed newstyle negotiation").
fn write_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, payload: &[u8]) {
    out.put_u64(proto::NBD_OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply_type);
    // Payloads are built here from bounded strings (names and messages are at most a few KiB),
    // so the length always fits.
    out.put_u32(payload.len() as u32);
    out.put_slice(payload);
}

/// Appends an error reply whose data is a message for a human ("Option reply types": "All error
/// replies MAY have some data set, in which case that data is an error message string").
fn write_option_error(out: &mut Vec<u8>, option: u32, reply_type: u32, message: &str) {
    debug_assert!(reply_type & proto::NBD_REP_FLAG_ERROR != 0);
    let message = &message[..floor_char_boundary(message, proto::STRING_LENGTH_MAX_BYTES)];
    write_option_reply(out, option, reply_type, message.as_bytes());
}

/// The largest index `<= limit_bytes` that is a character boundary of `text`.
fn floor_char_boundary(text: &str, limit_bytes: usize) -> usize {
    if text.len() <= limit_bytes {
        return text.len();
    }
    let mut end = limit_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    end
}

/// A string from the catalog, cut to the spec's limit so a misconfigured name cannot produce an
/// invalid reply.
fn bounded(text: &str) -> &str {
    &text[..floor_char_boundary(text, proto::STRING_LENGTH_MAX_BYTES)]
}

/// The transmission flags actually sent for `export`, given what has been negotiated.
fn effective_transmission_flags(requested: u16, structured_replies: bool) -> u16 {
    // "bit 0, NBD_FLAG_HAS_FLAGS: MUST always be 1."
    let mut flags = (requested | proto::NBD_FLAG_HAS_FLAGS) & !TRANSMISSION_FLAGS_UNSUPPORTED;
    // NBD_FLAG_SEND_DF: the server "MUST leave this flag clear if structured replies have not
    // been negotiated".
    if !structured_replies {
        flags &= !proto::NBD_FLAG_SEND_DF;
    }
    // NBD_FLAG_SEND_FAST_ZERO: the server "MUST set this transmission flag to 0 if
    // NBD_FLAG_SEND_WRITE_ZEROES is not set".
    if flags & proto::NBD_FLAG_SEND_WRITE_ZEROES == 0 {
        flags &= !proto::NBD_FLAG_SEND_FAST_ZERO;
    }
    flags
}

/// The request of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`, borrowed from the
/// option payload.
struct MetaContextRequest<'a> {
    export_name: &'a str,
    queries: Vec<&'a str>,
}

/// Parses the shared data layout of the two meta context options; `None` if it is syntactically
/// invalid ("If the option request is syntactically invalid (such as a query length that would
/// require reading beyond the original length given in the option header), the server MUST fail
/// the request with NBD_REP_ERR_INVALID").
fn parse_meta_context_request(payload: &[u8]) -> Option<MetaContextRequest<'_>> {
    let mut reader = PayloadReader::new(payload);
    let export_name_length_bytes = reader.u32()?;
    let export_name = reader.string(export_name_length_bytes)?;
    let query_count = reader.u32()?;
    // Each query takes at least its 4-byte length, so a count that cannot fit is invalid; this
    // also bounds the allocation below by the (already bounded) payload length.
    if usize::try_from(query_count).ok()? > reader.remaining.len() / 4 {
        return None;
    }
    let mut queries = Vec::with_capacity(query_count as usize);
    for _ in 0..query_count {
        let query_length_bytes = reader.u32()?;
        queries.push(reader.string(query_length_bytes)?);
    }
    if !reader.is_empty() {
        return None;
    }
    Some(MetaContextRequest {
        export_name,
        queries,
    })
}

impl Handshake {
    /// A handshake waiting for the client flags, without TLS; send [`Handshake::greeting`]
    /// first.
    pub fn new(limits: HandshakeLimits) -> Self {
        Handshake::with_tls(limits, TlsOffer::None)
    }

    /// A handshake that offers TLS as `tls` says.
    pub fn with_tls(limits: HandshakeLimits, tls: TlsOffer) -> Self {
        Handshake {
            limits,
            state: State::ClientFlags,
            no_zeroes: false,
            structured_replies: false,
            meta_context_selection: None,
            options_received_count: 0,
            tls,
            client_fixed_newstyle: false,
            tls_active: false,
        }
    }

    /// The caller completed the TLS handshake after [`HandshakeStep::StartTls`]. What was
    /// negotiated in plaintext is forgotten (a man in the middle could have chosen it); the
    /// option count goes on, so STARTTLS cannot reset the limit.
    pub fn tls_started(&mut self) {
        self.tls_active = true;
        self.structured_replies = false;
        self.meta_context_selection = None;
    }

    /// Whether the transport is TLS.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// Appends the server's opening bytes ("Newstyle negotiation"): `NBDMAGIC`, `IHAVEOPT` and
    /// the handshake flags `NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES`.
    pub fn greeting(&self, out: &mut Vec<u8>) {
        out.put_u64(proto::NBDMAGIC);
        out.put_u64(proto::IHAVEOPT);
        out.put_u16(HANDSHAKE_FLAGS);
    }

    /// Consumes as many bytes of `input` as it can use (`input.advance(..)`), appends every byte
    /// to send to `out`, and says what to do next. Bytes left in `input` after `Done` are the
    /// start of the transmission phase. Any `Err` is fatal: close the connection.
    pub fn advance(
        &mut self,
        input: &mut BytesMut,
        catalog: &dyn ExportCatalog,
        out: &mut Vec<u8>,
    ) -> Result<HandshakeStep, HandshakeError> {
        let result = self.advance_inner(input, catalog, out);
        if !matches!(
            result,
            Ok(HandshakeStep::NeedMore | HandshakeStep::StartTls)
        ) {
            self.state = State::Finished;
        }
        result
    }

    fn advance_inner(
        &mut self,
        input: &mut BytesMut,
        catalog: &dyn ExportCatalog,
        out: &mut Vec<u8>,
    ) -> Result<HandshakeStep, HandshakeError> {
        loop {
            match self.state {
                State::ClientFlags => {
                    if input.len() < CLIENT_FLAGS_BYTES {
                        return Ok(HandshakeStep::NeedMore);
                    }
                    let client_flags = input.get_u32();
                    // "Client flags": "the server MUST drop the TCP connection if the client sets
                    // an unknown flag, or a flag that does not match something advertised by the
                    // server". Both known flags are advertised. A client without
                    // NBD_FLAG_C_FIXED_NEWSTYLE is still served fixed newstyle replies ("Servers
                    // MAY choose to honour fixed newstyle from clients that didn't set this bit");
                    // such a client only ever sends NBD_OPT_EXPORT_NAME, which has no reply
                    // header anyway.
                    if client_flags & !CLIENT_FLAGS_KNOWN != 0 {
                        return Err(HandshakeError::ClientFlagsUnknown { client_flags });
                    }
                    self.no_zeroes = client_flags & proto::NBD_FLAG_C_NO_ZEROES != 0;
                    self.client_fixed_newstyle =
                        client_flags & proto::NBD_FLAG_C_FIXED_NEWSTYLE != 0;
                    self.state = State::OptionHeader;
                }
                State::OptionHeader => {
                    if input.len() < OPTION_HEADER_BYTES {
                        return Ok(HandshakeStep::NeedMore);
                    }
                    let magic = input.get_u64();
                    if magic != proto::IHAVEOPT {
                        return Err(HandshakeError::OptionMagicBad { magic });
                    }
                    let option = input.get_u32();
                    let length_bytes = input.get_u32();
                    self.options_received_count = self.options_received_count.saturating_add(1);
                    if self.options_received_count > self.limits.options_max_count {
                        return Err(HandshakeError::OptionsTooMany {
                            options_max_count: self.limits.options_max_count,
                        });
                    }
                    if length_bytes <= self.limits.option_length_max_bytes {
                        self.state = State::OptionPayload {
                            option,
                            length_bytes,
                        };
                    } else if option == proto::NBD_OPT_EXPORT_NAME {
                        return Err(HandshakeError::ExportNameTooLong {
                            length_bytes,
                            option_length_max_bytes: self.limits.option_length_max_bytes,
                        });
                    } else {
                        self.state = State::OptionDiscard {
                            option,
                            remaining_bytes: length_bytes,
                        };
                    }
                }
                State::OptionPayload {
                    option,
                    length_bytes,
                } => {
                    // length_bytes <= option_length_max_bytes, so waiting for it keeps the
                    // caller's buffer bounded.
                    let length_bytes = length_bytes as usize;
                    if input.len() < length_bytes {
                        return Ok(HandshakeStep::NeedMore);
                    }
                    let payload = input.split_to(length_bytes);
                    self.state = State::OptionHeader;
                    match self.handle_option(option, &payload, catalog, out)? {
                        OptionOutcome::Continue => {}
                        OptionOutcome::Finish(step) => return Ok(step),
                    }
                }
                State::OptionDiscard {
                    option,
                    remaining_bytes,
                } => {
                    let dropped_bytes = input.len().min(remaining_bytes as usize);
                    input.advance(dropped_bytes);
                    // dropped_bytes <= remaining_bytes, which is a u32.
                    let remaining_bytes = remaining_bytes - dropped_bytes as u32;
                    if remaining_bytes > 0 {
                        self.state = State::OptionDiscard {
                            option,
                            remaining_bytes,
                        };
                        return Ok(HandshakeStep::NeedMore);
                    }
                    self.state = State::OptionHeader;
                    if option == proto::NBD_OPT_ABORT {
                        // NBD_OPT_ABORT: "The server MUST reply with NBD_REP_ACK" and "SHOULD
                        // ignore any data sent by the client", however much of it there is.
                        write_option_reply(out, option, proto::NBD_REP_ACK, &[]);
                        return Ok(HandshakeStep::Close);
                    }
                    // "NBD_REP_ERR_TOO_BIG: The request or the reply is too large to process."
                    // The whole payload was consumed first, so the next option parses
                    // ("Baseline": servers "MUST NOT fail to parse the next message received").
                    write_option_error(
                        out,
                        option,
                        proto::NBD_REP_ERR_TOO_BIG,
                        "option payload exceeds the server's limit",
                    );
                }
                State::Finished => return Err(HandshakeError::AlreadyFinished),
            }
        }
    }

    /// Answers one option whose payload has been read completely.
    fn handle_option(
        &mut self,
        option: u32,
        payload: &[u8],
        catalog: &dyn ExportCatalog,
        out: &mut Vec<u8>,
    ) -> Result<OptionOutcome, HandshakeError> {
        if self.tls == TlsOffer::Required && !self.tls_active {
            match option {
                proto::NBD_OPT_STARTTLS | proto::NBD_OPT_ABORT => {}
                proto::NBD_OPT_EXPORT_NAME => return Err(HandshakeError::TlsRequired),
                _ => {
                    // "FORCEDTLS mode": any other option, NBD_OPT_INFO and unsupported ones
                    // included, gets NBD_REP_ERR_TLS_REQD while TLS has not been initiated.
                    write_option_error(
                        out,
                        option,
                        proto::NBD_REP_ERR_TLS_REQD,
                        "this server requires TLS: send NBD_OPT_STARTTLS first",
                    );
                    return Ok(OptionOutcome::Continue);
                }
            }
        }
        match option {
            proto::NBD_OPT_EXPORT_NAME => self.handle_export_name(payload, catalog, out),
            proto::NBD_OPT_ABORT => {
                // "The server MUST reply with NBD_REP_ACK"; any data is ignored.
                write_option_reply(out, option, proto::NBD_REP_ACK, &[]);
                Ok(OptionOutcome::Finish(HandshakeStep::Close))
            }
            proto::NBD_OPT_LIST => {
                self.handle_list(payload, catalog, out);
                Ok(OptionOutcome::Continue)
            }
            proto::NBD_OPT_STARTTLS => {
                // Data is invalid in every mode ("for example, NBD_REP_ERR_INVALID if the
                // client included data").
                let offered = self.tls != TlsOffer::None && self.client_fixed_newstyle;
                if offered && payload.is_empty() {
                    if self.tls_active {
                        // "If the server receives NBD_OPT_STARTTLS when TLS has already been
                        // negotiated, it MUST reply with NBD_REP_ERR_INVALID."
                        write_option_error(
                            out,
                            option,
                            proto::NBD_REP_ERR_INVALID,
                            "TLS is already active",
                        );
                        return Ok(OptionOutcome::Continue);
                    }
                    write_option_reply(out, option, proto::NBD_REP_ACK, &[]);
                    return Ok(OptionOutcome::Finish(HandshakeStep::StartTls));
                }
                // "NOTLS mode": reply NBD_REP_ERR_POLICY or NBD_REP_ERR_UNSUP.
                if payload.is_empty() {
                    write_option_error(
                        out,
                        option,
                        proto::NBD_REP_ERR_UNSUP,
                        "TLS is not supported by this server",
                    );
                } else {
                    write_option_error(
                        out,
                        option,
                        proto::NBD_REP_ERR_INVALID,
                        "NBD_OPT_STARTTLS must not carry data",
                    );
                }
                Ok(OptionOutcome::Continue)
            }
            proto::NBD_OPT_INFO | proto::NBD_OPT_GO => {
                Ok(self.handle_info_or_go(option, payload, catalog, out))
            }
            proto::NBD_OPT_STRUCTURED_REPLY => {
                // "The client MUST NOT send any additional data with the option, and the server
                // SHOULD reject a request that includes data with NBD_REP_ERR_INVALID." A repeat
                // is acknowledged again: it changes nothing.
                if payload.is_empty() {
                    self.structured_replies = true;
                    write_option_reply(out, option, proto::NBD_REP_ACK, &[]);
                } else {
                    write_option_error(
                        out,
                        option,
                        proto::NBD_REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY must not carry data",
                    );
                }
                Ok(OptionOutcome::Continue)
            }
            proto::NBD_OPT_LIST_META_CONTEXT | proto::NBD_OPT_SET_META_CONTEXT => {
                self.handle_meta_context(option, payload, catalog, out);
                Ok(OptionOutcome::Continue)
            }
            _ => {
                // "Baseline": "Servers that receive messages which they do not implement MUST
                // reply to them with NBD_REP_ERR_UNSUP". This covers NBD_OPT_PEEK_EXPORT and the
                // experimental NBD_OPT_EXTENDED_HEADERS.
                write_option_error(
                    out,
                    option,
                    proto::NBD_REP_ERR_UNSUP,
                    &format!("option {option} is not supported"),
                );
                Ok(OptionOutcome::Continue)
            }
        }
    }

    /// `NBD_OPT_EXPORT_NAME` ("Newstyle negotiation", "Option types").
    fn handle_export_name(
        &mut self,
        payload: &[u8],
        catalog: &dyn ExportCatalog,
        out: &mut Vec<u8>,
    ) -> Result<OptionOutcome, HandshakeError> {
        // "Data: String, name of the export"; a name that is not a valid string cannot name an
        // export, and this option has no error reply: the session must be terminated.
        let export = std::str::from_utf8(payload)
            .ok()
            .filter(|name| name.len() <= proto::STRING_LENGTH_MAX_BYTES)
            .and_then(|name| catalog.export(name).map(|export| (name, export)));
        let Some((requested_name, export)) = export else {
            return Err(HandshakeError::ExportNameUnknown {
                export_name: String::from_utf8_lossy(payload).into_owned(),
            });
        };
        let negotiated = self.negotiated(requested_name, export);
        out.put_u64(negotiated.export.size_bytes);
        out.put_u16(negotiated.export.transmission_flags);
        // "124 bytes, zeroes (reserved) (unless NBD_FLAG_C_NO_ZEROES was negotiated by the
        // client)".
        if !self.no_zeroes {
            out.put_bytes(0, proto::EXPORT_NAME_REPLY_ZEROES_BYTES);
        }
        Ok(OptionOutcome::Finish(HandshakeStep::Done(negotiated)))
    }

    /// `NBD_OPT_LIST`: one `NBD_REP_SERVER` per export, then `NBD_REP_ACK`.
    fn handle_list(&self, payload: &[u8], catalog: &dyn ExportCatalog, out: &mut Vec<u8>) {
        // "The client MUST NOT send any additional data with the option, and the server SHOULD
        // reject a request that includes data with NBD_REP_ERR_INVALID."
        if !payload.is_empty() {
            write_option_error(
                out,
                proto::NBD_OPT_LIST,
                proto::NBD_REP_ERR_INVALID,
                "NBD_OPT_LIST must not carry data",
            );
            return;
        }
        for name in catalog.export_names() {
            // NBD_REP_SERVER: 32-bit name length, name, then optional details "suitable for
            // direct display to a human being": the description.
            let name = bounded(&name);
            let description = catalog
                .export(name)
                .map(|export| bounded(&export.description).to_owned())
                .unwrap_or_default();
            let mut reply = Vec::with_capacity(4 + name.len() + description.len());
            reply.put_u32(name.len() as u32);
            reply.put_slice(name.as_bytes());
            reply.put_slice(description.as_bytes());
            write_option_reply(out, proto::NBD_OPT_LIST, proto::NBD_REP_SERVER, &reply);
        }
        write_option_reply(out, proto::NBD_OPT_LIST, proto::NBD_REP_ACK, &[]);
    }

    /// `NBD_OPT_INFO` and `NBD_OPT_GO` ("Option types": they share request and reply formats).
    fn handle_info_or_go(
        &mut self,
        option: u32,
        payload: &[u8],
        catalog: &dyn ExportCatalog,
        out: &mut Vec<u8>,
    ) -> OptionOutcome {
        // Data: 32-bit name length ("MUST be no larger than the option data length - 6"), name,
        // 16-bit count of information requests, 16 bits each. Anything else is malformed.
        let parsed = (|| {
            let mut reader = PayloadReader::new(payload);
            let name_length_bytes = reader.u32()?;
            let name = reader.string(name_length_bytes)?;
            let info_request_count = reader.u16()?;
            let mut info_requests = Vec::with_capacity(usize::from(info_request_count));
            for _ in 0..info_request_count {
                info_requests.push(reader.u16()?);
            }
            reader.is_empty().then_some((name, info_requests))
        })();
        let Some((requested_name, info_requests)) = parsed else {
            write_option_error(
                out,
                option,
                proto::NBD_REP_ERR_INVALID,
                "malformed NBD_OPT_INFO/NBD_OPT_GO request",
            );
            return OptionOutcome::Continue;
        };
        let Some(export) = catalog.export(requested_name) else {
            if let Some(message) = catalog.export_refusal(requested_name) {
                write_option_error(out, option, proto::NBD_REP_ERR_POLICY, &message);
                return OptionOutcome::Continue;
            }
            // "NBD_REP_ERR_UNKNOWN: The chosen export does not exist on this server. In this
            // case, the server SHOULD NOT send NBD_REP_INFO replies."
            write_option_error(
                out,
                option,
                proto::NBD_REP_ERR_UNKNOWN,
                &format!("unknown export {:?}", bounded(requested_name)),
            );
            return OptionOutcome::Continue;
        };
        let negotiated = self.negotiated(requested_name, export);
        let export = &negotiated.export;

        // NBD_INFO_EXPORT is mandatory before NBD_REP_ACK; NBD_INFO_BLOCK_SIZE is always sent,
        // because the server "MUST send this info if it is requested and it intends to enforce
        // size constraints other than the defaults" and unrequested info is harmless ("The
        // server MAY send information requests back which are not explicitly requested").
        let mut info = Vec::with_capacity(14);
        info.put_u16(proto::NBD_INFO_EXPORT);
        info.put_u64(export.size_bytes);
        info.put_u16(export.transmission_flags);
        write_option_reply(out, option, proto::NBD_REP_INFO, &info);

        info.clear();
        info.put_u16(proto::NBD_INFO_BLOCK_SIZE);
        info.put_u32(export.block_size_min_bytes);
        info.put_u32(export.block_size_preferred_bytes);
        info.put_u32(export.block_size_max_bytes);
        write_option_reply(out, option, proto::NBD_REP_INFO, &info);

        // Only when asked: the server "MUST NOT assume that such information requests are
        // understood ... unless the client explicitly asked for them". Unknown requests are
        // ignored ("The server MUST ignore any information requests it does not understand").
        if info_requests.contains(&proto::NBD_INFO_NAME) {
            let name = bounded(&export.name);
            info.clear();
            info.put_u16(proto::NBD_INFO_NAME);
            info.put_slice(name.as_bytes());
            write_option_reply(out, option, proto::NBD_REP_INFO, &info);
        }
        if info_requests.contains(&proto::NBD_INFO_DESCRIPTION) {
            let description = bounded(&export.description);
            info.clear();
            info.put_u16(proto::NBD_INFO_DESCRIPTION);
            info.put_slice(description.as_bytes());
            write_option_reply(out, option, proto::NBD_REP_INFO, &info);
        }
        write_option_reply(out, option, proto::NBD_REP_ACK, &[]);

        if option == proto::NBD_OPT_GO {
            // "after a successful reply to NBD_OPT_GO ... transmission mode is entered
            // immediately"; no padding follows the ACK.
            OptionOutcome::Finish(HandshakeStep::Done(negotiated))
        } else {
            OptionOutcome::Continue
        }
    }

    /// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`; only `base:allocation` exists.
    fn handle_meta_context(
        &mut self,
        option: u32,
        payload: &[u8],
        catalog: &dyn ExportCatalog,
        out: &mut Vec<u8>,
    ) {
        let setting = option == proto::NBD_OPT_SET_META_CONTEXT;
        if setting {
            // "Issuing this command replaces all previously-set metadata contexts (including when
            // this command fails)".
            self.meta_context_selection = None;
        }
        // SET: "This option MUST NOT be requested unless structured replies have been negotiated
        // first. If a client attempts to do so, a server SHOULD send NBD_REP_ERR_INVALID." LIST:
        // "a server MAY send NBD_REP_ERR_INVALID"; done for both, since without structured
        // replies no context could ever be used.
        if !self.structured_replies {
            write_option_error(
                out,
                option,
                proto::NBD_REP_ERR_INVALID,
                "metadata contexts need NBD_OPT_STRUCTURED_REPLY first",
            );
            return;
        }
        let Some(request) = parse_meta_context_request(payload) else {
            write_option_error(
                out,
                option,
                proto::NBD_REP_ERR_INVALID,
                "malformed metadata context request",
            );
            return;
        };
        if catalog.export(request.export_name).is_none() {
            write_option_error(
                out,
                option,
                proto::NBD_REP_ERR_UNKNOWN,
                &format!("unknown export {:?}", request.export_name),
            );
            return;
        }
        let base_allocation_matches = if setting {
            // SET: "If zero queries are sent, the server MUST select no metadata contexts"; the
            // bare `base:` form "the server MUST ignore ... during NBD_OPT_SET_META_CONTEXT";
            // unknown leaf names and namespaces are ignored.
            request
                .queries
                .contains(&proto::BASE_ALLOCATION_CONTEXT_NAME)
        } else {
            // LIST: "If zero queries are sent, then the server MUST return all the metadata
            // contexts"; `base:` is a wildcard for the `base` namespace.
            request.queries.is_empty()
                || request.queries.iter().any(|query| {
                    *query == proto::BASE_NAMESPACE_PREFIX
                        || *query == proto::BASE_ALLOCATION_CONTEXT_NAME
                })
        };
        if base_allocation_matches {
            // NBD_REP_META_CONTEXT: 32-bit context id, then the name. In LIST replies the id "is
            // reserved and SHOULD be set to zero".
            let context_id = if setting {
                BASE_ALLOCATION_CONTEXT_ID
            } else {
                0
            };
            let mut reply = Vec::with_capacity(4 + proto::BASE_ALLOCATION_CONTEXT_NAME.len());
            reply.put_u32(context_id);
            reply.put_slice(proto::BASE_ALLOCATION_CONTEXT_NAME.as_bytes());
            write_option_reply(out, option, proto::NBD_REP_META_CONTEXT, &reply);
            if setting {
                self.meta_context_selection = Some(MetaContextSelection {
                    export_name: request.export_name.to_owned(),
                    context_id,
                });
            }
        }
        // "If none of the query strings find any metadata contexts, the server MUST send a
        // single reply of type NBD_REP_ACK."
        write_option_reply(out, option, proto::NBD_REP_ACK, &[]);
    }

    /// What transmission would use if it were entered now with `requested_name`.
    fn negotiated(&self, requested_name: &str, mut export: ExportDescription) -> Negotiated {
        export.transmission_flags =
            effective_transmission_flags(export.transmission_flags, self.structured_replies);
        // BLOCK_STATUS is allowed only if "the final time [SET_META_CONTEXT] was sent, it
        // referred to the same export name used to enter transmission phase".
        let base_allocation_context_id = self
            .meta_context_selection
            .as_ref()
            .filter(|selection| self.structured_replies && selection.export_name == requested_name)
            .map(|selection| selection.context_id);
        Negotiated {
            export,
            structured_replies: self.structured_replies,
            base_allocation_context_id,
        }
    }
}

#[cfg(test)]
mod tests {
    //! Each test names the section of `doc/proto.md` it checks.

    use super::*;
    use proptest::prelude::*;

    const DEFAULT_EXPORT_SIZE_BYTES: u64 = 1 << 30;
    const OTHER_EXPORT_SIZE_BYTES: u64 = 123_456_789 * 512;

    /// Two exports: "vol0" (also the default export "") and "vol1"; nothing else exists.
    struct TestCatalog;

    fn vol0() -> ExportDescription {
        ExportDescription {
            name: "vol0".to_owned(),
            description: "the first volume".to_owned(),
            size_bytes: DEFAULT_EXPORT_SIZE_BYTES,
            transmission_flags: proto::NBD_FLAG_SEND_FLUSH
                | proto::NBD_FLAG_SEND_FUA
                | proto::NBD_FLAG_SEND_TRIM
                | proto::NBD_FLAG_SEND_WRITE_ZEROES
                | proto::NBD_FLAG_SEND_FAST_ZERO
                | proto::NBD_FLAG_SEND_DF
                | proto::NBD_FLAG_CAN_MULTI_CONN
                | proto::NBD_FLAG_SEND_CACHE,
            block_size_min_bytes: 512,
            block_size_preferred_bytes: 4096,
            block_size_max_bytes: 32 << 20,
        }
    }

    fn vol1() -> ExportDescription {
        ExportDescription {
            name: "vol1".to_owned(),
            description: "read-only archive".to_owned(),
            size_bytes: OTHER_EXPORT_SIZE_BYTES,
            transmission_flags: proto::NBD_FLAG_READ_ONLY | proto::NBD_FLAG_SEND_FAST_ZERO,
            block_size_min_bytes: 1,
            block_size_preferred_bytes: 4096,
            block_size_max_bytes: 1 << 20,
        }
    }

    impl ExportCatalog for TestCatalog {
        fn export_names(&self) -> Vec<String> {
            vec!["vol0".to_owned(), "vol1".to_owned()]
        }
        fn export(&self, name: &str) -> Option<ExportDescription> {
            match name {
                "" | "vol0" => Some(vol0()),
                "vol1" => Some(vol1()),
                _ => None,
            }
        }
    }

    fn limits() -> HandshakeLimits {
        HandshakeLimits {
            option_length_max_bytes: 8192,
            options_max_count: 64,
        }
    }

    fn client_flags(flags: u32) -> Vec<u8> {
        flags.to_be_bytes().to_vec()
    }

    fn option(option: u32, payload: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.put_u64(proto::IHAVEOPT);
        bytes.put_u32(option);
        bytes.put_u32(payload.len() as u32);
        bytes.put_slice(payload);
        bytes
    }

    fn info_payload(name: &str, info_requests: &[u16]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.put_u32(name.len() as u32);
        bytes.put_slice(name.as_bytes());
        bytes.put_u16(info_requests.len() as u16);
        for request in info_requests {
            bytes.put_u16(*request);
        }
        bytes
    }

    fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.put_u32(name.len() as u32);
        bytes.put_slice(name.as_bytes());
        bytes.put_u32(queries.len() as u32);
        for query in queries {
            bytes.put_u32(query.len() as u32);
            bytes.put_slice(query.as_bytes());
        }
        bytes
    }

    /// One decoded option reply.
    #[derive(Debug, PartialEq, Eq)]
    struct Reply {
        option: u32,
        reply_type: u32,
        data: Vec<u8>,
    }

    /// Decodes a sequence of option replies, insisting that they cover `bytes` exactly.
    fn replies(mut bytes: &[u8]) -> Vec<Reply> {
        let mut decoded = Vec::new();
        while !bytes.is_empty() {
            assert!(bytes.len() >= 20, "truncated reply header: {bytes:?}");
            assert_eq!(bytes.get_u64(), proto::NBD_OPTION_REPLY_MAGIC);
            let option = bytes.get_u32();
            let reply_type = bytes.get_u32();
            let length_bytes = bytes.get_u32() as usize;
            assert!(bytes.len() >= length_bytes, "truncated reply data");
            decoded.push(Reply {
                option,
                reply_type,
                data: bytes[..length_bytes].to_vec(),
            });
            bytes.advance(length_bytes);
        }
        decoded
    }

    fn reply_types(replies: &[Reply]) -> Vec<u32> {
        replies.iter().map(|reply| reply.reply_type).collect()
    }

    /// Feeds `client` in one piece, calling `advance` until it stops making progress.
    fn run_all_at_once(
        client: &[u8],
    ) -> (Vec<u8>, Result<HandshakeStep, HandshakeError>, BytesMut) {
        let mut handshake = Handshake::new(limits());
        let mut input = BytesMut::from(client);
        let mut out = Vec::new();
        let result = handshake.advance(&mut input, &TestCatalog, &mut out);
        (out, result, input)
    }

    /// Feeds `client` one byte at a time, stopping at the first result other than `NeedMore`.
    fn run_byte_by_byte(
        client: &[u8],
    ) -> (Vec<u8>, Result<HandshakeStep, HandshakeError>, BytesMut) {
        let mut handshake = Handshake::new(limits());
        let mut input = BytesMut::new();
        let mut out = Vec::new();
        let mut result = Ok(HandshakeStep::NeedMore);
        let mut fed_bytes = 0;
        while fed_bytes < client.len() {
            input.put_u8(client[fed_bytes]);
            fed_bytes += 1;
            result = handshake.advance(&mut input, &TestCatalog, &mut out);
            if result != Ok(HandshakeStep::NeedMore) {
                break;
            }
        }
        input.put_slice(&client[fed_bytes..]);
        (out, result, input)
    }

    fn done(result: Result<HandshakeStep, HandshakeError>) -> Negotiated {
        match result {
            Ok(HandshakeStep::Done(negotiated)) => negotiated,
            other => panic!("expected Done, got {other:?}"),
        }
    }

    /// Reference: proto.md, "Newstyle negotiation" and "Handshake flags".
    #[test]
    fn greeting_is_nbdmagic_ihaveopt_and_fixed_newstyle_no_zeroes() {
        let mut out = Vec::new();
        Handshake::new(limits()).greeting(&mut out);
        let mut expected = b"NBDMAGICIHAVEOPT".to_vec();
        expected.extend_from_slice(&[0, 0b11]);
        assert_eq!(out, expected);
    }

    /// Reference: proto.md, "Client flags": "the server MUST drop the TCP connection if the client
    /// sets an unknown flag".
    #[test]
    fn unknown_client_flag_is_fatal() {
        let (out, result, _) = run_all_at_once(&client_flags(0b111));
        assert_eq!(
            result,
            Err(HandshakeError::ClientFlagsUnknown {
                client_flags: 0b111
            })
        );
        assert!(out.is_empty());
    }

    /// Reference: proto.md, "Newstyle negotiation": every option starts with `IHAVEOPT`.
    #[test]
    fn wrong_option_magic_is_fatal() {
        let mut client = client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE);
        client.extend_from_slice(b"IHAVEOPX");
        client.extend_from_slice(&[0; 8]);
        let (_, result, _) = run_all_at_once(&client);
        assert_eq!(
            result,
            Err(HandshakeError::OptionMagicBad {
                magic: u64::from_be_bytes(*b"IHAVEOPX")
            })
        );
    }

    /// Reference: proto.md, "Option types" / `NBD_OPT_INFO` and `NBD_OPT_GO`: `NBD_INFO_EXPORT`
    /// before `NBD_REP_ACK`; transmission is entered after the ACK with nothing after it.
    #[test]
    fn go_sends_export_and_block_size_then_ack_and_is_done() {
        let mut client = client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE);
        client.extend(option(proto::NBD_OPT_GO, &info_payload("vol1", &[])));
        let (out, result, rest) = run_all_at_once(&client);
        let negotiated = done(result);
        assert!(rest.is_empty());
        let decoded = replies(&out);
        assert_eq!(
            reply_types(&decoded),
            vec![proto::NBD_REP_INFO, proto::NBD_REP_INFO, proto::NBD_REP_ACK]
        );
        assert!(decoded
            .iter()
            .all(|reply| reply.option == proto::NBD_OPT_GO));
        let flags_sent = proto::NBD_FLAG_HAS_FLAGS | proto::NBD_FLAG_READ_ONLY;
        let mut export_info = vec![0, 0];
        export_info.extend_from_slice(&OTHER_EXPORT_SIZE_BYTES.to_be_bytes());
        export_info.extend_from_slice(&flags_sent.to_be_bytes());
        assert_eq!(decoded[0].data, export_info);
        let mut block_size_info = vec![0, 3];
        block_size_info.extend_from_slice(&1u32.to_be_bytes());
        block_size_info.extend_from_slice(&4096u32.to_be_bytes());
        block_size_info.extend_from_slice(&(1u32 << 20).to_be_bytes());
        assert_eq!(decoded[1].data, block_size_info);
        assert!(decoded[2].data.is_empty());
        assert_eq!(
            negotiated,
            Negotiated {
                export: ExportDescription {
                    transmission_flags: flags_sent,
                    ..vol1()
                },
                structured_replies: false,
                base_allocation_context_id: None,
            }
        );
    }

    /// Reference: proto.md, `NBD_INFO_NAME` and `NBD_INFO_DESCRIPTION`: sent when requested;
    /// unknown information requests are ignored ("The server MUST ignore any information requests
    /// it does not understand").
    #[test]
    fn go_sends_name_and_description_when_requested() {
        let mut client = client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE);
        client.extend(option(
            proto::NBD_OPT_GO,
            &info_payload(
                "",
                &[
                    proto::NBD_INFO_DESCRIPTION,
                    0x7777,
                    proto::NBD_INFO_NAME,
                    proto::NBD_INFO_BLOCK_SIZE,
                ],
            ),
        ));
        let (out, result, _) = run_all_at_once(&client);
        let negotiated = done(result);
        assert_eq!(negotiated.export.name, "vol0");
        let decoded = replies(&out);
        assert_eq!(decoded.len(), 5);
        let infos: Vec<&[u8]> = decoded[..4].iter().map(|reply| &reply.data[..]).collect();
        assert!(infos.contains(&&b"\x00\x01vol0"[..]));
        assert!(infos.contains(&&b"\x00\x02the first volume"[..]));
        assert_eq!(
            infos.iter().filter(|info| info[..2] == [0, 3]).count(),
            1,
            "NBD_INFO_BLOCK_SIZE exactly once"
        );
        assert_eq!(decoded[4].reply_type, proto::NBD_REP_ACK);
    }

    /// Reference: proto.md, `NBD_OPT_INFO`: describes the export (with its real size) without
    /// entering transmission; a following `NBD_OPT_GO` still works.
    #[test]
    fn info_reports_real_size_and_handshake_continues() {
        let mut client = client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE);
        client.extend(option(proto::NBD_OPT_INFO, &info_payload("vol1", &[])));
        let (out, result, _) = run_all_at_once(&client);
        assert_eq!(result, Ok(HandshakeStep::NeedMore));
        let decoded = replies(&out);
        assert_eq!(decoded[0].reply_type, proto::NBD_REP_INFO);
        assert_eq!(decoded[0].data[..2], [0, 0]);
        assert_eq!(
            decoded[0].data[2..10],
            OTHER_EXPORT_SIZE_BYTES.to_be_bytes()
        );
        assert_eq!(
            decoded.last().map(|r| r.reply_type),
            Some(proto::NBD_REP_ACK)
        );
        assert!(decoded
            .iter()
            .all(|reply| reply.option == proto::NBD_OPT_INFO));

        client.extend(option(proto::NBD_OPT_GO, &info_payload("vol1", &[])));
        let (_, result, _) = run_all_at_once(&client);
        assert_eq!(done(result).export.size_bytes, OTHER_EXPORT_SIZE_BYTES);
    }

    /// Reference: proto.md, `NBD_OPT_GO`: "NBD_REP_ERR_UNKNOWN: The chosen export does not exist
    /// ... the server SHOULD NOT send NBD_REP_INFO replies"; haggling continues.
    #[test]
    fn go_for_unknown_export_is_err_unknown_and_handshake_continues() {
        let mut client = client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE);
        client.extend(option(proto::NBD_OPT_GO, &info_payload("nope", &[])));
        let (out, result, _) = run_all_at_once(&client);
        assert_eq!(result, Ok(HandshakeStep::NeedMore));
        assert_eq!(
            reply_types(&replies(&out)),
            vec![proto::NBD_REP_ERR_UNKNOWN]
        );

        client.extend(option(proto::NBD_OPT_GO, &info_payload("vol0", &[])));
        let (_, result, _) = run_all_at_once(&client);
        assert_eq!(done(result).export.size_bytes, DEFAULT_EXPORT_SIZE_BYTES);
    }

    /// Reference: proto.md, `NBD_OPT_GO` data ("length of name ... MUST be no larger than the
    /// option data length - 6") and `NBD_REP_ERR_INVALID`.
    #[test]
    fn malformed_go_is_err_invalid() {
        let mut name_too_long = info_payload("vol0", &[]);
        name_too_long[3] = 200;
        let mut trailing_bytes = info_payload("vol0", &[proto::NBD_INFO_NAME]);
        trailing_bytes.push(0);
        let mut info_count_too_big = info_payload("vol0", &[]);
        info_count_too_big[9] = 3;
        let mut bad_utf8 = info_payload("ab", &[]);
        bad_utf8[4] = 0xff;
        for payload in [
            name_too_long,
            trailing_bytes,
            info_count_too_big,
            bad_utf8,
            vec![0, 0],
        ] {
            let mut client = client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE);
            client.extend(option(proto::NBD_OPT_GO, &payload));
            let (out, result, _) = run_all_at_once(&client);
            assert_eq!(result, Ok(HandshakeStep::NeedMore), "payload {payload:?}");
            assert_eq!(
                reply_types(&replies(&out)),
                vec![proto::NBD_REP_ERR_INVALID],
                "payload {payload:?}"
            );
        }
    }

    /// Reference: proto.md, "Newstyle negotiation": the `NBD_OPT_EXPORT_NAME` reply is size,
    /// flags and 124 zero bytes.
    #[test]
    fn export_name_reply_has_124_zeroes_without_no_zeroes() {
        let mut client = client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE);
        client.extend(option(proto::NBD_OPT_EXPORT_NAME, b"vol1"));
        let (out, result, _) = run_all_at_once(&client);
        let negotiated = done(result);
        let flags_sent = proto::NBD_FLAG_HAS_FLAGS | proto::NBD_FLAG_READ_ONLY;
        let mut expected = OTHER_EXPORT_SIZE_BYTES.to_be_bytes().to_vec();
        expected.extend_from_slice(&flags_sent.to_be_bytes());
        expected.extend_from_slice(&[0; 124]);
        assert_eq!(out, expected);
        assert_eq!(negotiated.export.transmission_flags, flags_sent);
    }

    /// Reference: proto.md, "Client flags": with `NBD_FLAG_C_NO_ZEROES` "the server MUST NOT send
    /// the 124 bytes of zeroes".
    #[test]
    fn export_name_reply_omits_zeroes_with_no_zeroes() {
        let mut client =
            client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE | proto::NBD_FLAG_C_NO_ZEROES);
        client.extend(option(proto::NBD_OPT_EXPORT_NAME, b""));
        let (out, result, _) = run_all_at_once(&client);
        assert_eq!(done(result).export.name, "vol0");
        assert_eq!(out.len(), 10);
        assert_eq!(out[..8], DEFAULT_EXPORT_SIZE_BYTES.to_be_bytes());
    }

    /// Reference: proto.md, "Client flags": servers MAY honour fixed newstyle from clients that
    /// did not set `NBD_FLAG_C_FIXED_NEWSTYLE`; such (plain newstyle) clients send
    /// `NBD_OPT_EXPORT_NAME` only.
    #[test]
    fn plain_newstyle_client_can_use_export_name() {
        let mut client = client_flags(0);
        client.extend(option(proto::NBD_OPT_EXPORT_NAME, b"vol0"));
        let (out, result, _) = run_all_at_once(&client);
        assert_eq!(done(result).export.size_bytes, DEFAULT_EXPORT_SIZE_BYTES);
        assert_eq!(out.len(), 8 + 2 + 124);
    }

    /// Reference: proto.md, `NBD_OPT_EXPORT_NAME`: "If the chosen export does not exist ... the
    /// server MUST terminate the session."
    #[test]
    fn export_name_for_unknown_export_terminates() {
        let mut client = client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE);
        client.extend(option(proto::NBD_OPT_EXPORT_NAME, b"nope"));
        let (out, result, _) = run_all_at_once(&client);
        assert_eq!(
            result,
            Err(HandshakeError::ExportNameUnknown {
                export_name: "nope".to_owned()
            })
        );
        assert!(out.is_empty());
    }

    /// Reference: proto.md, `NBD_OPT_EXPORT_NAME` cannot return an error, so one longer than the
    /// option limit ends the session at once instead of being read.
    #[test]
    fn export_name_longer_than_limit_terminates_without_reading_it() {
        let mut client = client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE);
        client.put_u64(proto::IHAVEOPT);
        client.put_u32(proto::NBD_OPT_EXPORT_NAME);
        client.put_u32(u32::MAX);
        let (_, result, _) = run_all_at_once(&client);
        assert_eq!(
            result,
            Err(HandshakeError::ExportNameTooLong {
                length_bytes: u32::MAX,
                option_length_max_bytes: limits().option_length_max_bytes,
            })
        );
    }

    /// Reference: proto.md, `NBD_OPT_ABORT`: "The server MUST reply with NBD_REP_ACK" and
    /// "SHOULD ignore any data sent by the client".
    #[test]
    fn abort_is_acknowledged_then_close() {
        for payload in [&b""[..], &b"ignored"[..]] {
            let mut client = client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE);
            client.extend(option(proto::NBD_OPT_ABORT, payload));
            let (out, result, _) = run_all_at_once(&client);
            assert_eq!(result, Ok(HandshakeStep::Close));
            assert_eq!(
                replies(&out),
                vec![Reply {
                    option: proto::NBD_OPT_ABORT,
                    reply_type: proto::NBD_REP_ACK,
                    data: Vec::new()
                }]
            );
        }
    }

    /// Reference: proto.md, `NBD_OPT_LIST`: one `NBD_REP_SERVER` per export (32-bit name length,
    /// name, optional human-readable details) then `NBD_REP_ACK`.
    #[test]
    fn list_names_every_export_then_acks() {
        let mut client = client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE);
        client.extend(option(proto::NBD_OPT_LIST, b""));
        let (out, result, _) = run_all_at_once(&client);
        assert_eq!(result, Ok(HandshakeStep::NeedMore));
        let decoded = replies(&out);
        assert_eq!(
            reply_types(&decoded),
            vec![
                proto::NBD_REP_SERVER,
                proto::NBD_REP_SERVER,
                proto::NBD_REP_ACK
            ]
        );
        assert_eq!(decoded[0].data, b"\x00\x00\x00\x04vol0the first volume");
        assert_eq!(decoded[1].data, b"\x00\x00\x00\x04vol1read-only archive");
    }

    /// Reference: proto.md, `NBD_OPT_LIST`: "the server SHOULD reject a request that includes
    /// data with NBD_REP_ERR_INVALID".
    #[test]
    fn list_with_data_is_err_invalid() {
        let mut client = client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE);
        client.extend(option(proto::NBD_OPT_LIST, b"x"));
        let (out, _, _) = run_all_at_once(&client);
        assert_eq!(
            reply_types(&replies(&out)),
            vec![proto::NBD_REP_ERR_INVALID]
        );
    }

    /// Reference: proto.md, "NOTLS mode": `NBD_OPT_STARTTLS` gets `NBD_REP_ERR_POLICY` or
    /// `NBD_REP_ERR_UNSUP`; with data, `NBD_REP_ERR_INVALID`. Never `NBD_REP_ERR_TLS_REQD`.
    #[test]
    fn starttls_is_unsupported() {
        let mut client = client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE);
        client.extend(option(proto::NBD_OPT_STARTTLS, b""));
        client.extend(option(proto::NBD_OPT_STARTTLS, b"x"));
        let (out, result, _) = run_all_at_once(&client);
        assert_eq!(result, Ok(HandshakeStep::NeedMore));
        assert_eq!(
            reply_types(&replies(&out)),
            vec![proto::NBD_REP_ERR_UNSUP, proto::NBD_REP_ERR_INVALID]
        );
    }

    /// Reference: proto.md, "FORCEDTLS mode": before TLS every option but STARTTLS and ABORT
    /// gets `NBD_REP_ERR_TLS_REQD` (INFO and GO too, so no export is revealed, and unknown
    /// options, STRUCTURED_REPLY among them); STARTTLS is acknowledged and hands the transport
    /// over; after the upgrade the options work and a second STARTTLS is `NBD_REP_ERR_INVALID`.
    #[test]
    fn forced_tls_refuses_everything_until_starttls_then_serves() {
        let mut handshake = Handshake::with_tls(limits(), TlsOffer::Required);
        let mut input = BytesMut::from(&client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE)[..]);
        for (code, payload) in [
            (proto::NBD_OPT_LIST, Vec::new()),
            (proto::NBD_OPT_INFO, info_payload("vol0", &[])),
            (proto::NBD_OPT_GO, info_payload("no-such-export", &[])),
            (proto::NBD_OPT_STRUCTURED_REPLY, Vec::new()),
            (0x1234_5678, b"unknown".to_vec()),
        ] {
            input.extend_from_slice(&option(code, &payload));
        }
        input.extend_from_slice(&option(proto::NBD_OPT_STARTTLS, b""));
        let mut out = Vec::new();
        let step = handshake.advance(&mut input, &TestCatalog, &mut out);
        assert_eq!(step, Ok(HandshakeStep::StartTls));
        assert!(input.is_empty());
        let before = replies(&out);
        assert_eq!(
            reply_types(&before),
            [
                vec![proto::NBD_REP_ERR_TLS_REQD; 5],
                vec![proto::NBD_REP_ACK]
            ]
            .concat()
        );
        assert!(!handshake.tls_active());
        handshake.tls_started();
        assert!(handshake.tls_active());
        let mut input = BytesMut::new();
        input.extend_from_slice(&option(proto::NBD_OPT_STARTTLS, b""));
        input.extend_from_slice(&option(proto::NBD_OPT_GO, &info_payload("vol0", &[])));
        let mut out = Vec::new();
        let negotiated = done(handshake.advance(&mut input, &TestCatalog, &mut out));
        assert_eq!(negotiated.export.name, "vol0");
        assert!(!negotiated.structured_replies);
        let after = replies(&out);
        assert_eq!(after[0].reply_type, proto::NBD_REP_ERR_INVALID);
        assert_eq!(after.last().map(|r| r.reply_type), Some(proto::NBD_REP_ACK));
    }

    /// Reference: proto.md, "TLS support" (nothing negotiated before the upgrade outlives it,
    /// since a man in the middle could have chosen it): structured replies and a meta context
    /// acknowledged in plaintext are forgotten by `tls_started`.
    #[test]
    fn what_was_negotiated_in_plaintext_is_forgotten_after_starttls() {
        let mut handshake = Handshake::with_tls(limits(), TlsOffer::Optional);
        let mut input = BytesMut::from(&client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE)[..]);
        input.extend_from_slice(&option(proto::NBD_OPT_STRUCTURED_REPLY, b""));
        input.extend_from_slice(&option(
            proto::NBD_OPT_SET_META_CONTEXT,
            &meta_payload("vol0", &["base:allocation"]),
        ));
        input.extend_from_slice(&option(proto::NBD_OPT_STARTTLS, b""));
        let mut out = Vec::new();
        assert_eq!(
            handshake.advance(&mut input, &TestCatalog, &mut out),
            Ok(HandshakeStep::StartTls)
        );
        let before = reply_types(&replies(&out));
        assert_eq!(
            before[0],
            proto::NBD_REP_ACK,
            "structured replies acknowledged"
        );
        assert!(before.contains(&proto::NBD_REP_META_CONTEXT), "{before:?}");
        handshake.tls_started();
        let mut input = BytesMut::new();
        input.extend_from_slice(&option(proto::NBD_OPT_GO, &info_payload("vol0", &[])));
        let mut out = Vec::new();
        let negotiated = done(handshake.advance(&mut input, &TestCatalog, &mut out));
        assert!(!negotiated.structured_replies);
        assert_eq!(negotiated.base_allocation_context_id, None);
    }

    /// Reference: proto.md, "FORCEDTLS mode": `NBD_OPT_EXPORT_NAME` before TLS cannot be
    /// refused, so the session ends; ABORT is still acknowledged.
    #[test]
    fn forced_tls_ends_an_export_name_before_tls_and_acknowledges_abort() {
        let mut handshake = Handshake::with_tls(limits(), TlsOffer::Required);
        let mut input = BytesMut::from(&client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE)[..]);
        input.extend_from_slice(&option(proto::NBD_OPT_EXPORT_NAME, b"vol0"));
        let mut out = Vec::new();
        assert_eq!(
            handshake.advance(&mut input, &TestCatalog, &mut out),
            Err(HandshakeError::TlsRequired)
        );
        assert!(out.is_empty());
        let mut handshake = Handshake::with_tls(limits(), TlsOffer::Required);
        let mut input = BytesMut::from(&client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE)[..]);
        input.extend_from_slice(&option(proto::NBD_OPT_ABORT, b""));
        let mut out = Vec::new();
        assert_eq!(
            handshake.advance(&mut input, &TestCatalog, &mut out),
            Ok(HandshakeStep::Close)
        );
        assert_eq!(reply_types(&replies(&out)), vec![proto::NBD_REP_ACK]);
    }

    /// Reference: proto.md, "SELECTIVETLS mode" with no TLS-only export: options work in
    /// plaintext, STARTTLS is acknowledged at the client's choice; and "the server MUST operate
    /// in NOTLS mode unless ... the client replied with NBD_FLAG_C_FIXED_NEWSTYLE".
    #[test]
    fn optional_tls_serves_plaintext_and_upgrades_on_request_for_fixed_newstyle_clients() {
        let mut handshake = Handshake::with_tls(limits(), TlsOffer::Optional);
        let mut input = BytesMut::from(&client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE)[..]);
        input.extend_from_slice(&option(proto::NBD_OPT_LIST, b""));
        input.extend_from_slice(&option(proto::NBD_OPT_STARTTLS, b""));
        let mut out = Vec::new();
        assert_eq!(
            handshake.advance(&mut input, &TestCatalog, &mut out),
            Ok(HandshakeStep::StartTls)
        );
        assert_eq!(
            reply_types(&replies(&out)),
            vec![
                proto::NBD_REP_SERVER,
                proto::NBD_REP_SERVER,
                proto::NBD_REP_ACK,
                proto::NBD_REP_ACK
            ]
        );
        let mut handshake = Handshake::with_tls(limits(), TlsOffer::Optional);
        let mut input = BytesMut::from(&client_flags(0)[..]);
        input.extend_from_slice(&option(proto::NBD_OPT_STARTTLS, b""));
        let mut out = Vec::new();
        assert_eq!(
            handshake.advance(&mut input, &TestCatalog, &mut out),
            Ok(HandshakeStep::NeedMore)
        );
        assert_eq!(reply_types(&replies(&out)), vec![proto::NBD_REP_ERR_UNSUP]);
    }

    /// Reference: proto.md, "Baseline": servers "MUST reply to them with NBD_REP_ERR_UNSUP, and
    /// MUST NOT fail to parse the next message received".
    #[test]
    fn unknown_option_is_err_unsup_then_go_works() {
        let mut client = client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE);
        client.extend(option(0x1234_5678, b"some payload"));
        client.extend(option(proto::NBD_OPT_PEEK_EXPORT, b""));
        client.extend(option(proto::NBD_OPT_EXTENDED_HEADERS, b""));
        client.extend(option(proto::NBD_OPT_GO, &info_payload("vol0", &[])));
        let (out, result, _) = run_all_at_once(&client);
        assert_eq!(done(result).export.name, "vol0");
        let decoded = replies(&out);
        assert_eq!(decoded[0].option, 0x1234_5678);
        assert_eq!(
            reply_types(&decoded[..3]),
            vec![proto::NBD_REP_ERR_UNSUP; 3]
        );
        assert_eq!(
            decoded.last().map(|r| r.reply_type),
            Some(proto::NBD_REP_ACK)
        );
    }

    /// Reference: proto.md, `NBD_REP_ERR_TOO_BIG` ("The request or the reply is too large to
    /// process") and "Baseline" (the next option must still parse). A 4 GiB option is consumed
    /// and dropped as it arrives: the input buffer never holds more than one feed.
    #[test]
    fn four_gib_option_is_discarded_then_err_too_big_then_go_works() {
        let mut handshake = Handshake::new(limits());
        let mut out = Vec::new();
        let mut input = BytesMut::from(&client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE)[..]);
        input.put_u64(proto::IHAVEOPT);
        input.put_u32(proto::NBD_OPT_INFO);
        input.put_u32(u32::MAX);
        assert_eq!(
            handshake.advance(&mut input, &TestCatalog, &mut out),
            Ok(HandshakeStep::NeedMore)
        );
        assert!(input.is_empty());

        const FEED_BYTES: usize = 1 << 20;
        let feed = vec![0xa5u8; FEED_BYTES];
        let mut remaining_bytes = u64::from(u32::MAX);
        while remaining_bytes > 0 {
            let chunk_bytes = remaining_bytes.min(FEED_BYTES as u64) as usize;
            input.extend_from_slice(&feed[..chunk_bytes]);
            remaining_bytes -= chunk_bytes as u64;
            if remaining_bytes == 0 {
                // The next option arrives in the same read as the tail of the huge one.
                input.extend(option(proto::NBD_OPT_GO, &info_payload("vol0", &[])));
            }
            let result = handshake.advance(&mut input, &TestCatalog, &mut out);
            if remaining_bytes > 0 {
                assert_eq!(result, Ok(HandshakeStep::NeedMore));
                assert!(input.is_empty(), "discarded bytes must be consumed");
                assert!(out.is_empty(), "no reply before the whole payload is read");
                assert!(input.capacity() <= 2 * FEED_BYTES, "memory stays bounded");
            } else {
                assert_eq!(done(result).export.name, "vol0");
            }
        }
        let decoded = replies(&out);
        assert_eq!(decoded[0].option, proto::NBD_OPT_INFO);
        assert_eq!(decoded[0].reply_type, proto::NBD_REP_ERR_TOO_BIG);
        assert_eq!(
            reply_types(&decoded[1..]),
            vec![proto::NBD_REP_INFO, proto::NBD_REP_INFO, proto::NBD_REP_ACK]
        );
    }

    /// Reference: proto.md, `NBD_OPT_ABORT`: even an over-long abort is acknowledged (its data
    /// is ignored) and ends the session.
    #[test]
    fn oversized_abort_is_discarded_then_acknowledged() {
        let mut client = client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE);
        client.extend(option(proto::NBD_OPT_ABORT, &vec![7; 10_000]));
        let (out, result, _) = run_all_at_once(&client);
        assert_eq!(result, Ok(HandshakeStep::Close));
        assert_eq!(reply_types(&replies(&out)), vec![proto::NBD_REP_ACK]);
    }

    /// Reference: proto.md, "Termination of the session during option haggling": a server MAY
    /// hard disconnect a client whose behaviour constitutes a denial of service.
    #[test]
    fn too_many_options_is_fatal() {
        let mut client = client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE);
        for _ in 0..=limits().options_max_count {
            client.extend(option(proto::NBD_OPT_LIST, b""));
        }
        let (out, result, _) = run_all_at_once(&client);
        assert_eq!(
            result,
            Err(HandshakeError::OptionsTooMany {
                options_max_count: 64
            })
        );
        assert_eq!(
            replies(&out).len(),
            64 * 3,
            "the first 64 options were answered"
        );
    }

    /// Reference: proto.md, `NBD_OPT_STRUCTURED_REPLY` ("NBD_REP_ACK: Structured replies have
    /// been negotiated"; data → `NBD_REP_ERR_INVALID`) and `NBD_FLAG_SEND_DF` ("MUST leave this
    /// flag clear if structured replies have not been negotiated").
    #[test]
    fn structured_replies_only_when_negotiated() {
        let mut client = client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE);
        client.extend(option(proto::NBD_OPT_GO, &info_payload("vol0", &[])));
        let (_, result, _) = run_all_at_once(&client);
        let without = done(result);
        assert!(!without.structured_replies);
        assert_eq!(
            without.export.transmission_flags & proto::NBD_FLAG_SEND_DF,
            0
        );

        let mut client = client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE);
        client.extend(option(proto::NBD_OPT_STRUCTURED_REPLY, b"x"));
        client.extend(option(proto::NBD_OPT_GO, &info_payload("vol0", &[])));
        let (out, result, _) = run_all_at_once(&client);
        assert!(
            !done(result).structured_replies,
            "a rejected request negotiates nothing"
        );
        assert_eq!(replies(&out)[0].reply_type, proto::NBD_REP_ERR_INVALID);

        let mut client = client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE);
        client.extend(option(proto::NBD_OPT_STRUCTURED_REPLY, b""));
        client.extend(option(proto::NBD_OPT_GO, &info_payload("vol0", &[])));
        let (out, result, _) = run_all_at_once(&client);
        let with = done(result);
        assert!(with.structured_replies);
        assert_ne!(with.export.transmission_flags & proto::NBD_FLAG_SEND_DF, 0);
        assert_eq!(
            replies(&out)[0],
            Reply {
                option: proto::NBD_OPT_STRUCTURED_REPLY,
                reply_type: proto::NBD_REP_ACK,
                data: Vec::new()
            }
        );
    }

    /// Reference: proto.md, "Transmission flags": `NBD_FLAG_HAS_FLAGS` "MUST always be 1";
    /// `NBD_FLAG_SEND_FAST_ZERO` "MUST set this transmission flag to 0 if
    /// NBD_FLAG_SEND_WRITE_ZEROES is not set"; the server "MUST NOT set the flag for features it
    /// does not support" (the experimental RESIZE and EXTENDED_HEADERS).
    #[test]
    fn transmission_flags_are_made_consistent() {
        assert_eq!(
            effective_transmission_flags(proto::NBD_FLAG_SEND_FAST_ZERO, true),
            proto::NBD_FLAG_HAS_FLAGS
        );
        assert_eq!(
            effective_transmission_flags(
                proto::NBD_FLAG_SEND_RESIZE | proto::NBD_FLAG_BLOCK_STATUS_PAYLOAD,
                true
            ),
            proto::NBD_FLAG_HAS_FLAGS
        );
        let wanted = proto::NBD_FLAG_SEND_WRITE_ZEROES | proto::NBD_FLAG_SEND_FAST_ZERO;
        assert_eq!(
            effective_transmission_flags(wanted, false),
            wanted | proto::NBD_FLAG_HAS_FLAGS
        );
    }

    /// Reference: proto.md, `NBD_OPT_SET_META_CONTEXT`: "This option MUST NOT be requested unless
    /// structured replies have been negotiated first ... a server SHOULD send
    /// NBD_REP_ERR_INVALID."
    #[test]
    fn set_meta_context_before_structured_reply_is_err_invalid() {
        let mut client = client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE);
        client.extend(option(
            proto::NBD_OPT_SET_META_CONTEXT,
            &meta_payload("vol0", &["base:allocation"]),
        ));
        client.extend(option(proto::NBD_OPT_STRUCTURED_REPLY, b""));
        client.extend(option(proto::NBD_OPT_GO, &info_payload("vol0", &[])));
        let (out, result, _) = run_all_at_once(&client);
        assert_eq!(replies(&out)[0].reply_type, proto::NBD_REP_ERR_INVALID);
        assert_eq!(done(result).base_allocation_context_id, None);
    }

    /// Reference: proto.md, `NBD_OPT_SET_META_CONTEXT` (one `NBD_REP_META_CONTEXT` per selected
    /// context, then `NBD_REP_ACK`) and "Metadata querying" (selection counts for the same export
    /// name only).
    #[test]
    fn set_meta_context_selects_base_allocation_for_that_export() {
        let mut client = client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE);
        client.extend(option(proto::NBD_OPT_STRUCTURED_REPLY, b""));
        client.extend(option(
            proto::NBD_OPT_SET_META_CONTEXT,
            &meta_payload("vol0", &["x-other:thing", "base:allocation", "base:"]),
        ));
        let mut same_export = client.clone();
        same_export.extend(option(proto::NBD_OPT_GO, &info_payload("vol0", &[])));
        let (out, result, _) = run_all_at_once(&same_export);
        assert_eq!(
            done(result).base_allocation_context_id,
            Some(BASE_ALLOCATION_CONTEXT_ID)
        );
        let decoded = replies(&out);
        assert_eq!(decoded[1].option, proto::NBD_OPT_SET_META_CONTEXT);
        assert_eq!(decoded[1].reply_type, proto::NBD_REP_META_CONTEXT);
        let mut expected = BASE_ALLOCATION_CONTEXT_ID.to_be_bytes().to_vec();
        expected.extend_from_slice(b"base:allocation");
        assert_eq!(decoded[1].data, expected);
        assert_eq!(decoded[2].reply_type, proto::NBD_REP_ACK);

        let mut other_export = client.clone();
        other_export.extend(option(proto::NBD_OPT_GO, &info_payload("vol1", &[])));
        let (_, result, _) = run_all_at_once(&other_export);
        assert_eq!(done(result).base_allocation_context_id, None);

        let mut export_name = client;
        export_name.extend(option(proto::NBD_OPT_EXPORT_NAME, b"vol0"));
        let (_, result, _) = run_all_at_once(&export_name);
        assert_eq!(
            done(result).base_allocation_context_id,
            Some(BASE_ALLOCATION_CONTEXT_ID)
        );
    }

    /// Reference: proto.md, "The `base:` metadata namespace": `base:` "the server MUST ignore
    /// this form during NBD_OPT_SET_META_CONTEXT"; `NBD_OPT_SET_META_CONTEXT`: "If zero queries
    /// are sent, the server MUST select no metadata contexts"; unknown leaf names are ignored.
    #[test]
    fn set_meta_context_without_a_matching_query_selects_nothing() {
        for queries in [
            &[][..],
            &["base:"][..],
            &["base:dirty", "qemu:dirty-bitmap:x"][..],
        ] {
            let mut client = client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE);
            client.extend(option(proto::NBD_OPT_STRUCTURED_REPLY, b""));
            client.extend(option(
                proto::NBD_OPT_SET_META_CONTEXT,
                &meta_payload("vol0", queries),
            ));
            client.extend(option(proto::NBD_OPT_GO, &info_payload("vol0", &[])));
            let (out, result, _) = run_all_at_once(&client);
            assert_eq!(done(result).base_allocation_context_id, None, "{queries:?}");
            assert_eq!(
                replies(&out)[1].reply_type,
                proto::NBD_REP_ACK,
                "{queries:?}"
            );
        }
    }

    /// Reference: proto.md, `NBD_OPT_SET_META_CONTEXT`: "Issuing this command replaces all
    /// previously-set metadata contexts (including when this command fails)".
    #[test]
    fn failing_set_meta_context_clears_the_selection() {
        let mut client = client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE);
        client.extend(option(proto::NBD_OPT_STRUCTURED_REPLY, b""));
        client.extend(option(
            proto::NBD_OPT_SET_META_CONTEXT,
            &meta_payload("vol0", &["base:allocation"]),
        ));
        client.extend(option(proto::NBD_OPT_SET_META_CONTEXT, &[0, 0, 0, 9]));
        client.extend(option(proto::NBD_OPT_GO, &info_payload("vol0", &[])));
        let (out, result, _) = run_all_at_once(&client);
        assert_eq!(replies(&out)[3].reply_type, proto::NBD_REP_ERR_INVALID);
        assert_eq!(done(result).base_allocation_context_id, None);
    }

    /// Reference: proto.md, `NBD_OPT_LIST_META_CONTEXT`: zero queries return all contexts; `base:`
    /// is a wildcard; unknown namespaces are ignored ("If none of the query strings find any
    /// metadata contexts, the server MUST send a single reply of type NBD_REP_ACK"); the context
    /// id "SHOULD be set to zero".
    #[test]
    fn list_meta_context_queries() {
        let cases: [(&[&str], bool); 5] = [
            (&[], true),
            (&["base:"], true),
            (&["base:allocation"], true),
            (&["base:allocation", "base:"], true),
            (&["x-foo:bar", "base:unknown"], false),
        ];
        for (queries, lists_base_allocation) in cases {
            let mut client = client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE);
            client.extend(option(proto::NBD_OPT_STRUCTURED_REPLY, b""));
            client.extend(option(
                proto::NBD_OPT_LIST_META_CONTEXT,
                &meta_payload("vol0", queries),
            ));
            let (out, result, _) = run_all_at_once(&client);
            assert_eq!(result, Ok(HandshakeStep::NeedMore));
            let decoded = replies(&out);
            if lists_base_allocation {
                assert_eq!(
                    reply_types(&decoded[1..]),
                    vec![proto::NBD_REP_META_CONTEXT, proto::NBD_REP_ACK],
                    "{queries:?}"
                );
                assert_eq!(decoded[1].data, b"\x00\x00\x00\x00base:allocation");
            } else {
                assert_eq!(
                    reply_types(&decoded[1..]),
                    vec![proto::NBD_REP_ACK],
                    "{queries:?}"
                );
            }
        }
    }

    /// Reference: proto.md, `NBD_OPT_LIST_META_CONTEXT`: "If the option request is syntactically
    /// invalid (such as a query length that would require reading beyond the original length
    /// given in the option header), the server MUST fail the request with NBD_REP_ERR_INVALID";
    /// an unknown export is `NBD_REP_ERR_UNKNOWN`.
    #[test]
    fn malformed_or_unknown_export_list_meta_context() {
        let mut query_too_long = meta_payload("vol0", &["base:"]);
        query_too_long[15] = 99;
        let mut count_too_big = meta_payload("vol0", &[]);
        count_too_big[11] = 200;
        let mut trailing = meta_payload("vol0", &[]);
        trailing.push(1);
        let cases = [
            (query_too_long, proto::NBD_REP_ERR_INVALID),
            (count_too_big, proto::NBD_REP_ERR_INVALID),
            (trailing, proto::NBD_REP_ERR_INVALID),
            (vec![0, 0], proto::NBD_REP_ERR_INVALID),
            (meta_payload("nope", &[]), proto::NBD_REP_ERR_UNKNOWN),
        ];
        for (payload, expected) in cases {
            let mut client = client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE);
            client.extend(option(proto::NBD_OPT_STRUCTURED_REPLY, b""));
            client.extend(option(proto::NBD_OPT_LIST_META_CONTEXT, &payload));
            let (out, result, _) = run_all_at_once(&client);
            assert_eq!(result, Ok(HandshakeStep::NeedMore));
            assert_eq!(
                reply_types(&replies(&out)[1..]),
                vec![expected],
                "{payload:?}"
            );
        }
    }

    /// A realistic client conversation (as qemu or libnbd would run it), plus the first request
    /// of the transmission phase sent right behind the final option.
    fn full_client_conversation() -> Vec<u8> {
        let mut client =
            client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE | proto::NBD_FLAG_C_NO_ZEROES);
        client.extend(option(0x99, b"unknown"));
        client.extend(option(proto::NBD_OPT_LIST, b""));
        client.extend(option(proto::NBD_OPT_STRUCTURED_REPLY, b""));
        client.extend(option(
            proto::NBD_OPT_LIST_META_CONTEXT,
            &meta_payload("vol0", &[]),
        ));
        client.extend(option(
            proto::NBD_OPT_SET_META_CONTEXT,
            &meta_payload("vol0", &["base:allocation"]),
        ));
        client.extend(option(
            proto::NBD_OPT_INFO,
            &info_payload("vol0", &[proto::NBD_INFO_BLOCK_SIZE]),
        ));
        client.extend(option(
            proto::NBD_OPT_GO,
            &info_payload(
                "vol0",
                &[
                    proto::NBD_INFO_BLOCK_SIZE,
                    proto::NBD_INFO_NAME,
                    proto::NBD_INFO_DESCRIPTION,
                ],
            ),
        ));
        client.extend_from_slice(b"first transmission bytes");
        client
    }

    /// Reference: proto.md, "Fixed newstyle negotiation": option framing is by length, so how
    /// the bytes are split across reads must not matter.
    #[test]
    fn byte_by_byte_and_all_at_once_give_the_same_result() {
        let client = full_client_conversation();
        let (out_whole, result_whole, rest_whole) = run_all_at_once(&client);
        let (out_bytes, result_bytes, rest_bytes) = run_byte_by_byte(&client);
        assert_eq!(out_whole, out_bytes);
        assert_eq!(result_whole, result_bytes);
        assert_eq!(&rest_whole[..], b"first transmission bytes");
        assert_eq!(rest_whole, rest_bytes);
        let negotiated = done(result_whole);
        assert!(negotiated.structured_replies);
        assert_eq!(
            negotiated.base_allocation_context_id,
            Some(BASE_ALLOCATION_CONTEXT_ID)
        );
        let decoded = replies(&out_whole);
        assert_eq!(
            reply_types(&decoded),
            vec![
                proto::NBD_REP_ERR_UNSUP,
                proto::NBD_REP_SERVER,
                proto::NBD_REP_SERVER,
                proto::NBD_REP_ACK,
                proto::NBD_REP_ACK,
                proto::NBD_REP_META_CONTEXT,
                proto::NBD_REP_ACK,
                proto::NBD_REP_META_CONTEXT,
                proto::NBD_REP_ACK,
                proto::NBD_REP_INFO,
                proto::NBD_REP_INFO,
                proto::NBD_REP_ACK,
                proto::NBD_REP_INFO,
                proto::NBD_REP_INFO,
                proto::NBD_REP_INFO,
                proto::NBD_REP_INFO,
                proto::NBD_REP_ACK,
            ]
        );
    }

    /// The state machine refuses to run past its end, so a session bug cannot reinterpret
    /// transmission bytes as options.
    #[test]
    fn advance_after_done_is_an_error() {
        let mut handshake = Handshake::new(limits());
        let mut input = BytesMut::from(&full_client_conversation()[..]);
        let mut out = Vec::new();
        let first = handshake.advance(&mut input, &TestCatalog, &mut out);
        assert!(matches!(first, Ok(HandshakeStep::Done(_))));
        assert_eq!(
            handshake.advance(&mut input, &TestCatalog, &mut out),
            Err(HandshakeError::AlreadyFinished)
        );
        assert_eq!(&input[..], b"first transmission bytes");
    }

    /// Payload strings longer than the spec's 4096-byte limit are refused ("Conventions": strings
    /// "MUST be no longer than 4096 bytes").
    #[test]
    fn overlong_export_name_in_go_is_err_invalid() {
        let name = "n".repeat(proto::STRING_LENGTH_MAX_BYTES + 1);
        let mut client = client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE);
        client.extend(option(proto::NBD_OPT_GO, &info_payload(&name, &[])));
        let (out, _, _) = run_all_at_once(&client);
        assert_eq!(
            reply_types(&replies(&out)),
            vec![proto::NBD_REP_ERR_INVALID]
        );
    }

    /// Reference: proto.md, `NBD_OPT_EXPORT_NAME`: a name that is not a valid string names no
    /// export, and the session must be terminated.
    #[test]
    fn export_name_that_is_not_utf8_terminates() {
        let mut client = client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE);
        client.extend(option(proto::NBD_OPT_EXPORT_NAME, b"vol\xff"));
        let (out, result, _) = run_all_at_once(&client);
        assert!(matches!(
            result,
            Err(HandshakeError::ExportNameUnknown { .. })
        ));
        assert!(out.is_empty());
    }

    proptest! {
        /// Reference: proto.md, "Fixed newstyle negotiation": however the conversation is split
        /// into reads, the replies, the outcome and the left-over bytes are the same.
        #[test]
        fn any_split_gives_the_same_result(
            split_points in proptest::collection::vec(any::<usize>(), 0..16),
        ) {
            let client = full_client_conversation();
            let (expected_out, expected_result, expected_rest) = run_all_at_once(&client);
            let mut cuts: Vec<usize> = split_points.iter().map(|p| p % (client.len() + 1)).collect();
            cuts.push(client.len());
            cuts.sort_unstable();
            let mut handshake = Handshake::new(limits());
            let mut input = BytesMut::new();
            let mut out = Vec::new();
            let mut result = Ok(HandshakeStep::NeedMore);
            let mut start = 0;
            for cut in cuts {
                input.extend_from_slice(&client[start..cut]);
                start = cut;
                result = handshake.advance(&mut input, &TestCatalog, &mut out);
                if result != Ok(HandshakeStep::NeedMore) {
                    break;
                }
            }
            input.extend_from_slice(&client[start..]);
            prop_assert_eq!(out, expected_out);
            prop_assert_eq!(result, expected_result);
            prop_assert_eq!(input, expected_rest);
        }

        /// `advance` never panics, whatever the bytes and however they are split, and the output
        /// stays proportional to the input (no amplification beyond a fixed factor).
        #[test]
        fn advance_never_panics_on_arbitrary_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            split_points in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let mut handshake = Handshake::new(limits());
            let mut input = BytesMut::new();
            let mut out = Vec::new();
            let mut cuts: Vec<usize> = split_points.iter().map(|p| p % (bytes.len() + 1)).collect();
            cuts.push(bytes.len());
            cuts.sort_unstable();
            let mut start = 0;
            for cut in cuts {
                input.extend_from_slice(&bytes[start..cut]);
                start = cut;
                match handshake.advance(&mut input, &TestCatalog, &mut out) {
                    Ok(HandshakeStep::NeedMore) => {}
                    _ => break,
                }
            }
            prop_assert!(out.len() <= 64 * (bytes.len() + 1));
        }

        /// Well-framed options with random numbers and payloads never panic and are answered
        /// without losing the framing: a trailing GO always completes.
        #[test]
        fn random_options_keep_framing(
            options in proptest::collection::vec(
                (0u32..16, proptest::collection::vec(any::<u8>(), 0..64)), 0..8),
        ) {
            let mut client = client_flags(proto::NBD_FLAG_C_FIXED_NEWSTYLE);
            for (number, payload) in &options {
                // Options that legitimately end the handshake would stop it early.
                if matches!(*number, proto::NBD_OPT_EXPORT_NAME | proto::NBD_OPT_ABORT | proto::NBD_OPT_GO) {
                    continue;
                }
                client.extend(option(*number, payload));
            }
            client.extend(option(proto::NBD_OPT_GO, &info_payload("vol0", &[])));
            let (_, result, rest) = run_all_at_once(&client);
            prop_assert!(matches!(result, Ok(HandshakeStep::Done(_))));
            prop_assert!(rest.is_empty());
        }
    }
}
