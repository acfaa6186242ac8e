//! Managed Redis over TLS: a `rediss://` fleet store is reached with the system roots (SSL_CERT_FILE) or `[store] ca_file` / `--store-ca`, as a Redis ACL user named in the URL; a plain `redis://` to a TLS-only server, an untrusted certificate and a refused password fail with messages naming the setting to change, never the password.

mod common;

use std::time::Duration;

use common::redis_server::{Redis, RedisFlavor, RedisTls};
use common::{free_tcp_port, run_turnstone, wait_for, ServerOptions, TestServer, TurnClient};

const REALM: &str = "store-tls.test";

/// A node of the store at `url` (trusting `ca` if given), with metrics.
fn node(url: &str, ca: Option<&std::path::Path>) -> ServerOptions {
    let mut o = ServerOptions::default()
        .realm(REALM)
        .workers(1)
        .users(&[("local", "node-local-only")])
        .secrets(&[])
        .metrics()
        .store(url, "n1");
    o.store_ca = ca.map(|p| p.to_path_buf());
    o
}

/// The node's first (and only) warning that the store is unreachable.
fn unreachable_warning(server: &TestServer) -> String {
    let log = server.wait_log("fleet store unreachable", Duration::from_secs(10), |l| {
        l.contains("fleet store unreachable")
    });
    let line = log
        .lines()
        .find(|l| l.contains("fleet store unreachable"))
        .unwrap_or_default()
        .to_string();
    assert_eq!(server.metric("turnstone_store_up", &[]), Some(0.0));
    eprintln!("store_tls: {line}");
    line
}

/// `turnstone users list` with `args` appended: it must fail; its stderr.
fn cli_fails(args: &[&str]) -> String {
    let mut all = vec!["users", "list"];
    all.extend_from_slice(args);
    let out = run_turnstone(&all);
    assert!(
        !out.status.success(),
        "turnstone {all:?} succeeded: {}",
        out.stdout
    );
    out.stderr
}

/// Adds `name` through the CLI and waits until it allocates on `server`.
fn user_allocates(redis: &Redis, server: &TestServer, name: &str) {
    let store = redis.store_args();
    let mut args = vec![
        "users",
        "add",
        name,
        "--password",
        "pw-of-user",
        "--realm",
        REALM,
    ];
    args.extend(store.iter().map(String::as_str));
    let out = run_turnstone(&args);
    assert!(out.status.success(), "users add: {}", out.stderr);
    let mut c = TurnClient::udp(server.addr, name, "pw-of-user").with_realm(REALM);
    wait_for(
        "the user added over TLS allocates",
        Duration::from_secs(5),
        || c.allocate().relayed(),
    );
}

#[test]
fn ca_file_and_acl_user_in_the_url() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start_as(&RedisFlavor::tls_acl(), free_tcp_port(), dir.path());
    assert!(redis.url().starts_with("rediss://turnstone:redis-acl-pw@"));
    let server = TestServer::start(node(&redis.url(), redis.ca_file()));
    wait_for("store_up 1", Duration::from_secs(5), || {
        (server.metric("turnstone_store_up", &[]) == Some(1.0)).then_some(())
    });
    user_allocates(&redis, &server, "tls-user");
    // The session registry is written through the ACL user.
    let mut con = redis.con();
    let whoami: String = redis::cmd("ACL")
        .arg("WHOAMI")
        .query(&mut con)
        .expect("ACL WHOAMI");
    assert_eq!(whoami, "turnstone");
    let nodes: Vec<String> = redis::cmd("KEYS")
        .arg("turnstone:node:*")
        .query(&mut con)
        .unwrap();
    assert_eq!(nodes, vec!["turnstone:node:n1".to_string()]);
    let log = server.stderr();
    assert!(log.contains("fleet store connected"), "{log}");
    assert!(
        !log.contains("redis-acl-pw"),
        "the store password must not be logged:\n{log}"
    );
}

