//! 100,000 packets through each relay path of a real turnstone, at a paced rate, with
//! none lost or reordered: ChannelData, Send/Data indications, and client to client
//! through two allocations of the same server. Then the same while the worker shards
//! move between threads every 50 ms (adaptive workers, forced by a testing aid).

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::traffic::{pace, seq_of, seq_payload, udp_socket};
use common::{
    channel_data, relayed_payload, send_indication, ServerOptions, TestServer, TurnClient,
    PASSWORD, USER,
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
    let logs = srv.logs();
    let gathers = logs.matches("worker shards gather").count();
    let spreads = logs.matches("worker shards spread").count();
    assert!(
        gathers >= 20 && spreads >= 20,
        "expected the shards to move every 50 ms; saw {gathers} gathers and {spreads} spreads"
    );
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
