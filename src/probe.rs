//! `turnstone probe`: checks a TURN server end to end, the way a WebRTC client uses it,
//! and says in one line whether it relays.
//!
//! Steps (each printed with its timing and the addresses seen):
//! 1. resolve the URL's host; connect (TCP, plus the TLS handshake for `turns:`);
//! 2. Binding: the reflexive address the server sees;
//! 3. Allocate: the 401 challenge, then the authenticated request (long-term
//!    credentials, or a TURN REST API credential minted from `--secret`): the relayed
//!    address and lifetime;
//! 4. CreatePermission and ChannelBind (channel 0x4000) for the peer;
//! 5. a round trip through the relay: ChannelData to the peer, which echoes it back to
//!    the relayed address; the peer is a UDP socket the probe binds itself (on the
//!    local address it used to reach the server, or on the port of `--peer`);
//! 6. Refresh with LIFETIME 0 (the allocation is given back).
//!
//! The verdict is `OK: <url> relays (rtt X ms)` or `FAIL: <reason>`; [`FailureKind`]
//! classifies failures (and gives the exit status). Blocking std sockets and a rustls
//! client (ring); no async runtime.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::auth;
use crate::proto::{
    self, attr, method, reason_phrase, Class, Frame, Message, MessageWriter, TransactionId,
};

/// The channel number the probe binds.
pub const CHANNEL: u16 = 0x4000;
/// Round trips through the relay; the verdict reports their median.
pub const PINGS: usize = 3;
/// First retransmission timeout over UDP (RFC 8489 6.2.1 suggests 500 ms; doubled each time).
const UDP_RTO: Duration = Duration::from_millis(500);
/// Retransmission interval of a ping over UDP.
const PING_RETRY: Duration = Duration::from_millis(250);
/// Largest frame accepted on a stream (a STUN message or ChannelData).
const MAX_FRAME: usize = 4 + 65_535 + 3;
/// Validity of a TURN REST API credential minted from `--secret`.
const REST_TTL: u64 = 3600;
/// Payload prefix of the probe's pings (and of the peer's hole-punching datagram).
const PING_PREFIX: &[u8] = b"turnstone-probe ";

// ---------------------------------------------------------------------------------------------
// Options, URL, failures
// ---------------------------------------------------------------------------------------------

/// How the probe authenticates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credentials {
    /// A long-term credential (`--user`, `--password`).
    Password { user: String, password: String },
    /// A TURN REST API shared secret (`--secret`): the probe mints `<expiry>:<user_id>`
    /// valid for an hour and its password, as an application server would.
    Secret { secret: String, user_id: String },
}

/// What `turnstone probe` was asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    /// `turn:HOST[:PORT][?transport=udp|tcp]` or `turns:HOST[:PORT]`.
    pub url: String,
    pub credentials: Credentials,
    /// `HOST:PORT` the relay should send to, which must reach this machine's UDP port
    /// PORT (the probe listens there). Default: the local address used to reach the
    /// server, on a fresh port.
    pub peer: Option<String>,
    /// Limit for each step.
    pub timeout: Duration,
    /// `turns:`: accept any certificate.
    pub insecure: bool,
    /// `turns:`: trust the PEM certificates in this file instead of the system roots.
    pub ca: Option<PathBuf>,
}

/// Transport to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }
}

/// A parsed `turn:` / `turns:` URL (RFC 7065).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub transport: Transport,
    /// Host name or IP address (without brackets).
    pub host: String,
    pub port: u16,
}

/// Parses `turn:HOST[:PORT][?transport=udp|tcp]` (default UDP, port 3478) and
/// `turns:HOST[:PORT][?transport=tcp]` (TLS over TCP, port 5349). IPv6 addresses go in
/// brackets. A `//` after the scheme is tolerated.
pub fn parse_url(url: &str) -> Result<Target, String> {
    let bad = |why: &str| {
        format!("{url:?} is not a TURN URL ({why}); expected turn:HOST:PORT?transport=udp|tcp or turns:HOST:PORT")
    };
    let (scheme, rest) = url.split_once(':').ok_or_else(|| bad("no scheme"))?;
    let secure = if scheme.eq_ignore_ascii_case("turn") {
        false
    } else if scheme.eq_ignore_ascii_case("turns") {
        true
    } else {
        return Err(bad("scheme must be turn or turns"));
    };
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let (hostport, query) = match rest.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (rest, None),
    };
    let mut transport = if secure {
        Transport::Tls
    } else {
        Transport::Udp
    };
    for param in query.into_iter().flat_map(|q| q.split('&')) {
        let (k, v) = param.split_once('=').unwrap_or((param, ""));
        if k.eq_ignore_ascii_case("transport") {
            transport = match (secure, v.to_ascii_lowercase().as_str()) {
                (false, "udp") => Transport::Udp,
                (false, "tcp") => Transport::Tcp,
                (true, "tcp") => Transport::Tls,
                (true, "udp") => return Err(bad("turns over UDP (DTLS) is not supported")),
                _ => return Err(bad("transport must be udp or tcp")),
            };
        } else if !k.is_empty() {
            return Err(bad(&format!("unknown parameter {k:?}")));
        }
    }
    let default_port = if secure { 5349 } else { 3478 };
    let (host, port) = if let Some(after) = hostport.strip_prefix('[') {
        let (h, tail) = after.split_once(']').ok_or_else(|| bad("no ']'"))?;
        let port = match tail {
            "" => default_port,
            t => t
                .strip_prefix(':')
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| bad("bad port"))?,
        };
        (h.to_string(), port)
    } else if hostport.parse::<Ipv6Addr>().is_ok() {
        (hostport.to_string(), default_port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad("bad port"))?),
            None => (hostport.to_string(), default_port),
        }
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    if port == 0 {
        return Err(bad("port 0"));
    }
    Ok(Target {
        transport,
        host,
        port,
    })
}

