//! The paced load generator. Sets up N allocations (Allocate with the 401 round trip,
//! then ChannelBind, or CreatePermission for Send indications) toward its own UDP echo
//! peer, then offers a fixed rate of packets, round-robin over the allocations, and counts
//! what comes back. Against the floor forwarder it sends the same payloads as plain UDP
//! from one socket (the forwarder returns everything to the last client address).
//!
//! Rates are *relayed* packets per second through the server: each packet the generator
//! sends is relayed twice (client -> peer, then the echo peer -> client), so
//! `--rate 100000` means 50,000 packets/s sent by the generator and 50,000 echoed.
//!
//! Phases: warm-up (not counted), measurement (`--duration`), drain (500 ms). The server
//! CPU (utime+stime of `--pid` from /proc) is read at the start and end of the
//! measurement phase; `cpu_us_per_pkt = server CPU µs / (2 × round trips completed)` for
//! the packets sent during the measurement phase.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use turnstone::proto::{method, parse_channel_data, write_channel_data_header, Class, Message};

use crate::turn::{build_send_indication, Client, User};
use crate::util::{cpu_us, percentile, udp_socket, Echo, MachineCpu, ResultLine, BIG_BUFFER};

/// The channel every allocation binds (one per allocation, so the same number is fine).
const CHANNEL: u16 = 0x4000;
/// Sequence number (8 bytes) + send time in ns since start (8 bytes).
const STAMP: usize = 16;

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Mode {
    /// TURN, ChannelData.
    Channel,
    /// TURN, Send/Data indications.
    Send,
    /// Plain UDP to the floor forwarder.
    Floor,
}

pub struct Opts {
    pub mode: Mode,
    pub server: SocketAddr,
    pub peer: SocketAddr,
    pub external_peer: bool,
    /// Local address of the client sockets (port 0).
    pub bind: std::net::IpAddr,
    pub allocs: usize,
    pub rate: u64,
    pub warmup: f64,
    pub duration: f64,
    pub payload: usize,
    pub pid: Option<u32>,
    pub user: User,
    pub label: String,
}

/// What the receiver thread saw: for each sequence number, the round trip in µs
/// (`u32::MAX` if never received).
struct Received {
    rtt_us: Vec<u32>,
    duplicates: u64,
    malformed: u64,
}

fn payload_of(mode: Mode, pkt: &[u8]) -> Option<&[u8]> {
    match mode {
        Mode::Floor => Some(pkt),
        Mode::Channel => parse_channel_data(pkt).map(|(_, d)| d),
        Mode::Send => {
            let m = Message::parse(pkt).ok()?;
            if m.method() == method::DATA && m.class() == Class::Indication {
                m.data()
            } else {
                None
            }
        }
    }
}

