//! `turnstone upgrade` given bad input: a stranger on the control socket, truncated and
//! corrupted state, a state format this build does not read, descriptors missing, more
//! descriptors than one message carries, an allocation whose time ran out during the
//! hand-over; and the committed sample of state format 1, which every later build must
//! keep reading.
//!
//! The hand-over channel itself is a socket pair made by the running server before it
//! starts the new binary: it has no name and no address, so no other process can connect
//! to it (only the child that inherits it holds the other end). Nothing to test there.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::handover::{
    mono_now_ns, send_chunks, send_end, send_fds, send_state_bytes, sha256, FakeOld,
};
use common::traffic::udp_socket;
use common::*;
use serde_json::json;
use turnstone::net::handover::{self, ListenerState, Message};

/// Fails (does not skip) when the test is not run as root.
fn require_root(what: &str) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "{what}: this test runs a process as user nobody (uid 65534) with setpriv, which \
         needs root; run it as root (CI does), e.g. `sudo -E cargo test --test upgrade_bad_input`"
    );
}

/// `turnstone upgrade --socket <socket>` run as user nobody (setpriv, util-linux).
fn upgrade_as_nobody(socket: &Path) -> RunOutput {
    require_tool("setpriv", "apt-get install -y util-linux");
    let runs = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_turnstone"))
        .arg("--version")
        .output();
    assert!(
        runs.is_ok_and(|o| o.status.success()),
        "uid 65534 cannot run {}: the test needs the build directory readable by others",
        env!("CARGO_BIN_EXE_turnstone")
    );
    run_bounded(
        "turnstone upgrade (as nobody)",
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_turnstone"))
            .arg("upgrade")
            .arg("--socket")
            .arg(socket),
        Duration::from_secs(30),
    )
}

/// Connects to `socket` as user nobody and prints what the server says, writing
/// nothing (perl's IO::Socket::UNIX: a client with no request of its own, so the
/// server's answer to the connection alone is what comes back).
fn connect_as_nobody(socket: &Path) -> RunOutput {
    require_tool("setpriv", "apt-get install -y util-linux");
    require_tool("perl", "apt-get install -y perl-base");
    run_bounded(
        "raw control client (as nobody)",
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(["perl", "-MIO::Socket::UNIX", "-e"])
            .arg(
                "my $s = IO::Socket::UNIX->new(Peer => $ARGV[0]) or die \"connect: $!\\n\"; \
                 print while <$s>;",
            )
            .arg(socket),
        Duration::from_secs(30),
    )
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// An upgradable server (one worker) whose own directory others may enter, so that only
/// the control socket's directory (`run/`, 0700) stands in a stranger's way.
fn upgradable_server() -> TestServer {
    let server = TestServer::start(ServerOptions {
        upgradable: true,
        workers: Some(1),
        ..ServerOptions::default()
    });
    chmod(server.dir(), 0o755);
    server
}

/// No upgrade was even started: the log says neither that one was requested nor that a
/// new process was started, and the process that serves is the one started.
fn assert_not_upgraded(server: &mut TestServer, first_pid: u32) {
    let log = server.stderr();
    assert!(
        !log.contains("upgrade requested") && !log.contains("new process started"),
        "no upgrade was started:\n{log}"
    );
    assert_eq!(
        server.pid(),
        Some(first_pid),
        "the serving pid is unchanged"
    );
    assert!(server.try_wait().is_none(), "the server still runs");
    assert!(
        Path::new(&format!("/proc/{first_pid}")).exists(),
        "the server still runs"
    );
    assert_serves(server.addr, "a refused control request");
}

#[test]
fn control_socket_directory_keeps_other_users_out() {
    require_root("control_socket_directory_keeps_other_users_out");
    let mut server = upgradable_server();
    let first_pid = server.pid().expect("pid");
    let socket = server.control_socket();
    let run = socket.parent().expect("run dir");
    assert_eq!(mode(run), 0o700, "the control socket's directory is 0700");
    assert!(socket.exists(), "the server bound {}", socket.display());

    let out = upgrade_as_nobody(&socket);
    let text = out.combined();
    assert!(!out.status.success(), "nobody's upgrade failed: {text}");
    assert!(
        text.contains("cannot reach the server's control socket")
            && text.contains("Permission denied (os error 13)"),
        "nobody cannot even connect (EACCES on the 0700 directory): {text}"
    );
    // It never got as far as the server: no refusal to log.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !server.stderr().contains("control socket: refused"),
        "{}",
        server.stderr()
    );
    assert_not_upgraded(&mut server, first_pid);
}

