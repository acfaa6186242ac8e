//! 100,000 packets through each relay path of a real turnstone, at a paced rate, with
//! none lost or reordered: ChannelData, Send/Data indications, and client to client
//! through two allocations of the same server. Then the same while the worker shards
//! move between threads every 50 ms (adaptive workers, forced by a testing aid), also
//! for TCP and TLS clients (ChannelData both ways) and an RFC 6062 TCP relay (bytes both
//! ways), every byte in order.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::rfc6062::{bind_data_connection, TcpPeer};
use common::traffic::{pace, seq_of, seq_payload, udp_socket};
use common::{
    channel_data, relayed_payload, send_indication, tcp_connect_from, tls_client_config,
    tls_connect, ServerOptions, Stream, TestServer, TurnClient, PASSWORD, USER,
};

const PACKETS: u32 = 100_000;
/// Packets sent per millisecond tick: 20,000 packets/s.
const PER_TICK: u32 = 20;
/// Payload bytes of every packet.
const LEN: usize = 100;

fn socket() -> UdpSocket {
    udp_socket(Duration::from_secs(2))
}

fn client(server: SocketAddr) -> TurnClient {
    TurnClient::udp(server, USER, PASSWORD)
}

/// The client's socket, for paced traffic and for a receiver thread (2 s timeout).
fn rx_of(c: &TurnClient) -> UdpSocket {
    let rx = c.udp_socket().try_clone().unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    rx
}

/// The sequence number in what a peer receives (the bare payload).
fn peer_seq(buf: &[u8]) -> Option<u32> {
    seq_of(buf)
}

/// The sequence number in what a client receives (ChannelData or Data indication).
fn client_seq(buf: &[u8]) -> Option<u32> {
    seq_of(relayed_payload(buf)?)
}

/// Sends `PACKETS` packets made by `make` from `tx` to `to` at a paced rate on this
/// thread while `rx` is drained on another; asserts every sequence number arrives in
/// order.
fn run_path(
    tx: &UdpSocket,
    to: SocketAddr,
    make: impl Fn(u32) -> Vec<u8>,
    rx: UdpSocket,
    seq_of: fn(&[u8]) -> Option<u32>,
) {
    let receiver = std::thread::spawn(move || {
        let mut buf = vec![0u8; 2048];
        let mut expected = 0u32;
        let deadline = Instant::now() + Duration::from_secs(60);
        while expected < PACKETS && Instant::now() < deadline {
            let Ok((n, _)) = rx.recv_from(&mut buf) else {
                break;
            };
            let Some(seq) = seq_of(&buf[..n]) else {
                continue;
            };
            assert_eq!(
                seq, expected,
                "lost or reordered: got {seq}, expected {expected}"
            );
            expected += 1;
        }
        expected
    });
    pace(0, PACKETS, PER_TICK, |seq| {
        tx.send_to(&make(seq), to).unwrap();
    });
    let got = receiver.join().unwrap();
    assert_eq!(got, PACKETS, "packets received in order");
}

fn options() -> ServerOptions {
    ServerOptions::default()
        .users(&[(USER, PASSWORD)])
        .allow_peers(&["127.0.0.0/8"])
}

fn server() -> TestServer {
    TestServer::start(options())
}

/// Four worker shards that gather on thread 0 and spread back every 50 ms.
fn moving_server() -> TestServer {
    TestServer::start(
        options()
            .tcp()
            .tls()
            .metrics()
            .workers(4)
            .env("TURNSTONE_TEST_SHARD_FLIP_MS", "50")
            .extra_toml("[log]\nlevel = \"debug\"\n"),
    )
}

/// ChannelData from `c` on channel 0x4000 to a peer socket.
fn channel_data_to_peer(c: &mut TurnClient) {
    let peer = socket();
    c.bind(0x4000, peer.local_addr().unwrap());
    run_path(
        c.udp_socket(),
        c.server(),
        |seq| channel_data(0x4000, &seq_payload(seq, LEN)),
        peer,
        peer_seq,
    );
}

/// ChannelData from `a` on channel 0x4001 to `b`'s relay, arriving at `b`.
fn client_to_client(
    a: &mut TurnClient,
    relay_a: SocketAddr,
    b: &mut TurnClient,
    relay_b: SocketAddr,
) {
    b.permit(relay_a);
    a.bind(0x4001, relay_b);
    run_path(
        a.udp_socket(),
        a.server(),
        |seq| channel_data(0x4001, &seq_payload(seq, LEN)),
        rx_of(b),
        client_seq,
    );
}

