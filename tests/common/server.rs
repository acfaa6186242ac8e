//! The server under test: its options, ports, certificate and process (turnstone, or coturn).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::coturn::coturn_command;
use super::process::{signal, wait_for, ChildGuard};
use super::stun::{binding_request, parse_binding_success, random_tid, stun_binding};

/// How long the server may take to answer its first Binding request.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval between readiness probes.
pub const READY_POLL: Duration = Duration::from_millis(50);

pub const REALM: &str = "turnstone.test";
pub const USER: &str = "alice";
pub const PASSWORD: &str = "wonderland";
pub const SECRET: &str = "s3cret";

/// The configuration file's name in the server's directory.
const CONFIG: &str = "turnstone.toml";

/// Relay port ranges: 25 slots of 500 ports in 20000-32499, below the kernel's
/// ephemeral range (32768-60999) so that client sockets never sit in them.
const RELAY_BASE: u32 = 20_000;
const RELAY_WIDTH: u32 = 500;
const RELAY_SLOTS: u32 = 25;

static INSTANCE: AtomicU32 = AtomicU32::new(0);

/// Which server the tests run against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Turnstone,
    Coturn,
}

impl Backend {
    /// `TURNSTONE_TEST_SERVER=coturn` selects coturn; anything else (or unset) turnstone.
    pub fn from_env() -> Backend {
        match std::env::var("TURNSTONE_TEST_SERVER") {
            Ok(v) if v.eq_ignore_ascii_case("coturn") => Backend::Coturn,
            _ => Backend::Turnstone,
        }
    }
}

/// What the test server is configured with. `Default` is alice/wonderland, secret
/// `s3cret`, realm `turnstone.test`, loopback peers allowed.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub realm: String,
    pub users: Vec<(String, String)>,
    pub secrets: Vec<String>,
    pub allow_peers: Vec<String>,
    pub deny_peers: Vec<String>,
    /// `[limits] max_allocations`; `None`: the server's default.
    pub max_allocations: Option<usize>,
    /// `[limits] max_allocations_per_user`; `None`: the server's default (none).
    pub max_allocations_per_user: Option<usize>,
    /// Appended verbatim to the generated TOML (turnstone only): whole sections, e.g.
    /// `[log]`.
    pub extra_toml: String,
    /// Extra lines of the `[server]` section (turnstone only), e.g. `drain_timeout = "2s"`.
    pub server_toml: String,
    /// Extra lines of the `[limits]` section (turnstone only).
    pub limits_toml: String,
    /// A Prometheus endpoint (`[metrics] listen`) on a port of its own (turnstone only).
    pub metrics: bool,
    /// A fleet node (turnstone only): `[store]` with this url and node_id, advertising the
    /// UDP listen address.
    pub store: Option<(String, String)>,
    /// `[store] ca_file` (a `rediss://` store with a private CA).
    pub store_ca: Option<PathBuf>,
    /// Only the first N ports of the relay port range this server is given.
    pub relay_port_count: Option<u16>,
    /// Also a `tcp` listener on the UDP listen address (same port).
    pub tcp: bool,
    /// Also a `tls` listener on its own port, with a self-signed certificate for
    /// `localhost` / 127.0.0.1 that the harness generates (PEM files in the server's
    /// temporary directory).
    pub tls: bool,
    /// The certificate of the `tls` listener, instead of one generated in the server's
    /// directory (e.g. files behind symlinks that a test swaps).
    pub tls_cert: Option<TestCert>,
    /// Also listen on [::1] (same ports as on 127.0.0.1, for each transport enabled).
    pub ipv6_listen: bool,
    /// Relay on 127.0.0.1 and ::1 (`[relay] address = ["127.0.0.1", "::1"]`).
    pub ipv6_relay: bool,
    /// `[server] workers` (turnstone only; default: one per core).
    pub workers: Option<usize>,
    /// Environment variables for the server process (turnstone only). `RUST_LOG`,
    /// `NOTIFY_SOCKET` and those in `env_remove` are removed first.
    pub env: Vec<(String, String)>,
    /// Environment variables removed for the server process (turnstone only).
    pub env_remove: Vec<String>,
    /// `proxy_protocol = true` with these `proxy_from` CIDRs on the tcp and tls listeners
    /// (turnstone only); `None`: no PROXY protocol.
    pub proxy_from: Option<Vec<String>>,
    /// Run from a binary path of the server's own (`bin/turnstone` in its directory, a
    /// symlink to the built binary that a test may replace) with a control socket in a
    /// 0700 directory (`run/control.sock`): what `turnstone upgrade` needs (see
    /// `upgrade.rs`).
    pub upgradable: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            realm: REALM.to_string(),
            users: vec![(USER.to_string(), PASSWORD.to_string())],
            secrets: vec![SECRET.to_string()],
            allow_peers: vec!["127.0.0.0/8".to_string()],
            deny_peers: Vec::new(),
            max_allocations: None,
            max_allocations_per_user: None,
            extra_toml: String::new(),
            server_toml: String::new(),
            limits_toml: String::new(),
            metrics: false,
            store: None,
            store_ca: None,
            relay_port_count: None,
            tcp: false,
            tls: false,
            tls_cert: None,
            ipv6_listen: false,
            ipv6_relay: false,
            workers: None,
            env: Vec::new(),
            env_remove: Vec::new(),
            proxy_from: None,
            upgradable: false,
        }
    }
}

