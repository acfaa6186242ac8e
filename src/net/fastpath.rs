//! The kernel fast path's loader: loads bpf/relay.c's XDP program, applies the core's `FastPathCommand`s to its maps and reads its counters.
//
// One `Kernel` per process, behind a mutex in `Common`: each worker locks it only when
// its core queued commands (requests and ticks, never per relayed packet), so every
// entry keeps its one writer (the worker that owns the allocation). The maps are made
// fresh by the load, so the core's `Clear` is applied once, here, before any worker
// serves; the workers skip theirs. The program is attached in generic (SKB) mode, which
// works on every interface (veth and lo included) at some cost over native mode.
//
// Entry ids index the per-CPU `counters` array: one id per map entry (each direction of
// a channel, each of a permission), so what the kernel relayed is known by direction
// and framing and read into `turnstone_relayed_kernel_*`.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use crate::config::Config;
use crate::counters::{Direction, RelayPath};
use crate::metrics::Metrics;
use crate::server::{
    ClientChannelKey, ClientPermissionKey, FastPathCommand, RelayPeerKey, RelayPermissionKey,
};

/// Entries per map and ids in `counters` (bpf/relay.c's MAX_ENTRIES).
const MAX_ENTRIES: u32 = 65536;

/// One map entry, by its key, for its counter id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum EntryKey {
    ChanClient(ClientChannelKey),
    ChanRelay(RelayPeerKey),
    PermRelay(RelayPermissionKey),
    PermClient(ClientPermissionKey),
}

impl EntryKey {
    fn kind(&self) -> (Direction, RelayPath) {
        match self {
            EntryKey::ChanClient(_) => (Direction::ToPeer, RelayPath::Channel),
            EntryKey::ChanRelay(_) => (Direction::ToClient, RelayPath::Channel),
            EntryKey::PermRelay(_) => (Direction::ToClient, RelayPath::Indication),
            EntryKey::PermClient(_) => (Direction::ToPeer, RelayPath::Indication),
        }
    }
}

/// A counter id in use: its entry's allocation and kind, and the (packets, bytes)
/// already reported.
struct Used {
    allocation: u64,
    kind: (Direction, RelayPath),
    seen: [u64; 2],
}

/// Counter ids: which entry holds which, and the count already reported for each.
#[derive(Default)]
struct Ids {
    by_key: HashMap<EntryKey, u32>,
    used: HashMap<u32, Used>,
    free: Vec<u32>,
    next: u32,
}