/// A server whose control socket the operator opened to everyone by mistake (directory
/// 0755, socket 0777).
fn server_with_open_control_socket() -> (TestServer, u32) {
    let server = upgradable_server();
    let first_pid = server.pid().expect("pid");
    let socket = server.control_socket();
    chmod(socket.parent().expect("run dir"), 0o755);
    chmod(&socket, 0o777);
    (server, first_pid)
}

#[test]
fn control_socket_refuses_other_users_even_when_reachable() {
    require_root("control_socket_refuses_other_users_even_when_reachable");
    let (mut server, first_pid) = server_with_open_control_socket();
    let out = connect_as_nobody(&server.control_socket());
    let text = out.combined();
    assert!(out.status.success(), "nobody connects now: {text}");
    assert_eq!(
        out.stdout.trim_end(),
        "error refused: uid 65534 may not control this server",
        "the server refuses it by its credentials (SO_PEERCRED): {text}"
    );
    let log = server.wait_log("the refusal as a warning", Duration::from_secs(5), |l| {
        l.contains("control socket: refused a process of another user")
    });
    let line = log
        .lines()
        .find(|l| l.contains("control socket: refused a process of another user"))
        .expect("the line");
    assert!(line.contains("WARN"), "a warning: {line}");
    assert!(line.contains("uid=65534"), "names the uid: {line}");
    assert_not_upgraded(&mut server, first_pid);

    // The server's own user still upgrades it.
    let up = server.must_upgrade();
    assert_ne!(up.pid, first_pid, "a new process serves: {}", up.output);
    assert_serves(server.addr, "the upgrade after a refused stranger");
}

/// `turnstone upgrade` run by another user against a reachable control socket prints
/// the server's refusal, every time (the client writes its request while the server
/// answers a stranger at once: ten tries, so a race between the two shows).
#[test]
fn turnstone_upgrade_by_another_user_prints_the_refusal() {
    require_root("turnstone_upgrade_by_another_user_prints_the_refusal");
    let (mut server, first_pid) = server_with_open_control_socket();
    for i in 0..10 {
        let out = upgrade_as_nobody(&server.control_socket());
        let text = out.combined();
        assert!(
            !out.status.success(),
            "try {i}: nobody's upgrade must fail: {text}"
        );
        assert!(
            text.contains("error refused: uid 65534 may not control this server"),
            "try {i}: `turnstone upgrade` as nobody prints the server's refusal: {text}"
        );
    }
    assert_not_upgraded(&mut server, first_pid);
}

#[test]
fn control_socket_answers_an_unknown_request_with_an_error() {
    let mut server = upgradable_server();
    let first_pid = server.pid().expect("pid");
    let mut s = UnixStream::connect(server.control_socket()).expect("connect as root");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"status\n").unwrap();
    let lines: Vec<String> = BufReader::new(s)
        .lines()
        .collect::<Result<_, _>>()
        .expect("the answer, then end of file");
    assert_eq!(
        lines,
        vec!["error unknown request \"status\"; the one request is \"upgrade\"".to_string()],
        "one error line"
    );
    assert_not_upgraded(&mut server, first_pid);
}

// ---------------------------------------------------------------------------------------
// The new process given bad state by a fake old process (the test).

/// A state document for `fake`'s configuration: one UDP listener on each worker
/// (descriptors `0..workers`), `shards` (one per worker), `fds` descriptors announced.
fn state(fake: &FakeOld, version: u32, shards: serde_json::Value, fds: u32) -> Vec<u8> {
    let sockets: Vec<u32> = (0..fake.workers as u32).collect();
    serde_json::to_vec(&json!({
        "version": version,
        "from_pid": std::process::id(),
        "nonce_secret": ([7u8; 32]),
        "workers": fake.workers,
        "listeners": [{ "transport": "udp", "address": fake.listen, "sockets": sockets }],
        "metrics": null,
        "control": null,
        "shards": shards,
        "fds": fds,
    }))
    .unwrap()
}