/// Why a probe failed; each kind has its own exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// Bad options (exit 2, like a usage error).
    Usage,
    /// The server could not be reached: no such host, connection refused, no answer to
    /// the first request (exit 3).
    Unreachable,
    /// A later step got no answer in time (exit 4).
    Timeout,
    /// TLS handshake or certificate verification failed (exit 5).
    Tls,
    /// 401: the credentials were refused (exit 6).
    Unauthorized,
    /// 403: the peer address is refused by the server's policy (exit 7).
    Forbidden,
    /// Any other error answer or protocol problem (exit 1).
    Protocol,
}

impl FailureKind {
    /// The process exit status for this kind of failure.
    pub fn exit_code(self) -> u8 {
        match self {
            FailureKind::Protocol => 1,
            FailureKind::Usage => 2,
            FailureKind::Unreachable => 3,
            FailureKind::Timeout => 4,
            FailureKind::Tls => 5,
            FailureKind::Unauthorized => 6,
            FailureKind::Forbidden => 7,
        }
    }
}

/// A failed probe: its class and what happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

impl Failure {
    fn new(kind: FailureKind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            FailureKind::Unreachable => write!(f, "unreachable: {}", self.message),
            FailureKind::Timeout => write!(f, "timeout: {}", self.message),
            FailureKind::Tls => write!(f, "TLS error: {}", self.message),
            FailureKind::Unauthorized => write!(f, "401 Unauthorized: {}", self.message),
            FailureKind::Forbidden => write!(f, "403 Forbidden: {}", self.message),
            FailureKind::Usage | FailureKind::Protocol => f.write_str(&self.message),
        }
    }
}

/// What a successful probe measured.
#[derive(Clone, Debug)]
pub struct Report {
    pub reflexive: SocketAddr,
    pub relayed: SocketAddr,
    pub peer: SocketAddr,
    /// Median round trip client → relay → peer → relay → client.
    pub rtt: Duration,
}

/// Runs the probe, printing each step and the verdict line to `out`; returns the exit
/// status (0 when the server relays, [`FailureKind::exit_code`] otherwise).
pub fn main(options: &Options, out: &mut dyn Write) -> u8 {
    let _ = writeln!(out, "probing {}", options.url);
    match run(options, out) {
        Ok(r) => {
            let _ = writeln!(out, "OK: {} relays (rtt {})", options.url, millis(r.rtt));
            let _ = out.flush();
            0
        }
        Err(f) => {
            let _ = writeln!(out, "FAIL: {f}");
            let _ = out.flush();
            f.kind.exit_code()
        }
    }
}