/// 16 bytes: IPv6 as is, IPv4 as IPv4-mapped (bpf/relay.c's address layout).
fn addr16(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

/// Appends bytes to a fixed-size map key or value.
struct Put<const N: usize> {
    b: [u8; N],
    at: usize,
}

impl<const N: usize> Put<N> {
    fn new() -> Self {
        Put { b: [0; N], at: 0 }
    }
    fn put(mut self, bytes: &[u8]) -> Self {
        if let Some(dst) = self.b.get_mut(self.at..self.at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
        self.at += bytes.len();
        self
    }
    fn ip(self, a: IpAddr) -> Self {
        self.put(&addr16(a))
    }
    fn port(self, a: SocketAddr) -> Self {
        self.put(&a.port().to_be_bytes())
    }
    fn be16(self, v: u16) -> Self {
        self.put(&v.to_be_bytes())
    }
    fn ne32(self, v: u32) -> Self {
        self.put(&v.to_ne_bytes())
    }
    fn done(self) -> [u8; N] {
        debug_assert_eq!(self.at, N);
        self.b
    }
}

fn chan_client_key(k: &ClientChannelKey) -> [u8; 40] {
    Put::new()
        .ip(k.client.ip())
        .ip(k.server.ip())
        .port(k.client)
        .port(k.server)
        .be16(k.number)
        .be16(0)
        .done()
}

fn chan_relay_key(k: &RelayPeerKey) -> [u8; 36] {
    Put::new()
        .ip(k.relay.ip())
        .ip(k.peer.ip())
        .port(k.relay)
        .port(k.peer)
        .done()
}

fn perm_relay_key(k: &RelayPermissionKey) -> [u8; 36] {
    Put::new()
        .ip(k.relay.ip())
        .ip(k.peer_ip)
        .port(k.relay)
        .be16(0)
        .done()
}

fn perm_client_key(k: &ClientPermissionKey) -> [u8; 52] {
    Put::new()
        .ip(k.client.ip())
        .ip(k.server.ip())
        .ip(k.peer_ip)
        .port(k.client)
        .port(k.server)
        .done()
}

/// Why the fast path is not used: the one reason the start log and `turnstone
/// check-config` give, with the underlying error where there is one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotUsed {
    /// Every interface it would attach to is a loopback interface.
    LoopbackOnly,
    /// This binary was built without clang (build.rs): it has no program to load.
    BuiltWithoutClang,
    /// No CAP_BPF / CAP_NET_ADMIN (or a seccomp filter or LSM said no).
    Permission { uid: u32, error: String },
    /// The kernel lacks BPF, XDP, BPF links or a helper the program calls.
    KernelTooOld { release: String, error: String },
    /// Another XDP program (or link) holds the interface: another turnstone, perhaps.
    Busy { interface: String, error: String },
    /// The interfaces cannot be listed or found.
    Interfaces(String),
    /// Anything else (the verifier rejected the program, a map is missing...).
    Other(String),
}

impl std::fmt::Display for NotUsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotUsed::LoopbackOnly => f.write_str("loopback only"),
            NotUsed::BuiltWithoutClang => f.write_str(
                "built without clang (install clang and libbpf-dev and rebuild turnstone)",
            ),
            NotUsed::Permission { uid, error } => write!(
                f,
                "needs CAP_BPF and CAP_NET_ADMIN (running as uid {uid}): {error}"
            ),
            NotUsed::KernelTooOld { release, error } => write!(
                f,
                "kernel too old or without XDP/BPF support (kernel {release}): {error}"
            ),
            NotUsed::Busy { interface, error } => write!(
                f,
                "another XDP program is attached to {interface} (another turnstone?): {error}"
            ),
            NotUsed::Interfaces(e) | NotUsed::Other(e) => f.write_str(e),
        }
    }
}

/// The running kernel's release, for messages.
fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".to_owned(), |r| r.trim().to_owned())
}

/// (major, minor) of a kernel release such as "6.18.4-generic".
fn release_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// This process's effective uid and whether its effective capabilities allow loading
/// and attaching (CAP_NET_ADMIN, and CAP_BPF or CAP_SYS_ADMIN), from /proc/self/status.
/// CAP_PERFMON is not needed: bpf/relay.c passes the verifier's checks for a loader
/// without it (no packet pointer subtraction, no branch-dependent pointer offsets).
fn privileges() -> (u32, Result<(), String>) {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_default()
            .to_owned()
    };
    let uid = field("Uid:")
        .split_whitespace()
        .nth(1)
        .and_then(|u| u.parse().ok())
        .unwrap_or(u32::MAX);
    let Ok(caps) = u64::from_str_radix(&field("CapEff:"), 16) else {
        // Unknown: let the kernel decide.
        return (uid, Ok(()));
    };
    let has = |bit: u32| caps & (1 << bit) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if missing.is_empty() {
        (uid, Ok(()))
    } else {
        (
            uid,
            Err(format!(
                "the process's effective capabilities ({caps:#x}) lack {}",
                missing.join(" and ")
            )),
        )
    }
}

/// An error and its sources, joined, cut to a length that fits a log line (a verifier
/// log can be long).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    const MAX: usize = 400;
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    // A verifier log ends with its reason: keep the end.
    let (head, log) = match text.split_once("Verifier output:") {
        Some((head, log)) => (format!("{head}Verifier output (end):"), log),
        None => (String::new(), text.as_str()),
    };
    let n = log.chars().count();
    if n <= MAX {
        return format!("{head}{log}");
    }
    if head.is_empty() {
        let cut: String = log.chars().take(MAX).collect();
        format!("{cut}...")
    } else {
        let tail: String = log.chars().skip(n - MAX).collect();
        format!("{head} ...{tail}")
    }
}

/// The first OS error number in `e`'s chain.
fn errno(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut at = Some(e);
    while let Some(e) = at {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(n) = io.raw_os_error() {
                return Some(n);
            }
        }
        at = e.source();
    }
    None
}