impl ServerOptions {
    pub fn realm(mut self, realm: &str) -> Self {
        self.realm = realm.to_string();
        self
    }
    pub fn users(mut self, users: &[(&str, &str)]) -> Self {
        self.users = users
            .iter()
            .map(|(u, p)| (u.to_string(), p.to_string()))
            .collect();
        self
    }
    pub fn secrets(mut self, secrets: &[&str]) -> Self {
        self.secrets = secrets.iter().map(|s| s.to_string()).collect();
        self
    }
    pub fn allow_peers(mut self, nets: &[&str]) -> Self {
        self.allow_peers = nets.iter().map(|s| s.to_string()).collect();
        self
    }
    pub fn deny_peers(mut self, nets: &[&str]) -> Self {
        self.deny_peers = nets.iter().map(|s| s.to_string()).collect();
        self
    }
    pub fn max_allocations(mut self, n: usize) -> Self {
        self.max_allocations = Some(n);
        self
    }
    pub fn max_allocations_per_user(mut self, n: usize) -> Self {
        self.max_allocations_per_user = Some(n);
        self
    }
    /// Appends whole TOML sections (see [`Self::extra_toml`]).
    pub fn extra_toml(mut self, toml: &str) -> Self {
        push_lines(&mut self.extra_toml, toml);
        self
    }
    /// Adds lines to the `[server]` section.
    pub fn server_toml(mut self, lines: &str) -> Self {
        push_lines(&mut self.server_toml, lines);
        self
    }
    /// Adds lines to the `[limits]` section.
    pub fn limits_toml(mut self, lines: &str) -> Self {
        push_lines(&mut self.limits_toml, lines);
        self
    }
    /// `[log] level` and `format` ("text" or "json").
    pub fn log(self, level: &str, format: &str) -> Self {
        self.extra_toml(&format!(
            "[log]\nlevel = \"{level}\"\nformat = \"{format}\"\n"
        ))
    }
    /// A Prometheus endpoint on its own port ([`TestServer::metrics_addr`]).
    pub fn metrics(mut self) -> Self {
        self.metrics = true;
        self
    }
    /// A fleet node `node_id` sharing the store at `url`.
    pub fn store(mut self, url: &str, node_id: &str) -> Self {
        self.store = Some((url.to_string(), node_id.to_string()));
        self
    }
    /// Only `n` relay ports.
    pub fn relay_port_count(mut self, n: u16) -> Self {
        self.relay_port_count = Some(n);
        self
    }

