//! `[relay] external_address = "auto"`: asks the STUN servers of `discover_with`, from each
//! relay address, which public address they see (a Binding request, RFC 8489), so the
//! relay advertises the address of the NAT in front of it.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

use crate::config::{unreachable_from_outside, Config, RelaySection};
use crate::proto::{attr, method, Class, Message, MessageWriter, TransactionId};

/// How long to wait for each server; requests are sent again at growing intervals.
const PER_SERVER: Duration = Duration::from_millis(2500);
/// When to send a request again, after the first (RFC 8489 6.2.1's doubling, shortened).
const RESENDS: [Duration; 3] = [
    Duration::from_millis(250),
    Duration::from_millis(750),
    Duration::from_millis(1750),
];

/// With `external_address = "auto"`, fills `config.relay.external_addresses` with the
/// public address of each relay address's family; otherwise changes nothing. The error
/// names the key and every server tried, so that the operator can tell which one failed.
pub fn resolve_external_addresses(config: &mut Config) -> Result<(), String> {
    if !config.relay.external_auto {
        return Ok(());
    }
    let found = discover(&config.relay)?;
    config.relay.external_addresses = found;
    Ok(())
}

/// The public address of every relay address, in the order of `relay.addresses`.
pub fn discover(relay: &RelaySection) -> Result<Vec<IpAddr>, String> {
    let mut out = Vec::new();
    for &local in &relay.addresses {
        let family = if local.is_ipv6() { "IPv6" } else { "IPv4" };
        let mut tried = Vec::new();
        let mut found = None;
        for (host, port) in &relay.discover_with {
            let url = format!("stun:{host}:{port}");
            let servers: Vec<SocketAddr> = match (host.as_str(), *port).to_socket_addrs() {
                Ok(a) => a.filter(|a| a.is_ipv6() == local.is_ipv6()).collect(),
                Err(e) => {
                    tried.push(format!("{url}: cannot resolve ({e})"));
                    continue;
                }
            };
            let Some(server) = servers.first().copied() else {
                tried.push(format!("{url}: no {family} address"));
                continue;
            };
            match ask(local, server) {
                Ok(ip) => {
                    found = Some((url, ip));
                    break;
                }
                Err(e) => tried.push(format!("{url} ({server}): {e}")),
            }
        }
        let Some((url, ip)) = found else {
            return Err(format!(
                "relay.external_address: \"auto\" found no public address for relay address {local}: {}; the server does not advertise a private address (check relay.discover_with and the firewall)",
                if tried.is_empty() { "no server in relay.discover_with".to_string() } else { tried.join("; ") }
            ));
        };
        match unreachable_from_outside(ip) {
            Some(kind) => tracing::warn!(
                relay = %local,
                public = %ip,
                server = %url,
                "relay.external_address = \"auto\": the STUN server reports a {kind} address; clients outside that network cannot reach it (is there a second NAT?)"
            ),
            None => tracing::info!(
                relay = %local,
                public = %ip,
                server = %url,
                "relay.external_address = \"auto\": discovered the public address"
            ),
        }
        out.push(ip);
    }
    Ok(out)
}

/// One Binding transaction from `local` (any port) to `server`: the IP address of the
/// XOR-MAPPED-ADDRESS (or MAPPED-ADDRESS) in the answer.
fn ask(local: IpAddr, server: SocketAddr) -> Result<IpAddr, String> {
    let sock =
        UdpSocket::bind(SocketAddr::new(local, 0)).map_err(|e| format!("bind {local}: {e}"))?;
    let tid = TransactionId(rand::random());
    let mut req = Vec::with_capacity(20);
    MessageWriter::new(&mut req, method::BINDING, Class::Request, tid).finish();
    let start = Instant::now();
    let mut next_send = Duration::ZERO;
    let mut resends = RESENDS.iter();
    let mut buf = [0u8; 1500];
    loop {
        let elapsed = start.elapsed();
        if elapsed >= PER_SERVER {
            return Err(format!("no answer within {} ms", PER_SERVER.as_millis()));
        }
        if elapsed >= next_send {
            sock.send_to(&req, server)
                .map_err(|e| format!("send: {e}"))?;
            next_send = resends.next().copied().unwrap_or(PER_SERVER);
        }
        let wait = next_send.min(PER_SERVER).saturating_sub(start.elapsed());
        sock.set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .map_err(|e| format!("socket: {e}"))?;
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            // ICMP port unreachable from an earlier send: keep listening until the deadline.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            Err(e) => return Err(format!("receive: {e}")),
        };
        if from != server {
            continue;
        }
        let Some(answer) = buf.get(..n).and_then(|b| Message::parse(b).ok()) else {
            continue;
        };
        if answer.transaction_id() != tid || answer.method() != method::BINDING {
            continue;
        }
        if answer.class() != Class::Success {
            return Err(format!(
                "answered with error {}",
                answer.error_code().ok().flatten().map_or(0, |e| e.0)
            ));
        }
        let mapped = match answer.xor_address(attr::XOR_MAPPED_ADDRESS) {
            Ok(Some(a)) => Some(a),
            _ => answer.address(attr::MAPPED_ADDRESS).ok().flatten(),
        };
        return mapped
            .map(|a| a.ip())
            .ok_or_else(|| "answer without XOR-MAPPED-ADDRESS".to_string());
    }
}
