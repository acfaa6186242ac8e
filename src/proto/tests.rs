//! Unit tests of the codec: the RFC 5769 test vectors (parse, verify, and byte-exact
//! re-encoding), malformed input, getters, ChannelData and stream framing.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use md5::{Digest, Md5};

use super::*;

// ---------------------------------------------------------------------------------------
// RFC 5769 test vectors

/// RFC 5769 2.1: Binding request, short-term credentials, FINGERPRINT. Padding of
/// USERNAME is 0x20 (spaces), as in the RFC.
const RFC5769_REQUEST: [u8; 108] = [
    0x00, 0x01, 0x00, 0x58, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86,
    0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x10, 0x53, 0x54, 0x55, 0x4e, 0x20, 0x74, 0x65, 0x73,
    0x74, 0x20, 0x63, 0x6c, 0x69, 0x65, 0x6e, 0x74, 0x00, 0x24, 0x00, 0x04, 0x6e, 0x00, 0x01, 0xff,
    0x80, 0x29, 0x00, 0x08, 0x93, 0x2f, 0xf9, 0xb1, 0x51, 0x26, 0x3b, 0x36, 0x00, 0x06, 0x00, 0x09,
    0x65, 0x76, 0x74, 0x6a, 0x3a, 0x68, 0x36, 0x76, 0x59, 0x20, 0x20, 0x20, 0x00, 0x08, 0x00, 0x14,
    0x9a, 0xea, 0xa7, 0x0c, 0xbf, 0xd8, 0xcb, 0x56, 0x78, 0x1e, 0xf2, 0xb5, 0xb2, 0xd3, 0xf2, 0x49,
    0xc1, 0xb5, 0x71, 0xa2, 0x80, 0x28, 0x00, 0x04, 0xe5, 0x7a, 0x3b, 0xcf,
];

/// RFC 5769 2.2: Binding success response, IPv4 XOR-MAPPED-ADDRESS.
const RFC5769_RESPONSE_V4: [u8; 80] = [
    0x01, 0x01, 0x00, 0x3c, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86,
    0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76, 0x65, 0x63,
    0x74, 0x6f, 0x72, 0x20, 0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43,
    0x00, 0x08, 0x00, 0x14, 0x2b, 0x91, 0xf5, 0x99, 0xfd, 0x9e, 0x90, 0xc3, 0x8c, 0x74, 0x89, 0xf9,
    0x2a, 0xf9, 0xba, 0x53, 0xf0, 0x6b, 0xe7, 0xd7, 0x80, 0x28, 0x00, 0x04, 0xc0, 0x7d, 0x4c, 0x96,
];

/// RFC 5769 2.3: Binding success response, IPv6 XOR-MAPPED-ADDRESS.
const RFC5769_RESPONSE_V6: [u8; 92] = [
    0x01, 0x01, 0x00, 0x48, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86,
    0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76, 0x65, 0x63,
    0x74, 0x6f, 0x72, 0x20, 0x00, 0x20, 0x00, 0x14, 0x00, 0x02, 0xa1, 0x47, 0x01, 0x13, 0xa9, 0xfa,
    0xa5, 0xd3, 0xf1, 0x79, 0xbc, 0x25, 0xf4, 0xb5, 0xbe, 0xd2, 0xb9, 0xd9, 0x00, 0x08, 0x00, 0x14,
    0xa3, 0x82, 0x95, 0x4e, 0x4b, 0xe6, 0x7b, 0xf1, 0x17, 0x84, 0xc9, 0x7c, 0x82, 0x92, 0xc2, 0x75,
    0xbf, 0xe3, 0xed, 0x41, 0x80, 0x28, 0x00, 0x04, 0xc8, 0xfb, 0x0b, 0x4c,
];

/// RFC 5769 2.4: Binding request with long-term authentication (no FINGERPRINT).
const RFC5769_REQUEST_LONG_TERM: [u8; 116] = [
    0x00, 0x01, 0x00, 0x60, 0x21, 0x12, 0xa4, 0x42, 0x78, 0xad, 0x34, 0x33, 0xc6, 0xad, 0x72, 0xc0,
    0x29, 0xda, 0x41, 0x2e, 0x00, 0x06, 0x00, 0x12, 0xe3, 0x83, 0x9e, 0xe3, 0x83, 0x88, 0xe3, 0x83,
    0xaa, 0xe3, 0x83, 0x83, 0xe3, 0x82, 0xaf, 0xe3, 0x82, 0xb9, 0x00, 0x00, 0x00, 0x15, 0x00, 0x1c,
    0x66, 0x2f, 0x2f, 0x34, 0x39, 0x39, 0x6b, 0x39, 0x35, 0x34, 0x64, 0x36, 0x4f, 0x4c, 0x33, 0x34,
    0x6f, 0x4c, 0x39, 0x46, 0x53, 0x54, 0x76, 0x79, 0x36, 0x34, 0x73, 0x41, 0x00, 0x14, 0x00, 0x0b,
    0x65, 0x78, 0x61, 0x6d, 0x70, 0x6c, 0x65, 0x2e, 0x6f, 0x72, 0x67, 0x00, 0x00, 0x08, 0x00, 0x14,
    0xf6, 0x70, 0x24, 0x65, 0x6d, 0xd6, 0x4a, 0x3e, 0x02, 0xb8, 0xe0, 0x71, 0x2e, 0x85, 0xc9, 0xa2,
    0x8c, 0xa8, 0x96, 0x66,
];

/// Short-term password of RFC 5769 2.1-2.3.
const RFC5769_PASSWORD: &[u8] = b"VOkJxbRl1RmTxUk/WvJxBt";
/// Transaction ID of RFC 5769 2.1-2.3.
const RFC5769_TID: TransactionId = TransactionId([
    0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
]);
/// RFC 5769 2.4 username: U+30DE U+30C8 U+30EA U+30C3 U+30AF U+30B9.
const RFC5769_USERNAME: &str = "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}";
const RFC5769_NONCE: &str = "f//499k954d6OL34oL9FSTvy64sA";
const RFC5769_REALM: &str = "example.org";

