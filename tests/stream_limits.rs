//! The stream limits under their defaults fit thousands of TCP/TLS clients behind one address (2,000 concurrent TLS allocations from 127.0.0.1; coturn's `turnutils_uclient -t -S -m 50`), while a flood of silent and half-open connections from one address is held to 256 (the default max_unauthenticated_per_source) and closed by the short deadline, a client from another address allocating at once and the server's open files returning to their level.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::coturn::{self, EchoPeer};
use common::{
    assert_tcp_allocates, tcp_connect_from, tls_client_config, tls_connect, ServerOptions, Stream,
    TestServer, TurnClient, PASSWORD, USER,
};
use turnstone::proto::{method, Class, MessageWriter, TransactionId};

/// Where the good client of the flood test comes from (the flood from 127.0.0.1).
const OTHER_SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// The default `limits.stream_handshake_timeout`.
const DEADLINE: Duration = Duration::from_secs(10);
/// The default `limits.max_unauthenticated_per_source`.
const UNESTABLISHED_CAP: usize = 256;

/// Raises this process's open-file limit (soft, up to the hard one) so that it holds
/// `need` sockets; the servers it starts inherit it. Panics if the hard limit is lower.
fn raise_open_files(need: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    if soft >= need {
        return;
    }
    assert!(
        hard >= need,
        "the open-file hard limit is {hard}, this test needs {need} (ulimit -Hn)"
    );
    setrlimit(Resource::RLIMIT_NOFILE, need, hard).expect("setrlimit RLIMIT_NOFILE");
}

/// A STUN Binding request (20 bytes).
fn binding() -> Vec<u8> {
    let mut buf = Vec::new();
    MessageWriter::new(
        &mut buf,
        method::BINDING,
        Class::Request,
        TransactionId(common::random_tid()),
    )
    .finish();
    buf
}

#[test]
fn two_thousand_tls_allocations_from_one_address() {
    const CLIENTS: usize = 2000;
    const THREADS: usize = 4;
    raise_open_files(3 * CLIENTS as u64 + 1024);
    let server = TestServer::start(
        ServerOptions::default()
            .tls()
            .metrics()
            .relay_port_count(CLIENTS as u16 + 100),
    );
    let addr = server.tls_addr.expect("tls listener");
    let cert = server.cert.clone().expect("cert");
    let t0 = Instant::now();
    let clients: Vec<TurnClient> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let cert = cert.clone();
                s.spawn(move || {
                    let cfg = tls_client_config(&cert, &[&rustls::version::TLS13], &[b"stun.turn"]);
                    (0..CLIENTS / THREADS)
                        .map(|i| {
                            let n = t * (CLIENTS / THREADS) + i;
                            let tls = tls_connect(addr, "localhost", cfg.clone())
                                .unwrap_or_else(|e| panic!("TLS client #{n}: {e}"));
                            let mut c =
                                TurnClient::stream(Stream::Tls(Box::new(tls)), USER, PASSWORD);
                            c.try_allocate()
                                .unwrap_or_else(|e| panic!("TLS client #{n}: Allocate: {e}"));
                            c
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("client thread"))
            .collect()
    });
    assert_eq!(clients.len(), CLIENTS);
    eprintln!(
        "{CLIENTS} TLS connections from 127.0.0.1 allocated in {:?}",
        t0.elapsed()
    );
    // The server holds them all at once.
    let active = server.wait_metric(
        "turnstone_allocations_active",
        &[("transport", "tls"), ("family", "ipv4")],
        CLIENTS as f64,
    );
    assert_eq!(active, CLIENTS as f64);
    // Every one of them is still served (a Refresh on each connection).
    let mut clients = clients;
    for (n, c) in clients.iter_mut().enumerate() {
        c.try_refresh(600)
            .unwrap_or_else(|e| panic!("TLS client #{n}: Refresh with all {CLIENTS} open: {e}"));
    }
    let dropped = |reason: &str| {
        server
            .metric(
                "turnstone_stream_connections_dropped_total",
                &[("reason", reason)],
            )
            .expect("dropped metric")
    };
    for reason in ["total_limit", "source_limit", "unauthenticated_limit"] {
        assert_eq!(dropped(reason), 0.0, "connections dropped: {reason}");
    }
    drop(clients);
    common::wait_for("allocations ended", Duration::from_secs(10), || {
        (server.metric(
            "turnstone_allocations_active",
            &[("transport", "tls"), ("family", "ipv4")],
        ) == Some(0.0))
        .then_some(())
    });
}

/// coturn's uclient over TLS with 50 clients (each with its RTP and RTCP connection: 100
/// connections from 127.0.0.1), as a new user would try; it failed with connection
/// resets under the old cap of 64 connections per address.
#[test]
fn uclient_tls_fifty_clients_from_one_address() {
    let server = TestServer::start(ServerOptions::default().tls());
    let peer = EchoPeer::start("127.0.0.1");
    let port = server.tls_port().to_string();
    let peer_port = peer.port.to_string();
    coturn::run_uclient(
        &[
            "-t",
            "-S",
            "-u",
            USER,
            "-w",
            PASSWORD,
            "-e",
            "127.0.0.1",
            "-r",
            &peer_port,
            "-X",
            "-g",
            "-p",
            &port,
        ],
        "127.0.0.1",
        50,
        20,
        Duration::from_secs(120),
    );
}

/// What a probe of a connection found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    Closed,
}

