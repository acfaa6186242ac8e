//! The checks behind every fuzz target, shared (not duplicated) by
//! - the cargo-fuzz targets in `fuzz/fuzz_targets/` (this file is the `turnstone-fuzz`
//!   library there), and
//! - the stable test `tests/fuzz_regressions.rs` (which includes this file with
//!   `#[path]`) that replays `fuzz/regressions/<target>/*` and the seed corpora, and
//! - `tests/proptest_core.rs`, which drives the same [`World`] with proptest-generated
//!   [`Op`] sequences.
//!
//! Each `check_*` function takes the raw fuzz input and panics when an invariant breaks.
//! Inputs are decoded with a small byte cursor ([`Bytes`]) so nothing here needs the
//! `arbitrary` crate and the file builds on stable as an ordinary test module.
//!
//! Only `turnstone`, `stun` (the webrtc-rs codec, for the differential check), `ipnet`
//! and std are used.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use turnstone::auth::{self, Credentials, LookupError, NonceCheck, NonceMaker};
use turnstone::config::Config;
use turnstone::policy::PeerPolicy;
use turnstone::proto::{
    self, attr, method, next_frame, parse_channel_data, write_channel_data_header, Class, Frame,
    Message, MessageWriter, TransactionId, HEADER_LEN,
};
use turnstone::server::{
    BindError, BindResult, Clock, Event, FiveTuple, Output, RelayBinder, RelayHandle, Runtime,
    Server, Shared, Transport, CHANNEL_COOLDOWN, PEER_HEADROOM, PEER_TAILROOM,
    RESERVATION_LIFETIME,
};

/// The fuzz targets, by directory name under `fuzz/corpus/` and `fuzz/regressions/`.
pub const TARGETS: &[&str] = &[
    "stun_message",
    "channel_data",
    "stream_framing",
    "config",
    "credentials",
    "server_sequence",
    "differential",
    "handover_state",
];

/// Runs the check of target `name` on `data`. Panics on an unknown name.
pub fn check(name: &str, data: &[u8]) {
    match name {
        "stun_message" => check_stun_message(data),
        "channel_data" => check_channel_data(data),
        "stream_framing" => check_stream_framing(data),
        "config" => check_config(data),
        "credentials" => check_credentials(data),
        "server_sequence" => check_server_sequence(data),
        "differential" => check_differential(data),
        "handover_state" => check_handover_state(data),
        other => panic!("unknown fuzz target {other}"),
    }
}

// ---------------------------------------------------------------------------
// Byte cursor
// ---------------------------------------------------------------------------

/// Reads little values off the fuzz input; yields zeros once it is used up.
pub struct Bytes<'a> {
    data: &'a [u8],
}

impl<'a> Bytes<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Bytes { data }
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }
    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    /// Up to `n` bytes (fewer at the end of the input).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (a, b) = self.data.split_at(n);
        self.data = b;
        a
    }
    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        for b in a.iter_mut() {
            *b = self.u8();
        }
        a
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

const fn padded(len: usize) -> usize {
    (len + 3) & !3
}

// ---------------------------------------------------------------------------
// stun_message: parse, getters, re-encode
// ---------------------------------------------------------------------------

/// Calls every getter (none may panic) and the integrity checks.
fn exercise(msg: &Message<'_>) {
    let _ = msg.method();
    let _ = msg.class();
    let _ = msg.transaction_id();
    let _ = msg.unknown_required(|t| t == attr::USERNAME);
    let _ = msg.username();
    let _ = msg.realm();
    let _ = msg.nonce();
    let _ = msg.software();
    let _ = msg.lifetime();
    let _ = msg.requested_transport();
    let _ = msg.channel_number();
    let _ = msg.data();
    let _ = msg.xor_peer_addresses();
    let _ = msg.xor_peer_address();
    let _ = msg.xor_address(attr::XOR_MAPPED_ADDRESS);
    let _ = msg.address(attr::MAPPED_ADDRESS);
    let _ = msg.even_port();
    let _ = msg.reservation_token();
    let _ = msg.requested_address_family();
    let _ = msg.additional_address_family();
    let _ = msg.error_code();
    let _ = msg.has(attr::FINGERPRINT);
    let _ = msg.verify_integrity(b"key");
    let _ = msg.verify_integrity_sha1(&[0u8; 16]);
    let _ = msg.verify_integrity_sha256(&[0u8; 16]);
    let _ = msg.verify_fingerprint();
    let _ = msg.transaction_id_rfc3489();
    if let Ok(Some(v)) = msg.xor_peer_address() {
        // The XOR codec round-trips.
        let mut out = Vec::new();
        proto::encode_xor_address(v, &msg.transaction_id(), &mut out);
        assert_eq!(
            proto::decode_xor_address(&out, &msg.transaction_id()),
            Ok(v)
        );
    }
}

/// Offset of `value` (a sub-slice of `buf`) in `buf`.
fn offset_in(buf: &[u8], value: &[u8]) -> usize {
    (value.as_ptr() as usize).wrapping_sub(buf.as_ptr() as usize)
}

/// Parse; what parses is re-encoded attribute by attribute with [`MessageWriter`]. Without
/// MESSAGE-INTEGRITY(-SHA256)/FINGERPRINT the bytes round-trip exactly (padding bytes
/// normalised to zero, which is what the writer emits); with them, the re-encoded message
/// has the same fields, and the writer's own integrity and fingerprint verify.
pub fn check_stun_message(data: &[u8]) {
    let msg = match Message::parse(data) {
        Ok(m) => m,
        Err(e) => {
            let _ = e.stun_error_code();
            if let Ok(m) = Message::parse_rfc3489(data) {
                assert!(m.is_rfc3489());
                exercise(&m);
            }
            return;
        }
    };
    assert_eq!(msg.raw().len(), data.len());
    assert_eq!(msg.raw().len() % 4, 0);
    exercise(&msg);

    let mut buf = Vec::new();
    let mut w = MessageWriter::new(&mut buf, msg.method(), msg.class(), msg.transaction_id());
    for (t, v) in msg.attributes() {
        w.attr(t, v);
    }
    let n = w.finish();
    assert_eq!(n, buf.len());
    let special = msg.has_message_integrity() || msg.has_fingerprint();
    if !special {
        let mut normal = data.to_vec();
        for (_, v) in msg.attributes() {
            let at = offset_in(data, v);
            for b in normal
                .iter_mut()
                .take(at + padded(v.len()))
                .skip(at + v.len())
            {
                *b = 0;
            }
        }
        assert_eq!(buf, normal, "re-encoded message differs");
    }
    let again = Message::parse(&buf).expect("re-encoded message parses");
    assert_eq!(again.method(), msg.method());
    assert_eq!(again.class(), msg.class());
    assert_eq!(again.transaction_id(), msg.transaction_id());
    assert!(
        again.attributes().eq(msg.attributes()),
        "attribute lists differ after re-encoding"
    );

    // The writer's integrity and fingerprint verify on the reader, when they fit.
    const KEY: &[u8] = b"fuzz-key";
    if buf.len() + 24 + 36 + 8 <= HEADER_LEN + 0xFFFC {
        let mut signed = Vec::new();
        let mut w =
            MessageWriter::new(&mut signed, msg.method(), msg.class(), msg.transaction_id());
        for (t, v) in msg.attributes() {
            w.attr(t, v);
        }
        let sha256 = data.len() % 2 == 1;
        if sha256 {
            w.message_integrity_sha256(KEY);
        } else {
            w.message_integrity(KEY);
        }
        w.fingerprint();
        w.finish();
        let m = Message::parse(&signed).expect("signed re-encoding parses");
        assert!(m.verify_integrity(KEY), "our own MESSAGE-INTEGRITY fails");
        assert!(!m.verify_integrity(b"other"), "integrity verifies any key");
        assert_eq!(m.verify_fingerprint(), Some(true), "our own FINGERPRINT");
        assert!(m.attributes().eq(msg.attributes()));
    }
}