/// RFC 5769 2.4 long-term key: MD5(username ":" realm ":" SASLprep(password)), the
/// SASLprep'd password being "TheMatrIX".
fn rfc5769_long_term_key() -> [u8; 16] {
    let mut h = Md5::new();
    h.update(format!("{RFC5769_USERNAME}:{RFC5769_REALM}:TheMatrIX").as_bytes());
    h.finalize().into()
}

fn types(m: &Message<'_>) -> Vec<u16> {
    m.attributes().map(|(t, _)| t).collect()
}

#[test]
fn rfc5769_sample_request() {
    let m = Message::parse(&RFC5769_REQUEST).unwrap();
    assert_eq!(m.method(), method::BINDING);
    assert_eq!(m.class(), Class::Request);
    assert_eq!(m.transaction_id(), RFC5769_TID);
    assert!(!m.is_rfc3489());
    assert_eq!(
        types(&m),
        [
            attr::SOFTWARE,
            attr::PRIORITY,
            attr::ICE_CONTROLLED,
            attr::USERNAME
        ]
    );
    assert_eq!(m.software().unwrap(), Some("STUN test client"));
    assert_eq!(m.get(attr::PRIORITY), Some(&[0x6e, 0x00, 0x01, 0xff][..]));
    assert_eq!(
        m.get(attr::ICE_CONTROLLED),
        Some(&[0x93, 0x2f, 0xf9, 0xb1, 0x51, 0x26, 0x3b, 0x36][..])
    );
    assert_eq!(m.username().unwrap(), Some("evtj:h6vY"));
    assert!(m.has_message_integrity());
    assert!(m.has(attr::MESSAGE_INTEGRITY));
    assert!(!m.has(attr::MESSAGE_INTEGRITY_SHA256));
    assert!(m.verify_integrity(RFC5769_PASSWORD));
    assert!(m.verify_integrity_sha1(RFC5769_PASSWORD));
    assert!(!m.verify_integrity_sha256(RFC5769_PASSWORD));
    assert!(!m.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBT"));
    assert!(m.has_fingerprint());
    assert_eq!(m.verify_fingerprint(), Some(true));
    assert_eq!(
        m.unknown_required(|_| false),
        [attr::PRIORITY, attr::USERNAME]
    );
}

#[test]
fn rfc5769_sample_request_reencoded() {
    let mut buf = Vec::new();
    let mut w = MessageWriter::new(&mut buf, method::BINDING, Class::Request, RFC5769_TID);
    w.attr(attr::SOFTWARE, b"STUN test client")
        .u32_attr(attr::PRIORITY, 0x6e00_01ff)
        .attr(
            attr::ICE_CONTROLLED,
            &0x932f_f9b1_5126_3b36u64.to_be_bytes(),
        )
        .attr_padded_with(attr::USERNAME, b"evtj:h6vY", b' ')
        .message_integrity(RFC5769_PASSWORD)
        .fingerprint();
    assert_eq!(w.finish(), RFC5769_REQUEST.len());
    assert_eq!(buf, RFC5769_REQUEST);

    // With zero padding (our default) the MAC differs; libwebrtc's stun_unittest.cc
    // (kCalculatedHmac1) records the value.
    let mut w = MessageWriter::new(&mut buf, method::BINDING, Class::Request, RFC5769_TID);
    w.attr(attr::SOFTWARE, b"STUN test client")
        .u32_attr(attr::PRIORITY, 0x6e00_01ff)
        .attr(
            attr::ICE_CONTROLLED,
            &0x932f_f9b1_5126_3b36u64.to_be_bytes(),
        )
        .attr(attr::USERNAME, b"evtj:h6vY")
        .message_integrity(RFC5769_PASSWORD);
    w.finish();
    let m = Message::parse(&buf).unwrap();
    assert!(m.verify_integrity(RFC5769_PASSWORD));
    assert_eq!(
        buf[buf.len() - 20..],
        [
            0x79, 0x07, 0xc2, 0xd2, 0xed, 0xbf, 0xea, 0x48, 0x0e, 0x4c, 0x76, 0xd8, 0x29, 0x62,
            0xd5, 0xc3, 0x74, 0x2a, 0xf9, 0xe3
        ]
    );
}

#[test]
fn rfc5769_sample_ipv4_response() {
    let m = Message::parse(&RFC5769_RESPONSE_V4).unwrap();
    assert_eq!(m.method(), method::BINDING);
    assert_eq!(m.class(), Class::Success);
    assert_eq!(m.transaction_id(), RFC5769_TID);
    assert_eq!(types(&m), [attr::SOFTWARE, attr::XOR_MAPPED_ADDRESS]);
    assert_eq!(m.software().unwrap(), Some("test vector"));
    let expected: SocketAddr = "192.0.2.1:32853".parse().unwrap();
    assert_eq!(
        m.xor_address(attr::XOR_MAPPED_ADDRESS).unwrap(),
        Some(expected)
    );
    assert!(m.verify_integrity(RFC5769_PASSWORD));
    assert!(!m.verify_integrity(b"wrong"));
    assert_eq!(m.verify_fingerprint(), Some(true));

    let mut buf = Vec::new();
    let mut w = MessageWriter::new(&mut buf, method::BINDING, Class::Success, RFC5769_TID);
    w.attr_padded_with(attr::SOFTWARE, b"test vector", b' ')
        .xor_address(attr::XOR_MAPPED_ADDRESS, expected)
        .message_integrity(RFC5769_PASSWORD)
        .fingerprint();
    assert_eq!(w.finish(), 80);
    assert_eq!(buf, RFC5769_RESPONSE_V4);
}

#[test]
fn rfc5769_sample_ipv6_response() {
    let m = Message::parse(&RFC5769_RESPONSE_V6).unwrap();
    assert_eq!(m.class(), Class::Success);
    assert_eq!(types(&m), [attr::SOFTWARE, attr::XOR_MAPPED_ADDRESS]);
    let expected: SocketAddr = "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
        .parse()
        .unwrap();
    assert_eq!(
        m.xor_address(attr::XOR_MAPPED_ADDRESS).unwrap(),
        Some(expected)
    );
    assert!(m.verify_integrity(RFC5769_PASSWORD));
    assert_eq!(m.verify_fingerprint(), Some(true));

    let mut buf = Vec::new();
    let mut w = MessageWriter::new(&mut buf, method::BINDING, Class::Success, RFC5769_TID);
    w.attr_padded_with(attr::SOFTWARE, b"test vector", b' ')
        .xor_address(attr::XOR_MAPPED_ADDRESS, expected)
        .message_integrity(RFC5769_PASSWORD)
        .fingerprint();
    w.finish();
    assert_eq!(buf, RFC5769_RESPONSE_V6);
}

#[test]
fn rfc5769_sample_request_long_term() {
    let m = Message::parse(&RFC5769_REQUEST_LONG_TERM).unwrap();
    assert_eq!(m.method(), method::BINDING);
    assert_eq!(m.class(), Class::Request);
    assert_eq!(
        m.transaction_id(),
        TransactionId([0x78, 0xad, 0x34, 0x33, 0xc6, 0xad, 0x72, 0xc0, 0x29, 0xda, 0x41, 0x2e])
    );
    assert_eq!(types(&m), [attr::USERNAME, attr::NONCE, attr::REALM]);
    assert_eq!(m.username().unwrap(), Some(RFC5769_USERNAME));
    assert_eq!(m.nonce().unwrap(), Some(RFC5769_NONCE));
    assert_eq!(m.realm().unwrap(), Some(RFC5769_REALM));
    let key = rfc5769_long_term_key();
    assert!(m.verify_integrity(&key));
    assert!(!m.verify_integrity(RFC5769_PASSWORD));
    assert!(!m.has_fingerprint());
    assert_eq!(m.verify_fingerprint(), None);

    // Deterministic and zero-padded: our writer reproduces it byte for byte.
    let mut buf = Vec::new();
    let mut w = MessageWriter::new(
        &mut buf,
        method::BINDING,
        Class::Request,
        m.transaction_id(),
    );
    w.attr(attr::USERNAME, RFC5769_USERNAME.as_bytes())
        .attr(attr::NONCE, RFC5769_NONCE.as_bytes())
        .attr(attr::REALM, RFC5769_REALM.as_bytes())
        .message_integrity(&key);
    w.finish();
    assert_eq!(buf, RFC5769_REQUEST_LONG_TERM);
}

// ---------------------------------------------------------------------------------------
// Malformed input

/// Sets the header length field to match the buffer.
fn fix_len(v: &mut [u8]) {
    let len = u16::try_from(v.len() - HEADER_LEN).unwrap();
    v[2..4].copy_from_slice(&len.to_be_bytes());
}

fn header(typ: u16) -> Vec<u8> {
    let mut v = typ.to_be_bytes().to_vec();
    v.extend_from_slice(&[0, 0]);
    v.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    v.extend_from_slice(&[7; 12]);
    v
}

fn with_attrs(attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut v = header(0x0001);
    for (t, val) in attrs {
        v.extend_from_slice(&t.to_be_bytes());
        v.extend_from_slice(&u16::try_from(val.len()).unwrap().to_be_bytes());
        v.extend_from_slice(val);
        v.resize(v.len().next_multiple_of(4), 0);
    }
    fix_len(&mut v);
    v
}

#[test]
fn truncated_header() {
    for n in 0..HEADER_LEN {
        assert_eq!(
            Message::parse(&RFC5769_REQUEST[..n]).unwrap_err(),
            ParseError::TooShort
        );
        assert_eq!(
            Message::parse_rfc3489(&RFC5769_REQUEST[..n]).unwrap_err(),
            ParseError::TooShort
        );
    }
    // Every truncation of a full message is rejected.
    for n in HEADER_LEN..RFC5769_REQUEST.len() {
        assert_eq!(
            Message::parse(&RFC5769_REQUEST[..n]).unwrap_err(),
            ParseError::BadLength
        );
    }
}

#[test]
fn bad_cookie_and_top_bits() {
    let mut v = RFC5769_REQUEST.to_vec();
    v[4] ^= 1;
    assert_eq!(Message::parse(&v).unwrap_err(), ParseError::NotStun);
    let mut v = RFC5769_REQUEST.to_vec();
    v[0] |= 0x40;
    assert_eq!(Message::parse(&v).unwrap_err(), ParseError::NotStun);
    v[0] = 0x80;
    assert_eq!(Message::parse(&v).unwrap_err(), ParseError::NotStun);
    // ChannelData is not STUN.
    assert_eq!(
        Message::parse(&[0x40, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
            .unwrap_err(),
        ParseError::NotStun
    );
}

#[test]
fn length_checks() {
    // Not a multiple of 4.
    let mut v = header(0x0001);
    v.extend_from_slice(&[0, 0x22, 0, 1, b'x']);
    fix_len(&mut v);
    assert_eq!(Message::parse(&v).unwrap_err(), ParseError::BadLength);
    // Length field larger / smaller than the datagram.
    let mut v = RFC5769_REQUEST.to_vec();
    v.extend_from_slice(&[0; 4]);
    assert_eq!(Message::parse(&v).unwrap_err(), ParseError::BadLength);
    let mut v = RFC5769_REQUEST.to_vec();
    v[3] = 0x5c;
    assert_eq!(Message::parse(&v).unwrap_err(), ParseError::BadLength);
    // Header only is fine.
    let v = header(0x0001);
    let m = Message::parse(&v).unwrap();
    assert_eq!(m.attributes().count(), 0);
    assert!(!m.has_message_integrity());
    assert!(!m.verify_integrity(b"x"));
}

#[test]
fn attribute_overflowing_message() {
    // LIFETIME claiming 8 bytes with only 4 present.
    let mut v = header(0x0003);
    v.extend_from_slice(&[0x00, 0x0D, 0x00, 0x08, 0, 0, 0, 1]);
    fix_len(&mut v);
    assert_eq!(Message::parse(&v).unwrap_err(), ParseError::BadAttribute);
    // Length 0xFFFF.
    let mut v = header(0x0003);
    v.extend_from_slice(&[0x00, 0x13, 0xFF, 0xFF, 0, 0, 0, 1]);
    fix_len(&mut v);
    assert_eq!(Message::parse(&v).unwrap_err(), ParseError::BadAttribute);
}

#[test]
fn missing_padding() {
    // The last attribute's padding is absent and the length counts only its value:
    // not a multiple of 4.
    let mut v = header(0x0001);
    v.extend_from_slice(&[0x00, 0x06, 0x00, 0x05, b'a', b'l', b'i', b'c', b'e']);
    fix_len(&mut v);
    assert_eq!(Message::parse(&v).unwrap_err(), ParseError::BadLength);
    // Length counts the padding, but the value's padding is missing and the next
    // attribute (DATA, 4 bytes) starts right after the value: the padded walk overruns.
    let mut v = header(0x0001);
    v.extend_from_slice(&[0x00, 0x06, 0x00, 0x05, b'a', b'l', b'i', b'c', b'e']);
    v.extend_from_slice(&[0x00, 0x13, 0x00, 0x04, 1, 2, 3, 4]);
    v.extend_from_slice(&[0; 3]);
    fix_len(&mut v);
    assert_eq!(Message::parse(&v).unwrap_err(), ParseError::BadAttribute);
    // The last attribute's padding would lie beyond the message.
    let mut v = header(0x0001);
    v.extend_from_slice(&[0x00, 0x13, 0x00, 0x05, 1, 2, 3, 4]);
    fix_len(&mut v);
    assert_eq!(Message::parse(&v).unwrap_err(), ParseError::BadAttribute);
}

#[test]
fn nothing_after_fingerprint() {
    let mut v = RFC5769_REQUEST.to_vec();
    v.extend_from_slice(&[0x80, 0x22, 0x00, 0x04, b't', b'e', b's', b't']);
    fix_len(&mut v);
    assert_eq!(Message::parse(&v).unwrap_err(), ParseError::BadAttribute);
    // Not even another FINGERPRINT.
    let mut v = RFC5769_REQUEST.to_vec();
    v.extend_from_slice(&RFC5769_REQUEST[100..]);
    fix_len(&mut v);
    assert_eq!(Message::parse(&v).unwrap_err(), ParseError::BadAttribute);
}

#[test]
fn integrity_and_fingerprint_lengths() {
    let bad_mi = with_attrs(&[(attr::MESSAGE_INTEGRITY, &[0; 16])]);
    assert_eq!(
        Message::parse(&bad_mi).unwrap_err(),
        ParseError::BadAttribute
    );
    let bad_fp = with_attrs(&[(attr::FINGERPRINT, &[0; 8])]);
    assert_eq!(
        Message::parse(&bad_fp).unwrap_err(),
        ParseError::BadAttribute
    );
    for n in [0usize, 12, 18, 36] {
        let v = with_attrs(&[(attr::MESSAGE_INTEGRITY_SHA256, &vec![0; n])]);
        assert_eq!(
            Message::parse(&v).unwrap_err(),
            ParseError::BadAttribute,
            "len {n}"
        );
    }
    for n in [16usize, 20, 24, 28, 32] {
        let v = with_attrs(&[(attr::MESSAGE_INTEGRITY_SHA256, &vec![0; n])]);
        let m = Message::parse(&v).unwrap();
        assert!(m.has_message_integrity());
        assert!(!m.verify_integrity(b"key"));
    }
}

#[test]
fn attributes_after_message_integrity_are_ignored() {
    // RFC 5769 2.4 with LIFETIME and a second USERNAME after MESSAGE-INTEGRITY.
    let mut v = RFC5769_REQUEST_LONG_TERM.to_vec();
    v.extend_from_slice(&[0x00, 0x0D, 0x00, 0x04, 0, 0, 0x0e, 0x10]);
    v.extend_from_slice(&[0x00, 0x06, 0x00, 0x04, b'e', b'v', b'i', b'l']);
    v.extend_from_slice(&[0x00, 0x31, 0x00, 0x00]);
    fix_len(&mut v);
    let m = Message::parse(&v).unwrap();
    assert_eq!(types(&m), [attr::USERNAME, attr::NONCE, attr::REALM]);
    assert_eq!(m.lifetime().unwrap(), None);
    assert!(!m.has(attr::LIFETIME));
    assert_eq!(m.username().unwrap(), Some(RFC5769_USERNAME));
    assert!(m.unknown_required(|_| true).is_empty());
    // The MAC covers only what precedes it, with the length adjusted.
    assert!(m.verify_integrity(&rfc5769_long_term_key()));
    // A second MESSAGE-INTEGRITY after the first is ignored too, even malformed.
    let mut v = RFC5769_REQUEST_LONG_TERM.to_vec();
    v.extend_from_slice(&[0x00, 0x08, 0x00, 0x04, 0, 0, 0, 0]);
    fix_len(&mut v);
    let m = Message::parse(&v).unwrap();
    assert!(m.verify_integrity(&rfc5769_long_term_key()));
    // But attributes after MESSAGE-INTEGRITY must still be well-formed.
    let mut v = RFC5769_REQUEST_LONG_TERM.to_vec();
    v.extend_from_slice(&[0x00, 0x0D, 0x00, 0x08, 0, 0, 0x0e, 0x10]);
    fix_len(&mut v);
    assert_eq!(Message::parse(&v).unwrap_err(), ParseError::BadAttribute);
}

#[test]
fn message_integrity_sha256() {
    let key = rfc5769_long_term_key();
    let tid = TransactionId([1; 12]);
    let mut buf = Vec::new();
    let mut w = MessageWriter::new(&mut buf, method::ALLOCATE, Class::Request, tid);
    w.attr(attr::USERNAME, b"user")
        .message_integrity(&key)
        .message_integrity_sha256(&key)
        .fingerprint();
    w.finish();
    let m = Message::parse(&buf).unwrap();
    assert_eq!(types(&m), [attr::USERNAME]);
    assert!(m.has(attr::MESSAGE_INTEGRITY_SHA256));
    assert!(m.verify_integrity_sha1(&key));
    assert!(m.verify_integrity_sha256(&key));
    assert!(m.verify_integrity(&key));
    assert!(!m.verify_integrity(b"other"));
    assert_eq!(m.verify_fingerprint(), Some(true));

    // SHA256 only; then an ignored MESSAGE-INTEGRITY and DATA after it.
    let mut w = MessageWriter::new(&mut buf, method::ALLOCATE, Class::Request, tid);
    w.attr(attr::USERNAME, b"user")
        .message_integrity_sha256(&key)
        .attr(attr::MESSAGE_INTEGRITY, &[0; 20])
        .attr(attr::DATA, b"ignored");
    w.finish();
    let m = Message::parse(&buf).unwrap();
    assert!(!m.has(attr::MESSAGE_INTEGRITY));
    assert!(m.data().is_none());
    assert!(m.verify_integrity(&key));
    assert!(!m.verify_integrity_sha1(&key));

    // Truncated to 16 bytes (RFC 8489 14.6), built by hand.
    let mut v = with_attrs(&[(attr::USERNAME, b"user")]);
    let at = v.len();
    v.extend_from_slice(&[0x00, 0x1C, 0x00, 0x10]);
    let mut covered = v[..at].to_vec();
    covered[2..4].copy_from_slice(&u16::try_from(at + 4 + 16 - 20).unwrap().to_be_bytes());
    let mac = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
        &covered,
    );
    v.extend_from_slice(&mac.as_ref()[..16]);
    fix_len(&mut v);
    let m = Message::parse(&v).unwrap();
    assert!(m.verify_integrity(&key));
    v[at + 4] ^= 1;
    assert!(!Message::parse(&v).unwrap().verify_integrity(&key));
}

#[test]
fn corrupted_integrity_and_fingerprint() {
    for i in HEADER_LEN..RFC5769_REQUEST.len() - 8 {
        let mut v = RFC5769_REQUEST;
        v[i] ^= 0x01;
        match Message::parse(&v) {
            Ok(m) => {
                assert!(!m.verify_integrity(RFC5769_PASSWORD), "byte {i}");
                assert_eq!(m.verify_fingerprint(), Some(false), "byte {i}");
            }
            Err(e) => assert_eq!(e, ParseError::BadAttribute, "byte {i}"),
        }
    }
    let mut v = RFC5769_REQUEST;
    v[107] ^= 0x80;
    let m = Message::parse(&v).unwrap();
    assert_eq!(m.verify_fingerprint(), Some(false));
    assert!(m.verify_integrity(RFC5769_PASSWORD));
}

#[test]
fn unknown_comprehension_required() {
    let v = with_attrs(&[
        (attr::USERNAME, b"u"),
        (0x0031, b""),
        (0xC057, &[0, 0, 3, 0xe7]),
        (attr::LIFETIME, &[0, 0, 0, 1]),
        (0x0031, b"x"),
        (0x7FFF, b""),
    ]);
    let m = Message::parse(&v).unwrap();
    let known = |t: u16| matches!(t, attr::USERNAME | attr::LIFETIME);
    assert_eq!(m.unknown_required(known), [0x0031, 0x7FFF]);
    assert!(m.unknown_required(|_| true).is_empty());
    // Bounded.
    let many: Vec<(u16, &[u8])> = (0x0040..0x0060).map(|t| (t, &b""[..])).collect();
    let v = with_attrs(&many);
    let m = Message::parse(&v).unwrap();
    assert_eq!(m.unknown_required(|_| false).len(), 16);
}

#[test]
fn text_attribute_bounds() {
    let name = vec![b'a'; MAX_USERNAME_LEN];
    let v = with_attrs(&[(attr::USERNAME, &name)]);
    assert_eq!(
        Message::parse(&v)
            .unwrap()
            .username()
            .unwrap()
            .map(str::len),
        Some(512)
    );
    let name = vec![b'a'; MAX_USERNAME_LEN + 1];
    let v = with_attrs(&[(attr::USERNAME, &name)]);
    assert_eq!(
        Message::parse(&v).unwrap().username().unwrap_err(),
        ParseError::BadValue(attr::USERNAME)
    );
    let v = with_attrs(&[(attr::USERNAME, &[0xff, 0xfe])]);
    assert_eq!(
        Message::parse(&v).unwrap().username().unwrap_err(),
        ParseError::BadValue(attr::USERNAME)
    );
    // REALM: 127 characters of 3 bytes pass, 128 do not.
    let realm = "\u{30DE}".repeat(127);
    let v = with_attrs(&[(attr::REALM, realm.as_bytes())]);
    assert_eq!(
        Message::parse(&v).unwrap().realm().unwrap(),
        Some(realm.as_str())
    );
    let realm = "r".repeat(128);
    let v = with_attrs(&[
        (attr::REALM, realm.as_bytes()),
        (attr::NONCE, realm.as_bytes()),
    ]);
    let m = Message::parse(&v).unwrap();
    assert_eq!(m.realm().unwrap_err(), ParseError::BadValue(attr::REALM));
    assert_eq!(m.nonce().unwrap_err(), ParseError::BadValue(attr::NONCE));
    assert_eq!(m.username().unwrap(), None);
}

// ---------------------------------------------------------------------------------------
// Typed getters and the writer

#[test]
fn message_types() {
    for (method, class, typ) in [
        (method::BINDING, Class::Request, 0x0001),
        (method::BINDING, Class::Success, 0x0101),
        (method::BINDING, Class::Error, 0x0111),
        (method::ALLOCATE, Class::Error, 0x0113),
        (method::SEND, Class::Indication, 0x0016),
        (method::DATA, Class::Indication, 0x0017),
        (method::CHANNEL_BIND, Class::Success, 0x0109),
        (method::CONNECTION_ATTEMPT, Class::Indication, 0x001C),
        (0xFFF, Class::Error, 0x3FFF),
    ] {
        assert_eq!(message_type(method, class), typ);
        assert_eq!(split_message_type(typ), (method, class));
        let mut buf = Vec::new();
        MessageWriter::new(&mut buf, method, class, TransactionId([0; 12])).finish();
        let m = Message::parse(&buf).unwrap();
        assert_eq!(
            (m.method(), m.class(), m.message_type()),
            (method, class, typ)
        );
    }
    for t in 0..0x4000u16 {
        let (m, c) = split_message_type(t);
        assert_eq!(message_type(m, c), t);
    }
}

#[test]
fn turn_getters_roundtrip() {
    let tid = TransactionId([9; 12]);
    let peer4: SocketAddr = "203.0.113.5:40000".parse().unwrap();
    let peer6: SocketAddr = "[2001:db8::1]:5000".parse().unwrap();
    let mut buf = Vec::new();
    let mut w = MessageWriter::new(&mut buf, method::ALLOCATE, Class::Request, tid);
    w.u32_attr(attr::LIFETIME, 3600)
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        .attr(attr::CHANNEL_NUMBER, &[0x40, 0x01, 0, 0])
        .attr(attr::EVEN_PORT, &[0x80])
        .attr(attr::RESERVATION_TOKEN, &[1, 2, 3, 4, 5, 6, 7, 8])
        .attr(attr::REQUESTED_ADDRESS_FAMILY, &[0x02, 0, 0, 0])
        .attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[0x02, 0, 0, 0])
        .xor_address(attr::XOR_PEER_ADDRESS, peer4)
        .xor_address(attr::XOR_PEER_ADDRESS, peer6)
        .mapped_address(attr::MAPPED_ADDRESS, peer6)
        .attr(attr::DATA, b"hello")
        .attr(attr::DONT_FRAGMENT, b"");
    let n = w.finish();
    assert_eq!(n, buf.len());
    let m = Message::parse(&buf).unwrap();
    assert_eq!(m.lifetime().unwrap(), Some(3600));
    assert_eq!(m.requested_transport().unwrap(), Some(17));
    assert_eq!(m.channel_number().unwrap(), Some(0x4001));
    assert_eq!(m.even_port().unwrap(), Some(true));
    assert_eq!(
        m.reservation_token().unwrap(),
        Some([1, 2, 3, 4, 5, 6, 7, 8])
    );
    assert_eq!(m.requested_address_family().unwrap(), Some(2));
    assert_eq!(m.additional_address_family().unwrap(), Some(2));
    assert_eq!(m.xor_peer_address().unwrap(), Some(peer4));
    assert_eq!(m.xor_peer_addresses().unwrap(), [peer4, peer6]);
    assert_eq!(m.address(attr::MAPPED_ADDRESS).unwrap(), Some(peer6));
    assert_eq!(m.data(), Some(&b"hello"[..]));
    assert!(m.has(attr::DONT_FRAGMENT));
    assert_eq!(m.get(attr::DONT_FRAGMENT), Some(&[][..]));
    assert_eq!(m.error_code().unwrap(), None);
    assert_eq!(m.realm().unwrap(), None);

    // Absent.
    let v = with_attrs(&[]);
    let m = Message::parse(&v).unwrap();
    assert_eq!(m.lifetime().unwrap(), None);
    assert_eq!(m.even_port().unwrap(), None);
    assert_eq!(m.xor_peer_address().unwrap(), None);
    assert!(m.xor_peer_addresses().unwrap().is_empty());
    assert_eq!(m.data(), None);
}

#[test]
fn malformed_values() {
    let v = with_attrs(&[
        (attr::LIFETIME, &[0, 0, 1]),
        (attr::REQUESTED_TRANSPORT, &[17]),
        (attr::CHANNEL_NUMBER, &[0x40, 0, 0, 0, 0]),
        (attr::EVEN_PORT, &[0, 0]),
        (attr::RESERVATION_TOKEN, &[0; 4]),
        (attr::REQUESTED_ADDRESS_FAMILY, &[1, 0]),
        (attr::ADDITIONAL_ADDRESS_FAMILY, &[]),
        (attr::XOR_PEER_ADDRESS, &[0, 3, 0, 0, 0, 0, 0, 0]),
        (
            attr::XOR_RELAYED_ADDRESS,
            &[0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ),
        (attr::ERROR_CODE, &[0, 0, 2, 0]),
    ]);
    let m = Message::parse(&v).unwrap();
    let bad = ParseError::BadValue;
    assert_eq!(m.lifetime().unwrap_err(), bad(attr::LIFETIME));
    assert_eq!(
        m.requested_transport().unwrap_err(),
        bad(attr::REQUESTED_TRANSPORT)
    );
    assert_eq!(m.channel_number().unwrap_err(), bad(attr::CHANNEL_NUMBER));
    assert_eq!(m.even_port().unwrap_err(), bad(attr::EVEN_PORT));
    assert_eq!(
        m.reservation_token().unwrap_err(),
        bad(attr::RESERVATION_TOKEN)
    );
    assert_eq!(
        m.requested_address_family().unwrap_err(),
        bad(attr::REQUESTED_ADDRESS_FAMILY)
    );
    assert_eq!(
        m.additional_address_family().unwrap_err(),
        bad(attr::ADDITIONAL_ADDRESS_FAMILY)
    );
    assert_eq!(m.xor_peer_address().unwrap_err(), ParseError::BadAddress);
    assert_eq!(m.xor_peer_addresses().unwrap_err(), ParseError::BadAddress);
    assert_eq!(
        m.xor_address(attr::XOR_RELAYED_ADDRESS).unwrap_err(),
        ParseError::BadAddress
    );
    assert_eq!(m.error_code().unwrap_err(), bad(attr::ERROR_CODE));
    assert_eq!(ParseError::BadAddress.stun_error_code(), Some(400));
    assert_eq!(ParseError::NotStun.stun_error_code(), None);
    // uclient's 1-byte EVEN-PORT, and a 4-byte form.
    let v = with_attrs(&[(attr::EVEN_PORT, &[0x00, 0, 0, 0])]);
    assert_eq!(
        Message::parse(&v).unwrap().even_port().unwrap(),
        Some(false)
    );
}

#[test]
fn address_codecs() {
    let tid = TransactionId([0xAB; 12]);
    for a in [
        SocketAddr::new(Ipv4Addr::new(127, 0, 0, 1).into(), 3478),
        SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
        SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 65535),
        "[::ffff:192.0.2.1]:1".parse().unwrap(),
    ] {
        let mut out = Vec::new();
        encode_xor_address(a, &tid, &mut out);
        assert_eq!(decode_xor_address(&out, &tid).unwrap(), a);
        assert_ne!(decode_address(&out).ok(), Some(a));
        out.clear();
        encode_address(a, &mut out);
        assert_eq!(decode_address(&out).unwrap(), a);
        for n in 0..out.len() {
            assert_eq!(
                decode_address(&out[..n]).unwrap_err(),
                ParseError::BadAddress
            );
            assert!(decode_xor_address(&out[..n], &tid).is_err());
        }
        out.push(0);
        assert!(decode_address(&out).is_err());
    }
    // IPv6 length with IPv4 family, and the reverse.
    assert!(
        decode_address(&[0, 1, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16])
            .is_err()
    );
    assert!(decode_address(&[0, 2, 0, 0, 1, 2, 3, 4]).is_err());
}

#[test]
fn error_code_and_unknown_attributes_writer() {
    let mut buf = Vec::new();
    let mut w = MessageWriter::new(
        &mut buf,
        method::ALLOCATE,
        Class::Error,
        TransactionId([3; 12]),
    );
    w.error_code(420, reason_phrase(420))
        .unknown_attributes(&[0x0031, 0x0032, 0x7FFF])
        .attr(attr::SOFTWARE, b"turnstone")
        .fingerprint();
    w.finish();
    let m = Message::parse(&buf).unwrap();
    assert_eq!(m.class(), Class::Error);
    assert_eq!(m.error_code().unwrap(), Some((420, "Unknown Attribute")));
    assert_eq!(
        m.get(attr::UNKNOWN_ATTRIBUTES),
        Some(&[0, 0x31, 0, 0x32, 0x7f, 0xff][..])
    );
    assert_eq!(m.verify_fingerprint(), Some(true));
    for code in [
        300, 400, 401, 403, 420, 437, 438, 440, 441, 442, 443, 446, 447, 486, 500, 508,
    ] {
        assert_ne!(reason_phrase(code), "Error", "{code}");
        let mut w = MessageWriter::new(
            &mut buf,
            method::ALLOCATE,
            Class::Error,
            TransactionId([3; 12]),
        );
        w.error_code(code, reason_phrase(code));
        w.finish();
        let m = Message::parse(&buf).unwrap();
        assert_eq!(m.error_code().unwrap(), Some((code, reason_phrase(code))));
    }
    // A long reason is cut to 127 characters on a character boundary.
    let long = "\u{30DE}".repeat(300);
    let mut w = MessageWriter::new(
        &mut buf,
        method::ALLOCATE,
        Class::Error,
        TransactionId([3; 12]),
    );
    w.error_code(500, &long);
    w.finish();
    let m = Message::parse(&buf).unwrap();
    let (code, reason) = m.error_code().unwrap().unwrap();
    assert_eq!((code, reason.chars().count()), (500, 127));
}

#[test]
fn writer_reuses_buffer_and_bounds_length() {
    let mut buf = vec![0xEE; 100];
    let mut w = MessageWriter::new(
        &mut buf,
        method::BINDING,
        Class::Request,
        TransactionId([0; 12]),
    );
    w.attr(attr::DATA, &vec![1; 70_000])
        .attr(attr::SOFTWARE, b"x")
        .fingerprint();
    let n = w.finish();
    assert_eq!(n, HEADER_LEN + 0xFFFC);
    let m = Message::parse(&buf).unwrap();
    assert_eq!(m.data().map(<[u8]>::len), Some(0xFFFC - 4));
    assert!(!m.has_fingerprint());
    // Header length is right after every call.
    let mut w = MessageWriter::new(
        &mut buf,
        method::BINDING,
        Class::Request,
        TransactionId([0; 12]),
    );
    w.attr(attr::USERNAME, b"abcde");
    assert_eq!(w.transaction_id(), TransactionId([0; 12]));
    assert_eq!(w.finish(), 32);
    assert_eq!(&buf[2..4], &[0, 12]);
    assert!(Message::parse(&buf).is_ok());
}

// ---------------------------------------------------------------------------------------
// RFC 3489

#[test]
fn rfc3489_messages() {
    let tid16 = [
        0x11, 0x22, 0x33, 0x44, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
    ];
    let mut buf = Vec::new();
    let mut w = MessageWriter::new_rfc3489(&mut buf, method::BINDING, Class::Request, tid16);
    w.attr(attr::CHANGE_REQUEST, &[0, 0, 0, 4]);
    assert_eq!(w.finish(), 28);
    assert_eq!(Message::parse(&buf).unwrap_err(), ParseError::NotStun);
    let m = Message::parse_rfc3489(&buf).unwrap();
    assert!(m.is_rfc3489());
    assert_eq!(m.method(), method::BINDING);
    assert_eq!(m.class(), Class::Request);
    assert_eq!(m.transaction_id_rfc3489(), tid16);
    assert_eq!(m.transaction_id().0, tid16[4..]);
    assert_eq!(m.get(attr::CHANGE_REQUEST), Some(&[0, 0, 0, 4][..]));

    // Answer: MAPPED-ADDRESS, SOURCE-ADDRESS, CHANGED-ADDRESS.
    let client: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let mut out = Vec::new();
    let mut w = MessageWriter::new_rfc3489(
        &mut out,
        method::BINDING,
        Class::Success,
        m.transaction_id_rfc3489(),
    );
    w.mapped_address(attr::MAPPED_ADDRESS, client);
    w.finish();
    let r = Message::parse_rfc3489(&out).unwrap();
    assert_eq!(r.transaction_id_rfc3489(), tid16);
    assert_eq!(r.address(attr::MAPPED_ADDRESS).unwrap(), Some(client));

    // A message with the magic cookie is not RFC 3489.
    assert_eq!(
        Message::parse_rfc3489(&RFC5769_REQUEST).unwrap_err(),
        ParseError::NotStun
    );
    let m = Message::parse(&RFC5769_REQUEST).unwrap();
    assert!(!m.is_rfc3489());
    assert_eq!(m.transaction_id_rfc3489()[..4], MAGIC_COOKIE.to_be_bytes());
}

// ---------------------------------------------------------------------------------------
// ChannelData and framing

#[test]
fn channel_data() {
    let mut hdr = [0u8; 4];
    write_channel_data_header(&mut hdr, 0x4001, 5);
    assert_eq!(hdr, [0x40, 0x01, 0x00, 0x05]);
    let mut v = hdr.to_vec();
    v.extend_from_slice(b"hello");
    assert_eq!(parse_channel_data(&v), Some((0x4001, &b"hello"[..])));
    v.extend_from_slice(&[0; 3]); // stream padding
    assert_eq!(parse_channel_data(&v), Some((0x4001, &b"hello"[..])));
    assert_eq!(parse_channel_data(&v[..8]), None);
    assert_eq!(parse_channel_data(&v[..3]), None);
    assert_eq!(
        parse_channel_data(&[0x7F, 0xFF, 0, 0]),
        Some((0x7FFF, &[][..]))
    );
    assert_eq!(parse_channel_data(&[0x80, 0x00, 0, 0]), None);
    assert_eq!(parse_channel_data(&[0x3F, 0xFF, 0, 0]), None);
    assert_eq!(parse_channel_data(&RFC5769_REQUEST), None);
    assert!(is_channel_data(0x40) && is_channel_data(0x7F));
    assert!(!is_channel_data(0x3F) && !is_channel_data(0x80));
    assert!(is_stun(0x00) && is_stun(0x3F) && !is_stun(0x40));
    assert_eq!(CHANNEL_DATA_HEADER, 4);
}

#[test]
fn stream_framing() {
    let max = 4096;
    assert_eq!(next_frame(&[], max), Frame::NeedMore);
    assert_eq!(next_frame(&RFC5769_REQUEST[..3], max), Frame::NeedMore);
    assert_eq!(next_frame(&RFC5769_REQUEST[..50], max), Frame::NeedMore);
    assert_eq!(next_frame(&RFC5769_REQUEST, max), Frame::Stun(108));
    assert_eq!(next_frame(&RFC5769_REQUEST, 107), Frame::Invalid);
    assert_eq!(next_frame(&RFC5769_REQUEST[..4], 107), Frame::Invalid);
    // Two frames back to back: ChannelData (5 bytes + 3 padding) then STUN.
    let mut s = vec![0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5, 0, 0, 0];
    s.extend_from_slice(&RFC5769_RESPONSE_V4);
    assert_eq!(next_frame(&s, max), Frame::ChannelData { total: 12 });
    assert_eq!(next_frame(&s[..11], max), Frame::NeedMore);
    assert_eq!(next_frame(&s[..9], max), Frame::NeedMore);
    assert_eq!(next_frame(&s[12..], max), Frame::Stun(80));
    assert_eq!(
        next_frame(&[0x40, 0, 0, 0], max),
        Frame::ChannelData { total: 4 }
    );
    assert_eq!(next_frame(&[0x40, 0, 0xFF, 0xFF], max), Frame::Invalid);
    // Not STUN / ChannelData, STUN length not a multiple of 4.
    assert_eq!(next_frame(&[0x80], max), Frame::Invalid);
    assert_eq!(next_frame(&[0x16, 0x03, 0x01, 0x02], max), Frame::Invalid);
    assert_eq!(next_frame(&[0x00, 0x01, 0x00, 0x05], max), Frame::Invalid);
    assert_eq!(next_frame(&[0xFF, 0x01], max), Frame::Invalid);
}

// ---------------------------------------------------------------------------------------
// Robustness: no input makes the codec panic.

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn exercise(buf: &[u8]) {
    for m in [Message::parse(buf), Message::parse_rfc3489(buf)]
        .into_iter()
        .flatten()
    {
        let _ = (
            m.method(),
            m.class(),
            m.transaction_id(),
            m.transaction_id_rfc3489(),
        );
        for (t, v) in m.attributes() {
            let _ = (
                decode_address(v),
                decode_xor_address(v, &m.transaction_id()),
                m.has(t),
            );
        }
        let _ = m.unknown_required(|t| t < 0x20);
        let _ = (
            m.username(),
            m.realm(),
            m.nonce(),
            m.software(),
            m.lifetime(),
        );
        let _ = (
            m.requested_transport(),
            m.channel_number(),
            m.data(),
            m.even_port(),
        );
        let _ = (
            m.xor_peer_addresses(),
            m.xor_peer_address(),
            m.reservation_token(),
        );
        let _ = (
            m.requested_address_family(),
            m.additional_address_family(),
            m.error_code(),
        );
        let _ = (m.verify_integrity(b"key"), m.verify_integrity_sha1(b"key"));
        let _ = (
            m.verify_fingerprint(),
            m.has_fingerprint(),
            m.has_message_integrity(),
        );
    }
    let _ = parse_channel_data(buf);
    let _ = next_frame(buf, 1500);
}

#[test]
fn never_panics_on_mutated_input() {
    let seeds: [&[u8]; 4] = [
        &RFC5769_REQUEST,
        &RFC5769_RESPONSE_V4,
        &RFC5769_RESPONSE_V6,
        &RFC5769_REQUEST_LONG_TERM,
    ];
    let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
    for seed in seeds {
        for n in 0..=seed.len() {
            exercise(&seed[..n]);
        }
        for _ in 0..5000 {
            let mut v = seed.to_vec();
            for _ in 0..1 + rng.next() % 4 {
                let i = (rng.next() as usize) % v.len();
                v[i] = rng.next() as u8;
            }
            // Keep the header valid half the time so the attribute walk is exercised.
            if rng.next().is_multiple_of(2) {
                v[0] &= 0x3F;
                v[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
                fix_len(&mut v);
            }
            exercise(&v);
        }
    }
    for _ in 0..5000 {
        let len = (rng.next() % 64) as usize;
        let v: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        exercise(&v);
    }
}
