//! The XDP fast path program (bpf/relay.c) under BPF_PROG_TEST_RUN: the test builds the
//! object with `scripts/bpf`, loads it with bpftool into its own bpffs directory (removed
//! afterwards), fills the maps, and runs a table of input frames -> expected action and
//! exact output bytes (checksums computed here, independently of the program). The runs
//! happen in a network namespace of the test's own, whose routes and static neighbours
//! make the program's route lookups (bpf_fib_lookup) succeed for the table's addresses:
//! clients behind one interface, peers behind another, so relayed frames are redirected
//! with the route's MACs. Needs root, clang, libbpf-dev, bpftool, iproute2 and nsenter;
//! `bash scripts/test` installs the tools.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::netns::{ip, Netns};
use common::{require_tool, run_bounded};

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
/// The server's interface towards the clients (and the frames' destination MAC).
const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// The server's interface towards the peers.
const SERVER_PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x07];
/// Client B of the client-to-client rows, behind the clients' interface.
const CLIENT_B_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];

fn mac(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

// ---------------------------------------------------------------------------------------
// Frames

/// IP header fields the program either checks or rewrites.
#[derive(Clone)]
struct Ip {
    ttl: u8,
    id: u16,
    /// IPv4 flags + fragment offset.
    frag: u16,
    options: Vec<u8>,
    /// IPv4 protocol / IPv6 next header.
    proto: u8,
    flow: u32,
    /// Send a zero UDP checksum (none, over IPv4).
    no_csum: bool,
}

/// What clients and peers send: not the program's defaults, so the rewrite shows.
fn sent() -> Ip {
    Ip {
        ttl: 60,
        id: 0x1234,
        frag: 0x4000, // DF
        options: vec![],
        proto: 17,
        flow: 0x12345,
        no_csum: false,
    }
}

/// What the program writes.
fn written() -> Ip {
    Ip {
        ttl: 64,
        id: 0,
        frag: 0,
        options: vec![],
        proto: 17,
        flow: 0,
        no_csum: false,
    }
}

fn sum16(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0)))
        .sum()
}

