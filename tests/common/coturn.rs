//! coturn's programs: `turnserver` as a backend, `turnutils_peer`, `turnutils_uclient`.

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::process::{require_tool, run_bounded, ChildGuard};
use super::server::{free_port_on, Listeners, ServerOptions};

/// How to install coturn's programs.
pub const COTURN_HINT: &str = "apt-get install -y coturn";

/// The `turnserver` command for `options` (see `TestServer`).
pub fn coturn_command(
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
        .arg(format!("--userdb={}", dir.join("turnserver.db").display()));
    if let Some(n) = options.max_allocations {
        cmd.arg(format!("--total-quota={n}"));
    }
    if let Some(n) = options.max_allocations_per_user {
        cmd.arg(format!("--user-quota={n}"));
    }
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

/// A `turnutils_peer` UDP echo peer, killed on drop.
pub struct EchoPeer {
    pub port: u16,
    _guard: ChildGuard,
}

impl EchoPeer {
    /// Starts `turnutils_peer` on `ip` and checks that it did not exit at once.
    pub fn start(ip: &str) -> EchoPeer {
        let bin = require_tool("turnutils_peer", COTURN_HINT);
        let ipaddr: IpAddr = ip.parse().expect("peer IP");
        let port = free_port_on(&[ipaddr]);
        let mut cmd = Command::new(bin);
        cmd.args(["-L", ip, "-p", &port.to_string()]);
        let mut guard = ChildGuard::spawn("turnutils_peer", &mut cmd);
        // Let it bind; fail early if it died (e.g. port taken).
        std::thread::sleep(Duration::from_millis(200));
        if let Some(st) = guard.try_wait() {
            panic!("turnutils_peer exited at once ({st})"); // Drop prints its output
        }
        EchoPeer {
            port,
            _guard: guard,
        }
    }

    /// Starts `turnutils_peer` on `ip:port` inside the network namespace `netns` (its
    /// full name) and checks that it did not exit at once.
    pub fn start_in(netns: &str, ip: &str, port: u16) -> EchoPeer {
        let bin = require_tool("turnutils_peer", COTURN_HINT);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns])
            .arg(bin)
            .args(["-L", ip, "-p", &port.to_string()]);
        let mut guard = ChildGuard::spawn("turnutils_peer", &mut cmd);
        std::thread::sleep(Duration::from_millis(200));
        if let Some(st) = guard.try_wait() {
            panic!("turnutils_peer exited at once ({st})");
        }
        EchoPeer {
            port,
            _guard: guard,
        }
    }
}

/// The counters of uclient's final summary.
#[derive(Debug)]
pub struct Summary {
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub send_dropped: u64,
}

fn number_after(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// uclient's final summary, as printed by coturn 4.6 (on stdout and stderr):
///     N: : start_mclient: tot_send_msgs=10000, tot_recv_msgs=10000
///     N: : Total lost packets 0 (0.000000%), total send dropped 0 (0.000000%)
/// (the last `start_mclient` line without `msz=`).
pub fn parse_summary(out: &str) -> Option<Summary> {
    let totals = out
        .lines()
        .rfind(|l| l.contains("start_mclient: tot_send_msgs=") && !l.contains("msz="))?;
    let lost = out.lines().rfind(|l| l.contains("Total lost packets"))?;
    Some(Summary {
        sent: number_after(totals, "tot_send_msgs=")?,
        received: number_after(totals, "tot_recv_msgs=")?,
        lost: number_after(lost, "Total lost packets")?,
        send_dropped: number_after(lost, "total send dropped")?,
    })
}

/// Runs `turnutils_uclient ARGS -m CLIENTS -n MESSAGES -l 170 SERVER_IP` (killed after
/// `timeout`) and asserts every message came back: exit 0, all connections completed,
/// `clients * messages` sent, as many received, none lost or dropped. (With `-y`/`-T`
/// uclient pairs its clients, so `clients` must be even there: uclient rounds an odd
/// count up.)
pub fn run_uclient(args: &[&str], server_ip: &str, clients: u64, messages: u64, timeout: Duration) {
    run_uclient_in(None, args, server_ip, clients, messages, timeout);
}

/// [`run_uclient`] inside the network namespace `netns` (its full name) if given;
/// returns uclient's summary and output.
pub fn run_uclient_in(
    netns: Option<&str>,
    args: &[&str],
    server_ip: &str,
    clients: u64,
    messages: u64,
    timeout: Duration,
) -> (Summary, String) {
    let bin = require_tool("turnutils_uclient", COTURN_HINT);
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.args(args)
        .args(["-m", &clients.to_string(), "-n", &messages.to_string()])
        .args(["-l", "170"])
        .arg(server_ip);
    let run = run_bounded("turnutils_uclient", &mut cmd, timeout);
    let out = run.combined();
    // The server's own output is printed by TestServer's Drop on failure.
    let context = || format!("uclient {args:?} {server_ip}\n{out}");
    assert!(
        run.status.success(),
        "uclient failed ({})\n{}",
        run.status,
        context()
    );
    // uclient waits up to ~35 s for all its connections (with -T: control connections,
    // Connect / ConnectionBind data connections), then carries on with those it has and
    // prints this warning; coturn completes them all at once.
    assert!(
        !out.contains("not enough"),
        "uclient could not complete all its connections (`connections are completed, not \
         enough`; look for `connection bind error` / `connect error` lines)\n{}",
        context()
    );
    let s = parse_summary(&out)
        .unwrap_or_else(|| panic!("no final summary in uclient output\n{}", context()));
    assert_eq!(
        s.sent,
        clients * messages,
        "messages sent: {s:?}\n{}",
        context()
    );
    assert!(s.received > 0, "nothing received: {s:?}\n{}", context());
    assert_eq!(s.received, s.sent, "messages lost: {s:?}\n{}", context());
    assert_eq!(s.lost, 0, "lost packets: {s:?}\n{}", context());
    assert_eq!(s.send_dropped, 0, "send dropped: {s:?}\n{}", context());
    assert!(
        out.contains("Total lost packets 0 (0.000000%)"),
        "summary line missing\n{}",
        context()
    );
    (s, out)
}
