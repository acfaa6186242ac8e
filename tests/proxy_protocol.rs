//! The PROXY protocol on tcp and tls listeners: behind haproxy (`send-proxy` and `send-proxy-v2`, TCP and TLS passed through) coturn's uclient and headless Chromium relay and the server sees each client's own address; raw headers (v1, v2, LOCAL, TLVs) give the client address everywhere, including the per-source caps, while untrusted sources and missing, malformed, oversized or slow headers are closed and counted.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::coturn::{self, EchoPeer};
use common::haproxy::{Haproxy, ProxyVersion};
use common::{
    tcp_connect_from, tls_client_config, tls_handshake, ServerOptions, Stream, TestServer,
    TurnClient, PASSWORD, USER,
};

/// haproxy and the raw-header clients connect from here (the trusted `proxy_from`).
const TRUSTED: &str = "127.0.0.1/32";
/// Not in `proxy_from`.
const UNTRUSTED: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// The clients behind haproxy connect from here, so that their address differs from
/// haproxy's own.
const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
/// How quickly a refused connection must be closed.
const PROMPT: Duration = Duration::from_secs(3);

fn v2_header(cmd: u8, src: SocketAddr, dst: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x20 | cmd);
    let mut block = Vec::new();
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            h.push(0x11);
            block.extend_from_slice(&s.ip().octets());
            block.extend_from_slice(&d.ip().octets());
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            h.push(0x21);
            block.extend_from_slice(&s.ip().octets());
            block.extend_from_slice(&d.ip().octets());
        }
        _ => panic!("mixed families"),
    }
    block.extend_from_slice(&src.port().to_be_bytes());
    block.extend_from_slice(&dst.port().to_be_bytes());
    h.extend_from_slice(&((block.len() + tlvs.len()) as u16).to_be_bytes());
    h.extend_from_slice(&block);
    h.extend_from_slice(tlvs);
    h
}

fn v2_local() -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    h
}

fn v1_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let proto = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {proto} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

/// A TCP connection from 127.0.0.1 that starts with `header`.
fn with_header(server: SocketAddr, header: &[u8]) -> TcpStream {
    let mut s = tcp_connect_from(None, server).expect("connect");
    s.write_all(header).expect("write header");
    s
}

/// The server closes `s` within `within` without sending anything.
fn assert_closed_unanswered(s: &mut TcpStream, within: Duration, what: &str) -> Duration {
    let t0 = Instant::now();
    s.set_read_timeout(Some(within)).expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("{what}: still open after {within:?}")
            }
            Err(_) => break, // reset
        }
    }
    assert!(got.is_empty(), "{what}: answered {got:02x?}");
    t0.elapsed()
}

/// A STUN Binding request.
fn binding_request() -> Vec<u8> {
    let mut binding = Vec::new();
    turnstone::proto::MessageWriter::new(
        &mut binding,
        turnstone::proto::method::BINDING,
        turnstone::proto::Class::Request,
        turnstone::proto::TransactionId(common::random_tid()),
    )
    .finish();
    binding
}

/// A connection from 127.0.0.2 (not in `proxy_from`) that writes `bytes` is closed at
/// once, unanswered (it may be reset before the connect call even returns).
fn untrusted_refused(addr: SocketAddr, bytes: &[u8]) {
    match tcp_connect_from(Some(UNTRUSTED), addr) {
        Ok(mut s) => {
            let _ = s.write_all(bytes);
            let t = assert_closed_unanswered(&mut s, PROMPT, "from an untrusted source");
            eprintln!("untrusted source to {addr}: closed after {t:?}");
        }
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {
            eprintln!("untrusted source to {addr}: reset while connecting")
        }
        Err(e) => panic!("connect from 127.0.0.2 to {addr}: {e}"),
    }
}

/// XOR-MAPPED-ADDRESS of a Binding over `c`.
fn mapped(c: &mut TurnClient, what: &str) -> SocketAddr {
    c.binding()
        .unwrap_or_else(|e| panic!("{what}: Binding: {e}"))
}

fn dropped(server: &TestServer, reason: &str) -> f64 {
    server
        .metric(
            "turnstone_stream_connections_dropped_total",
            &[("reason", reason)],
        )
        .expect("dropped metric")
}