// ---------------------------------------------------------------------------
// channel_data
// ---------------------------------------------------------------------------

pub fn check_channel_data(data: &[u8]) {
    let first = data.first().copied();
    if let Some(b) = first {
        assert!(!(proto::is_stun(b) && proto::is_channel_data(b)));
    }
    match parse_channel_data(data) {
        Some((number, payload)) => {
            assert!(first.is_some_and(proto::is_channel_data));
            assert!((0x4000..=0x7FFF).contains(&number));
            assert_eq!(Some(number), be16(data, 0));
            let len = usize::from(be16(data, 2).unwrap_or(0));
            assert_eq!(payload.len(), len);
            assert_eq!(Some(payload), data.get(4..4 + len));
            let mut h = [0u8; 4];
            write_channel_data_header(&mut h, number, len as u16);
            assert_eq!(&h[..], &data[..4]);
        }
        None => {
            let ok_shape = data.len() >= 4
                && first.is_some_and(proto::is_channel_data)
                && data.len() - 4 >= usize::from(be16(data, 2).unwrap_or(0));
            assert!(!ok_shape, "well-formed ChannelData refused");
        }
    }
}

// ---------------------------------------------------------------------------
// stream_framing
// ---------------------------------------------------------------------------

/// Cuts the input into frames with [`next_frame`] as a stream listener would: every frame
/// is in bounds and consistent with its header, prefixes of a frame need more, the sizes
/// add up to at most the input.
pub fn check_stream_framing(data: &[u8]) {
    let (sel, stream) = match data.split_first() {
        Some((s, rest)) => (*s, rest),
        None => return,
    };
    let max_frame = [64usize, 1500, 4096, HEADER_LEN + 0xFFFF][usize::from(sel % 4)];
    // With the selector's high bit: a connection on a PROXY protocol listener, whose
    // header comes first.
    let stream = if sel & 0x80 != 0 {
        match check_proxy_header(stream) {
            Some(rest) => rest,
            None => return,
        }
    } else {
        stream
    };
    let mut rest = stream;
    let mut consumed = 0usize;
    loop {
        match next_frame(rest, max_frame) {
            Frame::NeedMore => {
                // Genuinely incomplete (or empty).
                if let (Some(&b), Some(len)) = (rest.first(), be16(rest, 2)) {
                    let total = if b < 0x40 {
                        HEADER_LEN + usize::from(len)
                    } else {
                        padded(4 + usize::from(len))
                    };
                    assert!(total > rest.len() && total <= max_frame);
                }
                break;
            }
            Frame::Invalid => {
                assert!(!rest.is_empty());
                break;
            }
            Frame::Stun(n) => {
                assert!(n >= HEADER_LEN && n <= rest.len() && n <= max_frame);
                assert_eq!((n - HEADER_LEN) % 4, 0);
                assert_eq!(Some((n - HEADER_LEN) as u16), be16(rest, 2));
                let frame = &rest[..n];
                if let Ok(m) = Message::parse(frame) {
                    assert_eq!(m.raw().len(), n);
                }
                assert_eq!(next_frame(&rest[..n - 1], max_frame), Frame::NeedMore);
                consumed += n;
                rest = &rest[n..];
            }
            Frame::ChannelData { total } => {
                assert!(total >= 4 && total <= rest.len() && total <= max_frame);
                assert_eq!(total % 4, 0);
                let (number, payload) =
                    parse_channel_data(&rest[..total]).expect("framed ChannelData parses");
                assert_eq!(Some(number), be16(rest, 0));
                assert_eq!(padded(4 + payload.len()), total);
                assert_eq!(next_frame(&rest[..total - 1], max_frame), Frame::NeedMore);
                consumed += total;
                rest = &rest[total..];
            }
        }
    }
    assert!(consumed <= stream.len());
    assert_eq!(consumed + rest.len(), stream.len());
}

/// The PROXY protocol header at the start of `stream`: the parser never panics, decides
/// consistently on prefixes (an incomplete input's prefixes are incomplete, an invalid
/// input stays invalid with more bytes), never takes more than `proto::proxy::MAX_HEADER` bytes, and
/// a complete header is exactly its own length. Returns what follows a complete header.
fn check_proxy_header(stream: &[u8]) -> Option<&[u8]> {
    use proto::proxy::{parse_proxy_header, ProxyHeader, MAX_HEADER};
    match parse_proxy_header(stream) {
        ProxyHeader::Incomplete => {
            assert!(stream.len() < MAX_HEADER);
            if let Some(shorter) = stream.len().checked_sub(1) {
                assert_eq!(
                    parse_proxy_header(&stream[..shorter]),
                    ProxyHeader::Incomplete
                );
            }
            None
        }
        ProxyHeader::Invalid(_) => {
            assert!(!stream.is_empty());
            let mut more = stream.to_vec();
            more.extend_from_slice(b"\r\n\0");
            assert!(matches!(parse_proxy_header(&more), ProxyHeader::Invalid(_)));
            None
        }
        done @ ProxyHeader::Done {
            header_len,
            addresses,
        } => {
            assert!(header_len >= 15 && header_len <= stream.len() && header_len <= MAX_HEADER);
            assert_eq!(parse_proxy_header(&stream[..header_len]), done);
            assert_eq!(
                parse_proxy_header(&stream[..header_len - 1]),
                ProxyHeader::Incomplete
            );
            if let Some(a) = addresses {
                assert_eq!(a.source.is_ipv4(), a.destination.is_ipv4());
            }
            Some(&stream[header_len..])
        }
    }
}

// ---------------------------------------------------------------------------
// config
// ---------------------------------------------------------------------------

