//! Round-trip latency probe: one allocation with a channel bound to the probe's own echo
//! peer (or plain UDP through the floor forwarder); a `--payload`-byte packet every
//! `--interval-ms`; each round trip timed with the monotonic clock in microseconds.
//! Replies that come after the next send still count (matched by sequence number);
//! packets not back within 1 s are lost.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use turnstone::proto::{parse_channel_data, write_channel_data_header};

use crate::load::Mode;
use crate::turn::{Client, User};
use crate::util::{percentile, udp_socket, Echo, ResultLine, BIG_BUFFER};

const CHANNEL: u16 = 0x4000;

pub struct Opts {
    pub mode: Mode,
    pub server: SocketAddr,
    pub peer: SocketAddr,
    pub interval_ms: u64,
    pub duration: f64,
    pub payload: usize,
    pub user: User,
    pub label: String,
}

pub fn run(o: Opts) -> io::Result<()> {
    if o.mode == Mode::Send {
        return Err(io::Error::other("rtt supports --mode channel or floor"));
    }
    let echo = Echo::start(o.peer)?;
    let sock = match o.mode {
        Mode::Floor => {
            let s = udp_socket(SocketAddr::from(([127, 0, 0, 1], 0)), BIG_BUFFER)?;
            s.connect(o.server)?;
            s
        }
        _ => {
            let mut c = Client::new(o.server, o.user.clone(), None)?;
            c.allocate()?;
            c.channel_bind(CHANNEL, echo.addr)?;
            c.sock
        }
    };
    let payload = o.payload.max(8);
    let off = if o.mode == Mode::Channel { 4 } else { 0 };
    let mut pkt = vec![0x5Au8; off + payload];
    if o.mode == Mode::Channel {
        let mut hdr = [0u8; 4];
        write_channel_data_header(&mut hdr, CHANNEL, payload as u16);
        pkt[..4].copy_from_slice(&hdr);
    }
    let count = ((o.duration * 1000.0) / o.interval_ms.max(1) as f64) as usize;
    let mut sent_at: Vec<Option<Instant>> = vec![None; count];
    let mut rtts: Vec<u64> = Vec::with_capacity(count);
    let mut buf = vec![0u8; 2048];
    let interval = Duration::from_millis(o.interval_ms.max(1));
    let start = Instant::now();
    let mut next_send = start;
    let mut seq = 0usize;
    let end_after_last = Duration::from_secs(1);
    loop {
        let now = Instant::now();
        if seq < count && now >= next_send {
            pkt[off..off + 8].copy_from_slice(&(seq as u64).to_be_bytes());
            sent_at[seq] = Some(Instant::now());
            let _ = sock.send(&pkt);
            seq += 1;
            next_send += interval;
            continue;
        }
        let wait_until = if seq < count {
            next_send
        } else {
            next_send + end_after_last
        };
        if now >= wait_until {
            break;
        }
        sock.set_read_timeout(Some(wait_until - now))?;
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                continue
            }
            Err(_) => continue,
        };
        let got = Instant::now();
        let data = match o.mode {
            Mode::Channel => buf.get(..n).and_then(parse_channel_data).map(|(_, d)| d),
            _ => buf.get(..n),
        };
        let Some(s) = data.and_then(|d| d.get(..8)) else {
            continue;
        };
        let mut b = [0u8; 8];
        b.copy_from_slice(s);
        let i = u64::from_be_bytes(b) as usize;
        if let Some(slot) = sent_at.get_mut(i) {
            if let Some(t) = slot.take() {
                if got - t < Duration::from_secs(1) {
                    rtts.push((got - t).as_micros() as u64);
                }
            }
        }
    }
    let received = rtts.len();
    rtts.sort_unstable();
    ResultLine::new("rtt")
        .kv("label", &o.label)
        .kv("sent", count)
        .kv("recv", received)
        .kv("p50_us", percentile(&rtts, 50.0))
        .kv("p90_us", percentile(&rtts, 90.0))
        .kv("p99_us", percentile(&rtts, 99.0))
        .kv("max_us", rtts.last().copied().unwrap_or(0))
        .print();
    Ok(())
}
