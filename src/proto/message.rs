//! The STUN message reader: a validated, borrowed view over one received message
//! (RFC 8489 5, 14), its attribute iterator, typed getters, and the
//! MESSAGE-INTEGRITY / MESSAGE-INTEGRITY-SHA256 / FINGERPRINT checks (RFC 8489 14.5-14.7).

use std::net::SocketAddr;

use ring::hmac;

use super::integrity::IntegrityKey;
use subtle::ConstantTimeEq;

use super::addr::{decode_address, decode_xor_address};
use super::{
    attr, split_message_type, Class, ParseError, TransactionId, ATTR_HEADER_LEN, FINGERPRINT_LEN,
    FINGERPRINT_XOR, HEADER_LEN, MAGIC_COOKIE, MESSAGE_INTEGRITY_LEN, MESSAGE_INTEGRITY_SHA256_LEN,
};

/// Longest USERNAME value accepted: "less than 513 bytes" (RFC 5389 15.3; RFC 8489 14.3
/// lowered it to 509 after OpaqueString processing, we keep the older, laxer bound).
pub const MAX_USERNAME_LEN: usize = 512;
/// Longest REALM value accepted: fewer than 128 characters, up to 763 bytes (RFC 8489 14.9).
pub const MAX_REALM_LEN: usize = 763;
/// Longest NONCE value accepted: fewer than 128 characters, up to 763 bytes (RFC 8489 14.10).
pub const MAX_NONCE_LEN: usize = 763;
/// REALM / NONCE / SOFTWARE / reason phrase: fewer than 128 characters (RFC 8489 14).
const MAX_TEXT_CHARS: usize = 127;
/// Bound on the list returned by [`Message::unknown_required`].
const MAX_UNKNOWN: usize = 16;

/// Smallest truncated MESSAGE-INTEGRITY-SHA256 value (RFC 8489 14.6).
const MESSAGE_INTEGRITY_SHA256_MIN: usize = 16;

/// Value padded to a multiple of 4 (RFC 8489 14).
#[inline]
const fn padded(len: usize) -> usize {
    (len + 3) & !3
}

#[inline]
fn be16(b: &[u8], at: usize) -> Option<u16> {
    match b.get(at..at + 2)? {
        [x, y] => Some(u16::from_be_bytes([*x, *y])),
        _ => None,
    }
}

/// A parsed STUN message borrowing the datagram.
///
/// [`Message::parse`] validates: header, top two bits 0, magic cookie, length a multiple
/// of 4 and equal to `buf.len() - 20` (the caller passes exactly one message), every
/// attribute TLV fits with its padding. Attributes after MESSAGE-INTEGRITY are ignored
/// except MESSAGE-INTEGRITY-SHA256 and FINGERPRINT; after MESSAGE-INTEGRITY-SHA256 only
/// FINGERPRINT counts (RFC 8489 14.5/14.6); after FINGERPRINT nothing is allowed.
///
/// Offsets of the integrity attributes are remembered during the single parsing pass;
/// the other getters scan the (small) attribute list lazily. Nothing allocates except
/// [`xor_peer_addresses`](Message::xor_peer_addresses) and
/// [`unknown_required`](Message::unknown_required).
#[derive(Clone, Copy, Debug)]
pub struct Message<'a> {
    buf: &'a [u8],
    /// End of the attributes that count (start of the first MESSAGE-INTEGRITY,
    /// MESSAGE-INTEGRITY-SHA256 or FINGERPRINT, else the end of the message).
    attrs_end: u32,
    /// Offset of the MESSAGE-INTEGRITY attribute header; 0 when absent.
    mi: u32,
    /// Offset of the MESSAGE-INTEGRITY-SHA256 attribute header; 0 when absent.
    mi256: u32,
    /// Offset of the FINGERPRINT attribute header; 0 when absent.
    fp: u32,
    rfc3489: bool,
}