    /// `[server] workers`.
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = Some(n);
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn env_remove(mut self, key: &str) -> Self {
        self.env_remove.push(key.to_string());
        self
    }

    /// The tcp and tls listeners take the PROXY protocol, from the load balancers in
    /// `nets` (CIDRs).
    pub fn proxy_protocol(mut self, nets: &[&str]) -> Self {
        self.proxy_from = Some(nets.iter().map(|s| s.to_string()).collect());
        self
    }

    /// Adds a `tcp` listener on the UDP listen address.
    pub fn tcp(mut self) -> Self {
        self.tcp = true;
        self
    }
    /// Adds a `tls` listener (own port, test-generated self-signed certificate).
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }
    /// Adds a `tls` listener serving `cert` (its files, as the test lays them out).
    pub fn tls_with(mut self, cert: TestCert) -> Self {
        self.tls = true;
        self.tls_cert = Some(cert);
        self
    }
    /// Listens on [::1] too, relays on 127.0.0.1 and ::1, and allows ::1 peers.
    pub fn dual_stack(mut self) -> Self {
        self.ipv6_listen = true;
        self.ipv6_relay = true;
        if !self.allow_peers.iter().any(|n| n == "::1/128") {
            self.allow_peers.push("::1/128".to_string());
        }
        self
    }

    /// The turnstone configuration file for a server with only the UDP listener
    /// `listen` (whatever `tcp`/`tls`/`ipv6_listen` say; see [`Self::to_toml_with`]).
    pub fn to_toml(&self, listen: SocketAddr, relay_ports: (u16, u16)) -> String {
        self.to_toml_with(&Listeners::udp_only(listen), relay_ports)
    }

    /// The turnstone configuration file for these listeners.
    pub fn to_toml_with(&self, l: &Listeners, relay_ports: (u16, u16)) -> String {
        let mut t = String::new();
        let _ = writeln!(t, "[server]\nrealm = {}", toml_str(&self.realm));
        if let Some(w) = self.workers {
            let _ = writeln!(t, "workers = {w}");
        }
        let _ = writeln!(t, "{}", self.server_toml);
        let proxy = match &self.proxy_from {
            Some(nets) => format!("proxy_protocol = true\nproxy_from = {}\n", toml_list(nets)),
            None => String::new(),
        };
        let mut listen = |transport: &str, addr: SocketAddr| {
            let proxy = if transport == "udp" {
                ""
            } else {
                proxy.as_str()
            };
            let _ = writeln!(
                t,
                "[[listen]]\ntransport = \"{transport}\"\naddress = \"{addr}\"\n{proxy}"
            );
        };
        for udp in l.udp_addrs() {
            listen("udp", udp);
            if l.tcp {
                listen("tcp", udp);
            }
        }
        for tls in l.tls_addrs() {
            listen("tls", tls);
        }
        if let Some(cert) = &l.cert {
            let _ = writeln!(
                t,
                "[tls]\ncertificate = {}\nprivate_key = {}\n",
                toml_str(&cert.cert_pem.display().to_string()),
                toml_str(&cert.key_pem.display().to_string())
            );
        }
        let relay = if self.ipv6_relay {
            "[\"127.0.0.1\", \"::1\"]"
        } else {
            "\"127.0.0.1\""
        };
        let _ = writeln!(
            t,
            "[relay]\naddress = {relay}\nports = \"{}-{}\"\n",
            relay_ports.0, relay_ports.1
        );
        let users: Vec<String> = self
            .users
            .iter()
            .map(|(u, p)| format!("{} = {}", toml_str(u), toml_str(p)))
            .collect();
        let _ = writeln!(
            t,
            "[auth]\nusers = {{ {} }}\nsecrets = {}\n",
            users.join(", "),
            toml_list(&self.secrets)
        );
        let _ = writeln!(
            t,
            "[policy]\nallow_peers = {}\ndeny_peers = {}\n",
            toml_list(&self.allow_peers),
            toml_list(&self.deny_peers)
        );
        let _ = writeln!(t, "[limits]");
        if let Some(n) = self.max_allocations {
            let _ = writeln!(t, "max_allocations = {n}");
        }
        if let Some(n) = self.max_allocations_per_user {
            let _ = writeln!(t, "max_allocations_per_user = {n}");
        }
        let _ = writeln!(t, "{}", self.limits_toml);
        if let Some(m) = l.metrics {
            let _ = writeln!(t, "[metrics]\nlisten = \"{m}\"\n");
        }
        if let Some((url, id)) = &self.store {
            let _ = writeln!(
                t,
                "[store]\nurl = {}\nnode_id = {}\nadvertise = \"{}\"",
                toml_str(url),
                toml_str(id),
                l.udp
            );
            if let Some(ca) = &self.store_ca {
                let _ = writeln!(t, "ca_file = {}", toml_str(&ca.display().to_string()));
            }
            t.push('\n');
        }
        t.push_str(&self.extra_toml);
        t
    }
}