/// TOML text to a validated [`Config`]: never panics; what is accepted validates again
/// and builds a runtime; what is refused says why.
pub fn check_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match Config::from_toml(&text) {
        Ok(c) => {
            if let Err(e) = c.validate() {
                panic!("from_toml accepted a config that validate() refuses: {e:?}");
            }
            let rt = Runtime::from_config(&c, [1; 32]);
            let _ = rt.policy.is_allowed(IpAddr::V4(Ipv4Addr::LOCALHOST));
            let _ = rt.credentials.keys_for("a", 0);
            let _ = PeerPolicy::from_config(&c.policy);
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "refused without a reason");
            for e in &errors {
                assert!(!e.to_string().is_empty());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// credentials
// ---------------------------------------------------------------------------

const REALM: &str = "fuzz.realm";
const SECRETS: [&str; 2] = ["s3cret", "older-secret"];
const USERS: [(&str, &str); 2] = [("alice", "wonderland"), ("1700000000:bob", "builder")];

fn credentials() -> Credentials {
    let users: BTreeMap<String, String> = USERS
        .iter()
        .map(|(u, p)| (u.to_string(), p.to_string()))
        .collect();
    let secrets: Vec<String> = SECRETS.iter().map(|s| s.to_string()).collect();
    Credentials::new(REALM, &users, &secrets)
}

/// `<digits>[:anything]` with the digits as a u64.
fn rest_expiry(username: &str) -> Option<Result<u64, ()>> {
    let digits = username.split_once(':').map_or(username, |(e, _)| e);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(digits.parse::<u64>().map_err(|_| ()))
}

/// REST usernames to `keys_for`, and stateless nonces made and checked.
pub fn check_credentials(data: &[u8]) {
    let mut b = Bytes::new(data);
    let now = u64::from(b.u32()) + 1_600_000_000 * u64::from(b.u8() & 1);
    let kind = b.u8();
    let rest = b.take(1024);
    let username: String = match kind % 3 {
        0 => String::from_utf8_lossy(rest).into_owned(),
        // A REST username around `now`.
        1 => {
            let delta = i64::from(i8::from_be_bytes([rest.first().copied().unwrap_or(0)]));
            let id = String::from_utf8_lossy(rest.get(1..).unwrap_or_default());
            auth::rest_username(now.saturating_add_signed(delta), &id)
        }
        _ => [
            "alice",
            "bob",
            "1700000000:bob",
            "",
            ":x",
            "99999999999999999999999:x",
        ][usize::from(rest.first().copied().unwrap_or(0)) % 6]
            .to_string(),
    };
    let creds = credentials();
    assert_eq!(creds.realm(), REALM);
    let result = creds.keys_for(&username, now);
    let static_key = USERS
        .iter()
        .find(|(u, _)| *u == username)
        .map(|(u, p)| auth::long_term_key(u, REALM, p));
    let rest_keys: Vec<auth::Key> = SECRETS
        .iter()
        .map(|s| auth::long_term_key(&username, REALM, &auth::rest_password(s, &username)))
        .collect();
    let too_long = username.is_empty() || username.len() > auth::MAX_USERNAME_LEN;
    match (&result, rest_expiry(&username)) {
        (Ok(keys), expiry) => {
            assert!(!too_long);
            assert!(!keys.is_empty());
            let mut expected = Vec::new();
            expected.extend(static_key.map(|k| (k, false)));
            if matches!(expiry, Some(Ok(e)) if e > now) {
                expected.extend(rest_keys.iter().map(|k| (*k, true)));
            }
            assert_eq!(keys, &expected, "keys for {username:?} at {now}");
        }
        (Err(LookupError::Malformed), expiry) => {
            assert!(too_long || matches!(expiry, Some(Err(()))));
            assert!(static_key.is_none() || too_long);
        }
        (Err(LookupError::Expired), expiry) => {
            assert!(static_key.is_none());
            assert!(
                matches!(expiry, Some(Ok(e)) if e <= now),
                "{username:?} {now}"
            );
        }
        (Err(LookupError::UnknownUser), expiry) => {
            assert!(static_key.is_none());
            assert!(expiry.is_none(), "{username:?}");
        }
    }

    // Nonces: made for a client, valid for it during the lifetime, stale after, invalid
    // for anyone else; a fuzzed nonce is valid only if it is one we would make.
    let secret: [u8; 32] = {
        let mut s = [0u8; 32];
        for (i, x) in s.iter_mut().enumerate() {
            *x = rest.get(i).copied().unwrap_or(i as u8);
        }
        s
    };
    let lifetime = u64::from(kind) * 7;
    let maker = NonceMaker::new(secret, lifetime);
    let client = SocketAddr::from(([192, 0, 2, kind], u16::from(kind) << 8 | 7));
    // Nonces are bound to the client IP address only (RFC 6062 data connections come
    // from new ports): another port of the same address may use it, another address not.
    let other_port = SocketAddr::from(([192, 0, 2, kind], (u16::from(kind) << 8 | 7) ^ 1));
    let other = SocketAddr::from(([198, 51, 100, kind], u16::from(kind) << 8 | 7));
    let nonce = maker.make(client, now);
    assert_eq!(nonce.len(), auth::NONCE_LEN);
    let age = u64::from(b.u16());
    let expect = if age <= lifetime {
        NonceCheck::Valid
    } else {
        NonceCheck::Stale
    };
    assert_eq!(maker.check(&nonce, client, now + age), expect);
    assert_eq!(maker.check(&nonce, other, now), NonceCheck::Invalid);
    assert_eq!(
        maker.check(&nonce, other_port, now),
        maker.check(&nonce, client, now)
    );
    let fuzzed = String::from_utf8_lossy(rest);
    if maker.check(&fuzzed, client, now) == NonceCheck::Valid {
        let issued = u32::from_str_radix(&fuzzed[..8], 16).expect("valid nonce has a time");
        assert_eq!(
            fuzzed.to_ascii_lowercase(),
            maker.make(client, u64::from(issued)),
            "a nonce we never made is valid"
        );
    }
}

// ---------------------------------------------------------------------------
// differential: our codec against the `stun` crate (webrtc-rs)
// ---------------------------------------------------------------------------

/// On messages we accept, the `stun` crate (laxer: it allows trailing bytes and does not
/// check the top bits, the length alignment or the integrity attribute lengths) must
/// accept too, with the same type, transaction ID and attribute list (ours stops at the
/// first MESSAGE-INTEGRITY/-SHA256/FINGERPRINT; theirs keeps every attribute).
pub fn check_differential(data: &[u8]) {
    let ours = Message::parse(data);
    let mut theirs = stun::message::Message::new();
    let their_result = theirs.unmarshal_binary(data);
    let Ok(ours) = ours else {
        return;
    };
    if let Err(e) = their_result {
        panic!("we accept a message the stun crate refuses: {e}");
    }
    assert_eq!(theirs.typ.value(), ours.message_type(), "message type");
    assert_eq!(
        theirs.transaction_id.0,
        ours.transaction_id().0,
        "transaction id"
    );
    // stun maps the pre-RFC XOR-MAPPED-ADDRESS 0x8020 to 0x0020.
    let compat = |t: u16| if t == 0x8020 { 0x0020 } else { t };
    let their_attrs: Vec<(u16, &[u8])> = theirs
        .attributes
        .0
        .iter()
        .map(|a| (a.typ.0, a.value.as_slice()))
        .collect();
    let our_attrs: Vec<(u16, &[u8])> = ours.attributes().map(|(t, v)| (compat(t), v)).collect();
    assert!(
        their_attrs.len() >= our_attrs.len(),
        "stun crate saw fewer attributes"
    );
    assert_eq!(
        &their_attrs[..our_attrs.len()],
        &our_attrs[..],
        "attribute lists differ"
    );
    let next = their_attrs.get(our_attrs.len()).map(|(t, _)| *t);
    let special = ours.has_message_integrity() || ours.has_fingerprint();
    if special {
        assert!(
            matches!(
                next,
                Some(attr::MESSAGE_INTEGRITY | attr::MESSAGE_INTEGRITY_SHA256 | attr::FINGERPRINT)
            ),
            "our attribute list stops at {next:?}"
        );
    } else {
        assert_eq!(next, None, "stun crate has more attributes");
    }
    // Typed getters agree where both decode.
    if let (Ok(Some(u)), Ok(theirs_u)) = (
        ours.username(),
        stun::textattrs::TextAttribute::get_from_as(&theirs, stun::attributes::ATTR_USERNAME),
    ) {
        assert_eq!(u, theirs_u.text);
    }
    if ours.has_fingerprint() {
        let theirs_fp = stun::fingerprint::FINGERPRINT.check(&theirs).is_ok();
        // stun checks the FINGERPRINT it finds first; ours is the same one.
        assert_eq!(
            ours.verify_fingerprint(),
            Some(theirs_fp),
            "FINGERPRINT verdicts"
        );
    }
}

// ---------------------------------------------------------------------------
// server_sequence: the sans-I/O core under arbitrary client, peer and time input
// ---------------------------------------------------------------------------

/// Relay ports handed out by [`FuzzBinder`]: `PORT_BASE .. PORT_BASE + capacity`.
const PORT_BASE: u16 = 50_000;
const T0_UNIX: u64 = 1_800_000_000;
const SERVER_REALM: &str = "turnstone.fuzz";
const REST_SECRET: &str = "s3cret";

/// A relay binder over a small port range, with handle numbers reused like the shell's.
/// It panics on a double or unknown release.
pub struct FuzzBinder {
    capacity: u16,
    /// Live handles: address, whether it was the reserved `port+1`, bind time (seconds).
    pub live: BTreeMap<u32, (SocketAddr, bool, u64)>,
    /// Released since the last drain.
    pub released: Vec<(u32, bool)>,
    /// Seconds since t0, set by the world before each call.
    pub now: u64,
}

impl FuzzBinder {
    fn new(capacity: u16) -> Self {
        FuzzBinder {
            capacity,
            live: BTreeMap::new(),
            released: Vec::new(),
            now: 0,
        }
    }
    fn port_free(&self, ip: IpAddr, port: u16) -> bool {
        port >= PORT_BASE
            && port < PORT_BASE + self.capacity
            && !self
                .live
                .values()
                .any(|(a, _, _)| a.ip() == ip && a.port() == port)
    }
    fn handle(&self) -> u32 {
        (0..).find(|h| !self.live.contains_key(h)).unwrap_or(0)
    }
}

impl RelayBinder for FuzzBinder {
    fn bind(&mut self, ip: IpAddr, even_port: bool, reserve_next: bool) -> BindResult {
        let port = (PORT_BASE..PORT_BASE + self.capacity).find(|&p| {
            self.port_free(ip, p)
                && (!even_port || p % 2 == 0)
                && (!reserve_next || self.port_free(ip, p + 1))
        });
        let Some(port) = port else {
            return Err(BindError::Exhausted);
        };
        let h = self.handle();
        let addr = SocketAddr::new(ip, port);
        self.live.insert(h, (addr, false, self.now));
        let next = if reserve_next {
            let h2 = self.handle();
            let a2 = SocketAddr::new(ip, port + 1);
            self.live.insert(h2, (a2, true, self.now));
            Some((RelayHandle(h2), a2))
        } else {
            None
        };
        Ok((RelayHandle(h), addr, next))
    }
    fn release(&mut self, relay: RelayHandle) {
        match self.live.remove(&relay.0) {
            Some((_, reserved, _)) => self.released.push((relay.0, reserved)),
            None => panic!("release of a relay handle that is not live: {relay:?}"),
        }
    }
}

/// Who signs a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cred {
    /// 0 alice, 1 bob, 2 REST user (valid), 3 REST user (expired), 4 alice, wrong password.
    pub user: u8,
    /// 0 valid, 1 stale, 2 made for another client, 3 garbage.
    pub nonce: u8,
    pub sha256: bool,
    pub fingerprint: bool,
    /// Reuse the previous transaction ID (a retransmission).
    pub same_tid: bool,
}

impl Cred {
    pub const GOOD: Cred = Cred {
        user: 0,
        nonce: 0,
        sha256: false,
        fingerprint: false,
        same_tid: false,
    };
    fn decode(b: &mut Bytes<'_>) -> Cred {
        let x = b.u8();
        // Mostly good credentials: the interesting code is behind authentication.
        let (user, nonce) = if x & 0xC0 != 0 {
            ((x >> 3) & 1, 0)
        } else {
            (x % 5, (x >> 3) % 4)
        };
        Cred {
            user,
            nonce,
            sha256: x & 0x04 != 0 && x & 0x20 != 0,
            fingerprint: x & 0x10 != 0,
            same_tid: x & 0x3F == 0x21,
        }
    }
}

/// A peer address: a fixed interesting one, a live relay of the server (or the port
/// after it), or any address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerSel {
    Fixed(u8),
    Relay(u8, bool),
    Any(SocketAddr),
}

