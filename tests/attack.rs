//! Attack suite against the real `turnstone` binary (UDP, black box): every IPv6/IPv4
//! form that smuggles a forbidden peer address past a naive filter, malformed and
//! oversized messages, duplicate and out-of-order attributes, a spray of unauthenticated
//! Allocates from many source ports (memory must stay flat: no per-request state before
//! authentication), relay port-range exhaustion (508, then recovery) and a channel-number
//! flood. After each attack a good client must still complete an authenticated Allocate.
//!
//! Requests are built with `turnstone::proto::MessageWriter`; every loop is bounded.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::{
    assert_peers_refused, assert_serves, tid, ServerOptions, TestServer, TurnClient, PASSWORD,
    PROTO_UDP, REALM, USER,
};
use turnstone::proto::{attr, method, Class, Message, MessageWriter};

/// A turnstone server with `options`; `None` (the test has nothing to check) when the
/// tests run against coturn.
fn turnstone_only(test: &str, options: ServerOptions) -> Option<TestServer> {
    if common::Backend::from_env() != common::Backend::Turnstone {
        eprintln!("{test} inspects or configures the turnstone process: skipped");
        return None;
    }
    Some(TestServer::start(options))
}

/// alice over UDP, with a nonce from a first (401) Allocate.
fn client(server: SocketAddr) -> TurnClient {
    let mut c = TurnClient::udp(server, USER, PASSWORD);
    c.fetch_nonce();
    c
}

/// VmRSS of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("VmRSS")
}

// ---------------------------------------------------------------------------
// Peer-address bypasses
// ---------------------------------------------------------------------------

/// Every form that embeds or means a forbidden address gets 403 with the default policy
/// (RFC 8656 9.1 / 11.1; coturn CVE-2020-26262 and follow-ups). The relay is IPv4: a
/// denied IPv6 peer must get 403 (policy first), not 443 (family).
#[test]
fn peer_address_bypass_forms_get_403() {
    let server = TestServer::start(ServerOptions::default().allow_peers(&[]));
    let mut c = client(server.addr);
    c.must_allocate();
    let forbidden = [
        "[::ffff:127.0.0.1]:9",                     // IPv4-mapped loopback
        "[::ffff:169.254.169.254]:80",              // IPv4-mapped metadata
        "[64:ff9b::7f00:1]:9",                      // NAT64 of 127.0.0.1
        "[64:ff9b::a9fe:a9fe]:80",                  // NAT64 of 169.254.169.254
        "[2002:7f00:1::1]:9",                       // 6to4 of 127.0.0.1
        "[2001:0:4136:e378:8000:63bf:3fff:fdd2]:9", // Teredo
        "[::7f00:1]:9",                             // IPv4-compatible 127.0.0.1
        "0.1.2.3:9",                                // 0.0.0.0/8
        "0.0.0.0:9",
        "[::]:9",
        "[::1]:9",
        "255.255.255.255:9", // broadcast
        "224.0.0.1:9",       // multicast
        "[ff02::1]:9",       // IPv6 multicast
        "169.254.169.254:80",
        "[fd00:ec2::254]:80", // AWS IPv6 metadata
        "127.0.0.1:9",
        "10.0.0.1:9",
        "100.64.0.1:9",
        "[fe80::1]:9",
    ];
    assert_peers_refused(&mut c, &forbidden, "the default policy");
    // Control: an allowed IPv6 address on an IPv4 relay is 443.
    let r = c.create_permission("[2001:4860:4860::8888]:53".parse().unwrap());
    assert_eq!(
        r.code(),
        Some(443),
        "allowed IPv6 peer on IPv4 relay: {}",
        r.describe()
    );
    assert_serves(server.addr, "peer-address bypass attempts");
}

// ---------------------------------------------------------------------------
// Malformed, oversized, duplicate and out-of-order
// ---------------------------------------------------------------------------