fn empty_shards(fake: &FakeOld) -> serde_json::Value {
    json!(vec![
        json!({ "allocations": [], "reservations": [] });
        fake.workers
    ])
}

fn raw_fds(socks: &[UdpSocket]) -> Vec<RawFd> {
    socks.iter().map(AsRawFd::as_raw_fd).collect()
}

/// Starts a new process, checks its hello, sends it its listeners and then whatever
/// `send` writes; it must refuse with a reason containing `expect`, exit non-zero, and
/// say why on stderr.
fn refused(what: &str, expect: &str, send: impl FnOnce(&FakeOld, &[UdpSocket])) {
    let (mut fake, hello) = FakeOld::start(ServerOptions::default());
    assert_eq!(hello.pid, fake.pid(), "{what}: hello names the new process");
    assert!(
        hello.reads.contains(&1),
        "{what}: reads format 1: {hello:?}"
    );
    let listeners = fake.listener_sockets();
    send(&fake, &listeners);
    let (why, stderr) = fake.expect_refusal();
    assert!(
        why.contains(expect),
        "{what}: the refusal says {expect:?}: {why:?}\n{}",
        fake.child.output()
    );
    assert!(
        stderr.contains(expect),
        "{what}: stderr says {expect:?}:\n{stderr}"
    );
    eprintln!("{what}: refused: {why}");
}

#[test]
fn truncated_state_is_refused() {
    let (mut fake, hello) = FakeOld::start(ServerOptions::default());
    assert_eq!(hello.pid, fake.pid(), "hello names the new process");
    let listeners = fake.listener_sockets();
    send_fds(&fake.ch, listeners.len() as u32, &raw_fds(&listeners));
    let bytes = state(&fake, 1, empty_shards(&fake), listeners.len() as u32);
    // The chunks stop short of End's length (the right length and SHA-256 of the whole).
    let cut = bytes.len() / 2;
    send_chunks(&fake.ch, &bytes[..cut]);
    send_end(&fake.ch, bytes.len() as u64, &sha256(&bytes));
    let expect = format!(
        "hand-over state: truncated ({cut} of {} bytes arrived)",
        bytes.len()
    );
    let (why, stderr) = fake.expect_refusal();
    assert_eq!(why, expect, "the refusal says what was wrong");
    assert!(stderr.contains(&expect), "stderr says why:\n{stderr}");
}

#[test]
fn corrupted_state_is_refused() {
    refused(
        "a flipped byte",
        "hand-over state: corrupted (SHA-256 mismatch)",
        |fake, listeners| {
            send_fds(&fake.ch, listeners.len() as u32, &raw_fds(listeners));
            let bytes = state(fake, 1, empty_shards(fake), listeners.len() as u32);
            let mut bad = bytes.clone();
            let i = bad.len() / 2;
            bad[i] ^= 0x01;
            send_chunks(&fake.ch, &bad);
            send_end(&fake.ch, bytes.len() as u64, &sha256(&bytes));
        },
    );
}

#[test]
fn unknown_state_version_is_refused() {
    refused(
        "a well-formed state of version 99",
        "hand-over state: format version 99 is not one this build reads ([1])",
        |fake, listeners| {
            send_fds(&fake.ch, listeners.len() as u32, &raw_fds(listeners));
            // Its length and SHA-256 are right: only the version is wrong.
            let bytes = state(fake, 99, empty_shards(fake), listeners.len() as u32);
            send_state_bytes(&fake.ch, &bytes);
        },
    );
}

#[test]
fn fewer_descriptors_than_the_state_announces_are_refused() {
    refused(
        "one descriptor sent, two announced by the state",
        "hand-over state: 2 descriptors announced, 1 received",
        |fake, listeners| {
            send_fds(&fake.ch, listeners.len() as u32, &raw_fds(listeners));
            let bytes = state(fake, 1, empty_shards(fake), listeners.len() as u32 + 1);
            send_state_bytes(&fake.ch, &bytes);
        },
    );
}

#[test]
fn fewer_descriptors_than_the_batch_announces_are_refused() {
    refused(
        "a batch announcing two descriptors and carrying one",
        "hand-over channel: a batch announced Some(2) descriptors and carried 1",
        |fake, listeners| {
            // Nothing after it: the new process stops reading there.
            send_fds(&fake.ch, 2, &raw_fds(listeners));
        },
    );
}

