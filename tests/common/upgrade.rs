//! Upgrading a test server in place: its own binary path (a symlink a test can point
//! elsewhere, as a package upgrade replaces the file), its control socket, and
//! `turnstone upgrade` run against it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::process::run_bounded;
use super::server::{ServerOptions, TestServer};

/// The server's binary path inside its directory.
pub fn binary(dir: &Path) -> PathBuf {
    dir.join("bin").join("turnstone")
}

/// The control socket inside the server's directory (in a 0700 directory).
pub fn control_socket(dir: &Path) -> PathBuf {
    dir.join("run").join("control.sock")
}

/// Makes `bin/turnstone` (pointing at the built binary) and the 0700 `run/` directory
/// in `dir`; returns the `[server]` line naming the control socket there.
pub fn prepare_dir(dir: &Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir.join("bin")).expect("bin dir");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_turnstone"), binary(dir)).expect("symlink");
    let run = dir.join("run");
    std::fs::create_dir_all(&run).expect("run dir");
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    format!("control_socket = \"{}\"\n", control_socket(dir).display())
}

/// [`prepare_dir`] for a harness server: the control socket goes in its options.
pub fn prepare(dir: &Path, options: &mut ServerOptions) {
    let line = prepare_dir(dir);
    options.server_toml.push('\n');
    options.server_toml.push_str(&line);
}

/// Installs `target` at `dir`'s binary path (a new symlink renamed over the old one:
/// the running process keeps its file).
pub fn install(dir: &Path, target: &Path) {
    let tmp = dir.join("bin").join("turnstone.new");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).expect("symlink");
    std::fs::rename(&tmp, binary(dir)).expect("rename");
}

/// Installs a shell script with `body` as `dir`'s binary (a build that dies, a wrapper
/// with another configuration...).
pub fn install_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("bin").join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    install(dir, &path);
    path
}

/// Runs `cmd` (a `turnstone upgrade --socket ...`, wherever it runs) and reads its
/// report: what the new process took over, or what the command said.
pub fn run_upgrade(cmd: &mut Command) -> Result<Upgraded, String> {
    let out = run_bounded("turnstone upgrade", cmd, Duration::from_secs(120));
    let text = out.combined();
    if !out.status.success() {
        return Err(text);
    }
    let json = text
        .lines()
        .find_map(|l| l.strip_prefix("ok "))
        .ok_or_else(|| format!("no \"ok\" line: {text}"))?;
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("{e}: {json}"))?;
    let num = |k: &str| v.get(k).and_then(serde_json::Value::as_f64).unwrap_or(-1.0);
    Ok(Upgraded {
        pid: num("pid") as u32,
        allocations: num("allocations") as usize,
        sockets: num("sockets") as usize,
        pause_ms: num("pause_ms"),
        output: text.clone(),
    })
}

/// What `turnstone upgrade` reported.
#[derive(Debug, Clone)]
pub struct Upgraded {
    pub pid: u32,
    pub allocations: usize,
    pub sockets: usize,
    pub pause_ms: f64,
    pub output: String,
}

impl TestServer {
    /// The path the server was started from.
    pub fn binary(&self) -> PathBuf {
        binary(self.dir())
    }

    pub fn control_socket(&self) -> PathBuf {
        control_socket(self.dir())
    }

    /// Installs `target` at the server's binary path ([`install`]).
    pub fn install_binary(&self, target: &Path) {
        install(self.dir(), target);
    }

    /// Installs the built binary again.
    pub fn install_built_binary(&self) {
        self.install_binary(Path::new(env!("CARGO_BIN_EXE_turnstone")));
    }

    /// Installs a shell script as the server's binary ([`install_script`]).
    pub fn install_script(&self, name: &str, body: &str) -> PathBuf {
        install_script(self.dir(), name, body)
    }

    /// Runs `turnstone upgrade` against this server: the report once the new process
    /// serves (it is then the one [`TestServer::pid`] names), or what the command said.
    pub fn upgrade(&self) -> Result<Upgraded, String> {
        let up = run_upgrade(
            Command::new(env!("CARGO_BIN_EXE_turnstone"))
                .arg("upgrade")
                .arg("--socket")
                .arg(self.control_socket()),
        )?;
        self.serving_pid
            .store(up.pid, std::sync::atomic::Ordering::Relaxed);
        Ok(up)
    }

    /// [`TestServer::upgrade`], which must succeed.
    pub fn must_upgrade(&self) -> Upgraded {
        self.upgrade()
            .unwrap_or_else(|e| panic!("upgrade failed: {e}\n{}", self.logs()))
    }
}