#[test]
fn malformed_and_oversized_messages() {
    let server = TestServer::start_default();
    let mut c = client(server.addr);
    c.must_allocate();
    let good = c.signed(method::REFRESH, &|w| {
        w.u32_attr(attr::LIFETIME, 600);
    });
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    // Lengths that lie: header length bigger / smaller / not a multiple of 4.
    for delta in [4i32, -4, 1, 2, 3, 0x7FFC] {
        let mut b = good.clone();
        let len = (u16::from_be_bytes([b[2], b[3]]) as i32 + delta) as u16;
        b[2..4].copy_from_slice(&len.to_be_bytes());
        cases.push((format!("header length {delta:+}"), b));
    }
    // An attribute whose length runs past the end.
    let mut b = good.clone();
    b[22..24].copy_from_slice(&0xFFFFu16.to_be_bytes());
    cases.push(("attribute length 0xFFFF".into(), b));
    // Oversized: the largest UDP datagram, as STUN with a valid-looking header, and as
    // ChannelData claiming 65535 bytes.
    let mut big = vec![0u8; 65_507];
    big[0..2].copy_from_slice(&[0x00, 0x03]);
    big[2..4].copy_from_slice(&((65_507u32 - 20) as u16 & !3).to_be_bytes());
    big[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
    cases.push(("65507-byte STUN".into(), big.clone()));
    let mut cd = vec![0u8; 65_507];
    cd[0..4].copy_from_slice(&[0x40, 0x00, 0xFF, 0xFF]);
    cases.push(("65507-byte ChannelData".into(), cd));
    // Header only, truncated header, a lone byte, nothing.
    cases.push(("header only".into(), good[..20].to_vec()));
    cases.push(("19 bytes".into(), good[..19].to_vec()));
    cases.push(("one byte".into(), vec![0]));
    cases.push(("empty".into(), vec![]));
    // A huge USERNAME / REALM / NONCE, signed.
    let long = vec![b'a'; 4000];
    let r = c
        .try_transact(&{
            let mut buf = Vec::new();
            let mut w = MessageWriter::new(&mut buf, method::ALLOCATE, Class::Request, tid());
            w.attr(attr::REQUESTED_TRANSPORT, &[PROTO_UDP, 0, 0, 0])
                .attr(attr::USERNAME, &long)
                .attr(attr::REALM, &long)
                .attr(attr::NONCE, &long)
                .message_integrity(&c.key);
            w.finish();
            buf
        })
        .expect("an answer to over-long USERNAME/REALM/NONCE");
    assert_eq!(
        r.code(),
        Some(400),
        "over-long text attributes: {}",
        r.describe()
    );
    // 1000 unknown comprehension-optional attributes in a Binding request.
    let r = c
        .try_transact(&c.plain(method::BINDING, &|w| {
            for i in 0..1000u16 {
                w.attr(0x8100 + i, &[1, 2, 3]);
            }
        }))
        .expect("an answer to a Binding with 1000 optional attributes");
    assert_eq!(r.class(), Class::Success, "{}", r.describe());
    // 1000 unknown comprehension-required ones: 420 with a bounded UNKNOWN-ATTRIBUTES.
    let r = c
        .try_transact(&c.plain(method::BINDING, &|w| {
            for i in 0..1000u16 {
                w.attr(0x4100 + i, &[1]);
            }
        }))
        .expect("an answer to a Binding with 1000 required attributes");
    assert_eq!(r.code(), Some(420), "{}", r.describe());
    assert!(
        r.raw.len() < 1500,
        "420 answer of {} bytes (amplification)",
        r.raw.len()
    );
    for (what, bytes) in &cases {
        c.assert_no_answer(bytes, what);
    }
    // The allocation is still there and refreshable.
    let r = c.refresh(600);
    assert_eq!(r.class(), Class::Success, "{}", r.describe());
    assert_serves(server.addr, "malformed and oversized messages");
}

#[test]
fn duplicate_and_out_of_order_attributes() {
    let server = TestServer::start_default();
    let mut c = client(server.addr);
    let nonce = c.nonce.clone().expect("nonce");
    let rt = |w: &mut MessageWriter<'_>| {
        w.attr(attr::REQUESTED_TRANSPORT, &[PROTO_UDP, 0, 0, 0]);
    };

    // Attributes after MESSAGE-INTEGRITY are ignored (RFC 8489 14.5): REQUESTED-TRANSPORT
    // there is missing -> 400.
    let req = c.signed_with(method::ALLOCATE, &|_| {}, &rt);
    let r = c.try_transact(&req).expect("answer");
    assert_eq!(
        r.code(),
        Some(400),
        "REQUESTED-TRANSPORT after MI: {}",
        r.describe()
    );

    // FINGERPRINT before MESSAGE-INTEGRITY: nothing may follow FINGERPRINT -> dropped.
    let mut buf = Vec::new();
    let mut w = MessageWriter::new(&mut buf, method::ALLOCATE, Class::Request, tid());
    w.attr(attr::REQUESTED_TRANSPORT, &[PROTO_UDP, 0, 0, 0])
        .attr(attr::USERNAME, USER.as_bytes())
        .attr(attr::REALM, REALM.as_bytes())
        .attr(attr::NONCE, nonce.as_bytes())
        .fingerprint()
        .message_integrity(&c.key);
    w.finish();
    c.assert_no_answer(&buf, "FINGERPRINT before MESSAGE-INTEGRITY");

    // Two FINGERPRINTs: dropped.
    let mut buf = Vec::new();
    let mut w = MessageWriter::new(&mut buf, method::BINDING, Class::Request, tid());
    w.fingerprint().fingerprint();
    w.finish();
    c.assert_no_answer(&buf, "two FINGERPRINTs");

    // A bad FINGERPRINT: dropped.
    let mut buf = Vec::new();
    let mut w = MessageWriter::new(&mut buf, method::BINDING, Class::Request, tid());
    w.attr(attr::FINGERPRINT, &[1, 2, 3, 4]);
    w.finish();
    c.assert_no_answer(&buf, "wrong FINGERPRINT");

    // Two MESSAGE-INTEGRITYs: the second is ignored, the first verifies.
    let mut buf = Vec::new();
    let mut w = MessageWriter::new(&mut buf, method::ALLOCATE, Class::Request, tid());
    w.attr(attr::REQUESTED_TRANSPORT, &[PROTO_UDP, 0, 0, 0])
        .attr(attr::USERNAME, USER.as_bytes())
        .attr(attr::REALM, REALM.as_bytes())
        .attr(attr::NONCE, nonce.as_bytes())
        .message_integrity(&c.key)
        .message_integrity(b"garbage");
    w.finish();
    let r = c.try_transact(&buf).expect("answer");
    assert_eq!(r.class(), Class::Success, "two MIs: {}", r.describe());
    let r = c.refresh(0);
    assert_eq!(r.class(), Class::Success, "{}", r.describe());

    // Two USERNAMEs: the first counts (alice); the second (mallory) cannot swap identity.
    let second_username = |c: &TurnClient, name: &'static [u8]| {
        c.signed(method::ALLOCATE, &|w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[PROTO_UDP, 0, 0, 0]);
            w.attr(attr::USERNAME, name);
        })
    };
    let req = second_username(&c, b"alice");
    let r = c.try_transact(&req).expect("answer");
    assert!(
        r.class() == Class::Success || r.code() == Some(400),
        "two USERNAMEs: {}",
        r.describe()
    );
    if r.class() == Class::Success {
        assert_eq!(c.refresh(0).class(), Class::Success);
    }
    let mallory = second_username(&c, b"mallory");
    let r = c.try_transact(&mallory).expect("answer");
    assert_ne!(
        r.class(),
        Class::Success,
        "USERNAME mallory first must not authenticate"
    );

    // Two REQUESTED-TRANSPORTs (UDP then TCP) and two LIFETIMEs: the first counts.
    let r = c.request(method::ALLOCATE, &|w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[PROTO_UDP, 0, 0, 0]);
        w.attr(attr::REQUESTED_TRANSPORT, &[6, 0, 0, 0]);
        w.u32_attr(attr::LIFETIME, 700);
        w.u32_attr(attr::LIFETIME, 0);
    });
    assert_eq!(
        r.class(),
        Class::Success,
        "duplicated attributes: {}",
        r.describe()
    );
    assert_eq!(r.msg().lifetime().unwrap(), Some(700));

    // Duplicate XOR-PEER-ADDRESS (same address twice) is one permission; a CHANNEL-NUMBER
    // duplicated with different values uses the first.
    let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let r = c.request(method::CREATE_PERMISSION, &|w| {
        w.xor_address(attr::XOR_PEER_ADDRESS, peer);
        w.xor_address(attr::XOR_PEER_ADDRESS, peer);
    });
    assert_eq!(
        r.class(),
        Class::Success,
        "duplicate peer: {}",
        r.describe()
    );
    let r = c.request(method::CHANNEL_BIND, &|w| {
        w.attr(attr::CHANNEL_NUMBER, &[0x40, 0x01, 0, 0]);
        w.attr(attr::CHANNEL_NUMBER, &[0x00, 0x01, 0, 0]);
        w.xor_address(attr::XOR_PEER_ADDRESS, peer);
    });
    assert_eq!(
        r.class(),
        Class::Success,
        "duplicate CHANNEL-NUMBER: {}",
        r.describe()
    );
    assert_eq!(c.refresh(0).class(), Class::Success);
    assert_serves(server.addr, "duplicate and out-of-order attributes");
}

