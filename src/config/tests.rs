//! Tests of loading and validating the configuration: values, defaults and every error message.

use std::time::Duration;

use super::*;

const GOOD: &str = r#"
[server]
realm = "turnstone.test"

[[listen]]
transport = "udp"
address = "127.0.0.1:3478"

[relay]
address = "127.0.0.1"

[auth]
users = { alice = "wonderland" }
secrets = ["s3cret"]

[policy]
allow_peers = ["127.0.0.0/8"]
deny_peers = []

[limits]
max_allocations = 100000
max_allocations_per_rest_user = 100

[log]
level = "info"
format = "text"
"#;

fn errs(text: &str) -> Vec<ConfigError> {
    match Config::from_toml(text) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => e,
    }
}

/// The errors for GOOD with `replace` substituted for `find`.
fn errs_with(find: &str, replace: &str) -> Vec<ConfigError> {
    assert!(GOOD.contains(find), "{find}");
    errs(&GOOD.replacen(find, replace, 1))
}

fn keys(errors: &[ConfigError]) -> Vec<&str> {
    errors.iter().map(|e| e.key.as_str()).collect()
}

fn one(errors: &[ConfigError], key: &str) -> ConfigError {
    assert_eq!(keys(errors), vec![key], "{errors:#?}");
    errors[0].clone()
}

#[test]
fn good_config_and_defaults() {
    let c = Config::from_toml(GOOD).unwrap();
    assert_eq!(c.server.realm, "turnstone.test");
    assert_eq!(c.server.software.as_deref(), Some("turnstone"));
    assert_eq!(c.server.nonce_lifetime, Duration::from_secs(600));
    assert_eq!(c.server.workers, 0);
    assert_eq!(
        c.listen,
        vec![Listen::new(
            ListenTransport::Udp,
            "127.0.0.1:3478".parse().unwrap()
        )]
    );
    assert_eq!(c.relay.addresses, vec![ip("127.0.0.1")]);
    assert!(c.relay.external_addresses.is_empty());
    assert_eq!((c.relay.port_min, c.relay.port_max), (49152, 65535));
    assert_eq!(
        c.auth.users.get("alice").map(String::as_str),
        Some("wonderland")
    );
    assert_eq!(c.auth.secrets, vec!["s3cret".to_owned()]);
    assert_eq!(
        c.policy.allow_peers,
        vec!["127.0.0.0/8".parse::<IpNet>().unwrap()]
    );
    assert!(c.policy.deny_peers.is_empty());
    assert_eq!(c.limits, LimitsSection::default());
    assert_eq!(c.log, LogSection::default());
    assert_eq!(c.tls, TlsSection::default());
    assert!(c.server.alternate_servers.is_empty());
    assert_eq!(c.server.drain_timeout, Duration::from_secs(30));
    assert_eq!(c.relay.kernel_fast_path, KernelFastPath::Auto);
    assert_eq!(c.relay.fast_path_interfaces, None);
    assert_eq!(c.limits.max_bandwidth_per_allocation, 0);
    assert_eq!(c.limits.max_total_bandwidth, 0);
    assert_eq!(c.limits.unauthenticated_rate, 500);
    assert_eq!(c.metrics.listen, None);
    assert!(c.validate().is_ok());
}

#[test]
fn bandwidth_units() {
    for (text, want) in [
        ("0", 0),
        ("1500", 1500),
        ("250KB", 250_000),
        ("250 kB/s", 250_000),
        ("2Mbit", 250_000),
        ("2 Mbps", 250_000),
        ("1.5MiB", 1_572_864),
        ("100Kbit/s", 12_500),
        ("1Gbit", 125_000_000),
        ("3GB", 3_000_000_000),
        ("12kbit", 1500),
    ] {
        assert_eq!(parse_bandwidth(text), Ok(want), "{text}");
    }
    for text in [
        "",
        "fast",
        "2Mb",
        "2 mbit",
        "-1",
        ".5MB",
        "5.MB",
        "1e3",
        "99999999999GB",
    ] {
        assert!(parse_bandwidth(text).is_err(), "{text}");
    }
}

