//! `[relay]`: the addresses relay sockets bind to and advertise, the port range, socket buffers.

use std::net::{IpAddr, Ipv4Addr};

use serde::Deserialize;
use toml::Table;

use super::errors::{read_section, Errors};
use super::units::{ip_list, parse_port_range, parse_size, StringOrList};

/// Default relay port range (RFC 8656 3.: the range 49152-65535 is recommended).
pub const DEFAULT_PORT_MIN: u16 = 49152;
/// Upper end of the default relay port range.
pub const DEFAULT_PORT_MAX: u16 = 65535;
/// Default `[relay] socket_buffer`: 4 MiB.
pub const DEFAULT_SOCKET_BUFFER: usize = 4 << 20;

/// `[relay]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelaySection {
    /// Addresses relay sockets bind to: at most one IPv4 and one IPv6 (`address`).
    pub addresses: Vec<IpAddr>,
    /// Addresses advertised in XOR-RELAYED-ADDRESS instead, at most one per family, each of a
    /// family that `addresses` has (`external_address`, for 1:1 NAT such as cloud instances).
    pub external_addresses: Vec<IpAddr>,
    pub port_min: u16,
    pub port_max: u16,
    /// Receive and send buffer asked for on every UDP socket (`socket_buffer`, e.g.
    /// "4MiB"); the kernel caps it at net.core.rmem_max / wmem_max.
    pub socket_buffer: usize,
}

impl Default for RelaySection {
    /// Defaults of the optional keys; `addresses` is empty and must be set.
    fn default() -> Self {
        RelaySection {
            addresses: Vec::new(),
            external_addresses: Vec::new(),
            port_min: DEFAULT_PORT_MIN,
            port_max: DEFAULT_PORT_MAX,
            socket_buffer: DEFAULT_SOCKET_BUFFER,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawRelay {
    address: Option<StringOrList>,
    external_address: Option<StringOrList>,
    ports: Option<String>,
    socket_buffer: Option<String>,
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
        relay.external_addresses = ip_list(raw.external_address, "relay.external_address", errors);
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
}
