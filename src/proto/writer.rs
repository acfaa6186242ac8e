//! The STUN message writer (RFC 8489 5, 14) into a caller-owned, reused buffer, with
//! MESSAGE-INTEGRITY(-SHA256) and FINGERPRINT (RFC 8489 14.5-14.7), and the standard
//! reason phrases (RFC 8489 14.8, RFC 8656 19, RFC 6062 6.3).

use std::net::SocketAddr;

use ring::hmac;

use super::integrity::IntegrityKey;

use super::addr::{encode_address, encode_xor_address};
use super::{
    attr, message_type, Class, TransactionId, ATTR_HEADER_LEN, FINGERPRINT_LEN, FINGERPRINT_XOR,
    HEADER_LEN, MAGIC_COOKIE, MESSAGE_INTEGRITY_LEN, MESSAGE_INTEGRITY_SHA256_LEN,
};

/// Largest message body: the 16-bit length field, kept a multiple of 4 (RFC 8489 5).
const MAX_BODY: usize = 0xFFFC;
/// Longest reason phrase written: fewer than 128 characters, at most 763 bytes
/// (RFC 8489 14.8).
const MAX_REASON_CHARS: usize = 127;
const MAX_REASON_BYTES: usize = 763;

/// Writes a message into a caller-owned, reused `Vec` (cleared by `new`).
///
/// The header length field is kept correct after every call. Attributes are written in
/// call order: add MESSAGE-INTEGRITY(-SHA256) after the attributes it protects, and
/// FINGERPRINT last (RFC 8489 14.5-14.7). An attribute that would push the body past
/// 65532 bytes is truncated (values) or left out (fixed-size attributes); our own
/// messages never come close.
pub struct MessageWriter<'b> {
    buf: &'b mut Vec<u8>,
    tid: TransactionId,
}

