//! Differential tests: our codec (`turnstone::proto`) against an independent
//! implementation, the webrtc-rs `stun` / `turn` crates 0.17. Messages built by one are
//! parsed and verified (MESSAGE-INTEGRITY with long- and short-term keys, FINGERPRINT) by
//! the other, and the decoded attributes compared.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use md5::{Digest, Md5};
use stun::agent::TransactionId as TheirTid;
use stun::attributes::{
    AttrType, ATTR_NONCE, ATTR_REALM, ATTR_SOFTWARE, ATTR_USERNAME, ATTR_XOR_RELAYED_ADDRESS,
};
use stun::error_code::{ErrorCode, ErrorCodeAttribute};
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::{
    Getter, Message as TheirMessage, MessageClass, MessageType, Method, Setter,
    CLASS_ERROR_RESPONSE, CLASS_INDICATION, CLASS_REQUEST, CLASS_SUCCESS_RESPONSE, METHOD_ALLOCATE,
    METHOD_BINDING, METHOD_CHANNEL_BIND, METHOD_CREATE_PERMISSION, METHOD_SEND,
};
use stun::textattrs::TextAttribute;
use stun::uattrs::UnknownAttributes;
use stun::xoraddr::XorMappedAddress;
use turn::proto::chandata::ChannelData;
use turn::proto::channum::ChannelNumber;
use turn::proto::data::Data;
use turn::proto::dontfrag::DontFragmentAttr;
use turn::proto::evenport::EvenPort;
use turn::proto::lifetime::Lifetime;
use turn::proto::peeraddr::PeerAddress;
use turn::proto::relayaddr::RelayedAddress;
use turn::proto::reqfamily::{RequestedAddressFamily, REQUESTED_FAMILY_IPV4};
use turn::proto::reqtrans::RequestedTransport;
use turn::proto::rsrvtoken::ReservationToken;
use turn::proto::PROTO_UDP;
use turnstone::proto::{
    attr, method, next_frame, parse_channel_data, write_channel_data_header, Class, Frame, Message,
    MessageWriter, TransactionId,
};

const USER: &str = "bench";
const REALM: &str = "bars.test";
const PASS: &str = "bench";
const NONCE: &str = "5e1c0a0b3f2d4e6f";

fn long_term_key() -> [u8; 16] {
    Md5::digest(format!("{USER}:{REALM}:{PASS}").as_bytes()).into()
}

fn their_integrity() -> MessageIntegrity {
    MessageIntegrity::new_long_term_integrity(USER.into(), REALM.into(), PASS.into())
}

fn build(setters: Vec<Box<dyn Setter>>) -> TheirMessage {
    let mut m = TheirMessage::new();
    m.build(&setters).expect("stun crate builds the message");
    m
}

fn typ(method: Method, class: MessageClass) -> Box<MessageType> {
    Box::new(MessageType::new(method, class))
}

fn text(t: AttrType, s: &str) -> Box<TextAttribute> {
    Box::new(TextAttribute::new(t, s.to_string()))
}

fn decode_theirs(raw: &[u8]) -> TheirMessage {
    let mut m = TheirMessage::new();
    m.unmarshal_binary(raw)
        .expect("stun crate decodes our message");
    m
}

/// (type, value) of every attribute before MESSAGE-INTEGRITY / FINGERPRINT, as the stun
/// crate sees them.
fn their_counted_attrs(m: &TheirMessage) -> Vec<(u16, Vec<u8>)> {
    m.attributes
        .0
        .iter()
        .map(|a| (a.typ.value(), a.value.clone()))
        .take_while(|(t, _)| {
            ![
                attr::MESSAGE_INTEGRITY,
                attr::MESSAGE_INTEGRITY_SHA256,
                attr::FINGERPRINT,
            ]
            .contains(t)
        })
        .collect()
}

fn our_attrs(m: &Message<'_>) -> Vec<(u16, Vec<u8>)> {
    m.attributes().map(|(t, v)| (t, v.to_vec())).collect()
}

