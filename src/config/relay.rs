//! `[relay]`: the addresses relay sockets bind to and advertise, the port range, socket buffers, permission and channel lifetimes, the kernel fast path.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use serde::Deserialize;
use toml::Table;

use super::errors::{read_section, ConfigError, Errors};
use super::units::{
    duration_or, ip_list, parse_port_range, parse_size, string_elements, DurationText, StringOrList,
};
use toml::Value;

/// Default relay port range (RFC 8656 3.: the range 49152-65535 is recommended).
pub const DEFAULT_PORT_MIN: u16 = 49152;
/// Upper end of the default relay port range.
pub const DEFAULT_PORT_MAX: u16 = 65535;
/// Default `[relay] socket_buffer`: 4 MiB.
pub const DEFAULT_SOCKET_BUFFER: usize = 4 << 20;
/// Default and maximum `[relay] permission_lifetime` (RFC 8656 section 9: 300 s).
pub const MAX_PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
/// Default and maximum `[relay] channel_lifetime` (RFC 8656 section 12: 10 minutes).
pub const MAX_CHANNEL_LIFETIME: Duration = Duration::from_secs(600);

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const MAX_INTERFACE_NAME: usize = 15;

/// `relay.kernel_fast_path`: relay UDP allocations' traffic in the kernel (XDP).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KernelFastPath {
    /// Never load the XDP program.
    Off,
    /// Use it where it loads and attaches; otherwise log why not once and relay in
    /// userspace (the default).
    #[default]
    Auto,
    /// Refuse to start unless it loads and attaches.
    Required,
}

impl KernelFastPath {
    /// The value as written in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            KernelFastPath::Off => "off",
            KernelFastPath::Auto => "auto",
            KernelFastPath::Required => "required",
        }
    }
}

/// `[relay]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelaySection {
    /// Addresses relay sockets bind to: at most one IPv4 and one IPv6 (`address`).
    pub addresses: Vec<IpAddr>,
    /// Addresses advertised in XOR-RELAYED-ADDRESS instead, at most one per family, each of a
    /// family that `addresses` has (`external_address`, for 1:1 NAT such as cloud instances).
    pub external_addresses: Vec<IpAddr>,
    /// `external_address = "auto"`: the server asks the STUN servers of `discover_with`
    /// for its public address at start and on reload, and advertises what they report.
    pub external_auto: bool,
    /// STUN servers asked when `external_auto` (`discover_with`, `stun:HOST[:PORT]`), as
    /// (host, port).
    pub discover_with: Vec<(String, u16)>,
    pub port_min: u16,
    pub port_max: u16,
    /// Receive and send buffer asked for on every UDP socket (`socket_buffer`, e.g.
    /// "4MiB"); the kernel caps it at net.core.rmem_max / wmem_max.
    pub socket_buffer: usize,
    /// How long a permission lasts (`permission_lifetime`, 1 s to the RFC's 300 s; shorter
    /// than the RFC only for tests and special deployments).
    pub permission_lifetime: Duration,
    /// How long a channel binding lasts (`channel_lifetime`, 1 s to the RFC's 600 s).
    pub channel_lifetime: Duration,
    /// Relay UDP allocations in the kernel with the XDP program (bpf/relay.c).
    pub kernel_fast_path: KernelFastPath,
    /// The interfaces to attach the fast path to (`fast_path_interfaces`); `None`: the
    /// interfaces that hold the listen and relay addresses. Whether they exist is checked
    /// when the program is loaded.
    pub fast_path_interfaces: Option<Vec<String>>,
}