#[test]
fn raw_headers_give_the_client_address_and_bad_ones_close() {
    let server = TestServer::start(
        ServerOptions::default()
            .tcp()
            .tls()
            .metrics()
            .proxy_protocol(&[TRUSTED])
            .limits_toml("stream_handshake_timeout = \"2s\"\nmax_unauthenticated_per_source = 3"),
    );
    let tcp = server.tcp_addr.expect("tcp");
    let tls = server.tls_addr.expect("tls");
    let cert = server.cert.clone().expect("cert");

    // v2 over TCP: the header's source is the client, in XOR-MAPPED-ADDRESS.
    let src: SocketAddr = "192.0.2.7:47142".parse().unwrap();
    let s = with_header(tcp, &v2_header(1, src, tcp, &[]));
    let mut c = TurnClient::stream(Stream::Tcp(s), USER, PASSWORD);
    assert_eq!(mapped(&mut c, "v2 TCP4"), src);
    c.try_allocate().expect("Allocate after a v2 header");
    // With TLVs (ALPN, authority, NOOP) as load balancers add them.
    let tlvs = [
        &[0x01, 0x00, 0x09][..],
        b"stun.turn",
        &[0x02, 0x00, 0x04],
        b"turn",
        &[0x04, 0x00, 0x02, 0, 0],
    ]
    .concat();
    let src2: SocketAddr = "198.51.100.9:1024".parse().unwrap();
    let s = with_header(tcp, &v2_header(1, src2, tcp, &tlvs));
    let mut c2 = TurnClient::stream(Stream::Tcp(s), USER, PASSWORD);
    assert_eq!(mapped(&mut c2, "v2 with TLVs"), src2);
    // v1, IPv6 client (the relay stays IPv4).
    let src6: SocketAddr = "[2001:db8::7]:50000".parse().unwrap();
    let dst6: SocketAddr = "[2001:db8::5]:3478".parse().unwrap();
    let s = with_header(tcp, &v1_header(src6, dst6));
    let mut c6 = TurnClient::stream(Stream::Tcp(s), USER, PASSWORD);
    assert_eq!(mapped(&mut c6, "v1 TCP6"), src6);
    // LOCAL: the connection's own address.
    let s = with_header(tcp, &v2_local());
    let own = s.local_addr().unwrap();
    let mut local = TurnClient::stream(Stream::Tcp(s), USER, PASSWORD);
    assert_eq!(mapped(&mut local, "v2 LOCAL"), own);

    // TLS: the header, then the handshake on the same connection.
    let src_tls: SocketAddr = "203.0.113.77:40000".parse().unwrap();
    let s = with_header(tls, &v2_header(1, src_tls, tls, &[]));
    let cfg = tls_client_config(&cert, &[&rustls::version::TLS13], &[b"stun.turn"]);
    let t = tls_handshake(s, "localhost", cfg.clone()).expect("TLS after a v2 header");
    let mut ct = TurnClient::stream(Stream::Tls(Box::new(t)), USER, PASSWORD);
    assert_eq!(mapped(&mut ct, "v2 then TLS"), src_tls);
    ct.try_allocate()
        .expect("Allocate over TLS after a v2 header");
    let s = with_header(tls, &v1_header(src6, dst6));
    let t = tls_handshake(s, "localhost", cfg.clone()).expect("TLS after a v1 header");
    let mut ct6 = TurnClient::stream(Stream::Tls(Box::new(t)), USER, PASSWORD);
    assert_eq!(mapped(&mut ct6, "v1 then TLS"), src6);

    // The header and the first message (TCP) or ClientHello (TLS) in one segment.
    let src_one: SocketAddr = "192.0.2.99:3000".parse().unwrap();
    let mut s = tcp_connect_from(None, tcp).expect("connect");
    let mut first = v2_header(1, src_one, tcp, &[]);
    first.extend_from_slice(&binding_request());
    s.write_all(&first).expect("write");
    let answer = common::read_frame(&mut s).expect("Binding answer after header + Binding");
    let m = turnstone::proto::Message::parse(&answer).expect("parse");
    assert_eq!(m.class(), turnstone::proto::Class::Success);
    assert_eq!(
        m.xor_address(turnstone::proto::attr::XOR_MAPPED_ADDRESS)
            .ok()
            .flatten(),
        Some(src_one)
    );
    let mut tcp_sock = tcp_connect_from(None, tls).expect("connect");
    let mut conn = rustls::ClientConnection::new(
        cfg.clone(),
        rustls::pki_types::ServerName::try_from("localhost").unwrap(),
    )
    .expect("client");
    let mut first = v1_header(src_one, tls);
    conn.write_tls(&mut first).expect("ClientHello");
    tcp_sock
        .write_all(&first)
        .expect("write header + ClientHello");
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp_sock)
            .expect("handshake after header + ClientHello in one write");
    }
    let t = rustls::StreamOwned::new(conn, tcp_sock);
    let mut c1 = TurnClient::stream(Stream::Tls(Box::new(t)), USER, PASSWORD);
    assert_eq!(mapped(&mut c1, "v1 + ClientHello in one write"), src_one);

    // Refused: an untrusted source (at once), no header, a malformed, oversized or
    // wrong-signature header, or TLS without the header.
    let before = dropped(&server, "proxy_untrusted");
    for addr in [tcp, tls] {
        untrusted_refused(addr, &v2_header(1, src, tcp, &[]));
    }
    common::wait_for("proxy_untrusted counted", Duration::from_secs(2), || {
        (dropped(&server, "proxy_untrusted") == before + 2.0).then_some(())
    });
    let binding = binding_request();
    let mut oversized = v2_header(1, src, tcp, &[]);
    oversized[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    let mut wrong_sig = v2_header(1, src, tcp, &[]);
    wrong_sig[5] = b'X';
    let mut lying_tlv = v2_header(1, src, tcp, &[0x01, 0x00, 0x20, b'x']);
    lying_tlv.extend_from_slice(&binding);
    let before = dropped(&server, "proxy_invalid");
    let bad: Vec<(&str, SocketAddr, Vec<u8>)> = vec![
        ("STUN without a header", tcp, binding.clone()),
        (
            "a v1 header with port 65536",
            tcp,
            b"PROXY TCP4 192.0.2.7 10.0.0.5 65536 443\r\n".to_vec(),
        ),
        ("a v2 header announcing 65535 bytes", tcp, oversized),
        ("a wrong v2 signature", tcp, wrong_sig),
        ("a TLV longer than the header", tcp, lying_tlv),
        (
            "a ClientHello without a header",
            tls,
            vec![0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0, 0, 1, 0],
        ),
    ];
    for (what, addr, bytes) in &bad {
        let mut s = with_header(*addr, bytes);
        let t = assert_closed_unanswered(&mut s, PROMPT, what);
        eprintln!("{what}: closed after {t:?}");
    }
    common::wait_for("proxy_invalid counted", Duration::from_secs(2), || {
        (dropped(&server, "proxy_invalid") >= before + bad.len() as f64).then_some(())
    });

    // A slow header: closed after the short deadline (2 s here), counted.
    let before = dropped(&server, "proxy_timeout");
    let mut slow = with_header(tcp, b"PROXY TCP4 192.0.2.");
    let t = assert_closed_unanswered(&mut slow, Duration::from_secs(5), "slow header");
    eprintln!("slow header closed after {t:?}");
    assert!(
        t >= Duration::from_millis(1500),
        "closed after {t:?}, before the deadline"
    );
    assert_eq!(dropped(&server, "proxy_timeout"), before + 1.0);

    // The per-source caps count the header's address: 3 silent connections "from"
    // 192.0.2.50 fill its unestablished cap; a 4th is closed, while 192.0.2.51 (through
    // the same load balancer address) is served.
    let crowd: SocketAddr = "192.0.2.50:1".parse().unwrap();
    let held: Vec<TcpStream> = (0..3)
        .map(|i| {
            let src = SocketAddr::new(crowd.ip(), 2000 + i);
            with_header(tcp, &v2_header(1, src, tcp, &[]))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut fourth = with_header(
        tcp,
        &v2_header(1, "192.0.2.50:2009".parse().unwrap(), tcp, &[]),
    );
    assert_closed_unanswered(
        &mut fourth,
        PROMPT,
        "a 4th unestablished connection from 192.0.2.50",
    );
    let other: SocketAddr = "192.0.2.51:2000".parse().unwrap();
    let s = with_header(tcp, &v2_header(1, other, tcp, &[]));
    let mut c = TurnClient::stream(Stream::Tcp(s), USER, PASSWORD);
    assert_eq!(mapped(&mut c, "192.0.2.51 beside a full 192.0.2.50"), other);
    drop(held);

    // The clients with proxied addresses were served throughout.
    for (c, want, what) in [
        (&mut c2, src2, "v2 TLV client"),
        (&mut c6, src6, "v1 TCP6 client"),
        (&mut ct, src_tls, "TLS client"),
    ] {
        assert_eq!(mapped(c, what), want, "{what} at the end");
    }
}

/// haproxy with `version` in front of turnstone's tcp and tls listeners.
fn behind_haproxy(version: ProxyVersion) {
    let server = TestServer::start(
        ServerOptions::default()
            .tcp()
            .tls()
            .metrics()
            .proxy_protocol(&[TRUSTED]),
    );
    let tcp = server.tcp_addr.expect("tcp");
    let tls = server.tls_addr.expect("tls");
    let lb_tcp = Haproxy::start(tcp, version);
    let lb_tls = Haproxy::start(tls, version);
    let cert = server.cert.clone().expect("cert");

    // The harness's client from 127.0.0.3 through haproxy: turnstone sees 127.0.0.3 and
    // its port, not haproxy's address.
    let s = tcp_connect_from(Some(CLIENT), lb_tcp.addr).expect("connect to haproxy");
    let own_tcp = s.local_addr().unwrap();
    let mut c = TurnClient::stream(Stream::Tcp(s), USER, PASSWORD);
    assert_eq!(
        mapped(&mut c, "TCP through haproxy"),
        own_tcp,
        "{}",
        lb_tcp.output()
    );
    c.try_allocate().expect("Allocate through haproxy");
    let s = tcp_connect_from(Some(CLIENT), lb_tls.addr).expect("connect to haproxy (tls)");
    let own = s.local_addr().unwrap();
    let cfg = tls_client_config(&cert, &[&rustls::version::TLS13], &[b"stun.turn"]);
    let t = tls_handshake(s, "localhost", cfg).expect("TLS through haproxy");
    let mut ct = TurnClient::stream(Stream::Tls(Box::new(t)), USER, PASSWORD);
    assert_eq!(
        mapped(&mut ct, "TLS through haproxy"),
        own,
        "{}",
        lb_tls.output()
    );
    ct.try_allocate()
        .expect("Allocate over TLS through haproxy");

    // coturn's uclient through haproxy, TCP and TLS, relaying to an echo peer.
    let peer = EchoPeer::start("127.0.0.1");
    let peer_port = peer.port.to_string();
    for (flags, lb) in [(&["-t"][..], &lb_tcp), (&["-t", "-S"][..], &lb_tls)] {
        let port = lb.addr.port().to_string();
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
            "-c",
            "-X",
            "-g",
            "-p",
            &port,
        ]);
        coturn::run_uclient(&args, "127.0.0.1", 5, 100, Duration::from_secs(90));
    }

    // Straight to turnstone from an untrusted address: closed, counted.
    untrusted_refused(tcp, b"\x00\x01\x00\x00");
    untrusted_refused(tls, &[0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0, 0, 1, 0]);
    common::wait_for("proxy_untrusted counted", Duration::from_secs(2), || {
        (dropped(&server, "proxy_untrusted") >= 2.0).then_some(())
    });
    assert_eq!(
        dropped(&server, "proxy_invalid"),
        0.0,
        "haproxy's headers refused"
    );
    // The first clients were served throughout.
    c.try_refresh(600)
        .expect("TCP client through haproxy, at the end");
    ct.try_refresh(600)
        .expect("TLS client through haproxy, at the end");
    // The usage record names the client's own address, not haproxy's.
    c.try_refresh(0).expect("Refresh 0 through haproxy");
    let client = format!("client={own_tcp}");
    server.wait_log(
        "the usage record with the client's address",
        Duration::from_secs(3),
        |l| {
            l.lines()
                .any(|x| x.contains("allocation ended") && x.contains(&client))
        },
    );
}