/// Runs every step, printing them to `out`.
pub fn run(options: &Options, out: &mut dyn Write) -> Result<Report, Failure> {
    let target = parse_url(&options.url).map_err(|e| Failure::new(FailureKind::Usage, e))?;
    if options.timeout.is_zero() {
        return Err(Failure::new(FailureKind::Usage, "--timeout must not be 0"));
    }
    let (user, password) = match &options.credentials {
        Credentials::Password { user, password } => (user.clone(), password.clone()),
        Credentials::Secret { secret, user_id } => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let user = auth::rest_username(now + REST_TTL, user_id);
            let password = auth::rest_password(secret, &user);
            step(
                out,
                "credential",
                Duration::ZERO,
                &format!("TURN REST username {user:?} (valid {REST_TTL} s)"),
            );
            (user, password)
        }
    };
    let tls = if target.transport == Transport::Tls {
        Some(tls_config(options)?)
    } else {
        None
    };

    // Resolve.
    let t = Instant::now();
    let server = resolve(&target.host, target.port)?;
    step(
        out,
        "resolve",
        t.elapsed(),
        &format!("{}:{} -> {server}", target.host, target.port),
    );

    // Connect.
    let t = Instant::now();
    let conn = connect(&target, server, options.timeout, tls)?;
    let local = conn.local_addr();
    let what = match &conn {
        Conn::Udp(_) => "udp socket".to_string(),
        Conn::Stream { tls_info, .. } => match tls_info {
            Some(info) => format!("tcp + {info}"),
            None => "tcp connected".to_string(),
        },
    };
    step(
        out,
        "connect",
        t.elapsed(),
        &format!("{what}, local {local} -> server {server}"),
    );

    let mut client = Client {
        conn,
        timeout: options.timeout,
        user,
        password,
        realm: String::new(),
        nonce: None,
        key: None,
    };

    // Binding.
    let t = Instant::now();
    let resp = client.binding().map_err(|f| match f.kind {
        FailureKind::Timeout => Failure::new(
            FailureKind::Unreachable,
            format!(
                "no answer from {server} over {} within {}",
                target.transport.name(),
                secs(options.timeout)
            ),
        ),
        _ => f,
    })?;
    let m = parse(&resp)?;
    let reflexive = m
        .xor_address(attr::XOR_MAPPED_ADDRESS)
        .ok()
        .flatten()
        .or_else(|| m.address(attr::MAPPED_ADDRESS).ok().flatten())
        .ok_or_else(|| protocol("Binding success without a mapped address"))?;
    let software = m
        .software()
        .ok()
        .flatten()
        .map(|s| format!(", server {s:?}"))
        .unwrap_or_default();
    step(
        out,
        "binding",
        t.elapsed(),
        &format!("reflexive address {reflexive}{software}"),
    );
    if reflexive.ip() != local.ip() {
        let _ = writeln!(
            out,
            "{:>22}note: the server sees {} rather than {} (NAT)",
            "",
            reflexive.ip(),
            local.ip()
        );
    }

    // Allocate.
    let t = Instant::now();
    let ipv6 = local.is_ipv6();
    let (resp, challenged) = client.request("Allocate", method::ALLOCATE, &|w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        if ipv6 {
            w.attr(attr::REQUESTED_ADDRESS_FAMILY, &[0x02, 0, 0, 0]);
        }
    })?;
    let m = parse(&resp)?;
    let relayed = m
        .xor_address(attr::XOR_RELAYED_ADDRESS)
        .ok()
        .flatten()
        .ok_or_else(|| protocol("Allocate success without XOR-RELAYED-ADDRESS"))?;
    let lifetime = m.lifetime().ok().flatten();
    let mapped = m.xor_address(attr::XOR_MAPPED_ADDRESS).ok().flatten();
    let mut detail = String::new();
    if challenged {
        detail.push_str(&format!(
            "401 challenge (realm {:?}), authenticated as {:?}; ",
            client.realm, client.user
        ));
    }
    detail.push_str(&format!("relayed address {relayed}"));
    if let Some(l) = lifetime {
        detail.push_str(&format!(", lifetime {l} s"));
    }
    if let Some(a) = mapped {
        detail.push_str(&format!(", reflexive {a}"));
    }
    step(out, "allocate", t.elapsed(), &detail);

    // From here on the allocation is given back whatever happens.
    let result = relay_steps(&mut client, options, local, relayed, out);
    let t = Instant::now();
    let refreshed = client
        .request("Refresh", method::REFRESH, &|w| {
            w.u32_attr(attr::LIFETIME, 0);
        })
        .and_then(|(resp, _)| {
            parse(&resp)?;
            Ok(())
        });
    match (&refreshed, &result) {
        (Ok(()), _) => step(
            out,
            "refresh",
            t.elapsed(),
            "lifetime 0: allocation deleted",
        ),
        (Err(e), Err(_)) => step(out, "refresh", t.elapsed(), &format!("failed: {e}")),
        (Err(_), Ok(_)) => {}
    }
    let (peer, rtt) = result?;
    refreshed?;
    Ok(Report {
        reflexive,
        relayed,
        peer,
        rtt,
    })
}

