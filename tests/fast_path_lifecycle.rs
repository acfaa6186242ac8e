//! The kernel fast path's life cycle and placement (root, namespace rig): `[relay] fast_path_interfaces` is where it attaches (a missing name is found at start), and with IP forwarding off there the one start line and check-config say so; a second turnstone on the same interfaces is refused ("required") or relays in userspace ("auto") while the first keeps relaying in the kernel; kill -9 and SIGTERM leave no XDP program attached and the next server attaches at once; a non-root server with only CAP_BPF and CAP_NET_ADMIN (no CAP_PERFMON) loads it, and without them "auto" says why not.
//
// The rig (namespaces, routes, configuration) is tests/common/fastpath.rs; the first
// server uses its ports (3478, metrics 9641, relay 40000-40999), the second its own.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::sync::Mutex;
use std::time::Duration;

use common::fastpath::{config, kernel, metrics, rig, user, METRICS_PORT, PEER, PORT, SERVER};
use common::netns::Netns;
use common::{relayed_payload, ChildGuard, TurnClient};

const CHANNEL: u16 = 0x4000;
/// The second server's listen and metrics ports and relay range.
const B_PORT: u16 = 3479;
const B_METRICS: u16 = 9642;

/// One rig at a time: the tests attach to the same kind of interfaces and count packets.
static SERIAL: Mutex<()> = Mutex::new(());

/// The rig's configuration for a second server: its own ports, the same interfaces.
fn config_b(mode: &str) -> String {
    config(mode, "")
        .replace(&format!(":{PORT}\""), &format!(":{B_PORT}\""))
        .replace("40000-40999", "41000-41999")
        .replace(&format!(":{METRICS_PORT}\""), &format!(":{B_METRICS}\""))
}

/// The rig's configuration with a drain that ends at once (SIGTERM exits promptly).
fn quick_drain(mode: &str) -> String {
    config(mode, "").replacen(
        "realm = \"fp.test\"\n",
        "realm = \"fp.test\"\ndrain_timeout = \"0s\"\n",
        1,
    )
}

/// A client of the server at `port` with an allocation and channel [`CHANNEL`] to a
/// fresh peer socket: (client, peer socket, relay address).
fn session(n: &Netns, port: u16) -> (TurnClient, UdpSocket, SocketAddr) {
    let peer = n.enter("peer", || UdpSocket::bind((PEER, 0)).expect("peer socket"));
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let server: SocketAddr = format!("{SERVER}:{port}").parse().unwrap();
    let mut client = n.enter("client", || {
        let sock = UdpSocket::bind("10.78.1.2:0").expect("client socket");
        TurnClient::new(common::Link::Udp { sock, server }, "alice", "wonderland")
            .with_realm("fp.test")
    });
    let relay = client.must_allocate();
    let peer_addr = peer.local_addr().unwrap();
    client.permit(peer_addr);
    client.bind(CHANNEL, peer_addr);
    (client, peer, relay)
}

/// The peer sends `k` datagrams to the relay; each must reach the client.
fn relay_to_client(client: &mut TurnClient, peer: &UdpSocket, relay: SocketAddr, k: usize) {
    let payload = [0x42u8; 64];
    for i in 0..k {
        peer.send_to(&payload, relay).unwrap();
        let got = client
            .recv(Duration::from_secs(2))
            .unwrap_or_else(|| panic!("datagram {i} not relayed to the client"));
        assert_eq!(relayed_payload(&got), Some(&payload[..]));
    }
}

/// /metrics of the server whose endpoint is `port` in the server namespace.
fn metrics_at(n: &Netns, port: u16) -> String {
    n.enter("server", || {
        let mut s = TcpStream::connect((SERVER, port)).expect("metrics");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text
    })
}

/// Packets relayed to the client in the kernel, once the counters were read (twice a
/// second).
fn kernel_to_client(n: &Netns) -> f64 {
    std::thread::sleep(Duration::from_millis(1200));
    kernel(&metrics(n), "to_client", "channel")
}