const EPERM: i32 = nix::errno::Errno::EPERM as i32;
const EACCES: i32 = nix::errno::Errno::EACCES as i32;
const EBUSY: i32 = nix::errno::Errno::EBUSY as i32;
const EEXIST: i32 = nix::errno::Errno::EEXIST as i32;
const EINVAL: i32 = nix::errno::Errno::EINVAL as i32;
const ENOSYS: i32 = nix::errno::Errno::ENOSYS as i32;
const EOPNOTSUPP: i32 = nix::errno::Errno::EOPNOTSUPP as i32;
const ENODEV: i32 = nix::errno::Errno::ENODEV as i32;

/// Sorts a load or attach failure into its reason; `interface`: the one being attached.
fn classify(e: &(dyn std::error::Error + 'static), interface: Option<&str>) -> NotUsed {
    let error = chain(e);
    let verifier_log = error.contains("Verifier output (end):")
        && !error.trim_end().ends_with("Verifier output (end):");
    let old_helper = [
        "unknown func",
        "invalid func",
        "cannot call",
        "unknown opcode",
    ]
    .iter()
    .any(|w| error.contains(w));
    match errno(e) {
        Some(EBUSY | EEXIST) if interface.is_some() => NotUsed::Busy {
            interface: interface.unwrap_or_default().to_owned(),
            error,
        },
        Some(EPERM) => NotUsed::Permission {
            uid: privileges().0,
            error,
        },
        // The verifier says EACCES too; then it is about privileges only if the process
        // lacks a capability it needs.
        Some(EACCES) if !verifier_log || privileges().1.is_err() => NotUsed::Permission {
            uid: privileges().0,
            error,
        },
        _ if old_helper => NotUsed::KernelTooOld {
            release: kernel_release(),
            error,
        },
        Some(EINVAL | ENOSYS | EOPNOTSUPP) if !verifier_log => NotUsed::KernelTooOld {
            release: kernel_release(),
            error,
        },
        Some(ENODEV) => NotUsed::Interfaces(error),
        _ if verifier_log => NotUsed::Other(format!(
            "the kernel's verifier refused the program: {error}"
        )),
        _ => NotUsed::Other(error),
    }
}

/// Is `name` a loopback interface (IFF_LOOPBACK in /sys/class/net/NAME/flags, or "lo")?
fn is_loopback_name(name: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{name}/flags"))
        .ok()
        .and_then(|f| u32::from_str_radix(f.trim().trim_start_matches("0x"), 16).ok())
        .map_or(name == "lo", |flags| flags & 0x8 != 0)
}

/// Where the program would attach for `config`, without loading anything:
/// `relay.fast_path_interfaces` (each must exist), else the interfaces that hold the
/// listen and relay addresses (an unspecified address, 0.0.0.0 or ::, stands for every
/// interface with an address), loopback interfaces left out. [`NotUsed::LoopbackOnly`]
/// when they are all loopback.
pub fn plan(config: &Config) -> Result<Vec<String>, NotUsed> {
    if let Some(names) = &config.relay.fast_path_interfaces {
        if names.iter().all(|n| is_loopback_name(n)) {
            return Err(NotUsed::LoopbackOnly);
        }
        for name in names {
            if nix::net::if_::if_nametoindex(name.as_str()).is_err() {
                return Err(NotUsed::Interfaces(format!(
                    "relay.fast_path_interfaces: there is no interface {name:?} here"
                )));
            }
        }
        return Ok(names.clone());
    }
    let mut want: Vec<IpAddr> = config.listen.iter().map(|l| l.address.ip()).collect();
    want.extend(config.relay.addresses.iter().copied());
    if want.iter().all(IpAddr::is_loopback) {
        return Err(NotUsed::LoopbackOnly);
    }
    let any = want.iter().any(IpAddr::is_unspecified);
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| {
        NotUsed::Interfaces(format!(
            "cannot list interfaces (getifaddrs, a netlink socket: systemd's RestrictAddressFamilies= needs AF_NETLINK): {e}"
        ))
    })?;
    let mut names = Vec::new();
    let mut loopback = Vec::new();
    for ifa in addrs {
        let ip = ifa.address.as_ref().and_then(|a| {
            a.as_sockaddr_in()
                .map(|s| IpAddr::V4(s.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
        });
        let Some(ip) = ip else { continue };
        if (any || want.contains(&ip)) && !names.contains(&ifa.interface_name) {
            if ifa
                .flags
                .contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK)
            {
                loopback.push(ifa.interface_name.clone());
            }
            names.push(ifa.interface_name);
        }
    }
    if names.is_empty() {
        return Err(NotUsed::Interfaces(
            "no interface holds the listen and relay addresses (name them in relay.fast_path_interfaces)"
                .to_owned(),
        ));
    }
    if names.len() == loopback.len() {
        return Err(NotUsed::LoopbackOnly);
    }
    // Loopback traffic never needs the program (nor would its route lookups help).
    names.retain(|n| !loopback.contains(n));
    Ok(names)
}

/// The interfaces among `interfaces`, each with the families concerned ("eth0 (IPv6)"),
/// where the program's route lookups (bpf_fib_lookup,
/// which checks the ingress interface's forwarding setting) fail for the families of
/// `config`'s listen and relay addresses: relayed packets arriving there go up to
/// userspace.
pub fn forwarding_off(config: &Config, interfaces: &[String]) -> Vec<String> {
    let mut ips: Vec<IpAddr> = config.listen.iter().map(|l| l.address.ip()).collect();
    ips.extend(config.relay.addresses.iter().copied());
    let (v4, v6) = (
        ips.iter().any(IpAddr::is_ipv4),
        ips.iter().any(IpAddr::is_ipv6),
    );
    // Unreadable (systemd's ProcSubset=pid hides /proc/sys): not known to be off.
    let off = |path: String| std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "0");
    interfaces
        .iter()
        .filter_map(|i| {
            let off4 = v4 && off(format!("/proc/sys/net/ipv4/conf/{i}/forwarding"));
            let off6 = v6 && off(format!("/proc/sys/net/ipv6/conf/{i}/forwarding"));
            match (off4, off6) {
                (true, true) => Some(format!("{i} (IPv4, IPv6)")),
                (true, false) => Some(format!("{i} (IPv4)")),
                (false, true) => Some(format!("{i} (IPv6)")),
                (false, false) => None,
            }
        })
        .collect()
}

