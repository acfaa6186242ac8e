//! The kernel fast path end to end (root): turnstone with `[relay] kernel_fast_path = "required"` in its own network namespace relays a client's ChannelData and Send indications and a peer's answers in XDP, none lost, for far less of its own CPU than userspace relaying of the same packets, and counts them in `turnstone_relayed_kernel_*` and the usage records; entries go with their allocation, a reload's bandwidth limit, a user a reload removes, and a permission or binding that expires (short configured lifetimes: within a tick); on loopback only, "required" refuses to start naming relay.kernel_fast_path and "auto" says once that it is not used.
//
// The rig (namespaces, routes, configuration) is tests/common/fastpath.rs.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::fastpath::{
    config, config_relay, cpu_ticks, entries, kernel, metrics, reload, rig, rig_with_offload, user,
    PEER, PORT, SERVER,
};
use common::netns::Netns;
use common::{relayed_payload, ChildGuard, TurnClient};

const CHANNEL: u16 = 0x4000;
/// Packets each way on the channel; Send indications are a tenth of it.
const N: usize = 10_000;
/// Packets in flight at once (the rest wait), so no socket buffer overflows.
const WINDOW: usize = 50;

/// One test at a time: the CPU figures must not include another test's traffic.
static SERIAL: Mutex<()> = Mutex::new(());

/// A client with an allocation, a permission and channel [`CHANNEL`] for the peer, and
/// the peer's socket; returns (client, peer socket, relay address).
fn session(n: &Netns) -> (TurnClient, UdpSocket, SocketAddr) {
    let peer = n.enter("peer", || UdpSocket::bind((PEER, 0)).expect("peer socket"));
    let peer_addr = peer.local_addr().unwrap();
    let server: SocketAddr = format!("{SERVER}:{PORT}").parse().unwrap();
    let mut client = n.enter("client", || {
        let sock = UdpSocket::bind("10.78.1.2:0").expect("client socket");
        let r = socket2::SockRef::from(&sock);
        let _ = r.set_recv_buffer_size(4 << 20);
        TurnClient::new(common::Link::Udp { sock, server }, "alice", "wonderland")
            .with_realm("fp.test")
    });
    let relay = client.must_allocate();
    client.permit(peer_addr);
    client.bind(CHANNEL, peer_addr);
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    client
        .udp_socket()
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    (client, peer, relay)
}

/// What arrived of what was sent, by leg.
#[derive(Debug, Default)]
struct Arrived {
    to_peer: usize,
    to_client: usize,
    indications_to_peer: usize,
}

