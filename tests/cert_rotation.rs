//! Certificates that rotate: a certificate and key changed on disk (renamed over, certbot's re-pointed symlinks, a Kubernetes Secret's `..data` swap) reach new TLS handshakes within seconds without SIGHUP while open connections keep working, and a half-written or mismatched pair is refused with a log line naming the file, the last good certificate staying until the pair is fixed.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    tls_client_config_trusting, tls_connect, ServerOptions, Stream, TestCert, TestServer,
    TurnClient, PASSWORD, USER,
};

/// How long a change on disk may take to reach new handshakes (the server polls every
/// second and waits one poll for the files to hold still: about 2 s).
const ROTATION: Duration = Duration::from_secs(10);
/// How long the server gets to log that it refused a pair.
const REFUSAL: Duration = Duration::from_secs(10);

/// The end-entity certificate (DER) a new TLS handshake gets, trusting `trust`.
fn presented(server: &TestServer, trust: &[&TestCert]) -> Result<Vec<u8>, String> {
    let cfg = tls_client_config_trusting(trust, &[&rustls::version::TLS13], &[b"stun.turn"]);
    let addr = server.tls_addr.expect("a tls listener");
    let t = tls_connect(addr, "localhost", cfg)?;
    t.conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .ok_or_else(|| "no peer certificate".to_string())
}