/// Why the fast path cannot be had in this build, if so.
pub fn built_without() -> Option<NotUsed> {
    if cfg!(turnstone_bpf) {
        None
    } else {
        Some(NotUsed::BuiltWithoutClang)
    }
}

/// What `turnstone check-config` says of the kernel fast path, without loading anything:
/// the mode, whether this build has it, and where it would attach (or why not).
pub fn check_config_lines(config: &Config) -> Vec<String> {
    use crate::config::KernelFastPath;
    let mode = config.relay.kernel_fast_path;
    let build = match built_without() {
        None => "this build has it".to_owned(),
        Some(why) => format!("this build lacks it: {why}"),
    };
    let mut lines = vec![format!(
        "kernel fast path: relay.kernel_fast_path = \"{}\"; {build}",
        mode.as_str()
    )];
    if mode == KernelFastPath::Off {
        lines.push("kernel fast path: off; every allocation relays in userspace".to_owned());
        return lines;
    }
    let refuse = if mode == KernelFastPath::Required {
        "; \"required\" would refuse to start"
    } else {
        "; allocations would relay in userspace"
    };
    match plan(config) {
        Ok(interfaces) => {
            let mut line = format!(
                "kernel fast path: would attach to {} (generic XDP)",
                interfaces.join(", ")
            );
            let off = forwarding_off(config, &interfaces);
            if !off.is_empty() {
                line.push_str(&format!(
                    "; IP forwarding is off on {} (sysctl net.ipv4.conf.IF.forwarding, net.ipv6.conf.IF.forwarding): packets arriving there would relay in userspace",
                    off.join(", ")
                ));
            }
            if let Some(why) = built_without() {
                line = format!("kernel fast path: would not be used: {why}{refuse}");
            }
            lines.push(line);
        }
        Err(why) => lines.push(format!(
            "kernel fast path: would not be used: {why}{refuse}"
        )),
    }
    lines
}

#[cfg(turnstone_bpf)]
fn object() -> &'static [u8] {
    include_bytes!(env!("TURNSTONE_BPF_OBJECT"))
}

#[cfg(not(turnstone_bpf))]
fn object() -> &'static [u8] {
    &[]
}

