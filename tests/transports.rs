//! turnstone over every stream transport and over IPv6, with real clients:
//!
//! - coturn's `turnutils_uclient` (Debian package `coturn`) relays through turnstone with
//!   zero lost packets over TCP (`-t`), TLS (`-t -S`), RFC 6062 TCP relays (`-T`, also
//!   with two workers, whose data connections are handed to their allocation's worker)
//!   and an IPv6 relay (`-x`, client and peer on ::1);
//! - a rustls client checks what the TLS listener negotiates (ALPN `stun.turn` and
//!   `stun.nat-discovery`, TLS 1.2 and 1.3) and a hand-made TLS 1.1 ClientHello plus
//!   `openssl s_client -tls1_1` check that TLS 1.0/1.1 are refused.
//!
//! The commands, for the record (PORT = UDP and TCP listener, TLSPORT = TLS listener,
//! PEER = `turnutils_peer -L 127.0.0.1 -p PEER`):
//!
//! ```text
//! turnutils_uclient -t    -u alice -w wonderland -e 127.0.0.1 -r PEER -m 5 -n 200 -l 170 -c -X -g -p PORT 127.0.0.1
//! turnutils_uclient -t -S -u alice -w wonderland -e 127.0.0.1 -r PEER -m 5 -n 200 -l 170 -c -X -g -p TLSPORT 127.0.0.1
//! turnutils_uclient -T    -u alice -w wonderland -m 4 -n 200 -l 170 -p PORT 127.0.0.1
//! turnutils_uclient -x    -u alice -w wonderland -e ::1 -r PEER6 -m 5 -n 200 -l 170 -c -g -p PORT ::1
//! ```
//!
//! `-T` implies client-to-client (`-y`): uclient's own clients Connect to each other's
//! TCP relay addresses (RFC 6062 Connect / ConnectionAttempt / ConnectionBind), so no
//! external TCP peer is needed (`turnutils_peer` is UDP-only).

mod common;

use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use common::coturn::{self, EchoPeer};
use common::{
    require_tool, run_bounded, tls_client_config, tls_connect, ServerOptions, Stream, TestServer,
    TurnClient, PASSWORD, USER,
};

const UCLIENT_TIMEOUT: Duration = Duration::from_secs(90);
const CLIENTS: u64 = 5;
const MESSAGES: u64 = 200;
/// Client-to-client runs (`-T` implies `-y`) need an even number of clients.
const CLIENTS_PAIRED: u64 = 4;

fn run_uclient(args: &[&str], server_ip: &str, clients: u64) {
    coturn::run_uclient(args, server_ip, clients, MESSAGES, UCLIENT_TIMEOUT);
}

/// uclient over a stream (`flags`: `-t`, or `-t -S` for TLS) to `port`, relaying to a
/// `turnutils_peer` echo peer on 127.0.0.1.
fn run_uclient_stream_to_peer(flags: &[&str], port: u16) {
    let peer = EchoPeer::start("127.0.0.1");
    let port = port.to_string();
    let peer_port = peer.port.to_string();
    let mut args = flags.to_vec();
    args.extend([
        "-u",
        USER,
        "-w",
        PASSWORD,
        "-e",
        "127.0.0.1",
        "-r",
        &peer_port,
    ]);
    args.extend(["-c", "-X", "-g", "-p", &port]);
    run_uclient(&args, "127.0.0.1", CLIENTS);
}

#[test]
fn uclient_over_tcp() {
    let server = TestServer::start(ServerOptions::default().tcp());
    run_uclient_stream_to_peer(&["-t"], server.port());
}

#[test]
fn uclient_over_tls() {
    let server = TestServer::start(ServerOptions::default().tls());
    run_uclient_stream_to_peer(&["-t", "-S"], server.tls_port());
}

#[test]
fn uclient_rfc6062_tcp_relay() {
    let server = TestServer::start(ServerOptions::default().tcp());
    let port = server.port().to_string();
    run_uclient(
        &["-T", "-u", USER, "-w", PASSWORD, "-p", &port],
        "127.0.0.1",
        CLIENTS_PAIRED,
    );
}

/// RFC 6062 with two workers: uclient's data connections land on either worker, and
/// those that land on the other worker than their allocation's are handed over to it
/// (at least one: 8 uclient clients open dozens of data connections, each landing on
/// either worker, and a run here counted 33 hand-overs; more clients would pass the 64
/// connections one address may hold).
#[test]
fn uclient_rfc6062_tcp_relay_two_workers() {
    let server = TestServer::start(
        ServerOptions::default()
            .tcp()
            .workers(2)
            .metrics()
            .server_toml("adaptive_workers = false"),
    );
    let port = server.port().to_string();
    run_uclient(
        &["-T", "-u", USER, "-w", PASSWORD, "-p", &port],
        "127.0.0.1",
        8,
    );
    let handovers = server.wait_metric("turnstone_stream_handovers_total", &[], 1.0);
    eprintln!("{handovers} RFC 6062 data connections handed over to their allocation's worker");
}