const FIXED_PEERS: &[&str] = &[
    "127.0.0.1:9000",
    "127.0.0.1:9001",
    "127.0.0.2:9000",
    "8.8.8.8:53",
    "10.0.0.1:1",
    "169.254.169.254:80",
    "[::ffff:127.0.0.1]:9000",
    "[::1]:9000",
    "[2001:4860::8888]:53",
    "[64:ff9b::7f00:1]:9",
    "255.255.255.255:9",
    "[2002:7f00:1::1]:9",
    "127.0.0.1:50000",
    "[::1]:50001",
];

impl PeerSel {
    fn decode(b: &mut Bytes<'_>) -> PeerSel {
        let x = b.u8();
        match x % 8 {
            0..=3 => PeerSel::Fixed(x / 8),
            4 | 5 => PeerSel::Relay(x / 8, x % 8 == 5),
            6 => PeerSel::Any(SocketAddr::from((b.array::<4>(), b.u16()))),
            _ => PeerSel::Any(SocketAddr::from((b.array::<16>(), b.u16()))),
        }
    }
}

/// One step of a server sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Allocate {
        client: u8,
        cred: Cred,
        lifetime: Option<u32>,
        /// REQUESTED-ADDRESS-FAMILY byte (1, 2, other), if any.
        family: Option<u8>,
        even_port: Option<bool>,
        use_token: bool,
        /// REQUESTED-TRANSPORT protocol (17 nearly always).
        transport: u8,
    },
    Refresh {
        client: u8,
        cred: Cred,
        lifetime: Option<u32>,
    },
    Permission {
        client: u8,
        cred: Cred,
        peers: Vec<PeerSel>,
    },
    ChannelBind {
        client: u8,
        cred: Cred,
        number: u16,
        peer: PeerSel,
    },
    /// A signed request of any method with fuzzed attributes.
    Custom {
        client: u8,
        cred: Cred,
        method: u16,
        attrs: Vec<(u16, Vec<u8>)>,
    },
    Send {
        client: u8,
        peer: PeerSel,
        len: u16,
        fingerprint: bool,
    },
    ChannelData {
        client: u8,
        number: u16,
        len: u16,
        /// Extra bytes after the payload (padding).
        extra: u8,
    },
    Peer {
        relay: u8,
        from: PeerSel,
        len: u16,
    },
    Tick {
        secs: u32,
        timeout: bool,
    },
    Raw {
        client: u8,
        bytes: Vec<u8>,
    },
}

fn opt_lifetime(b: &mut Bytes<'_>) -> Option<u32> {
    match b.u8() % 6 {
        0 => None,
        1 => Some(0),
        2 => Some(u32::from(b.u16())),
        3 => Some(u32::MAX),
        4 => Some(60),
        _ => Some(b.u32()),
    }
}

fn channel_number(b: &mut Bytes<'_>) -> u16 {
    let x = b.u8();
    match x % 4 {
        0 | 1 => 0x4000 + u16::from(x / 4 % 8),
        2 => 0x3FF0 + u16::from(x / 4),
        _ => b.u16(),
    }
}

