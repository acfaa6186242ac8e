//! Black-box robustness tests against the real `turnstone` binary (UDP): garbage,
//! truncated, oversized and lying datagrams, ChannelData on unbound channels, and the
//! authentication / policy refusals (401, 438, 403, 420). After every case a good
//! client must still get a full authenticated Allocate (alice/wonderland).
//!
//! Requests are built with `turnstone::proto::MessageWriter` and sent from plain
//! `std::net::UdpSocket`s with read timeouts; every loop is bounded.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{
    assert_peers_refused, assert_serves, channel_data, tid, unknown_attributes, Answer, Backend,
    ServerOptions, TestServer, TurnClient, PASSWORD, PROTO_UDP, REALM, SECRET, USER,
};
use turnstone::auth::rest_password;
use turnstone::proto::{attr, method, Class, MessageWriter};

/// How long "no answer" is waited for.
const SILENCE: Duration = Duration::from_millis(400);
/// How often a packet is sent before a test gives up on it.
const ATTEMPTS: usize = 8;

fn client(server: SocketAddr, user: &str, password: &str) -> TurnClient {
    TurnClient::udp(server, user, password)
}

/// A server with default options except those from `f`.
fn start(f: impl FnOnce(ServerOptions) -> ServerOptions) -> TestServer {
    TestServer::start(f(ServerOptions::default()))
}

/// Deterministic xorshift64* (no extra dependency; the seed makes failures reproducible).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

// ---------------------------------------------------------------------------
// Garbage
// ---------------------------------------------------------------------------

/// Every prefix of real requests (and of ChannelData), from a client with and without an
/// allocation.
#[test]
fn truncated_datagrams() {
    let server = TestServer::start_default();
    let mut c = client(server.addr, USER, PASSWORD);
    c.fetch_nonce();
    let peer = SocketAddr::from(([127, 0, 0, 1], 9));
    let samples: Vec<Vec<u8>> = vec![
        c.signed(method::ALLOCATE, &|w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[PROTO_UDP, 0, 0, 0]);
            w.u32_attr(attr::LIFETIME, 600);
        }),
        c.signed(method::CHANNEL_BIND, &|w| {
            w.attr(attr::CHANNEL_NUMBER, &[0x40, 0x00, 0, 0]);
            w.xor_address(attr::XOR_PEER_ADDRESS, peer);
        }),
        c.plain(method::BINDING, &|w| {
            w.attr(attr::SOFTWARE, b"truncate me").fingerprint();
        }),
        {
            let mut b = Vec::new();
            let mut w = MessageWriter::new(&mut b, method::SEND, Class::Indication, tid());
            w.xor_address(attr::XOR_PEER_ADDRESS, peer)
                .attr(attr::DATA, &[0xAB; 37]);
            w.finish();
            b
        },
        {
            let mut b = vec![0x40, 0x00, 0x00, 0x20];
            b.extend_from_slice(&[0x5A; 32]);
            b
        },
    ];
    let send_prefixes = |sock: &UdpSocket| {
        for s in &samples {
            for n in 0..s.len() {
                sock.send_to(&s[..n], server.addr).expect("send");
            }
        }
    };
    send_prefixes(c.udp_socket());
    assert_serves(server.addr, "truncated datagrams (no allocation)");

    // The same from a client that has an allocation and a channel.
    let mut a = client(server.addr, USER, PASSWORD);
    a.must_allocate();
    assert_eq!(a.channel_bind(0x4000, peer).class(), Class::Success);
    send_prefixes(a.udp_socket());
    assert_serves(server.addr, "truncated datagrams (with an allocation)");
    // The allocation still works too.
    a.drain();
    assert_eq!(
        a.refresh(600).class(),
        Class::Success,
        "Refresh after truncated datagrams"
    );
}