/// CreatePermission, ChannelBind and the round trips; returns (peer address, median RTT).
fn relay_steps(
    client: &mut Client,
    options: &Options,
    local: SocketAddr,
    relayed: SocketAddr,
    out: &mut dyn Write,
) -> Result<(SocketAddr, Duration), Failure> {
    let (peer_sock, peer) = peer_socket(options, local, relayed)?;

    let t = Instant::now();
    client
        .request("CreatePermission", method::CREATE_PERMISSION, &|w| {
            w.xor_address(attr::XOR_PEER_ADDRESS, peer);
        })
        .map_err(|mut f| {
            if f.kind == FailureKind::Forbidden {
                f.message.push_str(&format!(
                    " for peer {peer} (the probe's own peer; the server's policy denies it: \
                     use --peer with an address it allows)"
                ));
            }
            f
        })?;
    step(
        out,
        "permission",
        t.elapsed(),
        &format!("peer {} (listening on {})", peer, local_of(&peer_sock)),
    );

    let t = Instant::now();
    client.request("ChannelBind", method::CHANNEL_BIND, &|w| {
        w.attr(attr::CHANNEL_NUMBER, &[0x40, 0x00, 0, 0]);
        w.xor_address(attr::XOR_PEER_ADDRESS, peer);
    })?;
    step(
        out,
        "channel",
        t.elapsed(),
        &format!("{CHANNEL:#06x} bound to {peer}"),
    );

    let echo = Echo::start(peer_sock, relayed, options.timeout * (PINGS as u32 + 1))?;
    let mut rtts = Vec::with_capacity(PINGS);
    let t = Instant::now();
    let mut seen_from = None;
    for seq in 0..PINGS {
        let rtt = client.ping(seq)?;
        rtts.push(rtt);
        if seen_from.is_none() {
            seen_from = echo.first_source();
        }
    }
    let took = t.elapsed();
    drop(echo);
    rtts.sort();
    let median = rtts.get(rtts.len() / 2).copied().unwrap_or_default();
    let list: Vec<String> = rtts.iter().map(|d| millis(*d)).collect();
    let from = seen_from
        .map(|a| format!(", peer saw the relay as {a}"))
        .unwrap_or_default();
    step(
        out,
        "relay",
        took,
        &format!(
            "{PINGS} round trips client -> {relayed} -> peer {peer} -> back: {}{from}",
            list.join(", ")
        ),
    );
    Ok((peer, median))
}

// ---------------------------------------------------------------------------------------------
// Output helpers
// ---------------------------------------------------------------------------------------------

fn step(out: &mut dyn Write, name: &str, took: Duration, detail: &str) {
    let _ = writeln!(out, "  {name:<11}{:>9}  {detail}", millis(took));
    let _ = out.flush();
}

fn millis(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

fn secs(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn protocol(message: impl Into<String>) -> Failure {
    Failure::new(FailureKind::Protocol, message)
}

fn parse(raw: &[u8]) -> Result<Message<'_>, Failure> {
    Message::parse(raw).map_err(|e| protocol(format!("unparsable answer: {e}")))
}

fn local_of(s: &UdpSocket) -> String {
    s.local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into())
}

// ---------------------------------------------------------------------------------------------
// Connection
// ---------------------------------------------------------------------------------------------

fn resolve(host: &str, port: u16) -> Result<SocketAddr, Failure> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| {
            Failure::new(
                FailureKind::Unreachable,
                format!("cannot resolve {host:?}: {e}"),
            )
        })?
        .collect();
    // Prefer IPv4, which every TURN server listens on.
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| Failure::new(FailureKind::Unreachable, format!("{host:?} has no address")))
}

/// Something to read STUN/ChannelData frames from and write them to.
trait ByteStream: Read + Write + Send {}
impl<T: Read + Write + Send> ByteStream for T {}

enum Conn {
    /// A connected UDP socket (so that ICMP port unreachable shows as ECONNREFUSED).
    Udp(UdpSocket),
    Stream {
        io: Box<dyn ByteStream>,
        /// The TCP socket under `io` (a clone of the same descriptor), for timeouts.
        tcp: TcpStream,
        buf: Vec<u8>,
        tls_info: Option<String>,
    },
}

fn io_failure(what: &str, e: &io::Error) -> Failure {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            Failure::new(FailureKind::Timeout, format!("{what}: timed out"))
        }
        io::ErrorKind::ConnectionRefused => Failure::new(
            FailureKind::Unreachable,
            format!("{what}: connection refused (nothing listening there?)"),
        ),
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::UnexpectedEof => Failure::new(
            FailureKind::Unreachable,
            format!("{what}: the server closed the connection ({e})"),
        ),
        _ => match tls_error(e) {
            Some(t) => Failure::new(FailureKind::Tls, format!("{what}: {t}")),
            None => Failure::new(FailureKind::Unreachable, format!("{what}: {e}")),
        },
    }
}

fn tls_error(e: &io::Error) -> Option<String> {
    let inner = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    Some(match inner {
        rustls::Error::InvalidCertificate(c) => format!("certificate refused: {c:?}"),
        other => other.to_string(),
    })
}

