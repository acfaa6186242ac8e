//! haproxy (Debian package `haproxy`) as a TCP load balancer in front of a test server:
//! `mode tcp` (TLS passes through), the PROXY protocol header `send-proxy` (v1) or
//! `send-proxy-v2` towards the server, run in the foreground with a generated
//! configuration in a temporary directory and killed on drop.

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use super::process::{require_tool, ChildGuard};
use super::server::free_tcp_port;

pub const HAPROXY_HINT: &str = "apt-get install -y haproxy";

/// Which PROXY protocol header haproxy sends to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyVersion {
    /// `send-proxy`: the text header.
    V1,
    /// `send-proxy-v2`: the binary header.
    V2,
}

impl ProxyVersion {
    fn keyword(self) -> &'static str {
        match self {
            ProxyVersion::V1 => "send-proxy",
            ProxyVersion::V2 => "send-proxy-v2",
        }
    }
}

/// A running haproxy listening on `addr` (127.0.0.1, a free port) and forwarding every
/// connection to one backend server.
pub struct Haproxy {
    pub addr: SocketAddr,
    process: ChildGuard,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    /// Starts haproxy in front of `backend` with the header `version`, and waits until
    /// it accepts connections (panics with its output otherwise).
    pub fn start(backend: SocketAddr, version: ProxyVersion) -> Haproxy {
        let bin = require_tool("haproxy", HAPROXY_HINT);
        let dir = tempfile::Builder::new()
            .prefix("turnstone-haproxy-")
            .tempdir()
            .expect("temp dir");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
        let cfg = format!(
            "global\n    maxconn 4096\n\n\
             defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 120s\n    timeout server 120s\n\n\
             frontend turn\n    bind {addr}\n    default_backend turnstone\n\n\
             backend turnstone\n    server s1 {backend} {}\n",
            version.keyword()
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, cfg).expect("write haproxy.cfg");
        // -db: foreground, no daemon, no master-worker; -f: the configuration.
        let mut cmd = Command::new(bin);
        cmd.arg("-db").arg("-f").arg(&path);
        let mut process = ChildGuard::spawn("haproxy", &mut cmd);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = process.try_wait() {
                panic!("haproxy exited at once ({st})\n{}", process.output());
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "haproxy does not accept on {addr} within 10 s\n{}",
                process.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Haproxy {
            addr,
            process,
            _dir: dir,
        }
    }

    /// haproxy's output so far.
    pub fn output(&self) -> String {
        self.process.output()
    }
}