/// Sends [`N`] ChannelData to the peer and [`N`] datagrams back, then `N / 10` Send
/// indications, [`WINDOW`] at a time; counts what arrives.
fn traffic(client: &mut TurnClient, peer: &UdpSocket, relay: SocketAddr) -> Arrived {
    let peer_addr = peer.local_addr().unwrap();
    let payload = [0x5au8; 100];
    let mut got = Arrived::default();
    let mut buf = vec![0u8; 2048];
    let mut recv_n = |sock: &UdpSocket, k: usize, check: &dyn Fn(&[u8]) -> bool| {
        let mut n = 0;
        while n < k {
            match sock.recv_from(&mut buf) {
                Ok((len, _)) if check(&buf[..len]) => n += 1,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        n
    };
    for _ in 0..N / WINDOW {
        for _ in 0..WINDOW {
            client.send_channel(CHANNEL, &payload).unwrap();
        }
        got.to_peer += recv_n(peer, WINDOW, &|b| b == payload);
        for _ in 0..WINDOW {
            peer.send_to(&payload, relay).unwrap();
        }
        got.to_client += recv_n(client.udp_socket(), WINDOW, &|b| {
            relayed_payload(b) == Some(&payload[..])
        });
    }
    for _ in 0..N / 10 / WINDOW {
        for _ in 0..WINDOW {
            client.send_to_peer(peer_addr, &payload).unwrap();
        }
        got.indications_to_peer += recv_n(peer, WINDOW, &|b| b == payload);
    }
    got
}

/// Runs the traffic through a server in `mode`: what arrived, the server's CPU ticks
/// for it, and the metrics after it.
fn run(n: &Netns, mode: &str) -> (Arrived, u64, String, ChildGuard) {
    let dir = tempfile::tempdir().unwrap();
    let server = n.turnstone(
        "server",
        dir.path(),
        &format!("turnstone-{mode}"),
        &config(mode, ""),
    );
    let (mut client, peer, relay) = session(n);
    let before = cpu_ticks(&server);
    let started = Instant::now();
    let got = traffic(&mut client, &peer, relay);
    let ticks = cpu_ticks(&server) - before;
    eprintln!(
        "{mode}: {got:?} in {:?}, server CPU {ticks} ticks",
        started.elapsed()
    );
    // The counters are read twice a second.
    std::thread::sleep(Duration::from_millis(1200));
    let text = metrics(n);
    (got, ticks, text, server)
}

#[test]
fn kernel_relays_channel_data_and_indications_for_a_fraction_of_the_cpu() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = rig();

    let (off, off_ticks, off_text, server) = run(&n, "off");
    drop(server);
    assert_eq!(
        (off.to_peer, off.to_client, off.indications_to_peer),
        (N, N, N / 10),
        "userspace lost packets"
    );
    assert_eq!(kernel(&off_text, "to_peer", "channel"), 0.0, "{off_text}");

    let (on, on_ticks, on_text, server) = run(&n, "required");
    let logs = server.output();
    assert!(logs.contains("kernel fast path on"), "{logs}");
    assert!(!logs.contains("IP forwarding is off"), "{logs}");
    assert_eq!(
        (on.to_peer, on.to_client, on.indications_to_peer),
        (N, N, N / 10),
        "the kernel path lost packets:\n{logs}"
    );
    let n_f = N as f64;
    assert_eq!(kernel(&on_text, "to_peer", "channel"), n_f, "{on_text}");
    assert_eq!(kernel(&on_text, "to_client", "channel"), n_f, "{on_text}");
    assert_eq!(
        kernel(&on_text, "to_peer", "indication"),
        n_f / 10.0,
        "{on_text}"
    );
    assert_eq!(user(&on_text, "to_peer", "channel"), 0.0, "{on_text}");
    eprintln!(
        "server CPU for the same packets: userspace {off_ticks} ticks, kernel {on_ticks} ticks"
    );
    assert!(
        off_ticks >= 4 && on_ticks * 4 < off_ticks,
        "server CPU: userspace {off_ticks} ticks, kernel path {on_ticks} ticks"
    );
}

/// Senders on the same host (their veths leave the UDP checksum to an offload:
/// CHECKSUM_PARTIAL) lose nothing: the program passes their ChannelData, Send indications
/// and the peer's datagrams up, and userspace relays every one.
#[test]
fn same_host_senders_relay_in_userspace_none_lost() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = rig_with_offload();
    let (got, _, text, server) = run(&n, "required");
    let logs = server.output();
    assert!(logs.contains("kernel fast path on"), "{logs}");
    assert_eq!(
        (got.to_peer, got.to_client, got.indications_to_peer),
        (N, N, N / 10),
        "packets lost:\n{logs}"
    );
    let n_f = N as f64;
    for (direction, path, want) in [
        ("to_peer", "channel", n_f),
        ("to_client", "channel", n_f),
        ("to_peer", "indication", n_f / 10.0),
    ] {
        assert_eq!(
            kernel(&text, direction, path),
            0.0,
            "{direction} {path}\n{text}"
        );
        assert_eq!(
            user(&text, direction, path),
            want,
            "{direction} {path}\n{text}"
        );
    }
}

/// uclient's client-to-client run: clients (in pairs) and messages per client, sent one
/// per millisecond per client.
const C2C_CLIENTS: u64 = 20;
const C2C_MESSAGES: u64 = 5_000;