#[test]
fn uclient_ipv6_relay() {
    let server = TestServer::start(ServerOptions::default().dual_stack());
    let peer = EchoPeer::start("::1");
    let port = server.port().to_string();
    let peer_port = peer.port.to_string();
    run_uclient(
        &[
            "-x", "-u", USER, "-w", PASSWORD, "-e", "::1", "-r", &peer_port, "-c", "-g", "-p",
            &port,
        ],
        "::1",
        CLIENTS,
    );
}

// ---------------------------------------------------------------------------
// TLS details
// ---------------------------------------------------------------------------

/// (what, client TLS versions, client ALPN list, ALPN the server must pick).
type AlpnCase<'a> = (
    &'a str,
    &'a [&'static rustls::SupportedProtocolVersion],
    &'a [&'a [u8]],
    Option<&'a [u8]>,
);

#[test]
fn tls_negotiates_alpn_and_serves_turn() {
    use rustls::version::{TLS12, TLS13};
    let server = TestServer::start(ServerOptions::default().tls());
    let cert = server.cert.clone().expect("test certificate");
    let addr = server.tls_addr.expect("tls listener");

    let cases: [AlpnCase<'_>; 4] = [
        (
            "TLS 1.2, ALPN stun.turn",
            &[&TLS12],
            &[b"stun.turn"],
            Some(b"stun.turn"),
        ),
        (
            "TLS 1.3, ALPN stun.turn",
            &[&TLS13],
            &[b"stun.turn"],
            Some(b"stun.turn"),
        ),
        (
            "TLS 1.3, ALPN stun.nat-discovery",
            &[&TLS13],
            &[b"stun.nat-discovery"],
            Some(b"stun.nat-discovery"),
        ),
        ("TLS 1.2, no ALPN", &[&TLS12], &[], None),
    ];
    for (what, versions, alpn, want_alpn) in cases {
        let cfg = tls_client_config(&cert, versions, alpn);
        let tls = tls_connect(addr, "localhost", cfg).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(
            tls.conn.alpn_protocol(),
            want_alpn,
            "{what}: negotiated ALPN {:?}",
            tls.conn.alpn_protocol().map(String::from_utf8_lossy)
        );
        let version = tls.conn.protocol_version();
        let want_version = if versions[0] == &TLS12 {
            rustls::ProtocolVersion::TLSv1_2
        } else {
            rustls::ProtocolVersion::TLSv1_3
        };
        assert_eq!(version, Some(want_version), "{what}");
        let mut c = TurnClient::stream(Stream::Tls(Box::new(tls)), USER, PASSWORD);
        let mapped = c.binding().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(mapped.ip().to_string(), "127.0.0.1", "{what}");
        let relayed = c.try_allocate().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            server.is_relay_port(relayed.port()),
            "{what}: relayed {relayed}"
        );
        c.try_refresh(0).unwrap_or_else(|e| panic!("{what}: {e}"));
    }

    // The name in the certificate is checked by the client: 127.0.0.1 is in it too.
    let cfg = tls_client_config(&cert, &[&TLS13], &[b"stun.turn"]);
    tls_connect(addr, "127.0.0.1", cfg).unwrap_or_else(|e| panic!("by IP: {e}"));

    // ALPN offering only other protocols: refused (RFC 7301 3.2 no_application_protocol).
    let cfg = tls_client_config(&cert, &[&TLS13, &TLS12], &[b"h2", b"http/1.1"]);
    match tls_connect(addr, "localhost", cfg) {
        Err(e) => assert!(
            e.contains("NoApplicationProtocol") || e.contains("no_application_protocol"),
            "ALPN h2 only: unexpected error {e}"
        ),
        Ok(t) => panic!(
            "ALPN h2 only was accepted (negotiated {:?})",
            t.conn.alpn_protocol().map(String::from_utf8_lossy)
        ),
    }
}

