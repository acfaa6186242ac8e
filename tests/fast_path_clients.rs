//! Real clients relay through the kernel fast path (root): coturn's uclient (ChannelData and Send indications to its echo peer), headless Chromium's data channels and the webrtc-rs TURN client, with turnstone's `kernel_fast_path = "required"` in the namespace rig, deliver every packet once and in order while the server's own CPU time stays near zero and its metrics and usage records count them.
//
// The rig (namespaces, routes, configuration, readings) is tests/common/fastpath.rs.

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::coturn::{run_uclient_in, EchoPeer};
use common::fastpath::{
    config, cpu_ticks, kernel, metrics, rig, usage, user, PeerEcho, Usage, CLIENT, PEER, PORT,
    SERVER,
};
use common::netns::Netns;
use common::{wait_for, ChildGuard};

/// One test at a time: the CPU figures must not include another test's traffic.
static SERIAL: Mutex<()> = Mutex::new(());

/// The echo peer's port in the peer namespace (a fresh namespace: nothing else binds it).
const PEER_PORT: u16 = 3480;

/// The server CPU a packet may cost on the kernel path, in clock ticks per packet: a
/// userspace relay needs at least a receive and a send system call per packet (several
/// µs); a tick is 10 ms, so 1 tick per 10,000 packets is 1 µs a packet.
const TICKS_PER_PACKET: f64 = 1.0 / 10_000.0;

/// A turnstone with the fast path required in the rig's server namespace.
fn server(n: &Netns, dir: &std::path::Path, label: &str) -> ChildGuard {
    let server = n.turnstone("server", dir, label, &config("required", ""));
    let logs = server.output();
    assert!(logs.contains("kernel fast path on"), "{logs}");
    server
}

/// The metrics once the server has read the kernel's counters (twice a second).
fn settled_metrics(n: &Netns) -> String {
    std::thread::sleep(Duration::from_millis(1200));
    metrics(n)
}

/// Kernel packets on `path` in both directions, and the userspace ones.
fn counted(text: &str, path: &str) -> (f64, f64, f64, f64) {
    (
        kernel(text, "to_peer", path),
        kernel(text, "to_client", path),
        user(text, "to_peer", path),
        user(text, "to_client", path),
    )
}

/// uclient with `flags` in the client namespace: 10 clients, 10,000 messages each (one
/// every millisecond per client), to `turnutils_peer` in the peer namespace, which
/// echoes every one back; every message relayed both ways in the kernel on `path`.
fn uclient_through_the_kernel(flags: &[&str], path: &str) {
    const CLIENTS: u64 = 10;
    const MESSAGES: u64 = 10_000;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = rig();
    let dir = tempfile::tempdir().unwrap();
    let server = server(&n, dir.path(), "turnstone-uclient");
    let _peer = EchoPeer::start_in(&n.ns("peer"), PEER, PEER_PORT);
    let peer_port = PEER_PORT.to_string();
    let mut args = flags.to_vec();
    args.extend(["-u", "alice", "-w", "wonderland", "-c", "-X", "-z", "1"]);
    args.extend(["-e", PEER, "-r", &peer_port]);
    let before = cpu_ticks(&server);
    let started = Instant::now();
    let (summary, _) = run_uclient_in(
        Some(&n.ns("client")),
        &args,
        SERVER,
        CLIENTS,
        MESSAGES,
        Duration::from_secs(120),
    );
    let ticks = cpu_ticks(&server) - before;
    let packets = CLIENTS * MESSAGES;
    eprintln!(
        "uclient {flags:?}: {summary:?} in {:?}, server CPU {ticks} ticks",
        started.elapsed()
    );
    let text = settled_metrics(&n);
    let (k_peer, k_client, u_peer, u_client) = counted(&text, path);
    eprintln!(
        "{path}: kernel {k_peer} to peer, {k_client} to client; userspace {u_peer}, {u_client}"
    );
    let p = packets as f64;
    // uclient sends `packets` messages, the peer echoes each: exactly that many each way,
    // in the kernel but for what raced the entries' setup.
    assert_eq!(k_peer + u_peer, p, "{path} packets to the peer\n{text}");
    assert_eq!(
        k_client + u_client,
        p,
        "{path} packets to the client\n{text}"
    );
    assert!(
        u_peer + u_client <= 0.01 * p,
        "userspace relayed {u_peer} + {u_client} {path} packets\n{text}"
    );
    assert!(
        (ticks as f64) <= 2.0 * p * TICKS_PER_PACKET + 5.0,
        "server CPU {ticks} ticks for {} packets",
        2 * packets
    );
    // uclient deletes its allocations at the end: their usage records count it all.
    let records = wait_for("the usage records", Duration::from_secs(10), || {
        let u = usage(&server.output());
        (u.allocations >= CLIENTS).then_some(u)
    });
    eprintln!("usage records: {records:?}");
    assert_eq!(
        records,
        Usage {
            allocations: CLIENTS,
            packets_to_peer: packets,
            packets_to_client: packets,
            kernel_packets_to_peer: k_peer as u64,
            kernel_packets_to_client: k_client as u64,
        },
        "usage records"
    );
}

