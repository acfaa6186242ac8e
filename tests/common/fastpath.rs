//! The kernel fast path's test rig: client, router, server and peer namespaces over veth, turnstone's configuration for it, a UDP echo in the peer namespace, and readings of its CPU time, metrics and usage records.
//
// Namespaces (addresses only inside them): `client` (10.78.1.2) and `peer` (10.78.2.2)
// reach `server` (10.78.3.2) through `router`. The server's one interface faces the
// router, which forwards to the client or the peer, as a server's upstream router would:
// the program's route lookups send every relayed frame back out of the interface it came
// in on (XDP_TX, the router's MAC as the destination).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::metrics::sample;
use super::netns::{ip, Netns};
use super::process::{require_tool, signal, wait_for, ChildGuard};

pub const SERVER: &str = "10.78.3.2";
pub const CLIENT: &str = "10.78.1.2";
pub const PEER: &str = "10.78.2.2";
pub const PORT: u16 = 3478;
pub const METRICS_PORT: u16 = 9641;

/// The four namespaces, routed, with forwarding on where the program needs it. The
/// client's and the peer's veths send full UDP checksums, as from a wire.
pub fn rig() -> Netns {
    rig_of(false)
}

/// [`rig`] with transmit checksum offload left on at the client's and the peer's veths:
/// their datagrams reach the server as a same-host sender's do, their UDP checksum left
/// to an offload (CHECKSUM_PARTIAL: the field holds the pseudo-header's sum), which the
/// program passes up for userspace to relay.
pub fn rig_with_offload() -> Netns {
    rig_of(true)
}

