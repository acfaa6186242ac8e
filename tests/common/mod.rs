//! Shared harness for the black-box integration tests: runs a real `turnstone`
//! process (or, for differential checks, coturn's `turnserver`) on 127.0.0.1 with
//! its own ports, and offers small helpers (free ports, a raw STUN Binding client,
//! external tools with bounded run times).
//!
//! Every test binary includes this module with `mod common;` and uses a part of it.
//!
//! Set `TURNSTONE_TEST_SERVER=coturn` to run the same tests against coturn's
//! `turnserver` (Debian package `coturn`) instead of turnstone: the harness then maps
//! the options below to turnserver flags. This is how the tests themselves were
//! validated; coturn cannot mix static users with REST secrets, so there the
//! secrets are used only when the user list is empty.
#![allow(dead_code)]

pub mod browser;
pub mod corpus;

use std::fmt::Write as _;
use std::fs::File;
use std::io::Read;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long the server may take to answer its first Binding request.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval between readiness probes.
pub const READY_POLL: Duration = Duration::from_millis(50);

pub const REALM: &str = "turnstone.test";
pub const USER: &str = "alice";
pub const PASSWORD: &str = "wonderland";
pub const SECRET: &str = "s3cret";

const COTURN_HINT: &str = "apt-get install -y coturn";

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
    pub max_allocations: usize,
    pub max_allocations_per_user: usize,
    /// Appended verbatim to the generated TOML (turnstone only), e.g. a `[log]` section.
    pub extra_toml: String,
    /// Also a `tcp` listener on the UDP listen address (same port).
    pub tcp: bool,
    /// Also a `tls` listener on its own port, with a self-signed certificate for
    /// `localhost` / 127.0.0.1 that the harness generates (PEM files in the server's
    /// temporary directory).
    pub tls: bool,
    /// Also listen on [::1] (same ports as on 127.0.0.1, for each transport enabled).
    pub ipv6_listen: bool,
    /// Relay on 127.0.0.1 and ::1 (`[relay] address = ["127.0.0.1", "::1"]`).
    pub ipv6_relay: bool,
    /// `[server] workers` (turnstone only; default: one per core).
    pub workers: Option<usize>,
    /// Environment variables for the server process (turnstone only).
    pub env: Vec<(String, String)>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            realm: REALM.to_string(),
            users: vec![(USER.to_string(), PASSWORD.to_string())],
            secrets: vec![SECRET.to_string()],
            allow_peers: vec!["127.0.0.0/8".to_string()],
            deny_peers: Vec::new(),
            max_allocations: 100_000,
            max_allocations_per_user: 100,
            extra_toml: String::new(),
            tcp: false,
            tls: false,
            ipv6_listen: false,
            ipv6_relay: false,
            workers: None,
            env: Vec::new(),
        }
    }
}