/// Reads what is there without blocking: is the connection still open?
fn probe(s: &TcpStream) -> State {
    if s.set_nonblocking(true).is_err() {
        return State::Closed;
    }
    let mut buf = [0u8; 4096];
    let mut r = s;
    let state = loop {
        match r.read(&mut buf) {
            Ok(0) => break State::Closed,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break State::Open,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break State::Closed,
        }
    };
    let _ = s.set_nonblocking(false);
    state
}

#[test]
fn a_flood_of_silent_and_half_open_connections_from_one_address_is_stopped() {
    const FLOOD: usize = 600;
    raise_open_files(FLOOD as u64 + 1024);
    let server = TestServer::start(ServerOptions::default().tcp().tls().metrics());
    let tcp = server.tcp_addr.expect("tcp listener");
    let tls = server.tls_addr.expect("tls listener");

    // An established client from the flooding address, before the flood: it is not
    // counted with the unestablished connections, and stays served throughout.
    let mut resident = TurnClient::tcp(None, tcp).expect("resident client");
    resident.try_allocate().expect("resident Allocate");
    // Let the readiness probes' connections go.
    std::thread::sleep(Duration::from_millis(300));
    let fds_before = server.open_fds().expect("/proc/PID/fd");

    // The flood from 127.0.0.1: silent TCP connections, TLS connections that stop after
    // 11 bytes of a ClientHello, and TCP connections whose STUN header announces 100
    // bytes of which 30 come.
    let half_hello = [
        0x16, 0x03, 0x01, 0x01, 0x00, 0x01, 0x00, 0x00, 0xfc, 0x03, 0x03,
    ];
    let mut lying = binding();
    lying[2..4].copy_from_slice(&100u16.to_be_bytes());
    lying.extend_from_slice(&[0u8; 30]);
    let t0 = Instant::now();
    let mut flood: Vec<TcpStream> = Vec::with_capacity(FLOOD);
    let mut reset_at_once = 0usize;
    for i in 0..FLOOD {
        let (to, bytes): (SocketAddr, &[u8]) = match i % 3 {
            0 => (tcp, &[]),
            1 => (tls, &half_hello),
            _ => (tcp, &lying),
        };
        match tcp_connect_from(None, to) {
            Ok(mut s) => {
                // Refused ones may be reset before or while this is written.
                let _ = s.write_all(bytes);
                flood.push(s);
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => reset_at_once += 1,
            Err(e) => panic!("flood connection #{i}: {e}"),
        }
    }
    let made = t0.elapsed();
    eprintln!(
        "{} flood connections made in {made:?} ({reset_at_once} reset while being set up)",
        flood.len()
    );
    assert!(
        made < DEADLINE / 2,
        "making the flood took {made:?}: too slow to test the cap within the deadline"
    );

    // A client from another address allocates at once (a TCP and a TLS-less check: the
    // harness's TCP client from 127.0.0.2).
    let t = Instant::now();
    assert_tcp_allocates(tcp, Some(OTHER_SOURCE), "during the flood from 127.0.0.1");
    eprintln!("127.0.0.2 allocated in {:?} during the flood", t.elapsed());
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "the client from 127.0.0.2 waited {:?}",
        t.elapsed()
    );
    resident
        .try_refresh(600)
        .expect("the established client from 127.0.0.1 during the flood");

    // The server keeps at most 256 of them (the default cap), refusing the rest at once.
    std::thread::sleep(Duration::from_millis(500));
    let open = flood.iter().filter(|s| probe(s) == State::Open).count();
    eprintln!(
        "open after {:?}: {open} of {} (cap {UNESTABLISHED_CAP})",
        t0.elapsed(),
        flood.len()
    );
    assert!(
        t0.elapsed() < DEADLINE - Duration::from_secs(2),
        "counted too late"
    );
    assert_eq!(
        open, UNESTABLISHED_CAP,
        "the server should hold exactly {UNESTABLISHED_CAP} unestablished connections from one address"
    );
    let refused = server
        .metric(
            "turnstone_stream_connections_dropped_total",
            &[("reason", "unauthenticated_limit")],
        )
        .expect("dropped metric");
    assert_eq!(
        refused as usize,
        FLOOD - UNESTABLISHED_CAP,
        "refusals counted"
    );

    // Within the short deadline (plus the once-a-second tick) all are closed, and the
    // server's open files are back where they were.
    let closed_at = common::wait_for(
        "the flood's connections closed and the server's fds back",
        DEADLINE + Duration::from_secs(5),
        || {
            let open = flood.iter().filter(|s| probe(s) == State::Open).count();
            let fds = server.open_fds()?;
            (open == 0 && fds <= fds_before).then(|| (t0.elapsed(), fds))
        },
    );
    eprintln!(
        "all closed and fds {} (were {fds_before}) {:?} after the flood began",
        closed_at.1, closed_at.0
    );
    assert!(
        closed_at.0 >= DEADLINE - Duration::from_secs(1),
        "closed after {:?}, before the {DEADLINE:?} deadline",
        closed_at.0
    );
    let timeouts = server
        .metric(
            "turnstone_stream_connections_dropped_total",
            &[("reason", "handshake_timeout")],
        )
        .expect("dropped metric");
    assert_eq!(
        timeouts as usize, UNESTABLISHED_CAP,
        "deadline closes counted"
    );

    // 127.0.0.1 is served again, and the resident client never stopped being.
    resident
        .try_refresh(600)
        .expect("the established client from 127.0.0.1 after the flood");
    let mut c = tcp_connect_from(None, tcp).expect("connect after the flood");
    c.write_all(&binding()).expect("write");
    let mut head = [0u8; 20];
    c.read_exact(&mut head)
        .expect("127.0.0.1 answered after the flood");
    assert_eq!(head[0] & 0x01, 0x01, "a Binding success");
    let cfg = tls_client_config(
        server.cert.as_ref().expect("cert"),
        &[&rustls::version::TLS13],
        &[b"stun.turn"],
    );
    let t = tls_connect(tls, "localhost", cfg).expect("TLS from 127.0.0.1 after the flood");
    let mut t = TurnClient::stream(Stream::Tls(Box::new(t)), USER, PASSWORD);
    t.try_allocate()
        .expect("TLS Allocate from 127.0.0.1 after the flood");
}

