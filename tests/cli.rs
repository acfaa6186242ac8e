//! The command line: `check-config` accepts the shipped example, names every bad key and
//! warns about a relay address clients outside could not reach; `credentials` mints a
//! TURN REST username and password.

use std::process::Command;

fn turnstone() -> Command {
    Command::new(env!("CARGO_BIN_EXE_turnstone"))
}

#[test]
fn check_config_accepts_the_example() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/turnstone.toml");
    let out = turnstone()
        .args(["check-config", example])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The example advertises a public external_address: nothing to warn about.
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("warning"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_config_warns_about_a_private_relay_address() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("private.toml");
    let text =
        "[server]\nrealm = \"x\"\n[[listen]]\ntransport = \"udp\"\naddress = \"0.0.0.0:3478\"\n\
                [relay]\naddress = \"192.168.1.20\"\n[auth]\nusers = { a = \"b\" }\n";
    std::fs::write(&path, text).unwrap();
    let out = turnstone()
        .args(["check-config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "a warning is not an error: {stderr}");
    assert!(
        stderr.contains("warning: relay.address: 192.168.1.20 is a private address")
            && stderr.contains("external_address"),
        "{stderr}"
    );
    // With the public address given, no warning.
    std::fs::write(
        &path,
        text.replace(
            "address = \"192.168.1.20\"\n",
            "address = \"192.168.1.20\"\nexternal_address = \"198.51.100.4\"\n",
        ),
    )
    .unwrap();
    let out = turnstone()
        .args(["check-config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("warning"));
}

#[test]
fn check_config_names_every_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
[server]
realm = "x"
colour = "blue"
[[listen]]
transport = "udp"
address = "127.0.0.1:nope"
[relay]
address = "127.0.0.1"
ports = "9000-8000"
[auth]
users = { alice = "wonderland" }
[policy]
allow_peers = ["not-a-cidr"]
"#,
    )
    .unwrap();
    let out = turnstone()
        .args(["check-config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "server.colour",
        "listen[0].address",
        "relay.ports",
        "policy.allow_peers[0]",
    ] {
        assert!(err.contains(key), "missing {key} in:\n{err}");
    }
}

#[test]
fn missing_config_file_is_named() {
    let out = turnstone()
        .args(["check-config", "/nonexistent/turnstone.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/turnstone.toml"));
}

#[test]
fn credentials_can_print_an_ice_servers_entry() {
    let out = turnstone()
        .args([
            "credentials",
            "--secret",
            "s3cret",
            "--user",
            "alice",
            "--ttl",
            "1h",
            "--url",
            "turn:127.0.0.1:3478",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let user = v["username"].as_str().unwrap();
    let (expiry, id) = user.split_once(':').unwrap();
    assert_eq!(id, "alice");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expiry: u64 = expiry.parse().unwrap();
    assert!(expiry.abs_diff(now + 3600) < 60);
    assert_eq!(
        v["credential"].as_str().unwrap(),
        turnstone::auth::rest_password("s3cret", user)
    );
    assert_eq!(v["urls"][0], "turn:127.0.0.1:3478");
}