impl ServerOptions {
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
        self.max_allocations = n;
        self
    }
    pub fn max_allocations_per_user(mut self, n: usize) -> Self {
        self.max_allocations_per_user = n;
        self
    }
    pub fn extra_toml(mut self, toml: &str) -> Self {
        self.extra_toml = toml.to_string();
        self
    }

    /// Adds a `tcp` listener on the UDP listen address.
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = Some(n);
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn tcp(mut self) -> Self {
        self.tcp = true;
        self
    }
    /// Adds a `tls` listener (own port, test-generated self-signed certificate).
    pub fn tls(mut self) -> Self {
        self.tls = true;
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
        let _ = writeln!(t);
        let mut listen = |transport: &str, addr: SocketAddr| {
            let _ = writeln!(
                t,
                "[[listen]]\ntransport = \"{transport}\"\naddress = \"{addr}\"\n"
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
        let _ = writeln!(
            t,
            "[limits]\nmax_allocations = {}\nmax_allocations_per_user = {}\n",
            self.max_allocations, self.max_allocations_per_user
        );
        t.push_str(&self.extra_toml);
        t
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
        let ck = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ])
        .expect("rcgen: generate a self-signed certificate");
        let cert_pem = dir.join("cert.pem");
        let key_pem = dir.join("key.pem");
        std::fs::write(&cert_pem, ck.cert.pem()).expect("write cert.pem");
        std::fs::write(&key_pem, ck.signing_key.serialize_pem()).expect("write key.pem");
        TestCert {
            cert_pem,
            key_pem,
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
}

impl Listeners {
    pub fn udp_only(udp: SocketAddr) -> Listeners {
        Listeners {
            udp,
            tcp: false,
            ipv6: false,
            tls_port: None,
            cert: None,
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

/// Full path of an external tool, or a panic that says how to install it.
pub fn require_tool(name: &str, install_hint: &str) -> PathBuf {
    if let Some(p) = find_tool(name) {
        return p;
    }
    panic!(
        "required tool `{name}` was not found in PATH.\n\
         Install it with: `{install_hint}` (as root), or run `bash scripts/test`, \
         which installs every tool the tests need when run as root."
    );
}

/// Full path of an executable in PATH, if any.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
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
    /// The server's certificate, when `options.tls`.
    pub cert: Option<TestCert>,
    pub listeners: Listeners,
    child: Option<Child>,
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
        let dir = tempfile::Builder::new()
            .prefix("turnstone-test-")
            .tempdir()
            .expect("create temp dir");
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
        let tls_port = options.tls.then(|| loop {
            let p = free_port_on(&ips);
            if p != port {
                break p;
            }
        });
        let cert = options.tls.then(|| TestCert::generate(dir.path()));
        let listeners = Listeners {
            udp: addr,
            tcp: options.tcp,
            ipv6: options.ipv6_listen,
            tls_port,
            cert: cert.clone(),
        };
        let relay_ports = relay_port_range();
        let stdout = File::create(dir.path().join("stdout.log")).expect("stdout.log");
        let stderr = File::create(dir.path().join("stderr.log")).expect("stderr.log");

        let mut cmd = match backend {
            Backend::Turnstone => {
                let config = dir.path().join("turnstone.toml");
                std::fs::write(&config, options.to_toml_with(&listeners, relay_ports))
                    .expect("write config");
                let mut cmd = Command::new(env!("CARGO_BIN_EXE_turnstone"));
                cmd.arg("--config").arg(&config);
                cmd.envs(options.env.iter().map(|(k, v)| (k, v)));
                cmd
            }
            Backend::Coturn => coturn_command(dir.path(), &options, &listeners, relay_ports),
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {backend:?} server {cmd:?}: {e}"));
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        let mut server = TestServer {
            backend,
            addr,
            relay_ports,
            tcp_addr: options.tcp.then_some(addr),
            tls_addr: tls_port.map(|p| SocketAddr::new(v4, p)),
            addr6: options.ipv6_listen.then(|| SocketAddr::new(v6, port)),
            tls_addr6: tls_port
                .filter(|_| options.ipv6_listen)
                .map(|p| SocketAddr::new(v6, p)),
            cert,
            listeners,
            options,
            child: Some(child),
            dir,
        };
        server.wait_ready();
        server
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The TLS listen port (panics if the server has no TLS listener).
    pub fn tls_port(&self) -> u16 {
        self.tls_addr.expect("server started without .tls()").port()
    }

    /// The server process id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Has the server process exited? (`Some(status)` if so.)
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
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

    /// The server's stdout and stderr so far.
    pub fn logs(&self) -> String {
        let read =
            |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!(
            "----- {:?} server on {} stdout -----\n{}\n----- stderr -----\n{}\n----- end -----",
            self.backend,
            self.addr,
            read("stdout.log"),
            read("stderr.log")
        )
    }

    /// Polls with Binding requests every 50 ms until a Binding success comes back.
    fn wait_ready(&mut self) {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind probe socket");
        sock.set_read_timeout(Some(READY_POLL)).expect("timeout");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    // Drop prints the server's output while unwinding.
                    panic!(
                        "{:?} server exited before it was ready ({status})",
                        self.backend
                    );
                }
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
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

fn coturn_command(
    dir: &Path,
    options: &ServerOptions,
    listeners: &Listeners,
    relay_ports: (u16, u16),
) -> Command {
    let bin = require_tool("turnserver", COTURN_HINT);
    let addr = listeners.udp;
    let mut cmd = Command::new(bin);
    cmd.arg("-n");
    for a in listeners.udp_addrs() {
        cmd.arg(format!("--listening-ip={}", a.ip()));
    }
    cmd.arg(format!("--listening-port={}", addr.port()))
        .arg("--relay-ip=127.0.0.1");
    if options.ipv6_relay {
        cmd.arg("--relay-ip=::1");
    }
    // coturn always listens on TCP on the listening port too (`options.tcp`).
    match (&listeners.cert, listeners.tls_port) {
        (Some(cert), Some(p)) => {
            cmd.arg(format!("--tls-listening-port={p}"))
                .arg(format!("--cert={}", cert.cert_pem.display()))
                .arg(format!("--pkey={}", cert.key_pem.display()))
                .arg("--no-tlsv1")
                .arg("--no-tlsv1_1");
        }
        _ => {
            cmd.arg("--no-tls");
        }
    }
    cmd.arg(format!("--min-port={}", relay_ports.0))
        .arg(format!("--max-port={}", relay_ports.1))
        .arg("--lt-cred-mech")
        .arg(format!("--realm={}", options.realm))
        .arg("--no-cli")
        .arg("--no-dtls")
        .arg("--simple-log")
        .arg("--log-file=stdout")
        .arg(format!(
            "--pidfile={}",
            dir.join("turnserver.pid").display()
        ))
        .arg(format!("--userdb={}", dir.join("turnserver.db").display()))
        .arg(format!("--total-quota={}", options.max_allocations))
        .arg(format!("--user-quota={}", options.max_allocations_per_user));
    if !options.users.is_empty() || options.secrets.is_empty() {
        for (u, p) in &options.users {
            cmd.arg(format!("--user={u}:{p}"));
        }
    } else {
        // coturn cannot mix static users and REST secrets: secrets only when no users.
        cmd.arg("--use-auth-secret");
        for s in &options.secrets {
            cmd.arg(format!("--static-auth-secret={s}"));
        }
    }
    if options.allow_peers.iter().any(|n| n.starts_with("127.")) {
        cmd.arg("--allow-loopback-peers");
    }
    for n in &options.deny_peers {
        if let Ok(net) = n.parse::<ipnet::IpNet>() {
            cmd.arg(format!(
                "--denied-peer-ip={}-{}",
                net.network(),
                net.broadcast()
            ));
        }
    }
    cmd
}

// ---------------------------------------------------------------------------
// Raw STUN Binding client
// ---------------------------------------------------------------------------

pub const MAGIC_COOKIE: u32 = 0x2112_A442;

/// 12 random bytes (no extra dependency: std's randomly seeded hasher).
pub fn random_tid() -> [u8; 12] {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut out = [0u8; 12];
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    let a = h.finish().to_be_bytes();
    h.write_u64(u64::from_be_bytes(a));
    let b = h.finish().to_be_bytes();
    out[..8].copy_from_slice(&a);
    out[8..].copy_from_slice(&b[..4]);
    out
}

/// A 20-byte Binding request: type 0x0001, length 0, magic cookie, `tid`.
pub fn binding_request(tid: &[u8; 12]) -> [u8; 20] {
    let mut m = [0u8; 20];
    m[0..2].copy_from_slice(&0x0001u16.to_be_bytes());
    m[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    m[8..20].copy_from_slice(tid);
    m
}

/// If `buf` is a Binding success (0x0101) for `tid`, the XOR-MAPPED-ADDRESS (or
/// MAPPED-ADDRESS) it carries, `None` inside when it carries neither.
pub fn parse_binding_success(buf: &[u8], tid: &[u8; 12]) -> Option<Option<SocketAddr>> {
    if buf.len() < 20
        || buf[0..2] != [0x01, 0x01]
        || buf[4..8] != MAGIC_COOKIE.to_be_bytes()
        || buf[8..20] != tid[..]
    {
        return None;
    }
    let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    let body = buf.get(20..20 + len)?;
    let mut mapped = None;
    let mut i = 0;
    while i + 4 <= body.len() {
        let typ = u16::from_be_bytes([body[i], body[i + 1]]);
        let alen = u16::from_be_bytes([body[i + 2], body[i + 3]]) as usize;
        let value = body.get(i + 4..i + 4 + alen)?;
        match typ {
            0x0020 => return Some(decode_address(value, true, tid)),
            0x0001 => mapped = decode_address(value, false, tid),
            _ => {}
        }
        i += 4 + alen.div_ceil(4) * 4;
    }
    Some(mapped)
}

fn decode_address(v: &[u8], xor: bool, tid: &[u8; 12]) -> Option<SocketAddr> {
    if v.len() < 8 {
        return None;
    }
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let mut port = u16::from_be_bytes([v[2], v[3]]);
    if xor {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    match v[1] {
        0x01 => {
            let mut ip = [v[4], v[5], v[6], v[7]];
            if xor {
                for (b, k) in ip.iter_mut().zip(cookie.iter()) {
                    *b ^= k;
                }
            }
            Some(SocketAddr::from((ip, port)))
        }
        0x02 if v.len() >= 20 => {
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&v[4..20]);
            if xor {
                let key: Vec<u8> = cookie.iter().chain(tid.iter()).copied().collect();
                for (b, k) in ip.iter_mut().zip(key.iter()) {
                    *b ^= k;
                }
            }
            Some(SocketAddr::from((ip, port)))
        }
        _ => None,
    }
}

/// Sends Binding requests to `server` (retransmitting every 250 ms) until a success
/// arrives or `timeout` passes. Returns (our local address, the reflexive address
/// the server reports).
pub fn stun_binding(
    server: SocketAddr,
    timeout: Duration,
) -> Result<(SocketAddr, SocketAddr), String> {
    let bind = if server.is_ipv6() {
        "[::1]:0"
    } else {
        "127.0.0.1:0"
    };
    let sock = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
    let local = sock.local_addr().map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_millis(250)))
        .map_err(|e| e.to_string())?;
    let tid = random_tid();
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        sock.send_to(&binding_request(&tid), server)
            .map_err(|e| e.to_string())?;
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            if from == server {
                if let Some(mapped) = parse_binding_success(&buf[..n], &tid) {
                    return mapped.map(|m| (local, m)).ok_or_else(|| {
                        format!("Binding success from {server} without a mapped address")
                    });
                }
            }
        }
    }
    Err(format!(
        "no Binding success from {server} to {local} within {timeout:?}"
    ))
}

// ---------------------------------------------------------------------------
// External processes with bounded lifetimes
// ---------------------------------------------------------------------------

/// A child process killed (SIGKILL to its whole process group) and reaped on drop.
/// Its stdout/stderr go to files; they are printed if the thread is panicking.
pub struct ChildGuard {
    pub name: String,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl ChildGuard {
    /// Spawns `cmd` in its own process group with output captured to files.
    pub fn spawn(name: &str, cmd: &mut Command) -> ChildGuard {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::Builder::new()
            .prefix("turnstone-child-")
            .tempdir()
            .expect("temp dir");
        let out = File::create(dir.path().join("stdout.log")).expect("stdout.log");
        let err = File::create(dir.path().join("stderr.log")).expect("stderr.log");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        ChildGuard {
            name: name.to_string(),
            child: Some(child),
            dir,
        }
    }

    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `Some(status)` once the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits until the process exits or `timeout` passes; on timeout it is killed
    /// and `None` is returned.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        None
    }

    pub fn stdout(&self) -> String {
        read_lossy(&self.dir.path().join("stdout.log"))
    }

    pub fn stderr(&self) -> String {
        read_lossy(&self.dir.path().join("stderr.log"))
    }

    pub fn output(&self) -> String {
        format!(
            "----- {} stdout -----\n{}\n----- {} stderr -----\n{}\n----- end -----",
            self.name,
            self.stdout(),
            self.name,
            self.stderr()
        )
    }

    /// Kills the process group (only the processes this guard started) and reaps.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The child leads its own process group (process_group(0) above), so
            // the group id is its pid; this also ends helpers it forked (Chromium).
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("{}", self.output());
        }
    }
}

