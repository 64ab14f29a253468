//! The client side of NBD as sans-I/O pieces, for the proxy's upstream connections: the fixed
//! newstyle handshake ending in `NBD_OPT_GO` ([`ClientHandshake`]), the request encoding (the
//! shared [`super::transmission::encode_request_header`]) and simple reply parsing
//! ([`parse_simple_reply`]).
//!
//! The caller owns the socket: it feeds every byte it reads into [`ClientHandshake::advance`]
//! and writes whatever `advance` appended to its output buffer, until `advance` returns
//! [`ClientHandshakeStep::Done`] with the export's [`ExportInfo`]. Option replies are bounded by
//! [`OPTION_REPLY_MAX_BYTES`], so a hostile server cannot make the client buffer more.
//!
//! Section names in comments refer to `doc/proto.md` of NetworkBlockDevice/nbd.

use bytes::{Buf, BufMut, BytesMut};

use super::proto;

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

/// What the server told about the export during `NBD_OPT_GO` ("Option types", `NBD_REP_INFO`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub size_bytes: u64,
    pub transmission_flags: u16,
    /// `NBD_INFO_BLOCK_SIZE`, if the server sent it: (minimum, preferred, maximum payload).
    pub block_sizes_bytes: Option<(u32, u32, u32)>,
}

/// What to do after [`ClientHandshake::advance`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientHandshakeStep {
    /// Send `out`, read more bytes, call `advance` again.
    NeedMore,
    /// Send `out`; the transmission phase has begun. Bytes left in `input` belong to it.
    Done(ExportInfo),
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClientState {
    Greeting,
    OptionReply,
    Finished,
}

/// The client side of one connection's handshake: fixed newstyle, `NBD_OPT_GO` for one export
/// with `NBD_INFO_BLOCK_SIZE` requested, simple replies in transmission.
#[derive(Debug)]
pub struct ClientHandshake {
    export_name: String,
    state: ClientState,
    size_and_flags: Option<(u64, u16)>,
    block_sizes_bytes: Option<(u32, u32, u32)>,
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
            state: ClientState::Greeting,
            size_and_flags: None,
            block_sizes_bytes: None,
        })
    }

    /// Consumes what it can of `input`, appends bytes to send to `out`. Any `Err` is fatal.
    pub fn advance(
        &mut self,
        input: &mut BytesMut,
        out: &mut Vec<u8>,
    ) -> Result<ClientHandshakeStep, ClientHandshakeError> {
        let result = self.advance_inner(input, out);
        if !matches!(result, Ok(ClientHandshakeStep::NeedMore)) {
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
                    // NBD_OPT_GO data: 32-bit name length, name, 16-bit number of information
                    // requests, then the requests ("Option types").
                    let name = self.export_name.as_bytes();
                    out.put_u64(proto::IHAVEOPT);
                    out.put_u32(proto::NBD_OPT_GO);
                    // The name is at most 4096 bytes (checked in `new`).
                    out.put_u32(4 + name.len() as u32 + 2 + 2);
                    out.put_u32(name.len() as u32);
                    out.put_slice(name);
                    out.put_u16(1);
                    out.put_u16(proto::NBD_INFO_BLOCK_SIZE);
                    self.state = ClientState::OptionReply;
                }
                ClientState::OptionReply => {
                    if input.len() < OPTION_REPLY_HEADER_BYTES {
                        return Ok(ClientHandshakeStep::NeedMore);
                    }
                    let header = &input[..OPTION_REPLY_HEADER_BYTES];
                    let magic = u64::from_be_bytes(array8(&header[0..8]));
                    let option = u32::from_be_bytes(array4(&header[8..12]));
                    let reply_type = u32::from_be_bytes(array4(&header[12..16]));
                    let length_bytes = u32::from_be_bytes(array4(&header[16..20]));
                    if magic != proto::NBD_OPTION_REPLY_MAGIC {
                        return Err(ClientHandshakeError::OptionReplyMagicBad { magic });
                    }
                    if option != proto::NBD_OPT_GO {
                        return Err(ClientHandshakeError::OptionReplyUnexpected {
                            option,
                            expected: proto::NBD_OPT_GO,
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
                    if let Some(step) = self.handle_reply(reply_type, &payload)? {
                        return Ok(step);
                    }
                }
                ClientState::Finished => return Err(ClientHandshakeError::AlreadyFinished),
            }
        }
    }

    fn handle_reply(
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

/// A decoded simple reply header ("Simple reply message"). For a successful `NBD_CMD_READ`,
/// exactly the requested length of data follows; after an error, nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimpleReply {
    pub cookie: u64,
    /// 0 on success, otherwise an `NBD_E*` value ("Error values").
    pub error: u32,
}

#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum ReplyError {
    #[error("reply magic {magic:#010x} is not the simple reply magic")]
    MagicBad { magic: u32 },
    #[error("reply header needs {SIMPLE_REPLY_BYTES} bytes, got {length_bytes}")]
    TooShort { length_bytes: usize },
}

/// Decodes the first [`SIMPLE_REPLY_BYTES`] of `buf`. A structured reply magic is an error here:
/// this client never negotiates structured replies, so the server must not send them.
pub fn parse_simple_reply(buf: &[u8]) -> Result<SimpleReply, ReplyError> {
    let Some(header) = buf.get(..SIMPLE_REPLY_BYTES) else {
        return Err(ReplyError::TooShort {
            length_bytes: buf.len(),
        });
    };
    let magic = u32::from_be_bytes(array4(&header[0..4]));
    if magic != proto::NBD_SIMPLE_REPLY_MAGIC {
        return Err(ReplyError::MagicBad { magic });
    }
    Ok(SimpleReply {
        error: u32::from_be_bytes(array4(&header[4..8])),
        cookie: u64::from_be_bytes(array8(&header[8..16])),
    })
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
    use crate::nbd::transmission::{encode_simple_reply, Errno};

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
        let mut server = Handshake::new(HandshakeLimits::default());
        let mut client = ClientHandshake::new(export_name)?;
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
            Err(ReplyError::TooShort { length_bytes: 15 })
        );
        out[0] ^= 0xff;
        assert!(matches!(
            parse_simple_reply(&out),
            Err(ReplyError::MagicBad { .. })
        ));
    }
}
