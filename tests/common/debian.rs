//! Debian bookworm for the packaging tests: a minbase root (mmdebstrap, cached), the .deb, chroots and podman.
//!
//! Everything these tests keep between runs lives in `target/packaging-test/` (git-ignored):
//! `bookworm-minbase.tar` (made once by `mmdebstrap --variant=minbase bookworm`, about
//! 170 MB; delete it to make a fresh one), the staged binary and the test packages. The
//! binary under test is the debug build cargo made for the tests, without its debug
//! information; the packaging metadata and files are the ones `cargo deb` uses for a
//! release.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use super::process::{require_tool, run_bounded, ChildGuard, RunOutput};

pub const MMDEBSTRAP_HINT: &str = "apt-get install -y mmdebstrap";
pub const PODMAN_HINT: &str = "apt-get install -y podman runc";
pub const CARGO_DEB_HINT: &str = "cargo install cargo-deb --locked";
pub const BINUTILS_HINT: &str = "apt-get install -y binutils";

/// The name the Containerfile's `FROM debian:bookworm-slim` resolves to when no container
/// registry is reachable: the tests import the mmdebstrap root under it.
pub const BASE_IMAGE: &str = "localhost/debian:bookworm-slim";

/// mmdebstrap downloads about 40 MB of packages; apt in a root a few more.
const NETWORK_TIMEOUT: Duration = Duration::from_secs(600);
/// A command that needs no network.
const LOCAL_TIMEOUT: Duration = Duration::from_secs(120);

/// The repository.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `target/packaging-test/` (the cargo target directory of the binary under test).
pub fn work_dir() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_turnstone"));
    let target = bin
        .parent()
        .and_then(Path::parent)
        .expect("the binary lies in target/PROFILE/");
    let dir = target.join("packaging-test");
    std::fs::create_dir_all(&dir).expect("create target/packaging-test");
    dir
}

/// Runs `cmd` (bounded) and returns its output; panics with it unless it succeeds.
pub fn run_ok(name: &str, cmd: &mut Command, timeout: Duration) -> RunOutput {
    let out = run_bounded(name, cmd, timeout);
    assert!(
        out.status.success(),
        "{name} failed ({}): {cmd:?}\n{}",
        out.status,
        out.combined()
    );
    out
}

/// Moves `tmp` to `path` (both in one directory), so that a concurrent test process sees
/// either nothing or the whole file.
fn publish(tmp: &Path, path: &Path) {
    std::fs::rename(tmp, path)
        .unwrap_or_else(|e| panic!("rename {} to {}: {e}", tmp.display(), path.display()));
}

/// `target/packaging-test/bookworm-minbase.tar`, made by mmdebstrap the first time (about
/// 15 s to a minute, from Debian's mirror).
pub fn bookworm_tarball() -> PathBuf {
    static TARBALL: OnceLock<PathBuf> = OnceLock::new();
    TARBALL
        .get_or_init(|| {
            let path = work_dir().join("bookworm-minbase.tar");
            if !path.exists() {
                let mmdebstrap = require_tool("mmdebstrap", MMDEBSTRAP_HINT);
                let tmp = work_dir().join(format!("bookworm-minbase.{}.tar", std::process::id()));
                run_ok(
                    "mmdebstrap",
                    Command::new(mmdebstrap)
                        .args(["--variant=minbase", "bookworm"])
                        .arg(&tmp),
                    NETWORK_TIMEOUT,
                );
                publish(&tmp, &path);
            }
            path
        })
        .clone()
}

/// The binary under test without debug information, at
/// `target/packaging-test/stage/release/turnstone` (where `cargo deb --no-build` with
/// `CARGO_TARGET_DIR=target/packaging-test/stage` takes it from).
pub fn staged_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            let dir = work_dir().join("stage/release");
            std::fs::create_dir_all(&dir).expect("create the stage directory");
            let path = dir.join("turnstone");
            let tmp = dir.join(format!("turnstone.{}", std::process::id()));
            let objcopy = require_tool("objcopy", BINUTILS_HINT);
            run_ok(
                "objcopy",
                Command::new(objcopy)
                    .arg("--strip-debug")
                    .arg(env!("CARGO_BIN_EXE_turnstone"))
                    .arg(&tmp),
                LOCAL_TIMEOUT,
            );
            publish(&tmp, &path);
            path
        })
        .clone()
}