fn read_lossy(p: &Path) -> String {
    let mut v = Vec::new();
    if let Ok(mut f) = File::open(p) {
        let _ = f.read_to_end(&mut v);
    }
    String::from_utf8_lossy(&v).into_owned()
}

/// Result of [`run_bounded`].
pub struct RunOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl RunOutput {
    /// stdout followed by stderr (coturn's tools print to both).
    pub fn combined(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Runs `cmd` to completion, killing it and panicking (with its output) if it
/// takes longer than `timeout`.
pub fn run_bounded(name: &str, cmd: &mut Command, timeout: Duration) -> RunOutput {
    let mut g = ChildGuard::spawn(name, cmd);
    match g.wait_timeout(timeout) {
        Some(status) => RunOutput {
            status,
            stdout: g.stdout(),
            stderr: g.stderr(),
        },
        None => {
            let output = g.output();
            drop(g);
            panic!("{name} did not finish within {timeout:?}; killed it\n{output}")
        }
    }
}

/// Runs the `turnstone` binary with `args` (bounded to 30 s).
pub fn run_turnstone(args: &[&str]) -> RunOutput {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_turnstone"));
    cmd.args(args);
    run_bounded("turnstone", &mut cmd, Duration::from_secs(30))
}

/// Parses the output of `turnstone credentials`: accepts `username: X` / `password: Y`
/// lines (any case, `:` or `=`), or a JSON object with `username` and
/// `password` or `credential` keys (alone or inside an iceServers entry).
pub fn parse_credentials(output: &str) -> Option<(String, String)> {
    let mut user = None;
    let mut pass = None;
    for line in output.lines() {
        let line = line.trim();
        if line.starts_with('{') || line.starts_with('[') {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                if let Some(found) = credentials_in_json(&v) {
                    return Some(found);
                }
            }
            continue;
        }
        let Some((k, v)) = line.split_once([':', '=']) else {
            continue;
        };
        let v = v.trim().trim_matches('"').to_string();
        match k.trim().to_ascii_lowercase().as_str() {
            "username" | "user" if user.is_none() => user = Some(v),
            "password" | "credential" if pass.is_none() => pass = Some(v),
            _ => {}
        }
    }
    if let (Some(u), Some(p)) = (user, pass) {
        return Some((u, p));
    }
    // Whole output as one (pretty-printed) JSON document.
    serde_json::from_str::<serde_json::Value>(output.trim())
        .ok()
        .and_then(|v| credentials_in_json(&v))
}

fn credentials_in_json(v: &serde_json::Value) -> Option<(String, String)> {
    match v {
        serde_json::Value::Object(m) => {
            let u = m.get("username").and_then(|x| x.as_str());
            let p = m
                .get("password")
                .or_else(|| m.get("credential"))
                .and_then(|x| x.as_str());
            if let (Some(u), Some(p)) = (u, p) {
                return Some((u.to_string(), p.to_string()));
            }
            m.values().find_map(credentials_in_json)
        }
        serde_json::Value::Array(a) => a.iter().find_map(credentials_in_json),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// STUN/TURN over TCP and TLS (RFC 8656 12.5 framing)
// ---------------------------------------------------------------------------

/// Read/write timeout of the stream clients below.
pub const STREAM_TIMEOUT: Duration = Duration::from_secs(5);

/// A TCP connection to `server`, from `source` (an IP of this host, e.g. 127.0.0.2)
/// if given; read/write timeouts of [`STREAM_TIMEOUT`].
pub fn tcp_connect_from(source: Option<IpAddr>, server: SocketAddr) -> std::io::Result<TcpStream> {
    let domain = socket2::Domain::for_address(server);
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if let Some(ip) = source {
        s.bind(&SocketAddr::new(ip, 0).into())?;
    }
    s.connect_timeout(&server.into(), STREAM_TIMEOUT)?;
    let t: TcpStream = s.into();
    t.set_read_timeout(Some(STREAM_TIMEOUT))?;
    t.set_write_timeout(Some(STREAM_TIMEOUT))?;
    t.set_nodelay(true)?;
    Ok(t)
}

/// A rustls client configuration (ring) that trusts only `cert`, offers `versions`
/// and the ALPN protocols `alpn` (none if empty).
pub fn tls_client_config(
    cert: &TestCert,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> std::sync::Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(
            cert.cert_der.clone(),
        ))
        .expect("trust the test certificate");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    std::sync::Arc::new(cfg)
}

/// A TLS client stream.
pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Connects to `server` over TLS (server name `name`, e.g. "localhost") and completes
/// the handshake.
pub fn tls_connect(
    server: SocketAddr,
    name: &str,
    cfg: std::sync::Arc<rustls::ClientConfig>,
) -> Result<TlsStream, String> {
    let mut tcp =
        tcp_connect_from(None, server).map_err(|e| format!("TCP connect to {server}: {e}"))?;
    let sni = rustls::pki_types::ServerName::try_from(name.to_string())
        .map_err(|e| format!("server name {name}: {e}"))?;
    let mut conn = rustls::ClientConnection::new(cfg, sni).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + STREAM_TIMEOUT;
    while conn.is_handshaking() {
        if Instant::now() >= deadline {
            return Err(format!(
                "TLS handshake with {server} not done in {STREAM_TIMEOUT:?}"
            ));
        }
        conn.complete_io(&mut tcp)
            .map_err(|e| format!("TLS handshake with {server}: {e}"))?;
    }
    Ok(rustls::StreamOwned::new(conn, tcp))
}

/// A TCP or TLS connection carrying STUN/ChannelData frames.
pub enum Stream {
    Tcp(TcpStream),
    Tls(Box<TlsStream>),
}

impl Stream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Tcp(t) => t,
            Stream::Tls(t) => &t.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(t) => t.read(buf),
            Stream::Tls(t) => t.read(buf),
        }
    }
}