type Map<K, V> = aya::maps::HashMap<aya::maps::MapData, K, V>;

/// The loaded program, its attachments and maps.
pub struct Kernel {
    ebpf: aya::Ebpf,
    links: Vec<aya::programs::xdp::XdpLinkId>,
    chan_by_client: Map<[u8; 40], [u8; 40]>,
    chan_by_relay: Map<[u8; 36], [u8; 44]>,
    perm_by_relay: Map<[u8; 36], [u8; 44]>,
    perm_by_client: Map<[u8; 52], [u8; 28]>,
    counters: aya::maps::PerCpuArray<aya::maps::MapData, [u64; 2]>,
    ids: Ids,
    /// What the kernel relayed for each allocation, until its usage record takes it:
    /// packets and bytes to the peer, packets and bytes to the client.
    usage: HashMap<u64, [u64; 4]>,
    /// The interfaces the program is attached to.
    pub interfaces: Vec<String>,
    /// Map writes the kernel refused (a full map): those entries stay in userspace.
    pub refused: u64,
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut aya::Ebpf,
    name: &str,
) -> Result<T, String> {
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| format!("the object has no map {name}"))?;
    T::try_from(map).map_err(|e| format!("map {name}: {e}"))
}

impl Kernel {
    /// Loads the program and attaches it (generic mode) to the interfaces of [`plan`].
    /// The maps start empty; they are this process's own (made by this load), so another
    /// turnstone never shares them. The attachments are BPF links owned by this process's
    /// file descriptors: they go when it exits, however it exits.
    pub fn load(config: &Config) -> Result<Kernel, NotUsed> {
        let mut k = Kernel::prepare(config)?;
        k.attach()?;
        Ok(k)
    }

    /// [`Kernel::load`] without attaching: the program loaded (verified) and its maps
    /// made. An upgrade's new process does this before the old one lets go of its own
    /// attachment, so that only [`Kernel::attach`] (milliseconds) falls within the
    /// hand-over's pause.
    pub fn prepare(config: &Config) -> Result<Kernel, NotUsed> {
        if let Some(why) = built_without() {
            return Err(why);
        }
        let interfaces = plan(config)?;
        let (uid, privileged) = privileges();
        if let Err(error) = privileged {
            return Err(NotUsed::Permission { uid, error });
        }
        // Before 5.9 XDP has no BPF links and aya attaches with netlink, which outlives
        // the process (a crash would leave the program attached) and lets a second
        // turnstone replace the first one's program: refuse rather than risk either.
        let release = kernel_release();
        if let Some(version) = release_version(&release) {
            if version < (5, 9) {
                return Err(NotUsed::KernelTooOld {
                    release,
                    error: "XDP links (which detach when the process exits) need Linux 5.9"
                        .to_owned(),
                });
            }
        }
        let mut ebpf = aya::Ebpf::load(object()).map_err(|e| classify(&e, None))?;
        let prog: &mut aya::programs::Xdp = ebpf
            .programs_mut()
            .find_map(|(_, p)| p.try_into().ok())
            .ok_or_else(|| NotUsed::Other("the object has no XDP program".to_owned()))?;
        prog.load().map_err(|e| classify(&e, None))?;
        let other = NotUsed::Other;
        Ok(Kernel {
            chan_by_client: take(&mut ebpf, "chan_by_client").map_err(other)?,
            chan_by_relay: take(&mut ebpf, "chan_by_relay").map_err(other)?,
            perm_by_relay: take(&mut ebpf, "perm_by_relay").map_err(other)?,
            perm_by_client: take(&mut ebpf, "perm_by_client").map_err(other)?,
            counters: take(&mut ebpf, "counters").map_err(other)?,
            ebpf,
            links: Vec::new(),
            ids: Ids::default(),
            usage: HashMap::new(),
            interfaces,
            refused: 0,
        })
    }