/// A few thousand random datagrams: pure noise, STUN-looking headers with random
/// bodies, ChannelData-looking ones, and bit flips of valid messages.
#[test]
fn random_datagrams() {
    let server = TestServer::start_default();
    let mut rng = Rng(0x7475_726e_7374_6f6e);
    let noise = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut c = client(server.addr, USER, PASSWORD);
    c.must_allocate();
    let peer = SocketAddr::from(([127, 0, 0, 1], 9));
    assert_eq!(c.create_permission(peer).class(), Class::Success);
    let valid: Vec<Vec<u8>> = vec![
        c.signed(method::REFRESH, &|w| {
            w.u32_attr(attr::LIFETIME, 600);
        }),
        c.signed(method::CREATE_PERMISSION, &|w| {
            w.xor_address(attr::XOR_PEER_ADDRESS, peer);
        }),
        c.signed(method::CHANNEL_BIND, &|w| {
            w.attr(attr::CHANNEL_NUMBER, &[0x40, 0x01, 0, 0]);
            w.xor_address(attr::XOR_PEER_ADDRESS, peer);
        }),
        c.plain(method::BINDING, &|w| {
            w.attr(attr::SOFTWARE, b"x").fingerprint();
        }),
        {
            let mut b = Vec::new();
            let mut w = MessageWriter::new(&mut b, method::SEND, Class::Indication, tid());
            w.xor_address(attr::XOR_PEER_ADDRESS, peer)
                .attr(attr::DATA, b"hello");
            w.finish();
            b
        },
    ];
    let started = Instant::now();
    let mut sent = 0usize;
    for i in 0..4000usize {
        let len = rng.below(600);
        let mut d = rng.bytes(len);
        match i % 5 {
            0 => {} // pure noise
            1 if len >= 20 => {
                // STUN header, magic cookie, length sometimes right.
                d[0] &= 0x3F;
                d[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
                if rng.below(2) == 0 {
                    let body = ((len - 20) & !3) as u16;
                    d.truncate(20 + usize::from(body));
                    d[2..4].copy_from_slice(&body.to_be_bytes());
                }
            }
            2 if len >= 4 => {
                // ChannelData, sometimes with the right length.
                d[0] = 0x40 | (d[0] & 0x3F);
                if rng.below(2) == 0 {
                    let body = (len - 4) as u16;
                    d[2..4].copy_from_slice(&body.to_be_bytes());
                }
            }
            _ => {
                // Bit flips (1..=4) in a valid message, sent from the allocation's socket.
                let mut v = valid[rng.below(valid.len())].clone();
                for _ in 0..=rng.below(4) {
                    let bit = rng.below(v.len() * 8);
                    v[bit / 8] ^= 1 << (bit % 8);
                }
                c.udp_socket().send_to(&v, server.addr).expect("send");
                sent += 1;
                continue;
            }
        }
        noise.send_to(&d, server.addr).expect("send");
        sent += 1;
        if i % 200 == 0 {
            // Let the server (and the 2 shared cores) breathe a little.
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    eprintln!("sent {sent} random datagrams in {:?}", started.elapsed());
    assert_serves(server.addr, "random datagrams");
    c.drain();
    let r = c.refresh(600);
    assert_eq!(
        r.class(),
        Class::Success,
        "allocation after bit flips: {}",
        r.describe()
    );
}

/// 65507-byte datagrams (the largest UDP payload over IPv4).
#[test]
fn oversized_datagrams() {
    let server = TestServer::start_default();
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    const MAX: usize = 65_507;
    let mut rng = Rng(42);
    let mut variants: Vec<Vec<u8>> = vec![vec![0u8; MAX], rng.bytes(MAX)];
    // A Binding header whose length field says 65484 (the largest multiple of 4 that
    // fits), padded out to 65507 bytes.
    let mut v = vec![0u8; MAX];
    v[0..2].copy_from_slice(&0x0001u16.to_be_bytes());
    v[2..4].copy_from_slice(&65_484u16.to_be_bytes());
    v[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
    variants.push(v.clone());
    // The same, consistent: 20 + 65484 bytes, one SOFTWARE attribute filling it.
    v.truncate(20 + 65_484);
    v[20..22].copy_from_slice(&attr::SOFTWARE.to_be_bytes());
    v[22..24].copy_from_slice(&65_480u16.to_be_bytes());
    variants.push(v.clone());
    // An Allocate of that size.
    v[0..2].copy_from_slice(&0x0003u16.to_be_bytes());
    variants.push(v);
    // ChannelData claiming 65503 bytes.
    let mut cd = vec![0x40, 0x00, 0xFF, 0xDF];
    cd.resize(MAX, 0x11);
    variants.push(cd);
    for v in &variants {
        s.send_to(v, server.addr).expect("send 65507-byte datagram");
    }
    // From a client with an allocation and a channel as well.
    let mut c = client(server.addr, USER, PASSWORD);
    c.must_allocate();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    let peer_addr = peer.local_addr().unwrap();
    assert_eq!(c.channel_bind(0x4000, peer_addr).class(), Class::Success);
    for v in &variants {
        c.udp_socket().send_to(v, server.addr).expect("send");
    }
    assert_serves(server.addr, "65507-byte datagrams");
    c.drain();
    assert_eq!(c.refresh(600).class(), Class::Success);
}

/// A STUN header claiming more than is there, and attributes overflowing the message.
#[test]
fn lying_lengths() {
    let server = TestServer::start_default();
    let mut c = client(server.addr, USER, PASSWORD);

    // Header says 100 bytes of attributes, none present: RFC 8489 6.3 -> discard.
    let t = tid();
    let mut m = Vec::new();
    m.extend_from_slice(&0x0001u16.to_be_bytes());
    m.extend_from_slice(&100u16.to_be_bytes());
    m.extend_from_slice(&0x2112_A442u32.to_be_bytes());
    m.extend_from_slice(&t.0);
    c.udp_socket().send_to(&m, server.addr).unwrap();
    // Header says 8, 4 present.
    let mut m2 = m.clone();
    m2[2..4].copy_from_slice(&8u16.to_be_bytes());
    m2.extend_from_slice(&[0x80, 0x22, 0x00, 0x04]);
    c.udp_socket().send_to(&m2, server.addr).unwrap();
    // Header says 8 and 12 are there (trailing bytes).
    let mut m3 = m2.clone();
    m3.extend_from_slice(&[0x61; 8]);
    c.udp_socket().send_to(&m3, server.addr).unwrap();
    c.assert_silent(
        "STUN header length larger/smaller than the datagram",
        SILENCE,
    );

    // Attribute overflowing the message: length field consistent, SOFTWARE claims 200.
    let mut ov = Vec::new();
    ov.extend_from_slice(&0x0001u16.to_be_bytes());
    ov.extend_from_slice(&8u16.to_be_bytes());
    ov.extend_from_slice(&0x2112_A442u32.to_be_bytes());
    let t2 = tid();
    ov.extend_from_slice(&t2.0);
    ov.extend_from_slice(&attr::SOFTWARE.to_be_bytes());
    ov.extend_from_slice(&200u16.to_be_bytes());
    ov.extend_from_slice(b"abcd");
    // A valid first attribute, then a USERNAME whose value runs past the end.
    let mut ov2 = ov.clone();
    ov2[2..4].copy_from_slice(&12u16.to_be_bytes());
    ov2[22..24].copy_from_slice(&4u16.to_be_bytes());
    ov2.extend_from_slice(&attr::USERNAME.to_be_bytes());
    ov2.extend_from_slice(&8u16.to_be_bytes());
    // an Allocate with USERNAME overflowing, MESSAGE-INTEGRITY of wrong length.
    let mut ov3 = Vec::new();
    ov3.extend_from_slice(&0x0003u16.to_be_bytes());
    ov3.extend_from_slice(&12u16.to_be_bytes());
    ov3.extend_from_slice(&0x2112_A442u32.to_be_bytes());
    ov3.extend_from_slice(&tid().0);
    ov3.extend_from_slice(&attr::MESSAGE_INTEGRITY.to_be_bytes());
    ov3.extend_from_slice(&8u16.to_be_bytes());
    ov3.extend_from_slice(&[0u8; 8]);
    for m in [&ov, &ov2, &ov3] {
        c.udp_socket().send_to(m, server.addr).unwrap();
    }
    // Malformed attributes may be dropped or answered with 400 (RFC 8489 6.3.1.1);
    // anything else is wrong.
    let until = Instant::now() + SILENCE;
    while let Some(raw) = c.recv(until.saturating_duration_since(Instant::now())) {
        let r = Answer { raw };
        assert_eq!(
            (r.class(), r.code()),
            (Class::Error, Some(400)),
            "answer to a malformed attribute list: {}",
            r.describe()
        );
    }
    assert_serves(server.addr, "lying lengths");
}

/// ChannelData on a channel nobody bound: dropped, the peer gets nothing; then the
/// same once bound goes through (the control).
#[test]
fn channel_data_for_unbound_channel() {
    let server = TestServer::start_default();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(SILENCE)).unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let mut buf = [0u8; 2048];

    // No allocation at all.
    let mut stranger = client(server.addr, USER, PASSWORD);
    stranger
        .udp_socket()
        .send_to(&channel_data(0x4000, b"no allocation"), server.addr)
        .unwrap();
    stranger.assert_silent("ChannelData without an allocation", SILENCE);

    // An allocation with a permission for the peer, but no channel.
    let mut c = client(server.addr, USER, PASSWORD);
    c.must_allocate();
    assert_eq!(c.create_permission(peer_addr).class(), Class::Success);
    for n in [0x4000u16, 0x4001, 0x4FFF, 0x7FFF, 0x8000, 0xFFFF] {
        c.udp_socket()
            .send_to(&channel_data(n, b"unbound channel"), server.addr)
            .unwrap();
    }
    // Length field larger than the payload.
    c.udp_socket()
        .send_to(&[0x40, 0x01, 0x01, 0x00, 1, 2, 3], server.addr)
        .unwrap();
    c.assert_silent("ChannelData on an unbound channel", SILENCE);
    if let Ok((n, from)) = peer.recv_from(&mut buf) {
        panic!("peer got {n} bytes from {from} for an unbound channel");
    }

    // Control: once bound, the same frame reaches the peer.
    let r = c.channel_bind(0x4001, peer_addr);
    assert_eq!(r.class(), Class::Success, "ChannelBind: {}", r.describe());
    let payload = b"bound channel".to_vec();
    let mut got = None;
    for _ in 0..ATTEMPTS {
        c.udp_socket()
            .send_to(&channel_data(0x4001, &payload), server.addr)
            .unwrap();
        if let Ok((n, _)) = peer.recv_from(&mut buf) {
            got = Some(buf[..n].to_vec());
            break;
        }
    }
    assert_eq!(
        got,
        Some(payload),
        "ChannelData on a bound channel must reach the peer"
    );
    assert_serves(server.addr, "ChannelData on unbound channels");
}

// ---------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------

#[test]
fn wrong_password_gets_401() {
    let server = TestServer::start_default();
    let mut c = client(server.addr, USER, "not-wonderland");
    let r = c.allocate();
    assert_eq!(r.code(), Some(401), "wrong password: {}", r.describe());
    let m = r.msg();
    assert_eq!(m.realm().unwrap(), Some(REALM), "401 carries REALM");
    assert!(m.nonce().unwrap().is_some(), "401 carries NONCE");
    assert!(
        !m.has_message_integrity(),
        "a 401 to a request that failed authentication cannot be signed"
    );
    // Unknown user too.
    let mut u = client(server.addr, "mallory", PASSWORD);
    assert_eq!(u.allocate().code(), Some(401), "unknown user");
    assert_serves(server.addr, "a wrong password");
}

#[test]
fn expired_nonce_gets_438() {
    if Backend::from_env() != Backend::Turnstone {
        eprintln!("expired_nonce_gets_438 configures turnstone's nonce_lifetime: skipped");
        return;
    }
    let server = start(|o| o.server_toml("nonce_lifetime = \"2s\""));
    let mut c = client(server.addr, USER, PASSWORD);
    let old = c.fetch_nonce();
    std::thread::sleep(Duration::from_millis(3200));
    let req = c.signed(method::ALLOCATE, &|w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[PROTO_UDP, 0, 0, 0]);
    });
    let r = c.transact(&req);
    assert_eq!(
        r.code(),
        Some(438),
        "a nonce older than nonce_lifetime must get 438 Stale Nonce (RFC 8489 9.2.4): {}",
        r.describe()
    );
    let m = r.msg();
    let new = m
        .nonce()
        .unwrap()
        .expect("438 carries a new NONCE")
        .to_string();
    assert_ne!(new, old, "438 must carry a new nonce");
    assert_eq!(m.realm().unwrap(), Some(REALM), "438 carries REALM");
    assert!(!m.has_message_integrity(), "438 is not signed");
    // The client retries with the new nonce and succeeds.
    c.learn(&r).unwrap();
    let req = c.signed(method::ALLOCATE, &|w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[PROTO_UDP, 0, 0, 0]);
    });
    let r = c.transact(&req);
    assert_eq!(r.class(), Class::Success, "retry: {}", r.describe());
    assert_serves(server.addr, "a stale nonce");
}