impl Op {
    /// Decodes one op from the fuzz input.
    pub fn decode(b: &mut Bytes<'_>) -> Op {
        let op = b.u8();
        let client = b.u8();
        match op % 16 {
            0 | 1 => {
                let cred = Cred::decode(b);
                let flags = b.u8();
                Op::Allocate {
                    client,
                    cred,
                    lifetime: if flags & 1 != 0 {
                        opt_lifetime(b)
                    } else {
                        None
                    },
                    family: match (flags >> 1) & 7 {
                        1 => Some(1),
                        2 => Some(2),
                        3 => Some(b.u8()),
                        _ => None,
                    },
                    even_port: match (flags >> 4) & 3 {
                        1 => Some(false),
                        2 => Some(true),
                        _ => None,
                    },
                    use_token: flags & 0x40 != 0,
                    transport: if flags & 0x80 != 0 && flags & 1 != 0 {
                        b.u8()
                    } else {
                        17
                    },
                }
            }
            2 => Op::Refresh {
                client,
                cred: Cred::decode(b),
                lifetime: opt_lifetime(b),
            },
            3 | 4 => {
                let cred = Cred::decode(b);
                let n = 1 + usize::from(b.u8() % 3);
                Op::Permission {
                    client,
                    cred,
                    peers: (0..n).map(|_| PeerSel::decode(b)).collect(),
                }
            }
            5 | 6 => Op::ChannelBind {
                client,
                cred: Cred::decode(b),
                number: channel_number(b),
                peer: PeerSel::decode(b),
            },
            7 => {
                let cred = Cred::decode(b);
                let m = b.u8();
                let method = [
                    method::ALLOCATE,
                    method::REFRESH,
                    method::CREATE_PERMISSION,
                    method::CHANNEL_BIND,
                    method::BINDING,
                    method::CONNECT,
                ][usize::from(m % 6)];
                let n = usize::from(b.u8() % 6);
                let attrs = (0..n)
                    .map(|_| {
                        let t = match b.u8() % 8 {
                            0 => attr::XOR_PEER_ADDRESS,
                            1 => attr::LIFETIME,
                            2 => attr::CHANNEL_NUMBER,
                            3 => attr::REQUESTED_TRANSPORT,
                            4 => attr::EVEN_PORT,
                            5 => attr::RESERVATION_TOKEN,
                            6 => attr::REQUESTED_ADDRESS_FAMILY,
                            _ => b.u16(),
                        };
                        let len = usize::from(b.u8() % 24);
                        (t, b.take(len).to_vec())
                    })
                    .collect();
                Op::Custom {
                    client,
                    cred,
                    method,
                    attrs,
                }
            }
            8 | 9 => Op::Send {
                client,
                peer: PeerSel::decode(b),
                len: u16::from(b.u8()),
                fingerprint: b.bool(),
            },
            10 | 11 => Op::ChannelData {
                client,
                number: channel_number(b),
                len: u16::from(b.u8()),
                extra: b.u8() % 5,
            },
            12 => Op::Peer {
                relay: client,
                from: PeerSel::decode(b),
                len: u16::from(b.u8()) * 3,
            },
            13 | 14 => {
                let x = b.u8();
                let secs = match x % 8 {
                    0..=3 => u32::from(x / 8),
                    4 => 30,
                    5 => 300,
                    6 => 600,
                    _ => u32::from(b.u16()),
                };
                Op::Tick {
                    secs,
                    timeout: x & 0x80 == 0,
                }
            }
            _ => {
                let len = usize::from(b.u8());
                Op::Raw {
                    client,
                    bytes: b.take(len).to_vec(),
                }
            }
        }
    }
}

/// The server's configuration for one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setup {
    pub max_allocations: usize,
    pub max_per_user: usize,
    pub max_permissions: usize,
    pub max_channels: usize,
    pub default_lifetime: u64,
    pub max_lifetime: u64,
    /// Relay ports available (per address family).
    pub ports: u16,
    /// 0: allow 127.0.0.0/8; 1: default policy only; 2: allow 127.0.0.0/8 and ::1, deny
    /// 127.0.0.2.
    pub policy: u8,
    /// Advertise 203.0.113.7 (a documentation address the policy denies) for IPv4 relays.
    pub external: bool,
}

impl Setup {
    pub fn decode(b: &mut Bytes<'_>) -> Setup {
        let x = b.u8();
        let y = b.u8();
        Setup {
            max_allocations: 1 + usize::from(x % 5),
            max_per_user: 1 + usize::from((x >> 3) % 4),
            max_permissions: 1 + usize::from(y % 5),
            max_channels: 1 + usize::from((y >> 3) % 5),
            default_lifetime: [600, 60][usize::from(x >> 7)],
            max_lifetime: [3600, 600][usize::from((y >> 6) & 1)],
            ports: 2 + u16::from(x >> 5 & 3) * 2,
            policy: (y >> 7) | ((x >> 5) & 1),
            external: (x >> 6) & 1 == 1 && y & 1 == 1,
        }
    }

    /// The runtime, built the way the server builds it: from a validated [`Config`] (so
    /// fields added to `Runtime`/`Limits` later get their configured defaults).
    fn runtime(&self) -> Runtime {
        let mut c = Config::development();
        c.server.realm = SERVER_REALM.into();
        c.server.software = Some("turnstone-fuzz".into());
        c.server.nonce_lifetime = Duration::from_secs(600);
        c.relay.addresses = vec![
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ];
        c.relay.external_addresses = if self.external {
            vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7))]
        } else {
            vec![]
        };
        c.auth.users = [("alice", "wonderland"), ("bob", "builder")]
            .iter()
            .map(|(u, p)| (u.to_string(), p.to_string()))
            .collect();
        c.auth.secrets = vec![REST_SECRET.to_string()];
        let nets =
            |l: &[&str]| -> Vec<ipnet::IpNet> { l.iter().filter_map(|s| s.parse().ok()).collect() };
        (c.policy.allow_peers, c.policy.deny_peers) = match self.policy {
            0 => (nets(&["127.0.0.0/8"]), vec![]),
            1 => (vec![], vec![]),
            _ => (nets(&["127.0.0.0/8", "::1/128"]), nets(&["127.0.0.2/32"])),
        };
        let l = &mut c.limits;
        l.max_allocations = self.max_allocations;
        l.max_allocations_per_user = Some(self.max_per_user);
        l.max_permissions_per_allocation = self.max_permissions;
        l.max_channels_per_allocation = self.max_channels;
        l.default_lifetime = Duration::from_secs(self.default_lifetime);
        l.max_lifetime = Duration::from_secs(self.max_lifetime);
        Runtime::from_config(&c, [9; 32])
    }
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            max_allocations: 4,
            max_per_user: 3,
            max_permissions: 4,
            max_channels: 4,
            default_lifetime: 600,
            max_lifetime: 3600,
            ports: 6,
            policy: 0,
            external: false,
        }
    }
}

/// An owned copy of an [`Output`].
#[derive(Debug)]
enum Out {
    Nothing,
    ToClient(Vec<u8>),
    ToPeer {
        relay: RelayHandle,
        peer: SocketAddr,
        data: Vec<u8>,
    },
}

/// The server, its binder, the clock and what the checks remember.
pub struct World {
    pub server: Server,
    pub binder: FuzzBinder,
    rt: Arc<Runtime>,
    shared: Arc<Shared>,
    t0: Instant,
    secs: u64,
    tid_counter: u64,
    last_tid: TransactionId,
    token: Option<[u8; 8]>,
    /// Handles reserved with EVEN-PORT R that an Allocate later took over.
    consumed_reserve: Vec<u32>,
    pub created: usize,
    pub ended: usize,
    pub relay_releases: usize,
    pub steps: usize,
}

const CLIENTS: usize = 4;