impl std::io::Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(t) => t.write(buf),
            Stream::Tls(t) => t.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(t) => t.flush(),
            Stream::Tls(t) => t.flush(),
        }
    }
}

/// Reads one frame from a stream: a STUN message (20 + length) or a ChannelData
/// message (4 + length, plus the padding to 4 bytes, which is stripped).
pub fn read_frame(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut head = [0u8; 4];
    r.read_exact(&mut head)?;
    let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
    let (body, pad) = if head[0] < 0x40 {
        (16 + len, 0)
    } else {
        (len, (4 - len % 4) % 4)
    };
    let mut frame = head.to_vec();
    frame.resize(4 + body + pad, 0);
    r.read_exact(&mut frame[4..])?;
    frame.truncate(4 + body);
    Ok(frame)
}

/// A small TURN client over a stream (long-term credentials, RFC 8489 9.2).
pub struct StreamClient {
    pub stream: Stream,
    user: String,
    key: [u8; 16],
    realm: String,
    nonce: Option<String>,
}

/// A parsed answer: (class, method, error code, raw bytes).
pub struct Answer {
    pub raw: Vec<u8>,
}

impl Answer {
    pub fn msg(&self) -> turnstone::proto::Message<'_> {
        turnstone::proto::Message::parse(&self.raw).expect("answer parses")
    }
    pub fn is_success(&self) -> bool {
        self.msg().class() == turnstone::proto::Class::Success
    }
    pub fn code(&self) -> Option<u16> {
        self.msg().error_code().ok().flatten().map(|(c, _)| c)
    }
    pub fn describe(&self) -> String {
        let m = self.msg();
        format!(
            "{:?} method {:#05x} error {:?}",
            m.class(),
            m.method(),
            m.error_code().ok().flatten()
        )
    }
}

