//! Wire formats only, zero-copy: the STUN message codec (RFC 8489, with the TURN
//! attributes of RFC 8656 / RFC 6062 / RFC 6156), MESSAGE-INTEGRITY(-SHA256) and
//! FINGERPRINT, ChannelData (RFC 8656 12.4), first-byte demultiplexing (RFC 7983) and
//! stream framing (RFC 8656 12.5 / RFC 6062).
//!
//! This module owns no state and does no I/O. Parsing borrows the received bytes
//! ([`Message`]) and never allocates or panics, whatever the input; writing goes into a
//! caller-owned, reused `Vec` ([`MessageWriter`]).
//!
//! Layout: `message` ([`Message`]: reader, integrity checks), `writer`
//! ([`MessageWriter`], [`reason_phrase`]), `addr` (address value codecs), `channel`
//! (ChannelData, demultiplexing), `framing` ([`next_frame`]), [`attr`] (attribute
//! type registry), [`method`] (method registry), [`proxy`] (the PROXY protocol header a
//! load balancer puts before a TCP or TLS stream).

pub mod attr;

mod addr;
mod channel;
mod framing;
mod integrity;
mod message;
pub mod proxy;
mod writer;

#[cfg(test)]
mod tests;

pub use addr::{decode_address, decode_xor_address, encode_address, encode_xor_address};
pub use channel::{
    is_channel_data, is_stun, parse_channel_data, write_channel_data_header, CHANNEL_DATA_HEADER,
};
pub use framing::{next_frame, Frame};
pub use integrity::IntegrityKey;
pub use message::{AttrIter, Message, MAX_NONCE_LEN, MAX_REALM_LEN, MAX_USERNAME_LEN};
pub use proxy::{parse_proxy_header, ProxyAddresses, ProxyHeader};
pub use writer::{reason_phrase, MessageWriter};

/// The magic cookie, bytes 4..8 of every RFC 5389/8489 message header (RFC 8489 5).
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Length of the STUN message header (RFC 8489 5).
pub const HEADER_LEN: usize = 20;
/// Length of an attribute's type + length header (RFC 8489 14).
pub const ATTR_HEADER_LEN: usize = 4;
/// XORed into the CRC-32 of the FINGERPRINT attribute (RFC 8489 14.7).
pub const FINGERPRINT_XOR: u32 = 0x5354_554e;
/// Value length of MESSAGE-INTEGRITY, an HMAC-SHA1 (RFC 8489 14.5).
pub const MESSAGE_INTEGRITY_LEN: usize = 20;
/// Full (untruncated) value length of MESSAGE-INTEGRITY-SHA256 (RFC 8489 14.6).
pub const MESSAGE_INTEGRITY_SHA256_LEN: usize = 32;
/// Value length of FINGERPRINT (RFC 8489 14.7).
pub const FINGERPRINT_LEN: usize = 4;

/// STUN methods (RFC 8489 18.2, RFC 8656 17, RFC 6062 6.1).
pub mod method {
    /// Binding (RFC 8489 18.2).
    pub const BINDING: u16 = 0x001;
    /// Allocate (RFC 8656 17).
    pub const ALLOCATE: u16 = 0x003;
    /// Refresh (RFC 8656 17).
    pub const REFRESH: u16 = 0x004;
    /// Send, indication only (RFC 8656 17).
    pub const SEND: u16 = 0x006;
    /// Data, indication only (RFC 8656 17).
    pub const DATA: u16 = 0x007;
    /// CreatePermission (RFC 8656 17).
    pub const CREATE_PERMISSION: u16 = 0x008;
    /// ChannelBind (RFC 8656 17).
    pub const CHANNEL_BIND: u16 = 0x009;
    /// Connect (RFC 6062 6.1).
    pub const CONNECT: u16 = 0x00A;
    /// ConnectionBind (RFC 6062 6.1).
    pub const CONNECTION_BIND: u16 = 0x00B;
    /// ConnectionAttempt, indication only (RFC 6062 6.1).
    pub const CONNECTION_ATTEMPT: u16 = 0x00C;
}

/// Message class, the C1/C0 bits of the message type (RFC 8489 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// 0b00
    Request,
    /// 0b01
    Indication,
    /// 0b10 (success response)
    Success,
    /// 0b11 (error response)
    Error,
}

impl Class {
    /// The class from the two class bits (C1 C0) as a number 0..=3.
    pub const fn from_bits(bits: u16) -> Class {
        match bits & 0b11 {
            0b00 => Class::Request,
            0b01 => Class::Indication,
            0b10 => Class::Success,
            _ => Class::Error,
        }
    }

    /// The two class bits (C1 C0) as a number 0..=3.
    pub const fn bits(self) -> u16 {
        match self {
            Class::Request => 0b00,
            Class::Indication => 0b01,
            Class::Success => 0b10,
            Class::Error => 0b11,
        }
    }
}

/// Combines a 12-bit method and a class into the 14-bit message type (RFC 8489 5):
/// `M11..M7 C1 M6..M4 C0 M3..M0`. Method bits above 12 are dropped.
pub const fn message_type(method: u16, class: Class) -> u16 {
    let m = method & 0x0FFF;
    let c = class.bits();
    (m & 0x000F) | ((m & 0x0070) << 1) | ((m & 0x0F80) << 2) | ((c & 0b01) << 4) | ((c & 0b10) << 7)
}

/// Splits a message type into (method, class) (RFC 8489 5).
pub const fn split_message_type(typ: u16) -> (u16, Class) {
    let method = (typ & 0x000F) | ((typ & 0x00E0) >> 1) | ((typ & 0x3E00) >> 2);
    let class = ((typ >> 4) & 0b01) | ((typ >> 7) & 0b10);
    (method, Class::from_bits(class))
}

/// The 96-bit transaction ID (RFC 8489 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TransactionId(pub [u8; 12]);

/// Why a datagram or attribute is not acceptable STUN.
///
/// [`ParseError::stun_error_code`] says what to answer: nothing for
/// [`TooShort`](ParseError::TooShort), [`NotStun`](ParseError::NotStun) and
/// [`BadLength`](ParseError::BadLength) (the datagram is silently discarded, RFC 8489 6.3),
/// 400 Bad Request for the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Shorter than the 20-byte header.
    #[error("shorter than a STUN header")]
    TooShort,
    /// Top two bits not zero, or wrong magic cookie (or, for `parse_rfc3489`, the magic
    /// cookie present).
    #[error("not a STUN message")]
    NotStun,
    /// Header length not a multiple of 4, or not equal to the bytes after the header.
    #[error("STUN message length does not match")]
    BadLength,
    /// An attribute overflows the message or lacks its padding, an attribute follows
    /// FINGERPRINT, or MESSAGE-INTEGRITY(-SHA256) / FINGERPRINT has a wrong length.
    #[error("malformed STUN attribute list")]
    BadAttribute,
    /// The attribute of this type is present but its value is malformed (wrong length,
    /// too long, not UTF-8, bad field).
    #[error("malformed value of STUN attribute {0:#06x}")]
    BadValue(u16),
    /// An address value with a wrong length or an unknown address family.
    #[error("malformed STUN address value")]
    BadAddress,
}

impl ParseError {
    /// The STUN error response this error calls for, or `None` when the datagram must be
    /// discarded without an answer (RFC 8489 6.3).
    pub const fn stun_error_code(&self) -> Option<u16> {
        match self {
            ParseError::TooShort | ParseError::NotStun | ParseError::BadLength => None,
            ParseError::BadAttribute | ParseError::BadValue(_) | ParseError::BadAddress => {
                Some(400)
            }
        }
    }
}