// ---------------------------------------------------------------------------
// Floods
// ---------------------------------------------------------------------------

/// 20,000 unauthenticated Allocates from 200 source ports on 100 addresses: answered
/// (401/438, possibly rate limited) statelessly; the server's resident memory grows by
/// less than 2 MiB and no allocation quota is taken (max_allocations = 1, and a good
/// client still gets it).
#[test]
fn unauthenticated_allocate_spray_keeps_memory_flat() {
    let options = ServerOptions::default().max_allocations(1);
    let Some(server) = turnstone_only("unauthenticated_allocate_spray_keeps_memory_flat", options)
    else {
        return;
    };
    let pid = server.pid().expect("server running");
    // 200 sockets on 100 source addresses (127.0.1.1 .. 127.0.1.100), two ports each:
    // whatever the server keeps per unauthenticated source must stay bounded.
    let socks: Vec<UdpSocket> = (0..200u8)
        .map(|i| {
            let s = UdpSocket::bind(SocketAddr::from(([127, 0, 1, 1 + i / 2], 0)))
                .expect("bind a 127.0.1.x source address");
            s.set_nonblocking(true).expect("nonblocking");
            s
        })
        .collect();
    // Counts the error answers queued on the sockets.
    let drain = |answered: &mut usize| {
        let mut buf = vec![0u8; 2048];
        for s in &socks {
            while let Ok((n, _)) = s.recv_from(&mut buf) {
                if Message::parse(&buf[..n]).is_ok_and(|m| m.class() == Class::Error) {
                    *answered += 1;
                }
            }
        }
    };
    let mut answered = 0usize;
    let spray = |rounds: usize, answered: &mut usize| {
        for round in 0..rounds {
            for s in &socks {
                let mut req = Vec::new();
                let mut w = MessageWriter::new(&mut req, method::ALLOCATE, Class::Request, tid());
                w.attr(attr::REQUESTED_TRANSPORT, &[PROTO_UDP, 0, 0, 0]);
                if round % 2 == 1 {
                    // Half of them carry a username and a bogus integrity.
                    w.attr(attr::USERNAME, format!("user{round}").as_bytes())
                        .attr(attr::REALM, REALM.as_bytes())
                        .attr(attr::NONCE, b"0123456789abcdef01234567")
                        .message_integrity(b"nope");
                }
                w.finish();
                let _ = s.send_to(&req, server.addr);
            }
            // Pace: drain the answers so the kernel buffers don't just drop everything.
            std::thread::sleep(Duration::from_micros(500));
            drain(answered);
        }
    };
    // Warm-up (allocator arenas, hash tables), then measure.
    spray(10, &mut answered);
    std::thread::sleep(Duration::from_millis(200));
    let before = rss_kib(pid);
    let mut answered = 0usize;
    spray(100, &mut answered);
    std::thread::sleep(Duration::from_millis(300));
    drain(&mut answered);
    let after = rss_kib(pid);
    eprintln!(
        "spray: 20000 unauthenticated Allocates, {answered} error answers, VmRSS {before} -> {after} KiB"
    );
    // Answers may be rate limited per source ([limits] unauthenticated_rate), not absent.
    assert!(answered > 0, "no unauthenticated Allocate was answered");
    assert!(
        after <= before + 2048,
        "resident memory grew by {} KiB during the spray",
        after.saturating_sub(before)
    );
    // max_allocations = 1: the spray took no quota.
    assert_serves(server.addr, "an unauthenticated Allocate spray");
}