/// What the server namespace's links say of XDP (`ip -d link show`).
fn xdp_attached(n: &Netns) -> bool {
    let links = n.exec("server", &["ip", "-d", "link", "show"]);
    links.contains("xdpgeneric") || links.contains("prog/xdp")
}

/// Waits until no XDP program is attached in the server namespace (the links go when
/// the process's descriptors close).
fn wait_detached(n: &Netns, after: &str) {
    common::wait_for(
        &format!("no XDP program attached after {after}"),
        Duration::from_secs(10),
        || (!xdp_attached(n)).then_some(()),
    );
    let net = n.exec("server", &["bpftool", "net", "show"]);
    assert!(
        !net.lines().any(|l| l.contains("generic id")),
        "bpftool net after {after}:\n{net}"
    );
}

/// Runs turnstone with `toml` in the server namespace to its end (it must refuse).
fn refused(n: &Netns, dir: &std::path::Path, toml: &str) -> String {
    let path = dir.join("refused.toml");
    std::fs::write(&path, toml).unwrap();
    let mut cmd = std::process::Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &n.ns("server"),
        env!("CARGO_BIN_EXE_turnstone"),
    ])
    .arg("--config")
    .arg(&path);
    let out = common::run_bounded("turnstone", &mut cmd, Duration::from_secs(30));
    let text = out.combined();
    assert!(!out.status.success(), "started:\n{text}");
    assert!(!text.contains("listening"), "{text}");
    text
}

#[test]
fn a_second_server_is_refused_or_relays_in_userspace_and_the_first_keeps_the_kernel() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = rig();
    let dir = tempfile::tempdir().unwrap();
    let a = n.turnstone("server", dir.path(), "turnstone-a", &config("required", ""));
    assert!(a.output().contains("kernel fast path on"), "{}", a.output());
    let (mut client, peer, relay) = session(&n, PORT);
    relay_to_client(&mut client, &peer, relay, 5);
    assert_eq!(kernel_to_client(&n), 5.0);

    // "required": refused, naming the key and the reason.
    let text = refused(&n, dir.path(), &config_b("required"));
    assert!(
        text.contains("relay.kernel_fast_path = \"required\"")
            && text.contains("another XDP program is attached to")
            && text.contains("another turnstone?"),
        "{text}"
    );
    // A relays in the kernel as before: its link and maps are untouched.
    relay_to_client(&mut client, &peer, relay, 5);
    assert_eq!(kernel_to_client(&n), 10.0);

    // "auto": starts, says why once, relays in userspace.
    let b = n.turnstone("server", dir.path(), "turnstone-b", &config_b("auto"));
    let logs = b.output();
    let why: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("kernel fast path"))
        .collect();
    assert_eq!(why.len(), 1, "{logs}");
    assert!(
        why[0].contains("WARN")
            && why[0].contains("not used, relaying in userspace")
            && why[0].contains("another XDP program is attached to"),
        "{logs}"
    );
    let (mut client_b, peer_b, relay_b) = session(&n, B_PORT);
    relay_to_client(&mut client_b, &peer_b, relay_b, 5);
    std::thread::sleep(Duration::from_millis(1200));
    let text_b = metrics_at(&n, B_METRICS);
    assert_eq!(user(&text_b, "to_client", "channel"), 5.0, "{text_b}");
    assert_eq!(kernel(&text_b, "to_client", "channel"), 0.0, "{text_b}");
    // And A still relays in the kernel, B's traffic not counted there.
    relay_to_client(&mut client, &peer, relay, 5);
    assert_eq!(kernel_to_client(&n), 15.0);
    drop(b);
    relay_to_client(&mut client, &peer, relay, 1);
    assert_eq!(kernel_to_client(&n), 16.0);
    drop(a);
}