#[test]
fn a_reload_changes_the_stream_limits() {
    let options = ServerOptions::default().tcp();
    let server = TestServer::start(options.clone());
    let tcp = server.tcp_addr.expect("tcp listener");
    // Is a third silent connection from 127.0.0.1 (beside two) refused at once?
    let third_refused = || {
        let held: Vec<TcpStream> = (0..2)
            .map(|_| tcp_connect_from(None, tcp).expect("connect"))
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        let refused = match tcp_connect_from(None, tcp) {
            Err(e) if e.kind() == ErrorKind::ConnectionReset => true,
            Err(e) => panic!("connect: {e}"),
            Ok(s) => {
                std::thread::sleep(Duration::from_millis(300));
                probe(&s) == State::Closed
            }
        };
        drop(held);
        std::thread::sleep(Duration::from_millis(200));
        refused
    };
    assert!(!third_refused(), "refused under the default cap of 256");
    server.reload(
        &options
            .clone()
            .limits_toml("max_unauthenticated_per_source = 2"),
    );
    // Every worker takes the new limits on its next tick (within a second).
    common::wait_for("the reloaded cap applies", Duration::from_secs(5), || {
        third_refused().then_some(())
    });
    // And back.
    server.reload(&options);
    common::wait_for(
        "the default cap applies again",
        Duration::from_secs(5),
        || (!third_refused()).then_some(()),
    );
}
