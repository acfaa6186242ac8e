//! External processes (tools, the turnstone CLI): bounded lifetimes, output, waiting.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Full path of an external tool, or a panic that says how to install it.
pub fn require_tool(name: &str, install_hint: &str) -> PathBuf {
    if let Some(p) = find_tool(name) {
        return p;
    }
    panic!(
        "required tool `{name}` was not found in PATH.\n\
         Install it with: `{install_hint}` (as root), or run `bash scripts/test`, \
         which installs every tool the tests need when run as root."
    );
}

/// Full path of an executable in PATH, if any.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// A child process killed (SIGKILL to its whole process group) and reaped on drop.
/// Its stdout/stderr go to files; they are printed if the thread is panicking.
pub struct ChildGuard {
    pub name: String,
    child: Option<Child>,
    /// Where `stdout.log` and `stderr.log` are.
    logs: PathBuf,
    /// The temporary directory made by [`ChildGuard::spawn`].
    _dir: Option<tempfile::TempDir>,
    /// Print the output when dropped while panicking ([`ChildGuard::spawn`]).
    report: bool,
}

impl ChildGuard {
    /// Spawns `cmd` in its own process group with output captured to files.
    pub fn spawn(name: &str, cmd: &mut Command) -> ChildGuard {
        let dir = tempfile::Builder::new()
            .prefix("turnstone-child-")
            .tempdir()
            .expect("temp dir");
        let mut g = ChildGuard::spawn_in(name, cmd, dir.path());
        g._dir = Some(dir);
        g.report = true;
        g
    }

    /// Like [`ChildGuard::spawn`], with the output in `logs/stdout.log` and
    /// `logs/stderr.log`; the owner of `logs` prints them.
    pub fn spawn_in(name: &str, cmd: &mut Command, logs: &Path) -> ChildGuard {
        let out = File::create(logs.join("stdout.log")).expect("stdout.log");
        let err = File::create(logs.join("stderr.log")).expect("stderr.log");
        Self::spawn_to(name, cmd, logs, out, err)
    }

    /// [`ChildGuard::spawn_in`], appending to `stdout.log` and `stderr.log` in `logs`
    /// (a service started again after a restart writes after its predecessor).
    pub fn spawn_appending(name: &str, cmd: &mut Command, logs: &Path) -> ChildGuard {
        let open = |f: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(logs.join(f))
                .unwrap_or_else(|e| panic!("{f}: {e}"))
        };
        Self::spawn_to(name, cmd, logs, open("stdout.log"), open("stderr.log"))
    }

    fn spawn_to(name: &str, cmd: &mut Command, logs: &Path, out: File, err: File) -> ChildGuard {
        use std::os::unix::process::CommandExt;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        ChildGuard {
            name: name.to_string(),
            child: Some(child),
            logs: logs.to_path_buf(),
            _dir: None,
            report: false,
        }
    }

    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `Some(status)` once the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits until the process exits (`Some(status)`) or `timeout` passes (`None`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the process exits or `timeout` passes; on timeout it is killed
    /// and `None` is returned.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let st = self.wait_exit(timeout);
        if st.is_none() {
            self.kill();
        }
        st
    }

    pub fn stdout(&self) -> String {
        read_lossy(&self.logs.join("stdout.log"))
    }

    pub fn stderr(&self) -> String {
        read_lossy(&self.logs.join("stderr.log"))
    }

    pub fn output(&self) -> String {
        format!(
            "----- {} stdout -----\n{}\n----- {} stderr -----\n{}\n----- end -----",
            self.name,
            self.stdout(),
            self.name,
            self.stderr()
        )
    }

    /// Kills the process group (only the processes this guard started) and reaps.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The child leads its own process group (process_group(0) above), so
            // the group id is its pid; this also ends helpers it forked (Chromium).
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
        if self.report && std::thread::panicking() {
            eprintln!("{}", self.output());
        }
    }
}

fn read_lossy(p: &Path) -> String {
    let mut v = Vec::new();
    if let Ok(mut f) = File::open(p) {
        let _ = f.read_to_end(&mut v);
    }
    String::from_utf8_lossy(&v).into_owned()
}

/// Result of [`run_bounded`].
pub struct RunOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl RunOutput {
    /// stdout followed by stderr (coturn's tools print to both).
    pub fn combined(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Runs `cmd` to completion, killing it and panicking (with its output) if it
/// takes longer than `timeout`.
pub fn run_bounded(name: &str, cmd: &mut Command, timeout: Duration) -> RunOutput {
    let mut g = ChildGuard::spawn(name, cmd);
    match g.wait_timeout(timeout) {
        Some(status) => RunOutput {
            status,
            stdout: g.stdout(),
            stderr: g.stderr(),
        },
        None => {
            let output = g.output();
            drop(g);
            panic!("{name} did not finish within {timeout:?}; killed it\n{output}")
        }
    }
}

/// Runs the `turnstone` binary with `args` (bounded to 30 s).
pub fn run_turnstone(args: &[&str]) -> RunOutput {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_turnstone"));
    cmd.args(args);
    run_bounded("turnstone", &mut cmd, Duration::from_secs(30))
}

/// Parses the output of `turnstone credentials`: accepts `username: X` / `password: Y`
/// lines (any case, `:` or `=`), or a JSON object with `username` and
/// `password` or `credential` keys (alone or inside an iceServers entry).
pub fn parse_credentials(output: &str) -> Option<(String, String)> {
    let mut user = None;
    let mut pass = None;
    for line in output.lines() {
        let line = line.trim();
        if line.starts_with('{') || line.starts_with('[') {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                if let Some(found) = credentials_in_json(&v) {
                    return Some(found);
                }
            }
            continue;
        }
        let Some((k, v)) = line.split_once([':', '=']) else {
            continue;
        };
        let v = v.trim().trim_matches('"').to_string();
        match k.trim().to_ascii_lowercase().as_str() {
            "username" | "user" if user.is_none() => user = Some(v),
            "password" | "credential" if pass.is_none() => pass = Some(v),
            _ => {}
        }
    }
    if let (Some(u), Some(p)) = (user, pass) {
        return Some((u, p));
    }
    // Whole output as one (pretty-printed) JSON document.
    serde_json::from_str::<serde_json::Value>(output.trim())
        .ok()
        .and_then(|v| credentials_in_json(&v))
}

fn credentials_in_json(v: &serde_json::Value) -> Option<(String, String)> {
    match v {
        serde_json::Value::Object(m) => {
            let u = m.get("username").and_then(|x| x.as_str());
            let p = m
                .get("password")
                .or_else(|| m.get("credential"))
                .and_then(|x| x.as_str());
            if let (Some(u), Some(p)) = (u, p) {
                return Some((u.to_string(), p.to_string()));
            }
            m.values().find_map(credentials_in_json)
        }
        serde_json::Value::Array(a) => a.iter().find_map(credentials_in_json),
        _ => None,
    }
}

/// Runs `turnstone ARGS` and returns its standard output; panics (with its stderr) unless
/// it succeeds.
pub fn turnstone_cli(args: &[&str]) -> String {
    let out = run_turnstone(args);
    assert!(
        out.status.success(),
        "turnstone {args:?}: {}\n{}",
        out.status,
        out.stderr
    );
    out.stdout
}

/// Sends signal `sig` (e.g. "HUP") to `pid` with kill(1).
pub fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -{sig} {pid} failed");
}

/// Polls `f` every 10 ms until it gives `Some` (panics with `what` after `timeout`).
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