    /// Attaches the prepared program (generic mode) to every interface of the plan; on
    /// an error, what was attached is detached again.
    pub fn attach(&mut self) -> Result<(), NotUsed> {
        let Some(prog) = self
            .ebpf
            .programs_mut()
            .find_map(|(_, p)| <&mut aya::programs::Xdp>::try_from(p).ok())
        else {
            return Err(NotUsed::Other("the object has no XDP program".to_owned()));
        };
        let mut links = Vec::new();
        for name in &self.interfaces {
            match prog.attach(name, aya::programs::XdpMode::Skb) {
                Ok(link) => links.push(link),
                Err(e) => {
                    for link in links {
                        let _ = prog.detach(link);
                    }
                    return Err(match classify(&e, Some(name)) {
                        NotUsed::Other(e) => {
                            NotUsed::Other(format!("cannot attach to {name}: {e}"))
                        }
                        why => why,
                    });
                }
            }
        }
        self.links = links;
        Ok(())
    }

    /// The counter id of `key`'s entry, taken now if it has none (`None`: all taken).
    fn id(&mut self, key: EntryKey, allocation: u64) -> Option<u32> {
        if let Some(&id) = self.ids.by_key.get(&key) {
            return Some(id);
        }
        let id = match self.ids.free.pop() {
            Some(id) => id,
            None if self.ids.next < MAX_ENTRIES => {
                self.ids.next += 1;
                self.ids.next - 1
            }
            None => return None,
        };
        // A reused id's counter goes on from where it stopped: start from there.
        let seen = self.read(id);
        self.ids.by_key.insert(key, id);
        self.ids.used.insert(
            id,
            Used {
                allocation,
                kind: key.kind(),
                seen,
            },
        );
        Some(id)
    }

    /// (packets, bytes) of counter `id`, summed over the CPUs.
    fn read(&self, id: u32) -> [u64; 2] {
        self.counters.get(&id, 0).map_or([0, 0], |v| {
            v.iter().fold([0, 0], |[p, b], c| {
                [p.wrapping_add(c[0]), b.wrapping_add(c[1])]
            })
        })
    }

    /// Frees `key`'s counter id after adding its last counts to `metrics`.
    fn release(&mut self, key: EntryKey, metrics: &Metrics) {
        if let Some(id) = self.ids.by_key.remove(&key) {
            self.report(id, metrics);
            self.ids.used.remove(&id);
            self.ids.free.push(id);
        }
    }

    fn report(&mut self, id: u32, metrics: &Metrics) {
        let now = self.read(id);
        if let Some(Used {
            allocation,
            kind: (d, p),
            seen,
        }) = self.ids.used.get_mut(&id)
        {
            let packets = now[0].wrapping_sub(seen[0]);
            let bytes = now[1].wrapping_sub(seen[1]);
            *seen = now;
            if packets > 0 || bytes > 0 {
                metrics.kernel_relayed(*d, *p, packets, bytes);
                let u = self.usage.entry(*allocation).or_default();
                let at = if *d == Direction::ToPeer { 0 } else { 2 };
                if let Some(v) = u.get_mut(at) {
                    *v += packets;
                }
                if let Some(v) = u.get_mut(at + 1) {
                    *v += bytes;
                }
            }
        }
    }

    /// What [`Kernel::take_usage`] would give now, left in place (for the fd store's
    /// journal: a crash must not lose what the kernel relayed).
    pub fn peek_usage(&self, allocation: u64) -> Option<[u64; 4]> {
        self.usage.get(&allocation).copied()
    }

    /// What the kernel relayed for `allocation` (packets and bytes to the peer, then to
    /// the client), taken out: call when its usage record is written, after its entries
    /// were removed.
    pub fn take_usage(&mut self, allocation: u64) -> Option<[u64; 4]> {
        self.usage.remove(&allocation)
    }