#[test]
fn paths_while_shards_move_between_threads() {
    let srv = moving_server();
    // Several clients, so that allocations land on several shards.
    let mut clients: Vec<TurnClient> = (0..6).map(|_| client(srv.addr)).collect();
    let relays: Vec<SocketAddr> = clients.iter_mut().map(|c| c.must_allocate()).collect();
    channel_data_to_peer(&mut clients[0]);
    // Client to client between allocations of (most likely) different shards.
    let (a, rest) = clients.split_at_mut(1);
    client_to_client(&mut a[0], relays[0], &mut rest[4], relays[5]);
    // The shards really moved, many times, both ways.
    assert_shards_moved(&srv);
}

/// Asserts that the shards moved many times, both ways.
fn assert_shards_moved(srv: &TestServer) {
    let logs = srv.logs();
    let gathers = logs.matches("worker shards gather").count();
    let spreads = logs.matches("worker shards spread").count();
    assert!(
        gathers >= 20 && spreads >= 20,
        "expected the shards to move every 50 ms; saw {gathers} gathers and {spreads} spreads"
    );
}

/// Stream packets each way: fewer than on UDP (each is a write on the test's side).
const STREAM_PACKETS: u32 = 40_000;

/// A stream client (TCP, or TLS if `tls`) with a channel to a UDP peer: `STREAM_PACKETS`
/// ChannelData frames to the peer, then as many from the peer back over the stream, each
/// direction paced and checked in order.
fn stream_channel_both_ways(srv: &TestServer, tls: bool) {
    let stream = if tls {
        let cert = srv.cert.clone().expect("test certificate");
        let cfg = tls_client_config(&cert, &[&rustls::version::TLS13], &[b"stun.turn"]);
        Stream::Tls(Box::new(
            tls_connect(srv.tls_addr.expect("tls listener"), "localhost", cfg)
                .unwrap_or_else(|e| panic!("{e}")),
        ))
    } else {
        Stream::Tcp(tcp_connect_from(None, srv.addr).expect("TCP connect"))
    };
    let mut c = TurnClient::stream(stream, USER, PASSWORD);
    let relay = c.must_allocate();
    let peer = socket();
    let peer_addr = peer.local_addr().unwrap();
    c.bind(0x4000, peer_addr);

    // Client to peer.
    let peer_rx = peer.try_clone().unwrap();
    let receiver = std::thread::spawn(move || {
        let mut buf = vec![0u8; 2048];
        let mut expected = 0u32;
        while expected < STREAM_PACKETS {
            let Ok((n, _)) = peer_rx.recv_from(&mut buf) else {
                break;
            };
            let seq = peer_seq(&buf[..n]);
            assert_eq!(seq, Some(expected), "to the peer: lost or reordered");
            expected += 1;
        }
        expected
    });
    pace(0, STREAM_PACKETS, PER_TICK, |seq| {
        c.send_channel(0x4000, &seq_payload(seq, LEN)).unwrap();
    });
    let got = receiver.join().unwrap();
    assert_eq!(
        got, STREAM_PACKETS,
        "tls: {tls}: packets at the peer in order"
    );

    // Peer to client.
    let sender = std::thread::spawn(move || {
        pace(0, STREAM_PACKETS, PER_TICK, |seq| {
            peer.send_to(&seq_payload(seq, LEN), relay).unwrap();
        });
    });
    let mut expected = 0u32;
    while expected < STREAM_PACKETS {
        let Some(frame) = c.recv(Duration::from_secs(2)) else {
            break;
        };
        assert_eq!(
            client_seq(&frame),
            Some(expected),
            "tls: {tls}: to the client: lost or reordered"
        );
        expected += 1;
    }
    sender.join().unwrap();
    assert_eq!(
        expected, STREAM_PACKETS,
        "tls: {tls}: packets at the client in order"
    );
}

/// Bytes of the RFC 6062 stream each way.
const RFC6062_BYTES: usize = 8 << 20;

/// The byte at offset `i` of the RFC 6062 stream `dir`.
fn pattern(i: usize, dir: u8) -> u8 {
    ((i % 251) as u8) ^ dir
}

/// Writes `RFC6062_BYTES` of `pattern(_, dir)` in paced 16 KiB chunks (about 2 s).
fn write_pattern(mut w: impl Write, dir: u8) {
    let mut off = 0;
    while off < RFC6062_BYTES {
        let chunk: Vec<u8> = (off..(off + 16384).min(RFC6062_BYTES))
            .map(|i| pattern(i, dir))
            .collect();
        w.write_all(&chunk).expect("write");
        off += chunk.len();
        std::thread::sleep(Duration::from_millis(4));
    }
}

