//! The NBD wire format: the fixed newstyle handshake and the transmission phase of the Network
//! Block Device protocol (`doc/proto.md` of NetworkBlockDevice/nbd), server side.
//!
//! This module owns every byte layout of NBD and performs no I/O: no sockets, threads, clocks or
//! allocation beyond the output buffers it is handed. Everything is a pure function or a state
//! machine over byte slices, so the NBD session actor only moves bytes between its socket and
//! these functions, and a fuzzer can drive them directly.
//!
//! - [`proto`]: the spec's constants.
//! - [`handshake`]: the option-haggling state machine ([`Handshake`]), which consults an
//!   [`ExportCatalog`] and ends in a [`Negotiated`] export.
//! - [`transmission`]: request header decoding, request validation ([`check_request`]) and reply
//!   encoding (simple replies and structured reply chunks).
//!
//! Invariant: nothing here reads or writes a socket or file; a malformed or hostile byte stream
//! yields an error value (or an NBD error reply), never a panic, and never makes the codec buffer
//! more than its configured limits.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod client;
pub mod handshake;
pub mod proto;
pub mod transmission;

pub use handshake::{
    ExportCatalog, ExportDescription, Handshake, HandshakeError, HandshakeLimits, HandshakeStep,
    Negotiated, BASE_ALLOCATION_CONTEXT_ID,
};
pub use transmission::{
    check_request, check_request_negotiated, encode_block_status, encode_hole_chunk,
    encode_read_data_chunk_header, encode_request_header, encode_simple_reply,
    encode_structured_done, encode_structured_error, encode_structured_error_offset,
    parse_request_header, write_payload_bytes, BlockStatusExtent, Command, Errno, RequestHeader,
    RequestLimits, TransmissionError, REQUEST_HEADER_BYTES,
};