/// Appends `lines` to `to`, ending with a newline.
fn push_lines(to: &mut String, lines: &str) {
    to.push_str(lines);
    if !to.ends_with('\n') {
        to.push('\n');
    }
}

fn toml_str(s: &str) -> String {
    // Basic TOML string: escape backslash and quote; tests use plain ASCII values.
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn toml_list(items: &[String]) -> String {
    let v: Vec<String> = items.iter().map(|s| toml_str(s)).collect();
    format!("[{}]", v.join(", "))
}

/// Listen ports for the servers and tools the tests start: 10000-19999, below the relay
/// slots and far from the kernel's ephemeral range (32768-60999). A port taken from the
/// ephemeral range (bind port 0, release, hand it to a server) can be taken meanwhile as
/// the local port of a concurrent test's client connection, and the server's bind then
/// fails; ports here are never handed out by the kernel.
const LISTEN_BASE: u32 = 10_000;
const LISTEN_SPAN: u32 = 10_000;
static NEXT_LISTEN: AtomicU32 = AtomicU32::new(0);

/// The next candidate listen port of this process (a pid-seeded walk over the range, so
/// two test processes rarely probe the same ports).
fn listen_candidate() -> u16 {
    let n = NEXT_LISTEN.fetch_add(1, Ordering::Relaxed);
    let start = std::process::id().wrapping_mul(977) % LISTEN_SPAN;
    // 7 is coprime with the span, so the walk visits every port before repeating.
    (LISTEN_BASE + (start + n.wrapping_mul(7)) % LISTEN_SPAN) as u16
}

/// A port free for both UDP and TCP on 127.0.0.1, outside the ephemeral range.
pub fn free_udp_port() -> u16 {
    free_port_on(&[IpAddr::V4(Ipv4Addr::LOCALHOST)])
}

/// A port free for both TCP and UDP on 127.0.0.1, outside the ephemeral range.
pub fn free_tcp_port() -> u16 {
    free_udp_port()
}

/// A port free for both UDP and TCP on every address in `ips` (127.0.0.1 when empty),
/// outside the ephemeral range (probed by binding and released again, so a race with
/// another process is possible but unlikely).
pub fn free_port_on(ips: &[IpAddr]) -> u16 {
    let default = [IpAddr::V4(Ipv4Addr::LOCALHOST)];
    let ips = if ips.is_empty() { &default[..] } else { ips };
    for _ in 0..2000 {
        let port = listen_candidate();
        let ok = ips.iter().all(|ip| {
            UdpSocket::bind((*ip, port)).is_ok() && TcpListener::bind((*ip, port)).is_ok()
        });
        if ok {
            return port;
        }
    }
    panic!(
        "no port free for UDP and TCP on {ips:?} in {LISTEN_BASE}-{} after 2000 tries",
        LISTEN_BASE + LISTEN_SPAN - 1
    );
}

/// A self-signed certificate for `localhost` and 127.0.0.1 (rcgen), as PEM files.
#[derive(Clone, Debug)]
pub struct TestCert {
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
    /// The certificate in DER, to trust it in a rustls client.
    pub cert_der: Vec<u8>,
}

impl TestCert {
    /// Generates the certificate and writes `cert.pem` / `key.pem` into `dir`.
    pub fn generate(dir: &Path) -> TestCert {
        TestCert::generate_at(&dir.join("cert.pem"), &dir.join("key.pem"))
    }

    /// Generates a certificate and writes it to `cert_pem`, its key to `key_pem`.
    pub fn generate_at(cert_pem: &Path, key_pem: &Path) -> TestCert {
        let ck = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ])
        .expect("rcgen: generate a self-signed certificate");
        std::fs::write(cert_pem, ck.cert.pem())
            .unwrap_or_else(|e| panic!("write {}: {e}", cert_pem.display()));
        std::fs::write(key_pem, ck.signing_key.serialize_pem())
            .unwrap_or_else(|e| panic!("write {}: {e}", key_pem.display()));
        TestCert {
            cert_pem: cert_pem.to_path_buf(),
            key_pem: key_pem.to_path_buf(),
            cert_der: ck.cert.der().to_vec(),
        }
    }
}