#[test]
fn forbidden_peers_get_403_with_default_policy() {
    // The default policy: no allow_peers at all.
    let server = start(|o| o.allow_peers(&[]));
    let mut c = client(server.addr, USER, PASSWORD);
    c.must_allocate();
    let forbidden = [
        "0.0.0.0:9",
        "[::]:9",
        "[::1]:9",
        "[::ffff:127.0.0.1]:9",
        "169.254.169.254:80",
        "10.0.0.1:9",
        "224.0.0.1:9",
        "127.0.0.1:9",
    ];
    assert_peers_refused(&mut c, &forbidden, "the default policy (RFC 8656 9.1/11.1)");
    assert_serves(server.addr, "forbidden peers");
}

#[test]
fn expired_rest_username_gets_401() {
    let server = TestServer::start_default();
    let past = format!("{}:bob", unix_now() - 3600);
    let mut c = client(server.addr, &past, &rest_password(SECRET, &past));
    let r = c.allocate();
    assert_eq!(
        r.code(),
        Some(401),
        "expired REST username {past}: {}",
        r.describe()
    );
    assert!(!r.msg().has_message_integrity());
    // Control: the same user with an expiry in the future is accepted.
    let future = format!("{}:bob", unix_now() + 3600);
    let mut ok = client(server.addr, &future, &rest_password(SECRET, &future));
    let r = ok.allocate();
    assert_eq!(
        r.class(),
        Class::Success,
        "valid REST username {future}: {}",
        r.describe()
    );
    assert_serves(server.addr, "an expired REST username");
}