#[test]
fn system_roots_from_ssl_cert_file() {
    // No ca_file: the system roots, which SSL_CERT_FILE replaces (rustls-native-certs).
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start_as(&RedisFlavor::tls(), free_tcp_port(), dir.path());
    let ca = redis.ca_file().unwrap().display().to_string();
    let server = TestServer::start(node(&redis.url(), None).env("SSL_CERT_FILE", &ca));
    wait_for("store_up 1", Duration::from_secs(5), || {
        (server.metric("turnstone_store_up", &[]) == Some(1.0)).then_some(())
    });
    user_allocates(&redis, &server, "roots-user");

    // Without SSL_CERT_FILE the test CA is not among the system roots: refused, and the
    // message says how to trust a private CA.
    let other = TestServer::start(node(&redis.url(), None).env_remove("SSL_CERT_FILE"));
    let line = unreachable_warning(&other);
    assert!(
        line.contains("store.url") && line.contains("not trusted by the system roots"),
        "{line}"
    );
    assert!(line.contains("store.ca_file"), "{line}");
}

#[test]
fn plain_url_to_a_tls_only_server_says_use_rediss() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start_as(&RedisFlavor::tls(), free_tcp_port(), dir.path());
    let plain = format!("redis://127.0.0.1:{}/", redis.port);
    let server = TestServer::start(node(&plain, None));
    let line = unreachable_warning(&server);
    assert!(
        line.contains("store.url") && line.contains("must start with rediss://"),
        "{line}"
    );
    let err = cli_fails(&["--store", &plain]);
    assert!(
        err.contains("--store") && err.contains("must start with rediss://"),
        "{err}"
    );

    // The other way round: rediss:// to a plain server.
    let pdir = tempfile::tempdir().unwrap();
    let plain_redis = Redis::start(free_tcp_port(), pdir.path());
    let tls_url = format!("rediss://127.0.0.1:{}/", plain_redis.port);
    let err = cli_fails(&[
        "--store",
        &tls_url,
        "--store-ca",
        &redis.ca_file().unwrap().display().to_string(),
    ]);
    assert!(err.contains("must start with redis://"), "{err}");
}

#[test]
fn wrong_ca_is_refused_naming_the_ca_setting() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start_as(&RedisFlavor::tls_acl(), free_tcp_port(), dir.path());
    let wrong = RedisTls::generate("some other CA");
    let server = TestServer::start(node(&redis.url(), Some(&wrong.ca_pem)));
    let line = unreachable_warning(&server);
    assert!(
        line.contains("store.ca_file")
            && line.contains(&wrong.ca_pem.display().to_string())
            && line.contains("not trusted"),
        "{line}"
    );
    assert!(!server.stderr().contains("redis-acl-pw"), "password logged");
    let wrong_ca = wrong.ca_pem.display().to_string();
    let err = cli_fails(&["--store", &redis.url(), "--store-ca", &wrong_ca]);
    assert!(
        err.contains("--store-ca") && err.contains("not trusted"),
        "{err}"
    );
    assert!(!err.contains("redis-acl-pw"), "password printed: {err}");

    // A CA file that is not one: refused before connecting, naming the file.
    let key = redis
        .flavor
        .tls
        .as_ref()
        .unwrap()
        .key_pem
        .display()
        .to_string();
    let err = cli_fails(&["--store", &redis.url(), "--store-ca", &key]);
    assert!(
        err.contains("--store-ca") && err.contains(&key) && err.contains("no certificate"),
        "{err}"
    );
    let mut bad = TestServer::launch(
        common::Backend::Turnstone,
        node(
            &redis.url(),
            Some(std::path::Path::new("/nonexistent/ca.pem")),
        ),
    );
    let status = bad.wait_exit(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| !s.success()),
        "a node with an unreadable store.ca_file must not start"
    );
    assert!(
        bad.stderr()
            .contains("store.ca_file: cannot read /nonexistent/ca.pem"),
        "{}",
        bad.stderr()
    );
}

#[test]
fn acl_password_refused_names_store_url_not_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start_as(&RedisFlavor::tls_acl(), free_tcp_port(), dir.path());
    let wrong = redis.url().replace("redis-acl-pw", "not-the-password");
    let server = TestServer::start(node(&wrong, redis.ca_file()));
    let line = unreachable_warning(&server);
    assert!(
        line.contains("store.url") && line.contains("refused the user or password"),
        "{line}"
    );
    assert!(
        !server.stderr().contains("not-the-password"),
        "password logged: {}",
        server.stderr()
    );
}
