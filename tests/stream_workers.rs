//! TCP and TLS clients are spread over every worker (per-worker metrics show both carrying
//! stream clients), and RFC 6062 data connections reach the worker that holds their
//! allocation whichever worker accepted them (counted hand-overs, bytes both ways).

mod common;

use std::time::{Duration, Instant};

use common::rfc6062::{bind_data_connection, round_trip, TcpPeer};
use common::traffic::udp_socket;
use common::{
    relayed_payload, tcp_connect_from, tls_client_config, tls_connect, ServerOptions, Stream,
    TestServer, TurnClient, PASSWORD, USER,
};

/// Two workers, each on its own thread for good (no gathering), with TCP and TLS
/// listeners and metrics.
fn two_worker_server() -> TestServer {
    TestServer::start(
        ServerOptions::default()
            .tcp()
            .tls()
            .workers(2)
            .metrics()
            .server_toml("adaptive_workers = false"),
    )
}

/// A new TCP (`tls` false) or TLS connection to the server's listener.
fn connect(server: &TestServer, tls: bool) -> Stream {
    if tls {
        let cert = server.cert.clone().expect("test certificate");
        let cfg = tls_client_config(&cert, &[&rustls::version::TLS13], &[b"stun.turn"]);
        let addr = server.tls_addr.expect("tls listener");
        Stream::Tls(Box::new(
            tls_connect(addr, "localhost", cfg).unwrap_or_else(|e| panic!("{e}")),
        ))
    } else {
        Stream::Tcp(tcp_connect_from(None, server.addr).expect("TCP connect"))
    }
}

/// `turnstone_worker_stream_connections` of each of the two workers, once they add up to
/// `total` (the gauges are set once a second).
fn stream_connections_per_worker(server: &TestServer, total: f64) -> [f64; 2] {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = server.metrics_text();
        let per = ["0", "1"].map(|w| {
            common::metrics::sample(
                &text,
                "turnstone_worker_stream_connections",
                &[("worker", w)],
            )
            .unwrap_or(-1.0)
        });
        if per[0] + per[1] == total {
            return per;
        }
        assert!(
            Instant::now() < deadline,
            "turnstone_worker_stream_connections = {per:?}, want {total} in all\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn tcp_and_tls_clients_spread_over_both_workers() {
    const EACH: usize = 20;
    let server = two_worker_server();
    let peer = udp_socket(Duration::from_secs(5));
    let peer_addr = peer.local_addr().unwrap();
    let mut clients = Vec::new();
    for i in 0..2 * EACH {
        let tls = i % 2 == 1;
        let mut c = TurnClient::stream(connect(&server, tls), USER, PASSWORD);
        let relay = c
            .try_allocate()
            .unwrap_or_else(|e| panic!("client {i} (tls: {tls}): {e}"));
        c.bind(0x4000, peer_addr);
        // One packet each way: client -> peer, peer -> client.
        let msg = format!("client {i}");
        c.send_channel(0x4000, msg.as_bytes()).unwrap();
        let mut buf = [0u8; 1500];
        let (n, from) = peer.recv_from(&mut buf).expect("the peer receives");
        assert_eq!(&buf[..n], msg.as_bytes(), "client {i} to the peer");
        assert_eq!(from, relay, "client {i}: sent from its relayed address");
        peer.send_to(b"back", relay).unwrap();
        let got = c.recv(Duration::from_secs(5)).expect("the client receives");
        assert_eq!(
            relayed_payload(&got),
            Some(&b"back"[..]),
            "peer to client {i}"
        );
        clients.push(c);
    }
    let per = stream_connections_per_worker(&server, (2 * EACH) as f64);
    eprintln!("stream connections per worker: {per:?}");
    assert!(
        per[0] >= 1.0 && per[1] >= 1.0,
        "both workers must carry stream clients: {per:?}"
    );
    // Every client is still served after the others came.
    for (i, c) in clients.iter_mut().enumerate() {
        c.try_refresh(600)
            .unwrap_or_else(|e| panic!("client {i}: {e}"));
    }
    drop(clients);
    stream_connections_per_worker(&server, 0.0);
}

#[test]
fn rfc6062_data_connections_reach_the_allocation_worker() {
    // 16 pairs of control and data connections, half over TLS: with two workers, the
    // kernel puts about half of the data connections on the other worker than their
    // allocation's (none would, with probability 2^-16).
    const PAIRS: usize = 16;
    let server = two_worker_server();
    let peer = TcpPeer::start();
    let mut pairs = Vec::new();
    for i in 0..PAIRS {
        let tls = i % 2 == 1;
        let what = format!("pair {i} (tls: {tls})");
        let mut control = TurnClient::stream(connect(&server, tls), USER, PASSWORD);
        control
            .try_allocate_tcp()
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let id = control
            .try_connect_peer(peer.addr)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let mut at_peer = peer.accept().unwrap_or_else(|e| panic!("{what}: {e}"));
        let mut data = bind_data_connection(connect(&server, tls), USER, PASSWORD, id)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let bytes: Vec<u8> = (0..100_000u32).map(|k| (k % 251) as u8 ^ i as u8).collect();
        round_trip(
            &mut data,
            &mut at_peer,
            &bytes,
            &format!("{what}: to the peer"),
        );
        round_trip(
            &mut at_peer,
            &mut data,
            &bytes,
            &format!("{what}: to the client"),
        );
        pairs.push((control, data, at_peer));
    }
    let handovers = server.wait_metric("turnstone_stream_handovers_total", &[], 1.0);
    eprintln!("{handovers} of {PAIRS} data connections handed over");
    assert!(
        handovers <= PAIRS as f64,
        "{handovers} hand-overs for {PAIRS} data connections"
    );
    // All pairs still carry bytes after the later ones came.
    for (i, (_, data, at_peer)) in pairs.iter_mut().enumerate() {
        round_trip(at_peer, data, b"still there", &format!("pair {i} again"));
    }
}
