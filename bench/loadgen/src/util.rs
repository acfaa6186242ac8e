//! Shared helpers: UDP sockets with large buffers, /proc readings, the UDP echo peer,
//! percentiles, and the `RESULT key=value ...` line every tool prints for `bench/run`.

use std::fmt::Write as _;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// Requested SO_RCVBUF / SO_SNDBUF (the kernel caps it at net.core.rmem_max/wmem_max).
pub const BIG_BUFFER: usize = 4 << 20;

/// Linux USER_HZ: the unit of utime/stime in /proc/<pid>/stat (100 on every Linux ABI).
pub const CLOCK_TICKS_PER_SEC: u64 = 100;

/// A blocking UDP socket bound to `bind` with `buf`-byte send and receive buffers.
pub fn udp_socket(bind: SocketAddr, buf: usize) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: the kernel clamps to its maximum.
    let _ = s.set_recv_buffer_size(buf);
    let _ = s.set_send_buffer_size(buf);
    s.bind(&bind.into())?;
    Ok(s.into())
}

/// utime + stime of the whole process (all threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let rest = text
        .rfind(')')
        .and_then(|i| text.get(i + 1..))
        .ok_or_else(|| io::Error::other("malformed /proc/<pid>/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ")": field 3 (state) is index 0, so utime (14) is 11 and stime (15) is 12.
    let get = |i: usize| -> io::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| io::Error::other("malformed /proc/<pid>/stat"))
    };
    Ok(get(11)? + get(12)?)
}

/// CPU time of `pid` in microseconds.
pub fn cpu_us(pid: u32) -> io::Result<u64> {
    cpu_ticks(pid).map(|t| t * 1_000_000 / CLOCK_TICKS_PER_SEC)
}

/// Idle and iowait time of the whole machine, from the `cpu` line of /proc/stat (clock
/// ticks; these two columns come from the kernel's exact idle accounting), and the number
/// of CPUs (`cpuN` lines).
#[derive(Clone, Copy, Debug)]
pub struct MachineCpu {
    pub idle_ticks: u64,
    pub ncpu: usize,
}

impl MachineCpu {
    pub fn read() -> io::Result<MachineCpu> {
        Self::parse(&std::fs::read_to_string("/proc/stat")?)
    }

    pub fn parse(text: &str) -> io::Result<MachineCpu> {
        let bad = || io::Error::other("malformed /proc/stat");
        let total = text
            .lines()
            .find(|l| l.starts_with("cpu "))
            .ok_or_else(bad)?;
        let f: Vec<u64> = total
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().map_err(|_| bad()))
            .collect::<io::Result<_>>()?;
        // user nice system idle iowait ...
        let idle_ticks = f.get(3).ok_or_else(bad)? + f.get(4).ok_or_else(bad)?;
        let ncpu = text
            .lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .count();
        Ok(MachineCpu {
            idle_ticks,
            ncpu: ncpu.max(1),
        })
    }

    /// Busy µs of all CPUs together between `earlier` and `self`, `wall_secs` apart.
    pub fn busy_us_since(&self, earlier: &MachineCpu, wall_secs: f64) -> f64 {
        let idle_us = self.idle_ticks.saturating_sub(earlier.idle_ticks) as f64 * 1e6
            / CLOCK_TICKS_PER_SEC as f64;
        (wall_secs * 1e6 * self.ncpu as f64 - idle_us).max(0.0)
    }
}

/// VmRSS of `pid` in KiB.
pub fn rss_kib(pid: u32) -> io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::other("no VmRSS in /proc/<pid>/status"))
}

/// Number of open file descriptors of `pid`.
pub fn fd_count(pid: u32) -> io::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// A UDP echo peer on its own thread: every datagram goes back to its sender.
pub struct Echo {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    pub echoed: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl Echo {
    pub fn start(bind: SocketAddr) -> io::Result<Echo> {
        let sock = udp_socket(bind, BIG_BUFFER)?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let addr = sock.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let echoed = Arc::new(AtomicU64::new(0));
        let (stop2, echoed2) = (stop.clone(), echoed.clone());
        let handle = std::thread::Builder::new()
            .name("echo".into())
            .spawn(move || {
                let mut buf = [0u8; 2048];
                let mut n_echoed = 0u64;
                while !stop2.load(Ordering::Relaxed) {
                    match sock.recv_from(&mut buf) {
                        Ok((n, from)) => {
                            if let Some(b) = buf.get(..n) {
                                if sock.send_to(b, from).is_ok() {
                                    n_echoed += 1;
                                    if n_echoed.is_multiple_of(1024) {
                                        echoed2.store(n_echoed, Ordering::Relaxed);
                                    }
                                }
                            }
                        }
                        Err(_) => echoed2.store(n_echoed, Ordering::Relaxed),
                    }
                }
                echoed2.store(n_echoed, Ordering::Relaxed);
            })?;
        Ok(Echo {
            addr,
            stop,
            echoed,
            handle: Some(handle),
        })
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The `p`-th percentile (0..=100) of sorted `v` (nearest rank); 0 when empty.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let i = rank.clamp(1, sorted.len()) - 1;
    sorted.get(i).copied().unwrap_or(0)
}

/// Collects `key=value` pairs and prints them as one `RESULT tool key=value ...` line.
pub struct ResultLine(String);

impl ResultLine {
    pub fn new(tool: &str) -> Self {
        ResultLine(format!("RESULT {tool}"))
    }
    pub fn kv(&mut self, key: &str, value: impl std::fmt::Display) -> &mut Self {
        let _ = write!(self.0, " {key}={value}");
        self
    }
    pub fn print(&self) {
        println!("{}", self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::MachineCpu;

    #[test]
    fn machine_cpu_from_proc_stat() {
        let a = MachineCpu::parse(
            "cpu  100 0 50 1000 20 0 5 0 0 0\ncpu0 50 0 25 500 10 0 2 0 0 0\n\
             cpu1 50 0 25 500 10 0 3 0 0 0\nintr 1 2\nctxt 3\n",
        )
        .unwrap();
        assert_eq!((a.idle_ticks, a.ncpu), (1020, 2));
        // One second later, 150 of the 200 CPU ticks idle: 0.5 s busy.
        let b = MachineCpu::parse("cpu  150 0 50 1140 30 0 5 0 0 0\ncpu0 1\ncpu1 1\n").unwrap();
        assert!((b.busy_us_since(&a, 1.0) - 500_000.0).abs() < 1e-6);
        assert!(MachineCpu::parse("intr 1\n").is_err());
    }
}