/// A server on a 10-port relay range: ten allocations succeed, the eleventh gets 508
/// Insufficient Capacity (RFC 8656 7.2), freeing one makes room again.
#[test]
fn relay_port_range_exhaustion_then_recovery() {
    let options = ServerOptions::default().relay_port_count(10);
    let Some(server) = turnstone_only("relay_port_range_exhaustion_then_recovery", options) else {
        return;
    };
    let (addr, low) = (server.addr, server.relay_ports.0);
    let mut clients: Vec<TurnClient> = (0..10).map(|_| client(addr)).collect();
    let mut relays = Vec::new();
    for c in &mut clients {
        let relayed = c.must_allocate();
        assert!(
            (low..=low + 9).contains(&relayed.port()),
            "relay port {} outside {low}-{}",
            relayed.port(),
            low + 9
        );
        relays.push(relayed);
    }
    relays.sort();
    relays.dedup();
    assert_eq!(relays.len(), 10, "ten distinct relay ports");
    let mut extra = client(addr);
    for _ in 0..3 {
        let r = extra.allocate();
        assert_eq!(
            r.code(),
            Some(508),
            "Allocate past the port range: {}",
            r.describe()
        );
    }
    assert_eq!(clients[3].refresh(0).class(), Class::Success);
    let relayed = extra.must_allocate();
    assert!((low..=low + 9).contains(&relayed.port()));
    assert_eq!(clients[4].refresh(0).class(), Class::Success);
    assert_serves(addr, "relay port-range exhaustion");
}

