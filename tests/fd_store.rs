//! Restart, crash and upgrade under a `Type=notify` unit with systemd's file descriptor
//! store (a stand-in manager here: `tests/common/service_manager.rs`): a call with
//! numbered packets both ways goes on through a restart (`RestartKillSignal=SIGUSR1`),
//! a `kill -9` and an upgrade, none lost, and the unit's main process is handed on.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::call::{Call, CHANNEL};
use common::service_manager::ServiceManager;
use common::*;

const LIFETIME: u32 = 60;

fn unit_options(manager: &ServiceManager) -> ServerOptions {
    ServerOptions {
        workers: Some(2),
        upgradable: true,
        tcp: true,
        ..ServerOptions::default()
    }
    .env("NOTIFY_SOCKET", &manager.path.display().to_string())
    .env("FDSTORE", "16384")
}

/// Starts the server again as the manager would after it exited: with the fd store.
fn start_again(manager: &ServiceManager, server: &TestServer) -> ChildGuard {
    let config = server.config_path();
    manager.start(
        &server.binary(),
        &["--config", config.to_str().unwrap()],
        server.dir(),
    )
}

fn restored_count(server: &TestServer) -> usize {
    server
        .stderr()
        .matches("restored the allocations kept across the restart")
        .count()
}

#[test]
fn restart_and_crash_keep_a_call() {
    let mdir = tempfile::tempdir().unwrap();
    let manager = ServiceManager::new(mdir.path());
    let server = TestServer::start(unit_options(&manager));
    manager.wait_message("READY=1", Duration::from_secs(5), |m| m.contains("READY=1"));
    let call = Call::start(server.addr, USER, PASSWORD);
    std::thread::sleep(Duration::from_millis(1500));
    // Everything the next process needs is in the store.
    let names = manager.stored_names();
    let relay = format!("ru-{}-{}", call.relayed.ip(), call.relayed.port());
    for want in [
        "l-0-0",
        "l-1-0",
        "state-a",
        "state-b",
        "control",
        relay.as_str(),
    ] {
        assert!(names.iter().any(|n| n == want), "{want} stored: {names:?}");
    }

    // A TCP client: its connection ends with the process, and its allocation with a
    // usage record.
    let mut tcp = TurnClient::tcp(None, server.addr).unwrap();
    tcp.must_allocate();

    // systemctl restart: SIGUSR1 (the unit's RestartKillSignal=), then a new start.
    let first = server.pid().unwrap();
    call.take_longest_gap();
    signal(first, "USR1");
    let mut server = server;
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGUSR1: exits 0 at once ({status:?})\n{}",
        server.logs()
    );
    let ended: Vec<String> = server
        .stderr()
        .lines()
        .filter(|l| l.contains("allocation ended"))
        .map(str::to_owned)
        .collect();
    assert!(
        ended.len() == 1
            && ended[0].contains("transport=\"tcp\"")
            && ended[0].contains("reason=\"shutdown\""),
        "only the TCP client's allocation ended at the restart, with its record: {ended:#?}"
    );
    let mut second = start_again(&manager, &server);
    server.wait_log("restored", Duration::from_secs(10), |l| {
        l.matches("restored the allocations kept across the restart")
            .count()
            >= 1
    });
    std::thread::sleep(Duration::from_millis(500));
    let peer = SocketAddr::from(([127, 0, 0, 1], 21_001));
    if let Err(e) = call.check_alive(LIFETIME, CHANNEL + 1, peer) {
        panic!("after the restart: {e}\n{}", server.logs());
    }
    let restart_gap = call.take_longest_gap();
    std::thread::sleep(Duration::from_millis(1500));

    // A crash: kill -9, then the manager starts it again. What the killed process had
    // read from a socket and not yet sent dies with it (a packet or two); everything
    // that waited in the sockets' buffers is relayed.
    call.take_longest_gap();
    call.allow_loss(8);
    signal(second.id().unwrap(), "KILL");
    assert!(second.wait_exit(Duration::from_secs(5)).is_some());
    let _third = start_again(&manager, &server);
    server.wait_log("restored again", Duration::from_secs(10), |l| {
        l.matches("restored the allocations kept across the restart")
            .count()
            >= 2
    });
    std::thread::sleep(Duration::from_millis(500));
    let peer = SocketAddr::from(([127, 0, 0, 1], 21_002));
    if let Err(e) = call.check_alive(LIFETIME, CHANNEL + 2, peer) {
        panic!("after the crash: {e}\n{}", server.logs());
    }
    let crash_gap = call.take_longest_gap();
    let lost = call.allow_loss(0);
    std::thread::sleep(Duration::from_millis(1000));
    let report = call.finish(Duration::from_millis(500));
    eprintln!(
        "restart then kill -9 under the fd store: longest silence {restart_gap:?} across \
         the restart (SIGUSR1 to serving again, the stand-in manager starting it at once), \
         {crash_gap:?} across the kill -9 (packets the killed process had in hand, by \
         direction: {lost:?})\n{report}"
    );
    report.assert_whole(&server.logs());
    assert_eq!(restored_count(&server), 2);
    let messages = manager.messages();
    assert!(
        !messages.iter().any(|m| m.contains("STOPPING=1")),
        "a restart keeping calls is not a stop: {messages:#?}"
    );
    assert!(messages.iter().filter(|m| m.contains("READY=1")).count() >= 3);
}