/// Runs uclient -y through a server with `toml` in the rig and asserts every message
/// arrived, every one relayed in the kernel both ways, for next to none of the server's
/// CPU.
fn client_to_client(label: &str, toml: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = rig();
    let dir = tempfile::tempdir().unwrap();
    let server = n.turnstone("server", dir.path(), label, toml);
    let port = PORT.to_string();
    let clients = C2C_CLIENTS.to_string();
    let messages = C2C_MESSAGES.to_string();
    // uclient -y pairs its clients: each allocates a relay, binds a channel to its
    // partner's relay address (one of ours) and sends its messages there, which the
    // partner's allocation relays to the partner.
    let args = [
        "-y",
        "-u",
        "alice",
        "-w",
        "wonderland",
        "-p",
        &port,
        "-c",
        "-X",
        "-l",
        "170",
        "-z",
        "1",
        "-m",
        &clients,
        "-n",
        &messages,
        SERVER,
    ];
    let before = cpu_ticks(&server);
    let started = Instant::now();
    let bin = common::require_tool("turnutils_uclient", common::coturn::COTURN_HINT);
    let out = n.enter("client", || {
        common::run_bounded(
            "turnutils_uclient",
            std::process::Command::new(&bin).args(args),
            Duration::from_secs(180),
        )
    });
    let ticks = cpu_ticks(&server) - before;
    let text = out.combined();
    let summary = common::coturn::parse_summary(&text)
        .unwrap_or_else(|| panic!("no final summary in uclient's output:\n{text}"));
    eprintln!(
        "{label}: uclient -y, {C2C_CLIENTS} clients x {C2C_MESSAGES} messages: {summary:?} \
         in {:?}, server CPU {ticks} ticks",
        started.elapsed()
    );
    let total = C2C_CLIENTS * C2C_MESSAGES;
    assert!(out.status.success(), "uclient failed:\n{text}");
    assert!(
        !text.contains("not enough"),
        "uclient lacked connections:\n{text}"
    );
    assert_eq!(
        (
            summary.sent,
            summary.received,
            summary.lost,
            summary.send_dropped
        ),
        (total, total, 0, 0),
        "{text}"
    );
    // The counters are read twice a second.
    std::thread::sleep(Duration::from_millis(1200));
    let metrics_text = metrics(&n);
    let logs = server.output();
    assert!(logs.contains("kernel fast path on"), "{logs}");
    // Every message counts once on the sender's allocation (to its peer, the partner's
    // relay) and once on the partner's (to its client), all in the kernel.
    let total_f = total as f64;
    for direction in ["to_peer", "to_client"] {
        assert_eq!(
            kernel(&metrics_text, direction, "channel"),
            total_f,
            "{direction}: {metrics_text}"
        );
    }
    // Userspace handled the allocations and channel bindings, not the packets: relaying
    // them there costs several hundred ticks (see the first test).
    assert!(
        ticks <= 40,
        "server CPU {ticks} ticks for {total} client-to-client packets"
    );
}

#[test]
fn client_to_client_through_two_allocations_stays_in_the_kernel() {
    // The policy (10.78.0.0/16) permits the server's own relay address as a peer.
    client_to_client("turnstone-c2c", &config("required", ""));
}

#[test]
fn client_to_client_with_relays_only_permissions_stays_in_the_kernel() {
    // The policy denies the server's own address (only the peer's network is opened):
    // the permissions between the two allocations are relays-only, which the program
    // honours because the other relay's entry proves it is a live relay of ours.
    let toml = config("required", "").replace(
        "allow_peers = [\"10.78.0.0/16\"]",
        "allow_peers = [\"10.78.2.0/24\"]",
    );
    assert!(toml.contains("10.78.2.0/24"), "{toml}");
    client_to_client("turnstone-c2c-relays-only", &toml);
}

#[test]
fn entries_go_with_the_allocation() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = rig();
    let dir = tempfile::tempdir().unwrap();
    let server = n.turnstone(
        "server",
        dir.path(),
        "turnstone-gone",
        &config("required", ""),
    );
    let (mut client, peer, relay) = session(&n);
    let payload = [7u8; 64];
    peer.send_to(&payload, relay).unwrap();
    let got = client
        .recv(Duration::from_secs(2))
        .expect("relayed to the client");
    assert_eq!(relayed_payload(&got), Some(&payload[..]));
    std::thread::sleep(Duration::from_millis(1200));
    let text = metrics(&n);
    assert_eq!(kernel(&text, "to_client", "channel"), 1.0, "{text}");

    // The allocation ends: its entries go with it, and nothing more is relayed.
    client.refresh(0).expect_success("Refresh 0");
    peer.send_to(&payload, relay).unwrap();
    client.assert_silent("after the allocation ended", Duration::from_secs(1));
    std::thread::sleep(Duration::from_millis(1200));
    let text = metrics(&n);
    assert_eq!(kernel(&text, "to_client", "channel"), 1.0, "{text}");
    // The usage record counts what the kernel relayed, in the totals and apart.
    let logs = server.output();
    let ended = logs
        .lines()
        .find(|l| l.contains("allocation ended"))
        .unwrap_or_else(|| panic!("no usage record:\n{logs}"));
    assert!(
        ended.contains("packets_to_client=1 ") && ended.contains("kernel_packets_to_client=1 "),
        "{ended}"
    );
}