impl<'b> MessageWriter<'b> {
    /// Starts a message with the magic cookie (RFC 8489 5).
    pub fn new(buf: &'b mut Vec<u8>, method: u16, class: Class, tid: TransactionId) -> Self {
        buf.clear();
        buf.extend_from_slice(&message_type(method, class).to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf.extend_from_slice(&tid.0);
        MessageWriter { buf, tid }
    }

    /// Starts a classic STUN (RFC 3489) message: a 128-bit transaction ID in bytes 4..20
    /// in place of cookie + ID. Only for answering legacy Binding requests; do not add
    /// XOR addresses, integrity or fingerprint to it.
    pub fn new_rfc3489(buf: &'b mut Vec<u8>, method: u16, class: Class, tid16: [u8; 16]) -> Self {
        buf.clear();
        buf.extend_from_slice(&message_type(method, class).to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&tid16);
        let mut tid = [0u8; 12];
        if let Some(src) = tid16.get(4..) {
            tid.copy_from_slice(src);
        }
        MessageWriter {
            buf,
            tid: TransactionId(tid),
        }
    }

    /// The transaction ID in the header (bytes 8..20).
    pub fn transaction_id(&self) -> TransactionId {
        self.tid
    }

    fn body_len(&self) -> usize {
        self.buf.len().saturating_sub(HEADER_LEN)
    }

    /// Room for an attribute value after a new attribute header, or `None`.
    fn room(&self) -> Option<usize> {
        MAX_BODY.checked_sub(self.body_len() + ATTR_HEADER_LEN)
    }

    /// Sets the header length field to `body` bytes.
    fn write_len(&mut self, body: usize) {
        let len = u16::try_from(body).unwrap_or(u16::MAX).to_be_bytes();
        if let Some(field) = self.buf.get_mut(2..4) {
            field.copy_from_slice(&len);
        }
    }

    fn sync_len(&mut self) {
        self.write_len(self.body_len());
    }

    fn header(&mut self, typ: u16, len: usize) {
        self.buf.extend_from_slice(&typ.to_be_bytes());
        self.buf
            .extend_from_slice(&u16::try_from(len).unwrap_or(0).to_be_bytes());
    }

    fn pad(&mut self, len: usize, pad: u8) {
        let n = (4 - len % 4) % 4;
        self.buf.extend(std::iter::repeat_n(pad, n));
    }

    /// Appends an attribute, padding the value to a multiple of 4 with zeros (RFC 8489 14).
    pub fn attr(&mut self, typ: u16, value: &[u8]) -> &mut Self {
        self.attr_padded_with(typ, value, 0)
    }

    /// Appends an attribute whose padding bytes are `pad` instead of zero. Receivers
    /// ignore padding (RFC 8489 14); RFC 5769's vectors pad with spaces (0x20).
    pub fn attr_padded_with(&mut self, typ: u16, value: &[u8], pad: u8) -> &mut Self {
        let Some(room) = self.room() else {
            return self;
        };
        let value = value.get(..room).unwrap_or(value);
        self.header(typ, value.len());
        self.buf.extend_from_slice(value);
        self.pad(value.len(), pad);
        self.sync_len();
        self
    }

    /// Appends a 4-byte big-endian value (LIFETIME RFC 8656 18.2, PRIORITY, ...).
    pub fn u32_attr(&mut self, typ: u16, v: u32) -> &mut Self {
        self.attr(typ, &v.to_be_bytes())
    }

    fn address_with(&mut self, typ: u16, addr: SocketAddr, xor: bool) -> &mut Self {
        let len = if addr.is_ipv4() { 8 } else { 20 };
        if self.room().is_none_or(|r| r < len) {
            return self;
        }
        self.header(typ, len);
        if xor {
            encode_xor_address(addr, &self.tid, self.buf);
        } else {
            encode_address(addr, self.buf);
        }
        self.sync_len();
        self
    }

    /// Appends an XOR address attribute (XOR-MAPPED-ADDRESS RFC 8489 14.2,
    /// XOR-PEER-ADDRESS RFC 8656 18.3, XOR-RELAYED-ADDRESS RFC 8656 18.5).
    pub fn xor_address(&mut self, typ: u16, addr: SocketAddr) -> &mut Self {
        self.address_with(typ, addr, true)
    }

    /// Appends a plain address attribute (MAPPED-ADDRESS RFC 8489 14.1, and the RFC 3489
    /// / RFC 5780 kinds: SOURCE-ADDRESS, CHANGED-ADDRESS, RESPONSE-ORIGIN, OTHER-ADDRESS).
    pub fn mapped_address(&mut self, typ: u16, addr: SocketAddr) -> &mut Self {
        self.address_with(typ, addr, false)
    }

    /// Appends ERROR-CODE (RFC 8489 14.8): class = code / 100, number = code % 100, then
    /// the reason phrase (cut to 127 characters / 763 bytes).
    pub fn error_code(&mut self, code: u16, reason: &str) -> &mut Self {
        let Some(room) = self.room() else {
            return self;
        };
        // Cut on a character boundary.
        let limit = room.saturating_sub(4).min(MAX_REASON_BYTES);
        let cut = reason
            .char_indices()
            .map(|(i, c)| i + c.len_utf8())
            .take(MAX_REASON_CHARS)
            .take_while(|end| *end <= limit)
            .last()
            .unwrap_or(0);
        let reason = reason.get(..cut).unwrap_or_default();
        let len = 4 + reason.len();
        self.header(attr::ERROR_CODE, len);
        let class = u8::try_from((code / 100) & 0x07).unwrap_or(0);
        let number = u8::try_from(code % 100).unwrap_or(0);
        self.buf.extend_from_slice(&[0, 0, class, number]);
        self.buf.extend_from_slice(reason.as_bytes());
        self.pad(len, 0);
        self.sync_len();
        self
    }

    /// Appends UNKNOWN-ATTRIBUTES (RFC 8489 14.13): the 16-bit types, zero padded.
    pub fn unknown_attributes(&mut self, types: &[u16]) -> &mut Self {
        let Some(room) = self.room() else {
            return self;
        };
        let types = types.get(..room / 2).unwrap_or(types);
        let len = types.len() * 2;
        self.header(attr::UNKNOWN_ATTRIBUTES, len);
        for t in types {
            self.buf.extend_from_slice(&t.to_be_bytes());
        }
        self.pad(len, 0);
        self.sync_len();
        self
    }

    /// Appends MESSAGE-INTEGRITY (HMAC-SHA1 over the message so far, header length
    /// counting this attribute; RFC 8489 14.5). `key` is the short-term password or the
    /// long-term key MD5(username ":" realm ":" password).
    pub fn message_integrity(&mut self, key: &[u8]) -> &mut Self {
        self.message_integrity_with(&IntegrityKey::new(key))
    }

    /// [`MessageWriter::message_integrity`] with a key whose HMAC pads are already computed.
    pub fn message_integrity_with(&mut self, key: &IntegrityKey) -> &mut Self {
        if self.room().is_none_or(|r| r < MESSAGE_INTEGRITY_LEN) {
            return self;
        }
        self.write_len(self.body_len() + ATTR_HEADER_LEN + MESSAGE_INTEGRITY_LEN);
        let tag = hmac::sign(&key.0, self.buf);
        self.header(attr::MESSAGE_INTEGRITY, MESSAGE_INTEGRITY_LEN);
        self.buf.extend_from_slice(tag.as_ref());
        self.sync_len();
        self
    }

    /// Appends MESSAGE-INTEGRITY-SHA256 (full 32-byte HMAC-SHA256, RFC 8489 14.6).
    pub fn message_integrity_sha256(&mut self, key: &[u8]) -> &mut Self {
        if self.room().is_none_or(|r| r < MESSAGE_INTEGRITY_SHA256_LEN) {
            return self;
        }
        let key = hmac::Key::new(hmac::HMAC_SHA256, key);
        self.write_len(self.body_len() + ATTR_HEADER_LEN + MESSAGE_INTEGRITY_SHA256_LEN);
        let tag = hmac::sign(&key, self.buf);
        self.header(attr::MESSAGE_INTEGRITY_SHA256, MESSAGE_INTEGRITY_SHA256_LEN);
        self.buf.extend_from_slice(tag.as_ref());
        self.sync_len();
        self
    }

    /// Appends FINGERPRINT (CRC-32 of the message so far XOR 0x5354554e, header length
    /// counting this attribute; RFC 8489 14.7). Must be the last attribute.
    pub fn fingerprint(&mut self) -> &mut Self {
        if self.room().is_none_or(|r| r < FINGERPRINT_LEN) {
            return self;
        }
        self.write_len(self.body_len() + ATTR_HEADER_LEN + FINGERPRINT_LEN);
        let crc = crc32fast::hash(self.buf) ^ FINGERPRINT_XOR;
        self.header(attr::FINGERPRINT, FINGERPRINT_LEN);
        self.buf.extend_from_slice(&crc.to_be_bytes());
        self.sync_len();
        self
    }

    /// Total message length in bytes (the header length field is already correct).
    pub fn finish(self) -> usize {
        self.buf.len()
    }
}

/// The standard reason phrase of an error code (RFC 8489 14.8, RFC 8656 19,
/// RFC 6062 6.3); "Error" for codes not listed.
pub fn reason_phrase(code: u16) -> &'static str {
    match code {
        300 => "Try Alternate",                  // RFC 8489 14.8
        400 => "Bad Request",                    // RFC 8489 14.8
        401 => "Unauthorized",                   // RFC 8489 14.8
        403 => "Forbidden",                      // RFC 8656 19
        405 => "Mobility Forbidden",             // RFC 8656 19
        420 => "Unknown Attribute",              // RFC 8489 14.8
        437 => "Allocation Mismatch",            // RFC 8656 19
        438 => "Stale Nonce",                    // RFC 8489 14.8
        440 => "Address Family not Supported",   // RFC 8656 19
        441 => "Wrong Credentials",              // RFC 8656 19
        442 => "Unsupported Transport Protocol", // RFC 8656 19
        443 => "Peer Address Family Mismatch",   // RFC 8656 19
        446 => "Connection Already Exists",      // RFC 6062 6.3
        447 => "Connection Timeout or Failure",  // RFC 6062 6.3
        486 => "Allocation Quota Reached",       // RFC 8656 19
        500 => "Server Error",                   // RFC 8489 14.8
        508 => "Insufficient Capacity",          // RFC 8656 19
        _ => "Error",
    }
}