fn client_ft(i: u8) -> FiveTuple {
    let i = usize::from(i) % CLIENTS;
    let port = 40_000 + i as u16;
    match i {
        2 => FiveTuple {
            transport: Transport::Udp,
            client: SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
            server: SocketAddr::from((Ipv6Addr::LOCALHOST, 3478)),
        },
        3 => FiveTuple {
            transport: Transport::Tcp,
            client: SocketAddr::from(([127, 0, 0, 1], port)),
            server: SocketAddr::from(([127, 0, 0, 1], 3478)),
        },
        _ => FiveTuple {
            transport: Transport::Udp,
            client: SocketAddr::from(([127, 0, 0, 1], port)),
            server: SocketAddr::from(([127, 0, 0, 1], 3478)),
        },
    }
}

impl World {
    pub fn new(setup: Setup) -> World {
        let shared = Shared::new(setup.runtime());
        let rt = shared.runtime.load_full();
        let mut server = Server::new(shared.clone());
        server.set_collect_events(true);
        World {
            server,
            binder: FuzzBinder::new(setup.ports),
            rt,
            shared,
            t0: Instant::now(),
            secs: 0,
            tid_counter: 0,
            last_tid: TransactionId([0; 12]),
            token: None,
            consumed_reserve: Vec::new(),
            created: 0,
            ended: 0,
            relay_releases: 0,
            steps: 0,
        }
    }

    fn clock(&self) -> Clock {
        Clock {
            now: self.now(),
            unix: T0_UNIX + self.secs,
        }
    }

    pub fn now(&self) -> Instant {
        self.t0 + Duration::from_secs(self.secs)
    }

    fn tid(&mut self, same: bool) -> TransactionId {
        if !same {
            self.tid_counter += 1;
            let mut t = [0u8; 12];
            t[4..].copy_from_slice(&self.tid_counter.to_be_bytes());
            self.last_tid = TransactionId(t);
        }
        self.last_tid
    }

