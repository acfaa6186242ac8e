//! Stream (TCP/TLS) abuse against the real `turnstone` binary: each case must be dropped
//! the way `src/net/stream.rs` designs it, and a good client must be served before,
//! during and after it:
//!
//! - a TLS listener fed garbage instead of a handshake: closed at once;
//! - streams that stop mid-message (or mid-handshake): closed by the 10 s deadline for
//!   an incomplete frame / TLS handshake (not earlier than ~9 s, not later than 15 s),
//!   while a connection that is merely idle between whole messages stays open;
//! - frames the framing rejects: a first byte that is neither STUN (0x00-0x3F) nor
//!   ChannelData (0x40-0x7F), a STUN length that is not a multiple of 4, and a frame
//!   longer than the maximum of 65,540 bytes (4 + 65,535 + padding: the largest
//!   ChannelData). A STUN header announcing 65,524 or 65,532 bytes (65,544 / 65,552 in
//!   all) is over it and closes the connection before any body is sent; a 65,540-byte
//!   STUN message and a 65,535-byte ChannelData (65,540 with padding) are accepted.
//!
//! (Floods of silent and half-open connections from one address, and the caps: see
//! `tests/stream_limits.rs`.)
//!
//! "Good client": [`Witness`] keeps one TCP connection from 127.0.0.2 with an
//! allocation open through the whole case (Binding + Refresh on it), and a fresh TCP
//! connection from 127.0.0.2 completes an authenticated Allocate at each check.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{
    assert_tcp_allocates, read_frame, tcp_connect_from, tls_client_config, tls_connect,
    ServerOptions, Stream, TestServer, TurnClient, PASSWORD, USER,
};
use turnstone::proto::{method, Class, Message, MessageWriter, TransactionId};

/// Where the good clients come from (the abusers use 127.0.0.1).
const GOOD_SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// The server's deadline for an incomplete frame or TLS handshake.
const DEADLINE: Duration = Duration::from_secs(10);
/// How long a deadline-closed connection is waited for.
const DEADLINE_WAIT: Duration = Duration::from_secs(15);
/// How quickly a connection with a bad frame must be closed.
const PROMPT: Duration = Duration::from_secs(3);

fn start() -> TestServer {
    TestServer::start(ServerOptions::default().tcp().tls())
}

fn tcp_addr(server: &TestServer) -> SocketAddr {
    server.tcp_addr.expect("tcp listener")
}

fn tls_addr(server: &TestServer) -> SocketAddr {
    server.tls_addr.expect("tls listener")
}

/// A good client holding an allocation on one TCP connection through a whole case.
struct Witness {
    client: TurnClient,
    server: SocketAddr,
}

impl Witness {
    fn start(server: &TestServer) -> Witness {
        let addr = tcp_addr(server);
        let mut client = TurnClient::tcp(Some(GOOD_SOURCE), addr)
            .unwrap_or_else(|e| panic!("witness connect: {e}"));
        client
            .try_allocate()
            .unwrap_or_else(|e| panic!("witness Allocate before the abuse: {e}"));
        Witness {
            client,
            server: addr,
        }
    }

    /// The witness connection still works (Binding, Refresh) and a new client allocates.
    fn check(&mut self, what: &str) {
        self.client
            .binding()
            .unwrap_or_else(|e| panic!("witness Binding failed {what}: {e}"));
        self.client
            .try_refresh(600)
            .unwrap_or_else(|e| panic!("witness Refresh failed {what}: {e}"));
        assert_tcp_allocates(self.server, Some(GOOD_SOURCE), what);
    }
}

/// What a probe of a connection's state found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// FIN (read returned 0).
    Closed,
    /// RST or another error.
    Reset,
}

/// Reads whatever is there without blocking and reports whether the peer has closed.
fn probe(s: &TcpStream, got: &mut Vec<u8>) -> State {
    if s.set_nonblocking(true).is_err() {
        return State::Reset;
    }
    let mut buf = [0u8; 4096];
    let mut r = s;
    let state = loop {
        match r.read(&mut buf) {
            Ok(0) => break State::Closed,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break State::Open,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break State::Reset,
        }
    };
    let _ = s.set_nonblocking(false);
    state
}