/// Iterator over (type, value without padding) of the attributes that count.
#[derive(Clone, Debug)]
pub struct AttrIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for AttrIter<'a> {
    type Item = (u16, &'a [u8]);

    #[inline]
    fn next(&mut self) -> Option<(u16, &'a [u8])> {
        let (typ, len) = match self.rest {
            [t0, t1, l0, l1, ..] => (
                u16::from_be_bytes([*t0, *t1]),
                usize::from(u16::from_be_bytes([*l0, *l1])),
            ),
            _ => return None,
        };
        // Validated by `parse`; stay panic-free anyway.
        let value = self.rest.get(ATTR_HEADER_LEN..ATTR_HEADER_LEN + len);
        self.rest = self
            .rest
            .get(ATTR_HEADER_LEN + padded(len)..)
            .unwrap_or_default();
        value.map(|v| (typ, v))
    }
}

/// Where the integrity attributes are, from the parsing pass.
struct Layout {
    attrs_end: usize,
    mi: usize,
    mi256: usize,
    fp: usize,
}

fn scan_attributes(buf: &[u8]) -> Result<Layout, ParseError> {
    let end = buf.len();
    let mut l = Layout {
        attrs_end: 0,
        mi: 0,
        mi256: 0,
        fp: 0,
    };
    let mut off = HEADER_LEN;
    while off < end {
        if l.fp != 0 {
            // FINGERPRINT must be the last attribute (RFC 8489 14.7).
            return Err(ParseError::BadAttribute);
        }
        let typ = be16(buf, off).ok_or(ParseError::BadAttribute)?;
        let len = usize::from(be16(buf, off + 2).ok_or(ParseError::BadAttribute)?);
        let next = off + ATTR_HEADER_LEN + padded(len);
        if next > end {
            // Overflows the message, or its padding is missing (RFC 8489 14).
            return Err(ParseError::BadAttribute);
        }
        let first_special = l.mi == 0 && l.mi256 == 0;
        match typ {
            attr::MESSAGE_INTEGRITY if first_special => {
                if len != MESSAGE_INTEGRITY_LEN {
                    return Err(ParseError::BadAttribute);
                }
                l.mi = off;
            }
            attr::MESSAGE_INTEGRITY_SHA256 if l.mi256 == 0 => {
                if !(MESSAGE_INTEGRITY_SHA256_MIN..=MESSAGE_INTEGRITY_SHA256_LEN).contains(&len)
                    || len % 4 != 0
                {
                    return Err(ParseError::BadAttribute);
                }
                l.mi256 = off;
            }
            attr::FINGERPRINT => {
                if len != FINGERPRINT_LEN {
                    return Err(ParseError::BadAttribute);
                }
                l.fp = off;
            }
            // Counted attributes, or ignored after MESSAGE-INTEGRITY(-SHA256).
            _ => {}
        }
        if l.attrs_end == 0 && (l.mi != 0 || l.mi256 != 0 || l.fp != 0) {
            l.attrs_end = off;
        }
        off = next;
    }
    if l.attrs_end == 0 {
        l.attrs_end = end;
    }
    Ok(l)
}

fn parse_with(buf: &[u8], rfc3489: bool) -> Result<Message<'_>, ParseError> {
    let (typ, len, cookie) = match buf {
        [t0, t1, l0, l1, c0, c1, c2, c3, ..] if buf.len() >= HEADER_LEN => (
            u16::from_be_bytes([*t0, *t1]),
            usize::from(u16::from_be_bytes([*l0, *l1])),
            u32::from_be_bytes([*c0, *c1, *c2, *c3]),
        ),
        _ => return Err(ParseError::TooShort),
    };
    // Top two bits zero (RFC 8489 5); cookie present, or absent for RFC 3489.
    if typ & 0xC000 != 0 || (cookie == MAGIC_COOKIE) == rfc3489 {
        return Err(ParseError::NotStun);
    }
    if len % 4 != 0 || HEADER_LEN + len != buf.len() {
        return Err(ParseError::BadLength);
    }
    let l = scan_attributes(buf)?;
    // The message is at most 20 + 0xFFFF bytes, so every offset fits in u32.
    let off = |x: usize| u32::try_from(x).unwrap_or(0);
    Ok(Message {
        buf,
        attrs_end: off(l.attrs_end),
        mi: off(l.mi),
        mi256: off(l.mi256),
        fp: off(l.fp),
        rfc3489,
    })
}

