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

/// A turnstone in namespace `name` run from `dir/bin/turnstone` (a symlink to the built
/// binary, which [`install`] may point elsewhere) with its control socket in the 0700
/// `dir/run` (`[server] control_socket` added to `toml`), as `turnstone upgrade` needs;
/// returned once it listens. The processes an upgrade starts share its process group
/// and log files: the guard's output has them all, and its drop ends them all.
pub fn upgradable(
    n: &Netns,
    name: &str,
    dir: &std::path::Path,
    label: &str,
    toml: &str,
) -> ChildGuard {
    let line = super::upgrade::prepare_dir(dir);
    let toml = toml.replacen("[server]\n", &format!("[server]\n{line}"), 1);
    n.turnstone_from(name, dir, label, &toml, &super::upgrade::binary(dir))
}

/// Runs `turnstone upgrade` in namespace `name` against [`upgradable`]'s server in
/// `dir`: the new process's pid and the pause it reports (ms), or what the command said.
pub fn upgrade(n: &Netns, name: &str, dir: &std::path::Path) -> Result<(u32, f64), String> {
    let mut cmd = std::process::Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &n.ns(name),
        env!("CARGO_BIN_EXE_turnstone"),
    ])
    .arg("upgrade")
    .arg("--socket")
    .arg(super::upgrade::control_socket(dir));
    super::upgrade::run_upgrade(&mut cmd).map(|u| (u.pid, u.pause_ms))
}

/// The four streams of a [`RigCall`], in its reports' order.
pub const STREAMS: [(&str, &str); 4] = [
    ("to_peer", "channel"),
    ("to_peer", "indication"),
    ("to_client", "channel"),
    ("to_client", "indication"),
];

/// The server's relay counters, by [`STREAMS`]: kernel and userspace packets, and the
/// kernel's entries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Relayed {
    pub kernel: [f64; 4],
    pub user: [f64; 4],
    pub entries: f64,
}

impl Relayed {
    /// The server's counters now (they are read from the kernel twice a second).
    pub fn read(n: &Netns) -> Relayed {
        let text = metrics(n);
        Relayed {
            kernel: STREAMS.map(|(d, p)| kernel(&text, d, p)),
            user: STREAMS.map(|(d, p)| user(&text, d, p)),
            entries: entries(&text),
        }
    }

    pub fn user_total(&self) -> f64 {
        self.user.iter().sum()
    }
}

/// One numbered stream's receiving end: order, count and longest silence.
#[derive(Default)]
struct Seen {
    next: u32,
    count: u32,
    /// Packets that arrived after one with a higher number.
    late: u32,
    highest: Option<u32>,
    errors: Vec<String>,
    last: Option<std::time::Instant>,
    longest_gap: Duration,
}

impl Seen {
    fn got(&mut self, k: usize, seq: u32) {
        let now = std::time::Instant::now();
        if let Some(last) = self.last {
            self.longest_gap = self.longest_gap.max(now - last);
        }
        self.last = Some(now);
        self.count += 1;
        if self.highest.is_some_and(|h| seq < h) {
            self.late += 1;
        }
        self.highest = self.highest.max(Some(seq));
        if seq != self.next && self.errors.len() < 10 {
            self.errors.push(format!(
                "{:?}: expected {} got {seq}",
                STREAMS[k], self.next
            ));
        }
        self.next = seq + 1;
    }

    fn error(&mut self, e: String) {
        if self.errors.len() < 10 {
            self.errors.push(e);
        }
    }
}

/// A call through the rig's server, as tests/common/call.rs's [`super::call::Call`]
/// on loopback: a client in the client namespace with channel [`super::call::CHANNEL`]
/// to peer `a` and Send/Data indications with peer `b` (both in the peer namespace);
/// every millisecond one numbered packet to a peer (ChannelData and Send in turn) and
/// one from a peer (a and b in turn), 1000/s each way; every stream checked for
/// order, loss, source and its longest silence.
pub struct RigCall {
    sent: std::sync::Arc<std::sync::Mutex<[u32; 4]>>,
    seen: Vec<std::sync::Arc<std::sync::Mutex<Seen>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop_sending: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    client: Option<super::turn::TurnClient>,
}