/// Reads `RFC6062_BYTES` and checks each is `pattern(_, dir)`; returns how many arrived.
fn read_pattern(mut r: impl Read, dir: u8) -> usize {
    let mut buf = vec![0u8; 65536];
    let mut off = 0;
    while off < RFC6062_BYTES {
        let n = match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for (k, b) in buf[..n].iter().enumerate() {
            assert_eq!(*b, pattern(off + k, dir), "byte {} changed", off + k);
        }
        off += n;
    }
    off
}

/// An RFC 6062 TCP relay: TCP allocation, Connect to a TCP peer, a data connection bound
/// to it; 8 MiB each way at once, every byte checked.
fn rfc6062_both_ways(srv: &TestServer) {
    let peer = TcpPeer::start();
    let mut control = TurnClient::tcp(None, srv.addr).unwrap_or_else(|e| panic!("{e}"));
    control.try_allocate_tcp().unwrap_or_else(|e| panic!("{e}"));
    let id = control
        .try_connect_peer(peer.addr)
        .unwrap_or_else(|e| panic!("{e}"));
    let at_peer = peer.accept().unwrap_or_else(|e| panic!("{e}"));
    let data = tcp_connect_from(None, srv.addr).expect("data connection");
    let data = match bind_data_connection(Stream::Tcp(data), USER, PASSWORD, id) {
        Ok(Stream::Tcp(t)) => t,
        Ok(Stream::Tls(_)) => unreachable!(),
        Err(e) => panic!("{e}"),
    };
    for s in [&data, &at_peer] {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }
    let (d2, p2) = (data.try_clone().unwrap(), at_peer.try_clone().unwrap());
    let up = std::thread::spawn(move || write_pattern(d2, 1));
    let down = std::thread::spawn(move || write_pattern(p2, 2));
    // Both read at once: a client that stops reading would fill the server's buffers.
    let peer_reader = std::thread::spawn(move || read_pattern(&at_peer, 1));
    let at_client_got = read_pattern(&data, 2);
    let at_peer_got = peer_reader.join().unwrap();
    up.join().unwrap();
    down.join().unwrap();
    assert_eq!(at_peer_got, RFC6062_BYTES, "bytes at the peer");
    assert_eq!(at_client_got, RFC6062_BYTES, "bytes at the client");
    drop(control);
}

#[test]
fn stream_paths_while_shards_move_between_threads() {
    let srv = moving_server();
    // A few idle stream clients first, so that the ones under test are likely on a
    // shard that moves (any but shard 0) and the gauges below have something to show.
    let mut idle: Vec<TurnClient> = (0..6)
        .map(|_| TurnClient::tcp(None, srv.addr).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    for c in &mut idle {
        c.try_allocate().unwrap_or_else(|e| panic!("{e}"));
    }
    stream_channel_both_ways(&srv, false);
    stream_channel_both_ways(&srv, true);
    rfc6062_both_ways(&srv);
    assert_shards_moved(&srv);
    // Stream connections lived on the shards that move.
    let text = srv.metrics_text();
    let moving: f64 = ["1", "2", "3"]
        .iter()
        .map(|w| {
            common::metrics::sample(
                &text,
                "turnstone_worker_stream_connections",
                &[("worker", w)],
            )
            .unwrap_or(0.0)
        })
        .sum();
    assert!(
        moving >= 1.0,
        "no stream connection on shards 1-3 (which move)
{text}"
    );
    for c in &mut idle {
        c.try_refresh(600).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn channel_data_path() {
    let srv = server();
    let mut c = client(srv.addr);
    c.must_allocate();
    channel_data_to_peer(&mut c);
}

#[test]
fn send_indication_path() {
    let srv = server();
    let mut c = client(srv.addr);
    let relay = c.must_allocate();
    let peer = socket();
    let peer_addr = peer.local_addr().unwrap();
    c.permit(peer_addr);
    // Peer to client: Data indications (no channel bound).
    let rx = rx_of(&c);
    run_path(&peer, relay, |seq| seq_payload(seq, LEN), rx, client_seq);
    // Client to peer: Send indications.
    let peer_rx = peer.try_clone().unwrap();
    run_path(
        c.udp_socket(),
        srv.addr,
        |seq| send_indication(peer_addr, &seq_payload(seq, LEN)),
        peer_rx,
        peer_seq,
    );
}

#[test]
fn client_to_client_path() {
    let srv = server();
    let mut a = client(srv.addr);
    let mut b = client(srv.addr);
    let relay_a = a.must_allocate();
    let relay_b = b.must_allocate();
    client_to_client(&mut a, relay_a, &mut b, relay_b);
}