fn receiver(
    mode: Mode,
    socks: Vec<UdpSocket>,
    capacity: usize,
    start: Instant,
    stop: Arc<AtomicBool>,
) -> io::Result<Received> {
    let mut poll = Poll::new()?;
    let mut msocks = Vec::with_capacity(socks.len());
    for (i, s) in socks.into_iter().enumerate() {
        s.set_nonblocking(true)?;
        let mut m = mio::net::UdpSocket::from_std(s);
        poll.registry()
            .register(&mut m, Token(i), Interest::READABLE)?;
        msocks.push(m);
    }
    let mut events = Events::with_capacity(256);
    let mut buf = vec![0u8; 2048];
    let mut rx = Received {
        rtt_us: vec![u32::MAX; capacity],
        duplicates: 0,
        malformed: 0,
    };
    while !stop.load(Ordering::Relaxed) {
        match poll.poll(&mut events, Some(Duration::from_millis(50))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for ev in events.iter() {
            let Some(sock) = msocks.get(ev.token().0) else {
                continue;
            };
            loop {
                let n = match sock.recv(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => continue,
                };
                let now_ns = start.elapsed().as_nanos() as u64;
                let stamp = buf
                    .get(..n)
                    .and_then(|p| payload_of(mode, p))
                    .and_then(|d| d.get(..STAMP));
                let Some(stamp) = stamp else {
                    rx.malformed += 1;
                    continue;
                };
                let mut seq = [0u8; 8];
                let mut sent = [0u8; 8];
                seq.copy_from_slice(&stamp[..8]);
                sent.copy_from_slice(&stamp[8..]);
                let seq = u64::from_be_bytes(seq) as usize;
                let rtt = now_ns.saturating_sub(u64::from_be_bytes(sent)) / 1000;
                match rx.rtt_us.get_mut(seq) {
                    Some(slot) if *slot == u32::MAX => {
                        *slot = rtt.min(u64::from(u32::MAX - 1)) as u32
                    }
                    Some(_) => rx.duplicates += 1,
                    None => rx.malformed += 1,
                }
            }
        }
    }
    Ok(rx)
}

pub fn run(o: Opts) -> io::Result<()> {
    if o.payload < STAMP {
        return Err(io::Error::other(format!("--payload must be >= {STAMP}")));
    }
    let echo = if o.external_peer {
        None
    } else {
        Some(Echo::start(o.peer)?)
    };

    // Set up the client sockets.
    let mut socks: Vec<UdpSocket> = Vec::new();
    let mut clients: Vec<Client> = Vec::new();
    match o.mode {
        Mode::Floor => {
            let s = udp_socket(SocketAddr::new(o.bind, 0), BIG_BUFFER)?;
            s.connect(o.server)?;
            socks.push(s);
        }
        Mode::Channel | Mode::Send => {
            for i in 0..o.allocs.max(1) {
                let mut c =
                    Client::new(o.server, o.user.clone(), Some(SocketAddr::new(o.bind, 0)))?;
                let what = |e: io::Error, step: &str| {
                    io::Error::other(format!("allocation {i}: {step}: {e}"))
                };
                c.allocate().map_err(|e| what(e, "Allocate"))?;
                if o.mode == Mode::Channel {
                    c.channel_bind(CHANNEL, o.peer)
                        .map_err(|e| what(e, "ChannelBind"))?;
                } else {
                    c.create_permission(o.peer)
                        .map_err(|e| what(e, "CreatePermission"))?;
                }
                socks.push(c.sock.try_clone()?);
                clients.push(c);
            }
        }
    }
    let nsock = socks.len();

    let client_rate = (o.rate as f64 / 2.0).max(1.0);
    let interval_ns = 1e9 / client_rate;
    let total = o.warmup + o.duration;
    let capacity = (client_rate * (total + 1.0)) as usize + 1024;

    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let rx_socks = socks
        .iter()
        .map(|s| s.try_clone())
        .collect::<io::Result<Vec<_>>>()?;
    let rx_handle = {
        let stop = stop.clone();
        let mode = o.mode;
        std::thread::Builder::new()
            .name("receiver".into())
            .spawn(move || receiver(mode, rx_socks, capacity, start, stop))?
    };

    // Pre-built packets: ChannelData header or plain payload; Send indications are
    // rebuilt per packet (the generator's cost, not the server's).
    let mut pkt = vec![0u8; 4 + o.payload];
    if o.mode == Mode::Channel {
        let mut hdr = [0u8; 4];
        write_channel_data_header(&mut hdr, CHANNEL, o.payload as u16);
        pkt[..4].copy_from_slice(&hdr);
    }
    let data_off = if o.mode == Mode::Channel { 4 } else { 0 };
    let mut data = vec![0xA5u8; o.payload];
    let mut ind = Vec::with_capacity(o.payload + 64);

    let self_pid = std::process::id();
    let gen_cpu0 = cpu_us(self_pid).unwrap_or(0);
    let measure_from = start + Duration::from_secs_f64(o.warmup);
    let measure_to = start + Duration::from_secs_f64(total);
    let mut base = start; // schedule origin; moved forward when we fall far behind
    let mut base_seq = 0u64;
    let mut seq = 0u64;
    let (mut s0, mut s1) = (None::<u64>, None::<u64>);
    let (mut cpu0, mut cpu1) = (None::<u64>, None::<u64>);
    let (mut mach0, mut mach1) = (None::<MachineCpu>, None::<MachineCpu>);
    let (mut t0, mut t1) = (start, start);
    let (mut send_errors, mut skipped) = (0u64, 0u64);
    let server_cpu = |pid: Option<u32>| pid.and_then(|p| cpu_us(p).ok());

    loop {
        let now = Instant::now();
        if s0.is_none() && now >= measure_from {
            s0 = Some(seq);
            cpu0 = server_cpu(o.pid);
            mach0 = MachineCpu::read().ok();
            t0 = now;
        }
        if now >= measure_to {
            s1 = Some(seq);
            cpu1 = server_cpu(o.pid);
            mach1 = MachineCpu::read().ok();
            t1 = now;
            break;
        }
        let due = base + Duration::from_nanos(((seq - base_seq) as f64 * interval_ns) as u64);
        if due > now {
            std::thread::sleep(due - now);
            continue;
        }
        if now - due > Duration::from_millis(5) {
            // Descheduled for a while: do not burst to catch up, restart the schedule.
            let missed = ((now - due).as_nanos() as f64 / interval_ns) as u64;
            skipped += missed;
            base = now;
            base_seq = seq;
        }
        if seq as usize >= capacity {
            break;
        }
        let ns = start.elapsed().as_nanos() as u64;
        let sock = &socks[(seq as usize) % nsock];
        data[..8].copy_from_slice(&seq.to_be_bytes());
        data[8..16].copy_from_slice(&ns.to_be_bytes());
        let res = match o.mode {
            Mode::Send => {
                build_send_indication(&mut ind, o.peer, &data);
                sock.send(&ind)
            }
            _ => {
                pkt[data_off..data_off + o.payload].copy_from_slice(&data);
                sock.send(&pkt[..data_off + o.payload])
            }
        };
        if res.is_err() {
            send_errors += 1;
        }
        seq += 1;
    }
    let gen_cpu1 = cpu_us(self_pid).unwrap_or(0);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let rx = rx_handle
        .join()
        .map_err(|_| io::Error::other("receiver thread panicked"))??;
    // Delete the allocations, so that a later run whose ephemeral ports happen to match
    // does not get 437 (allocation mismatch).
    drop(socks);
    for c in clients.iter_mut() {
        let _ = c.refresh(0);
    }
    let echoed = echo.map(|e| {
        let counter = e.echoed.clone();
        drop(e);
        counter.load(Ordering::Relaxed)
    });

    let (s0, s1) = (s0.unwrap_or(0), s1.unwrap_or(seq));
    let window = rx.rtt_us.get(s0 as usize..s1 as usize).unwrap_or_default();
    let sent = window.len() as u64;
    let mut rtts: Vec<u64> = window
        .iter()
        .filter(|&&r| r != u32::MAX)
        .map(|&r| u64::from(r))
        .collect();
    let recv = rtts.len() as u64;
    rtts.sort_unstable();
    let secs = (t1 - t0).as_secs_f64().max(1e-9);
    let loss = if sent > 0 {
        100.0 * (sent - recv) as f64 / sent as f64
    } else {
        100.0
    };
    let relayed = 2 * recv;
    let mut r = ResultLine::new("load");
    r.kv("label", &o.label)
        .kv("mode", format!("{:?}", o.mode).to_lowercase())
        .kv("allocs", nsock)
        .kv("offered_pps", o.rate)
        .kv(
            "achieved_offered_pps",
            format!("{:.0}", 2.0 * sent as f64 / secs),
        )
        .kv("relayed_pps", format!("{:.0}", relayed as f64 / secs))
        .kv("sent", sent)
        .kv("recv", recv)
        .kv("loss_pct", format!("{loss:.3}"))
        .kv("skipped", skipped)
        .kv(
            "echoed_total",
            echoed.map_or_else(|| "-".to_string(), |n| n.to_string()),
        )
        .kv("send_errors", send_errors)
        .kv("dup", rx.duplicates)
        .kv("malformed", rx.malformed)
        .kv("rtt_p50_us", percentile(&rtts, 50.0))
        .kv("rtt_p99_us", percentile(&rtts, 99.0))
        .kv(
            "gen_cpu_pct",
            format!(
                "{:.1}",
                (gen_cpu1.saturating_sub(gen_cpu0)) as f64 / 1e4 / (total.max(1e-9))
            ),
        );
    if let (Some(m0), Some(m1)) = (mach0, mach1) {
        // Whole-machine busy time: wall x CPUs - idle - iowait (exact counters; the
        // user/system/softirq columns are tick-sampled and miss short bursts).
        let busy_us = m1.busy_us_since(&m0, secs);
        r.kv("ncpu", m1.ncpu)
            .kv("machine_busy_us", format!("{busy_us:.0}"))
            .kv(
                "machine_busy_pct",
                format!("{:.1}", busy_us / 1e4 / secs / m1.ncpu as f64),
            );
        if relayed > 0 {
            r.kv(
                "machine_us_per_pkt",
                format!("{:.3}", busy_us / relayed as f64),
            );
        }
    }
    if let (Some(c0), Some(c1)) = (cpu0, cpu1) {
        let cpu = c1.saturating_sub(c0);
        r.kv("server_cpu_pct", format!("{:.1}", cpu as f64 / 1e4 / secs));
        if relayed > 0 {
            r.kv(
                "cpu_us_per_pkt",
                format!("{:.3}", cpu as f64 / relayed as f64),
            );
        }
    }
    r.print();
    Ok(())
}