/// The listeners of a test server: UDP (and TCP, same port) on 127.0.0.1 and
/// optionally [::1]; TLS on its own port on the same addresses.
#[derive(Clone, Debug)]
pub struct Listeners {
    pub udp: SocketAddr,
    pub tcp: bool,
    pub ipv6: bool,
    pub tls_port: Option<u16>,
    pub cert: Option<TestCert>,
    /// The Prometheus endpoint.
    pub metrics: Option<SocketAddr>,
}

impl Listeners {
    pub fn udp_only(udp: SocketAddr) -> Listeners {
        Listeners {
            udp,
            tcp: false,
            ipv6: false,
            tls_port: None,
            cert: None,
            metrics: None,
        }
    }

    fn ips(&self) -> Vec<IpAddr> {
        let mut v = vec![self.udp.ip()];
        if self.ipv6 {
            v.push(IpAddr::V6(Ipv6Addr::LOCALHOST));
        }
        v
    }

    /// The UDP (and, with `tcp`, TCP) listen addresses.
    pub fn udp_addrs(&self) -> Vec<SocketAddr> {
        self.ips()
            .into_iter()
            .map(|ip| SocketAddr::new(ip, self.udp.port()))
            .collect()
    }

    /// The TLS listen addresses.
    pub fn tls_addrs(&self) -> Vec<SocketAddr> {
        match self.tls_port {
            Some(p) => self
                .ips()
                .into_iter()
                .map(|ip| SocketAddr::new(ip, p))
                .collect(),
            None => Vec::new(),
        }
    }
}

/// A relay port range no other server started by this process uses at the same time
/// (and, thanks to the pid, probably no other test process either).
pub fn relay_port_range() -> (u16, u16) {
    let n = INSTANCE.fetch_add(1, Ordering::Relaxed);
    let slot = (std::process::id().wrapping_mul(7).wrapping_add(n)) % RELAY_SLOTS;
    let low = RELAY_BASE + slot * RELAY_WIDTH;
    let high = low + RELAY_WIDTH - 1;
    (low as u16, high as u16)
}