/// The new process's state in /proc (`R`, `S`, `T` stopped...).
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

/// A new process that refuses in the middle of the state (here a bad batch) leaves the
/// rest of what the old process sent unread. The old process, reading after it exited
/// (as the real one does when it is still sending, or slower than the new process to
/// fail), must still hear the reason: the Refuse is queued on its end.
#[test]
fn refusal_reaches_the_old_process_despite_unread_messages() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let (mut fake, _) = FakeOld::start(ServerOptions::default());
    let pid = fake.pid();
    // Everything is queued before it reads any of it: stopped meanwhile.
    kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).unwrap();
    wait_for("the new process stopped", Duration::from_secs(5), || {
        (proc_state(pid) == Some('T')).then_some(())
    });
    let listeners = fake.listener_sockets();
    send_fds(&fake.ch, 2, &raw_fds(&listeners));
    send_state_bytes(&fake.ch, &state(&fake, 1, empty_shards(&fake), 2));
    kill(Pid::from_raw(pid as i32), Signal::SIGCONT).unwrap();
    let (why, stderr) = fake.expect_refusal();
    let expect = "hand-over channel: a batch announced Some(2) descriptors and carried 1";
    assert!(why.contains(expect), "{why}");
    assert!(stderr.contains(expect), "{stderr}");
}

// ---------------------------------------------------------------------------------------

