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

use std::collections::HashMap;
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

/// The addresses of the interfaces the program must see: every listen and relay IP.
/// An unspecified address (0.0.0.0, ::) stands for every interface with an address.
fn interfaces(config: &Config) -> Result<Vec<String>, String> {
    let mut want: Vec<IpAddr> = config.listen.iter().map(|l| l.address.ip()).collect();
    want.extend(config.relay.addresses.iter().copied());
    let any = want.iter().any(IpAddr::is_unspecified);
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| format!("cannot list interfaces: {e}"))?;
    let mut names = Vec::new();
    for ifa in addrs {
        let ip = ifa.address.as_ref().and_then(|a| {
            a.as_sockaddr_in()
                .map(|s| IpAddr::V4(s.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
        });
        let Some(ip) = ip else { continue };
        if (any || want.contains(&ip)) && !names.contains(&ifa.interface_name) {
            names.push(ifa.interface_name);
        }
    }
    if names.is_empty() {
        return Err("no interface holds the listen and relay addresses".to_owned());
    }
    Ok(names)
}

/// Why the fast path cannot be had in this build, if so.
pub fn built_without() -> Option<&'static str> {
    if cfg!(turnstone_bpf) {
        None
    } else {
        Some("unavailable (built without clang)")
    }
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
    /// Loads the program and attaches it (generic mode) to the interfaces that hold
    /// `config`'s listen and relay addresses. The maps start empty.
    pub fn load(config: &Config) -> Result<Kernel, String> {
        if let Some(why) = built_without() {
            return Err(why.to_owned());
        }
        let interfaces = interfaces(config)?;
        let mut ebpf = aya::Ebpf::load(object()).map_err(|e| format!("cannot load: {e}"))?;
        let prog: &mut aya::programs::Xdp = ebpf
            .programs_mut()
            .find_map(|(_, p)| p.try_into().ok())
            .ok_or("the object has no XDP program")?;
        prog.load()
            .map_err(|e| format!("the kernel refused the program: {e}"))?;
        let mut links = Vec::new();
        for name in &interfaces {
            let link = prog
                .attach(name, aya::programs::XdpMode::Skb)
                .map_err(|e| format!("cannot attach to {name}: {e}"))?;
            links.push(link);
        }
        Ok(Kernel {
            chan_by_client: take(&mut ebpf, "chan_by_client")?,
            chan_by_relay: take(&mut ebpf, "chan_by_relay")?,
            perm_by_relay: take(&mut ebpf, "perm_by_relay")?,
            perm_by_client: take(&mut ebpf, "perm_by_client")?,
            counters: take(&mut ebpf, "counters")?,
            ebpf,
            links,
            ids: Ids::default(),
            usage: HashMap::new(),
            interfaces,
            refused: 0,
        })
    }

    /// The attached interfaces where the program's route lookups (bpf_fib_lookup, which
    /// checks the ingress interface's forwarding setting) fail for the families of
    /// `config`'s listen and relay addresses: relayed packets arriving there go up to
    /// userspace.
    pub fn forwarding_off(&self, config: &Config) -> Vec<String> {
        let mut ips: Vec<IpAddr> = config.listen.iter().map(|l| l.address.ip()).collect();
        ips.extend(config.relay.addresses.iter().copied());
        let (v4, v6) = (
            ips.iter().any(IpAddr::is_ipv4),
            ips.iter().any(IpAddr::is_ipv6),
        );
        let on = |path: String| std::fs::read_to_string(path).is_ok_and(|v| v.trim() != "0");
        self.interfaces
            .iter()
            .filter(|i| {
                (v4 && !on(format!("/proc/sys/net/ipv4/conf/{i}/forwarding")))
                    || (v6 && !on(format!("/proc/sys/net/ipv6/conf/{i}/forwarding")))
            })
            .cloned()
            .collect()
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

    /// What the kernel relayed for `allocation` (packets and bytes to the peer, then to
    /// the client), taken out: call when its usage record is written, after its entries
    /// were removed.
    pub fn take_usage(&mut self, allocation: u64) -> Option<[u64; 4]> {
        self.usage.remove(&allocation)
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
        self.read_counters(metrics);
        if let Some(prog) = self
            .ebpf
            .programs_mut()
            .find_map(|(_, p)| <&mut aya::programs::Xdp>::try_from(p).ok())
        {
            for link in self.links.drain(..) {
                let _ = prog.detach(link);
            }
        }
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