fn sock(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

// ---------------------------------------------------------------------------------------
// Built by the stun crate, parsed by us

#[test]
fn their_allocate_request_parses_and_verifies() {
    let tid = TheirTid::new();
    let m = build(vec![
        Box::new(tid),
        typ(METHOD_ALLOCATE, CLASS_REQUEST),
        Box::new(RequestedTransport {
            protocol: PROTO_UDP,
        }),
        Box::new(Lifetime(Duration::from_secs(777))),
        Box::new(EvenPort::default()),
        Box::new(RequestedAddressFamily(REQUESTED_FAMILY_IPV4.0)),
        Box::new(DontFragmentAttr),
        text(ATTR_USERNAME, USER),
        text(ATTR_NONCE, NONCE),
        text(ATTR_REALM, REALM),
        text(ATTR_SOFTWARE, "webrtc-rs stun 0.17"),
        Box::new(their_integrity()),
        Box::new(FINGERPRINT),
    ]);

    let ours = Message::parse(&m.raw).expect("we parse the stun crate's message");
    assert_eq!(ours.method(), method::ALLOCATE);
    assert_eq!(ours.class(), Class::Request);
    assert_eq!(ours.message_type(), m.typ.value());
    assert_eq!(ours.transaction_id(), TransactionId(tid.0));
    assert_eq!(ours.requested_transport().unwrap(), Some(17));
    assert_eq!(ours.lifetime().unwrap(), Some(777));
    assert_eq!(ours.even_port().unwrap(), Some(false));
    assert_eq!(ours.requested_address_family().unwrap(), Some(0x01));
    assert!(ours.has(attr::DONT_FRAGMENT));
    assert_eq!(ours.username().unwrap(), Some(USER));
    assert_eq!(ours.nonce().unwrap(), Some(NONCE));
    assert_eq!(ours.realm().unwrap(), Some(REALM));
    assert_eq!(ours.software().unwrap(), Some("webrtc-rs stun 0.17"));
    assert!(ours.verify_integrity(&long_term_key()));
    assert!(!ours.verify_integrity(b"not the key"));
    assert_eq!(ours.verify_fingerprint(), Some(true));
    assert_eq!(our_attrs(&ours), their_counted_attrs(&m));
    let known = |t: u16| t != attr::DONT_FRAGMENT;
    assert_eq!(ours.unknown_required(known), [attr::DONT_FRAGMENT]);
}

#[test]
fn their_turn_requests_and_indications_parse() {
    let p4 = sock("192.0.2.10".parse().unwrap(), 50_000);
    let p6 = sock("2001:db8::42".parse().unwrap(), 3480);

    // CreatePermission with two peers, IPv4 and IPv6.
    let m = build(vec![
        Box::new(TheirTid::new()),
        typ(METHOD_CREATE_PERMISSION, CLASS_REQUEST),
        Box::new(PeerAddress {
            ip: p4.ip(),
            port: p4.port(),
        }),
        Box::new(PeerAddress {
            ip: p6.ip(),
            port: p6.port(),
        }),
        text(ATTR_USERNAME, USER),
        text(ATTR_REALM, REALM),
        text(ATTR_NONCE, NONCE),
        Box::new(their_integrity()),
    ]);
    let ours = Message::parse(&m.raw).unwrap();
    assert_eq!(ours.method(), method::CREATE_PERMISSION);
    assert_eq!(ours.xor_peer_addresses().unwrap(), [p4, p6]);
    assert_eq!(ours.xor_peer_address().unwrap(), Some(p4));
    assert!(ours.verify_integrity(&long_term_key()));
    assert_eq!(ours.verify_fingerprint(), None);

    // ChannelBind.
    let m = build(vec![
        Box::new(TheirTid::new()),
        typ(METHOD_CHANNEL_BIND, CLASS_REQUEST),
        Box::new(ChannelNumber(0x4abc)),
        Box::new(PeerAddress {
            ip: p6.ip(),
            port: p6.port(),
        }),
        text(ATTR_USERNAME, USER),
        text(ATTR_REALM, REALM),
        text(ATTR_NONCE, NONCE),
        Box::new(their_integrity()),
        Box::new(FINGERPRINT),
    ]);
    let ours = Message::parse(&m.raw).unwrap();
    assert_eq!(ours.method(), method::CHANNEL_BIND);
    assert_eq!(ours.channel_number().unwrap(), Some(0x4abc));
    assert_eq!(ours.xor_peer_address().unwrap(), Some(p6));
    assert!(ours.verify_integrity(&long_term_key()));
    assert_eq!(ours.verify_fingerprint(), Some(true));

    // Send indication with odd-length data (padding).
    let payload = b"hello, peer".to_vec();
    let m = build(vec![
        Box::new(TheirTid::new()),
        typ(METHOD_SEND, CLASS_INDICATION),
        Box::new(PeerAddress {
            ip: p4.ip(),
            port: p4.port(),
        }),
        Box::new(Data(payload.clone())),
        Box::new(FINGERPRINT),
    ]);
    let ours = Message::parse(&m.raw).unwrap();
    assert_eq!(
        (ours.method(), ours.class()),
        (method::SEND, Class::Indication)
    );
    assert_eq!(ours.data(), Some(&payload[..]));
    assert_eq!(ours.xor_peer_address().unwrap(), Some(p4));
    assert_eq!(ours.verify_fingerprint(), Some(true));
    assert!(!ours.has_message_integrity());
    assert_eq!(our_attrs(&ours), their_counted_attrs(&m));
}

#[test]
fn their_responses_parse() {
    let mapped = sock("203.0.113.7".parse().unwrap(), 61_000);
    let relayed = sock("2001:db8:1::5".parse().unwrap(), 50_123);
    let m = build(vec![
        Box::new(TheirTid::new()),
        typ(METHOD_ALLOCATE, CLASS_SUCCESS_RESPONSE),
        Box::new(RelayedAddress {
            ip: relayed.ip(),
            port: relayed.port(),
        }),
        Box::new(XorMappedAddress {
            ip: mapped.ip(),
            port: mapped.port(),
        }),
        Box::new(Lifetime(Duration::from_secs(600))),
        Box::new(ReservationToken(vec![1, 2, 3, 4, 5, 6, 7, 8])),
        text(ATTR_SOFTWARE, "coturn-ish"),
        Box::new(their_integrity()),
        Box::new(FINGERPRINT),
    ]);
    let ours = Message::parse(&m.raw).unwrap();
    assert_eq!(ours.class(), Class::Success);
    assert_eq!(
        ours.xor_address(attr::XOR_RELAYED_ADDRESS).unwrap(),
        Some(relayed)
    );
    assert_eq!(
        ours.xor_address(attr::XOR_MAPPED_ADDRESS).unwrap(),
        Some(mapped)
    );
    assert_eq!(ours.lifetime().unwrap(), Some(600));
    assert_eq!(
        ours.reservation_token().unwrap(),
        Some([1, 2, 3, 4, 5, 6, 7, 8])
    );
    assert!(ours.verify_integrity(&long_term_key()));
    assert_eq!(ours.verify_fingerprint(), Some(true));

    // 401 with NONCE and REALM, and 420 with UNKNOWN-ATTRIBUTES.
    let m = build(vec![
        Box::new(TheirTid::new()),
        typ(METHOD_ALLOCATE, CLASS_ERROR_RESPONSE),
        Box::new(ErrorCodeAttribute {
            code: ErrorCode(401),
            reason: b"Unauthorized".to_vec(),
        }),
        text(ATTR_NONCE, NONCE),
        text(ATTR_REALM, REALM),
        Box::new(FINGERPRINT),
    ]);
    let ours = Message::parse(&m.raw).unwrap();
    assert_eq!(ours.class(), Class::Error);
    assert_eq!(ours.error_code().unwrap(), Some((401, "Unauthorized")));
    assert_eq!(ours.nonce().unwrap(), Some(NONCE));
    assert_eq!(ours.verify_fingerprint(), Some(true));

    let m = build(vec![
        Box::new(TheirTid::new()),
        typ(METHOD_BINDING, CLASS_ERROR_RESPONSE),
        Box::new(ErrorCodeAttribute {
            code: ErrorCode(420),
            reason: b"Unknown Attribute".to_vec(),
        }),
        Box::new(UnknownAttributes(vec![
            AttrType(0x0031),
            AttrType(0x0003),
            AttrType(0x7000),
        ])),
    ]);
    let ours = Message::parse(&m.raw).unwrap();
    assert_eq!(ours.error_code().unwrap(), Some((420, "Unknown Attribute")));
    assert_eq!(
        ours.get(attr::UNKNOWN_ATTRIBUTES),
        Some(&[0, 0x31, 0, 0x03, 0x70, 0][..])
    );
}

#[test]
fn their_short_term_integrity_verifies() {
    let pwd = "VOkJxbRl1RmTxUk/WvJxBt";
    let m = build(vec![
        Box::new(TheirTid::new()),
        typ(METHOD_BINDING, CLASS_REQUEST),
        text(ATTR_USERNAME, "evtj:h6vY"),
        Box::new(MessageIntegrity::new_short_term_integrity(pwd.into())),
        Box::new(FINGERPRINT),
    ]);
    let ours = Message::parse(&m.raw).unwrap();
    assert!(ours.verify_integrity(pwd.as_bytes()));
    assert_eq!(ours.verify_fingerprint(), Some(true));
}

// ---------------------------------------------------------------------------------------
// Built by us, parsed by the stun crate

#[test]
fn our_messages_parse_and_verify_in_stun_crate() {
    let tid = TransactionId([0x5a; 12]);
    let key = long_term_key();
    let mapped = sock("198.51.100.1".parse().unwrap(), 3478);
    let relayed = sock("2001:db8::7".parse().unwrap(), 49_999);
    let peer = sock("127.0.0.1".parse().unwrap(), 3580);

    let mut buf = Vec::new();
    let mut w = MessageWriter::new(&mut buf, method::ALLOCATE, Class::Success, tid);
    w.xor_address(attr::XOR_RELAYED_ADDRESS, relayed)
        .xor_address(attr::XOR_MAPPED_ADDRESS, mapped)
        .xor_address(attr::XOR_PEER_ADDRESS, peer)
        .u32_attr(attr::LIFETIME, 600)
        .attr(attr::CHANNEL_NUMBER, &[0x40, 0x00, 0, 0])
        .attr(attr::DATA, b"abcde")
        .attr(attr::USERNAME, USER.as_bytes())
        .attr(attr::REALM, REALM.as_bytes())
        .attr(attr::NONCE, NONCE.as_bytes())
        .attr(attr::SOFTWARE, b"turnstone")
        .message_integrity(&key)
        .fingerprint();
    w.finish();

    let mut m = decode_theirs(&buf);
    assert_eq!(
        m.typ,
        MessageType::new(METHOD_ALLOCATE, CLASS_SUCCESS_RESPONSE)
    );
    assert_eq!(m.transaction_id.0, tid.0);

    let mut x = XorMappedAddress::default();
    x.get_from(&m).unwrap();
    assert_eq!(sock(x.ip, x.port), mapped);
    let mut r = RelayedAddress::default();
    r.get_from(&m).unwrap();
    assert_eq!(sock(r.ip, r.port), relayed);
    let mut p = PeerAddress::default();
    p.get_from(&m).unwrap();
    assert_eq!(sock(p.ip, p.port), peer);
    let mut x = XorMappedAddress::default();
    x.get_from_as(&m, ATTR_XOR_RELAYED_ADDRESS).unwrap();
    assert_eq!(sock(x.ip, x.port), relayed);
    let mut l = Lifetime::default();
    l.get_from(&m).unwrap();
    assert_eq!(l.0, Duration::from_secs(600));
    let mut c = ChannelNumber::default();
    c.get_from(&m).unwrap();
    assert_eq!(c.0, 0x4000);
    let mut d = Data::default();
    d.get_from(&m).unwrap();
    assert_eq!(d.0, b"abcde");
    for (t, want) in [
        (ATTR_USERNAME, USER),
        (ATTR_REALM, REALM),
        (ATTR_NONCE, NONCE),
        (ATTR_SOFTWARE, "turnstone"),
    ] {
        assert_eq!(TextAttribute::get_from_as(&m, t).unwrap().text, want);
    }
    FINGERPRINT
        .check(&m)
        .expect("stun crate accepts our FINGERPRINT");
    their_integrity()
        .check(&mut m)
        .expect("stun crate accepts our MESSAGE-INTEGRITY");
    assert!(
        MessageIntegrity::new_long_term_integrity(USER.into(), REALM.into(), "x".into())
            .check(&mut m)
            .is_err()
    );

    let ours = Message::parse(&buf).unwrap();
    assert_eq!(our_attrs(&ours), their_counted_attrs(&m));
}

#[test]
fn our_error_responses_parse_in_stun_crate() {
    let mut buf = Vec::new();
    let mut w = MessageWriter::new(
        &mut buf,
        method::ALLOCATE,
        Class::Error,
        TransactionId([1; 12]),
    );
    w.error_code(420, "Unknown Attribute")
        .unknown_attributes(&[0x0031, 0x0003, 0x7000])
        .attr(attr::REALM, REALM.as_bytes())
        .fingerprint();
    w.finish();
    let m = decode_theirs(&buf);
    assert_eq!(
        m.typ,
        MessageType::new(METHOD_ALLOCATE, CLASS_ERROR_RESPONSE)
    );
    let mut e = ErrorCodeAttribute::default();
    e.get_from(&m).unwrap();
    assert_eq!(
        (e.code.0, e.reason.as_slice()),
        (420, &b"Unknown Attribute"[..])
    );
    let mut u = UnknownAttributes(Vec::new());
    u.get_from(&m).unwrap();
    assert_eq!(u.0, [AttrType(0x0031), AttrType(0x0003), AttrType(0x7000)]);
    FINGERPRINT.check(&m).unwrap();

    // Short-term integrity on an indication-less Binding success.
    let mut w = MessageWriter::new(
        &mut buf,
        method::BINDING,
        Class::Success,
        TransactionId([2; 12]),
    );
    w.xor_address(attr::XOR_MAPPED_ADDRESS, sock("::1".parse().unwrap(), 9))
        .message_integrity(b"short-term-pwd")
        .fingerprint();
    w.finish();
    let mut m = decode_theirs(&buf);
    MessageIntegrity::new_short_term_integrity("short-term-pwd".into())
        .check(&mut m)
        .unwrap();
    FINGERPRINT.check(&m).unwrap();
}

// ---------------------------------------------------------------------------------------
// Randomized round trips: random attribute lists written by us, decoded by both.

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn random_messages_decode_identically() {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut buf = Vec::new();
    for round in 0..500 {
        let mut tid = [0u8; 12];
        tid.iter_mut().for_each(|b| *b = rng.next() as u8);
        let class = [
            Class::Request,
            Class::Indication,
            Class::Success,
            Class::Error,
        ][(rng.next() % 4) as usize];
        let method = (rng.next() % 0x1000) as u16;
        let mut w = MessageWriter::new(&mut buf, method, class, TransactionId(tid));
        let mut expected = Vec::new();
        for _ in 0..rng.next() % 8 {
            let t = loop {
                let t = (rng.next() % 0x10000) as u16;
                if ![
                    attr::MESSAGE_INTEGRITY,
                    attr::MESSAGE_INTEGRITY_SHA256,
                    attr::FINGERPRINT,
                ]
                .contains(&t)
                {
                    break t;
                }
            };
            let len = (rng.next() % 40) as usize;
            let v: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            w.attr(t, &v);
            expected.push((t, v));
        }
        let with_mi = rng.next().is_multiple_of(2);
        if with_mi {
            w.message_integrity(&long_term_key());
        }
        let with_fp = rng.next().is_multiple_of(2);
        if with_fp {
            w.fingerprint();
        }
        w.finish();

        let ours = Message::parse(&buf).unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(our_attrs(&ours), expected, "round {round}");
        assert_eq!((ours.method(), ours.class()), (method, class));
        let mut theirs = decode_theirs(&buf);
        assert_eq!(their_counted_attrs(&theirs), expected, "round {round}");
        assert_eq!(theirs.typ.value(), ours.message_type());
        if with_fp {
            FINGERPRINT.check(&theirs).unwrap();
        }
        if with_mi {
            their_integrity().check(&mut theirs).unwrap();
            assert!(ours.verify_integrity(&long_term_key()));
        }
    }
}

// ---------------------------------------------------------------------------------------
// ChannelData

#[test]
fn channel_data_both_ways() {
    for len in [0usize, 1, 3, 4, 5, 100, 1201] {
        let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
        // Theirs -> ours (turn pads to 4 as on streams).
        let mut cd = ChannelData {
            data: payload.clone(),
            number: ChannelNumber(0x4001),
            raw: vec![],
        };
        cd.encode();
        assert_eq!(parse_channel_data(&cd.raw), Some((0x4001, &payload[..])));
        assert_eq!(
            next_frame(&cd.raw, 65_536),
            Frame::ChannelData {
                total: cd.raw.len()
            }
        );
        // Ours -> theirs.
        let mut hdr = [0u8; 4];
        write_channel_data_header(&mut hdr, 0x7ffe, u16::try_from(len).unwrap());
        let mut raw = hdr.to_vec();
        raw.extend_from_slice(&payload);
        let mut cd = ChannelData {
            raw,
            ..Default::default()
        };
        cd.decode().unwrap();
        assert_eq!((cd.number.0, cd.data), (0x7ffe, payload));
    }
}
