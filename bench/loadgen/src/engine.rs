//! A non-blocking allocation engine: keeps up to `inflight` jobs going at once, each on
//! its own UDP socket bound to a chosen source port (coturn answers 437 to an Allocate
//! from a 5-tuple whose allocation ended less than ~1 s ago, so callers rotate ports).
//! A job is a fixed list of steps (Allocate, Refresh 0); every Allocate starts
//! unauthenticated and answers the 401 (the "complete allocation" the benchmark counts);
//! 438 (stale nonce) is answered too. Requests are retransmitted after 500 ms, twice;
//! then the job fails as a timeout.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};

use crate::turn::{build_allocate, build_refresh, new_tid, parse_reply, Auth, Reply, User};
use crate::util::udp_socket;
use turnstone::proto::TransactionId;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Allocate,
    Refresh0,
}

pub struct Job {
    pub port: u16,
    pub auth: Option<Auth>,
}

pub struct Outcome {
    pub port: u16,
    pub auth: Option<Auth>,
    /// Ok, or the failing error code (0: timeout).
    pub result: Result<(), u16>,
}

#[derive(Default, Debug)]
pub struct Stats {
    pub completed: u64,
    pub timeouts: u64,
    pub bind_failures: u64,
    pub errors: BTreeMap<u16, u64>,
    pub abandoned: u64,
}

impl Stats {
    pub fn errors_text(&self) -> String {
        if self.errors.is_empty() {
            return "none".into();
        }
        self.errors
            .iter()
            .map(|(c, n)| format!("{c}:{n}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

struct Slot {
    sock: mio::net::UdpSocket,
    port: u16,
    step: usize,
    tid: TransactionId,
    auth: Option<Auth>,
    sent_at: Instant,
    sends: u32,
    challenges: u32,
}

pub struct Engine {
    pub server: SocketAddr,
    pub user: User,
    pub steps: Vec<Step>,
    pub inflight: usize,
}

const RETRANSMIT: Duration = Duration::from_millis(500);
const MAX_SENDS: u32 = 3;

impl Engine {
    fn send(&self, slot: &mut Slot, buf: &mut Vec<u8>) {
        let step = self.steps.get(slot.step).copied().unwrap_or(Step::Refresh0);
        match step {
            Step::Allocate => build_allocate(buf, slot.tid, &self.user, slot.auth.as_ref()),
            Step::Refresh0 => build_refresh(buf, slot.tid, &self.user, slot.auth.as_ref(), 0),
        }
        let _ = slot.sock.send(buf);
        slot.sent_at = Instant::now();
        slot.sends += 1;
    }

    fn open(&self, job: Job, token: usize, poll: &Poll) -> io::Result<Slot> {
        let std_sock = udp_socket(SocketAddr::from(([127, 0, 0, 1], job.port)), 64 << 10)?;
        std_sock.connect(self.server)?;
        std_sock.set_nonblocking(true)?;
        let mut sock = mio::net::UdpSocket::from_std(std_sock);
        poll.registry()
            .register(&mut sock, Token(token), Interest::READABLE)?;
        Ok(Slot {
            sock,
            port: job.port,
            step: 0,
            tid: new_tid(),
            auth: job.auth,
            sent_at: Instant::now(),
            sends: 0,
            challenges: 0,
        })
    }

    /// Runs jobs from `next_job` until it returns `None` (then waits for the jobs in
    /// flight) or `deadline` passes (then abandons them).
    pub fn run(
        &self,
        mut next_job: impl FnMut() -> Option<Job>,
        mut on_done: impl FnMut(Outcome),
        deadline: Option<Instant>,
    ) -> io::Result<Stats> {
        let mut poll = Poll::new()?;
        let mut events = Events::with_capacity(1024);
        let mut slots: Vec<Option<Slot>> = (0..self.inflight.max(1)).map(|_| None).collect();
        let mut stats = Stats::default();
        let mut buf = Vec::with_capacity(512);
        let mut rbuf = vec![0u8; 2048];
        let mut jobs_left = true;

        loop {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                stats.abandoned = slots.iter().filter(|s| s.is_some()).count() as u64;
                break;
            }
            // Fill empty slots.
            for (i, slot) in slots.iter_mut().enumerate() {
                while slot.is_none() && jobs_left {
                    let Some(job) = next_job() else {
                        jobs_left = false;
                        break;
                    };
                    let port = job.port;
                    match self.open(job, i, &poll) {
                        Ok(mut s) => {
                            self.send(&mut s, &mut buf);
                            *slot = Some(s);
                        }
                        Err(_) => {
                            stats.bind_failures += 1;
                            on_done(Outcome {
                                port,
                                auth: None,
                                result: Err(1),
                            });
                        }
                    }
                }
            }
            if !jobs_left && slots.iter().all(|s| s.is_none()) {
                break;
            }
            match poll.poll(&mut events, Some(Duration::from_millis(20))) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for ev in events.iter() {
                let i = ev.token().0;
                let Some(entry) = slots.get_mut(i) else {
                    continue;
                };
                let mut finished: Option<Result<(), u16>> = None;
                if let Some(slot) = entry.as_mut() {
                    loop {
                        let n = match slot.sock.recv(&mut rbuf) {
                            Ok(n) => n,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(_) => break,
                        };
                        let Some(reply) = rbuf.get(..n).and_then(|b| parse_reply(b, slot.tid))
                        else {
                            continue;
                        };
                        match reply {
                            Reply::Success { .. } => {
                                slot.step += 1;
                                if slot.step >= self.steps.len() {
                                    finished = Some(Ok(()));
                                    break;
                                }
                                slot.tid = new_tid();
                                slot.sends = 0;
                                self.send(slot, &mut buf);
                            }
                            Reply::Challenge { code, realm, nonce } => {
                                slot.challenges += 1;
                                if slot.challenges > 3 {
                                    finished = Some(Err(code));
                                    break;
                                }
                                slot.auth =
                                    Some(self.user.auth_for(&realm, &nonce, slot.auth.as_ref()));
                                slot.tid = new_tid();
                                slot.sends = 0;
                                self.send(slot, &mut buf);
                            }
                            Reply::Error(code) => {
                                finished = Some(Err(code));
                                break;
                            }
                        }
                    }
                }
                if let Some(result) = finished {
                    if let Some(slot) = entry.take() {
                        match result {
                            Ok(()) => stats.completed += 1,
                            Err(code) => *stats.errors.entry(code).or_insert(0) += 1,
                        }
                        on_done(Outcome {
                            port: slot.port,
                            auth: slot.auth,
                            result,
                        });
                    }
                }
            }
            // Retransmissions and timeouts.
            let now = Instant::now();
            for entry in slots.iter_mut() {
                let expired = match entry.as_mut() {
                    Some(slot) if now - slot.sent_at >= RETRANSMIT => {
                        if slot.sends >= MAX_SENDS {
                            true
                        } else {
                            self.send(slot, &mut buf);
                            false
                        }
                    }
                    _ => false,
                };
                if expired {
                    if let Some(slot) = entry.take() {
                        stats.timeouts += 1;
                        on_done(Outcome {
                            port: slot.port,
                            auth: slot.auth,
                            result: Err(0),
                        });
                    }
                }
            }
        }
        Ok(stats)
    }
}