#[test]
fn drain_metrics_and_limit_problems() {
    for (find, replace, key, needle) in [
        (
            "realm = \"turnstone.test\"",
            "realm = \"turnstone.test\"\nalternate_servers = [\"203.0.113.20\"]",
            "server.alternate_servers[0]",
            "IP:PORT",
        ),
        (
            "realm = \"turnstone.test\"",
            "realm = \"turnstone.test\"\nalternate_servers = \"203.0.113.20:3478\"",
            "server.alternate_servers",
            "expected",
        ),
        (
            "realm = \"turnstone.test\"",
            "realm = \"turnstone.test\"\nalternate_servers = [\"0.0.0.0:3478\"]",
            "server.alternate_servers[0]",
            "not a reachable",
        ),
        (
            "realm = \"turnstone.test\"",
            "realm = \"turnstone.test\"\nalternate_servers = [\"203.0.113.20:3478\", \"203.0.113.20:3478\"]",
            "server.alternate_servers[1]",
            "duplicate of server.alternate_servers[0]",
        ),
        (
            "realm = \"turnstone.test\"",
            "realm = \"turnstone.test\"\ndrain_timeout = \"soon\"",
            "server.drain_timeout",
            "not a duration",
        ),
        (
            "realm = \"turnstone.test\"",
            "realm = \"turnstone.test\"\nkernel_fast_path = \"auto\"",
            "server.kernel_fast_path",
            "moved to relay.kernel_fast_path",
        ),
        (
            "[relay]\naddress = \"127.0.0.1\"",
            "[relay]\naddress = \"127.0.0.1\"\nkernel_fast_path = \"on\"",
            "relay.kernel_fast_path",
            "not one of \"auto\", \"required\", \"off\"",
        ),
        (
            "[relay]\naddress = \"127.0.0.1\"",
            "[relay]\naddress = \"127.0.0.1\"\nfast_path_interfaces = []",
            "relay.fast_path_interfaces",
            "empty; name the interfaces",
        ),
        (
            "[relay]\naddress = \"127.0.0.1\"",
            "[relay]\naddress = \"127.0.0.1\"\nfast_path_interfaces = [\"eth0\", \"a/b\"]",
            "relay.fast_path_interfaces[1]",
            "\"a/b\" is not an interface name",
        ),
        (
            "[relay]\naddress = \"127.0.0.1\"",
            "[relay]\naddress = \"127.0.0.1\"\nfast_path_interfaces = [\"eth0\", \"eth0\"]",
            "relay.fast_path_interfaces[1]",
            "duplicate of relay.fast_path_interfaces[0]",
        ),
        (
            "[relay]\naddress = \"127.0.0.1\"",
            "[relay]\naddress = \"127.0.0.1\"\nfast_path_interfaces = [\"a-very-long-interface\"]",
            "relay.fast_path_interfaces[0]",
            "not an interface name",
        ),
        (
            "[relay]\naddress = \"127.0.0.1\"",
            "[relay]\naddress = \"127.0.0.1\"\nfast_path_interfaces = \"eth0\"",
            "relay.fast_path_interfaces",
            "",
        ),
        (
            "realm = \"turnstone.test\"",
            "realm = \"turnstone.test\"\ndrain_timeout = \"2days\"",
            "server.drain_timeout",
            "longer than",
        ),
        (
            "max_allocations_per_rest_user = 100",
            "max_allocations_per_rest_user = 100\nmax_bandwidth_per_allocation = \"2Mb\"",
            "limits.max_bandwidth_per_allocation",
            "unknown unit",
        ),
        (
            "max_allocations_per_rest_user = 100",
            "max_allocations_per_rest_user = 100\nmax_total_bandwidth = 100",
            "limits.max_total_bandwidth",
            "one full-size packet",
        ),
        (
            "max_allocations_per_rest_user = 100",
            "max_allocations_per_rest_user = 100\nmax_total_bandwidth = true",
            "limits.max_total_bandwidth",
            "bandwidth",
        ),
        (
            "max_allocations_per_rest_user = 100",
            "max_allocations_per_rest_user = 100\nunauthenticated_rate = -1",
            "limits.unauthenticated_rate",
            "",
        ),
        (
            "max_allocations_per_rest_user = 100",
            "max_allocations_per_rest_user = 100\nunauthenticated_rate = 2000000",
            "limits.unauthenticated_rate",
            "use 0 for unlimited",
        ),
        (
            "[log]",
            "[metrics]\nlisten = \"127.0.0.1\"\n[log]",
            "metrics.listen",
            "IP:PORT",
        ),
        (
            "[log]",
            "[metrics]\nlisten = \"224.0.0.1:9641\"\n[log]",
            "metrics.listen",
            "unicast",
        ),
        ("[log]", "metrics = 1\n[log]", "limits.metrics", "unknown key"),
    ] {
        let e = errs_with(find, replace);
        let e = one(&e, key);
        assert!(
            e.message.contains(needle),
            "{key}: message {:?} should contain {needle:?}",
            e.message
        );
    }
    let c = Config::from_toml(&GOOD.replacen(
        "max_allocations_per_rest_user = 100",
        "max_allocations_per_rest_user = 100\nmax_bandwidth_per_allocation = 250000\nunauthenticated_rate = 10",
        1,
    ))
    .unwrap();
    assert_eq!(c.limits.max_bandwidth_per_allocation, 250_000);
    assert_eq!(c.limits.unauthenticated_rate, 10);
    let mut c = Config::development();
    assert_eq!(c.metrics, MetricsSection::default());
    c.server.drain_timeout = Duration::from_secs(100_000);
    c.limits.max_bandwidth_per_allocation = 10;
    let e = c.validate().unwrap_err();
    assert_eq!(
        keys(&e),
        vec![
            "server.drain_timeout",
            "limits.max_bandwidth_per_allocation"
        ],
        "{e:#?}"
    );
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn example_parses_and_validates() {
    let c = Config::from_toml(Config::example_toml()).unwrap_or_else(|e| {
        panic!(
            "{}",
            e.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        )
    });
    assert!(c.validate().is_ok());
    assert!(!c.listen.is_empty());
}

#[test]
fn example_documents_every_key() {
    let example = Config::example_toml();
    for key in [
        "realm",
        "software",
        "nonce_lifetime",
        "workers",
        "adaptive_workers",
        "[[listen]]",
        "transport",
        "proxy_protocol",
        "proxy_from",
        "address",
        "external_address",
        "ports",
        "socket_buffer",
        "permission_lifetime",
        "channel_lifetime",
        "users",
        "secrets",
        "allow_peers",
        "deny_peers",
        "max_allocations",
        "max_allocations_per_user",
        "max_allocations_per_rest_user",
        "max_permissions_per_allocation",
        "max_channels_per_allocation",
        "max_lifetime",
        "default_lifetime",
        "level",
        "format",
        "usage_interval",
        "[tls]",
        "certificate",
        "private_key",
        "alternate_servers",
        "drain_timeout",
        "kernel_fast_path",
        "fast_path_interfaces",
        "max_bandwidth_per_allocation",
        "max_total_bandwidth",
        "unauthenticated_rate",
        "redirect_above",
        "max_connections_per_source",
        "max_unauthenticated_per_source",
        "max_connections",
        "stream_handshake_timeout",
        "stream_idle_timeout",
        "[store]",
        "ca_file",
        "rediss://",
        "node_id",
        "advertise",
        "[metrics]",
        "listen = \"127.0.0.1:9641\"",
        "selftest",
    ] {
        assert!(
            example.contains(key),
            "conf/turnstone.toml does not mention {key}"
        );
    }
}

#[test]
fn full_config_every_key() {
    let c = Config::from_toml(
        r#"
[server]
realm = "turn.example.com"
software = ""
nonce_lifetime = "1h 30m"
workers = 4
alternate_servers = ["203.0.113.20:3478", "[2001:db8::20]:3478"]
drain_timeout = "2m"
[[listen]]
transport = "udp"
address = "0.0.0.0:3478"
[[listen]]
transport = "tcp"
address = "0.0.0.0:3478"
[[listen]]
transport = "tls"
address = "[::]:5349"
[relay]
address = ["10.0.0.5", "2001:db8::5"]
external_address = ["203.0.113.10"]
ports = "50000 - 50100"
permission_lifetime = "2s"
channel_lifetime = "1m"
[auth]
secrets = ["a", "b"]
[policy]
allow_peers = ["10.0.0.0/8", "fd00::1"]
deny_peers = ["10.0.0.1"]
[limits]
max_allocations = 5
max_allocations_per_user = 2
max_allocations_per_rest_user = 3
max_permissions_per_allocation = 3
max_channels_per_allocation = 4
max_lifetime = "2h"
default_lifetime = "5m"
max_bandwidth_per_allocation = "2Mbit"
max_total_bandwidth = "1GB"
unauthenticated_rate = 0
max_connections_per_source = 10000
max_unauthenticated_per_source = 16
max_connections = 30000
stream_handshake_timeout = "5s"
stream_idle_timeout = "15m"
[metrics]
listen = "[::1]:9641"
[log]
level = "info,turnstone::server=debug"
format = "json"
usage_interval = "5m"
[tls]
certificate = "/etc/turnstone/cert.pem"
private_key = "/etc/turnstone/key.pem"
"#,
    )
    .unwrap();
    assert_eq!(c.server.software, None);
    assert_eq!(c.server.nonce_lifetime, Duration::from_secs(5400));
    assert_eq!(c.server.workers, 4);
    assert_eq!(
        c.server.alternate_servers,
        vec![
            "203.0.113.20:3478".parse::<SocketAddr>().unwrap(),
            "[2001:db8::20]:3478".parse().unwrap()
        ]
    );
    assert_eq!(c.server.drain_timeout, Duration::from_secs(120));
    assert_eq!(c.limits.max_bandwidth_per_allocation, 250_000);
    assert_eq!(c.limits.max_total_bandwidth, 1_000_000_000);
    assert_eq!(c.limits.unauthenticated_rate, 0);
    assert_eq!(c.limits.max_connections_per_source, 10_000);
    assert_eq!(c.limits.max_unauthenticated_per_source, 16);
    assert_eq!(c.limits.max_connections, 30_000);
    assert_eq!(c.limits.stream_handshake_timeout, Duration::from_secs(5));
    assert_eq!(c.limits.stream_idle_timeout, Duration::from_secs(900));
    assert_eq!(c.metrics.listen, Some("[::1]:9641".parse().unwrap()));
    assert_eq!(c.listen.len(), 3);
    assert_eq!(c.listen[2].transport, ListenTransport::Tls);
    assert_eq!(c.relay.addresses, vec![ip("10.0.0.5"), ip("2001:db8::5")]);
    assert_eq!(c.relay.advertised(ip("10.0.0.5")), ip("203.0.113.10"));
    assert_eq!(c.relay.advertised(ip("2001:db8::5")), ip("2001:db8::5"));
    assert_eq!(c.relay.address_for_family(true), Some(ip("2001:db8::5")));
    assert_eq!((c.relay.port_min, c.relay.port_max), (50000, 50100));
    assert_eq!(c.relay.port_count(), 101);
    assert_eq!(c.relay.permission_lifetime, Duration::from_secs(2));
    assert_eq!(c.relay.channel_lifetime, Duration::from_secs(60));
    assert_eq!(
        c.policy.allow_peers[1],
        "fd00::1/128".parse::<IpNet>().unwrap()
    );
    assert_eq!(
        c.policy.deny_peers[0],
        "10.0.0.1/32".parse::<IpNet>().unwrap()
    );
    assert_eq!(c.limits.max_channels_per_allocation, 4);
    assert_eq!(c.limits.max_allocations_per_user, Some(2));
    assert_eq!(c.limits.max_allocations_per_rest_user, 3);
    assert_eq!(c.limits.max_lifetime, Duration::from_secs(7200));
    assert_eq!(c.limits.default_lifetime, Duration::from_secs(300));
    assert_eq!(c.log.format, LogFormat::Json);
    assert_eq!(c.log.usage_interval, Some(Duration::from_secs(300)));
    assert_eq!(
        c.tls.key_file.as_deref(),
        Some(Path::new("/etc/turnstone/key.pem"))
    );
}

#[test]
fn development_is_valid() {
    let c = Config::development();
    assert!(c.validate().is_ok(), "{:?}", c.validate());
    assert_eq!(c.server.realm, "turnstone.local");
    assert_eq!(c.listen[0].address, "127.0.0.1:3478".parse().unwrap());
    assert_eq!(
        c.policy.allow_peers[0],
        "127.0.0.0/8".parse::<IpNet>().unwrap()
    );
    assert_eq!(c.policy.allow_peers[1], "::1/128".parse::<IpNet>().unwrap());
    assert_eq!(c.auth.secrets.len(), 1);
    assert_ne!(c.auth.secrets, Config::development().auth.secrets);
}

#[test]
fn bad_values_name_their_key() {
    let cases: &[(&str, &str, &str, &str)] = &[
        ("realm = \"turnstone.test\"", "realm = \"\"", "server.realm", "empty"),
        ("realm = \"turnstone.test\"", "realm = 5", "server.realm", "expected a string"),
        ("realm = \"turnstone.test\"", "", "server.realm", "missing"),
        ("realm = \"turnstone.test\"", "realm = \"t\"\nnonce_lifetime = \"ten\"", "server.nonce_lifetime", "\"ten\" is not a duration"),
        ("realm = \"turnstone.test\"", "realm = \"t\"\nnonce_lifetime = 600", "server.nonce_lifetime", "duration string"),
        ("realm = \"turnstone.test\"", "realm = \"t\"\nnonce_lifetime = \"0s\"", "server.nonce_lifetime", "at least 1s"),
        ("realm = \"turnstone.test\"", "realm = \"t\"\nworkers = -1", "server.workers", "-1"),
        ("realm = \"turnstone.test\"", "realm = \"t\"\nsoftware = 1", "server.software", "string"),
        ("transport = \"udp\"", "transport = \"quic\"", "listen[0].transport", "unknown variant `quic`"),
        ("transport = \"udp\"\n", "", "listen[0].transport", "missing"),
        ("address = \"127.0.0.1:3478\"", "address = \"127.0.0.1\"", "listen[0].address", "not an address IP:PORT"),
        ("[relay]\naddress = \"127.0.0.1\"\n", "[relay]\naddress = \"0.0.0.0\"\n", "relay.address", "unspecified"),
        ("[relay]\naddress = \"127.0.0.1\"\n", "[relay]\naddress = \"::\"\n", "relay.address", "unspecified"),
        ("[relay]\naddress = \"127.0.0.1\"\n", "[relay]\naddress = \"localhost\"\n", "relay.address", "\"localhost\" is not an IP address"),
        ("[relay]\naddress = \"127.0.0.1\"\n", "[relay]\naddress = [\"127.0.0.1\", 7]\n", "relay.address[1]", "expected an IP address string"),
        ("[relay]\naddress = \"127.0.0.1\"\n", "[relay]\naddress = [\"127.0.0.1\", \"127.0.0.2\"]\n", "relay.address", "more than one IPv4"),
        ("[relay]\naddress = \"127.0.0.1\"\n", "[relay]\naddress = []\n", "relay.address", "missing"),
        ("[relay]\naddress = \"127.0.0.1\"\n", "[relay]\naddress = 1\n", "relay.address", "an IP address string or an array"),
        ("[relay]\naddress = \"127.0.0.1\"\n", "[relay]\naddress = \"127.0.0.1\"\nports = \"9-5\"\n", "relay.ports", "\"9-5\" is not a range LOW-HIGH with LOW <= HIGH"),
        ("[relay]\naddress = \"127.0.0.1\"\n", "[relay]\naddress = \"127.0.0.1\"\nports = \"0-5\"\n", "relay.ports", "not a range"),
        ("[relay]\naddress = \"127.0.0.1\"\n", "[relay]\naddress = \"127.0.0.1\"\nports = \"1-70000\"\n", "relay.ports", "not a range"),
        ("[relay]\naddress = \"127.0.0.1\"\n", "[relay]\naddress = \"127.0.0.1\"\nports = \"5000\"\n", "relay.ports", "not a range"),
        ("[relay]\naddress = \"127.0.0.1\"\n", "[relay]\naddress = \"127.0.0.1\"\npermission_lifetime = \"301s\"\n", "relay.permission_lifetime", "at most 5m"),
        ("[relay]\naddress = \"127.0.0.1\"\n", "[relay]\naddress = \"127.0.0.1\"\npermission_lifetime = \"500ms\"\n", "relay.permission_lifetime", "at least 1s"),
        ("[relay]\naddress = \"127.0.0.1\"\n", "[relay]\naddress = \"127.0.0.1\"\npermission_lifetime = \"soon\"\n", "relay.permission_lifetime", "not a duration"),
        ("[relay]\naddress = \"127.0.0.1\"\n", "[relay]\naddress = \"127.0.0.1\"\nchannel_lifetime = \"1h\"\n", "relay.channel_lifetime", "at most 10m"),
        ("[relay]\naddress = \"127.0.0.1\"\n", "[relay]\naddress = \"127.0.0.1\"\nchannel_lifetime = 60\n", "relay.channel_lifetime", "duration string"),
        ("[relay]\naddress = \"127.0.0.1\"\n", "[relay]\naddress = \"127.0.0.1\"\nexternal_address = \"2001:db8::1\"\n", "relay.external_address", "no relay address of the same family"),
        ("[relay]\naddress = \"127.0.0.1\"\n", "[relay]\naddress = \"127.0.0.1\"\nexternal_address = [\"203.0.113.1\", \"203.0.113.2\"]\n", "relay.external_address", "more than one IPv4"),
        ("users = { alice = \"wonderland\" }", "users = { alice = \"wonderland\", bob = \"\" }", "auth.users.bob", "empty password"),
        ("users = { alice = \"wonderland\" }", "users = { alice = 5 }", "auth.users.alice", "expected a password string"),
        ("users = { alice = \"wonderland\" }", "users = { \"b b\" = \"\" }", "auth.users.\"b b\"", "empty password"),
        ("users = { alice = \"wonderland\" }", "users = [\"alice\"]", "auth.users", "expected a table, found array"),
        ("secrets = [\"s3cret\"]", "secrets = [\"s3cret\", \"\"]", "auth.secrets[1]", "empty secret"),
        ("secrets = [\"s3cret\"]", "secrets = \"s3cret\"", "auth.secrets", "expected an array, found string"),
        ("allow_peers = [\"127.0.0.0/8\"]", "allow_peers = [\"x\"]", "policy.allow_peers[0]", "\"x\" is not a CIDR"),
        ("allow_peers = [\"127.0.0.0/8\"]", "allow_peers = [\"127.0.0.0/33\"]", "policy.allow_peers[0]", "is not a CIDR"),
        ("deny_peers = []", "deny_peers = [\"10.0.0.0/8\", 3]", "policy.deny_peers[1]", "expected a CIDR string"),
        ("max_allocations = 100000", "max_allocations = 0", "limits.max_allocations", "at least 1"),
        ("max_allocations_per_rest_user = 100", "max_allocations_per_user = 0", "limits.max_allocations_per_user", "at least 1"),
        ("max_allocations_per_rest_user = 100", "max_allocations_per_rest_user = 0", "limits.max_allocations_per_rest_user", "at least 1"),
        ("max_allocations = 100000", "max_allocations = 1\nmax_channels_per_allocation = 5000", "limits.max_channels_per_allocation", "channel numbers"),
        ("max_allocations = 100000", "max_allocations = 1\nmax_permissions_per_allocation = 0", "limits.max_permissions_per_allocation", "at least 1"),
        ("max_allocations = 100000", "max_allocations = 1\nmax_lifetime = \"5m\"", "limits.max_lifetime", "shorter than limits.default_lifetime"),
        ("max_allocations = 100000", "max_allocations = 1\ndefault_lifetime = \"0s\"", "limits.default_lifetime", "at least 1s"),
        ("max_allocations = 100000", "max_allocations = 1\ndefault_lifetime = \"soon\"", "limits.default_lifetime", "not a duration"),
        ("max_allocations = 100000", "max_allocations = 1\nmax_connections_per_source = 0", "limits.max_connections_per_source", "at least 1"),
        ("max_allocations = 100000", "max_allocations = 1\nmax_unauthenticated_per_source = 0", "limits.max_unauthenticated_per_source", "at least 1"),
        ("max_allocations = 100000", "max_allocations = 1\nmax_connections = 0", "limits.max_connections", "at least 1"),
        ("max_allocations = 100000", "max_allocations = 1\nmax_connections = -1", "limits.max_connections", "-1"),
        ("max_allocations = 100000", "max_allocations = 1\nstream_handshake_timeout = \"soon\"", "limits.stream_handshake_timeout", "not a duration"),
        ("max_allocations = 100000", "max_allocations = 1\nstream_handshake_timeout = \"10ms\"", "limits.stream_handshake_timeout", "at least 100ms"),
        ("max_allocations = 100000", "max_allocations = 1\nstream_idle_timeout = \"0s\"", "limits.stream_idle_timeout", "at least 100ms"),
        ("max_allocations = 100000", "max_allocations = 1\nstream_idle_timeout = \"5s\"", "limits.stream_idle_timeout", "shorter than limits.stream_handshake_timeout"),
        ("level = \"info\"", "level = \"inof\"", "log.level", "\"inof\""),
        ("level = \"info\"", "level = \"\"", "log.level", "empty"),
        ("level = \"info\"", "level = \"info,turnstone=loud\"", "log.level", "\"loud\""),
        ("format = \"text\"", "format = \"xml\"", "log.format", "unknown variant `xml`, expected `text` or `json`"),
        ("format = \"text\"", "format = \"text\"\nusage_interval = \"500ms\"", "log.usage_interval", "out of range; use 1s to 24h"),
        ("format = \"text\"", "format = \"text\"\nusage_interval = \"2days\"", "log.usage_interval", "out of range"),
        ("format = \"text\"", "format = \"text\"\nusage_interval = \"often\"", "log.usage_interval", "not a duration"),
        ("format = \"text\"", "format = \"text\"\nusage_interval = 300", "log.usage_interval", "duration string"),
        ("format = \"text\"", "format = \"text\"\n[store]\nurl = \"http://x\"", "store.url", "must start with redis://"),
        ("format = \"text\"", "format = \"text\"\n[store]\nurl = \"redis://x:6379\"\nca_file = \"/etc/ca.pem\"", "store.ca_file", "needs a TLS store.url (rediss://)"),
        ("format = \"text\"", "format = \"text\"\n[store]\nca_file = \"/etc/ca.pem\"", "store.ca_file", "needs a TLS store.url"),
        ("format = \"text\"", "format = \"text\"\n[store]\nurl = \"rediss://x:6380\"\nca_file = \"\"", "store.ca_file", "empty path"),
        ("format = \"text\"", "format = \"text\"\n[store]\nurl = \"rediss://x:6380\"\nca_file = 3", "store.ca_file", "expected"),
    ];
    for (find, replace, key, needle) in cases {
        let errors = errs_with(find, replace);
        let e = one(&errors, key);
        assert!(
            e.message.contains(needle),
            "{key}: message {:?} should contain {needle:?}",
            e.message
        );
        assert_eq!(e.to_string(), format!("{key}: {}", e.message));
    }
}

#[test]
fn listen_problems() {
    let dup = GOOD.replacen(
        "[relay]",
        "[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:3478\"\n[[listen]]\ntransport = \"tcp\"\naddress = \"127.0.0.1:3478\"\n[[listen]]\ntransport = \"tls\"\naddress = \"127.0.0.1:3478\"\n[relay]",
        1,
    );
    let e = errs(&dup);
    assert_eq!(
        keys(&e),
        vec![
            "listen[1].address",
            "listen[3].address",
            "tls.certificate",
            "tls.private_key"
        ],
        "{e:#?}"
    );
    assert!(e[0].message.contains("duplicate of listen[0]"));
    assert!(e[1].message.contains("cannot share a TCP port"));

    let none = GOOD.replacen(
        "[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:3478\"\n",
        "",
        1,
    );
    let e = one(&errs(&none), "listen");
    assert!(e.message.contains("at least one [[listen]]"));

    let table = GOOD.replacen("[[listen]]", "[listen]", 1);
    let e = one(&errs(&table), "listen");
    assert!(e.message.contains("[[listen]]"), "{e}");

    let ok_tls = GOOD.replacen(
        "[relay]",
        "[[listen]]\ntransport = \"tls\"\naddress = \"127.0.0.1:5349\"\n[tls]\ncertificate = \"c.pem\"\nprivate_key = \"k.pem\"\n[relay]",
        1,
    );
    assert!(Config::from_toml(&ok_tls).is_ok());
}

#[test]
fn listen_proxy_protocol() {
    let with = |entry: &str| {
        GOOD.replacen(
            "[relay]",
            &format!("[[listen]]\n{entry}\n[tls]\ncertificate = \"c.pem\"\nprivate_key = \"k.pem\"\n[relay]"),
            1,
        )
    };
    let c = Config::from_toml(&with(
        "transport = \"tls\"\naddress = \"0.0.0.0:443\"\nproxy_protocol = true\nproxy_from = [\"10.0.0.0/8\", \"192.0.2.7\"]",
    ))
    .unwrap();
    assert!(c.listen[1].proxy_protocol);
    assert_eq!(
        c.listen[1].proxy_from,
        vec![
            "10.0.0.0/8".parse::<IpNet>().unwrap(),
            "192.0.2.7/32".parse().unwrap()
        ]
    );
    assert!(!c.listen[0].proxy_protocol);
    assert!(
        !c.warnings().iter().any(|w| w.key.starts_with("listen")),
        "{:?}",
        c.warnings()
    );
    // Trusting every source loads, with a warning naming the key.
    let open = Config::from_toml(&with(
        "transport = \"tls\"\naddress = \"0.0.0.0:443\"\nproxy_protocol = true\nproxy_from = [\"0.0.0.0/0\"]",
    ))
    .unwrap();
    let w = open.warnings();
    assert!(
        w.iter()
            .any(|w| w.key == "listen[1].proxy_from" && w.message.contains("0.0.0.0/0")),
        "{w:?}"
    );
    let tcp = "transport = \"tcp\"\naddress = \"127.0.0.1:3479\"\n";
    for (entry, key, needle) in [
        ("proxy_protocol = true", "listen[1].proxy_from", "missing"),
        (
            "proxy_protocol = true\nproxy_from = []",
            "listen[1].proxy_from",
            "missing",
        ),
        (
            "proxy_from = [\"10.0.0.0/8\"]",
            "listen[1].proxy_from",
            "only with proxy_protocol = true",
        ),
        (
            "proxy_protocol = true\nproxy_from = [\"10.0.0.0/33\"]",
            "listen[1].proxy_from[0]",
            "not a CIDR",
        ),
        (
            "proxy_protocol = \"yes\"",
            "listen[1].proxy_protocol",
            "bool",
        ),
    ] {
        let e = one(&errs(&with(&format!("{tcp}{entry}"))), key);
        assert!(e.message.contains(needle), "{entry}: {e}");
    }
    let e = one(
        &errs(&with(
            "transport = \"udp\"\naddress = \"127.0.0.1:3479\"\nproxy_protocol = true\nproxy_from = [\"10.0.0.0/8\"]",
        )),
        "listen[1].proxy_protocol",
    );
    assert!(e.message.contains("only for tcp and tls"), "{e}");
    let e = one(
        &errs(&with(
            "transport = \"tcp\"\naddress = \"127.0.0.1:0\"\nproxy_protocol = true\nproxy_from = [\"10.0.0.0/8\"]",
        )),
        "listen[1].address",
    );
    assert!(e.message.contains("port 0"), "{e}");
}

#[test]
fn unknown_keys_are_reported_with_path() {
    let e = errs(&format!("colour = \"blue\"\n{GOOD}"));
    let e = one(&e, "colour");
    assert!(e.message.contains("unknown key `colour`"), "{e}");
    assert!(
        e.message.contains("`server`") && e.message.contains("`limits`"),
        "{e}"
    );

    let e = errs_with(
        "realm = \"turnstone.test\"",
        "realm = \"turnstone.test\"\nrelam = \"x\"",
    );
    let e = one(&e, "server.relam");
    assert!(e.message.contains("unknown key `relam`"), "{e}");
    assert!(
        e.message.contains("`realm`") && e.message.contains("`nonce_lifetime`"),
        "{e}"
    );

    let e = errs_with("transport = \"udp\"", "transport = \"udp\"\nport = 1");
    one(&e, "listen[0].port");

    let e = errs_with("deny_peers = []", "deny_peers = []\nallow = []\nblock = []");
    assert_eq!(keys(&e), vec!["policy.allow", "policy.block"]);

    let e = errs(&format!("{GOOD}\n[metrics]\nport = 9000\n"));
    let e = one(&e, "metrics.port");
    assert!(e.message.contains("`listen`"), "{e}");
    let e = errs(&format!("{GOOD}\n[stats]\nport = 9000\n"));
    one(&e, "stats");
}

#[test]
fn every_problem_at_once() {
    let text = r#"
bogus = 1
[server]
realm = ""
nonce_lifetime = "forever"
[[listen]]
transport = "udp"
address = "nope"
[relay]
address = "0.0.0.0"
ports = "9-5"
[auth]
users = { bob = "" }
[policy]
allow_peers = ["x", "10.0.0.0/8", "y"]
[limits]
max_allocations = 0
[log]
level = "loud"
"#;
    let e = errs(text);
    let mut k = keys(&e);
    k.sort_unstable();
    assert_eq!(
        k,
        vec![
            "auth.users.bob",
            "bogus",
            "limits.max_allocations",
            "listen[0].address",
            "log.level",
            "policy.allow_peers[0]",
            "policy.allow_peers[2]",
            "relay.address",
            "relay.ports",
            "server.nonce_lifetime",
            "server.realm",
        ],
        "{e:#?}"
    );
}

#[test]
fn several_problems_of_one_key() {
    let e = errs_with(
        "[relay]\naddress = \"127.0.0.1\"\n",
        "[relay]\naddress = [\"0.0.0.0\", \"::\", \"127.0.0.1\"]\n",
    );
    assert_eq!(
        keys(&e),
        vec!["relay.address", "relay.address", "relay.address"],
        "{e:#?}"
    );
}

#[test]
fn missing_sections() {
    let e = errs("");
    let k = keys(&e);
    assert!(
        k.contains(&"server")
            && k.contains(&"listen")
            && k.contains(&"relay")
            && k.contains(&"auth"),
        "{e:#?}"
    );
    let e = errs(&GOOD.replacen(
        "[auth]\nusers = { alice = \"wonderland\" }\nsecrets = [\"s3cret\"]\n",
        "",
        1,
    ));
    let e = one(&e, "auth");
    assert!(e.message.contains("no credentials"));
    let e = errs(&GOOD.replacen("[server]\n", "server = 1\n[serverx]\n", 1));
    assert!(keys(&e).contains(&"server"), "{e:#?}");
}

#[test]
fn syntax_error_has_line_and_column() {
    let e = errs("[server]\nrealm = \"x\nfoo");
    let e = one(&e, "");
    assert!(e.message.contains("line 2, column"), "{e}");
    let e = errs("[server]\nrealm = \"x\"\nrealm = \"y\"\n");
    let e = one(&e, "");
    assert!(
        e.message.contains("line 3") && e.message.contains("duplicate key"),
        "{e}"
    );
    let e = errs("a = ");
    let e = one(&e, "");
    assert!(e.message.contains("line 1, column 5"), "{e}");
    assert_eq!(e.to_string(), e.message);
}

#[test]
fn load_names_the_path() {
    let e = Config::load(Path::new("/nonexistent/turnstone.toml")).unwrap_err();
    let e = one(&e, "");
    assert!(e.message.contains("/nonexistent/turnstone.toml"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.toml");
    std::fs::write(&p, GOOD).unwrap();
    assert!(Config::load(&p).is_ok());
}

#[test]
fn debug_redacts_secrets() {
    let c = Config::from_toml(GOOD).unwrap();
    let s = format!("{c:?}");
    assert!(!s.contains("wonderland") && !s.contains("s3cret"), "{s}");
    assert!(s.contains("alice"));
    // The store password in the URL too.
    let c = Config::from_toml(&format!(
        "{GOOD}\n[store]\nurl = \"rediss://turn:hunter2@redis.example:6380/0\"\nca_file = \"/etc/ca.pem\"\n"
    ))
    .unwrap();
    assert_eq!(
        c.store.url.as_deref(),
        Some("rediss://turn:hunter2@redis.example:6380/0")
    );
    assert_eq!(
        c.store.ca_file.as_deref(),
        Some(std::path::Path::new("/etc/ca.pem"))
    );
    let s = format!("{c:?}");
    assert!(!s.contains("hunter2"), "{s}");
    assert!(s.contains("rediss://turn:***@redis.example:6380/0"), "{s}");
}

#[test]
fn auth_errors_do_not_echo_secrets() {
    for (find, replace, key) in [
        (
            "secrets = [\"s3cret\"]",
            "secrets = \"topsecret\"",
            "auth.secrets",
        ),
        (
            "users = { alice = \"wonderland\" }",
            "users = \"topsecret\"",
            "auth.users",
        ),
        (
            "users = { alice = \"wonderland\" }",
            "users = { alice = [\"topsecret\"] }",
            "auth.users.alice",
        ),
    ] {
        let e = errs_with(find, replace);
        let e = one(&e, key);
        assert!(!e.message.contains("topsecret"), "{e}");
        assert!(e.message.starts_with("expected "), "{e}");
    }
}

#[test]
fn validate_catches_programmatic_mistakes() {
    let mut c = Config::development();
    c.relay.port_min = 10;
    c.relay.port_max = 5;
    c.limits.default_lifetime = Duration::from_secs(7200);
    c.auth.secrets.clear();
    let e = c.validate().unwrap_err();
    assert_eq!(
        keys(&e),
        vec!["relay.ports", "auth", "limits.max_lifetime"],
        "{e:#?}"
    );
}

#[test]
fn no_panic_on_odd_input() {
    for text in [
        "\u{0}",
        "[[server]]\nrealm = 1",
        "listen = [1, \"x\", {}]",
        "[relay]\naddress = [[]]",
        "[auth]\nusers = { \"\" = \"x\" }",
        "[limits]\nmax_lifetime = \"99999999999999999999h\"",
        "[server]\nrealm = \"é\u{7f}\"",
        "[log]\nlevel = \"=,=\"",
    ] {
        let _ = Config::from_toml(text);
    }
    let e = errs("[auth]\nusers = { \"\" = \"x\" }");
    assert!(keys(&e).contains(&"auth.users.\"\""), "{e:#?}");
}

#[test]
fn external_address_auto_and_discover_with() {
    let with = |relay: &str| GOOD.replacen("[relay]\naddress = \"127.0.0.1\"", relay, 1);
    let c = Config::from_toml(&with(
        "[relay]\naddress = \"10.0.0.5\"\nexternal_address = \"auto\"\ndiscover_with = [\"stun:stun.example.net\", \"stun:192.0.2.1:3479\", \"stun:[2001:db8::1]:5349\"]",
    ))
    .unwrap();
    assert!(c.relay.external_auto);
    assert!(c.relay.external_addresses.is_empty());
    assert_eq!(
        c.relay.discover_with,
        vec![
            ("stun.example.net".to_string(), 3478),
            ("192.0.2.1".to_string(), 3479),
            ("2001:db8::1".to_string(), 5349),
        ]
    );
    assert!(c.warnings().is_empty(), "auto: no private-address warning");

    let e = one(
        &errs(&with(
            "[relay]\naddress = \"10.0.0.5\"\nexternal_address = \"auto\"",
        )),
        "relay.discover_with",
    );
    assert!(e.message.contains("needs STUN servers"), "{e}");
    let e = one(
        &errs(&with(
            "[relay]\naddress = \"10.0.0.5\"\ndiscover_with = [\"stun:a.example\"]",
        )),
        "relay.discover_with",
    );
    assert!(e.message.contains("only with external_address"), "{e}");
    for bad in [
        "turn:a.example",
        "stun:",
        "stun:a.example:0",
        "stun:[::1",
        "stun:a b",
    ] {
        let text = with(&format!(
            "[relay]\naddress = \"10.0.0.5\"\nexternal_address = \"auto\"\ndiscover_with = [\"stun:ok.example\", {bad:?}]"
        ));
        let e = one(&errs(&text), "relay.discover_with[1]");
        assert!(e.message.contains("not a STUN URL"), "{bad}: {e}");
    }
    // "auto" is a value of its own, not an address among others.
    let e = one(
        &errs(&with(
            "[relay]\naddress = \"10.0.0.5\"\nexternal_address = [\"auto\"]",
        )),
        "relay.external_address[0]",
    );
    assert!(e.message.contains("auto"), "{e}");
}

#[test]
fn private_relay_address_without_external_address_warns() {
    let with = |relay: &str| {
        Config::from_toml(&GOOD.replacen("[relay]\naddress = \"127.0.0.1\"", relay, 1)).unwrap()
    };
    for (address, kind) in [
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.10", "private"),
        ("100.64.0.7", "CGNAT"),
        ("169.254.10.1", "link-local"),
        ("fd00::5", "unique local"),
        ("fe80::1", "link-local"),
    ] {
        let w = with(&format!("[relay]\naddress = \"{address}\""));
        let w = w.warnings();
        assert_eq!(keys(&w), ["relay.address"], "{address}");
        assert!(w[0].message.contains(kind), "{address}: {}", w[0]);
        assert!(w[0].message.contains("external_address"), "{}", w[0]);
    }
    // Public, loopback (a development server) and NATed-with-external: no warning.
    for relay in [
        "[relay]\naddress = \"203.0.113.5\"",
        "[relay]\naddress = \"127.0.0.1\"",
        "[relay]\naddress = \"100.128.0.1\"",
        "[relay]\naddress = \"10.0.0.5\"\nexternal_address = \"198.51.100.7\"",
    ] {
        assert!(with(relay).warnings().is_empty(), "{relay}");
    }
    // A dual-stack relay with an external address for IPv4 only still warns for IPv6.
    let c =
        with("[relay]\naddress = [\"10.0.0.5\", \"fd00::5\"]\nexternal_address = \"198.51.100.7\"");
    let w = c.warnings();
    assert_eq!(w.len(), 1);
    assert!(w[0].message.starts_with("fd00::5"), "{}", w[0]);
}

#[test]
fn kernel_fast_path_values() {
    for (value, want) in [
        ("off", KernelFastPath::Off),
        ("auto", KernelFastPath::Auto),
        ("required", KernelFastPath::Required),
    ] {
        let text = GOOD.replacen(
            "[relay]\naddress = \"127.0.0.1\"",
            &format!("[relay]\naddress = \"127.0.0.1\"\nkernel_fast_path = \"{value}\""),
            1,
        );
        let c = Config::from_toml(&text).unwrap();
        assert_eq!(c.relay.kernel_fast_path, want);
        assert_eq!(want.as_str(), value);
    }
    let text = GOOD.replacen(
        "[relay]\naddress = \"127.0.0.1\"",
        "[relay]\naddress = \"127.0.0.1\"\nfast_path_interfaces = [\"eth0\", \"no-such-if0\"]",
        1,
    );
    // Names are checked for form only: whether they exist is the loader's business.
    let c = Config::from_toml(&text).unwrap();
    assert_eq!(
        c.relay.fast_path_interfaces,
        Some(vec!["eth0".to_owned(), "no-such-if0".to_owned()])
    );
}

#[test]
fn usage_interval_off_by_default_zero_and_one_second() {
    let with = |v: &str| {
        Config::from_toml(&GOOD.replacen(
            "format = \"text\"",
            &format!("format = \"text\"\nusage_interval = {v}"),
            1,
        ))
        .unwrap_or_else(|e| panic!("usage_interval = {v}: {e:?}"))
        .log
        .usage_interval
    };
    assert_eq!(Config::from_toml(GOOD).unwrap().log.usage_interval, None);
    assert_eq!(with("\"0s\""), None, "0 is off");
    assert_eq!(with("\"1s\""), Some(Duration::from_secs(1)), "the shortest");
    assert_eq!(with("\"1h 30m\""), Some(Duration::from_secs(5400)));
    assert_eq!(
        with("\"24h\""),
        Some(Duration::from_secs(86400)),
        "the longest"
    );
}
