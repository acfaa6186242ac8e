//! Network namespaces for tests: named namespaces joined by veth pairs, commands, threads and turnstone inside them, all deleted on drop.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::process::{require_tool, run_bounded, wait_for, ChildGuard};

/// Runs `ip args` to completion (bounded); panics with its output on failure.
pub fn ip(args: &[&str]) {
    let out = run_bounded("ip", Command::new("ip").args(args), Duration::from_secs(10));
    assert!(out.status.success(), "ip {args:?}: {}", out.combined());
}

/// A set of namespaces named `ts-{name}-{tag}`, deleted (with their veths) on drop.
pub struct Netns {
    tag: u32,
    names: Vec<String>,
    veths: AtomicU32,
}

impl Netns {
    /// Creates one namespace per short name, each with `lo` up.
    pub fn new(names: &[&str]) -> Netns {
        require_tool("ip", "apt-get install -y iproute2");
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let tag = (std::process::id() % 10_000) * 10 + NEXT.fetch_add(1, Ordering::Relaxed) % 10;
        let n = Netns {
            tag,
            names: names.iter().map(|s| s.to_string()).collect(),
            veths: AtomicU32::new(0),
        };
        for name in names {
            let ns = n.ns(name);
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        n
    }

    /// The full name of namespace `name`.
    pub fn ns(&self, name: &str) -> String {
        format!("ts-{name}-{}", self.tag)
    }

    /// A veth pair between namespaces `a` and `b` with the addresses (CIDR) given, both
    /// up; returns the two interface names.
    pub fn veth(&self, a: &str, a_addr: &str, b: &str, b_addr: &str) -> (String, String) {
        let i = self.veths.fetch_add(1, Ordering::Relaxed);
        let (da, db) = (
            format!("tsv{}{i}a", self.tag),
            format!("tsv{}{i}b", self.tag),
        );
        let (na, nb) = (self.ns(a), self.ns(b));
        ip(&[
            "link", "add", &da, "netns", &na, "type", "veth", "peer", &db, "netns", &nb,
        ]);
        ip(&["-n", &na, "addr", "add", a_addr, "dev", &da]);
        ip(&["-n", &nb, "addr", "add", b_addr, "dev", &db]);
        ip(&["-n", &na, "link", "set", &da, "up"]);
        ip(&["-n", &nb, "link", "set", &db, "up"]);
        (da, db)
    }

    /// Runs `args` inside namespace `name` to completion (bounded).
    pub fn exec(&self, name: &str, args: &[&str]) -> String {
        let ns = self.ns(name);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns]).args(args);
        let out = run_bounded(args[0], &mut cmd, Duration::from_secs(60));
        assert!(out.status.success(), "{args:?} in {ns}: {}", out.combined());
        out.combined()
    }

    /// Runs `f` on a thread that entered namespace `name` (sockets it makes stay there).
    pub fn enter<T: Send>(&self, name: &str, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.ns(name));
        std::thread::scope(|s| {
            s.spawn(move || {
                let fd = std::fs::File::open(&path).expect("open the namespace");
                nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("thread in namespace")
        })
    }

    /// A turnstone inside namespace `name` with the configuration `toml`, once it listens.
    pub fn turnstone(&self, name: &str, dir: &Path, label: &str, toml: &str) -> ChildGuard {
        let program = Path::new(env!("CARGO_BIN_EXE_turnstone"));
        self.turnstone_from(name, dir, label, toml, program)
    }

    /// [`Netns::turnstone`], started from `program` (a path an upgrade may replace).
    pub fn turnstone_from(
        &self,
        name: &str,
        dir: &Path,
        label: &str,
        toml: &str,
        program: &Path,
    ) -> ChildGuard {
        let config = dir.join(format!("{label}.toml"));
        std::fs::write(&config, toml).unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(name)])
            .arg(program)
            .arg("--config")
            .arg(&config);
        let mut server = ChildGuard::spawn(label, &mut cmd);
        wait_for(
            &format!("{label} listening"),
            Duration::from_secs(20),
            || {
                if let Some(st) = server.try_wait() {
                    panic!("{label} exited ({st}):\n{}", server.output());
                }
                server.output().contains("listening").then_some(())
            },
        );
        server
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(name)])
                .output();
        }
    }
}