/// `cargo deb` with the repository's `[package.metadata.deb]` around the staged binary,
/// as version `version` (`None`: the crate's): the path of the .deb.
pub fn build_deb(version: Option<&str>) -> PathBuf {
    require_tool("cargo-deb", CARGO_DEB_HINT);
    let binary = staged_binary();
    let stage = binary
        .parent()
        .and_then(Path::parent)
        .expect("stage/release/turnstone");
    let name = format!(
        "turnstone_{}_amd64.deb",
        version.unwrap_or(env!("CARGO_PKG_VERSION"))
    );
    let out = work_dir().join(format!("{}.{name}", std::process::id()));
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(repo())
        .env("CARGO_TARGET_DIR", stage)
        .args(["deb", "--no-build", "--no-dbgsym", "--fast", "--offline"])
        .arg("--output")
        .arg(&out);
    if let Some(v) = version {
        cmd.args(["--deb-version", v]);
    }
    run_ok("cargo deb", &mut cmd, LOCAL_TIMEOUT);
    let path = work_dir().join(name);
    publish(&out, &path);
    path
}

/// A Debian bookworm root in a temporary directory, unpacked from [`bookworm_tarball`];
/// commands run in it with `chroot`, in their own mount and PID namespaces with a /proc
/// of their own (nothing stays mounted when they end). Removed on drop.
pub struct Chroot {
    dir: tempfile::TempDir,
}

impl Chroot {
    pub fn bookworm() -> Chroot {
        let tarball = bookworm_tarball();
        let dir = tempfile::Builder::new()
            .prefix("turnstone-bookworm-")
            .tempdir()
            .expect("temp dir");
        run_ok(
            "tar",
            Command::new("tar")
                .arg("-xf")
                .arg(&tarball)
                .arg("-C")
                .arg(dir.path()),
            LOCAL_TIMEOUT,
        );
        // apt in the root resolves the mirror's name like the host.
        std::fs::copy("/etc/resolv.conf", dir.path().join("etc/resolv.conf"))
            .expect("copy /etc/resolv.conf into the root");
        Chroot { dir }
    }

    /// The host path of `path` (absolute, as seen in the root).
    pub fn path(&self, path: &str) -> PathBuf {
        self.dir.path().join(path.trim_start_matches('/'))
    }

    /// `args` run in the root (as root, or as `user` given as `USER:GROUP`).
    pub fn command(&self, user: Option<&str>, args: &[&str]) -> Command {
        require_tool("unshare", "apt-get install -y util-linux");
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--pid", "--fork", "--kill-child"])
            .arg(format!("--mount-proc={}", self.path("/proc").display()))
            .arg("chroot");
        if let Some(user) = user {
            cmd.arg(format!("--userspec={user}"));
        }
        cmd.arg(self.dir.path())
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", "/root")
            .env("LANG", "C.UTF-8")
            .env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    }

    /// Runs `args` as root in the root: its output, whatever its exit status.
    pub fn run(&self, args: &[&str]) -> RunOutput {
        run_bounded(
            &args.join(" "),
            &mut self.command(None, args),
            NETWORK_TIMEOUT,
        )
    }

    /// Runs `args` as root in the root; panics with the output unless it succeeds.
    pub fn ok(&self, args: &[&str]) -> RunOutput {
        run_ok(
            &args.join(" "),
            &mut self.command(None, args),
            NETWORK_TIMEOUT,
        )
    }

    /// Starts `args` in the root as `user` (`USER:GROUP`), killed on drop.
    pub fn spawn(&self, user: &str, args: &[&str]) -> ChildGuard {
        ChildGuard::spawn(&args.join(" "), &mut self.command(Some(user), args))
    }