fn connect(
    target: &Target,
    server: SocketAddr,
    timeout: Duration,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Conn, Failure> {
    if target.transport == Transport::Udp {
        let any: SocketAddr = if server.is_ipv6() {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let sock = UdpSocket::bind(any)
            .and_then(|s| s.connect(server).map(|()| s))
            .map_err(|e| io_failure(&format!("UDP socket to {server}"), &e))?;
        return Ok(Conn::Udp(sock));
    }
    let tcp = TcpStream::connect_timeout(&server, timeout).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Failure::new(
            FailureKind::Unreachable,
            format!(
                "TCP connection to {server} not established within {}",
                secs(timeout)
            ),
        ),
        _ => io_failure(&format!("TCP connection to {server}"), &e),
    })?;
    let _ = tcp.set_nodelay(true);
    let clone = tcp.try_clone().map_err(|e| io_failure("TCP socket", &e))?;
    let Some(config) = tls else {
        return Ok(Conn::Stream {
            io: Box::new(tcp),
            tcp: clone,
            buf: Vec::new(),
            tls_info: None,
        });
    };
    let name = rustls::pki_types::ServerName::try_from(target.host.clone()).map_err(|e| {
        Failure::new(
            FailureKind::Usage,
            format!("{:?} is not a TLS server name: {e}", target.host),
        )
    })?;
    let mut conn = rustls::ClientConnection::new(config, name)
        .map_err(|e| Failure::new(FailureKind::Tls, e.to_string()))?;
    let mut tcp = tcp;
    let deadline = Instant::now() + timeout;
    while conn.is_handshaking() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Failure::new(
                FailureKind::Tls,
                format!(
                    "TLS handshake with {server} not done within {} (is it a TLS listener?)",
                    secs(timeout)
                ),
            ));
        }
        let _ = tcp.set_read_timeout(Some(left));
        let _ = tcp.set_write_timeout(Some(left));
        match conn.complete_io(&mut tcp) {
            Ok((0, 0)) if conn.is_handshaking() => {
                return Err(Failure::new(
                    FailureKind::Tls,
                    format!("{server} closed the connection during the TLS handshake"),
                ))
            }
            Ok(_) => {}
            Err(e) => {
                let what = format!("TLS handshake with {server}");
                return Err(match tls_error(&e) {
                    Some(t) => Failure::new(FailureKind::Tls, format!("{what}: {t}")),
                    None if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                    {
                        Failure::new(
                            FailureKind::Tls,
                            format!(
                                "{what}: not done within {} (is it a TLS listener?)",
                                secs(timeout)
                            ),
                        )
                    }
                    None => Failure::new(FailureKind::Tls, format!("{what}: {e}")),
                });
            }
        }
    }
    let version = conn
        .protocol_version()
        .map(|v| format!("{v:?}"))
        .unwrap_or_else(|| "TLS".into());
    let alpn = conn
        .alpn_protocol()
        .map(|p| format!(", ALPN {}", String::from_utf8_lossy(p)))
        .unwrap_or_default();
    let cipher = conn
        .negotiated_cipher_suite()
        .map(|c| format!(", {:?}", c.suite()))
        .unwrap_or_default();
    Ok(Conn::Stream {
        io: Box::new(rustls::StreamOwned::new(conn, tcp)),
        tcp: clone,
        buf: Vec::new(),
        tls_info: Some(format!("{version}{cipher}{alpn}")),
    })
}

impl Conn {
    fn local_addr(&self) -> SocketAddr {
        let a = match self {
            Conn::Udp(s) => s.local_addr(),
            Conn::Stream { tcp, .. } => tcp.local_addr(),
        };
        a.unwrap_or_else(|_| (Ipv4Addr::UNSPECIFIED, 0).into())
    }

    fn is_udp(&self) -> bool {
        matches!(self, Conn::Udp(_))
    }

    fn send(&mut self, frame: &[u8]) -> Result<(), Failure> {
        match self {
            Conn::Udp(s) => s.send(frame).map(|_| ()),
            Conn::Stream { io, tcp, .. } => {
                let _ = tcp.set_write_timeout(Some(Duration::from_secs(5)));
                io.write_all(frame).and_then(|()| io.flush())
            }
        }
        .map_err(|e| io_failure("send", &e))
    }

    /// The next datagram or frame, or `None` at `deadline`.
    fn recv(&mut self, deadline: Instant) -> Result<Option<Vec<u8>>, Failure> {
        match self {
            Conn::Udp(s) => {
                let mut buf = vec![0u8; 65_536];
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    let _ = s.set_read_timeout(Some(left));
                    match s.recv(&mut buf) {
                        Ok(n) => {
                            buf.truncate(n);
                            return Ok(Some(buf));
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock
                                    | io::ErrorKind::TimedOut
                                    | io::ErrorKind::Interrupted
                            ) => {}
                        Err(e) => return Err(io_failure("answer over UDP", &e)),
                    }
                }
            }
            Conn::Stream { io, tcp, buf, .. } => loop {
                match proto::next_frame(buf, MAX_FRAME) {
                    Frame::Stun(n) | Frame::ChannelData { total: n } => {
                        let rest = buf.split_off(n);
                        return Ok(Some(std::mem::replace(buf, rest)));
                    }
                    Frame::Invalid => {
                        return Err(protocol(
                            "the server sent bytes that are neither STUN nor ChannelData",
                        ))
                    }
                    Frame::NeedMore => {}
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(None);
                }
                let _ = tcp.set_read_timeout(Some(left));
                let mut chunk = [0u8; 16 * 1024];
                match io.read(&mut chunk) {
                    Ok(0) => {
                        return Err(Failure::new(
                            FailureKind::Unreachable,
                            "the server closed the connection",
                        ))
                    }
                    Ok(n) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock
                                | io::ErrorKind::TimedOut
                                | io::ErrorKind::Interrupted
                        ) => {}
                    Err(e) => return Err(io_failure("receive", &e)),
                }
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TLS client configuration
// ---------------------------------------------------------------------------------------------

/// Where the system's CA bundle usually is (Debian/Ubuntu, Fedora/RHEL, openSUSE,
/// Alpine/macOS-style).
const SYSTEM_BUNDLES: [&str; 5] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
];

fn load_roots(path: &Path) -> Result<rustls::RootCertStore, Failure> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let bytes = std::fs::read(path).map_err(|e| {
        Failure::new(
            FailureKind::Usage,
            format!("cannot read CA file {}: {e}", path.display()),
        )
    })?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .filter_map(Result::ok)
        .collect();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(Failure::new(
            FailureKind::Usage,
            format!("no usable PEM certificate in {}", path.display()),
        ));
    }
    Ok(roots)
}