    /// What the kernel relayed for each of `allocations` (packets and bytes to the peer,
    /// then to the client) since the last call or since its entries were installed, for
    /// their interim usage records. Non-destructive: the entries, their counter ids and
    /// the allocations' accounts stay, so the counts go on and the final record's
    /// [`Kernel::take_usage`] carries only the remainder. The allocations' live counters
    /// are read first (one walk of the id table, then one lookup per entry of theirs),
    /// so the figures are current, not as of the last [`Kernel::read_counters`].
    pub fn usage_since_last_read(
        &mut self,
        allocations: &[u64],
        metrics: &Metrics,
    ) -> Vec<[u64; 4]> {
        let wanted: HashSet<u64> = allocations.iter().copied().collect();
        let ids: Vec<u32> = self
            .ids
            .used
            .iter()
            .filter(|(_, u)| wanted.contains(&u.allocation))
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            self.report(id, metrics);
        }
        allocations
            .iter()
            .map(|a| {
                self.usage
                    .get_mut(a)
                    .map(std::mem::take)
                    .unwrap_or_default()
            })
            .collect()
    }

    /// Adds what the kernel relayed since the last call to `metrics`.
    pub fn read_counters(&mut self, metrics: &Metrics) {
        let ids: Vec<u32> = self.ids.used.keys().copied().collect();
        for id in ids {
            self.report(id, metrics);
        }
    }

    /// Applies one of the core's commands. `Clear` is a no-op: the maps are this
    /// process's own, made empty by [`Kernel::load`].
    pub fn apply(&mut self, cmd: &FastPathCommand, metrics: &Metrics) {
        let ok = match cmd {
            FastPathCommand::Clear => true,
            FastPathCommand::InstallChannel(e) => {
                let (ck, rk) = (e.client_key(), e.relay_key());
                match (
                    self.id(EntryKey::ChanClient(ck), e.allocation),
                    self.id(EntryKey::ChanRelay(rk), e.allocation),
                ) {
                    (Some(a), Some(b)) => {
                        let v1: [u8; 40] = Put::new()
                            .ip(e.relay.ip())
                            .ip(e.peer.ip())
                            .port(e.relay)
                            .port(e.peer)
                            .ne32(a)
                            .done();
                        let v2: [u8; 44] = Put::new()
                            .ip(e.client.ip())
                            .ip(e.server.ip())
                            .port(e.client)
                            .port(e.server)
                            .be16(e.number)
                            .be16(0)
                            .ne32(b)
                            .done();
                        self.chan_by_client
                            .insert(chan_client_key(&ck), v1, 0)
                            .and_then(|()| self.chan_by_relay.insert(chan_relay_key(&rk), v2, 0))
                            .is_ok()
                    }
                    _ => false,
                }
            }
            FastPathCommand::RemoveChannel(e) => {
                let (ck, rk) = (e.client_key(), e.relay_key());
                let _ = self.chan_by_client.remove(&chan_client_key(&ck));
                let _ = self.chan_by_relay.remove(&chan_relay_key(&rk));
                self.release(EntryKey::ChanClient(ck), metrics);
                self.release(EntryKey::ChanRelay(rk), metrics);
                true
            }
            FastPathCommand::InstallPermission(e) => {
                let (ck, rk) = (e.client_key(), e.relay_key());
                let flags = u32::from(e.relays_only);
                match (
                    self.id(EntryKey::PermRelay(rk), e.allocation),
                    self.id(EntryKey::PermClient(ck), e.allocation),
                ) {
                    (Some(a), Some(b)) => {
                        let v1: [u8; 44] = Put::new()
                            .ip(e.client.ip())
                            .ip(e.server.ip())
                            .port(e.client)
                            .port(e.server)
                            .ne32(a)
                            .ne32(flags)
                            .done();
                        let v2: [u8; 28] = Put::new()
                            .ip(e.relay.ip())
                            .port(e.relay)
                            .be16(0)
                            .ne32(b)
                            .ne32(flags)
                            .done();
                        self.perm_by_relay
                            .insert(perm_relay_key(&rk), v1, 0)
                            .and_then(|()| self.perm_by_client.insert(perm_client_key(&ck), v2, 0))
                            .is_ok()
                    }
                    _ => false,
                }
            }
            FastPathCommand::RemovePermission(e) => {
                let (ck, rk) = (e.client_key(), e.relay_key());
                let _ = self.perm_by_relay.remove(&perm_relay_key(&rk));
                let _ = self.perm_by_client.remove(&perm_client_key(&ck));
                self.release(EntryKey::PermRelay(rk), metrics);
                self.release(EntryKey::PermClient(ck), metrics);
                true
            }
        };
        if !ok {
            self.refused += 1;
            if self.refused.is_power_of_two() {
                tracing::warn!(
                    refused = self.refused,
                    "kernel fast path: maps full; further entries stay in userspace"
                );
            }
        }
    }

    /// Entries in the four maps now (for tests and logs).
    pub fn entries(&self) -> usize {
        self.chan_by_client.keys().count()
            + self.chan_by_relay.keys().count()
            + self.perm_by_relay.keys().count()
            + self.perm_by_client.keys().count()
    }

    /// Detaches the program from every interface and empties the maps (shutdown).
    pub fn shutdown(&mut self, metrics: &Metrics) {
        if let Some(prog) = self
            .ebpf
            .programs_mut()
            .find_map(|(_, p)| <&mut aya::programs::Xdp>::try_from(p).ok())
        {
            for link in self.links.drain(..) {
                let _ = prog.detach(link);
            }
        }
        // Read once detached: what the program relayed until then is counted (read
        // before, the packets it relayed between the read and the detach were lost to
        // the metrics and to the allocations' usage).
        self.read_counters(metrics);
        let keys: Vec<_> = self.chan_by_client.keys().flatten().collect();
        for k in keys {
            let _ = self.chan_by_client.remove(&k);
        }
        let keys: Vec<_> = self.chan_by_relay.keys().flatten().collect();
        for k in keys {
            let _ = self.chan_by_relay.remove(&k);
        }
        let keys: Vec<_> = self.perm_by_relay.keys().flatten().collect();
        for k in keys {
            let _ = self.perm_by_relay.remove(&k);
        }
        let keys: Vec<_> = self.perm_by_client.keys().flatten().collect();
        for k in keys {
            let _ = self.perm_by_client.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_and_error_chains() {
        assert_eq!(release_version("6.18.44-fc-v1252"), Some((6, 18)));
        assert_eq!(release_version("5.4.0-150-generic"), Some((5, 4)));
        assert_eq!(release_version("unknown"), None);
        let busy = aya::programs::ProgramError::SyscallError(aya::sys::SyscallError {
            call: "bpf_link_create",
            io_error: std::io::Error::from_raw_os_error(EBUSY),
        });
        let why = classify(&busy, Some("eth0"));
        assert!(matches!(&why, NotUsed::Busy { interface, .. } if interface == "eth0"));
        let text = why.to_string();
        assert!(
            text.starts_with("another XDP program is attached to eth0 (another turnstone?): ")
                && text.contains("bpf_link_create")
                && text.contains("os error 16"),
            "{text}"
        );
        let denied = aya::programs::ProgramError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_create",
            io_error: std::io::Error::from_raw_os_error(EPERM),
        });
        let text = classify(&denied, None).to_string();
        assert!(
            text.starts_with("needs CAP_BPF and CAP_NET_ADMIN (running as uid ")
                && text.contains("os error 1"),
            "{text}"
        );
        // As aya's LoadError shows it: the errno as source, the verifier log in the text.
        #[derive(Debug)]
        struct Load(std::io::Error, &'static str);
        impl std::fmt::Display for Load {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(
                    f,
                    "the BPF_PROG_LOAD syscall returned {}. Verifier output: {}",
                    self.0, self.1
                )
            }
        }
        impl std::error::Error for Load {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let old = Load(
            std::io::Error::from_raw_os_error(EINVAL),
            "0: (85) call bpf_fib_lookup#69\nunknown func bpf_fib_lookup#69",
        );
        let text = classify(&old, None).to_string();
        assert!(
            text.starts_with("kernel too old or without XDP/BPF support (kernel ")
                && text.contains("unknown func"),
            "{text}"
        );
        assert_eq!(NotUsed::LoopbackOnly.to_string(), "loopback only");
        assert!(NotUsed::BuiltWithoutClang
            .to_string()
            .starts_with("built without clang"));
    }

    #[test]
    fn keys_are_laid_out_as_in_relay_c() {
        let client: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let server: SocketAddr = "192.0.2.2:3478".parse().unwrap();
        let k = chan_client_key(&ClientChannelKey {
            client,
            server,
            number: 0x4001,
        });
        assert_eq!(&k[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(&k[12..16], &[192, 0, 2, 1]);
        assert_eq!(&k[28..32], &[192, 0, 2, 2]);
        assert_eq!(&k[32..], &[0x13, 0x88, 0x0d, 0x96, 0x40, 0x01, 0, 0]);
        let p = perm_client_key(&ClientPermissionKey {
            client,
            server,
            peer_ip: "2001:db8::1".parse().unwrap(),
        });
        assert_eq!(&p[32..34], &[0x20, 0x01]);
        assert_eq!(&p[48..], &[0x13, 0x88, 0x0d, 0x96]);
    }
}