    fn peer(&self, sel: PeerSel) -> SocketAddr {
        match sel {
            PeerSel::Fixed(i) => FIXED_PEERS[usize::from(i) % FIXED_PEERS.len()]
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 9))),
            PeerSel::Relay(i, next) => {
                let relays: Vec<SocketAddr> =
                    self.server.allocations().map(|a| a.advertised).collect();
                let base = relays
                    .get(usize::from(i) % relays.len().max(1))
                    .copied()
                    .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], PORT_BASE)));
                if next {
                    SocketAddr::new(base.ip(), base.port().wrapping_add(1))
                } else {
                    base
                }
            }
            PeerSel::Any(a) => a,
        }
    }

    /// A signed request (USERNAME, REALM, NONCE, MESSAGE-INTEGRITY[-SHA256], FINGERPRINT as
    /// `cred` says) with `attrs` first.
    fn signed(
        &mut self,
        ft: FiveTuple,
        m: u16,
        cred: Cred,
        attrs: impl FnOnce(&mut MessageWriter<'_>),
    ) -> Vec<u8> {
        let unix = T0_UNIX + self.secs;
        let nonce = match cred.nonce {
            0 => self.rt.nonces.make(ft.client, unix),
            1 => self.rt.nonces.make(ft.client, unix.saturating_sub(10_000)),
            2 => self
                .rt
                .nonces
                .make(SocketAddr::from(([192, 0, 2, 1], 1)), unix),
            _ => "not-a-nonce".to_string(),
        };
        let (user, pass) = match cred.user % 5 {
            0 => ("alice".to_string(), "wonderland".to_string()),
            1 => ("bob".to_string(), "builder".to_string()),
            2 => {
                let u = auth::rest_username(unix + 3600, "carol");
                let p = auth::rest_password(REST_SECRET, &u);
                (u, p)
            }
            3 => {
                let u = auth::rest_username(unix.saturating_sub(1), "dave");
                let p = auth::rest_password(REST_SECRET, &u);
                (u, p)
            }
            _ => ("alice".to_string(), "wrong".to_string()),
        };
        let key = auth::long_term_key(&user, SERVER_REALM, &pass);
        let tid = self.tid(cred.same_tid);
        let mut buf = Vec::new();
        let mut w = MessageWriter::new(&mut buf, m, Class::Request, tid);
        attrs(&mut w);
        w.attr(attr::USERNAME, user.as_bytes());
        w.attr(attr::REALM, SERVER_REALM.as_bytes());
        w.attr(attr::NONCE, nonce.as_bytes());
        if cred.sha256 {
            w.message_integrity_sha256(&key);
        } else {
            w.message_integrity(&key);
        }
        if cred.fingerprint {
            w.fingerprint();
        }
        w.finish();
        buf
    }

    fn datagram(&mut self, op: &Op) -> Option<(FiveTuple, Vec<u8>)> {
        Some(match op {
            Op::Allocate {
                client,
                cred,
                lifetime,
                family,
                even_port,
                use_token,
                transport,
            } => {
                let ft = client_ft(*client);
                let token = if *use_token { self.token } else { None };
                let req = self.signed(ft, method::ALLOCATE, *cred, |w| {
                    w.attr(attr::REQUESTED_TRANSPORT, &[*transport, 0, 0, 0]);
                    if let Some(l) = lifetime {
                        w.u32_attr(attr::LIFETIME, *l);
                    }
                    if let Some(f) = family {
                        w.attr(attr::REQUESTED_ADDRESS_FAMILY, &[*f, 0, 0, 0]);
                    }
                    if let Some(r) = even_port {
                        w.attr(attr::EVEN_PORT, &[if *r { 0x80 } else { 0 }]);
                    }
                    if let Some(t) = token {
                        w.attr(attr::RESERVATION_TOKEN, &t);
                    }
                });
                (ft, req)
            }
            Op::Refresh {
                client,
                cred,
                lifetime,
            } => {
                let ft = client_ft(*client);
                let req = self.signed(ft, method::REFRESH, *cred, |w| {
                    if let Some(l) = lifetime {
                        w.u32_attr(attr::LIFETIME, *l);
                    }
                });
                (ft, req)
            }
            Op::Permission {
                client,
                cred,
                peers,
            } => {
                let ft = client_ft(*client);
                let addrs: Vec<SocketAddr> = peers.iter().map(|p| self.peer(*p)).collect();
                let req = self.signed(ft, method::CREATE_PERMISSION, *cred, |w| {
                    for a in &addrs {
                        w.xor_address(attr::XOR_PEER_ADDRESS, *a);
                    }
                });
                (ft, req)
            }
            Op::ChannelBind {
                client,
                cred,
                number,
                peer,
            } => {
                let ft = client_ft(*client);
                let peer = self.peer(*peer);
                let req = self.signed(ft, method::CHANNEL_BIND, *cred, |w| {
                    let [a, b] = number.to_be_bytes();
                    w.attr(attr::CHANNEL_NUMBER, &[a, b, 0, 0]);
                    w.xor_address(attr::XOR_PEER_ADDRESS, peer);
                });
                (ft, req)
            }
            Op::Custom {
                client,
                cred,
                method: m,
                attrs,
            } => {
                let ft = client_ft(*client);
                let req = self.signed(ft, *m, *cred, |w| {
                    for (t, v) in attrs {
                        w.attr(*t, v);
                    }
                });
                (ft, req)
            }
            Op::Send {
                client,
                peer,
                len,
                fingerprint,
            } => {
                let ft = client_ft(*client);
                let peer = self.peer(*peer);
                let tid = self.tid(false);
                let mut buf = Vec::new();
                let mut w = MessageWriter::new(&mut buf, method::SEND, Class::Indication, tid);
                w.xor_address(attr::XOR_PEER_ADDRESS, peer);
                w.attr(attr::DATA, &payload(*len));
                if *fingerprint {
                    w.fingerprint();
                }
                w.finish();
                (ft, buf)
            }
            Op::ChannelData {
                client,
                number,
                len,
                extra,
            } => {
                let ft = client_ft(*client);
                let mut buf = Vec::new();
                buf.extend_from_slice(&number.to_be_bytes());
                buf.extend_from_slice(&len.to_be_bytes());
                buf.extend_from_slice(&payload(*len));
                buf.extend(std::iter::repeat_n(0, usize::from(*extra)));
                (ft, buf)
            }
            Op::Raw { client, bytes } => (client_ft(*client), bytes.clone()),
            Op::Peer { .. } | Op::Tick { .. } => return None,
        })
    }

    /// Applies one op and checks every invariant.
    pub fn step(&mut self, op: &Op) {
        self.steps += 1;
        self.binder.now = self.secs;
        match op {
            Op::Tick { secs, timeout } => {
                self.secs += u64::from(*secs);
                self.binder.now = self.secs;
                if *timeout {
                    let now = self.now();
                    self.server.handle_timeout(now, &mut self.binder);
                    self.after_step();
                    self.check_after_timeout();
                    return;
                }
            }
            Op::Peer { relay, from, len } => {
                let handles: Vec<u32> = self.binder.live.keys().copied().collect();
                let relay = match handles.get(usize::from(*relay) % handles.len().max(1)) {
                    Some(h) if relay & 0x80 == 0 => RelayHandle(*h),
                    _ => RelayHandle(u32::from(*relay)),
                };
                let from = self.peer(*from);
                self.peer_datagram(relay, from, usize::from(*len));
            }
            _ => {
                if let Some((ft, bytes)) = self.datagram(op) {
                    self.client_datagram(ft, &bytes);
                }
            }
        }
        self.after_step();
    }

    fn client_datagram(&mut self, ft: FiveTuple, bytes: &[u8]) {
        let clock = self.clock();
        let out = match self
            .server
            .handle_client(ft, bytes, clock, &mut self.binder)
        {
            Output::Nothing => Out::Nothing,
            Output::ToClient(d) => Out::ToClient(d.to_vec()),
            Output::ToPeer { relay, peer, data } => Out::ToPeer {
                relay,
                peer,
                data: data.to_vec(),
            },
        };
        let now = self.now();
        match out {
            Out::Nothing => {}
            Out::ToClient(resp) => {
                if let Ok(req) = Message::parse(bytes) {
                    let r = Message::parse(&resp).expect("a response to a STUN request parses");
                    assert_eq!(r.transaction_id(), req.transaction_id());
                    assert_eq!(r.method(), req.method());
                    assert!(matches!(r.class(), Class::Success | Class::Error));
                    if let Ok(Some(t)) = r.reservation_token() {
                        self.token = Some(t);
                    }
                    if r.class() == Class::Success && req.method() == method::ALLOCATE {
                        assert!(
                            self.server.allocation_by_five_tuple(&ft).is_some(),
                            "Allocate success without an allocation"
                        );
                    }
                }
            }
            Out::ToPeer { relay, peer, data } => {
                let a = self
                    .server
                    .allocations()
                    .find(|a| a.relay == relay)
                    .expect("ToPeer from a relay that no allocation owns");
                assert_eq!(
                    a.five_tuple, ft,
                    "data from one client went out another allocation's relay"
                );
                assert!(
                    a.permission(peer.ip(), now).is_some(),
                    "relayed to {peer} without a live permission"
                );
                assert_eq!(
                    peer.is_ipv6(),
                    a.relay_addr.is_ipv6(),
                    "relayed across address families"
                );
                let allowed =
                    self.rt.policy.is_allowed(peer.ip()) || self.shared.is_live_relay(peer);
                // (fuzz/regressions/server_sequence/channeldata-to-ended-relay: a channel
                // to another allocation's relay once outlived that allocation.)
                assert!(
                    allowed,
                    "relayed to {peer}, which the policy denies and is no live relay \
                     (input {bytes:02x?})"
                );
                let expected = match parse_channel_data(bytes) {
                    Some((_, d)) => d,
                    None => Message::parse(bytes)
                        .ok()
                        .and_then(|m| m.data())
                        .expect("relayed data comes from a Send indication"),
                };
                assert_eq!(data, expected, "relayed bytes are not the client's");
            }
        }
    }

    fn peer_datagram(&mut self, relay: RelayHandle, from: SocketAddr, len: usize) {
        let now = self.now();
        let mut buf = vec![0xEEu8; PEER_HEADROOM + len + PEER_TAILROOM];
        let data = payload(len as u16);
        buf[PEER_HEADROOM..PEER_HEADROOM + len].copy_from_slice(&data);
        let Some((ft, range)) = self.server.handle_peer(
            relay,
            from,
            &mut buf,
            PEER_HEADROOM..PEER_HEADROOM + len,
            now,
        ) else {
            return;
        };
        let a = self
            .server
            .allocations()
            .find(|a| a.relay == relay)
            .expect("peer data delivered for a relay that no allocation owns");
        assert_eq!(a.five_tuple, ft, "peer data delivered to another client");
        assert!(
            a.permission(from.ip(), now).is_some(),
            "peer data from {from} without a permission"
        );
        assert!(
            self.rt.policy.is_allowed(from.ip()) || self.shared.is_live_relay(from),
            "peer data from denied {from} that is no live relay"
        );
        let framed = buf.get(range).expect("range in the buffer");
        if let Some(number) = a.channel_for_peer(from, now) {
            let (n, d) = parse_channel_data(framed).expect("ChannelData to the client parses");
            assert_eq!(n, number);
            assert_eq!(d, &data[..]);
            let want = if ft.transport.is_stream() {
                padded(4 + len)
            } else {
                4 + len
            };
            assert_eq!(framed.len(), want);
        } else {
            let m = Message::parse(framed).expect("Data indication parses");
            assert_eq!((m.method(), m.class()), (method::DATA, Class::Indication));
            assert_eq!(m.xor_peer_address(), Ok(Some(from)));
            assert_eq!(m.data(), Some(&data[..]));
        }
    }

    /// Invariants that hold after every step.
    fn after_step(&mut self) {
        let now = self.now();
        let limits = &self.rt.limits;
        for e in self.server.drain_events() {
            match e {
                Event::AllocationCreated { .. } => self.created += 1,
                Event::AllocationEnded { .. } => self.ended += 1,
                Event::AllocationUsage { .. } => {}
                Event::ErrorResponse { .. } => {}
            }
        }
        let count = self.server.allocation_count();
        assert_eq!(count, self.server.allocations().count());
        assert_eq!(count, self.created - self.ended, "events vs table");
        assert_eq!(
            self.shared.total_allocations(),
            count,
            "quota count differs from the allocation table"
        );
        assert!(count <= limits.max_allocations, "more allocations than max");
        let mut per_user: HashMap<&str, usize> = HashMap::new();
        let mut relays = Vec::new();
        for a in self.server.allocations() {
            *per_user.entry(&a.username).or_default() += 1;
            assert_eq!(
                self.server
                    .allocation_by_five_tuple(&a.five_tuple)
                    .map(|x| x.id),
                Some(a.id)
            );
            assert!(
                a.permissions.len() <= limits.max_permissions_per_allocation,
                "{} permissions > max {}",
                a.permissions.len(),
                limits.max_permissions_per_allocation
            );
            assert!(
                a.channels.len() <= limits.max_channels_per_allocation,
                "{} channels > max {}",
                a.channels.len(),
                limits.max_channels_per_allocation
            );
            for (i, c) in a.channels.iter().enumerate() {
                for d in &a.channels[i + 1..] {
                    assert_ne!(c.number, d.number, "channel number bound twice");
                    assert_ne!(c.peer, d.peer, "peer bound to two channels");
                }
                assert!(c.expires <= now + turnstone::server::CHANNEL_LIFETIME);
                assert!((0x4000..=0x7FFF).contains(&c.number));
            }
            for (i, p) in a.permissions.iter().enumerate() {
                assert!(a.permissions[i + 1..].iter().all(|q| q.ip != p.ip));
                assert!(p.expires <= now + turnstone::server::PERMISSION_LIFETIME);
            }
            assert!(
                a.expires <= now + limits.max_lifetime,
                "allocation lifetime above max_lifetime"
            );
            assert_eq!(
                Some(a.relay_addr.ip()),
                self.rt.relay.for_family(a.relay_addr.is_ipv6())
            );
            assert!(self.shared.is_live_relay(a.advertised));
            let live = self.binder.live.get(&a.relay.0);
            assert!(
                live.is_some_and(|(addr, _, _)| *addr == a.relay_addr),
                "allocation relay handle not bound (or bound elsewhere)"
            );
            if live.is_some_and(|l| l.1) && !self.consumed_reserve.contains(&a.relay.0) {
                self.consumed_reserve.push(a.relay.0);
            }
            relays.push(a.relay.0);
        }
        for n in per_user.values() {
            assert!(*n <= limits.max_allocations_per_user, "per-user quota");
        }
        relays.sort_unstable();
        let before = relays.len();
        relays.dedup();
        assert_eq!(before, relays.len(), "two allocations share a relay");
        // Every live handle is an allocation's relay or an outstanding reservation.
        for (h, (_, reserved, _)) in &self.binder.live {
            assert!(
                relays.binary_search(h).is_ok() || *reserved,
                "relay handle {h} leaked (bound, no allocation)"
            );
        }
        for (h, reserved) in self.binder.released.drain(..) {
            if !reserved || self.consumed_reserve.contains(&h) {
                self.relay_releases += 1;
            }
            self.consumed_reserve.retain(|x| *x != h);
        }
        assert_eq!(
            self.relay_releases, self.ended,
            "released relays differ from ended allocations"
        );
        let _ = self.server.poll_timeout();
    }

    /// Invariants right after `handle_timeout(now)`: nothing expired is left.
    fn check_after_timeout(&self) {
        let now = self.now();
        for a in self.server.allocations() {
            assert!(
                a.expires > now,
                "expired allocation survived handle_timeout"
            );
            assert!(a.permissions.iter().all(|p| p.expires > now));
            assert!(a
                .channels
                .iter()
                .all(|c| c.expires + CHANNEL_COOLDOWN > now));
        }
        let reserve_age = RESERVATION_LIFETIME.as_secs();
        for (h, (_, reserved, at)) in &self.binder.live {
            if *reserved && !self.consumed_reserve.contains(h) {
                assert!(
                    at + reserve_age > self.secs,
                    "reservation outlived {reserve_age}s"
                );
            }
        }
        if let Some(t) = self.server.poll_timeout() {
            assert!(t > now, "poll_timeout in the past after handle_timeout");
        }
    }

    /// Ends everything; all relays must be released and the quota back to zero.
    pub fn finish(&mut self) {
        let now = self.now();
        self.server.close_all(now, &mut self.binder);
        self.after_step();
        assert_eq!(self.server.allocation_count(), 0);
        assert_eq!(self.shared.total_allocations(), 0);
        assert!(
            self.binder.live.is_empty(),
            "relays left bound after close_all"
        );
    }
}