/// An unassigned comprehension-required attribute type (0x0000-0x7FFF).
const UNKNOWN_REQUIRED: u16 = 0x0031;
/// An unassigned comprehension-optional one (0x8000-0xFFFF).
const UNKNOWN_OPTIONAL: u16 = 0xC0DE;

#[test]
fn unknown_comprehension_required_attribute_gets_420() {
    let server = TestServer::start_default();
    let mut c = client(server.addr, USER, PASSWORD);

    // Binding (no authentication on Binding).
    let r = c.transact(&c.plain(method::BINDING, &|w| {
        w.attr(UNKNOWN_REQUIRED, &[1, 2, 3, 4]);
    }));
    assert_eq!(r.code(), Some(420), "Binding: {}", r.describe());
    assert_eq!(
        unknown_attributes(&r.msg()),
        vec![UNKNOWN_REQUIRED],
        "420 must list the attribute in UNKNOWN-ATTRIBUTES (RFC 8489 14.9)"
    );
    // Comprehension-optional unknown attributes are ignored.
    let r = c.transact(&c.plain(method::BINDING, &|w| {
        w.attr(UNKNOWN_OPTIONAL, &[1, 2, 3, 4]);
    }));
    assert_eq!(r.class(), Class::Success, "optional: {}", r.describe());

    // An authenticated Allocate carrying one.
    c.fetch_nonce();
    let r = c.transact(&c.signed(method::ALLOCATE, &|w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[PROTO_UDP, 0, 0, 0]);
        w.attr(UNKNOWN_REQUIRED, &[0; 4]);
        w.attr(UNKNOWN_OPTIONAL, &[0; 4]);
    }));
    assert_eq!(r.code(), Some(420), "Allocate: {}", r.describe());
    assert_eq!(unknown_attributes(&r.msg()), vec![UNKNOWN_REQUIRED]);
    // The 420 kept no allocation: a clean Allocate on the same 5-tuple succeeds.
    c.must_allocate();
    assert_serves(server.addr, "unknown attributes");
}