fn tls_config(options: &Options) -> Result<Arc<rustls::ClientConfig>, Failure> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| Failure::new(FailureKind::Tls, e.to_string()))?;
    let mut config = if options.insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
            .with_no_client_auth()
    } else {
        let roots = match &options.ca {
            Some(path) => load_roots(path)?,
            None => {
                let env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
                let path = env
                    .into_iter()
                    .chain(SYSTEM_BUNDLES.iter().map(PathBuf::from))
                    .find(|p| p.is_file())
                    .ok_or_else(|| {
                        Failure::new(
                            FailureKind::Usage,
                            "no system CA bundle found (set SSL_CERT_FILE, or use --ca FILE or --insecure)",
                        )
                    })?;
                load_roots(&path)?
            }
        };
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![b"stun.turn".to_vec()];
    Ok(Arc::new(config))
}

/// `--insecure`: any certificate is accepted (signatures are still checked, so the
/// handshake itself is sound).
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

// ---------------------------------------------------------------------------------------------
// TURN client
// ---------------------------------------------------------------------------------------------

struct Client {
    conn: Conn,
    timeout: Duration,
    user: String,
    password: String,
    realm: String,
    nonce: Option<String>,
    key: Option<auth::Key>,
}

fn random_tid() -> TransactionId {
    TransactionId(rand::random())
}