/// Waits (polling every 50 ms) until the server closes `s`, at most `within`. Returns
/// how long that took, or an error describing what was received meanwhile.
fn wait_closed(s: &TcpStream, within: Duration) -> Result<Duration, String> {
    let t0 = Instant::now();
    let mut got = Vec::new();
    loop {
        if probe(s, &mut got) != State::Open {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() >= within {
            return Err(format!(
                "still open after {within:?} (received {} bytes: {:02x?})",
                got.len(),
                &got[..got.len().min(32)]
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Connects to `addr` from 127.0.0.1, writes `bytes`, and asserts the server closes the
/// connection within [`PROMPT`].
fn assert_closed_promptly(addr: SocketAddr, bytes: &[u8], what: &str) {
    let mut s = tcp_connect_from(None, addr).unwrap_or_else(|e| panic!("{what}: connect: {e}"));
    // The server may close before everything is written: ignore write errors.
    let _ = s.write_all(bytes);
    match wait_closed(&s, PROMPT) {
        Ok(t) => eprintln!("{what}: closed after {t:?}"),
        Err(e) => panic!("{what}: the server did not close the connection: {e}"),
    }
}

/// A STUN Binding request (20 bytes, no attributes).
fn binding() -> Vec<u8> {
    let mut buf = Vec::new();
    let w = MessageWriter::new(
        &mut buf,
        method::BINDING,
        Class::Request,
        TransactionId(common::random_tid()),
    );
    w.finish();
    buf
}

/// A Binding request of exactly `total` bytes: a comprehension-optional unknown
/// attribute (0x8030) fills it.
fn big_binding(total: usize) -> Vec<u8> {
    assert!(total >= 24 && total.is_multiple_of(4));
    let mut buf = Vec::new();
    let mut w = MessageWriter::new(
        &mut buf,
        method::BINDING,
        Class::Request,
        TransactionId(common::random_tid()),
    );
    w.attr(0x8030, &vec![0x5a; total - 24]);
    w.finish();
    assert_eq!(buf.len(), total);
    buf
}

/// A STUN header (Binding request) whose length field says `len`, without a body.
fn stun_header(len: u16) -> Vec<u8> {
    let mut m = binding();
    m[2..4].copy_from_slice(&len.to_be_bytes());
    m
}

/// Sends `frame` then a Binding request on one TCP connection and expects the Binding
/// success: the frame was taken and the stream stayed in step.
fn assert_accepted_then_binding(addr: SocketAddr, frame: &[u8], what: &str) {
    let mut s = tcp_connect_from(None, addr).unwrap_or_else(|e| panic!("{what}: connect: {e}"));
    s.write_all(frame)
        .unwrap_or_else(|e| panic!("{what}: write: {e}"));
    let req = binding();
    s.write_all(&req)
        .unwrap_or_else(|e| panic!("{what}: the server closed the connection: {e}"));
    let want = Message::parse(&req).expect("parse").transaction_id();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let f = read_frame(&mut s).unwrap_or_else(|e| {
            panic!("{what}: no answer to the Binding after it (connection closed? {e})")
        });
        if let Ok(m) = Message::parse(&f) {
            if m.transaction_id() == want {
                assert_eq!(m.class(), Class::Success, "{what}: Binding answer");
                return;
            }
            eprintln!(
                "{what}: (answer to the frame itself: {:?} {:#05x} {:?})",
                m.class(),
                m.method(),
                m.error_code().ok().flatten()
            );
        }
    }
    panic!("{what}: no Binding success within 5 s");
}

// ---------------------------------------------------------------------------

#[test]
fn tls_garbage_instead_of_a_handshake_is_closed_quickly() {
    let server = start();
    let addr = tls_addr(&server);
    let mut w = Witness::start(&server);

    // Not TLS at all: an HTTP request, binary noise, a plaintext STUN Binding.
    assert_closed_promptly(
        addr,
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "HTTP on the TLS port",
    );
    let noise: Vec<u8> = (0..2048u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    assert_closed_promptly(addr, &noise, "2 KiB of noise on the TLS port");
    w.check("during TLS garbage");
    assert_closed_promptly(addr, &binding(), "plaintext STUN on the TLS port");
    // A TLS handshake record whose ClientHello is garbage.
    let mut rec = vec![0x16, 0x03, 0x01, 0x00, 0xc8, 0x01, 0x00, 0x00, 0xc4];
    rec.extend(std::iter::repeat_n(0xee, 0xc4));
    assert_closed_promptly(addr, &rec, "garbage ClientHello");
    // A ClientHello record announcing more than a record may carry (2^14 + 2048).
    assert_closed_promptly(
        addr,
        &[0x16, 0x03, 0x03, 0xff, 0xff, 0x01],
        "oversized TLS record",
    );

    w.check("after TLS garbage");
    // A real TLS client is served too.
    let cert = server.cert.clone().expect("cert");
    let cfg = tls_client_config(&cert, &[&rustls::version::TLS13], &[b"stun.turn"]);
    let tls = tls_connect(addr, "localhost", cfg).expect("TLS client after garbage");
    let mut c = TurnClient::stream(Stream::Tls(Box::new(tls)), USER, PASSWORD);
    c.try_allocate().expect("Allocate over TLS after garbage");
}

#[test]
fn streams_that_stop_mid_message_are_closed_after_the_deadline() {
    let server = start();
    let tcp = tcp_addr(&server);
    let tls = tls_addr(&server);
    let mut w = Witness::start(&server);
    let cert = server.cert.clone().expect("cert");

    let connect = |addr: SocketAddr| {
        tcp_connect_from(None, addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"))
    };
    let mut stalled: Vec<(&str, TcpStream)> = Vec::new();

    // TCP: half a STUN header.
    let mut s = connect(tcp);
    s.write_all(&binding()[..10]).expect("write");
    stalled.push(("TCP, 10 bytes of a STUN header", s));
    // TCP: a whole header announcing 100 bytes, then 30 of them.
    let mut m = stun_header(100);
    m.extend_from_slice(&[0u8; 30]);
    let mut s = connect(tcp);
    s.write_all(&m).expect("write");
    stalled.push(("TCP, STUN message cut after 50 of 120 bytes", s));
    // TCP: a ChannelData header announcing 1000 bytes, then 10 of them.
    let mut s = connect(tcp);
    s.write_all(&[0x40, 0x00, 0x03, 0xe8, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
        .expect("write");
    stalled.push(("TCP, ChannelData cut after 14 of 1004 bytes", s));
    // TLS: connected, handshake never started.
    stalled.push(("TLS, no ClientHello at all", connect(tls)));
    // TLS: half a ClientHello record.
    let mut s = connect(tls);
    s.write_all(&[
        0x16, 0x03, 0x01, 0x01, 0x00, 0x01, 0x00, 0x00, 0xfc, 0x03, 0x03,
    ])
    .expect("write");
    stalled.push(("TLS, ClientHello cut after 11 bytes", s));
    // TLS: handshake done, then half a STUN message inside TLS.
    let cfg = tls_client_config(&cert, &[&rustls::version::TLS13], &[b"stun.turn"]);
    let mut t = tls_connect(tls, "localhost", cfg).expect("TLS handshake");
    t.write_all(&binding()[..12]).expect("write");
    t.flush().expect("flush");
    let rustls::StreamOwned { sock: s, .. } = t;
    stalled.push(("TLS, 12 bytes of a STUN header inside TLS", s));
    let t0 = Instant::now();

    // Control: an idle connection between whole messages is not incomplete: it stays.
    let mut idle = TurnClient::tcp(None, tcp).expect("idle client");
    idle.binding().expect("idle client's first Binding");

    let mut closed_at: Vec<Option<Duration>> = vec![None; stalled.len()];
    let mut checked_during = false;
    let mut got = Vec::new();
    while t0.elapsed() < DEADLINE_WAIT && closed_at.iter().any(Option::is_none) {
        for (i, (_, s)) in stalled.iter().enumerate() {
            if closed_at[i].is_none() && probe(s, &mut got) != State::Open {
                closed_at[i] = Some(t0.elapsed());
            }
        }
        if !checked_during && t0.elapsed() > Duration::from_secs(4) {
            w.check("while 6 stalled streams wait for their deadline");
            checked_during = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let report: Vec<String> = stalled
        .iter()
        .zip(&closed_at)
        .map(|((what, _), t)| format!("{what}: closed after {t:?}"))
        .collect();
    let report = report.join("\n");
    eprintln!("{report}");
    for ((what, _), t) in stalled.iter().zip(&closed_at) {
        let t = t.unwrap_or_else(|| {
            panic!("{what}: still open {DEADLINE_WAIT:?} after it stalled\n{report}")
        });
        assert!(
            t >= DEADLINE - Duration::from_secs(1),
            "{what}: closed after {t:?}, before the {DEADLINE:?} deadline\n{report}"
        );
    }
    assert!(
        checked_during,
        "the witness was not checked during the wait"
    );

    // The idle connection (no partial message) is still open and served.
    idle.binding()
        .unwrap_or_else(|e| panic!("idle connection was closed with the stalled ones: {e}"));
    w.check("after the stalled streams were closed");
}

#[test]
fn frames_the_framing_rejects_close_the_connection() {
    let server = start();
    let tcp = tcp_addr(&server);
    let mut w = Witness::start(&server);

    // First byte neither STUN (0x00-0x3F) nor ChannelData (0x40-0x7F).
    for first in [0xffu8, 0x80, 0xc0] {
        let mut m = binding();
        m[0] = first;
        assert_closed_promptly(tcp, &m, &format!("first byte {first:#04x}"));
    }
    // STUN length not a multiple of 4.
    assert_closed_promptly(tcp, &stun_header(0x0003), "STUN length 3");
    w.check("during bad frames");

    // Over the maximum frame (65,540): closed as soon as the header shows it, with no
    // body sent.
    for len in [65_524u16, 65_532] {
        assert_closed_promptly(
            tcp,
            &stun_header(len),
            &format!(
                "STUN header announcing {len} bytes ({} in all)",
                20 + len as usize
            ),
        );
    }
    // The same inside TLS.
    let cert = server.cert.clone().expect("cert");
    let cfg = tls_client_config(&cert, &[&rustls::version::TLS13], &[b"stun.turn"]);
    let mut t = tls_connect(tls_addr(&server), "localhost", cfg).expect("TLS");
    t.write_all(&stun_header(65_532)).expect("write");
    t.flush().expect("flush");
    match wait_closed(&t.sock, PROMPT) {
        Ok(d) => eprintln!("TLS, STUN header announcing 65532: closed after {d:?}"),
        Err(e) => panic!("TLS, STUN header announcing 65532 bytes: {e}"),
    }
    w.check("after frames over the limit");

    // At the limit: accepted, and the stream stays in step.
    assert_accepted_then_binding(tcp, &big_binding(65_540), "65,540-byte STUN Binding");
    let mut cd = vec![0x40, 0x00, 0xff, 0xff];
    cd.extend(std::iter::repeat_n(0xab, 65_535 + 1)); // data + 1 byte of padding
    assert_eq!(cd.len(), 65_540);
    assert_accepted_then_binding(tcp, &cd, "65,535-byte ChannelData (unbound channel)");
    // 0x4FFF is the highest channel number; 0x5000-0x7FFF are ChannelData-shaped too.
    let mut cd = vec![0x7f, 0xff, 0x00, 0x05, 1, 2, 3, 4, 5, 0, 0, 0];
    cd.extend_from_slice(&[0x40, 0x01, 0x00, 0x00]);
    assert_accepted_then_binding(tcp, &cd, "ChannelData 0x7FFF and an empty one");

    w.check("after the frames at the limit");
}