/// RFC 8489 6.3 (as RFC 5389 7.3): "Once the authentication checks are done, the STUN
/// agent checks for unknown attributes"; and 9.2.4: a response to an authenticated
/// request carries MESSAGE-INTEGRITY. turnstone checks unknown attributes before
/// authenticating (src/server/mod.rs `Server::request`), so an authenticated request
/// gets an unsigned 420, and an unauthenticated one a 420 instead of 401.
#[test]
fn unknown_attribute_checked_after_authentication() {
    let server = TestServer::start_default();
    let mut c = client(server.addr, USER, PASSWORD);
    c.fetch_nonce();
    let r = c.transact(&c.signed(method::ALLOCATE, &|w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[PROTO_UDP, 0, 0, 0]);
        w.attr(UNKNOWN_REQUIRED, &[0; 4]);
    }));
    assert_eq!(r.code(), Some(420));
    assert!(
        r.msg().verify_integrity(&c.key),
        "420 to an authenticated request must carry MESSAGE-INTEGRITY"
    );
    let r = c.transact(&c.plain(method::ALLOCATE, &|w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[PROTO_UDP, 0, 0, 0]);
        w.attr(UNKNOWN_REQUIRED, &[0; 4]);
    }));
    assert_eq!(
        r.code(),
        Some(401),
        "unauthenticated request: 401 comes first"
    );
}