#[test]
fn kill_9_and_sigterm_leave_nothing_attached_and_the_next_server_attaches_at_once() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = rig();
    let dir = tempfile::tempdir().unwrap();
    assert!(!xdp_attached(&n));
    let mut a = n.turnstone(
        "server",
        dir.path(),
        "turnstone-a",
        &quick_drain("required"),
    );
    assert!(
        xdp_attached(&n),
        "required server running but no XDP program"
    );
    let (mut client, peer, relay) = session(&n, PORT);
    relay_to_client(&mut client, &peer, relay, 3);
    assert_eq!(kernel_to_client(&n), 3.0);
    a.kill(); // SIGKILL: no shutdown code runs
    wait_detached(&n, "kill -9");

    // The next one attaches at once and relays in the kernel.
    let mut c = n.turnstone(
        "server",
        dir.path(),
        "turnstone-c",
        &quick_drain("required"),
    );
    assert!(c.output().contains("kernel fast path on"), "{}", c.output());
    let (mut client, peer, relay) = session(&n, PORT);
    relay_to_client(&mut client, &peer, relay, 3);
    assert_eq!(kernel_to_client(&n), 3.0);

    // A graceful stop likewise.
    common::signal(c.id().expect("pid"), "TERM");
    let st = c
        .wait_exit(Duration::from_secs(20))
        .expect("exit after SIGTERM");
    assert!(st.success(), "{st}:\n{}", c.output());
    wait_detached(&n, "SIGTERM");
    let d = n.turnstone(
        "server",
        dir.path(),
        "turnstone-d",
        &quick_drain("required"),
    );
    assert!(d.output().contains("kernel fast path on"), "{}", d.output());
}

/// A world-readable copy of `toml` for a server that runs as nobody.
fn readable(dir: &std::path::Path, name: &str, toml: &str) -> std::path::PathBuf {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, toml).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    path
}

/// `setpriv` running the binary as nobody with `caps` (e.g. "+bpf,+net_admin", or "" for
/// none) inherited and ambient, inside the server namespace.
fn as_nobody(n: &Netns, caps: &str, config: &std::path::Path) -> std::process::Command {
    common::require_tool("setpriv", "apt-get install -y util-linux");
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &n.ns("server"), "setpriv"])
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
    if caps.is_empty() {
        cmd.args(["--inh-caps=-all", "--bounding-set=-all"]);
    } else {
        cmd.arg(format!("--inh-caps=-all,{caps}"))
            .arg(format!("--ambient-caps={caps}"));
    }
    cmd.arg(env!("CARGO_BIN_EXE_turnstone"))
        .arg("--config")
        .arg(config);
    cmd
}

/// The binary must be reachable by nobody (a build under a private home is not).
fn nobody_can_run_the_binary() -> bool {
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_turnstone"))
        .arg("--version")
        .output();
    out.is_ok_and(|o| o.status.success())
}

#[test]
fn cap_bpf_and_net_admin_are_enough_and_without_them_it_says_why() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    assert!(
        nobody_can_run_the_binary(),
        "uid 65534 cannot run {}: the test needs the build directory readable",
        env!("CARGO_BIN_EXE_turnstone")
    );
    let n = rig();
    let dir = tempfile::tempdir().unwrap();

    // Without capabilities: auto says why, once, and relays in userspace.
    let path = readable(dir.path(), "auto.toml", &config("auto", ""));
    let mut server = ChildGuard::spawn("turnstone-nobody-auto", &mut as_nobody(&n, "", &path));
    common::wait_for("listening", Duration::from_secs(20), || {
        if let Some(st) = server.try_wait() {
            panic!("exited ({st}):\n{}", server.output());
        }
        server.output().contains("listening").then_some(())
    });
    let logs = server.output();
    assert!(
        logs.contains("kernel fast path: not used, relaying in userspace: needs CAP_BPF and CAP_NET_ADMIN (running as uid 65534)"),
        "{logs}"
    );
    assert!(!xdp_attached(&n));
    let (mut client, peer, relay) = session(&n, PORT);
    relay_to_client(&mut client, &peer, relay, 2);
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(user(&metrics(&n), "to_client", "channel"), 2.0);
    drop(server);

    // With exactly CAP_BPF and CAP_NET_ADMIN (no CAP_PERFMON, no CAP_SYS_ADMIN): the
    // verifier accepts the program for such a loader, and it relays in the kernel.
    let path = readable(dir.path(), "required.toml", &config("required", ""));
    let mut server = ChildGuard::spawn(
        "turnstone-nobody-required",
        &mut as_nobody(&n, "+bpf,+net_admin", &path),
    );
    common::wait_for("listening", Duration::from_secs(20), || {
        if let Some(st) = server.try_wait() {
            panic!("exited ({st}):\n{}", server.output());
        }
        server.output().contains("listening").then_some(())
    });
    assert!(
        server.output().contains("kernel fast path on"),
        "{}",
        server.output()
    );
    let (mut client, peer, relay) = session(&n, PORT);
    relay_to_client(&mut client, &peer, relay, 3);
    assert_eq!(kernel_to_client(&n), 3.0);
}