impl StreamClient {
    pub fn new(stream: Stream, user: &str, password: &str) -> StreamClient {
        StreamClient {
            stream,
            user: user.to_string(),
            key: turnstone::auth::long_term_key(user, REALM, password),
            realm: REALM.to_string(),
            nonce: None,
        }
    }

    /// alice/wonderland over TCP from `source` (default 127.0.0.1).
    pub fn tcp(source: Option<IpAddr>, server: SocketAddr) -> Result<StreamClient, String> {
        let t = tcp_connect_from(source, server).map_err(|e| format!("connect {server}: {e}"))?;
        Ok(StreamClient::new(Stream::Tcp(t), USER, PASSWORD))
    }

    /// Writes `req` and reads frames until the answer with its transaction ID.
    pub fn transact(&mut self, req: &[u8]) -> Result<Answer, String> {
        use turnstone::proto::{Class, Message};
        let want = Message::parse(req)
            .map_err(|e| format!("our request: {e:?}"))?
            .transaction_id();
        self.stream
            .write_all(req)
            .and_then(|()| self.stream.flush())
            .map_err(|e| format!("write: {e}"))?;
        let deadline = Instant::now() + STREAM_TIMEOUT;
        while Instant::now() < deadline {
            let f = read_frame(&mut self.stream).map_err(|e| format!("read: {e}"))?;
            if let Ok(m) = Message::parse(&f) {
                if m.transaction_id() == want && matches!(m.class(), Class::Success | Class::Error)
                {
                    return Ok(Answer { raw: f });
                }
            }
        }
        Err(format!("no answer within {STREAM_TIMEOUT:?}"))
    }