    /// Copies the host file `from` to `to` in the root; returns `to`.
    pub fn copy_in<'a>(&self, from: &Path, to: &'a str) -> &'a str {
        std::fs::copy(from, self.path(to))
            .unwrap_or_else(|e| panic!("copy {} into the root: {e}", from.display()));
        to
    }

    /// `apt-get update` then `apt-get install` of the host .deb files `debs` (with the
    /// dependencies they name, from Debian's mirror).
    pub fn apt_install(&self, debs: &[&Path]) {
        self.ok(&["apt-get", "update", "-q"]);
        let mut args = vec!["apt-get", "install", "-y", "-q", "--no-install-recommends"];
        let names: Vec<String> = debs
            .iter()
            .map(|d| format!("/tmp/{}", d.file_name().unwrap().to_string_lossy()))
            .collect();
        for (deb, name) in debs.iter().zip(&names) {
            args.push(self.copy_in(deb, name));
        }
        self.ok(&args);
    }
}

// ---------------------------------------------------------------------------------------------
// podman
// ---------------------------------------------------------------------------------------------

/// Limits for `podman build` and `podman run` that fit this kind of test machine (podman's
/// defaults exceed a hard limit of 20,000 open files); operators need none of them.
pub const PODMAN_LIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
];

/// `podman` with the runc runtime (crun refuses hybrid cgroup hierarchies).
pub fn podman() -> Command {
    let podman = require_tool("podman", PODMAN_HINT);
    require_tool("runc", PODMAN_HINT);
    let mut cmd = Command::new(podman);
    cmd.args(["--runtime", "runc"]);
    cmd
}

/// Runs `podman ARGS`; panics with its output unless it succeeds.
pub fn podman_ok(args: &[&str], timeout: Duration) -> RunOutput {
    run_ok(&format!("podman {}", args[0]), podman().args(args), timeout)
}

/// Makes [`BASE_IMAGE`] from [`bookworm_tarball`] unless it exists (kept between runs).
pub fn ensure_base_image() {
    let exists = run_bounded(
        "podman image exists",
        podman().args(["image", "exists", BASE_IMAGE]),
        LOCAL_TIMEOUT,
    );
    if !exists.status.success() {
        let tarball = bookworm_tarball();
        podman_ok(
            &["import", &tarball.display().to_string(), BASE_IMAGE],
            LOCAL_TIMEOUT,
        );
    }
}

/// A container started with `podman run --name NAME` in the foreground (its stdout and
/// stderr are the guard's); on drop it is removed with `podman rm -f`.
pub struct Container {
    pub name: String,
    pub process: ChildGuard,
}

impl Container {
    /// `podman run --rm --name NAME [PODMAN_LIMITS] RUN_ARGS IMAGE [ARGS]`.
    pub fn run(name: &str, run_args: &[&str], image: &str, args: &[&str]) -> Container {
        let mut cmd = podman();
        cmd.args(["run", "--rm", "--name", name])
            .args(PODMAN_LIMITS)
            .args(run_args)
            .arg(image)
            .args(args);
        Container {
            name: name.to_string(),
            process: ChildGuard::spawn(&format!("container {name}"), &mut cmd),
        }
    }

    /// `podman ARGS` about this container, e.g. `["exec", NAME, "id"]`, as written.
    pub fn podman(&self, args: &[&str]) -> RunOutput {
        run_bounded("podman", podman().args(args), LOCAL_TIMEOUT)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = run_bounded(
            "podman rm",
            podman().args(["rm", "--force", "--time", "0", &self.name]),
            LOCAL_TIMEOUT,
        );
    }
}

/// Waits until `addr` answers a STUN Binding request, or panics with `logs()` once
/// `timeout` has passed.
pub fn wait_stun(addr: SocketAddr, timeout: Duration, logs: impl Fn() -> String) {
    if let Err(e) = super::stun::stun_binding(addr, timeout) {
        panic!("no STUN answer from {addr}: {e}\n{}", logs());
    }
}