#[test]
fn uclient_channels_relay_in_the_kernel() {
    uclient_through_the_kernel(&[], "channel");
}

/// uclient writes its Send indications as DATA, XOR-PEER-ADDRESS, DONT-FRAGMENT,
/// FINGERPRINT (seen on the wire, coturn 4.6; tests/corpus/uclient-send): bpf/relay.c
/// takes that layout, so they relay to the peer in the kernel, and the peer's answers go
/// to uclient as Data indications in the kernel too.
#[test]
fn uclient_send_indications_relay_in_the_kernel() {
    uclient_through_the_kernel(&["-s"], "indication");
}

/// The webrtc-rs `turn` client in the client namespace sends 100,000 numbered datagrams
/// through its relay to a UDP echo in the peer namespace, the first 1,000 one at a time,
/// then 50 in flight at a time (the next 50 once these are back): every one comes back
/// once and in order. webrtc-rs sends
/// the first datagrams as Send indications (DATA before XOR-PEER-ADDRESS, which the
/// kernel relays too) until its ChannelBind completes, ChannelData after: nearly all of
/// them cross the kernel on the channel path both ways.
#[test]
fn webrtc_rs_client_relays_in_the_kernel() {
    use turn::client::{Client, ClientConfig};
    use webrtc_util::Conn;
    const PACKETS: u32 = 100_000;
    const WINDOW: u32 = 50;
    const SINGLY: u32 = 1_000;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = rig();
    let dir = tempfile::tempdir().unwrap();
    let server = server(&n, dir.path(), "turnstone-webrtc-rs");
    let echo = PeerEcho::start(&n);
    let peer = echo.addr;
    let sock = n.enter("client", || {
        std::net::UdpSocket::bind((CLIENT, 0)).expect("client socket")
    });
    let _ = socket2::SockRef::from(&sock).set_recv_buffer_size(4 << 20);
    sock.set_nonblocking(true).unwrap();
    let before = cpu_ticks(&server);
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let received: Vec<u32> = rt.block_on(async {
        let step = Duration::from_secs(10);
        let turn = format!("{SERVER}:{PORT}");
        let client = Client::new(ClientConfig {
            stun_serv_addr: turn.clone(),
            turn_serv_addr: turn,
            username: "alice".into(),
            password: "wonderland".into(),
            realm: "fp.test".into(),
            software: String::new(),
            rto_in_ms: 0,
            conn: std::sync::Arc::new(tokio::net::UdpSocket::from_std(sock).unwrap()),
            vnet: None,
        })
        .await
        .expect("turn client");
        client.listen().await.expect("listen");
        let relay = tokio::time::timeout(step, client.allocate())
            .await
            .expect("allocate timed out")
            .expect("allocate");
        let mut received = Vec::with_capacity(PACKETS as usize);
        let mut buf = vec![0u8; 2048];
        let payload = |i: u32| {
            let mut p = vec![0xa5u8; 160];
            p[..4].copy_from_slice(&i.to_be_bytes());
            p
        };
        let mut first = 0;
        while first < PACKETS {
            // One at a time until the channel is surely bound: a burst across the switch
            // from Send indications (userspace) to ChannelData (kernel) is reordered, as
            // later datagrams overtake the ones userspace still holds.
            let window = if first < SINGLY { 1 } else { WINDOW };
            for i in first..first + window {
                relay.send_to(&payload(i), peer).await.expect("send_to");
            }
            first += window;
            while received.len() < first as usize {
                let next = received.len() as u32;
                let (len, from) =
                    tokio::time::timeout(Duration::from_secs(2), relay.recv_from(&mut buf))
                        .await
                        .unwrap_or_else(|_| panic!("datagram {next} did not come back within 2 s"))
                        .expect("recv_from");
                assert_eq!(from, peer, "datagram {next} came from elsewhere");
                let i = u32::from_be_bytes(buf[..4].try_into().unwrap());
                assert_eq!(&buf[..len], &payload(i)[..], "datagram {next} changed");
                received.push(i);
            }
        }
        relay.close().await.expect("close the relay (Refresh 0)");
        client.close().await.expect("close the client");
        received
    });
    let ticks = cpu_ticks(&server) - before;
    eprintln!(
        "webrtc-rs: {} datagrams back in {:?}, server CPU {ticks} ticks",
        received.len(),
        started.elapsed()
    );
    let echoed = echo.stop();
    assert_eq!(echoed, u64::from(PACKETS), "datagrams the peer got");
    let out_of_place = received.iter().enumerate().find(|&(k, &i)| k as u32 != i);
    assert_eq!(
        out_of_place, None,
        "lost, duplicated or reordered (position, number)"
    );

    let text = settled_metrics(&n);
    let (k_peer, k_client, u_peer, u_client) = counted(&text, "channel");
    let (ki_peer, ki_client, ui_peer, ui_client) = counted(&text, "indication");
    eprintln!(
        "channel: kernel {k_peer} to peer, {k_client} to client; userspace {u_peer}, {u_client}; \
         indications: kernel {ki_peer}, {ki_client}; userspace {ui_peer}, {ui_client}"
    );
    let p = f64::from(PACKETS);
    assert_eq!(
        k_peer + u_peer + ki_peer + ui_peer,
        p,
        "to the peer\n{text}"
    );
    assert_eq!(
        k_client + u_client + ki_client + ui_client,
        p,
        "to the client\n{text}"
    );
    assert!(
        k_peer >= 0.99 * p && k_client >= 0.99 * p,
        "kernel channel packets\n{text}"
    );
    assert!(
        (ticks as f64) <= 2.0 * p * TICKS_PER_PACKET + 5.0,
        "server CPU {ticks} ticks for {} packets",
        2 * PACKETS
    );
    // Refresh 0 ended the allocation: its usage record counts it all.
    let records = wait_for("the usage record", Duration::from_secs(10), || {
        let u = usage(&server.output());
        (u.allocations >= 1).then_some(u)
    });
    assert_eq!(
        records,
        Usage {
            allocations: 1,
            packets_to_peer: u64::from(PACKETS),
            packets_to_client: u64::from(PACKETS),
            kernel_packets_to_peer: (k_peer + ki_peer) as u64,
            kernel_packets_to_client: (k_client + ki_client) as u64,
        },
        "usage record"
    );
}