/// A running server under test. Dropping it kills the process and waits for it;
/// if the current thread is panicking, its stdout/stderr are printed then (so
/// assertion messages need not include them).
pub struct TestServer {
    pub backend: Backend,
    /// The UDP listen address (STUN/TURN).
    pub addr: SocketAddr,
    pub relay_ports: (u16, u16),
    pub options: ServerOptions,
    /// The TCP listen address (same as `addr`), when `options.tcp`.
    pub tcp_addr: Option<SocketAddr>,
    /// The TLS listen address on 127.0.0.1, when `options.tls`.
    pub tls_addr: Option<SocketAddr>,
    /// The UDP (and TCP) listen address on [::1], when `options.ipv6_listen`.
    pub addr6: Option<SocketAddr>,
    /// The TLS listen address on [::1], when `options.tls` and `options.ipv6_listen`.
    pub tls_addr6: Option<SocketAddr>,
    /// The Prometheus endpoint, when `options.metrics` (turnstone only).
    pub metrics_addr: Option<SocketAddr>,
    /// The server's certificate, when `options.tls`.
    pub cert: Option<TestCert>,
    pub listeners: Listeners,
    /// The process serving after the last upgrade (`upgrade.rs`).
    pub serving_pid: std::sync::atomic::AtomicU32,
    process: ChildGuard,
    dir: tempfile::TempDir,
}

impl TestServer {
    /// A server with the default options (see [`ServerOptions`]).
    pub fn start_default() -> TestServer {
        TestServer::start(ServerOptions::default())
    }

    /// Starts the server chosen by `TURNSTONE_TEST_SERVER` and waits until it
    /// answers a STUN Binding request (or panics with its logs).
    pub fn start(options: ServerOptions) -> TestServer {
        TestServer::start_with(Backend::from_env(), options)
    }

    pub fn start_with(backend: Backend, options: ServerOptions) -> TestServer {
        let mut server = TestServer::launch(backend, options);
        server.wait_ready();
        server
    }