fn finish(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn ip_bytes(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Ethernet + IPv4/IPv6 + UDP + payload with valid checksums (RFC 768 / 8200).
fn frame(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
    ip: &Ip,
) -> Vec<u8> {
    let udp_len = (8 + payload.len()) as u16;
    let mut udp = Vec::new();
    udp.extend(src.port().to_be_bytes());
    udp.extend(dst.port().to_be_bytes());
    udp.extend(udp_len.to_be_bytes());
    udp.extend([0, 0]);
    udp.extend(payload);
    let mut pseudo = ip_bytes(src.ip());
    pseudo.extend(ip_bytes(dst.ip()));
    pseudo.extend([0, 17]);
    pseudo.extend(udp_len.to_be_bytes());
    let mut csum = finish(sum16(&pseudo) + sum16(&udp));
    if csum == 0 {
        csum = 0xffff;
    }
    if ip.no_csum {
        csum = 0;
    }
    udp[6..8].copy_from_slice(&csum.to_be_bytes());

    let mut f = Vec::new();
    f.extend(dmac);
    f.extend(smac);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f.extend(0x0800u16.to_be_bytes());
            let hl = 20 + ip.options.len();
            let mut h = vec![0x40 | (hl / 4) as u8, 0];
            h.extend(((hl + udp.len()) as u16).to_be_bytes());
            h.extend(ip.id.to_be_bytes());
            h.extend(ip.frag.to_be_bytes());
            h.extend([ip.ttl, ip.proto, 0, 0]);
            h.extend(s.octets());
            h.extend(d.octets());
            h.extend(&ip.options);
            let c = finish(sum16(&h));
            h[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend(h);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f.extend(0x86ddu16.to_be_bytes());
            f.extend((0x6000_0000u32 | ip.flow).to_be_bytes());
            f.extend(udp_len.to_be_bytes());
            f.extend([ip.proto, ip.ttl]);
            f.extend(s.octets());
            f.extend(d.octets());
        }
        _ => panic!("mixed families in one frame"),
    }
    f.extend(udp);
    f
}

fn channel_data(number: u16, data: &[u8], padding: &[u8]) -> Vec<u8> {
    let mut v = number.to_be_bytes().to_vec();
    v.extend((data.len() as u16).to_be_bytes());
    v.extend(data);
    v.extend(padding);
    v
}

/// XOR-PEER-ADDRESS's value (RFC 8489 section 14.2).
fn xor_address(a: SocketAddr, tid: &[u8; 12]) -> Vec<u8> {
    let mut key = 0x2112_a442u32.to_be_bytes().to_vec();
    key.extend(tid);
    let mut v = vec![0, if a.is_ipv4() { 1 } else { 2 }];
    v.extend((a.port() ^ 0x2112).to_be_bytes());
    v.extend(ip_bytes(a.ip()).iter().zip(&key).map(|(x, k)| x ^ k));
    v
}

/// A STUN indication of `msg_type` with XOR-PEER-ADDRESS and DATA (zero padding).
fn indication(msg_type: u16, tid: [u8; 12], peer: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut body = 0x0012u16.to_be_bytes().to_vec();
    let addr = xor_address(peer, &tid);
    body.extend((addr.len() as u16).to_be_bytes());
    body.extend(addr);
    body.extend(0x0013u16.to_be_bytes());
    body.extend((data.len() as u16).to_be_bytes());
    body.extend(data);
    body.resize((body.len() + 3) & !3, 0);
    let mut v = msg_type.to_be_bytes().to_vec();
    v.extend((body.len() as u16).to_be_bytes());
    v.extend(0x2112_a442u32.to_be_bytes());
    v.extend(tid);
    v.extend(body);
    v
}

/// A STUN Binding request (no attributes).
fn binding_request() -> Vec<u8> {
    let mut v = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    v.extend([7u8; 12]);
    v
}

const XPA: u16 = 0x0012;
const DATA: u16 = 0x0013;
const DONT_FRAGMENT: u16 = 0x001a;
const FINGERPRINT: u16 = 0x8028;

/// A Send indication with these attributes in this order: XOR-PEER-ADDRESS's value is
/// `peer`'s, DATA's is `data` (padding `fill`), the others' what is given (padded with
/// zeros). FINGERPRINT's value is a real CRC-32 when `4` bytes of zeros are given.
fn send_with(
    tid: [u8; 12],
    peer: SocketAddr,
    data: &[u8],
    fill: u8,
    attrs: &[(u16, &[u8])],
) -> Vec<u8> {
    let mut v = vec![0x00, 0x16, 0, 0, 0x21, 0x12, 0xa4, 0x42];
    v.extend(tid);
    for &(t, value) in attrs {
        let value = match t {
            XPA => xor_address(peer, &tid),
            DATA => data.to_vec(),
            _ => value.to_vec(),
        };
        let len = (v.len() + 4 + value.len() - 20 + 3) & !3;
        if t == FINGERPRINT && value == [0; 4] {
            // RFC 8489 section 14.7: CRC-32 of the message up to it, XOR 0x5354554e,
            // with the length covering it.
            v[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            let crc = crc32(&v) ^ 0x5354_554e;
            v.extend(t.to_be_bytes());
            v.extend(4u16.to_be_bytes());
            v.extend(crc.to_be_bytes());
            continue;
        }
        v.extend(t.to_be_bytes());
        v.extend((value.len() as u16).to_be_bytes());
        v.extend(&value);
        let padding = (4 - value.len() % 4) % 4;
        v.extend(std::iter::repeat_n(
            if t == DATA { fill } else { 0 },
            padding,
        ));
        let len = (v.len() - 20) as u16;
        v[2..4].copy_from_slice(&len.to_be_bytes());
    }
    v
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xedb8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// The frame with its UDP checksum as a same-host sender leaves it for an offload
/// (CHECKSUM_PARTIAL): the pseudo-header's sum, folded, not complemented.
fn partial(mut f: Vec<u8>) -> Vec<u8> {
    let v6 = f[12..14] == [0x86, 0xdd];
    let (addrs, udp) = if v6 { (22..54, 54) } else { (26..34, 34) };
    let mut s = sum16(&f[addrs]) + 17 + u32::from(u16::from_be_bytes([f[udp + 4], f[udp + 5]]));
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    f[udp + 6..udp + 8].copy_from_slice(&(s as u16).to_be_bytes());
    f
}

/// `len` bytes of data whose frame (`make`) carries a complete, right UDP checksum that
/// equals what [`partial`] writes (1 in 65536 of datagrams from the wire): its first two
/// bytes searched for.
fn complete_but_looks_partial(len: usize, make: impl Fn(&[u8]) -> Vec<u8>) -> Vec<u8> {
    (0..=u16::MAX)
        .map(|x| {
            let mut data = vec![0x5a; len];
            data[..2].copy_from_slice(&x.to_be_bytes());
            data
        })
        .find(|data| {
            let f = make(data);
            partial(f.clone()) == f
        })
        .expect("some first two bytes give the pseudo-header's sum")
}

// ---------------------------------------------------------------------------------------
// Map entries, laid out as in bpf/relay.c

/// 16 bytes: IPv6 as is, IPv4 as IPv4-mapped.
fn addr16(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

fn chan_client_key(client: SocketAddr, server: SocketAddr, number: u16) -> Vec<u8> {
    let mut k = addr16(client.ip()).to_vec();
    k.extend(addr16(server.ip()));
    k.extend(client.port().to_be_bytes());
    k.extend(server.port().to_be_bytes());
    k.extend(number.to_be_bytes());
    k.extend([0, 0]);
    k
}

fn chan_client_val(relay: SocketAddr, peer: SocketAddr, entry: u32) -> Vec<u8> {
    let mut v = addr16(relay.ip()).to_vec();
    v.extend(addr16(peer.ip()));
    v.extend(relay.port().to_be_bytes());
    v.extend(peer.port().to_be_bytes());
    v.extend(entry.to_ne_bytes());
    v
}

fn chan_relay_key(relay: SocketAddr, peer: SocketAddr) -> Vec<u8> {
    let mut k = addr16(relay.ip()).to_vec();
    k.extend(addr16(peer.ip()));
    k.extend(relay.port().to_be_bytes());
    k.extend(peer.port().to_be_bytes());
    k
}

fn chan_relay_val(client: SocketAddr, server: SocketAddr, number: u16, entry: u32) -> Vec<u8> {
    let mut v = addr16(client.ip()).to_vec();
    v.extend(addr16(server.ip()));
    v.extend(client.port().to_be_bytes());
    v.extend(server.port().to_be_bytes());
    v.extend(number.to_be_bytes());
    v.extend([0, 0]);
    v.extend(entry.to_ne_bytes());
    v
}

fn perm_key(relay: SocketAddr, peer: IpAddr) -> Vec<u8> {
    let mut k = addr16(relay.ip()).to_vec();
    k.extend(addr16(peer));
    k.extend(relay.port().to_be_bytes());
    k.extend([0, 0]);
    k
}

fn perm_val(client: SocketAddr, server: SocketAddr, entry: u32, relays_only: bool) -> Vec<u8> {
    let mut v = addr16(client.ip()).to_vec();
    v.extend(addr16(server.ip()));
    v.extend(client.port().to_be_bytes());
    v.extend(server.port().to_be_bytes());
    v.extend(entry.to_ne_bytes());
    v.extend(u32::from(relays_only).to_ne_bytes());
    v
}

fn perm_client_key(client: SocketAddr, server: SocketAddr, peer: IpAddr) -> Vec<u8> {
    let mut k = addr16(client.ip()).to_vec();
    k.extend(addr16(server.ip()));
    k.extend(addr16(peer));
    k.extend(client.port().to_be_bytes());
    k.extend(server.port().to_be_bytes());
    k
}

fn perm_client_val(relay: SocketAddr, entry: u32, relays_only: bool) -> Vec<u8> {
    let mut v = addr16(relay.ip()).to_vec();
    v.extend(relay.port().to_be_bytes());
    v.extend([0, 0]);
    v.extend(entry.to_ne_bytes());
    v.extend(u32::from(relays_only).to_ne_bytes());
    v
}

// ---------------------------------------------------------------------------------------
// The program, loaded

const TOOL_HINT: &str = "apt-get install -y clang libbpf-dev bpftool";

/// The program and its maps pinned under a bpffs directory of this test's own, which
/// goes on drop.
struct Loaded {
    bpftool: PathBuf,
    dir: PathBuf,
    prog: PathBuf,
    scratch: tempfile::TempDir,
    /// Where the program runs (its route lookups see this namespace's tables).
    netns: Netns,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        == Some("0")
}

fn run(name: &str, cmd: &mut Command) -> String {
    let out = run_bounded(name, cmd, Duration::from_secs(60));
    assert!(out.status.success(), "{name} failed: {}", out.combined());
    out.stdout
}

impl Loaded {
    fn new() -> Loaded {
        require_tool("clang", TOOL_HINT);
        let bpftool = require_tool("bpftool", TOOL_HINT);
        require_tool("nsenter", "apt-get install -y util-linux");
        assert!(
            is_root(),
            "tests/bpf_program.rs loads an XDP program and pins it in bpffs: run it as root"
        );
        let scratch = tempfile::tempdir().expect("temp dir");
        let obj = scratch.path().join("relay.o");
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        run(
            "scripts/bpf",
            Command::new("bash")
                .arg(root.join("scripts/bpf"))
                .arg(&obj)
                .current_dir(root),
        );

        let bpffs = Path::new("/sys/fs/bpf");
        let mounted = std::fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "));
        if !mounted {
            run(
                "mount bpffs",
                Command::new("mount").args(["-t", "bpf", "bpf"]).arg(bpffs),
            );
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = bpffs.join(format!("turnstone-test-{}-{nanos}", std::process::id()));
        let loaded = Loaded {
            bpftool: bpftool.clone(),
            prog: dir.join("xdp_relay"),
            dir: dir.clone(),
            scratch,
            netns: routes(),
        };
        run(
            "bpftool prog loadall",
            Command::new(&bpftool)
                .args(["prog", "loadall"])
                .arg(&obj)
                .arg(&dir)
                .arg("type")
                .arg("xdp")
                .arg("pinmaps")
                .arg(dir.join("maps")),
        );
        assert!(
            loaded.prog.exists(),
            "bpftool pinned no xdp_relay in {dir:?}"
        );
        loaded
    }

    fn update(&self, map: &str, key: &[u8], value: &[u8]) {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>();
        run(
            "bpftool map update",
            Command::new(&self.bpftool)
                .args(["map", "update", "pinned"])
                .arg(self.dir.join("maps").join(map))
                .arg("key")
                .arg("hex")
                .args(hex(key))
                .arg("value")
                .arg("hex")
                .args(hex(value)),
        );
    }

    /// Runs the program `repeat` times on `input`: (action, output frame, ns per run).
    fn run(&self, input: &[u8], repeat: u32) -> (u32, Vec<u8>, u64) {
        let data_in = self.scratch.path().join("in.bin");
        let data_out = self.scratch.path().join("out.bin");
        std::fs::write(&data_in, input).unwrap();
        let _ = std::fs::remove_file(&data_out);
        // nsenter, not `ip netns exec`: that one remounts /sys, hiding the pins.
        let out = run(
            "bpftool prog run",
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", self.netns.ns("xdp")))
                .arg(&self.bpftool)
                .args(["prog", "run", "pinned"])
                .arg(&self.prog)
                .arg("data_in")
                .arg(&data_in)
                .arg("data_out")
                .arg(&data_out)
                .args(["data_size_out", "4096", "repeat"])
                .arg(repeat.to_string()),
        );
        // "Return value: 3, duration (average): 45ns" ("duration: 45ns" for one run)
        let rv = out
            .split("Return value: ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("no return value in bpftool's output: {out}"));
        let ns = out
            .split("duration")
            .nth(1)
            .and_then(|s| s.split(": ").nth(1))
            .and_then(|s| s.trim().trim_end_matches("ns").parse().ok())
            .unwrap_or_else(|| panic!("no duration in bpftool's output: {out}"));
        (rv, std::fs::read(&data_out).unwrap_or_default(), ns)
    }

    /// Packets and bytes counted for `entry`, summed over the CPUs.
    fn counter(&self, entry: u32) -> (u64, u64) {
        let hex = entry.to_ne_bytes().map(|x| format!("{x:02x}"));
        let out = run(
            "bpftool map lookup",
            Command::new(&self.bpftool)
                .args(["-j", "map", "lookup", "pinned"])
                .arg(self.dir.join("maps/counters"))
                .arg("key")
                .arg("hex")
                .args(hex),
        );
        let v: serde_json::Value = serde_json::from_str(&out).expect("bpftool JSON");
        let cpus = v["formatted"]["values"]
            .as_array()
            .unwrap_or_else(|| panic!("unexpected counters JSON: {out}"));
        cpus.iter().fold((0, 0), |(p, b), c| {
            (
                p + c["value"]["packets"].as_u64().unwrap(),
                b + c["value"]["bytes"].as_u64().unwrap(),
            )
        })
    }
}

/// The namespace the program runs in (BPF_PROG_TEST_RUN's ingress interface is its `lo`):
/// forwarding on, clients (192.0.2.0/24, 2001:db8::/64) behind an interface with
/// SERVER_MAC, peers (198.51.100.0/24, 2001:db8:1::/64, and the timing loop's
/// 10.9.0.0/24, 2001:db8:9::/64) behind one with SERVER_PEER_MAC; static neighbours for
/// the addresses the table relays to (the timing loop's three included), none for the
/// `no_neigh` peers and `lost_client`s, no route to the `no_route` peers. The server's
/// addresses (192.0.2.1, 2001:db8::1, and the client-to-client timing loop's 10.9.0.4,
/// 2001:db8:9::4) are local, so a route lookup towards its relays finds a local
/// destination (not forwarded), as on a server.
fn routes() -> Netns {
    let n = Netns::new(&["xdp"]);
    let ns = n.ns("xdp");
    n.exec(
        "xdp",
        &[
            "sysctl",
            "-qw",
            "net.ipv4.conf.all.forwarding=1",
            "net.ipv6.conf.all.forwarding=1",
        ],
    );
    let (to_clients, to_peers) = ("tsclients", "tspeers");
    ip(&[
        "-n", &ns, "link", "add", to_clients, "type", "veth", "peer", "name", to_peers,
    ]);
    for (dev, m) in [(to_clients, SERVER_MAC), (to_peers, SERVER_PEER_MAC)] {
        ip(&["-n", &ns, "link", "set", dev, "address", &mac(m), "up"]);
    }
    for (net, dev) in [
        ("192.0.2.0/24", to_clients),
        ("2001:db8::/64", to_clients),
        ("198.51.100.0/24", to_peers),
        ("2001:db8:1::/64", to_peers),
        ("10.9.0.0/24", to_peers),
        ("2001:db8:9::/64", to_peers),
    ] {
        ip(&["-n", &ns, "route", "add", net, "dev", dev]);
    }
    for local in [
        "192.0.2.1/32",
        "2001:db8::1/128",
        "10.9.0.4/32",
        "2001:db8:9::4/128",
    ] {
        ip(&["-n", &ns, "addr", "add", local, "dev", "lo"]);
    }
    for (addr, m, dev) in [
        ("192.0.2.10", CLIENT_MAC, to_clients),
        ("2001:db8::10", CLIENT_MAC, to_clients),
        ("192.0.2.11", CLIENT_B_MAC, to_clients),
        ("2001:db8::11", CLIENT_B_MAC, to_clients),
        ("198.51.100.7", PEER_MAC, to_peers),
        ("2001:db8:1::7", PEER_MAC, to_peers),
        ("10.9.0.1", PEER_MAC, to_peers),
        ("10.9.0.3", PEER_MAC, to_peers),
        ("10.9.0.2", PEER_MAC, to_peers),
        ("2001:db8:9::1", PEER_MAC, to_peers),
        ("2001:db8:9::3", PEER_MAC, to_peers),
        ("2001:db8:9::2", PEER_MAC, to_peers),
    ] {
        ip(&[
            "-n",
            &ns,
            "neigh",
            "add",
            addr,
            "lladdr",
            &mac(m),
            "dev",
            dev,
            "nud",
            "permanent",
        ]);
    }
    n
}

// ---------------------------------------------------------------------------------------
// The table

enum Expect {
    /// The input, unchanged.
    Unchanged,
    Bytes(Vec<u8>),
    /// A frame made with the transaction id (random) found at this offset of the output.
    WithTid(usize, Box<dyn Fn([u8; 12]) -> Vec<u8>>),
}

struct Case {
    name: &'static str,
    input: Vec<u8>,
    action: u32,
    output: Expect,
    /// The counter entries a relayed packet counts on, with its data bytes.
    counts: Vec<(u32, u64)>,
}

fn pass(name: &'static str, input: Vec<u8>) -> Case {
    Case {
        name,
        input,
        action: XDP_PASS,
        output: Expect::Unchanged,
        counts: vec![],
    }
}

/// One family's addresses.
struct Family {
    client: SocketAddr,
    server: SocketAddr,
    relay: SocketAddr,
    peer: SocketAddr,
    /// A peer with a channel but no permission.
    unpermitted: SocketAddr,
    /// A peer whose permission is relays-only.
    relays_only: SocketAddr,
    /// A peer with neither.
    stranger: SocketAddr,
    /// Permitted peers with channels whose route lookup fails: on a route without a
    /// neighbour entry, and without a route.
    no_neigh: SocketAddr,
    no_route: SocketAddr,
    /// A peer with a channel and a permission for `lost_client`, a client without a
    /// neighbour entry (the answers' route lookups fail).
    lost_peer: SocketAddr,
    lost_client: SocketAddr,
    /// Entry ids: channel client->peer, channel peer->client, permission.
    entries: [u32; 3],
}

impl Family {
    /// The permitted peer's IP on a port without a channel.
    fn peer_other_port(&self) -> SocketAddr {
        SocketAddr::new(self.peer.ip(), self.peer.port() + 1)
    }
}

const CHANNEL: u16 = 0x4001;
const CHANNEL_UNPERMITTED: u16 = 0x4002;
const CHANNEL_RELAYS_ONLY: u16 = 0x4003;
const CHANNEL_CROSS: u16 = 0x4004;
const CHANNEL_NO_NEIGH: u16 = 0x4005;
const CHANNEL_NO_ROUTE: u16 = 0x4006;

fn v4() -> Family {
    Family {
        client: sa("192.0.2.10:50000"),
        server: sa("192.0.2.1:3478"),
        relay: sa("192.0.2.1:49160"),
        peer: sa("198.51.100.7:40000"),
        unpermitted: sa("198.51.100.8:40000"),
        relays_only: sa("198.51.100.9:40000"),
        stranger: sa("198.51.100.99:40000"),
        no_neigh: sa("198.51.100.50:40000"),
        no_route: sa("203.0.113.5:40000"),
        lost_peer: sa("198.51.100.60:40000"),
        lost_client: sa("192.0.2.99:50000"),
        entries: [1, 2, 3],
    }
}

fn v6() -> Family {
    Family {
        client: sa("[2001:db8::10]:50001"),
        server: sa("[2001:db8::1]:3478"),
        relay: sa("[2001:db8::1]:49161"),
        peer: sa("[2001:db8:1::7]:40001"),
        unpermitted: sa("[2001:db8:1::8]:40001"),
        relays_only: sa("[2001:db8:1::9]:40001"),
        stranger: sa("[2001:db8:1::99]:40001"),
        no_neigh: sa("[2001:db8:1::50]:40001"),
        no_route: sa("[2001:db8:99::5]:40001"),
        lost_peer: sa("[2001:db8:1::60]:40001"),
        lost_client: sa("[2001:db8::99]:50001"),
        entries: [4, 5, 6],
    }
}

fn install(bpf: &Loaded, f: &Family) {
    let [e_out, e_in, e_perm] = f.entries;
    for (number, peer) in [
        (CHANNEL, f.peer),
        (CHANNEL_UNPERMITTED, f.unpermitted),
        (CHANNEL_RELAYS_ONLY, f.relays_only),
        (CHANNEL_NO_NEIGH, f.no_neigh),
        (CHANNEL_NO_ROUTE, f.no_route),
    ] {
        bpf.update(
            "chan_by_client",
            &chan_client_key(f.client, f.server, number),
            &chan_client_val(f.relay, peer, e_out),
        );
        bpf.update(
            "chan_by_relay",
            &chan_relay_key(f.relay, peer),
            &chan_relay_val(f.client, f.server, number, e_in),
        );
    }
    bpf.update(
        "perm_by_relay",
        &perm_key(f.relay, f.peer.ip()),
        &perm_val(f.client, f.server, e_perm, false),
    );
    bpf.update(
        "perm_by_relay",
        &perm_key(f.relay, f.relays_only.ip()),
        &perm_val(f.client, f.server, e_perm, true),
    );
    bpf.update(
        "chan_by_relay",
        &chan_relay_key(f.relay, f.lost_peer),
        &chan_relay_val(f.lost_client, f.server, CHANNEL, e_in),
    );
    bpf.update(
        "perm_by_relay",
        &perm_key(f.relay, f.lost_peer.ip()),
        &perm_val(f.lost_client, f.server, e_perm, false),
    );
    for peer in [f.no_neigh, f.no_route] {
        bpf.update(
            "perm_by_relay",
            &perm_key(f.relay, peer.ip()),
            &perm_val(f.client, f.server, e_perm, false),
        );
    }
    for (peer, relays_only) in [
        (f.peer, false),
        (f.relays_only, true),
        (f.no_neigh, false),
        (f.no_route, false),
    ] {
        bpf.update(
            "perm_by_client",
            &perm_client_key(f.client, f.server, peer.ip()),
            &perm_client_val(f.relay, e_perm, relays_only),
        );
    }
}

fn family_cases(f: &Family, tag: &str) -> Vec<Case> {
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let [e_out, e_in, _] = f.entries;
    let from_client =
        |payload: &[u8], ip: &Ip| frame(CLIENT_MAC, SERVER_MAC, f.client, f.server, payload, ip);
    let from_peer = |peer: SocketAddr, payload: &[u8]| {
        frame(PEER_MAC, SERVER_MAC, peer, f.relay, payload, &sent())
    };
    let to_peer =
        |data: &[u8], ip: &Ip| frame(SERVER_PEER_MAC, PEER_MAC, f.relay, f.peer, data, ip);
    let to_client = |payload: &[u8]| {
        frame(
            SERVER_MAC,
            CLIENT_MAC,
            f.server,
            f.client,
            payload,
            &written(),
        )
    };
    let data_ind = |peer: SocketAddr, data: &[u8], what: &str| {
        let data = data.to_vec();
        let (server, client) = (f.server, f.client);
        let at = 14 + if f.client.is_ipv4() { 20 } else { 40 } + 8 + 8;
        Case {
            name: leak(format!(
                "{tag} UDP peer->client without a channel -> Data indication, {what}"
            )),
            input: from_peer(peer, &data),
            action: XDP_REDIRECT,
            counts: vec![(f.entries[2], data.len() as u64)],
            output: Expect::WithTid(
                at,
                Box::new(move |tid| {
                    frame(
                        SERVER_MAC,
                        CLIENT_MAC,
                        server,
                        client,
                        &indication(0x0017, tid, peer, &data),
                        &written(),
                    )
                }),
            ),
        }
    };
    const TID: [u8; 12] = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0xff, 0x80];
    let send = |peer: SocketAddr, data: &[u8]| indication(0x0016, TID, peer, data);
    let send_case = |data: &[u8], padding: Option<u8>, what: &str| {
        let mut m = send(f.peer_other_port(), data);
        if let Some(b) = padding {
            let n = m.len();
            m[n - (4 - data.len() % 4) % 4..].fill(b);
        }
        Case {
            name: leak(format!("{tag} Send indication client->peer, {what}")),
            input: from_client(&m, &sent()),
            action: XDP_REDIRECT,
            output: Expect::Bytes(frame(
                SERVER_PEER_MAC,
                PEER_MAC,
                f.relay,
                f.peer_other_port(),
                data,
                &written(),
            )),
            counts: vec![(f.entries[2], data.len() as u64)],
        }
    };
    let data5 = b"hello";
    let data8 = b"8 bytes!";
    let data6 = [0u8, 1, 2, 3, 0xfe, 0xff];
    // A Send indication of this layout to the permitted peer (other port), relayed; the
    // IPv4 datagram has DF when the indication has DONT-FRAGMENT.
    let layout = |attrs: &[(u16, &[u8])], df: bool, what: &str| {
        let mut ip = written();
        if df && f.client.is_ipv4() {
            ip.frag = 0x4000;
        }
        Case {
            name: leak(format!("{tag} Send indication client->peer, {what}")),
            input: from_client(
                &send_with(TID, f.peer_other_port(), b"hello", 0xee, attrs),
                &sent(),
            ),
            action: XDP_REDIRECT,
            output: Expect::Bytes(frame(
                SERVER_PEER_MAC,
                PEER_MAC,
                f.relay,
                f.peer_other_port(),
                b"hello",
                &ip,
            )),
            counts: vec![(f.entries[2], 5)],
        }
    };
    let send_pass = |attrs: &[(u16, &[u8])], what: &str| {
        pass(
            leak(format!("{tag} Send indication with {what}")),
            from_client(&send_with(TID, f.peer, b"hello", 0, attrs), &sent()),
        )
    };

    let mut cases = vec![
        Case {
            name: leak(format!(
                "{tag} ChannelData client->peer, odd length unpadded"
            )),
            input: from_client(&channel_data(CHANNEL, data5, &[]), &sent()),
            action: XDP_REDIRECT,
            output: Expect::Bytes(to_peer(data5, &written())),
            counts: vec![(e_out, 5)],
        },
        Case {
            name: leak(format!(
                "{tag} ChannelData client->peer, padded to 4 (non-zero padding)"
            )),
            input: from_client(&channel_data(CHANNEL, data5, &[0xaa, 0xbb, 0xcc]), &sent()),
            action: XDP_REDIRECT,
            output: Expect::Bytes(to_peer(data5, &written())),
            counts: vec![(e_out, 5)],
        },
        Case {
            name: leak(format!("{tag} ChannelData client->peer, length 6 padded")),
            input: from_client(&channel_data(CHANNEL, &data6, &[0x55, 0x66]), &sent()),
            action: XDP_REDIRECT,
            output: Expect::Bytes(to_peer(&data6, &written())),
            counts: vec![(e_out, 6)],
        },
        Case {
            name: leak(format!("{tag} ChannelData client->peer, aligned length")),
            input: from_client(&channel_data(CHANNEL, data8, &[]), &sent()),
            action: XDP_REDIRECT,
            output: Expect::Bytes(to_peer(data8, &written())),
            counts: vec![(e_out, 8)],
        },
        Case {
            name: leak(format!("{tag} ChannelData client->peer, empty")),
            input: from_client(&channel_data(CHANNEL, &[], &[]), &sent()),
            action: XDP_REDIRECT,
            output: Expect::Bytes(to_peer(&[], &written())),
            counts: vec![(e_out, 0)],
        },
        Case {
            name: leak(format!("{tag} UDP peer->client with a channel, odd length")),
            input: from_peer(f.peer, data5),
            action: XDP_REDIRECT,
            output: Expect::Bytes(to_client(&channel_data(CHANNEL, data5, &[]))),
            counts: vec![(e_in, 5)],
        },
        Case {
            name: leak(format!("{tag} UDP peer->client with a channel, 1200 bytes")),
            input: from_peer(f.peer, &[0x5a; 1200]),
            action: XDP_REDIRECT,
            output: Expect::Bytes(to_client(&channel_data(CHANNEL, &[0x5a; 1200], &[]))),
            counts: vec![(e_in, 1200)],
        },
        pass(
            leak(format!("{tag} truncated ChannelData header")),
            from_client(&[0x40, 0x01, 0x00], &sent()),
        ),
        pass(
            leak(format!("{tag} ChannelData length beyond the datagram")),
            from_client(&channel_data(CHANNEL, data5, &[])[..8], &sent()),
        ),
        pass(
            leak(format!("{tag} ChannelData with bytes beyond its padding")),
            from_client(&channel_data(CHANNEL, data5, &[0, 0, 0, 0]), &sent()),
        ),
        pass(
            leak(format!("{tag} ChannelData with odd padding (1 of 3 bytes)")),
            from_client(&channel_data(CHANNEL, data5, &[0]), &sent()),
        ),
        pass(
            leak(format!("{tag} ChannelData padding on an aligned length")),
            from_client(&channel_data(CHANNEL, data8, &[0, 0]), &sent()),
        ),
        pass(
            leak(format!("{tag} unbound channel")),
            from_client(&channel_data(0x4abc, data5, &[]), &sent()),
        ),
        pass(
            leak(format!("{tag} ChannelData from another client port")),
            frame(
                CLIENT_MAC,
                SERVER_MAC,
                SocketAddr::new(f.client.ip(), f.client.port() + 1),
                f.server,
                &channel_data(CHANNEL, data5, &[]),
                &sent(),
            ),
        ),
        pass(
            leak(format!("{tag} channel without a permission, client->peer")),
            from_client(&channel_data(CHANNEL_UNPERMITTED, data5, &[]), &sent()),
        ),
        pass(
            leak(format!("{tag} channel without a permission, peer->client")),
            from_peer(f.unpermitted, data5),
        ),
        pass(
            leak(format!("{tag} relays-only permission, client->peer")),
            from_client(&channel_data(CHANNEL_RELAYS_ONLY, data5, &[]), &sent()),
        ),
        pass(
            leak(format!("{tag} relays-only permission, peer->client")),
            from_peer(f.relays_only, data5),
        ),
        pass(
            leak(format!(
                "{tag} ChannelData to a peer without a neighbour entry"
            )),
            from_client(
                &channel_data(CHANNEL_NO_NEIGH, data5, &[0xaa, 0xbb, 0xcc]),
                &sent(),
            ),
        ),
        pass(
            leak(format!("{tag} ChannelData to a peer without a route")),
            from_client(
                &channel_data(CHANNEL_NO_ROUTE, data5, &[0xaa, 0xbb, 0xcc]),
                &sent(),
            ),
        ),
        pass(
            leak(format!("{tag} Send indication to a peer without a route")),
            from_client(&send(f.no_route, b"hello"), &sent()),
        ),
        pass(
            leak(format!(
                "{tag} UDP peer->client with a channel, client without a neighbour entry"
            )),
            from_peer(f.lost_peer, data5),
        ),
        pass(
            leak(format!(
                "{tag} UDP peer->client without a channel, client without a neighbour entry"
            )),
            from_peer(SocketAddr::new(f.lost_peer.ip(), 9), data5),
        ),
        data_ind(f.peer_other_port(), data5, "odd length"),
        data_ind(f.peer_other_port(), data8, "aligned length"),
        data_ind(f.peer_other_port(), &[], "empty"),
        data_ind(f.peer_other_port(), &[0x33; 1201], "1201 bytes"),
        pass(
            leak(format!(
                "{tag} relays-only permission without a channel, peer->client"
            )),
            from_peer(SocketAddr::new(f.relays_only.ip(), 9), data5),
        ),
        pass(
            leak(format!("{tag} peer without a permission or channel")),
            from_peer(f.stranger, data5),
        ),
        pass(
            leak(format!("{tag} STUN Binding request")),
            from_client(&binding_request(), &sent()),
        ),
        pass(
            leak(format!("{tag} Send indication without attributes")),
            from_client(
                &{
                    let mut v = binding_request();
                    v[1] = 0x16;
                    v
                },
                &sent(),
            ),
        ),
        send_case(b"hello", None, "odd length, zero padding"),
        send_case(b"hello", Some(0xee), "odd length, non-zero padding"),
        send_case(b"8 bytes!", None, "aligned length"),
        send_case(&[], None, "empty"),
        send_case(&[0x77; 1199], None, "1199 bytes"),
        pass(
            leak(format!(
                "{tag} Send indication to a peer without a permission"
            )),
            from_client(&send(f.stranger, b"hello"), &sent()),
        ),
        pass(
            leak(format!("{tag} Send indication to a relays-only peer")),
            from_client(&send(f.relays_only, b"hello"), &sent()),
        ),
        pass(
            leak(format!(
                "{tag} Send indication, DATA longer than the message"
            )),
            {
                let mut m = send(f.peer, b"hello");
                let d = m.len() - 8 - 4;
                m[d + 2..d + 4].copy_from_slice(&9u16.to_be_bytes());
                from_client(&m, &sent())
            },
        ),
        pass(
            leak(format!("{tag} Send indication, message length mismatch")),
            {
                let mut m = send(f.peer, b"hello");
                m[2..4].copy_from_slice(&100u16.to_be_bytes());
                from_client(&m, &sent())
            },
        ),
        pass(leak(format!("{tag} Send indication without padding")), {
            let mut m = send(f.peer, b"hello");
            m.truncate(m.len() - 3);
            let len = (m.len() - 20) as u16;
            m[2..4].copy_from_slice(&len.to_be_bytes());
            from_client(&m, &sent())
        }),
        layout(
            &[(XPA, b""), (DATA, b""), (FINGERPRINT, &[0; 4])],
            false,
            "Firefox's layout",
        ),
        layout(
            &[
                (DATA, b""),
                (XPA, b""),
                (DONT_FRAGMENT, b""),
                (FINGERPRINT, &[0; 4]),
            ],
            true,
            "uclient's layout",
        ),
        layout(&[(DATA, b""), (XPA, b"")], false, "DATA first"),
        layout(
            &[(XPA, b""), (DONT_FRAGMENT, b""), (DATA, b"")],
            true,
            "DONT-FRAGMENT",
        ),
        layout(
            &[(XPA, b""), (DATA, b""), (FINGERPRINT, &[1, 2, 3, 4])],
            false,
            "a wrong FINGERPRINT (not checked)",
        ),
        send_pass(
            &[(XPA, b""), (XPA, b""), (DATA, b"")],
            "duplicate XOR-PEER-ADDRESS",
        ),
        send_pass(&[(XPA, b""), (DATA, b""), (DATA, b"")], "duplicate DATA"),
        send_pass(
            &[
                (XPA, b""),
                (DONT_FRAGMENT, b""),
                (DONT_FRAGMENT, b""),
                (DATA, b""),
            ],
            "duplicate DONT-FRAGMENT",
        ),
        send_pass(
            &[(XPA, b""), (DATA, b""), (0x8022, b"x")],
            "an unknown attribute",
        ),
        send_pass(
            &[(XPA, b""), (DONT_FRAGMENT, b"ab"), (DATA, b"")],
            "a non-empty DONT-FRAGMENT",
        ),
        send_pass(
            &[(XPA, b""), (FINGERPRINT, &[0; 4]), (DATA, b"")],
            "FINGERPRINT not last",
        ),
        send_pass(&[(DATA, b"")], "no XOR-PEER-ADDRESS"),
        send_pass(&[(XPA, b""), (DONT_FRAGMENT, b"")], "no DATA"),
        send_pass(
            &[
                (XPA, b""),
                (DONT_FRAGMENT, b""),
                (DATA, b""),
                (FINGERPRINT, &[0; 4]),
                (FINGERPRINT, &[0; 4]),
            ],
            "five attributes",
        ),
        pass(
            leak(format!("{tag} Send indication, bytes after FINGERPRINT")),
            {
                let mut m = send_with(
                    TID,
                    f.peer,
                    b"hello",
                    0,
                    &[(XPA, b""), (DATA, b""), (FINGERPRINT, &[0; 4])],
                );
                m.extend([0, 0, 0, 0]);
                let len = (m.len() - 20) as u16;
                m[2..4].copy_from_slice(&len.to_be_bytes());
                from_client(&m, &sent())
            },
        ),
        {
            let data = complete_but_looks_partial(1200, |d| {
                from_client(&channel_data(CHANNEL, d, &[]), &sent())
            });
            Case {
                name: leak(format!(
                    "{tag} ChannelData client->peer, complete checksum equal to the pseudo-header's sum"
                )),
                input: from_client(&channel_data(CHANNEL, &data, &[]), &sent()),
                action: XDP_REDIRECT,
                output: Expect::Bytes(to_peer(&data, &written())),
                counts: vec![(e_out, 1200)],
            }
        },
        {
            let data = complete_but_looks_partial(37, |d| from_peer(f.peer, d));
            Case {
                name: leak(format!(
                    "{tag} UDP peer->client, complete checksum equal to the pseudo-header's sum"
                )),
                input: from_peer(f.peer, &data),
                action: XDP_REDIRECT,
                output: Expect::Bytes(to_client(&channel_data(CHANNEL, &data, &[]))),
                counts: vec![(e_in, 37)],
            }
        },
        pass(
            leak(format!("{tag} CHECKSUM_PARTIAL ChannelData client->peer")),
            partial(from_client(&channel_data(CHANNEL, data5, &[]), &sent())),
        ),
        pass(
            leak(format!(
                "{tag} CHECKSUM_PARTIAL Send indication client->peer"
            )),
            partial(from_client(&send(f.peer, b"hello"), &sent())),
        ),
        pass(
            leak(format!(
                "{tag} CHECKSUM_PARTIAL Send indication, uclient's layout"
            )),
            partial(from_client(
                &send_with(
                    TID,
                    f.peer,
                    b"hello",
                    0,
                    &[
                        (DATA, b""),
                        (XPA, b""),
                        (DONT_FRAGMENT, b""),
                        (FINGERPRINT, &[0; 4]),
                    ],
                ),
                &sent(),
            )),
        ),
        pass(
            leak(format!(
                "{tag} CHECKSUM_PARTIAL UDP peer->client with a channel"
            )),
            partial(from_peer(f.peer, data5)),
        ),
        pass(
            leak(format!(
                "{tag} CHECKSUM_PARTIAL UDP peer->client without a channel"
            )),
            partial(from_peer(f.peer_other_port(), data5)),
        ),
        pass(leak(format!("{tag} Send request (class request)")), {
            let mut m = send(f.peer, b"hello");
            m[1] = 0x06;
            from_client(&m, &sent())
        }),
        pass(
            leak(format!("{tag} not UDP")),
            from_client(
                &channel_data(CHANNEL, data5, &[]),
                &Ip { proto: 6, ..sent() },
            ),
        ),
        {
            let mut input = from_client(&channel_data(CHANNEL, data5, &[]), &sent());
            let udp = input.len() - 8 - 9;
            input[udp + 4..udp + 6].copy_from_slice(&20u16.to_be_bytes());
            pass(leak(format!("{tag} UDP length field mismatch")), input)
        },
        {
            let mut input = from_client(&channel_data(CHANNEL, data5, &[]), &sent());
            input.extend([0; 4]);
            pass(
                leak(format!("{tag} trailing bytes after the IP packet")),
                input,
            )
        },
        {
            let mut input = from_client(&channel_data(CHANNEL, data5, &[]), &sent());
            input.truncate(input.len() - 2);
            pass(
                leak(format!("{tag} frame shorter than its IP length")),
                input,
            )
        },
    ];
    if f.client.is_ipv4() {
        cases.push(Case {
            name: "v4 ChannelData client->peer without a UDP checksum",
            input: from_client(
                &channel_data(CHANNEL, data5, &[1, 2, 3]),
                &Ip {
                    no_csum: true,
                    ..sent()
                },
            ),
            action: XDP_REDIRECT,
            output: Expect::Bytes(to_peer(
                data5,
                &Ip {
                    no_csum: true,
                    ..written()
                },
            )),
            counts: vec![(e_out, 5)],
        });
        cases.push(pass(
            "v4 fragment (MF)",
            from_client(
                &channel_data(CHANNEL, data5, &[]),
                &Ip {
                    frag: 0x2000,
                    ..sent()
                },
            ),
        ));
        cases.push(pass(
            "v4 fragment (offset)",
            from_client(
                &channel_data(CHANNEL, data5, &[]),
                &Ip {
                    frag: 0x0010,
                    ..sent()
                },
            ),
        ));
        cases.push(pass(
            "v4 IP options (IHL 6)",
            from_client(
                &channel_data(CHANNEL, data5, &[]),
                &Ip {
                    options: vec![1, 1, 1, 0],
                    ..sent()
                },
            ),
        ));
        let mut bad = from_client(&channel_data(CHANNEL, data5, &[]), &sent());
        bad[14 + 10] ^= 0x01;
        cases.push(pass("v4 bad IP header checksum", bad));
    } else {
        cases.push(pass(
            "v6 zero UDP checksum",
            from_client(
                &channel_data(CHANNEL, data5, &[]),
                &Ip {
                    no_csum: true,
                    ..sent()
                },
            ),
        ));
        cases.push(pass(
            "v6 extension header (hop-by-hop)",
            from_client(
                &channel_data(CHANNEL, data5, &[]),
                &Ip { proto: 0, ..sent() },
            ),
        ));
    }
    cases
}

// ---------------------------------------------------------------------------------------
// Client to client: the peer is a relay address of the server itself

/// Client A (the family's client, relay `Family::relay`) sends to relay addresses of the
/// server (local in the test's namespace, as 192.0.2.1 and 2001:db8::1 are), whose
/// allocations have entries for A's relays: the program turns A's frame into the one
/// client B receives.
struct C2c {
    /// A's second allocation (another client port), whose permission for the server's IP
    /// is relays-only (the peer policy denies it).
    client2: SocketAddr,
    relay2: SocketAddr,
    /// B's relay with channels for A's relays (`relay`, `relay2`) and a relays-only
    /// permission for their IP.
    relay_b: SocketAddr,
    /// B's relay with only a permission for A's relay IP (Data indications).
    relay_perm: SocketAddr,
    /// A relay with a channel for A's relay to `Family::lost_client` (whose route lookup
    /// fails: no neighbour entry).
    relay_lost: SocketAddr,
    /// A relay address of the server without entries for A's relays.
    relay_none: SocketAddr,
    /// A relay with a channel for A's relay but no permission for its IP.
    relay_noperm: SocketAddr,
    /// A relay whose channel for A's relay leads to a client of the other family.
    relay_cross: SocketAddr,
    client_b: SocketAddr,
    /// Entry ids: A's channels on `relay` and `relay2`, A's permissions on them, B's
    /// channels for `relay` and `relay2`, B's permission on `relay_perm`, the lost channel.
    entries: [u32; 8],
}

/// A's channels to the relays: `relay_b`, `relay_perm`, `relay_lost`, `relay_none`.
const C2C_B: u16 = 0x4010;
const C2C_PERM: u16 = 0x4011;
const C2C_LOST: u16 = 0x4012;
const C2C_NONE: u16 = 0x4013;
/// A's channels to `relay_noperm` and `relay_cross`.
const C2C_NOPERM: u16 = 0x4014;
const C2C_CROSS: u16 = 0x4015;
/// B's channel numbers for A's `relay` and `relay2`, and the lost channel's.
const B_CHANNEL: u16 = 0x4100;
const B_CHANNEL2: u16 = 0x4101;
const LOST_CHANNEL: u16 = 0x4102;

fn c2c_of(f: &Family) -> C2c {
    let at = |port: u16| SocketAddr::new(f.server.ip(), port);
    let base = if f.client.is_ipv4() { 41 } else { 51 };
    C2c {
        client2: SocketAddr::new(f.client.ip(), f.client.port() + 100),
        relay2: at(49180),
        relay_b: at(49181),
        relay_perm: at(49182),
        relay_lost: at(49183),
        relay_none: at(49184),
        relay_noperm: at(49185),
        relay_cross: at(49186),
        client_b: if f.client.is_ipv4() {
            sa("192.0.2.11:50010")
        } else {
            sa("[2001:db8::11]:50011")
        },
        entries: std::array::from_fn(|i| base + i as u32),
    }
}

fn install_c2c(bpf: &Loaded, f: &Family, c: &C2c) {
    let [e_a, e_a2, e_ap, e_a2p, e_b, e_b2, e_bp, e_lost] = c.entries;
    let our_ip = f.server.ip();
    for (number, relay) in [
        (C2C_B, c.relay_b),
        (C2C_PERM, c.relay_perm),
        (C2C_LOST, c.relay_lost),
        (C2C_NONE, c.relay_none),
        (C2C_NOPERM, c.relay_noperm),
        (C2C_CROSS, c.relay_cross),
    ] {
        bpf.update(
            "chan_by_client",
            &chan_client_key(f.client, f.server, number),
            &chan_client_val(f.relay, relay, e_a),
        );
    }
    bpf.update(
        "chan_by_relay",
        &chan_relay_key(c.relay_noperm, f.relay),
        &chan_relay_val(c.client_b, f.server, B_CHANNEL, e_b),
    );
    // Client B of the other family (an IPv4 relay's entry naming an IPv6 client).
    let (other_client, other_server) = if f.client.is_ipv4() {
        (sa("[2001:db8::11]:50011"), sa("[2001:db8::1]:3478"))
    } else {
        (sa("192.0.2.11:50010"), sa("192.0.2.1:3478"))
    };
    bpf.update(
        "chan_by_relay",
        &chan_relay_key(c.relay_cross, f.relay),
        &chan_relay_val(other_client, other_server, B_CHANNEL, e_b),
    );
    bpf.update(
        "perm_by_relay",
        &perm_key(c.relay_cross, our_ip),
        &perm_val(other_client, other_server, e_b, false),
    );
    for (number, relay) in [(C2C_B, c.relay_b), (C2C_NONE, c.relay_none)] {
        bpf.update(
            "chan_by_client",
            &chan_client_key(c.client2, f.server, number),
            &chan_client_val(c.relay2, relay, e_a2),
        );
    }
    for (client, relay, entry, relays_only) in [
        (f.client, f.relay, e_ap, false),
        (c.client2, c.relay2, e_a2p, true),
    ] {
        bpf.update(
            "perm_by_relay",
            &perm_key(relay, our_ip),
            &perm_val(client, f.server, entry, relays_only),
        );
        bpf.update(
            "perm_by_client",
            &perm_client_key(client, f.server, our_ip),
            &perm_client_val(relay, entry, relays_only),
        );
    }
    for (a, number, entry) in [(f.relay, B_CHANNEL, e_b), (c.relay2, B_CHANNEL2, e_b2)] {
        bpf.update(
            "chan_by_relay",
            &chan_relay_key(c.relay_b, a),
            &chan_relay_val(c.client_b, f.server, number, entry),
        );
    }
    bpf.update(
        "perm_by_relay",
        &perm_key(c.relay_b, our_ip),
        &perm_val(c.client_b, f.server, e_bp, true),
    );
    bpf.update(
        "perm_by_relay",
        &perm_key(c.relay_perm, our_ip),
        &perm_val(c.client_b, f.server, e_bp, false),
    );
    bpf.update(
        "chan_by_relay",
        &chan_relay_key(c.relay_lost, f.relay),
        &chan_relay_val(f.lost_client, f.server, LOST_CHANNEL, e_lost),
    );
    bpf.update(
        "perm_by_relay",
        &perm_key(c.relay_lost, our_ip),
        &perm_val(f.lost_client, f.server, e_lost, false),
    );
}

fn c2c_cases(f: &Family, c: &C2c, tag: &str) -> Vec<Case> {
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let [e_a, e_a2, e_ap, e_a2p, e_b, e_b2, e_bp, _] = c.entries;
    let (server, client_b) = (f.server, c.client_b);
    let from = |client: SocketAddr, payload: &[u8], ip: &Ip| {
        frame(CLIENT_MAC, SERVER_MAC, client, server, payload, ip)
    };
    let to_b =
        |payload: &[u8], ip: &Ip| frame(SERVER_MAC, CLIENT_B_MAC, server, client_b, payload, ip);
    const TID: [u8; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
    let send = |peer: SocketAddr, data: &[u8], padding: u8| {
        let mut m = indication(0x0016, TID, peer, data);
        let n = m.len();
        m[n - (4 - data.len() % 4) % 4..].fill(padding);
        m
    };
    let at = 14 + if f.client.is_ipv4() { 20 } else { 40 } + 8 + 8;
    // A Data indication to client B from A's relay (`source`).
    let data_ind = |name: String, input: Vec<u8>, source: SocketAddr, data: &[u8], a: u32| {
        let data = data.to_vec();
        Case {
            name: leak(name),
            input,
            action: XDP_REDIRECT,
            counts: vec![(a, data.len() as u64), (e_bp, data.len() as u64)],
            output: Expect::WithTid(
                at,
                Box::new(move |tid| {
                    frame(
                        SERVER_MAC,
                        CLIENT_B_MAC,
                        server,
                        client_b,
                        &indication(0x0017, tid, source, &data),
                        &written(),
                    )
                }),
            ),
        }
    };
    let cd = |name: String, input: Vec<u8>, number: u16, data: &[u8], counts: [u32; 2]| Case {
        name: leak(name),
        input,
        action: XDP_REDIRECT,
        output: Expect::Bytes(to_b(&channel_data(number, data, &[]), &written())),
        counts: counts.iter().map(|&e| (e, data.len() as u64)).collect(),
    };
    let data5 = b"hello";
    let big = [0x5au8; 1200];
    let mut cases = vec![
        cd(
            format!("{tag} client to client: ChannelData -> B's channel, unpadded"),
            from(f.client, &channel_data(C2C_B, data5, &[]), &sent()),
            B_CHANNEL,
            data5,
            [e_a, e_b],
        ),
        cd(
            format!("{tag} client to client: ChannelData -> B's channel, padded (non-zero)"),
            from(
                f.client,
                &channel_data(C2C_B, data5, &[0xaa, 0xbb, 0xcc]),
                &sent(),
            ),
            B_CHANNEL,
            data5,
            [e_a, e_b],
        ),
        cd(
            format!("{tag} client to client: ChannelData -> B's channel, 1200 bytes"),
            from(f.client, &channel_data(C2C_B, &big, &[]), &sent()),
            B_CHANNEL,
            &big,
            [e_a, e_b],
        ),
        data_ind(
            format!("{tag} client to client: ChannelData -> B's permission, padded (non-zero)"),
            from(
                f.client,
                &channel_data(C2C_PERM, data5, &[0xaa, 0xbb, 0xcc]),
                &sent(),
            ),
            f.relay,
            data5,
            e_a,
        ),
        data_ind(
            format!("{tag} client to client: ChannelData -> B's permission, unpadded"),
            from(f.client, &channel_data(C2C_PERM, data5, &[]), &sent()),
            f.relay,
            data5,
            e_a,
        ),
        data_ind(
            format!("{tag} client to client: ChannelData -> B's permission, aligned"),
            from(f.client, &channel_data(C2C_PERM, b"8 bytes!", &[]), &sent()),
            f.relay,
            b"8 bytes!",
            e_a,
        ),
        cd(
            format!("{tag} client to client: Send indication -> B's channel"),
            from(f.client, &send(c.relay_b, data5, 0xee), &sent()),
            B_CHANNEL,
            data5,
            [e_ap, e_b],
        ),
        data_ind(
            format!("{tag} client to client: Send indication -> B's permission"),
            from(f.client, &send(c.relay_perm, data5, 0xee), &sent()),
            f.relay,
            data5,
            e_ap,
        ),
        data_ind(
            format!("{tag} client to client: Send indication -> B's permission, empty"),
            from(f.client, &send(c.relay_perm, &[], 0), &sent()),
            f.relay,
            &[],
            e_ap,
        ),
        cd(
            format!("{tag} client to client: Send indication, Firefox's layout -> B's channel"),
            from(
                f.client,
                &send_with(
                    TID,
                    c.relay_b,
                    data5,
                    0xee,
                    &[(XPA, b""), (DATA, b""), (FINGERPRINT, &[0; 4])],
                ),
                &sent(),
            ),
            B_CHANNEL,
            data5,
            [e_ap, e_b],
        ),
        cd(
            format!("{tag} client to client: Send indication, uclient's layout -> B's channel"),
            from(
                f.client,
                &send_with(
                    TID,
                    c.relay_b,
                    data5,
                    0xee,
                    &[
                        (DATA, b""),
                        (XPA, b""),
                        (DONT_FRAGMENT, b""),
                        (FINGERPRINT, &[0; 4]),
                    ],
                ),
                &sent(),
            ),
            B_CHANNEL,
            data5,
            [e_ap, e_b],
        ),
        data_ind(
            format!("{tag} client to client: Send indication, uclient's layout -> B's permission"),
            from(
                f.client,
                &send_with(
                    TID,
                    c.relay_perm,
                    data5,
                    0xee,
                    &[
                        (DATA, b""),
                        (XPA, b""),
                        (DONT_FRAGMENT, b""),
                        (FINGERPRINT, &[0; 4]),
                    ],
                ),
                &sent(),
            ),
            f.relay,
            data5,
            e_ap,
        ),
        data_ind(
            format!(
                "{tag} client to client: Send indication, DATA first, 1200 bytes -> B's permission"
            ),
            from(
                f.client,
                &send_with(TID, c.relay_perm, &big, 0, &[(DATA, b""), (XPA, b"")]),
                &sent(),
            ),
            f.relay,
            &big,
            e_ap,
        ),
        pass(
            leak(format!(
                "{tag} client to client: CHECKSUM_PARTIAL ChannelData"
            )),
            partial(from(f.client, &channel_data(C2C_B, data5, &[]), &sent())),
        ),
        pass(
            leak(format!(
                "{tag} client to client: CHECKSUM_PARTIAL Send indication"
            )),
            partial(from(
                f.client,
                &send_with(
                    TID,
                    c.relay_b,
                    data5,
                    0,
                    &[
                        (DATA, b""),
                        (XPA, b""),
                        (DONT_FRAGMENT, b""),
                        (FINGERPRINT, &[0; 4]),
                    ],
                ),
                &sent(),
            )),
        ),
        cd(
            format!("{tag} client to client: relays-only permission, ChannelData -> B's channel"),
            from(c.client2, &channel_data(C2C_B, data5, &[]), &sent()),
            B_CHANNEL2,
            data5,
            [e_a2, e_b2],
        ),
        cd(
            format!("{tag} client to client: relays-only permission, Send -> B's channel"),
            from(c.client2, &send(c.relay_b, data5, 0), &sent()),
            B_CHANNEL2,
            data5,
            [e_a2p, e_b2],
        ),
        pass(
            leak(format!(
                "{tag} relays-only permission, ChannelData to a relay without an entry"
            )),
            from(c.client2, &channel_data(C2C_NONE, data5, &[]), &sent()),
        ),
        pass(
            leak(format!(
                "{tag} relays-only permission, Send to a relay without an entry"
            )),
            from(c.client2, &send(c.relay_none, data5, 0), &sent()),
        ),
        pass(
            leak(format!(
                "{tag} ChannelData to a local address without an entry"
            )),
            from(
                f.client,
                &channel_data(C2C_NONE, data5, &[1, 2, 3]),
                &sent(),
            ),
        ),
        pass(
            leak(format!(
                "{tag} client to client, B's channel without B's permission"
            )),
            from(f.client, &channel_data(C2C_NOPERM, data5, &[]), &sent()),
        ),
        pass(
            leak(format!(
                "{tag} client to client, B's client of the other family"
            )),
            from(f.client, &channel_data(C2C_CROSS, data5, &[]), &sent()),
        ),
        pass(
            leak(format!(
                "{tag} client to client, B's client without a neighbour entry"
            )),
            from(
                f.client,
                &channel_data(C2C_LOST, data5, &[1, 2, 3]),
                &sent(),
            ),
        ),
        pass(
            leak(format!(
                "{tag} client to client, Send, B's client without a neighbour entry"
            )),
            from(f.client, &send(c.relay_lost, data5, 0xee), &sent()),
        ),
    ];
    if f.client.is_ipv4() {
        let none = Ip {
            no_csum: true,
            ..sent()
        };
        cases.push(Case {
            name: "v4 client to client without a UDP checksum",
            input: from(f.client, &channel_data(C2C_B, data5, &[9, 9, 9]), &none),
            action: XDP_REDIRECT,
            output: Expect::Bytes(to_b(
                &channel_data(B_CHANNEL, data5, &[]),
                &Ip {
                    no_csum: true,
                    ..written()
                },
            )),
            counts: vec![(e_a, 5), (e_b, 5)],
        });
    }
    cases
}

#[test]
fn xdp_relay_program_table() {
    let bpf = Loaded::new();
    let (f4, f6) = (v4(), v6());
    install(&bpf, &f4);
    install(&bpf, &f6);
    // Cross-family: an IPv4 client whose relay and peer are IPv6 (userspace relays it).
    bpf.update(
        "chan_by_client",
        &chan_client_key(f4.client, f4.server, CHANNEL_CROSS),
        &chan_client_val(f6.relay, f6.peer, 7),
    );
    bpf.update(
        "chan_by_relay",
        &chan_relay_key(f6.relay, sa("[2001:db8:1::a]:40001")),
        &chan_relay_val(f4.client, f4.server, CHANNEL_CROSS, 8),
    );
    bpf.update(
        "perm_by_relay",
        &perm_key(f6.relay, "2001:db8:1::a".parse().unwrap()),
        &perm_val(f4.client, f4.server, 9, false),
    );

    let (c4, c6) = (c2c_of(&f4), c2c_of(&f6));
    install_c2c(&bpf, &f4, &c4);
    install_c2c(&bpf, &f6, &c6);

    let mut cases = family_cases(&f4, "v4");
    cases.extend(family_cases(&f6, "v6"));
    cases.extend(c2c_cases(&f4, &c4, "v4"));
    cases.extend(c2c_cases(&f6, &c6, "v6"));
    cases.push(pass(
        "cross-family channel, client->peer",
        frame(
            CLIENT_MAC,
            SERVER_MAC,
            f4.client,
            f4.server,
            &channel_data(CHANNEL_CROSS, b"hello", &[]),
            &sent(),
        ),
    ));
    cases.push(pass(
        "cross-family channel, peer->client",
        frame(
            PEER_MAC,
            SERVER_MAC,
            sa("[2001:db8:1::a]:40001"),
            f6.relay,
            b"hello",
            &sent(),
        ),
    ));
    cases.push(pass(
        "cross-family Send indication (IPv4 client, IPv6 peer)",
        frame(
            CLIENT_MAC,
            SERVER_MAC,
            f4.client,
            f4.server,
            &indication(0x0016, [1; 12], f6.peer, b"hello"),
            &sent(),
        ),
    ));
    cases.push(pass("ARP", {
        let mut v = SERVER_MAC.to_vec();
        v.extend(CLIENT_MAC);
        v.extend([0x08, 0x06]);
        v.extend([0u8; 28]);
        v
    }));
    cases.push(pass("truncated IPv4 header", {
        let mut v = SERVER_MAC.to_vec();
        v.extend(CLIENT_MAC);
        v.extend([0x08, 0x00, 0x45, 0x00, 0x00, 0x1c]);
        v
    }));

    let mut failures = Vec::new();
    let mut expected_counts = std::collections::BTreeMap::<u32, (u64, u64)>::new();
    for case in &cases {
        let (action, output, _) = bpf.run(&case.input, 1);
        let want = match &case.output {
            Expect::Unchanged => case.input.clone(),
            Expect::Bytes(b) => b.clone(),
            Expect::WithTid(at, make) => {
                let tid = output
                    .get(*at..*at + 12)
                    .map(|t| t.try_into().unwrap())
                    .unwrap_or([0; 12]);
                make(tid)
            }
        };
        if action != case.action || output != want {
            failures.push(format!(
                "{}: action {action} (want {}),\n  output {}\n  want   {}",
                case.name,
                case.action,
                hex(&output),
                hex(&want)
            ));
        }
        for &(entry, bytes) in &case.counts {
            let c = expected_counts.entry(entry).or_default();
            c.0 += 1;
            c.1 += bytes;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    for entry in (1..=9).chain(c4.entries).chain(c6.entries) {
        let want = expected_counts.get(&entry).copied().unwrap_or((0, 0));
        assert_eq!(bpf.counter(entry), want, "counters of entry {entry}");
    }
    eprintln!("{} cases as expected", cases.len());

    // Data indications get a fresh transaction id each.
    let input = frame(
        PEER_MAC,
        SERVER_MAC,
        f4.peer_other_port(),
        f4.relay,
        b"hello",
        &sent(),
    );
    let tid = |out: Vec<u8>| out[14 + 20 + 8 + 8..14 + 20 + 8 + 20].to_vec();
    let tids: std::collections::BTreeSet<_> = (0..4).map(|_| tid(bpf.run(&input, 1).1)).collect();
    assert_eq!(tids.len(), 4, "transaction ids repeat: {tids:?}");

    // Time per path. BPF_PROG_TEST_RUN repeats on the same buffer, so a rewriting path
    // would see its own output from the second run on. A loop of entries makes each
    // output the next input: ChannelData C->S becomes UDP R->P, which (an entry of the
    // loop's own) becomes ChannelData C->S again, so every run rewrites, alternating the
    // two paths; the counters prove it.
    for (v6, c, s, r, p) in [
        (
            false,
            "10.9.0.1:50000",
            "10.9.0.2:3478",
            "10.9.0.2:49200",
            "10.9.0.3:40000",
        ),
        (
            true,
            "[2001:db8:9::1]:50000",
            "[2001:db8:9::2]:3478",
            "[2001:db8:9::2]:49200",
            "[2001:db8:9::3]:40000",
        ),
    ] {
        let (c, s, r, p) = (sa(c), sa(s), sa(r), sa(p));
        let (to_peer, to_client) = if v6 { (12, 13) } else { (10, 11) };
        bpf.update(
            "chan_by_client",
            &chan_client_key(c, s, CHANNEL),
            &chan_client_val(r, p, to_peer),
        );
        bpf.update(
            "perm_by_relay",
            &perm_key(r, p.ip()),
            &perm_val(c, s, 20, false),
        );
        bpf.update(
            "chan_by_relay",
            &chan_relay_key(p, r),
            &chan_relay_val(s, c, CHANNEL, to_client),
        );
        bpf.update(
            "perm_by_relay",
            &perm_key(p, r.ip()),
            &perm_val(s, c, 20, false),
        );
        let input = frame(
            CLIENT_MAC,
            SERVER_MAC,
            c,
            s,
            &channel_data(CHANNEL, &[0x5a; 1200], &[]),
            &sent(),
        );
        let (action, _, ns) = bpf.run(&input, 1000);
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(bpf.counter(to_peer), (500, 500 * 1200), "client->peer runs");
        assert_eq!(
            bpf.counter(to_client),
            (500, 500 * 1200),
            "peer->client runs"
        );
        let family = if v6 { "IPv6" } else { "IPv4" };
        eprintln!(
            "{family}: {ns}ns per packet (repeat 1000, 1200-byte data, alternating \
             ChannelData->UDP and UDP->ChannelData)"
        );
    }
    // Client to client: ChannelData C -> S on A's channel to P (a local address: a relay
    // of the server) becomes ChannelData from B's server address to B's client. B's
    // entry names C as its server and S as its client, so the output is the input again
    // and every run takes the client-to-client path, counting on both entries.
    for (v6, c, s, r, p) in [
        (
            false,
            "10.9.0.1:50100",
            "10.9.0.2:3479",
            "10.9.0.2:49300",
            "10.9.0.4:49301",
        ),
        (
            true,
            "[2001:db8:9::1]:50100",
            "[2001:db8:9::2]:3479",
            "[2001:db8:9::2]:49300",
            "[2001:db8:9::4]:49301",
        ),
    ] {
        let (c, s, r, p) = (sa(c), sa(s), sa(r), sa(p));
        let (a, b) = if v6 { (16, 17) } else { (14, 15) };
        bpf.update(
            "chan_by_client",
            &chan_client_key(c, s, CHANNEL),
            &chan_client_val(r, p, a),
        );
        bpf.update(
            "perm_by_relay",
            &perm_key(r, p.ip()),
            &perm_val(c, s, 20, false),
        );
        bpf.update(
            "chan_by_relay",
            &chan_relay_key(p, r),
            &chan_relay_val(s, c, CHANNEL, b),
        );
        bpf.update(
            "perm_by_relay",
            &perm_key(p, r.ip()),
            &perm_val(s, c, 20, false),
        );
        let input = frame(
            CLIENT_MAC,
            SERVER_MAC,
            c,
            s,
            &channel_data(CHANNEL, &[0x5a; 1200], &[]),
            &sent(),
        );
        let (action, _, ns) = bpf.run(&input, 1000);
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(bpf.counter(a), (1000, 1000 * 1200), "sender's entry");
        assert_eq!(bpf.counter(b), (1000, 1000 * 1200), "receiver's entry");
        let family = if v6 { "IPv6" } else { "IPv4" };
        eprintln!(
            "{family}: {ns}ns per packet (repeat 1000, 1200-byte data, client to client: \
             ChannelData -> ChannelData)"
        );
    }
    let stun = frame(
        CLIENT_MAC,
        SERVER_MAC,
        f4.client,
        f4.server,
        &binding_request(),
        &sent(),
    );
    let (action, _, ns) = bpf.run(&stun, 1000);
    assert_eq!(action, XDP_PASS);
    eprintln!("IPv4 STUN request passed up: {ns}ns per packet (repeat 1000)");
    let dir = bpf.dir.clone();
    drop(bpf);
    assert!(!dir.exists(), "pins left in {dir:?}");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