/// Chromium's flags here: host candidates by address (not mDNS names), timers kept going.
const CHROMIUM_FLAGS: &[&str] = &[
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
];

/// Headless Chromium in the client namespace (the page server there too) opens
/// `relay_data.html` with A relay-only through turnstone and B's candidates `b`;
/// `messages` numbered messages of 700 bytes go each way. Returns the page's result and
/// the server's metrics after it, with the server's CPU ticks meanwhile.
fn chromium_call(b: &str, messages: usize) -> (common::browser::PageResult, String, u64) {
    use common::browser::{percent_encode, Chromium, PageServer};
    let n = rig();
    let dir = tempfile::tempdir().unwrap();
    let server = server(&n, dir.path(), "turnstone-chromium");
    let ice = serde_json::json!([{
        "urls": [format!("turn:{SERVER}:{PORT}?transport=udp")],
        "username": "alice",
        "credential": "wonderland",
    }]);
    let pages = n.enter("client", PageServer::start);
    let url = pages.url(&format!(
        "/relay_data.html?ice={}&b={b}&messages={messages}&size=700",
        percent_encode(&ice.to_string())
    ));
    let before = cpu_ticks(&server);
    let mut chromium = Chromium::launch_in(Some(&n.ns("client")), pages, &url, CHROMIUM_FLAGS);
    let r = chromium.wait_result(Duration::from_secs(150));
    drop(chromium);
    let ticks = cpu_ticks(&server) - before;
    eprintln!(
        "chromium (b={b}): {} messages each way, page reported after {:.1} s, server CPU {ticks} ticks\n{}",
        messages,
        r.elapsed.as_secs_f64(),
        r.context()
    );
    assert_eq!(
        r.v["ok"].as_bool(),
        Some(true),
        "the page failed\n{}",
        r.context()
    );
    for end in ["atA", "atB"] {
        assert_eq!(
            (
                r.v[end]["received"].as_u64(),
                r.v[end]["outOfPlace"].as_u64()
            ),
            (Some(messages as u64), Some(0)),
            "{end}: messages received and out of place (lost, duplicated, reordered)\n{}",
            r.context()
        );
    }
    let text = settled_metrics(&n);
    (r, text, ticks)
}

