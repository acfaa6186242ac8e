//! `turnstone upgrade` keeps calls: numbered packets both ways (ChannelData and
//! Send/Data indications, 500/s each way) through 20 upgrades in a row, with a
//! rollback, a binary that dies and one that refuses its configuration among them.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::call::{Call, CHANNEL};
use common::*;

/// Every allocation's lifetime (`[limits] default_lifetime`): short enough that the
/// allocation left alone expires during the upgrades.
const LIFETIME: Duration = Duration::from_secs(20);

#[test]
fn twenty_upgrades_keep_a_call_whole() {
    let server = TestServer::start(
        ServerOptions {
            upgradable: true,
            workers: Some(2),
            ..ServerOptions::default()
        }
        .limits_toml(&format!("default_lifetime = \"{}s\"", LIFETIME.as_secs())),
    );
    let call = Call::start(server.addr, USER, PASSWORD);
    let a = call.peer_a;
    // A second allocation left alone: it must expire when it was due, upgrades or not.
    let mut idle = TurnClient::udp(server.addr, USER, PASSWORD);
    idle.must_allocate();
    let idle_created = Instant::now();
    let mut idle_checked = (false, false);
    // Alive just before its expiry, gone just after.
    let check_idle = |idle: &mut TurnClient, checked: &mut (bool, bool)| {
        let age = idle_created.elapsed();
        if !checked.0
            && age >= LIFETIME - Duration::from_secs(4)
            && age < LIFETIME - Duration::from_millis(1500)
        {
            idle.permit(a);
            checked.0 = true;
        }
        if !checked.1 && age > LIFETIME + Duration::from_millis(1500) {
            let r = idle.create_permission(a);
            assert_eq!(
                r.code(),
                Some(437),
                "the idle allocation expired on time: {}",
                r.describe()
            );
            checked.1 = true;
        }
    };

    let previous = server.dir().join("bin").join("turnstone-previous");
    std::fs::copy(env!("CARGO_BIN_EXE_turnstone"), &previous).unwrap();
    let mut upgrades = Vec::new();
    let mut gaps = Vec::new();
    for i in 0..20u16 {
        call.take_longest_gap();
        std::thread::sleep(Duration::from_millis(700));
        match i {
            // A new binary that dies at once: the old process goes on.
            5 => {
                server.install_script("dies", "echo 'dying on purpose' >&2; exit 3");
                let e = server
                    .upgrade()
                    .expect_err("a dying binary cannot take over");
                assert!(e.contains("exited"), "the command says why: {e}");
                server.install_built_binary();
            }
            // One that refuses the configuration (here: no file there).
            9 => {
                let real = env!("CARGO_BIN_EXE_turnstone");
                server.install_script(
                    "bad-config",
                    &format!("exec {real} --config /nonexistent/turnstone.toml"),
                );
                let e = server.upgrade().expect_err("a refused configuration");
                assert!(e.contains("exited"), "the command says why: {e}");
                server.install_built_binary();
            }
            // A rollback: to the binary installed before, then forward again.
            12 => {
                server.install_binary(&previous);
                upgrades.push(server.must_upgrade());
                server.install_built_binary();
            }
            _ => upgrades.push(server.must_upgrade()),
        }
        // Settle, then the longest silence around this upgrade (a successful one, or a
        // failed one that the old process survived).
        std::thread::sleep(Duration::from_millis(100));
        gaps.push(call.take_longest_gap());
        // After each: Refresh, a new ChannelBind, and Allocate on the same 5-tuple is
        // 437 (the allocation moved; it was not made anew).
        let peer = SocketAddr::from(([127, 0, 0, 1], 20_000 + i));
        if let Err(e) = call.check_alive(LIFETIME.as_secs() as u32, CHANNEL + 1 + i, peer) {
            panic!("after upgrade {i}: {e}\n{}", server.logs());
        }
        check_idle(&mut idle, &mut idle_checked);
    }
    while !idle_checked.1 {
        check_idle(&mut idle, &mut idle_checked);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        idle_checked.0,
        "the idle allocation was checked alive before it expired"
    );
    let report = call.finish(Duration::from_millis(500));
    let pauses: Vec<f64> = upgrades.iter().map(|u| u.pause_ms).collect();
    let gaps_ms: Vec<f64> = gaps.iter().map(|g| g.as_secs_f64() * 1000.0).collect();
    eprintln!(
        "{} upgrades; hand-over pauses (ms): {pauses:.1?}\nlongest silence of the call \
         around each of the 20 upgrade attempts (ms; packets every 4 ms per direction): \
         {gaps_ms:.1?}\n{report}",
        upgrades.len()
    );
    report.assert_whole(&server.logs());
    assert_eq!(upgrades.len(), 18, "18 upgrades succeeded (2 refused)");
    assert!(upgrades
        .iter()
        .all(|u| u.allocations == 2 || u.allocations == 1));
    // The idle allocation's end was recorded once, as expired.
    let log = server.stderr();
    let ended: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("allocation ended"))
        .collect();
    assert_eq!(ended.len(), 1, "one allocation ended: {ended:#?}");
    assert!(ended[0].contains("reason=\"expired\""), "{}", ended[0]);
}