impl RigCall {
    pub fn start(n: &Netns) -> RigCall {
        use super::call::CHANNEL;
        use super::traffic::{seq_of, seq_payload};
        use super::turn::{channel_data, send_indication, Link, TurnClient};
        use std::net::{SocketAddr, UdpSocket};
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        use turnstone::proto::{self, attr, method, Class, Message};
        let bind = |ns: &str, ip: &str| {
            let s = n.enter(ns, || UdpSocket::bind((ip, 0)).expect("bind"));
            let r = socket2::SockRef::from(&s);
            let _ = r.set_recv_buffer_size(4 << 20);
            let _ = r.set_send_buffer_size(4 << 20);
            s
        };
        let server: SocketAddr = format!("{SERVER}:{PORT}").parse().unwrap();
        let (peer_a, peer_b) = (bind("peer", PEER), bind("peer", PEER));
        let (a, b) = (peer_a.local_addr().unwrap(), peer_b.local_addr().unwrap());
        let mut client = TurnClient::new(
            Link::Udp {
                sock: bind("client", CLIENT),
                server,
            },
            "alice",
            "wonderland",
        )
        .with_realm("fp.test");
        let relayed = client.must_allocate();
        client.permit(b);
        client.bind(CHANNEL, a);
        let sock = client.udp_socket().try_clone().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_sending = Arc::new(AtomicBool::new(false));
        let seen: Vec<Arc<Mutex<Seen>>> = (0..4).map(|_| Arc::default()).collect();
        let mut threads = Vec::new();
        for (k, peer) in [(0, &peer_a), (1, &peer_b)] {
            let (sock, seen, stop) = (peer.try_clone().unwrap(), seen[k].clone(), stop.clone());
            sock.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((len, src)) = sock.recv_from(&mut buf) else {
                        continue;
                    };
                    let mut s = seen.lock().unwrap();
                    if src != relayed {
                        s.error(format!("{:?}: from {src}, not {relayed}", STREAMS[k]));
                    } else if let Some(seq) = seq_of(&buf[..len]) {
                        s.got(k, seq);
                    }
                }
            }));
        }
        {
            let (sock, stop) = (sock.try_clone().unwrap(), stop.clone());
            sock.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let (from_a, from_b) = (seen[2].clone(), seen[3].clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(len) = sock.recv(&mut buf) else {
                        continue;
                    };
                    let f = &buf[..len];
                    if proto::is_channel_data(f[0]) {
                        let mut s = from_a.lock().unwrap();
                        match proto::parse_channel_data(f) {
                            Some((ch, data)) if ch == CHANNEL => {
                                if let Some(seq) = seq_of(data) {
                                    s.got(2, seq);
                                }
                            }
                            other => s.error(format!("ChannelData {other:?}")),
                        }
                    } else if let Ok(m) = Message::parse(f) {
                        if m.class() == Class::Indication && m.method() == method::DATA {
                            let mut s = from_b.lock().unwrap();
                            let from = m.xor_address(attr::XOR_PEER_ADDRESS).ok().flatten();
                            if from != Some(b) {
                                s.error(format!("Data indication from {from:?}"));
                            } else if let Some(seq) = m.data().and_then(seq_of) {
                                s.got(3, seq);
                            }
                        }
                    }
                }
            }));
        }
        let sent = Arc::new(Mutex::new([0u32; 4]));
        {
            let (sock, stop, sent) = (sock, stop_sending.clone(), sent.clone());
            threads.push(std::thread::spawn(move || {
                let start = std::time::Instant::now();
                let mut tick = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut n = sent.lock().unwrap();
                    let k = (tick % 2) as usize;
                    let payload = seq_payload(n[k], 160);
                    // Counted once sent both ways; a failure ends the sending (the
                    // counts then say how far it got).
                    let sent_both = if k == 0 {
                        sock.send_to(&channel_data(CHANNEL, &payload), server)
                            .is_ok()
                            && peer_a.send_to(&payload, relayed).is_ok()
                    } else {
                        sock.send_to(&send_indication(b, &payload), server).is_ok()
                            && peer_b.send_to(&payload, relayed).is_ok()
                    };
                    if !sent_both {
                        break;
                    }
                    n[k] += 1;
                    n[k + 2] += 1;
                    drop(n);
                    tick += 1;
                    let due = start + Duration::from_millis(tick);
                    if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
            }));
        }
        RigCall {
            sent,
            seen,
            stop,
            stop_sending,
            threads,
            client: Some(client),
        }
    }

    /// Packets received so far, by [`STREAMS`].
    pub fn received(&self) -> [u32; 4] {
        std::array::from_fn(|k| self.seen[k].lock().unwrap().count)
    }

    /// Stops sending, gives the last packets `settle` to arrive, and reports (received:
    /// how many arrived, in order or not; errors: the first packets out of order); the
    /// client (its socket free again) is returned for requests after the call.
    pub fn finish(
        mut self,
        settle: Duration,
    ) -> (super::turn::TurnClient, super::call::CallReport) {
        use std::sync::atomic::Ordering;
        self.stop_sending.store(true, Ordering::Relaxed);
        std::thread::sleep(settle);
        self.stop.store(true, Ordering::Relaxed);
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
        let mut report = super::call::CallReport {
            sent: *self.sent.lock().unwrap(),
            received: [0; 4],
            longest_gap: [Duration::ZERO; 4],
            errors: Vec::new(),
        };
        for (k, s) in self.seen.iter().enumerate() {
            let s = s.lock().unwrap();
            report.received[k] = s.count;
            if s.late > 0 {
                report.errors.push(format!(
                    "{:?}: {} packets arrived after later ones",
                    STREAMS[k], s.late
                ));
            }
            report.longest_gap[k] = s.longest_gap;
            report.errors.extend(s.errors.iter().cloned());
        }
        (self.client.take().expect("the client"), report)
    }
}

impl Drop for RigCall {
    fn drop(&mut self) {
        self.stop_sending
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