/// Polls new handshakes (every 100 ms) until they present `want`; how long it took.
fn wait_presented(
    server: &TestServer,
    trust: &[&TestCert],
    want: &TestCert,
    what: &str,
) -> Duration {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < ROTATION {
        match presented(server, trust) {
            Ok(der) if der == want.cert_der => return start.elapsed(),
            Ok(_) => last = "the previous certificate".into(),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: new handshakes still get {last} after {ROTATION:?}");
}

/// A TURN client over TLS with an allocation, kept open across a rotation.
fn tls_allocation(server: &TestServer, trust: &[&TestCert]) -> TurnClient {
    let cfg = tls_client_config_trusting(trust, &[&rustls::version::TLS13], &[b"stun.turn"]);
    let t = tls_connect(server.tls_addr.expect("tls"), "localhost", cfg).expect("TLS handshake");
    let mut c = TurnClient::stream(Stream::Tls(Box::new(t)), USER, PASSWORD);
    c.must_allocate();
    c
}

/// Hex SHA-256 of a DER certificate, as the server's log line shows it.
fn sha256(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The old connection still relays requests: a Refresh on it succeeds.
fn assert_still_works(c: &mut TurnClient, what: &str) {
    if let Err(e) = c.try_refresh(600) {
        panic!("{what}: the connection opened before the rotation: {e}");
    }
}

/// What the server logged about `cert` being loaded after its files changed.
fn assert_logged_reload(server: &TestServer, cert: &TestCert) {
    let fp = sha256(&cert.cert_der);
    server.wait_log(
        "the new certificate's fingerprint",
        Duration::from_secs(3),
        |l| {
            l.lines().any(|l| {
                l.contains("tls certificate loaded")
                    && l.contains(&fp)
                    && l.contains("files changed")
            })
        },
    );
    assert!(
        !server.stderr().contains("configuration reloaded"),
        "no SIGHUP reload was asked for"
    );
}

/// Writes `bytes` to `to` through a temporary file renamed over it (atomic).
fn replace(to: &Path, bytes: &[u8]) {
    let tmp = to.with_extension("new");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

#[test]
fn files_renamed_over_are_served_without_sighup() {
    let server = TestServer::start(ServerOptions::default().tls().metrics());
    let old = server.cert.clone().expect("harness certificate");
    let spare = tempfile::tempdir().unwrap();
    let new = TestCert::generate(spare.path());
    let trust = [&old, &new];
    assert_eq!(presented(&server, &trust).unwrap(), old.cert_der);
    let mut client = tls_allocation(&server, &trust);

    // The key first, then the certificate, each renamed over the file the config names.
    replace(&old.key_pem, &std::fs::read(&new.key_pem).unwrap());
    replace(&old.cert_pem, &std::fs::read(&new.cert_pem).unwrap());
    let took = wait_presented(&server, &trust, &new, "renamed files");
    eprintln!("new certificate served {took:?} after the rename");
    assert_logged_reload(&server, &new);
    assert_still_works(&mut client, "renamed files");
    // And a fresh client allocates over the new certificate.
    let mut fresh = tls_allocation(&server, &[&new]);
    assert_still_works(&mut fresh, "a client of the new certificate");
    assert_eq!(
        server.metric(
            "turnstone_tls_certificate_reloads_total",
            &[("result", "ok")]
        ),
        Some(1.0)
    );
    // rcgen's self-signed certificates are valid until 4096-01-01.
    assert_eq!(
        server.metric("turnstone_tls_certificate_expiry_timestamp_seconds", &[]),
        Some(67_090_118_400.0)
    );
}

#[test]
fn certbot_symlinks_repointed_are_served() {
    // certbot: live/NAME/{fullchain,privkey}.pem -> ../../archive/NAME/{...}N.pem; a
    // renewal writes the N+1 files and re-points each link (unlink, then symlink).
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive/turn");
    let live = dir.path().join("live/turn");
    std::fs::create_dir_all(&archive).unwrap();
    std::fs::create_dir_all(&live).unwrap();
    let one = TestCert::generate_at(
        &archive.join("fullchain1.pem"),
        &archive.join("privkey1.pem"),
    );
    let chain = live.join("fullchain.pem");
    let key = live.join("privkey.pem");
    std::os::unix::fs::symlink("../../archive/turn/fullchain1.pem", &chain).unwrap();
    std::os::unix::fs::symlink("../../archive/turn/privkey1.pem", &key).unwrap();
    let served = TestCert {
        cert_pem: chain.clone(),
        key_pem: key.clone(),
        cert_der: one.cert_der.clone(),
    };
    let server = TestServer::start(ServerOptions::default().tls_with(served));
    let two = TestCert::generate_at(
        &archive.join("fullchain2.pem"),
        &archive.join("privkey2.pem"),
    );
    let trust = [&one, &two];
    assert_eq!(presented(&server, &trust).unwrap(), one.cert_der);
    let mut client = tls_allocation(&server, &trust);

    for (link, target) in [
        (&chain, "../../archive/turn/fullchain2.pem"),
        (&key, "../../archive/turn/privkey2.pem"),
    ] {
        std::fs::remove_file(link).unwrap();
        std::os::unix::fs::symlink(target, link).unwrap();
    }
    wait_presented(&server, &trust, &two, "certbot's re-pointed symlinks");
    assert_logged_reload(&server, &two);
    assert_still_works(&mut client, "certbot renewal");
}

#[test]
fn kubernetes_secret_data_swap_is_served() {
    // A Secret mounted as a volume: tls.crt -> ..data/tls.crt, ..data -> ..TIMESTAMP; an
    // update writes a new ..TIMESTAMP directory, renames a new symlink over ..data and
    // removes the old directory (kubelet's AtomicWriter).
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path();
    let version = |n: u32| {
        let d = mount.join(format!("..2026_12_05_10_00_0{n}.{n}"));
        std::fs::create_dir(&d).unwrap();
        let c = TestCert::generate_at(&d.join("tls.crt"), &d.join("tls.key"));
        (d, c)
    };
    let (v1, one) = version(1);
    std::os::unix::fs::symlink(v1.file_name().unwrap(), mount.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/tls.crt", mount.join("tls.crt")).unwrap();
    std::os::unix::fs::symlink("..data/tls.key", mount.join("tls.key")).unwrap();
    let served = TestCert {
        cert_pem: mount.join("tls.crt"),
        key_pem: mount.join("tls.key"),
        cert_der: one.cert_der.clone(),
    };
    let server = TestServer::start(ServerOptions::default().tls_with(served));
    let trust_one = [&one];
    assert_eq!(presented(&server, &trust_one).unwrap(), one.cert_der);

    let (v2, two) = version(2);
    let trust = [&one, &two];
    let mut client = tls_allocation(&server, &trust);
    std::os::unix::fs::symlink(v2.file_name().unwrap(), mount.join("..data_tmp")).unwrap();
    std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
    std::fs::remove_dir_all(&v1).unwrap();
    wait_presented(&server, &trust, &two, "the ..data symlink swap");
    assert_logged_reload(&server, &two);
    assert_still_works(&mut client, "Secret update");

    // And the next update after that.
    let (v3, three) = version(3);
    let trust = [&two, &three];
    std::os::unix::fs::symlink(v3.file_name().unwrap(), mount.join("..data_tmp")).unwrap();
    std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
    std::fs::remove_dir_all(&v2).unwrap();
    wait_presented(&server, &trust, &three, "a second ..data swap");
    assert_still_works(&mut client, "second Secret update");
}

#[test]
fn half_written_or_mismatched_pair_is_refused_until_fixed() {
    let server = TestServer::start(ServerOptions::default().tls().metrics());
    let old = server.cert.clone().expect("harness certificate");
    let spare = tempfile::tempdir().unwrap();
    let new = TestCert::generate(spare.path());
    let trust = [&old, &new];
    let mut client = tls_allocation(&server, &trust);
    let cert_path = old.cert_pem.display().to_string();
    let key_path = old.key_pem.display().to_string();
    let refusals = |server: &TestServer| {
        server
            .stderr()
            .lines()
            .filter(|l| l.contains("tls certificate not reloaded"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };

    // A half-written certificate file: written in place, cut in the middle of the PEM.
    let pem = std::fs::read(&new.cert_pem).unwrap();
    std::fs::write(&old.cert_pem, &pem[..pem.len() / 2]).unwrap();
    let log = server.wait_log("the half-written certificate refused", REFUSAL, |_| {
        !refusals(&server).is_empty()
    });
    let line = refusals(&server).remove(0);
    assert!(
        line.contains(&cert_path),
        "names the certificate file: {line}\n{log}"
    );
    for _ in 0..3 {
        assert_eq!(
            presented(&server, &trust).unwrap(),
            old.cert_der,
            "the last good certificate stays"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        refusals(&server).len(),
        1,
        "refused once while the files stay"
    );

    // The certificate complete, the key still the old one: the pair does not match.
    std::fs::write(&old.cert_pem, &pem).unwrap();
    server.wait_log("the mismatched pair refused", REFUSAL, |_| {
        refusals(&server).len() >= 2
    });
    let line = refusals(&server).remove(1);
    assert!(
        line.contains(&key_path) && line.contains("does not match"),
        "names the key file: {line}"
    );
    assert_eq!(presented(&server, &trust).unwrap(), old.cert_der);
    assert_still_works(&mut client, "after the refusals");

    // The new key arrives: the pair loads.
    std::fs::write(&old.key_pem, std::fs::read(&new.key_pem).unwrap()).unwrap();
    wait_presented(&server, &trust, &new, "the fixed pair");
    assert_logged_reload(&server, &new);
    assert_still_works(&mut client, "after the fix");
    assert_eq!(
        server.metric(
            "turnstone_tls_certificate_reloads_total",
            &[("result", "refused")]
        ),
        Some(2.0)
    );
    assert_eq!(
        server.metric(
            "turnstone_tls_certificate_reloads_total",
            &[("result", "ok")]
        ),
        Some(1.0)
    );
}

#[test]
fn sighup_to_other_files_then_watches_those() {
    // A reload that names other files: the watcher follows the new paths, and a change to
    // the old files is ignored.
    let server = TestServer::start(ServerOptions::default().tls());
    let old = server.cert.clone().expect("harness certificate");
    let elsewhere = tempfile::tempdir().unwrap();
    let second = TestCert::generate(elsewhere.path());
    let text = server
        .config_for(&server.options)
        .replace(
            &old.cert_pem.display().to_string(),
            &second.cert_pem.display().to_string(),
        )
        .replace(
            &old.key_pem.display().to_string(),
            &second.key_pem.display().to_string(),
        );
    assert!(
        text.contains(&second.key_pem.display().to_string()),
        "{text}"
    );
    server.reload_raw(&text, true);
    let trust = [&old, &second];
    assert_eq!(
        presented(&server, &trust).unwrap(),
        second.cert_der,
        "SIGHUP loads at once"
    );

    // A change to the files no longer named: ignored.
    let spare = tempfile::tempdir().unwrap();
    let stray = TestCert::generate(spare.path());
    replace(&old.key_pem, &std::fs::read(&stray.key_pem).unwrap());
    replace(&old.cert_pem, &std::fs::read(&stray.cert_pem).unwrap());
    let trust = [&old, &second, &stray];
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            presented(&server, &trust).unwrap(),
            second.cert_der,
            "the files the configuration no longer names are not watched"
        );
    }

    // A change to the files now named: served.
    let fresh = tempfile::tempdir().unwrap();
    let next = TestCert::generate(fresh.path());
    replace(&second.key_pem, &std::fs::read(&next.key_pem).unwrap());
    replace(&second.cert_pem, &std::fs::read(&next.cert_pem).unwrap());
    let trust = [&old, &second, &stray, &next];
    wait_presented(&server, &trust, &next, "a change to the reloaded files");
}
