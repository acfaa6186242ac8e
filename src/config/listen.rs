//! `[[listen]]`: the transports and addresses the server listens on.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;

use ipnet::IpNet;
use serde::Deserialize;
use toml::{Table, Value};

use super::errors::{index, join, shape, Errors};
use super::units::{net_list, parse_socket_addr};

/// Transport of a `[[listen]]` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenTransport {
    Udp,
    Tcp,
    Tls,
}

impl ListenTransport {
    /// The configuration spelling: "udp", "tcp", "tls".
    pub fn as_str(self) -> &'static str {
        match self {
            ListenTransport::Udp => "udp",
            ListenTransport::Tcp => "tcp",
            ListenTransport::Tls => "tls",
        }
    }

    /// TCP and TLS listeners both use a TCP socket.
    pub fn is_stream(self) -> bool {
        !matches!(self, ListenTransport::Udp)
    }
}

impl fmt::Display for ListenTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `[[listen]]` entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Listen {
    pub transport: ListenTransport,
    pub address: SocketAddr,
    /// Connections must start with a PROXY protocol header (v1 or v2) that gives the
    /// client's address (tcp and tls only).
    pub proxy_protocol: bool,
    /// The load balancers allowed to connect when `proxy_protocol` is on; connections
    /// from elsewhere are closed. Required with it.
    pub proxy_from: Vec<IpNet>,
}

impl Listen {
    /// A listener without the PROXY protocol.
    pub fn new(transport: ListenTransport, address: SocketAddr) -> Listen {
        Listen {
            transport,
            address,
            proxy_protocol: false,
            proxy_from: Vec::new(),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawListen {
    transport: Option<ListenTransport>,
    address: Option<String>,
    proxy_protocol: Option<bool>,
    proxy_from: Option<Vec<Value>>,
}

/// Reads the `[[listen]]` entries from the top-level table; an entry with a problem is left out.
pub(super) fn load(top: &Table, errors: &mut Errors) -> Vec<Listen> {
    let mut listen = Vec::new();
    match top.get("listen") {
        None => {}
        Some(Value::Array(entries)) => {
            for (i, entry) in entries.iter().enumerate() {
                let path = index("listen", i);
                let Some(t) = entry.as_table() else {
                    errors.push(
                        &path,
                        format!("expected a table, found {}", entry.type_str()),
                    );
                    continue;
                };
                let raw: RawListen = shape(t, &path, errors);
                let transport = match raw.transport {
                    Some(tr) => Some(tr),
                    None => {
                        errors.push(
                            &join(&path, "transport"),
                            "missing; one of \"udp\", \"tcp\", \"tls\"",
                        );
                        None
                    }
                };
                let address = match raw.address {
                    Some(a) => match parse_socket_addr(&a) {
                        Ok(a) => Some(a),
                        Err(e) => {
                            errors.push(&join(&path, "address"), e);
                            None
                        }
                    },
                    None => {
                        errors.push(&join(&path, "address"), "missing; such as \"0.0.0.0:3478\"");
                        None
                    }
                };
                let proxy_from_given = raw.proxy_from.is_some();
                let proxy_from = net_list(raw.proxy_from, &join(&path, "proxy_from"), errors);
                let proxy_protocol = raw.proxy_protocol.unwrap_or(false);
                if proxy_protocol {
                    if transport == Some(ListenTransport::Udp) {
                        errors.push(
                            &join(&path, "proxy_protocol"),
                            "only for tcp and tls listeners (the PROXY protocol header starts a TCP stream)",
                        );
                    } else if !proxy_from_given
                        || proxy_from.is_empty()
                            && !errors.has_at_or_under(&join(&path, "proxy_from"))
                    {
                        errors.push(
                            &join(&path, "proxy_from"),
                            "missing; with proxy_protocol = true, list the load balancers' addresses \
                             allowed to send the header, such as [\"10.0.0.0/8\"]",
                        );
                    }
                } else if proxy_from_given {
                    errors.push(
                        &join(&path, "proxy_from"),
                        "only with proxy_protocol = true",
                    );
                }
                if proxy_protocol && address.is_some_and(|a| a.port() == 0) {
                    // The server finds a PROXY protocol listener by this address.
                    errors.push(
                        &join(&path, "address"),
                        "port 0 with proxy_protocol = true; give the port",
                    );
                }
                if let (Some(transport), Some(address)) = (transport, address) {
                    listen.push(Listen {
                        transport,
                        address,
                        proxy_protocol,
                        proxy_from,
                    });
                }
            }
        }
        Some(other) => errors.push(
            "listen",
            format!(
                "expected an array of tables written [[listen]], found {}",
                other.type_str()
            ),
        ),
    }
    listen
}

/// At least one listener, and no two on the same address and socket type.
pub(super) fn check(listen: &[Listen], errors: &mut Errors) {
    if listen.is_empty() && !errors.has_at_or_under("listen") {
        errors.push(
            "listen",
            "no listener; add at least one [[listen]] with transport and address",
        );
    }
    let mut seen: HashMap<(bool, SocketAddr), (usize, ListenTransport)> = HashMap::new();
    for (i, l) in listen.iter().enumerate() {
        let key = (l.transport.is_stream(), l.address);
        if let Some((j, other)) = seen.get(&key) {
            let what = if *other == l.transport {
                "duplicate of".to_owned()
            } else {
                format!(
                    "{} and {} cannot share a TCP port; conflicts with",
                    l.transport, other
                )
            };
            errors.push(
                &format!("listen[{i}].address"),
                format!("{} ({}) {what} listen[{j}]", l.address, l.transport),
            );
        } else {
            seen.insert(key, (i, l.transport));
        }
    }
}

/// Warnings about `[[listen]]` entries that load but are probably not meant: a
/// `proxy_from` holding a prefix of length 0 trusts every source to name its own address,
/// which gets around every per-source limit.
pub(super) fn warnings(listen: &[Listen], out: &mut Vec<super::errors::ConfigError>) {
    for (i, l) in listen.iter().enumerate() {
        if l.proxy_protocol && l.proxy_from.iter().any(|n| n.prefix_len() == 0) {
            out.push(super::errors::ConfigError::new(
                format!("listen[{i}].proxy_from"),
                format!(
                    "{} trusts every source to send a PROXY header, so any client can claim \
                     any address and get around the per-source limits; list only the load \
                     balancers' addresses",
                    l.proxy_from
                        .iter()
                        .find(|n| n.prefix_len() == 0)
                        .map(ToString::to_string)
                        .unwrap_or_default()
                ),
            ));
        }
    }
}