/// The server namespace's one interface besides lo.
fn server_device(n: &Netns) -> String {
    let links = n.exec("server", &["ip", "-o", "link", "show"]);
    links
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .find(|name| name != "lo")
        .unwrap_or_else(|| panic!("no interface besides lo:\n{links}"))
}

#[test]
fn fast_path_interfaces_are_where_it_attaches_and_forwarding_off_is_said_at_start() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = rig();
    let dir = tempfile::tempdir().unwrap();
    let dev = server_device(&n);

    // A name that does not exist is found at start, not when parsing.
    let text = refused(
        &n,
        dir.path(),
        &config("required", "").replace(
            "kernel_fast_path = \"required\"\n",
            "kernel_fast_path = \"required\"\nfast_path_interfaces = [\"nosuchif9\"]\n",
        ),
    );
    assert!(
        text.contains("relay.kernel_fast_path = \"required\"")
            && text.contains("relay.fast_path_interfaces: there is no interface \"nosuchif9\""),
        "{text}"
    );
    assert!(!xdp_attached(&n));

    // Forwarding off where it attaches: one start line says it is on and where the route
    // lookups fail; check-config, run there, says the same without loading anything.
    n.exec("server", &["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"]);
    let toml = config("required", "").replace(
        "kernel_fast_path = \"required\"\n",
        &format!("kernel_fast_path = \"required\"\nfast_path_interfaces = [\"{dev}\"]\n"),
    );
    let path = dir.path().join("check.toml");
    std::fs::write(&path, &toml).unwrap();
    let check = n.exec(
        "server",
        &[
            env!("CARGO_BIN_EXE_turnstone"),
            "check-config",
            path.to_str().unwrap(),
        ],
    );
    assert!(
        check.contains(&format!(
            "kernel fast path: would attach to {dev} (generic XDP); IP forwarding is off on {dev} (IPv4)"
        )),
        "{check}"
    );
    assert!(!xdp_attached(&n), "check-config attached something");
    let server = n.turnstone("server", dir.path(), "turnstone-fwd-off", &toml);
    let logs = server.output();
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("kernel fast path"))
        .collect();
    assert_eq!(lines.len(), 1, "{logs}");
    assert!(
        lines[0].contains("WARN")
            && lines[0].contains(&format!(
                "kernel fast path on: {dev} (generic XDP), but IP forwarding is off on {dev} (IPv4)"
            )),
        "{logs}"
    );
    assert!(xdp_attached(&n));
    // Relayed in userspace then: the route lookups fail.
    let (mut client, peer, relay) = session(&n, PORT);
    relay_to_client(&mut client, &peer, relay, 3);
    std::thread::sleep(Duration::from_millis(1200));
    let text = metrics(&n);
    assert_eq!(kernel(&text, "to_client", "channel"), 0.0, "{text}");
    assert_eq!(user(&text, "to_client", "channel"), 3.0, "{text}");
}