impl Client {
    /// Sends `req` (retransmitting over UDP) and returns the answer with its
    /// transaction ID, or a `Timeout` failure.
    fn transact(&mut self, what: &str, req: &[u8], tid: TransactionId) -> Result<Vec<u8>, Failure> {
        let deadline = Instant::now() + self.timeout;
        let mut rto = UDP_RTO;
        self.conn.send(req)?;
        let mut resend = Instant::now() + rto;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(Failure::new(
                    FailureKind::Timeout,
                    format!("no answer to {what} within {}", secs(self.timeout)),
                ));
            }
            let until = if self.conn.is_udp() {
                resend.min(deadline)
            } else {
                deadline
            };
            match self.conn.recv(until)? {
                Some(frame) => {
                    if let Ok(m) = Message::parse(&frame) {
                        if m.transaction_id() == tid
                            && matches!(m.class(), Class::Success | Class::Error)
                        {
                            return Ok(frame);
                        }
                    }
                }
                None => {
                    if self.conn.is_udp() && Instant::now() >= resend {
                        self.conn.send(req)?;
                        rto *= 2;
                        resend = Instant::now() + rto;
                    }
                }
            }
        }
    }

    fn binding(&mut self) -> Result<Vec<u8>, Failure> {
        let tid = random_tid();
        let mut buf = Vec::new();
        let mut w = MessageWriter::new(&mut buf, method::BINDING, Class::Request, tid);
        w.fingerprint();
        w.finish();
        let resp = self.transact("Binding", &buf, tid)?;
        let m = parse(&resp)?;
        if m.class() != Class::Success {
            return Err(error_failure("Binding", &m));
        }
        Ok(resp)
    }

    /// An authenticated request: `add` writes the method's attributes. Answers the 401
    /// challenge (and 438 Stale Nonce) once each. Returns the success answer and whether
    /// a challenge was answered.
    fn request(
        &mut self,
        what: &str,
        method: u16,
        add: &dyn Fn(&mut MessageWriter<'_>),
    ) -> Result<(Vec<u8>, bool), Failure> {
        let mut challenged = false;
        for _ in 0..4 {
            let tid = random_tid();
            let mut buf = Vec::new();
            let mut w = MessageWriter::new(&mut buf, method, Class::Request, tid);
            add(&mut w);
            if let (Some(nonce), Some(key)) = (&self.nonce, &self.key) {
                w.attr(attr::USERNAME, self.user.as_bytes())
                    .attr(attr::REALM, self.realm.as_bytes())
                    .attr(attr::NONCE, nonce.as_bytes())
                    .message_integrity(key);
            }
            w.fingerprint();
            w.finish();
            let resp = self.transact(what, &buf, tid)?;
            let m = parse(&resp)?;
            if m.class() == Class::Success {
                return Ok((resp, challenged));
            }
            let code = m.error_code().ok().flatten().map(|(c, _)| c);
            match code {
                Some(401) if self.key.is_none() => {
                    let realm = m.realm().ok().flatten();
                    let nonce = m.nonce().ok().flatten();
                    let (Some(realm), Some(nonce)) = (realm, nonce) else {
                        return Err(protocol(format!("{what}: 401 without REALM and NONCE")));
                    };
                    self.realm = realm.to_string();
                    self.nonce = Some(nonce.to_string());
                    self.key = Some(auth::long_term_key(&self.user, realm, &self.password));
                    challenged = true;
                }
                Some(438) => {
                    let Some(nonce) = m.nonce().ok().flatten() else {
                        return Err(protocol(format!("{what}: 438 without NONCE")));
                    };
                    self.nonce = Some(nonce.to_string());
                }
                _ => return Err(error_failure(what, &m)),
            }
        }
        Err(protocol(format!("{what}: still challenged after 4 tries")))
    }

    /// One round trip through the relay: ChannelData with a fresh payload, until the
    /// peer's echo comes back on the channel.
    fn ping(&mut self, seq: usize) -> Result<Duration, Failure> {
        let mut payload = PING_PREFIX.to_vec();
        payload.extend_from_slice(format!("{seq} {:016x}", rand::random::<u64>()).as_bytes());
        let mut frame = vec![0u8; 4];
        let mut head = [0u8; 4];
        let len = u16::try_from(payload.len()).unwrap_or(u16::MAX);
        proto::write_channel_data_header(&mut head, CHANNEL, len);
        frame.copy_from_slice(&head);
        frame.extend_from_slice(&payload);
        if !self.conn.is_udp() {
            // RFC 8656 12.5: ChannelData over streams is padded to a multiple of 4.
            frame.resize(frame.len().div_ceil(4) * 4, 0);
        }
        let start = Instant::now();
        let deadline = start + self.timeout;
        self.conn.send(&frame)?;
        let mut resend = start + PING_RETRY;
        loop {
            if Instant::now() >= deadline {
                return Err(Failure::new(
                    FailureKind::Timeout,
                    format!(
                        "ChannelData sent on {CHANNEL:#06x} did not come back from the peer within {}",
                        secs(self.timeout)
                    ),
                ));
            }
            let until = if self.conn.is_udp() {
                resend.min(deadline)
            } else {
                deadline
            };
            match self.conn.recv(until)? {
                Some(got) => {
                    if let Some((ch, data)) = proto::parse_channel_data(&got) {
                        if ch == CHANNEL && data == payload.as_slice() {
                            return Ok(start.elapsed());
                        }
                    }
                }
                None if self.conn.is_udp() && Instant::now() >= resend => {
                    self.conn.send(&frame)?;
                    resend = Instant::now() + PING_RETRY;
                }
                None => {}
            }
        }
    }
}

/// The failure an error answer stands for.
fn error_failure(what: &str, m: &Message<'_>) -> Failure {
    let Some((code, reason)) = m.error_code().ok().flatten() else {
        return protocol(format!("{what}: error answer without ERROR-CODE"));
    };
    let reason = if reason.is_empty() {
        reason_phrase(code)
    } else {
        reason
    };
    match code {
        401 => Failure::new(
            FailureKind::Unauthorized,
            format!("{what}: the server refused the credentials ({code} {reason})"),
        ),
        403 => Failure::new(
            FailureKind::Forbidden,
            format!("{what}: the server refused the peer address ({code} {reason})"),
        ),
        _ => protocol(format!("{what} failed: {code} {reason}")),
    }
}

// ---------------------------------------------------------------------------------------------
// The peer
// ---------------------------------------------------------------------------------------------

/// Binds the peer's UDP socket: on `--peer`'s port (any local address of its family), or
/// on the local address used to reach the server. Returns it with the address the server
/// is told about.
fn peer_socket(
    options: &Options,
    local: SocketAddr,
    relayed: SocketAddr,
) -> Result<(UdpSocket, SocketAddr), Failure> {
    match &options.peer {
        Some(p) => {
            let (host, port) = split_host_port(p).ok_or_else(|| {
                Failure::new(
                    FailureKind::Usage,
                    format!("--peer {p:?}: expected HOST:PORT"),
                )
            })?;
            let peer =
                resolve(&host, port).map_err(|f| Failure::new(FailureKind::Usage, f.message))?;
            let any: IpAddr = if peer.is_ipv6() {
                Ipv6Addr::UNSPECIFIED.into()
            } else {
                Ipv4Addr::UNSPECIFIED.into()
            };
            // On the peer's own address when it is local (so that the echo leaves from
            // the address the permission is for), else on any address (NAT, port forward).
            let sock = UdpSocket::bind(peer)
                .or_else(|_| UdpSocket::bind((any, port)))
                .map_err(|e| {
                    Failure::new(
                        FailureKind::Usage,
                        format!("--peer {p}: cannot listen on UDP port {port}: {e}"),
                    )
                })?;
            Ok((sock, peer))
        }
        None => {
            let ip = if local.ip().is_unspecified() {
                if relayed.is_ipv6() {
                    Ipv6Addr::LOCALHOST.into()
                } else {
                    Ipv4Addr::LOCALHOST.into()
                }
            } else {
                local.ip()
            };
            let sock = UdpSocket::bind((ip, 0))
                .map_err(|e| protocol(format!("cannot bind the peer socket on {ip}: {e}")))?;
            let peer = sock
                .local_addr()
                .map_err(|e| protocol(format!("peer socket: {e}")))?;
            Ok((sock, peer))
        }
    }
}