#[test]
fn upgrade_hands_the_unit_to_the_new_process() {
    let mdir = tempfile::tempdir().unwrap();
    let manager = ServiceManager::new(mdir.path());
    let server = TestServer::start(unit_options(&manager));
    manager.wait_message("READY=1", Duration::from_secs(5), |m| m.contains("READY=1"));
    let call = Call::start(server.addr, USER, PASSWORD);
    std::thread::sleep(Duration::from_millis(500));
    let up = server.must_upgrade();
    // The new process says it is the main process now, and ready; the old one never
    // says it is stopping (the unit stays active).
    let mainpid = format!("MAINPID={}", up.pid);
    manager.wait_message("MAINPID", Duration::from_secs(5), |m| m.contains(&mainpid));
    let ready = manager
        .messages()
        .iter()
        .filter(|m| m.contains("READY=1"))
        .count();
    assert!(ready >= 2, "READY=1 from both processes");
    std::thread::sleep(Duration::from_millis(1500));
    // The old process has exited (it had no TCP/TLS clients to keep).
    let mut server = server;
    assert!(server.wait_exit(Duration::from_secs(5)).is_some());
    if let Err(e) = call.check_alive(
        LIFETIME,
        CHANNEL + 1,
        SocketAddr::from(([127, 0, 0, 1], 21_003)),
    ) {
        panic!("after the upgrade: {e}\n{}", server.logs());
    }
    // Its journals and sockets are the new process's: a restart after the upgrade
    // restores the call from them.
    signal(up.pid, "USR1");
    wait_for(
        "the upgraded process to exit",
        Duration::from_secs(10),
        || {
            (!std::path::Path::new(&format!("/proc/{}", up.pid)).exists()
                || std::fs::read_to_string(format!("/proc/{}/stat", up.pid))
                    .is_ok_and(|s| s.contains(") Z ")))
            .then_some(())
        },
    );
    let _next = start_again(&manager, &server);
    server.wait_log("restored", Duration::from_secs(10), |l| {
        l.contains("restored the allocations kept across the restart")
    });
    std::thread::sleep(Duration::from_millis(500));
    if let Err(e) = call.check_alive(
        LIFETIME,
        CHANNEL + 2,
        SocketAddr::from(([127, 0, 0, 1], 21_004)),
    ) {
        panic!("after the restart: {e}\n{}", server.logs());
    }
    let report = call.finish(Duration::from_millis(500));
    eprintln!("upgrade then restart under the fd store:\n{report}");
    report.assert_whole(&server.logs());
    let messages = manager.messages();
    assert!(
        !messages.iter().any(|m| m.contains("STOPPING=1")),
        "{messages:#?}"
    );
}