#[test]
fn a_reload_that_sets_a_bandwidth_limit_takes_the_entries_out_within_a_tick() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = rig();
    let dir = tempfile::tempdir().unwrap();
    let server = n.turnstone(
        "server",
        dir.path(),
        "turnstone-reload",
        &config("required", ""),
    );
    let (mut client, peer, relay) = session(&n);
    let payload = [9u8; 64];
    peer.send_to(&payload, relay).unwrap();
    let got = client
        .recv(Duration::from_secs(2))
        .expect("relayed to the client");
    assert_eq!(relayed_payload(&got), Some(&payload[..]));

    // Bandwidth limits live in userspace only: the core takes every entry out at its
    // next tick (one second), and userspace relays from then on.
    let limited = format!(
        "{}\n[limits]\nmax_bandwidth_per_allocation = \"10MB\"\n",
        config("required", "")
    );
    std::fs::write(dir.path().join("turnstone-reload.toml"), limited).unwrap();
    let pid = server.id().expect("pid").to_string();
    let hup = common::run_bounded(
        "kill",
        std::process::Command::new("kill").args(["-HUP", &pid]),
        Duration::from_secs(5),
    );
    assert!(hup.status.success());
    common::wait_for("the reload", Duration::from_secs(10), || {
        server
            .output()
            .contains("configuration reloaded")
            .then_some(())
    });
    std::thread::sleep(Duration::from_millis(1500));
    for _ in 0..10 {
        peer.send_to(&payload, relay).unwrap();
        let got = client
            .recv(Duration::from_secs(2))
            .expect("relayed to the client");
        assert_eq!(relayed_payload(&got), Some(&payload[..]));
    }
    std::thread::sleep(Duration::from_millis(1200));
    let text = metrics(&n);
    assert_eq!(kernel(&text, "to_client", "channel"), 1.0, "{text}");
    assert_eq!(user(&text, "to_client", "channel"), 10.0, "{text}");
}

/// A user removed by a reload: its allocation ends at the next tick, its entries go
/// (gauge to 0) and the kernel relays nothing more for it.
#[test]
fn a_user_removed_by_reload_loses_its_entries_within_a_tick() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = rig();
    let dir = tempfile::tempdir().unwrap();
    let toml = config("required", "");
    let server = n.turnstone("server", dir.path(), "turnstone-removed", &toml);
    let (mut client, peer, relay) = session(&n);
    let payload = [3u8; 64];
    for _ in 0..5 {
        peer.send_to(&payload, relay).unwrap();
        let got = client.recv(Duration::from_secs(2)).expect("relayed");
        assert_eq!(relayed_payload(&got), Some(&payload[..]));
    }
    std::thread::sleep(Duration::from_millis(1200));
    let text = metrics(&n);
    assert_eq!(kernel(&text, "to_client", "channel"), 5.0, "{text}");
    assert_eq!(
        entries(&text),
        4.0,
        "a channel and a permission, each way: {text}"
    );

    let without_alice = toml.replace("alice = \"wonderland\"", "bob = \"builder\"");
    assert_ne!(without_alice, toml);
    reload(
        &server,
        &dir.path().join("turnstone-removed.toml"),
        &without_alice,
    );
    let ended = common::wait_for("alice's usage record", Duration::from_secs(3), || {
        server
            .output()
            .lines()
            .find(|l| l.contains("allocation ended") && l.contains("user=alice"))
            .map(str::to_string)
    });
    assert!(
        ended.contains("kernel_packets_to_client=5 ") && ended.contains("reason=\"deleted\""),
        "{ended}"
    );
    for _ in 0..5 {
        peer.send_to(&payload, relay).unwrap();
    }
    client.assert_silent("after the reload removed alice", Duration::from_secs(1));
    std::thread::sleep(Duration::from_millis(1200));
    let text = metrics(&n);
    assert_eq!(entries(&text), 0.0, "{text}");
    assert_eq!(kernel(&text, "to_client", "channel"), 5.0, "{text}");
    assert_eq!(user(&text, "to_client", "channel"), 0.0, "{text}");
}