fn payload(len: u16) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ 0x5A)
        .collect()
}

/// Runs `ops` on a fresh world, checking after every step.
pub fn run_ops(setup: Setup, ops: &[Op]) -> World {
    let mut w = World::new(setup);
    for op in ops {
        w.step(op);
    }
    w.finish();
    w
}

/// Maximum steps per fuzz input.
const MAX_STEPS: usize = 200;

/// A sequence of client datagrams, peer datagrams and time steps from the fuzz input.
pub fn check_server_sequence(data: &[u8]) {
    let mut b = Bytes::new(data);
    let setup = Setup::decode(&mut b);
    let debug = std::env::var_os("FUZZ_DEBUG").is_some();
    if debug {
        eprintln!("{setup:?}");
    }
    let mut w = World::new(setup);
    let mut n = 0;
    while !b.is_empty() && n < MAX_STEPS {
        let op = Op::decode(&mut b);
        if debug {
            eprintln!("{op:?}");
        }
        w.step(&op);
        if debug {
            eprintln!(
                "  allocations {:?} last events: created {} ended {}",
                w.server
                    .allocations()
                    .map(|a| (
                        a.five_tuple.client,
                        a.advertised,
                        a.permissions.len(),
                        a.channels.len()
                    ))
                    .collect::<Vec<_>>(),
                w.created,
                w.ended
            );
        }
        n += 1;
    }
    w.finish();
}

// ---------------------------------------------------------------------------
// handover_state
// ---------------------------------------------------------------------------

/// A binder for imported state: the sockets exist already; releases are counted.
struct ImportBinder {
    released: usize,
}

impl RelayBinder for ImportBinder {
    fn bind(&mut self, _ip: IpAddr, _even_port: bool, _reserve_next: bool) -> BindResult {
        Err(BindError::Exhausted)
    }
    fn release(&mut self, _relay: RelayHandle) {
        self.released += 1;
    }
}

/// An upgrade's state document (with a correct length and SHA-256, so the parser and
/// the checks behind them are reached): refused with a reason, or accepted, written
/// again to the same document, imported into fresh cores (each shard whole or not at
/// all), and forgotten or expired without a panic, every quota slot given back.
pub fn check_handover_state(data: &[u8]) {
    use turnstone::net::handover;
    let digest = handover::sha256(data);
    let h = match handover::decode(data, data.len() as u64, &digest) {
        Ok(h) => h,
        Err(e) => {
            assert!(!e.is_empty(), "refused without a reason");
            return;
        }
    };
    let again = handover::encode(&h).expect("an accepted state encodes");
    let back = handover::decode(&again, again.len() as u64, &handover::sha256(&again))
        .expect("an accepted state, written again, is accepted");
    assert_eq!(back, h, "encode/decode round trip");
    let now = Instant::now();
    for (k, shard) in h.shards.iter().enumerate() {
        let shared = Shared::new(Runtime::from_config(&Config::development(), [1; 32]));
        let mut server = Server::new(shared.clone());
        let clock = turnstone::server::MonoClock {
            now,
            mono_ns: 1 << 40,
        };
        let mut binder = ImportBinder { released: 0 };
        match server.import_udp(shard, clock, &mut |i| Some(RelayHandle(i))) {
            Ok(n) => {
                assert_eq!(server.allocation_count(), n, "shard {k}");
                assert_eq!(shared.total_allocations(), n, "shard {k}: quota slots");
                if k % 2 == 0 {
                    server.forget_udp(&mut binder);
                } else {
                    // Far past every expiry and cool-down.
                    server.handle_timeout(now + Duration::from_secs(400 * 86_400), &mut binder);
                }
                assert_eq!(server.allocation_count(), 0, "shard {k}: all gone");
                assert_eq!(shared.total_allocations(), 0, "shard {k}: slots back");
            }
            Err(e) => {
                assert!(!e.is_empty());
                assert_eq!(
                    server.allocation_count(),
                    0,
                    "a refused shard changes nothing"
                );
            }
        }
    }
}
