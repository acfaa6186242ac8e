//! `turnstone upgrade` with the kernel fast path on (root, namespace rig): a call
//! relayed in the kernel (ChannelData and Send/Data, 1000 packets/s each way) loses
//! nothing and keeps its order across an upgrade, the new process relays it in the
//! kernel again, and the final usage record counts every packet of both processes; an
//! upgrade that fails (a binary that dies at once, one that takes the state and
//! refuses it) leaves the call whole and back in the kernel within seconds.
//
// The rig (namespaces, routes, configuration, the call) is tests/common/fastpath.rs.

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::call::CallReport;
use common::fastpath::{config, rig, upgradable, upgrade, usage, Relayed, RigCall, Usage, STREAMS};
use common::netns::Netns;
use common::upgrade::{install, install_script};
use common::ChildGuard;

/// One rig at a time: the tests attach to the same kind of interfaces and count packets.
static SERIAL: Mutex<()> = Mutex::new(());

/// The call's packets each way per second (each stream half of it).
const RATE: f64 = 1000.0;

/// Waits `d` and reads the counters (they are read from the kernel twice a second).
fn after(n: &Netns, d: Duration) -> Relayed {
    std::thread::sleep(d);
    Relayed::read(n)
}

/// Between `a` and `b` (read `secs` apart) the kernel relayed each stream at about its
/// rate, userspace relayed none of it, and entries are in the kernel's maps.
fn in_kernel(a: &Relayed, b: &Relayed, secs: f64, what: &str) {
    for (k, s) in STREAMS.iter().enumerate() {
        let rose = b.kernel[k] - a.kernel[k];
        assert!(
            rose >= RATE / 2.0 * secs * 0.5,
            "{what}: the kernel relayed {rose} packets {s:?} in {secs} s\n{a:?}\n{b:?}"
        );
    }
    assert_eq!(a.user, b.user, "{what}: relayed in userspace meanwhile");
    // A permission and a channel, each once per direction.
    assert_eq!(b.entries, 4.0, "{what}: the kernel's entries");
}

/// Ends the call: every packet arrived; after Refresh 0 the usage record (one, from
/// whichever process ends the allocation) counts every packet sent each way. The caller
/// checks the order last ([`CallReport::assert_whole`]), after everything else.
fn end_call(call: RigCall, server: &ChildGuard) -> (CallReport, Usage) {
    let (mut client, report) = call.finish(Duration::from_millis(500));
    eprintln!("{report}");
    assert_eq!(
        report.sent, report.received,
        "every packet arrived\n{report}"
    );
    client.refresh(0).expect_success("Refresh 0");
    let u = common::wait_for("the usage record", Duration::from_secs(5), || {
        let u = usage(&server.output());
        (u.allocations > 0).then_some(u)
    });
    eprintln!("usage record: {u:?}");
    let s = report.sent;
    assert_eq!(u.allocations, 1, "one record\n{}", server.output());
    assert_eq!(
        (u.packets_to_peer, u.packets_to_client),
        (u64::from(s[0] + s[1]), u64::from(s[2] + s[3])),
        "the usage record counts every packet relayed ({u:?})"
    );
    (report, u)
}

#[test]
fn an_upgrade_keeps_the_call_in_the_kernel_and_counts_every_packet() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = rig();
    let dir = tempfile::tempdir().unwrap();
    let mut server = upgradable(
        &n,
        "server",
        dir.path(),
        "turnstone",
        &config("required", ""),
    );
    assert!(
        server.output().contains("kernel fast path on"),
        "{}",
        server.output()
    );
    let call = RigCall::start(&n);
    let a = after(&n, Duration::from_millis(1500));
    let old = after(&n, Duration::from_millis(1500));
    in_kernel(&a, &old, 1.5, "the old process");

    let started = Instant::now();
    let (pid, pause_ms) = upgrade(&n, "server", dir.path())
        .unwrap_or_else(|e| panic!("upgrade failed: {e}\n{}", server.output()));
    let took = started.elapsed();
    assert!(server.output().contains("upgrade: serving"));
    let st = server
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the old process goes\n{}", server.output()));
    assert!(st.success(), "the old process: {st}\n{}", server.output());
    eprintln!(
        "upgraded to pid {pid} in {took:?}, pause {pause_ms:.1} ms; the old process relayed \
         (kernel) {:?}, (userspace) {:?} by 1 s before the upgrade",
        old.kernel, old.user
    );

    // The new process: its own program, every entry installed again, the call in the
    // kernel; in userspace only what queued in the sockets while nobody read them.
    let c = after(&n, Duration::from_millis(1500));
    let d = after(&n, Duration::from_millis(2000));
    eprintln!("new process: {c:?}\n  2 s later: {d:?}");
    in_kernel(&c, &d, 2.0, "the new process");
    // What queued during the pause (both ways), and what arrived while the new process
    // read it (its entries wait for that).
    let queued = 2.0 * RATE * pause_ms / 1000.0;
    assert!(
        d.user_total() <= queued * 1.2 + 50.0,
        "the new process relayed {} packets in userspace ({:?}); the pause ({pause_ms:.1} ms) \
         queued about {queued}",
        d.user_total(),
        d.user
    );

    let (report, u) = end_call(call, &server);
    // The new process's kernel counts are in the record as such; the old's were folded.
    let e = Relayed::read(&n);
    assert_eq!(
        (u.kernel_packets_to_peer, u.kernel_packets_to_client),
        (
            (e.kernel[0] + e.kernel[1]) as u64,
            (e.kernel[2] + e.kernel[3]) as u64
        ),
        "the record's kernel counts are the new process's ({e:?})"
    );
    eprintln!(
        "longest gap {:?}; new process at the end: kernel {:?}, userspace {:?}",
        report.longest(),
        e.kernel,
        e.user
    );
    report.assert_whole("in order across the upgrade");
}