#[test]
fn behind_haproxy_send_proxy_v2() {
    behind_haproxy(ProxyVersion::V2);
}

#[test]
fn behind_haproxy_send_proxy_v1() {
    behind_haproxy(ProxyVersion::V1);
}

/// Headless Chromium (two relay-only peer connections exchanging data-channel messages,
/// `tests/browser/index.html`) with `turn` as its only ICE server; both selected pairs
/// must be relay candidates allocated over `protocol`.
fn chromium_relays(turn: &str, protocol: &str, extra_args: &[&str]) {
    use common::browser::{percent_encode, run_page};
    let page = format!(
        "/index.html?turn={}&username={}&credential={}&messages=20",
        percent_encode(turn),
        percent_encode(USER),
        percent_encode(PASSWORD)
    );
    let r = run_page(&page, extra_args, Duration::from_secs(30));
    assert_eq!(r.v["ok"].as_bool(), Some(true), "{turn}\n{}", r.context());
    for (count, in_order) in [("messagesAtoB", "inOrderB"), ("messagesBtoA", "inOrderA")] {
        assert_eq!(
            r.v[count].as_u64(),
            Some(20),
            "{turn} {count}\n{}",
            r.context()
        );
        assert_eq!(
            r.v[in_order].as_bool(),
            Some(true),
            "{turn}\n{}",
            r.context()
        );
    }
    for pc in ["a", "b"] {
        let local = &r.v[pc]["local"];
        assert_eq!(
            local["candidateType"].as_str(),
            Some("relay"),
            "{turn}\n{}",
            r.context()
        );
        assert_eq!(
            local["relayProtocol"].as_str(),
            Some(protocol),
            "{turn}\n{}",
            r.context()
        );
    }
}