/// A UTF-8 text value within a byte bound and a character bound (RFC 8489 14).
fn text(value: &[u8], typ: u16, max_bytes: usize, max_chars: usize) -> Result<&str, ParseError> {
    if value.len() > max_bytes {
        return Err(ParseError::BadValue(typ));
    }
    let s = std::str::from_utf8(value).map_err(|_| ParseError::BadValue(typ))?;
    if s.len() > max_chars && s.chars().count() > max_chars {
        return Err(ParseError::BadValue(typ));
    }
    Ok(s)
}

impl<'a> Message<'a> {
    /// Parses and validates one STUN message (RFC 8489 5, 14); `buf` must be exactly the
    /// message. One pass over the attribute headers, no allocation.
    pub fn parse(buf: &'a [u8]) -> Result<Message<'a>, ParseError> {
        parse_with(buf, false)
    }

    /// Parses a classic STUN (RFC 3489) message: a header whose bytes 4..8 are NOT the
    /// magic cookie; the transaction ID is then bytes 4..20
    /// ([`transaction_id_rfc3489`](Message::transaction_id_rfc3489)). The same length and
    /// attribute checks as [`parse`](Message::parse). Only used to answer legacy Binding
    /// requests (RFC 8489 12).
    pub fn parse_rfc3489(buf: &'a [u8]) -> Result<Message<'a>, ParseError> {
        parse_with(buf, true)
    }

    /// Parsed by [`parse_rfc3489`](Message::parse_rfc3489) (no magic cookie).
    #[inline]
    pub fn is_rfc3489(&self) -> bool {
        self.rfc3489
    }

    /// The 14-bit message type (RFC 8489 5).
    #[inline]
    pub fn message_type(&self) -> u16 {
        be16(self.buf, 0).unwrap_or(0) & 0x3FFF
    }

    /// The 12-bit method (RFC 8489 5).
    #[inline]
    pub fn method(&self) -> u16 {
        split_message_type(self.message_type()).0
    }

    /// The class (RFC 8489 5).
    #[inline]
    pub fn class(&self) -> Class {
        split_message_type(self.message_type()).1
    }

    /// Bytes 8..20 of the header (RFC 8489 5). For RFC 3489 messages these are the last
    /// 12 of the 16 transaction ID bytes.
    #[inline]
    pub fn transaction_id(&self) -> TransactionId {
        let mut t = [0u8; 12];
        if let Some(src) = self.buf.get(8..HEADER_LEN) {
            t.copy_from_slice(src);
        }
        TransactionId(t)
    }

    /// Bytes 4..20 of the header: the 128-bit transaction ID of RFC 3489 (for RFC 5389+
    /// messages this is the magic cookie followed by the transaction ID).
    pub fn transaction_id_rfc3489(&self) -> [u8; 16] {
        let mut t = [0u8; 16];
        if let Some(src) = self.buf.get(4..HEADER_LEN) {
            t.copy_from_slice(src);
        }
        t
    }

    /// The whole message as received.
    #[inline]
    pub fn raw(&self) -> &'a [u8] {
        self.buf
    }

    /// Attributes that count (before MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256 and
    /// FINGERPRINT), in wire order: (type, value without padding).
    #[inline]
    pub fn attributes(&self) -> AttrIter<'a> {
        AttrIter {
            rest: self
                .buf
                .get(HEADER_LEN..self.attrs_end as usize)
                .unwrap_or_default(),
        }
    }