    /// Binding request; returns XOR-MAPPED-ADDRESS.
    pub fn binding(&mut self) -> Result<SocketAddr, String> {
        use turnstone::proto::{attr, method, Class, MessageWriter, TransactionId};
        let mut buf = Vec::new();
        let mut w = MessageWriter::new(
            &mut buf,
            method::BINDING,
            Class::Request,
            TransactionId(random_tid()),
        );
        w.fingerprint();
        w.finish();
        let a = self.transact(&buf)?;
        if !a.is_success() {
            return Err(format!("Binding: {}", a.describe()));
        }
        a.msg()
            .xor_address(attr::XOR_MAPPED_ADDRESS)
            .ok()
            .flatten()
            .ok_or_else(|| "Binding success without XOR-MAPPED-ADDRESS".to_string())
    }

    /// An authenticated request: `add` adds the method's attributes; USERNAME, REALM,
    /// NONCE, MESSAGE-INTEGRITY and FINGERPRINT follow. Fetches a nonce first (with an
    /// unauthenticated request of the same kind) if it has none, and retries once on 438.
    pub fn request(
        &mut self,
        method: u16,
        add: &dyn Fn(&mut turnstone::proto::MessageWriter<'_>),
    ) -> Result<Answer, String> {
        use turnstone::proto::{attr, Class, MessageWriter, TransactionId};
        for _ in 0..3 {
            let mut buf = Vec::new();
            let mut w = MessageWriter::new(
                &mut buf,
                method,
                Class::Request,
                TransactionId(random_tid()),
            );
            add(&mut w);
            if let Some(nonce) = &self.nonce {
                w.attr(attr::USERNAME, self.user.as_bytes())
                    .attr(attr::REALM, self.realm.as_bytes())
                    .attr(attr::NONCE, nonce.as_bytes())
                    .message_integrity(&self.key);
            }
            w.fingerprint();
            w.finish();
            let a = self.transact(&buf)?;
            match a.code() {
                Some(401) | Some(438) => {
                    let m = a.msg();
                    let nonce = m.nonce().ok().flatten().map(str::to_string);
                    let realm = m.realm().ok().flatten().map(str::to_string);
                    if a.code() == Some(401) && self.nonce.is_some() {
                        return Err(format!("credentials refused: {}", a.describe()));
                    }
                    match nonce {
                        Some(n) => self.nonce = Some(n),
                        None => return Err(format!("{} without NONCE", a.describe())),
                    }
                    if let Some(r) = realm {
                        self.realm = r;
                    }
                }
                _ => return Ok(a),
            }
        }
        Err("no answer beyond 401/438".to_string())
    }

    /// An authenticated Allocate (UDP relay); returns XOR-RELAYED-ADDRESS.
    pub fn allocate(&mut self) -> Result<SocketAddr, String> {
        use turnstone::proto::{attr, method};
        let a = self.request(method::ALLOCATE, &|w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        })?;
        if !a.is_success() {
            return Err(format!("Allocate: {}", a.describe()));
        }
        a.msg()
            .xor_address(attr::XOR_RELAYED_ADDRESS)
            .ok()
            .flatten()
            .ok_or_else(|| "Allocate success without XOR-RELAYED-ADDRESS".to_string())
    }

    /// An authenticated Refresh with `lifetime` seconds.
    pub fn refresh(&mut self, lifetime: u32) -> Result<(), String> {
        use turnstone::proto::{attr, method};
        let a = self.request(method::REFRESH, &|w| {
            w.u32_attr(attr::LIFETIME, lifetime);
        })?;
        if a.is_success() {
            Ok(())
        } else {
            Err(format!("Refresh: {}", a.describe()))
        }
    }
}

/// A fresh TCP connection from `source` completes an authenticated Allocate (and the
/// connection is closed again); panics with `what` otherwise.
pub fn assert_tcp_allocates(server: SocketAddr, source: Option<IpAddr>, what: &str) -> SocketAddr {
    let r = StreamClient::tcp(source, server).and_then(|mut c| {
        let relayed = c.allocate()?;
        // Give the allocation back so repeated checks do not pile up.
        let _ = c.refresh(0);
        Ok(relayed)
    });
    r.unwrap_or_else(|e| panic!("a good TCP client from {source:?} was not served ({what}): {e}"))
}