fn rig_of(offload: bool) -> Netns {
    require_tool("bpftool", "apt-get install -y bpftool");
    require_tool("clang", "apt-get install -y clang libbpf-dev");
    require_tool("ethtool", "apt-get install -y ethtool");
    let n = Netns::new(&["client", "router", "server", "peer"]);
    let (client_dev, _) = n.veth("client", &format!("{CLIENT}/24"), "router", "10.78.1.1/24");
    let (peer_dev, _) = n.veth("peer", &format!("{PEER}/24"), "router", "10.78.2.1/24");
    // Datagrams from a wire carry a full UDP checksum, which the program updates
    // incrementally; a veth's own are left for an offload (CHECKSUM_PARTIAL), which the
    // program passes up.
    if !offload {
        n.exec("client", &["ethtool", "-K", &client_dev, "tx", "off"]);
        n.exec("peer", &["ethtool", "-K", &peer_dev, "tx", "off"]);
    }
    n.veth("server", &format!("{SERVER}/24"), "router", "10.78.3.1/24");
    for (ns, via) in [
        ("client", "10.78.1.1"),
        ("peer", "10.78.2.1"),
        ("server", "10.78.3.1"),
    ] {
        ip(&["-n", &n.ns(ns), "route", "add", "default", "via", via]);
    }
    n.exec("router", &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    // The program's route lookups (bpf_fib_lookup) need forwarding on where frames come
    // in; a new namespace may inherit the host's setting, so set it either way.
    n.exec("server", &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    n
}

/// turnstone's configuration in the rig with `[relay] kernel_fast_path = mode`; `extra` is
/// appended (more sections, or keys of a last section).
pub fn config(mode: &str, extra: &str) -> String {
    format!(
        "[server]\nrealm = \"fp.test\"\n\n\
         [[listen]]\ntransport = \"udp\"\naddress = \"{SERVER}:{PORT}\"\n\n\
         [relay]\naddress = \"{SERVER}\"\nports = \"40000-40999\"\nkernel_fast_path = \"{mode}\"\n\n\
         [auth]\nusers = {{ alice = \"wonderland\" }}\n\n\
         [policy]\nallow_peers = [\"10.78.0.0/16\"]\n\n\
         [metrics]\nlisten = \"{SERVER}:{METRICS_PORT}\"\n{extra}"
    )
}

/// [`config`] with `relay_keys` (lines such as `permission_lifetime = "2s"`) added to
/// its `[relay]` section.
pub fn config_relay(mode: &str, relay_keys: &str, extra: &str) -> String {
    config(mode, extra).replacen("[relay]\n", &format!("[relay]\n{relay_keys}"), 1)
}

/// Entries in the kernel's maps (`turnstone_kernel_fast_path_entries`, read twice a
/// second): a channel or a permission counts once per direction.
pub fn entries(text: &str) -> f64 {
    sample(text, "turnstone_kernel_fast_path_entries", &[]).unwrap_or(-1.0)
}

/// Rewrites the running server's configuration file `path` with `toml`, sends SIGHUP
/// and waits until it says it reloaded.
pub fn reload(server: &ChildGuard, path: &std::path::Path, toml: &str) {
    let before = server.output().matches("configuration reloaded").count();
    std::fs::write(path, toml).unwrap();
    signal(server.id().expect("pid"), "HUP");
    wait_for("the reload", Duration::from_secs(10), || {
        (server.output().matches("configuration reloaded").count() > before).then_some(())
    });
}

/// The server process's CPU time (user + system) from /proc/PID/stat, in clock ticks.
pub fn cpu_ticks(server: &ChildGuard) -> u64 {
    let pid = server.id().expect("pid");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name (which ends with ')'): state is field 3, utime 14.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

/// The server's /metrics text, fetched from inside its namespace.
pub fn metrics(n: &Netns) -> String {
    n.enter("server", || {
        let mut s = TcpStream::connect((SERVER, METRICS_PORT)).expect("metrics");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text
    })
}

/// Packets the kernel relayed in `direction` ("to_peer", "to_client") on `path`
/// ("channel", "indication").
pub fn kernel(text: &str, direction: &str, path: &str) -> f64 {
    sample(
        text,
        "turnstone_relayed_kernel_packets_total",
        &[("direction", direction), ("path", path)],
    )
    .unwrap_or(0.0)
}

/// Packets relayed (both paths) in `direction` on `path`.
pub fn user(text: &str, direction: &str, path: &str) -> f64 {
    sample(
        text,
        "turnstone_relayed_packets_total",
        &[("direction", direction), ("path", path)],
    )
    .unwrap_or(0.0)
}

/// The sums over a server's usage records ("allocation ended" log lines).
#[derive(Debug, Default, PartialEq)]
pub struct Usage {
    pub allocations: u64,
    pub packets_to_peer: u64,
    pub packets_to_client: u64,
    pub kernel_packets_to_peer: u64,
    pub kernel_packets_to_client: u64,
}

/// Adds up the usage records in a server's log.
pub fn usage(logs: &str) -> Usage {
    let mut u = Usage::default();
    for line in logs.lines().filter(|l| l.contains("allocation ended")) {
        u.allocations += 1;
        for token in line.split_whitespace() {
            let Some((k, v)) = token.split_once('=') else {
                continue;
            };
            let v: u64 = v.trim_matches('"').parse().unwrap_or(0);
            match k {
                "packets_to_peer" => u.packets_to_peer += v,
                "packets_to_client" => u.packets_to_client += v,
                "kernel_packets_to_peer" => u.kernel_packets_to_peer += v,
                "kernel_packets_to_client" => u.kernel_packets_to_client += v,
                _ => {}
            }
        }
    }
    u
}

/// A UDP echo on `PEER` in the peer namespace: every datagram goes back to its sender,
/// until dropped.
pub struct PeerEcho {
    pub addr: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl PeerEcho {
    pub fn start(n: &Netns) -> PeerEcho {
        use std::sync::atomic::{AtomicBool, Ordering};
        let sock = n.enter("peer", || {
            std::net::UdpSocket::bind((PEER, 0)).expect("peer socket")
        });
        let _ = socket2::SockRef::from(&sock).set_recv_buffer_size(4 << 20);
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                let mut echoed = 0;
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((len, from)) = sock.recv_from(&mut buf) {
                        if sock.send_to(&buf[..len], from).is_ok() {
                            echoed += 1;
                        }
                    }
                }
                echoed
            })
        };
        PeerEcho {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the echo; returns how many datagrams it echoed.
    pub fn stop(mut self) -> u64 {
        self.stop_thread()
    }

    fn stop_thread(&mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().unwrap_or(0))
            .unwrap_or(0)
    }
}

impl Drop for PeerEcho {
    fn drop(&mut self) {
        self.stop_thread();
    }
}