fn split_host_port(s: &str) -> Option<(String, u16)> {
    if let Some(after) = s.strip_prefix('[') {
        let (h, tail) = after.split_once("]:")?;
        return Some((h.to_string(), tail.parse().ok()?));
    }
    let (h, p) = s.rsplit_once(':')?;
    Some((h.to_string(), p.parse().ok()?))
}

/// The peer: echoes every probe datagram back to where it came from (the relayed
/// address), on a thread of its own, until dropped or `limit` passes.
struct Echo {
    stop: Arc<AtomicBool>,
    first: Arc<std::sync::Mutex<Option<SocketAddr>>>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    fn start(sock: UdpSocket, relayed: SocketAddr, limit: Duration) -> Result<Echo, Failure> {
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .map_err(|e| protocol(format!("peer socket: {e}")))?;
        // Opens the way back through a NAT or firewall in front of the peer (the relay
        // forwards it to the client, which ignores it).
        let _ = sock.send_to(b"turnstone-peer punch", relayed);
        let stop = Arc::new(AtomicBool::new(false));
        let first = Arc::new(std::sync::Mutex::new(None));
        let thread = {
            let stop = stop.clone();
            let first = first.clone();
            std::thread::Builder::new()
                .name("turnstone-probe-peer".into())
                .spawn(move || {
                    let end = Instant::now() + limit;
                    let mut buf = [0u8; 2048];
                    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                        if let Ok((n, from)) = sock.recv_from(&mut buf) {
                            let data = buf.get(..n).unwrap_or_default();
                            if data.starts_with(PING_PREFIX) {
                                if let Ok(mut f) = first.lock() {
                                    f.get_or_insert(from);
                                }
                                let _ = sock.send_to(data, from);
                            }
                        }
                    }
                })
                .map_err(|e| protocol(format!("cannot start the peer thread: {e}")))?
        };
        Ok(Echo {
            stop,
            first,
            thread: Some(thread),
        })
    }

    fn first_source(&self) -> Option<SocketAddr> {
        self.first.lock().ok().and_then(|f| *f)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = parse_url("turn:example.com").unwrap();
        assert_eq!(
            t,
            Target {
                transport: Transport::Udp,
                host: "example.com".into(),
                port: 3478
            }
        );
        let t = parse_url("turn:127.0.0.1:3479?transport=tcp").unwrap();
        assert_eq!((t.transport, t.port), (Transport::Tcp, 3479));
        let t = parse_url("TURNS:[::1]:443?transport=tcp").unwrap();
        assert_eq!(
            (t.transport, t.host.as_str(), t.port),
            (Transport::Tls, "::1", 443)
        );
        let t = parse_url("turns://turn.example.org").unwrap();
        assert_eq!((t.transport, t.port), (Transport::Tls, 5349));
        assert_eq!(parse_url("turn:::1").unwrap().host, "::1");
        for bad in [
            "stun:example.com",
            "example.com:3478",
            "turn::3478",
            "turn:h:port",
            "turn:h:0",
            "turn:h?transport=sctp",
            "turns:h?transport=udp",
            "turn:h?foo=bar",
            "turn:[::1",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn failure_lines_name_the_class() {
        let f = Failure::new(FailureKind::Unauthorized, "Allocate: x");
        assert!(f.to_string().starts_with("401 "));
        let f = Failure::new(FailureKind::Forbidden, "x");
        assert!(f.to_string().starts_with("403 "));
        let f = Failure::new(FailureKind::Tls, "x");
        assert!(f.to_string().starts_with("TLS error: "));
        assert_ne!(
            FailureKind::Unreachable.exit_code(),
            FailureKind::Timeout.exit_code()
        );
    }

    #[test]
    fn host_port() {
        assert_eq!(
            split_host_port("203.0.113.5:4000"),
            Some(("203.0.113.5".into(), 4000))
        );
        assert_eq!(split_host_port("[::1]:9"), Some(("::1".into(), 9)));
        assert_eq!(split_host_port("nohost"), None);
    }
}