    /// First attribute of this type that counts.
    #[inline]
    pub fn get(&self, typ: u16) -> Option<&'a [u8]> {
        self.attributes().find(|(t, _)| *t == typ).map(|(_, v)| v)
    }

    /// Whether an attribute of this type counts in this message. MESSAGE-INTEGRITY,
    /// MESSAGE-INTEGRITY-SHA256 and FINGERPRINT are reported too.
    pub fn has(&self, typ: u16) -> bool {
        match typ {
            attr::MESSAGE_INTEGRITY => self.mi != 0,
            attr::MESSAGE_INTEGRITY_SHA256 => self.mi256 != 0,
            attr::FINGERPRINT => self.fp != 0,
            _ => self.get(typ).is_some(),
        }
    }

    /// Comprehension-required (type < 0x8000) attributes that `known` says we don't
    /// understand, for a 420 response's UNKNOWN-ATTRIBUTES (RFC 8489 6.3.1); without
    /// duplicates and bounded (at most 16 kept).
    pub fn unknown_required(&self, known: impl Fn(u16) -> bool) -> Vec<u16> {
        let mut out = Vec::new();
        for (t, _) in self.attributes() {
            if attr::is_comprehension_required(t) && !known(t) && !out.contains(&t) {
                if out.len() == MAX_UNKNOWN {
                    break;
                }
                out.push(t);
            }
        }
        out
    }

    /// USERNAME (RFC 8489 14.3): UTF-8, at most [`MAX_USERNAME_LEN`] bytes.
    pub fn username(&self) -> Result<Option<&'a str>, ParseError> {
        self.get(attr::USERNAME)
            .map(|v| text(v, attr::USERNAME, MAX_USERNAME_LEN, usize::MAX))
            .transpose()
    }

    /// REALM (RFC 8489 14.9): UTF-8, fewer than 128 characters.
    pub fn realm(&self) -> Result<Option<&'a str>, ParseError> {
        self.get(attr::REALM)
            .map(|v| text(v, attr::REALM, MAX_REALM_LEN, MAX_TEXT_CHARS))
            .transpose()
    }

    /// NONCE (RFC 8489 14.10): UTF-8, fewer than 128 characters.
    pub fn nonce(&self) -> Result<Option<&'a str>, ParseError> {
        self.get(attr::NONCE)
            .map(|v| text(v, attr::NONCE, MAX_NONCE_LEN, MAX_TEXT_CHARS))
            .transpose()
    }

    /// SOFTWARE (RFC 8489 14.14): UTF-8, fewer than 128 characters.
    pub fn software(&self) -> Result<Option<&'a str>, ParseError> {
        self.get(attr::SOFTWARE)
            .map(|v| text(v, attr::SOFTWARE, 763, MAX_TEXT_CHARS))
            .transpose()
    }

    fn fixed<const N: usize>(&self, typ: u16) -> Result<Option<[u8; N]>, ParseError> {
        self.get(typ)
            .map(|v| <[u8; N]>::try_from(v).map_err(|_| ParseError::BadValue(typ)))
            .transpose()
    }

    /// LIFETIME in seconds (RFC 8656 18.2).
    pub fn lifetime(&self) -> Result<Option<u32>, ParseError> {
        Ok(self.fixed::<4>(attr::LIFETIME)?.map(u32::from_be_bytes))
    }

    /// REQUESTED-TRANSPORT protocol number, 17 UDP or 6 TCP (RFC 8656 18.8; RFC 6062 6.2).
    pub fn requested_transport(&self) -> Result<Option<u8>, ParseError> {
        Ok(self
            .fixed::<4>(attr::REQUESTED_TRANSPORT)?
            .map(|[proto, ..]| proto))
    }

    /// CHANNEL-NUMBER (RFC 8656 18.1); the range is not checked here.
    pub fn channel_number(&self) -> Result<Option<u16>, ParseError> {
        Ok(self
            .fixed::<4>(attr::CHANNEL_NUMBER)?
            .map(|[c0, c1, ..]| u16::from_be_bytes([c0, c1])))
    }

    /// DATA (RFC 8656 18.4).
    #[inline]
    pub fn data(&self) -> Option<&'a [u8]> {
        self.get(attr::DATA)
    }

    /// All XOR-PEER-ADDRESS attributes (RFC 8656 18.3), decoded; Err if any is malformed.
    /// Allocates: control path only (CreatePermission).
    pub fn xor_peer_addresses(&self) -> Result<Vec<SocketAddr>, ParseError> {
        let tid = self.transaction_id();
        self.attributes()
            .filter(|(t, _)| *t == attr::XOR_PEER_ADDRESS)
            .map(|(_, v)| decode_xor_address(v, &tid))
            .collect()
    }

    /// The first XOR-PEER-ADDRESS (RFC 8656 18.3), no allocation (hot path: Send
    /// indication).
    #[inline]
    pub fn xor_peer_address(&self) -> Result<Option<SocketAddr>, ParseError> {
        self.xor_address(attr::XOR_PEER_ADDRESS)
    }

    /// The first attribute of this type decoded as an XOR address (RFC 8489 14.2).
    pub fn xor_address(&self, typ: u16) -> Result<Option<SocketAddr>, ParseError> {
        self.get(typ)
            .map(|v| decode_xor_address(v, &self.transaction_id()))
            .transpose()
    }

    /// The first attribute of this type decoded as a plain address (RFC 8489 14.1).
    pub fn address(&self, typ: u16) -> Result<Option<SocketAddr>, ParseError> {
        self.get(typ).map(decode_address).transpose()
    }

    /// EVEN-PORT (RFC 8656 18.7): `Some(R bit)`. One byte on the wire; four (a padded
    /// encoding some stacks use) is tolerated.
    pub fn even_port(&self) -> Result<Option<bool>, ParseError> {
        match self.get(attr::EVEN_PORT) {
            None => Ok(None),
            Some([b]) | Some([b, _, _, _]) => Ok(Some(b & 0x80 != 0)),
            Some(_) => Err(ParseError::BadValue(attr::EVEN_PORT)),
        }
    }

    /// RESERVATION-TOKEN (RFC 8656 18.10).
    pub fn reservation_token(&self) -> Result<Option<[u8; 8]>, ParseError> {
        self.fixed::<8>(attr::RESERVATION_TOKEN)
    }

    /// REQUESTED-ADDRESS-FAMILY family byte, 0x01 IPv4 / 0x02 IPv6 (RFC 8656 18.6).
    /// Other values are returned as they are: the core answers 440.
    pub fn requested_address_family(&self) -> Result<Option<u8>, ParseError> {
        Ok(self
            .fixed::<4>(attr::REQUESTED_ADDRESS_FAMILY)?
            .map(|[f, ..]| f))
    }

    /// ADDITIONAL-ADDRESS-FAMILY family byte (RFC 8656 18.11).
    pub fn additional_address_family(&self) -> Result<Option<u8>, ParseError> {
        Ok(self
            .fixed::<4>(attr::ADDITIONAL_ADDRESS_FAMILY)?
            .map(|[f, ..]| f))
    }

    /// ERROR-CODE (RFC 8489 14.8): (code 300..=699, reason phrase).
    pub fn error_code(&self) -> Result<Option<(u16, &'a str)>, ParseError> {
        const T: u16 = attr::ERROR_CODE;
        let Some(v) = self.get(T) else {
            return Ok(None);
        };
        let [_, _, class, number, reason @ ..] = v else {
            return Err(ParseError::BadValue(T));
        };
        let class = u16::from(class & 0x07);
        let number = u16::from(*number);
        if !(3..=6).contains(&class) || number > 99 {
            return Err(ParseError::BadValue(T));
        }
        let reason = text(reason, T, 763, MAX_TEXT_CHARS)?;
        Ok(Some((class * 100 + number, reason)))
    }

    /// MESSAGE-INTEGRITY or MESSAGE-INTEGRITY-SHA256 present.
    #[inline]
    pub fn has_message_integrity(&self) -> bool {
        self.mi != 0 || self.mi256 != 0
    }

    /// FINGERPRINT present.
    #[inline]
    pub fn has_fingerprint(&self) -> bool {
        self.fp != 0
    }

    /// Verifies MESSAGE-INTEGRITY-SHA256 if present, else MESSAGE-INTEGRITY
    /// (HMAC-SHA1), over the message as RFC 8489 14.5 says (length field adjusted).
    /// Constant-time compare. `false` if neither is present.
    pub fn verify_integrity(&self, key: &[u8]) -> bool {
        if self.mi256 != 0 {
            self.verify_integrity_sha256(key)
        } else {
            self.verify_integrity_sha1(key)
        }
    }

    /// Feeds the message up to the attribute at `at`, with the header length field
    /// set as if that attribute (value length `vlen`) ended the message (RFC 8489 14.5).
    fn mac_input(&self, at: usize, vlen: usize, mut update: impl FnMut(&[u8])) -> Option<()> {
        let len = u16::try_from(at + ATTR_HEADER_LEN + vlen - HEADER_LEN).ok()?;
        update(self.buf.get(..2)?);
        update(&len.to_be_bytes());
        update(self.buf.get(4..at)?);
        Some(())
    }

    /// Verifies MESSAGE-INTEGRITY (HMAC-SHA1, RFC 8489 14.5) only. `false` if absent.
    pub fn verify_integrity_sha1(&self, key: &[u8]) -> bool {
        self.verify_integrity_sha1_with(&IntegrityKey::new(key))
    }

    /// [`Message::verify_integrity_sha1`] with a key whose HMAC pads are already
    /// computed, so that verifying a request and signing its answer hash them once.
    pub fn verify_integrity_sha1_with(&self, key: &IntegrityKey) -> bool {
        let at = self.mi as usize;
        if at == 0 {
            return false;
        }
        let mut mac = hmac::Context::with_key(&key.0);
        let v = at + ATTR_HEADER_LEN;
        match (
            self.mac_input(at, MESSAGE_INTEGRITY_LEN, |b| mac.update(b)),
            self.buf.get(v..v + MESSAGE_INTEGRITY_LEN),
        ) {
            (Some(()), Some(tag)) => bool::from(mac.sign().as_ref().ct_eq(tag)),
            _ => false,
        }
    }

    /// Verifies MESSAGE-INTEGRITY-SHA256 (HMAC-SHA256, possibly truncated to 16..32
    /// bytes, RFC 8489 14.6) only. `false` if absent.
    pub fn verify_integrity_sha256(&self, key: &[u8]) -> bool {
        let at = self.mi256 as usize;
        if at == 0 {
            return false;
        }
        let key = hmac::Key::new(hmac::HMAC_SHA256, key);
        let mut mac = hmac::Context::with_key(&key);
        let Some(vlen) = be16(self.buf, at + 2).map(usize::from) else {
            return false;
        };
        let v = at + ATTR_HEADER_LEN;
        match (
            self.mac_input(at, vlen, |b| mac.update(b)),
            self.buf.get(v..v + vlen),
        ) {
            // A truncated tag keeps the leftmost bytes; the parser allows 16..=32 of them.
            (Some(()), Some(tag)) => mac
                .sign()
                .as_ref()
                .get(..tag.len())
                .is_some_and(|full| bool::from(full.ct_eq(tag))),
            _ => false,
        }
    }

    /// `None` if no FINGERPRINT, `Some(ok)` otherwise (RFC 8489 14.7).
    pub fn verify_fingerprint(&self) -> Option<bool> {
        let at = self.fp as usize;
        if at == 0 {
            return None;
        }
        let covered = self.buf.get(..at)?;
        let value = self
            .buf
            .get(at + ATTR_HEADER_LEN..at + ATTR_HEADER_LEN + FINGERPRINT_LEN)?;
        let expected = (crc32fast::hash(covered) ^ FINGERPRINT_XOR).to_be_bytes();
        Some(value == expected)
    }
}