/// Short lifetimes (`permission_lifetime = "2s"`, `channel_lifetime = "3s"`): refreshed
/// in time, the entries stay and the kernel relays; left alone, the permission's entries
/// are gone one tick (plus the gauge's half-second reading) after it expires, the
/// channel's after its own, and the peer's datagrams no longer arrive.
#[test]
fn short_lifetimes_take_entries_out_within_a_tick() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = rig();
    let dir = tempfile::tempdir().unwrap();
    let toml = config_relay(
        "required",
        "permission_lifetime = \"2s\"\nchannel_lifetime = \"3s\"\n",
        "",
    );
    let _server = n.turnstone("server", dir.path(), "turnstone-short", &toml);
    let (mut client, peer, relay) = session(&n);
    let peer_addr = peer.local_addr().unwrap();
    let payload = [5u8; 64];
    // Five seconds of refreshes (a ChannelBind refreshes both) every second: the peer's
    // datagrams arrive throughout, in the kernel, and all four entries stay.
    let mut refreshed = Instant::now();
    for round in 0..5 {
        client.bind(CHANNEL, peer_addr);
        refreshed = Instant::now();
        peer.send_to(&payload, relay).unwrap();
        let got = client
            .recv(Duration::from_secs(2))
            .unwrap_or_else(|| panic!("round {round}: nothing relayed"));
        assert_eq!(relayed_payload(&got), Some(&payload[..]));
        std::thread::sleep(Duration::from_millis(900));
        let text = metrics(&n);
        assert_eq!(entries(&text), 4.0, "round {round}: {text}");
    }
    let text = metrics(&n);
    let relayed = kernel(&text, "to_client", "channel");
    assert!(relayed >= 4.0, "the kernel relayed {relayed}: {text}");
    assert_eq!(user(&text, "to_client", "channel"), 0.0, "{text}");

    // No more refreshes. The permission expires 2 s after the last one: its two entries
    // are gone by then plus one tick (1 s) plus a gauge reading (0.5 s), with 0.5 s of
    // slack for a loaded machine; the channel's go after its own expiry (3 s) likewise.
    let by = |secs: f64| refreshed + Duration::from_secs_f64(secs);
    let wait_entries = |at_most: f64, deadline: Instant| loop {
        let text = metrics(&n);
        let e = entries(&text);
        if e <= at_most && e >= 0.0 {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "{e} entries still at {:?} after the last refresh: {text}",
            refreshed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let perm_gone = wait_entries(2.0, by(2.0 + 1.0 + 0.5 + 0.5));
    assert!(
        perm_gone >= by(2.0),
        "entries went before the permission expired"
    );
    wait_entries(0.0, by(3.0 + 1.0 + 0.5 + 0.5));
    for _ in 0..5 {
        peer.send_to(&payload, relay).unwrap();
    }
    client.assert_silent("after the permission expired", Duration::from_secs(1));
    std::thread::sleep(Duration::from_millis(1200));
    let text = metrics(&n);
    assert_eq!(kernel(&text, "to_client", "channel"), relayed, "{text}");
    assert_eq!(user(&text, "to_client", "channel"), 0.0, "{text}");
    assert!(
        common::metrics::sample(
            &text,
            "turnstone_dropped_packets_total",
            &[("reason", "no_permission")]
        )
        .unwrap_or(0.0)
            >= 5.0,
        "userspace saw and dropped them: {text}"
    );
}

/// A configuration on loopback only (127.0.0.2): the fast path has nothing to do there.
fn loopback(mode: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let ip: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let port = common::free_port_on(&[ip]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("loopback.toml");
    let toml = format!(
        "[server]\nrealm = \"fp.test\"\n\
         [[listen]]\ntransport = \"udp\"\naddress = \"{ip}:{port}\"\n\
         [relay]\naddress = \"{ip}\"\nkernel_fast_path = \"{mode}\"\n\
         [auth]\nusers = {{ alice = \"wonderland\" }}\n"
    );
    std::fs::write(&path, toml).unwrap();
    (dir, path)
}

#[test]
fn required_refuses_to_start_on_loopback_only_and_names_the_key() {
    let (_dir, path) = loopback("required");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_turnstone"));
    cmd.arg("--config").arg(&path);
    let out = common::run_bounded("turnstone", &mut cmd, Duration::from_secs(30));
    let text = out.combined();
    assert!(!out.status.success(), "started:\n{text}");
    assert!(
        text.contains("relay.kernel_fast_path = \"required\"") && text.contains("loopback only"),
        "{text}"
    );
    assert!(!text.contains("listening"), "{text}");
}

#[test]
fn auto_on_loopback_only_says_so_once_and_relays_in_userspace() {
    let (_dir, path) = loopback("auto");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_turnstone"));
    cmd.arg("--config").arg(&path);
    let mut server = ChildGuard::spawn("turnstone-auto", &mut cmd);
    common::wait_for("listening", Duration::from_secs(20), || {
        if let Some(st) = server.try_wait() {
            panic!("exited ({st}):\n{}", server.output());
        }
        server.output().contains("listening").then_some(())
    });
    let logs = server.output();
    assert_eq!(
        logs.matches("kernel fast path: not used (loopback only)")
            .count(),
        1,
        "{logs}"
    );
    assert!(
        !logs
            .lines()
            .any(|l| l.contains("WARN") && l.contains("fast path")),
        "{logs}"
    );
    assert!(!logs.contains("kernel fast path on"), "{logs}");
}