    /// Starts the server without waiting for it ([`Self::wait_ready`] does).
    pub fn launch(backend: Backend, mut options: ServerOptions) -> TestServer {
        let dir = tempfile::Builder::new()
            .prefix("turnstone-test-")
            .tempdir()
            .expect("create temp dir");
        if options.upgradable {
            super::upgrade::prepare(dir.path(), &mut options);
        }
        let v4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let mut ips = vec![v4];
        if options.ipv6_listen {
            ips.push(IpAddr::V6(Ipv6Addr::LOCALHOST));
        }
        let plain = options.tcp || options.tls || options.ipv6_listen;
        let port = if plain {
            free_port_on(&ips)
        } else {
            free_udp_port()
        };
        let addr = SocketAddr::new(v4, port);
        let other_port = || loop {
            let p = free_port_on(&ips);
            if p != port {
                break p;
            }
        };
        let tls_port = options.tls.then(other_port);
        let metrics = options
            .metrics
            .then(|| SocketAddr::new(v4, other_port()))
            .filter(|_| backend == Backend::Turnstone);
        let cert = options.tls.then(|| {
            options
                .tls_cert
                .clone()
                .unwrap_or_else(|| TestCert::generate(dir.path()))
        });
        let listeners = Listeners {
            udp: addr,
            tcp: options.tcp,
            ipv6: options.ipv6_listen,
            tls_port,
            cert: cert.clone(),
            metrics,
        };
        let mut relay_ports = relay_port_range();
        if let Some(n) = options.relay_port_count {
            // Wider than a slot: it spills into the next slots (a port another server
            // holds is skipped by the server's bind retries), never past the block.
            let end = RELAY_BASE + RELAY_SLOTS * RELAY_WIDTH - 1;
            let low = u32::from(relay_ports.0).min(end + 1 - u32::from(n));
            relay_ports = (low as u16, (low + u32::from(n) - 1) as u16);
        }
        let mut cmd = match backend {
            Backend::Turnstone => {
                let config = dir.path().join(CONFIG);
                std::fs::write(&config, options.to_toml_with(&listeners, relay_ports))
                    .expect("write config");
                let mut cmd = if options.upgradable {
                    Command::new(super::upgrade::binary(dir.path()))
                } else {
                    Command::new(env!("CARGO_BIN_EXE_turnstone"))
                };
                cmd.arg("--config").arg(&config);
                for k in ["RUST_LOG", "NOTIFY_SOCKET"]
                    .into_iter()
                    .chain(options.env_remove.iter().map(String::as_str))
                {
                    cmd.env_remove(k);
                }
                cmd.envs(options.env.iter().map(|(k, v)| (k, v)));
                cmd
            }
            Backend::Coturn => coturn_command(dir.path(), &options, &listeners, relay_ports),
        };
        let process = ChildGuard::spawn_in(&format!("{backend:?} server"), &mut cmd, dir.path());
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        TestServer {
            backend,
            addr,
            relay_ports,
            tcp_addr: options.tcp.then_some(addr),
            tls_addr: tls_port.map(|p| SocketAddr::new(v4, p)),
            addr6: options.ipv6_listen.then(|| SocketAddr::new(v6, port)),
            tls_addr6: tls_port
                .filter(|_| options.ipv6_listen)
                .map(|p| SocketAddr::new(v6, p)),
            metrics_addr: metrics,
            cert,
            listeners,
            options,
            serving_pid: std::sync::atomic::AtomicU32::new(0),
            process,
            dir,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The TLS listen port (panics if the server has no TLS listener).
    pub fn tls_port(&self) -> u16 {
        self.tls_addr.expect("server started without .tls()").port()
    }

    /// The server process id (while it runs): the process started, or after an
    /// upgrade the one serving now.
    pub fn pid(&self) -> Option<u32> {
        Some(self.serving_pid.load(std::sync::atomic::Ordering::Relaxed))
            .filter(|&p| p != 0)
            .or_else(|| self.process.id())
    }

    /// Has the server process exited? (`Some(status)` if so.)
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.process.try_wait()
    }

    /// How many file descriptors the server process has open (Linux /proc), if known.
    pub fn open_fds(&self) -> Option<usize> {
        let pid = self.pid()?;
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .ok()
            .map(|d| d.count())
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether `port` lies in this server's relay port range.
    pub fn is_relay_port(&self, port: u16) -> bool {
        (self.relay_ports.0..=self.relay_ports.1).contains(&port)
    }

    /// The server's stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout.log")).unwrap_or_default()
    }

    /// The server's stderr so far (turnstone logs there).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// The server's configuration, stdout and stderr so far.
    pub fn logs(&self) -> String {
        let config = std::fs::read_to_string(self.config_path()).unwrap_or_default();
        format!(
            "----- {:?} server on {} config -----\n{config}\n----- stdout -----\n{}\n\
             ----- stderr -----\n{}\n----- end -----",
            self.backend,
            self.addr,
            self.stdout(),
            self.stderr()
        )
    }

    /// Polls the stderr log until `pred` holds (panics after `timeout`); returns it.
    pub fn wait_log(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        wait_for(&format!("log shows {what}"), timeout, || {
            let log = self.stderr();
            pred(&log).then_some(log)
        })
    }

    /// Waits for the process to exit; `None` if it still runs after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.process.wait_exit(timeout)
    }

    /// Sends signal `sig` ("HUP", "TERM") to the server, once turnstone has installed its
    /// SIGHUP and SIGTERM handlers (it does so only after it answers, and a signal sent
    /// in between would kill it).
    pub fn signal(&self, sig: &str) {
        let pid = self.pid().expect("server running");
        if self.backend == Backend::Turnstone {
            // SigCgt bit 0 = SIGHUP, bit 14 = SIGTERM.
            let status = format!("/proc/{pid}/status");
            wait_for("SIGHUP/SIGTERM handlers installed", READY_TIMEOUT, || {
                let caught = std::fs::read_to_string(&status).ok().and_then(|s| {
                    let line = s.lines().find(|l| l.starts_with("SigCgt:"))?;
                    u64::from_str_radix(line.trim_start_matches("SigCgt:").trim(), 16).ok()
                })?;
                (caught & (1 << 0) != 0 && caught & (1 << 14) != 0).then_some(())
            });
        }
        signal(pid, sig);
    }

