//! The command line: `check-config` accepts the shipped example, names every bad key,
//! warns about a relay address clients outside could not reach and says what the kernel
//! fast path would do; `credentials` mints a
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

/// `check-config` on `relay_keys` (keys of `[relay]` after the address 127.0.0.1): its
/// exit status, stdout and stderr.
fn check_fast_path(relay_keys: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fp.toml");
    let text = format!(
        "[server]\nrealm = \"x\"\n[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:3478\"\n\
         [relay]\naddress = \"127.0.0.1\"\n{relay_keys}\n[auth]\nusers = {{ a = \"b\" }}\n"
    );
    std::fs::write(&path, text).unwrap();
    let out = turnstone()
        .args(["check-config", path.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_says_what_the_kernel_fast_path_would_do() {
    // The default: auto; on loopback only it would not be used.
    let (ok, stdout, stderr) = check_fast_path("");
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("kernel fast path: relay.kernel_fast_path = \"auto\"; this build")
            && stdout.contains("kernel fast path: would not be used: loopback only; allocations would relay in userspace"),
        "{stdout}"
    );
    let (ok, stdout, _) = check_fast_path("kernel_fast_path = \"off\"");
    assert!(ok);
    assert!(
        stdout.contains("relay.kernel_fast_path = \"off\"")
            && stdout.contains("off; every allocation relays in userspace")
            && !stdout.contains("would"),
        "{stdout}"
    );
    let (ok, stdout, _) =
        check_fast_path("kernel_fast_path = \"required\"\nfast_path_interfaces = [\"lo\"]");
    assert!(ok);
    assert!(
        stdout.contains("would not be used: loopback only; \"required\" would refuse to start"),
        "{stdout}"
    );
    // Names are checked here, where the server would run, not when parsing.
    let (ok, stdout, _) = check_fast_path("fast_path_interfaces = [\"lo\", \"nosuchif9\"]");
    assert!(ok);
    assert!(
        stdout.contains("there is no interface \"nosuchif9\""),
        "{stdout}"
    );
    // The key's old place is an error naming the new one.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.toml");
    std::fs::write(
        &path,
        "[server]\nrealm = \"x\"\nkernel_fast_path = \"auto\"\n[[listen]]\ntransport = \"udp\"\n\
         address = \"127.0.0.1:3478\"\n[relay]\naddress = \"127.0.0.1\"\n[auth]\nusers = { a = \"b\" }\n",
    )
    .unwrap();
    let out = turnstone()
        .args(["check-config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("server.kernel_fast_path: moved to relay.kernel_fast_path"),
        "{stderr}"
    );
}