/// A TLS 1.1 ClientHello (record version 3.1, client_version 3.2, no supported_versions
/// extension), with TLS 1.0/1.1-era cipher suites and SNI "localhost".
fn tls11_client_hello() -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&[0x03, 0x02]); // client_version TLS 1.1
    body.extend_from_slice(&common::random_tid());
    body.extend_from_slice(&[0u8; 20]); // random: 32 bytes
    body.push(0); // session id
                  // CBC suites of the TLS 1.0/1.1 era plus the ECDHE AEAD suites a TLS 1.2 server
                  // takes, so that the version is the only thing wrong with this hello.
    let suites: [u16; 9] = [
        0xC02B, 0xC02F, 0xCCA9, 0xCCA8, 0xC013, 0xC014, 0xC009, 0xC00A, 0x002F,
    ];
    body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        body.extend_from_slice(&s.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]); // compression: null
    let host = b"localhost";
    let mut sni = Vec::new();
    sni.extend_from_slice(&((host.len() + 3) as u16).to_be_bytes());
    sni.push(0);
    sni.extend_from_slice(&(host.len() as u16).to_be_bytes());
    sni.extend_from_slice(host);
    let mut ext = Vec::new();
    ext.extend_from_slice(&0u16.to_be_bytes()); // server_name
    ext.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    ext.extend_from_slice(&sni);
    // ec_point_formats + supported_groups, as old clients send them.
    ext.extend_from_slice(&[0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]);
    ext.extend_from_slice(&[0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00, 0x17]);
    // signature_algorithms: ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256, rsa_pkcs1_sha256
    ext.extend_from_slice(&[
        0x00, 0x0d, 0x00, 0x08, 0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01,
    ]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![1u8]; // client_hello
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

#[test]
fn tls_1_0_and_1_1_are_refused() {
    let server = TestServer::start(ServerOptions::default().tls());
    let addr = server.tls_addr.expect("tls listener");

    // 1. A hand-made TLS 1.1 ClientHello: the answer must be an alert (no ServerHello),
    // then the connection must close.
    let mut s = common::tcp_connect_from(None, addr).expect("connect");
    s.write_all(&tls11_client_hello())
        .expect("send ClientHello");
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 4096];
    let mut closed = false;
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break
            }
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    assert!(
        closed,
        "connection still open after a refused TLS 1.1 ClientHello (got {got:02x?})"
    );
    assert!(
        got.first() != Some(&0x16),
        "the server answered a TLS 1.1 ClientHello with a handshake record: {got:02x?}"
    );
    if let Some(first) = got.first() {
        assert_eq!(*first, 0x15, "expected an alert record, got {got:02x?}");
        // level fatal (2), description protocol_version (70)
        assert_eq!(
            got.get(5..7),
            Some(&[2u8, 70u8][..]),
            "expected a fatal protocol_version alert, got {got:02x?}"
        );
    }

    // 2. OpenSSL's client with TLS 1.0 and 1.1 (security level 0 so that OpenSSL 3 offers
    // them at all): the handshake fails, for a reason the server gave.
    let openssl = require_tool("openssl", "apt-get install -y openssl");
    for flag in ["-tls1", "-tls1_1"] {
        let mut cmd = Command::new(&openssl);
        cmd.args(["s_client", flag, "-cipher", "DEFAULT:@SECLEVEL=0"])
            .args(["-connect", &addr.to_string(), "-servername", "localhost"])
            .args(["-alpn", "stun.turn"]);
        let run = run_bounded("openssl s_client", &mut cmd, Duration::from_secs(20));
        let out = run.combined();
        assert!(
            !out.contains("no protocols available"),
            "openssl did not offer {flag} at all (its own configuration), test inconclusive:\n{out}"
        );
        assert!(
            !run.status.success(),
            "openssl s_client {flag} succeeded: TLS below 1.2 was accepted\n{out}"
        );
        // rustls answers with a fatal alert: protocol_version, or handshake_failure when
        // the hello also offers no suite it has (TLS 1.0 has no AEAD suites).
        assert!(
            out.contains("alert protocol version") || out.contains("alert handshake failure"),
            "openssl s_client {flag}: no fatal alert from the server in its output\n{out}"
        );
        assert!(
            out.contains("Cipher is (NONE)"),
            "openssl s_client {flag} appears to have negotiated a session\n{out}"
        );
    }

    // And a TLS 1.2 openssl client gets ALPN stun.turn.
    let mut cmd = Command::new(&openssl);
    cmd.args(["s_client", "-tls1_2", "-alpn", "stun.turn"])
        .args(["-connect", &addr.to_string(), "-servername", "localhost"]);
    let run = run_bounded("openssl s_client", &mut cmd, Duration::from_secs(20));
    let out = run.combined();
    assert!(
        out.contains("ALPN protocol: stun.turn"),
        "openssl s_client -tls1_2 -alpn stun.turn: ALPN not negotiated\n{out}"
    );

    // The server still serves TLS 1.2/1.3 clients after all that.
    let cert = server.cert.clone().expect("cert");
    let cfg = tls_client_config(&cert, &[&rustls::version::TLS12], &[b"stun.turn"]);
    let tls = tls_connect(addr, "localhost", cfg).expect("TLS 1.2 after refusals");
    let mut c = TurnClient::stream(Stream::Tls(Box::new(tls)), USER, PASSWORD);
    c.try_allocate().expect("allocate over TLS 1.2");
}