impl Default for RelaySection {
    /// Defaults of the optional keys; `addresses` is empty and must be set.
    fn default() -> Self {
        RelaySection {
            addresses: Vec::new(),
            external_addresses: Vec::new(),
            external_auto: false,
            discover_with: Vec::new(),
            port_min: DEFAULT_PORT_MIN,
            port_max: DEFAULT_PORT_MAX,
            socket_buffer: DEFAULT_SOCKET_BUFFER,
            permission_lifetime: MAX_PERMISSION_LIFETIME,
            channel_lifetime: MAX_CHANNEL_LIFETIME,
            kernel_fast_path: KernelFastPath::Auto,
            fast_path_interfaces: None,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawRelay {
    address: Option<StringOrList>,
    external_address: Option<StringOrList>,
    discover_with: Option<Vec<Value>>,
    ports: Option<String>,
    socket_buffer: Option<String>,
    permission_lifetime: Option<DurationText>,
    channel_lifetime: Option<DurationText>,
    kernel_fast_path: Option<String>,
    fast_path_interfaces: Option<Vec<Value>>,
}

impl RelaySection {
    /// The relay address of the given family (`ipv6 == true`: IPv6), if configured.
    pub fn address_for_family(&self, ipv6: bool) -> Option<IpAddr> {
        self.addresses.iter().copied().find(|a| a.is_ipv6() == ipv6)
    }

    /// The address to advertise for a relay socket bound to `relay`: the external address of
    /// the same family if configured, else `relay` itself.
    pub fn advertised(&self, relay: IpAddr) -> IpAddr {
        self.external_addresses
            .iter()
            .copied()
            .find(|a| a.is_ipv6() == relay.is_ipv6())
            .unwrap_or(relay)
    }

    /// Number of ports in the relay range.
    pub fn port_count(&self) -> usize {
        usize::from(self.port_max.saturating_sub(self.port_min)) + 1
    }

    /// Reads `[relay]` (required) from the top-level table.
    pub(super) fn load(top: &Table, errors: &mut Errors) -> Self {
        let mut relay = RelaySection::default();
        let Some(raw) = read_section::<RawRelay>(top, "relay", errors) else {
            errors.push(
                "relay",
                "missing section [relay] (it needs at least address)",
            );
            return relay;
        };
        relay.addresses = ip_list(raw.address, "relay.address", errors);
        match raw.external_address {
            Some(StringOrList::One(s)) if s == "auto" => relay.external_auto = true,
            other => {
                relay.external_addresses = ip_list(other, "relay.external_address", errors);
            }
        }
        let servers = raw.discover_with.unwrap_or_default();
        for (key, text) in string_elements(&servers, "relay.discover_with", "a STUN URL", errors) {
            match parse_stun_url(text) {
                Ok(server) => relay.discover_with.push(server),
                Err(e) => errors.push(&key, e),
            }
        }
        if let Some(ports) = raw.ports {
            match parse_port_range(&ports) {
                Ok((lo, hi)) => {
                    relay.port_min = lo;
                    relay.port_max = hi;
                }
                Err(e) => errors.push("relay.ports", e),
            }
        }
        if let Some(size) = raw.socket_buffer {
            match parse_size(&size) {
                Ok(n) if (4096..=1 << 30).contains(&n) => relay.socket_buffer = n,
                Ok(_) => errors.push(
                    "relay.socket_buffer",
                    format!("{size:?} is out of range (4KiB to 1GiB)"),
                ),
                Err(e) => errors.push("relay.socket_buffer", e),
            }
        }
        for (raw, key, max, field) in [
            (
                raw.permission_lifetime,
                "relay.permission_lifetime",
                MAX_PERMISSION_LIFETIME,
                &mut relay.permission_lifetime,
            ),
            (
                raw.channel_lifetime,
                "relay.channel_lifetime",
                MAX_CHANNEL_LIFETIME,
                &mut relay.channel_lifetime,
            ),
        ] {
            let d = duration_or(raw, max, key, errors);
            if d < Duration::from_secs(1) || d > max {
                let max = humantime::format_duration(max);
                let msg = format!("must be at least 1s and at most {max} (RFC 8656)");
                errors.push(key, msg);
            } else {
                *field = d;
            }
        }
        relay.kernel_fast_path = match raw.kernel_fast_path.as_deref() {
            None | Some("auto") => KernelFastPath::Auto,
            Some("off") => KernelFastPath::Off,
            Some("required") => KernelFastPath::Required,
            Some(other) => {
                errors.push(
                    "relay.kernel_fast_path",
                    format!("{other:?} is not one of \"auto\", \"required\", \"off\""),
                );
                KernelFastPath::Auto
            }
        };
        if let Some(names) = raw.fast_path_interfaces {
            relay.fast_path_interfaces = Some(interface_names(&names, errors));
        }
        relay
    }

    pub(super) fn check(&self, errors: &mut Errors) {
        if self.addresses.is_empty() && !errors.has_at_or_under("relay") {
            errors.push(
                "relay.address",
                "missing; name the interface address relay sockets bind to, such as \"203.0.113.10\" or [\"203.0.113.10\", \"2001:db8::10\"]",
            );
        }
        for family_v6 in [false, true] {
            let n = self
                .addresses
                .iter()
                .filter(|a| a.is_ipv6() == family_v6)
                .count();
            if n > 1 {
                errors.push(
                    "relay.address",
                    format!(
                        "more than one {} address; give at most one IPv4 and one IPv6 address",
                        if family_v6 { "IPv6" } else { "IPv4" }
                    ),
                );
            }
            let n = self
                .external_addresses
                .iter()
                .filter(|a| a.is_ipv6() == family_v6)
                .count();
            if n > 1 {
                errors.push(
                    "relay.external_address",
                    format!(
                        "more than one {} address; give at most one per family",
                        if family_v6 { "IPv6" } else { "IPv4" }
                    ),
                );
            }
        }
        for a in &self.addresses {
            if a.is_unspecified() {
                errors.push(
                    "relay.address",
                    format!("{a} is unspecified; name the interface address relay sockets bind to (it is also what clients are told, unless external_address is set)"),
                );
            } else if a.is_multicast() || *a == IpAddr::V4(Ipv4Addr::BROADCAST) {
                errors.push("relay.address", format!("{a} is not a unicast address"));
            }
        }
        for a in &self.external_addresses {
            if a.is_unspecified() || a.is_multicast() || *a == IpAddr::V4(Ipv4Addr::BROADCAST) {
                errors.push(
                    "relay.external_address",
                    format!("{a} is not a unicast address"),
                );
            } else if !self.addresses.iter().any(|r| r.is_ipv6() == a.is_ipv6()) {
                errors.push(
                    "relay.external_address",
                    format!("{a} has no relay address of the same family in relay.address"),
                );
            }
        }
        if self.external_auto && self.discover_with.is_empty() && !errors.has_at_or_under("relay") {
            errors.push(
                "relay.discover_with",
                "external_address = \"auto\" needs STUN servers to ask, such as [\"stun:stun.example.net:3478\"] (there is no default: choose servers you trust to report your address)",
            );
        }
        if !self.external_auto && !self.discover_with.is_empty() {
            errors.push(
                "relay.discover_with",
                "is used only with external_address = \"auto\"",
            );
        }
        if self
            .fast_path_interfaces
            .as_ref()
            .is_some_and(|names| names.is_empty())
            && !errors.has_at_or_under("relay.fast_path_interfaces")
        {
            errors.push(
                "relay.fast_path_interfaces",
                "empty; name the interfaces to attach the kernel fast path to, such as [\"eth0\"], or leave the key out to use those holding the listen and relay addresses",
            );
        }
        if self.port_min == 0 || self.port_min > self.port_max {
            errors.push(
                "relay.ports",
                format!(
                    "\"{}-{}\" is not a range LOW-HIGH with LOW <= HIGH (ports 1-65535)",
                    self.port_min, self.port_max
                ),
            );
        }
    }

    /// Problems that do not stop the server: a relay address that clients outside this
    /// network cannot reach (private, CGNAT or link-local) with no `external_address` of
    /// its family to advertise instead.
    pub(super) fn warnings(&self, out: &mut Vec<ConfigError>) {
        if self.external_auto {
            return;
        }
        for a in &self.addresses {
            let advertised = self.advertised(*a);
            if let Some(range) = unreachable_from_outside(advertised) {
                out.push(ConfigError::new(
                    "relay.address",
                    format!(
                        "{a} is a {range} address and no relay.external_address of its family is set: clients outside this network would be told a relay address they cannot reach; set external_address to the public address (or \"auto\" with discover_with), unless every client is on this network"
                    ),
                ));
            }
        }
    }
}

/// `relay.fast_path_interfaces`: interface names, each well formed and given once (whether
/// they exist is checked when the program is loaded, not here).
fn interface_names(values: &[Value], errors: &mut Errors) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (key, name) in string_elements(
        values,
        "relay.fast_path_interfaces",
        "an interface name",
        errors,
    ) {
        if name.is_empty()
            || name.len() > MAX_INTERFACE_NAME
            || name == "."
            || name == ".."
            || name
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
        {
            errors.push(
                &key,
                format!("{name:?} is not an interface name (1 to {MAX_INTERFACE_NAME} characters, no '/', ':' or spaces), such as \"eth0\""),
            );
        } else if let Some(j) = out.iter().position(|n| n == name) {
            errors.push(
                &key,
                format!("{name:?} is a duplicate of relay.fast_path_interfaces[{j}]"),
            );
        } else {
            out.push(name.to_owned());
        }
    }
    out
}

/// The kind of address `ip` is, if clients on the Internet cannot reach it: private
/// (RFC 1918, IPv6 unique local), shared (CGNAT, RFC 6598) or link-local.
pub fn unreachable_from_outside(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            if v4.is_private() {
                Some("private")
            } else if a == 100 && (64..128).contains(&b) {
                Some("CGNAT (100.64.0.0/10)")
            } else if v4.is_link_local() {
                Some("link-local")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            if first & 0xfe00 == 0xfc00 {
                Some("unique local (private)")
            } else if first & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else {
                v6.to_ipv4_mapped()
                    .and_then(|v4| unreachable_from_outside(IpAddr::V4(v4)))
            }
        }
    }
}

/// `stun:HOST[:PORT]` (RFC 7064; port 3478 by default; an IPv6 host in brackets) as
/// (host, port).
fn parse_stun_url(text: &str) -> Result<(String, u16), String> {
    let bad = || {
        format!(
            "{text:?} is not a STUN URL stun:HOST[:PORT], such as \"stun:stun.example.net:3478\""
        )
    };
    let rest = text.strip_prefix("stun:").ok_or_else(bad)?;
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(bad)?;
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':').ok_or_else(bad)?)),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() || host.contains(['/', '?', '@', ' ']) {
        return Err(bad());
    }
    let port = match port {
        None => 3478,
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?,
    };
    Ok((host.to_string(), port))
}