#[test]
fn a_failed_upgrade_keeps_the_call_and_the_kernel_path() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = rig();
    let dir = tempfile::tempdir().unwrap();
    let toml = config("required", "");
    let server = upgradable(&n, "server", dir.path(), "turnstone", &toml);
    let call = RigCall::start(&n);
    let a = after(&n, Duration::from_millis(1500));
    let b = after(&n, Duration::from_millis(1500));
    in_kernel(&a, &b, 1.5, "before the upgrades");

    // A binary that dies at once: it never says hello, so the old process never gave
    // its program up.
    install_script(dir.path(), "dies", "echo 'dying on purpose' >&2; exit 3");
    let e = upgrade(&n, "server", dir.path()).expect_err("a dying binary cannot take over");
    assert!(e.contains("exited"), "the command says why: {e}");
    install(
        dir.path(),
        std::path::Path::new(env!("CARGO_BIN_EXE_turnstone")),
    );
    let c = after(&n, Duration::from_millis(1000));
    let d = after(&n, Duration::from_millis(1500));
    eprintln!("after the dying binary: {c:?}\n  1.5 s later: {d:?}");
    in_kernel(&c, &d, 1.5, "after the dying binary");

    // One that takes the state and refuses it (its listeners are not the running
    // server's): the old process had given its program up and frozen its sockets; it
    // loads its program again, thaws and installs every entry again.
    let other = dir.path().join("other.toml");
    std::fs::write(&other, toml.replace(":3478\"", ":3479\"")).unwrap();
    install_script(
        dir.path(),
        "refuses",
        &format!(
            "exec {} --config {}",
            env!("CARGO_BIN_EXE_turnstone"),
            other.display()
        ),
    );
    let before = Relayed::read(&n);
    let started = Instant::now();
    let e = upgrade(&n, "server", dir.path()).expect_err("a refused state");
    assert!(e.contains("refused") && e.contains("listen"), "{e}");
    assert!(
        server
            .output()
            .contains("upgrade failed; this process goes on serving"),
        "{}",
        server.output()
    );
    install(
        dir.path(),
        std::path::Path::new(env!("CARGO_BIN_EXE_turnstone")),
    );
    // Back in the kernel: over one reading of the counters to the next (0.6 s), the
    // kernel relayed every stream and userspace none (the detach's last reading of the
    // old program's counters, and the entries gauge as it was, do not count).
    let mut prev = Relayed::read(&n);
    let back = common::wait_for("back in the kernel", Duration::from_secs(6), || {
        std::thread::sleep(Duration::from_millis(600));
        let r = Relayed::read(&n);
        let rising = r.kernel.iter().zip(&prev.kernel).all(|(x, y)| x > y);
        let whole = rising && r.user == prev.user && r.entries == 4.0;
        prev = r;
        whole.then_some(started.elapsed())
    });
    let f = after(&n, Duration::from_millis(1000));
    let g = after(&n, Duration::from_millis(1500));
    eprintln!(
        "refused: {:?} before; back in the kernel by {back:?} after the upgrade began\n  \
         {f:?}\n  1.5 s later: {g:?}",
        before
    );
    in_kernel(&f, &g, 1.5, "after the refused state");
    let u_rose = g.user_total() - before.user_total();
    eprintln!("relayed in userspace during the failed upgrade: {u_rose}");

    let (report, u) = end_call(call, &server);
    // Nothing was folded twice nor lost: the record's kernel counts are those of the
    // program loaded again, the rest in the allocation's usage.
    let e = Relayed::read(&n);
    let total_kernel: f64 = e.kernel.iter().sum();
    let total_user: f64 = e.user.iter().sum();
    eprintln!("metrics at the end: kernel {total_kernel}, userspace {total_user}; {u:?}");
    assert_eq!(
        (u.packets_to_peer + u.packets_to_client) as f64,
        total_kernel + total_user,
        "the metrics (one process throughout) and the record agree"
    );
    report.assert_whole("in order across two failed upgrades");
}