    /// The configuration file (turnstone).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join(CONFIG)
    }

    /// The configuration `options` would give this server (same listeners and relay
    /// ports).
    pub fn config_for(&self, options: &ServerOptions) -> String {
        options.to_toml_with(&self.listeners, self.relay_ports)
    }

    /// Replaces the configuration file with `text` (written then renamed, as an editor or
    /// config management would).
    pub fn write_config(&self, text: &str) {
        let tmp = self.dir.path().join("turnstone.toml.new");
        std::fs::write(&tmp, text).expect("write config");
        std::fs::rename(&tmp, self.config_path()).expect("rename config");
    }

    /// Rewrites the configuration file, sends SIGHUP and waits until the server logged
    /// that it reloaded (`ok`) or refused the file.
    pub fn reload_raw(&self, text: &str, ok: bool) {
        let marker = if ok {
            "configuration reloaded"
        } else {
            "reload refused"
        };
        let before = self.stderr().matches(marker).count();
        self.write_config(text);
        self.signal("HUP");
        self.wait_log(marker, Duration::from_secs(3), |l| {
            l.matches(marker).count() > before
        });
    }

    /// Reloads with `options` (which must succeed).
    pub fn reload(&self, options: &ServerOptions) {
        self.reload_raw(&self.config_for(options), true);
    }

    /// Polls with Binding requests every 50 ms until a Binding success comes back, then
    /// waits for the other listeners.
    pub fn wait_ready(&mut self) {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind probe socket");
        sock.set_read_timeout(Some(READY_POLL)).expect("timeout");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.try_wait() {
                // Drop prints the server's output while unwinding.
                panic!(
                    "{:?} server exited before it was ready ({status})",
                    self.backend
                );
            }
            let tid = random_tid();
            let _ = sock.send_to(&binding_request(&tid), self.addr);
            let until = Instant::now() + READY_POLL;
            let mut buf = [0u8; 1500];
            while Instant::now() < until {
                match sock.recv_from(&mut buf) {
                    Ok((n, from)) if from == self.addr => {
                        if parse_binding_success(&buf[..n], &tid).is_some() {
                            self.wait_streams_ready(deadline);
                            return;
                        }
                    }
                    Ok(_) => {}
                    // Timeout, or ICMP port unreachable (ECONNREFUSED) before it binds.
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "{:?} server did not answer a STUN Binding request on {} within {:?}",
                    self.backend, self.addr, READY_TIMEOUT
                );
            }
        }
    }
}

impl TestServer {
    /// After the UDP listener answers: the TCP/TLS listeners accept and the [::1] UDP
    /// listener answers a Binding, before `deadline`.
    fn wait_streams_ready(&mut self, deadline: Instant) {
        let mut streams: Vec<SocketAddr> = Vec::new();
        if self.options.tcp {
            streams.extend(self.listeners.udp_addrs());
        }
        streams.extend(self.listeners.tls_addrs());
        streams.extend(self.metrics_addr);
        for a in streams {
            loop {
                if TcpStream::connect_timeout(&a, READY_POLL).is_ok() {
                    break;
                }
                if Instant::now() >= deadline || self.try_wait().is_some() {
                    panic!(
                        "{:?} server does not accept TCP connections on {a} within {:?}",
                        self.backend, READY_TIMEOUT
                    );
                }
                std::thread::sleep(READY_POLL);
            }
        }
        if let Some(a6) = self.addr6 {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Err(e) = stun_binding(a6, left.max(Duration::from_secs(1))) {
                panic!("{:?} server is not ready on {a6}: {e}", self.backend);
            }
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.process.kill();
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}