#[test]
fn chromium_behind_haproxy() {
    let server = TestServer::start(
        ServerOptions::default()
            .tcp()
            .tls()
            .metrics()
            .proxy_protocol(&[TRUSTED]),
    );
    let lb_tcp = Haproxy::start(server.tcp_addr.expect("tcp"), ProxyVersion::V1);
    let lb_tls = Haproxy::start(server.tls_addr.expect("tls"), ProxyVersion::V2);
    chromium_relays(
        &format!("turn:127.0.0.1:{}?transport=tcp", lb_tcp.addr.port()),
        "tcp",
        &[],
    );
    // The certificate is self-signed (for localhost and 127.0.0.1).
    chromium_relays(
        &format!("turns:localhost:{}?transport=tcp", lb_tls.addr.port()),
        "tls",
        &["--ignore-certificate-errors"],
    );
    assert_eq!(
        dropped(&server, "proxy_invalid"),
        0.0,
        "haproxy's headers refused"
    );
}

#[test]
fn a_reload_cannot_take_the_proxy_requirement_off_a_running_listener() {
    let options = ServerOptions::default()
        .tcp()
        .metrics()
        .proxy_protocol(&[TRUSTED]);
    let server = TestServer::start(options);
    let tcp = server.tcp_addr.expect("tcp");
    // The new file drops proxy_protocol from the entry; the listener, bound at start,
    // keeps requiring a header (a reload binds no listener), and the log says so.
    server.reload(&ServerOptions::default().tcp().metrics());
    assert!(
        server
            .stderr()
            .contains("proxy_protocol and proxy_from changes take effect at restart"),
        "{}",
        server.stderr()
    );
    // Workers take reloaded stream limits at their next tick.
    std::thread::sleep(Duration::from_millis(1500));
    let mut s = with_header(tcp, &binding_request());
    assert_closed_unanswered(&mut s, PROMPT, "a headerless Binding after the reload");
    let src: SocketAddr = "192.0.2.8:40000".parse().unwrap();
    let s = with_header(tcp, &v2_header(1, src, tcp, &[]));
    let mut c = TurnClient::stream(Stream::Tcp(s), USER, PASSWORD);
    assert_eq!(mapped(&mut c, "v2 after the reload"), src);
}