/// Thousands of ChannelBinds with distinct numbers (and peers): the first
/// max_channels_per_allocation (64) succeed, the rest get 508; bound channels still
/// refresh, and the server still serves.
#[test]
fn channel_number_flood() {
    let server =
        TestServer::start(ServerOptions::default().limits_toml("max_channels_per_allocation = 64"));
    let mut c = client(server.addr);
    c.must_allocate();
    let mut ok = 0;
    let mut codes = std::collections::BTreeMap::new();
    for i in 0..3000u16 {
        let number = 0x4000 + (i % 0x4000);
        let peer = SocketAddr::from(([127, 0, 0, 1], 10_000 + i));
        let r = c.channel_bind(number, peer);
        if r.class() == Class::Success {
            ok += 1;
        } else {
            *codes.entry(r.code()).or_insert(0) += 1;
        }
    }
    assert_eq!(
        ok, 64,
        "successful ChannelBinds (codes of the rest: {codes:?})"
    );
    assert_eq!(
        codes.get(&Some(508)).copied().unwrap_or(0),
        3000 - 64,
        "codes: {codes:?}"
    );
    // The first binding refreshes; a 65th still fails.
    let r = c.channel_bind(0x4000, SocketAddr::from(([127, 0, 0, 1], 10_000)));
    assert_eq!(
        r.class(),
        Class::Success,
        "refresh of channel 0x4000: {}",
        r.describe()
    );
    assert_eq!(c.refresh(0).class(), Class::Success);
    assert_serves(server.addr, "a channel-number flood");
}