#[test]
fn three_hundred_allocations_go_over_in_batches() {
    const ALLOCATIONS: usize = 300;
    let started = Instant::now();
    let server = TestServer::start(
        ServerOptions {
            upgradable: true,
            workers: Some(2),
            ..ServerOptions::default()
        }
        // 300 clients' first (unauthenticated) Allocate from one address in a burst.
        .limits_toml("unauthenticated_rate = 100000"),
    );
    let mut clients: Vec<(TurnClient, SocketAddr)> = (0..ALLOCATIONS)
        .map(|_| {
            let mut c = TurnClient::udp(server.addr, USER, PASSWORD);
            let relayed = c.must_allocate();
            (c, relayed)
        })
        .collect();
    let allocated = started.elapsed();
    let first_pid = server.pid().expect("pid");
    let up = server.must_upgrade();
    assert_ne!(up.pid, first_pid, "a new process serves");
    assert_eq!(up.allocations, ALLOCATIONS, "{}", up.output);
    assert!(
        up.sockets > 253,
        "more descriptors than one message can carry (SCM_MAX_FD is 253; the server sends \
         {} a message, so in batches): {}",
        handover::FDS_PER_MESSAGE,
        up.output
    );
    assert!(up.sockets >= ALLOCATIONS, "{}", up.output);

    // Every 15th allocation (20 of them): Refresh, and a packet each way through it.
    let peer = udp_socket(Duration::from_millis(200));
    let peer_addr = peer.local_addr().unwrap();
    let mut checked = 0;
    for (i, (c, relayed)) in clients.iter_mut().enumerate().step_by(15) {
        c.try_refresh(600)
            .unwrap_or_else(|e| panic!("allocation {i} after the upgrade: {e}\n{}", server.logs()));
        c.permit(peer_addr);
        let out = format!("to the peer through allocation {i}");
        c.send_to_peer(peer_addr, out.as_bytes()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut buf = [0u8; 2048];
        loop {
            assert!(
                Instant::now() < deadline,
                "allocation {i}: nothing reached the peer\n{}",
                server.logs()
            );
            if let Ok((n, from)) = peer.recv_from(&mut buf) {
                if &buf[..n] == out.as_bytes() {
                    assert_eq!(from, *relayed, "allocation {i}: from its relayed address");
                    break;
                }
            }
        }
        let back = format!("from the peer to allocation {i}");
        peer.send_to(back.as_bytes(), *relayed).unwrap();
        assert!(
            c.receives_data_indication(back.as_bytes(), Duration::from_secs(2)),
            "allocation {i}: the peer's packet reached the client\n{}",
            server.logs()
        );
        checked += 1;
    }
    assert_eq!(checked, 20);
    eprintln!(
        "{ALLOCATIONS} allocations in {allocated:?}; upgrade: {} sockets, pause {:.1} ms; \
         total {:?}",
        up.sockets,
        up.pause_ms,
        started.elapsed()
    );
}

/// The target of `/proc/<pid>/fd/*` links (e.g. `socket:[123]`).
fn fd_targets(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|p| p.display().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn allocation_expired_during_the_hand_over_ends_at_once() {
    let (mut fake, hello) = FakeOld::start(ServerOptions::default());
    let pid = fake.pid();
    assert_eq!(hello.pid, pid);
    let listeners = fake.listener_sockets();
    // A real relay socket in the new process's relay port range.
    let relay_sock = (fake.relay_ports.0..=fake.relay_ports.1)
        .find_map(|p| UdpSocket::bind(("127.0.0.1", p)).ok())
        .expect("a free relay port");
    let relay = relay_sock.local_addr().unwrap();
    let socket_name = std::fs::read_link(format!("/proc/self/fd/{}", relay_sock.as_raw_fd()))
        .unwrap()
        .display()
        .to_string();
    let client = udp_socket(Duration::from_millis(100));
    let now = mono_now_ns();
    let s = 1_000_000_000u64;
    let relay_index = listeners.len() as u32;
    let allocation = json!({
        "id": 7,
        "client": client.local_addr().unwrap(),
        "server": fake.listen,
        "relay": { "socket": relay_index, "bound": relay, "advertised": relay },
        "second": null,
        "username": USER,
        "key": ([0u8; 16]),
        "created": now - 30 * s,
        // Its time ran out a second ago, during the hand-over.
        "expires": now - s,
        "permissions": [],
        "channels": [],
        "allocate_tid": ([1u8; 12]),
        "allocate_response": [],
        "usage": [3, 300, 4, 400],
        "reported": [0, 0, 0, 0],
        "last_report": now - 30 * s,
        "bucket_out": { "tokens": 0, "last": now },
        "bucket_in": { "tokens": 0, "last": now },
    });
    let shards = json!([{ "allocations": [allocation], "reservations": [] }]);
    let mut fds = raw_fds(&listeners);
    fds.push(relay_sock.as_raw_fd());
    send_fds(&fake.ch, fds.len() as u32, &fds);
    send_state_bytes(&fake.ch, &state(&fake, 1, shards, fds.len() as u32));
    drop(listeners);
    match fake.recv(Duration::from_secs(20)) {
        Ok(Message::Ready(r)) => assert_eq!(r.allocations, 1, "took the expired allocation"),
        Ok(Message::Refuse(why)) => panic!("refused: {why}\n{}", fake.child.output()),
        Ok(_) => panic!("something else than ready\n{}", fake.child.output()),
        Err(e) => panic!("no ready: {e}\n{}", fake.child.output()),
    }
    assert!(
        fd_targets(pid).contains(&socket_name),
        "the new process holds the relay socket ({socket_name}) once ready"
    );
    fake.ch.commit().expect("commit");
    match fake.recv(Duration::from_secs(10)) {
        Ok(Message::Serving) => {}
        Ok(_) => panic!("something else than serving\n{}", fake.child.output()),
        Err(e) => panic!("not serving: {e}\n{}", fake.child.output()),
    }
    let serving = Instant::now();
    // Its end comes at the workers' first tick (every second): within about 2 s.
    let line = wait_for(
        "the expired allocation's final usage record",
        Duration::from_millis(2500),
        || {
            fake.child
                .stderr()
                .lines()
                .find(|l| l.contains("allocation ended") && l.contains("allocation=7"))
                .map(str::to_owned)
        },
    );
    assert!(line.contains("reason=\"expired\""), "{line}");
    assert!(
        line.contains("packets_to_peer=3"),
        "its usage carried over: {line}"
    );
    wait_for(
        "the relay socket closed in the new process",
        Duration::from_secs(2),
        || (!fd_targets(pid).contains(&socket_name)).then_some(()),
    );
    eprintln!(
        "expired allocation ended {:?} after Serving",
        serving.elapsed()
    );
    // With the test's copy closed too, the port is free again.
    drop(relay_sock);
    UdpSocket::bind(relay).unwrap_or_else(|e| panic!("{relay} free again: {e}"));
    assert!(
        fake.child.try_wait().is_none(),
        "the new process still serves"
    );
    fake.child.kill();
}

// ---------------------------------------------------------------------------------------

/// The committed sample of state format version 1 (`tests/data/upgrade-state-v1.json`,
/// written by hand from `Handover`): the previous format that every later build must keep
/// reading. Never edit the file (its length and SHA-256 are pinned here); when the format
/// changes, add a sample of the new version next to it and keep this test.
const SAMPLE_V1: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/upgrade-state-v1.json"
);
const SAMPLE_V1_LEN: u64 = 1606;
const SAMPLE_V1_SHA256: &str = "d56cdc7d7ac2ce71937225913ba22cbae9676d68f8b4d8524f73abe315999887";

fn unhex(s: &str) -> [u8; 32] {
    let v: Vec<u8> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

#[test]
fn state_format_1_sample_still_decodes() {
    let bytes = std::fs::read(SAMPLE_V1).expect("the committed sample");
    let h = handover::decode(&bytes, SAMPLE_V1_LEN, &unhex(SAMPLE_V1_SHA256))
        .unwrap_or_else(|e| panic!("format 1 sample refused: {e}"));
    let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
    assert_eq!(h.version, 1);
    assert_eq!(h.from_pid, 4242);
    let secret: Vec<u8> = (1..=32).collect();
    assert_eq!(h.nonce_secret.to_vec(), secret);
    assert_eq!(h.workers, 1);
    assert_eq!(
        h.listeners,
        vec![ListenerState {
            transport: "udp".into(),
            address: addr("127.0.0.1:3478"),
            sockets: vec![0],
        }]
    );
    assert_eq!((h.metrics, h.control, h.fds), (None, None, 3));
    assert_eq!(h.shards.len(), 1);
    let shard = &h.shards[0];
    assert_eq!(shard.allocations.len(), 1);
    let a = &shard.allocations[0];
    assert_eq!(a.id, 17);
    assert_eq!(a.client, addr("192.0.2.10:50000"));
    assert_eq!(a.server, addr("127.0.0.1:3478"));
    assert_eq!(a.relay.socket, 1);
    assert_eq!(a.relay.bound, addr("127.0.0.1:40000"));
    assert_eq!(a.relay.advertised, addr("203.0.113.5:40000"));
    assert!(a.second.is_none());
    assert_eq!(a.username, "alice");
    assert_eq!(a.key, std::array::from_fn::<u8, 16, _>(|i| 160 + i as u8));
    assert_eq!(
        (a.created, a.expires),
        (1_000_000_000_000, 1_600_000_000_000)
    );
    assert_eq!(a.permissions.len(), 1);
    assert_eq!(
        a.permissions[0].ip,
        "198.51.100.7".parse::<std::net::IpAddr>().unwrap()
    );
    assert_eq!(a.permissions[0].expires, 1_300_000_000_000);
    assert!(!a.permissions[0].relays_only);
    assert_eq!(a.channels.len(), 1);
    assert_eq!(a.channels[0].number, 0x4000);
    assert_eq!(a.channels[0].peer, addr("198.51.100.7:6000"));
    assert_eq!(a.channels[0].expires, 1_600_000_000_000);
    assert_eq!(
        a.allocate_tid,
        std::array::from_fn::<u8, 12, _>(|i| i as u8 + 1)
    );
    assert_eq!(a.allocate_response, vec![1, 3, 0, 0]);
    assert_eq!(a.usage, [10, 1600, 12, 1920]);
    assert_eq!(a.reported, [5, 800, 6, 960]);
    assert_eq!(a.last_report, 1_200_000_000_000);
    assert_eq!(
        (a.bucket_out.tokens, a.bucket_out.last),
        (65536, 1_250_000_000_000)
    );
    assert_eq!(
        (a.bucket_in.tokens, a.bucket_in.last),
        (32768, 1_250_000_000_000)
    );
    assert_eq!(shard.reservations.len(), 1);
    let r = &shard.reservations[0];
    assert_eq!(r.token, [9, 8, 7, 6, 5, 4, 3, 2]);
    assert_eq!(r.socket, 2);
    assert_eq!(r.addr, addr("127.0.0.1:40002"));
    assert_eq!(r.expires, 1_030_000_000_000);

    // What this build writes from it reads back the same.
    let again = serde_json::to_vec(&h).unwrap();
    let h2 = handover::decode(&again, again.len() as u64, &sha256(&again)).unwrap();
    assert_eq!(h2, h);
}