/// Packets on both paths in `direction`: (kernel, userspace).
fn both_paths(text: &str, direction: &str) -> (f64, f64) {
    let k = kernel(text, direction, "channel") + kernel(text, direction, "indication");
    let u = user(text, direction, "channel") + user(text, direction, "indication");
    (k, u)
}

/// A relay-only PC talks to a PC with host candidates in the same namespace (a browser
/// behind a firewall calling one that is reachable): A's allocation relays between A
/// and B's host address, which the kernel does both ways. 100,000 messages of 700 bytes
/// each way, each in an SCTP packet of its own, so each direction carries at least as
/// many packets (plus SCTP's acknowledgements).
#[test]
fn chromium_relay_only_to_a_host_candidate_relays_in_the_kernel() {
    const MESSAGES: usize = 100_000;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (r, text, ticks) = chromium_call("host", MESSAGES);
    for (pc, local, remote) in [("A", "relay", "host"), ("B", "host", "relay")] {
        let pair = &r.v["pairs"][pc];
        assert_eq!(
            (
                pair["local"]["candidateType"].as_str(),
                pair["remote"]["candidateType"].as_str()
            ),
            (Some(local), Some(remote)),
            "{pc}'s selected pair\n{}",
            r.context()
        );
    }
    let (k_peer, u_peer) = both_paths(&text, "to_peer");
    let (k_client, u_client) = both_paths(&text, "to_client");
    eprintln!("kernel {k_peer} to peer, {k_client} to client; userspace {u_peer}, {u_client}");
    let m = MESSAGES as f64;
    assert!(k_peer >= m && k_client >= m, "kernel packets\n{text}");
    assert!(u_peer + u_client <= 0.01 * m, "userspace packets\n{text}");
    assert!(
        (ticks as f64) <= (k_peer + k_client) * TICKS_PER_PACKET + 20.0,
        "server CPU {ticks} ticks for {} packets",
        k_peer + k_client
    );
}

/// Both PCs relay-only: each allocation's peer is the other's relay address, so every
/// packet goes client -> turnstone -> turnstone -> client, and the program relays it
/// from one allocation to the other without leaving the kernel: every message arrives
/// once and in order, all but a handful of packets in the kernel, for a few server ticks.
/// (Measured: about 300,000 packets each way in the kernel, 1 to 3 in userspace, 2-3
/// ticks; before the client-to-client path, all in userspace for 480 ticks.)
#[test]
fn chromium_relay_only_call_through_the_server() {
    const MESSAGES: usize = 100_000;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (r, text, ticks) = chromium_call("relay", MESSAGES);
    for pc in ["A", "B"] {
        let pair = &r.v["pairs"][pc];
        assert_eq!(
            (
                pair["local"]["candidateType"].as_str(),
                pair["remote"]["candidateType"].as_str()
            ),
            (Some("relay"), Some("relay")),
            "{pc}'s selected pair\n{}",
            r.context()
        );
    }
    let (k_peer, u_peer) = both_paths(&text, "to_peer");
    let (k_client, u_client) = both_paths(&text, "to_client");
    eprintln!("kernel {k_peer} to peer, {k_client} to client; userspace {u_peer}, {u_client}");
    // Each message crosses A's allocation to the peer and B's to the client (or back),
    // both in the kernel (client to client through two allocations), but for ICE's and
    // DTLS's first packets.
    let m = 2.0 * MESSAGES as f64;
    assert!(k_peer >= m && k_client >= m, "kernel packets\n{text}");
    assert!(u_peer + u_client <= 0.01 * m, "userspace packets\n{text}");
    assert!(
        (ticks as f64) <= (k_peer + k_client) * TICKS_PER_PACKET + 20.0,
        "server CPU {ticks} ticks for {} packets",
        k_peer + k_client
    );
}
