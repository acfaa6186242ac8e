//! A call that must survive whatever happens to the server meanwhile (upgrades,
//! restarts, crashes): one UDP client with a channel to peer `a` and Send/Data
//! indications with peer `b`, numbered packets both ways at 500/s each way, every
//! stream checked for order, loss, source and its longest silence; requests on the
//! call's own 5-tuple while it runs.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use turnstone::proto::{self, attr, method, Class, Message, MessageWriter};

use super::traffic::{seq_of, seq_payload, udp_socket};
use super::turn::{channel_data, send_indication, Answer, TurnClient};

pub const CHANNEL: u16 = 0x4000;
const NAMES: [&str; 4] = [
    "client->a (ChannelData)",
    "client->b (Send)",
    "a->client (ChannelData)",
    "b->client (Data)",
];

/// One numbered stream's receiving end.
#[derive(Default)]
struct Stream {
    next: u32,
    errors: Vec<String>,
    last: Option<Instant>,
    longest_gap: Duration,
    /// The longest over the whole call (`longest_gap` is reset by `take_longest_gap`).
    longest_ever: Duration,
    /// Packets that may still go missing ([`Call::allow_loss`]), and those that did.
    loss_budget: u32,
    lost: u32,
}

impl Stream {
    fn got(&mut self, name: &str, seq: u32) {
        let now = Instant::now();
        if let Some(last) = self.last {
            self.longest_gap = self.longest_gap.max(now - last);
            self.longest_ever = self.longest_ever.max(now - last);
        }
        self.last = Some(now);
        let missing = seq.saturating_sub(self.next);
        if seq > self.next && missing <= self.loss_budget {
            self.loss_budget -= missing;
            self.lost += missing;
        } else if seq != self.next && self.errors.len() < 10 {
            self.errors
                .push(format!("{name}: expected {} got {seq}", self.next));
        }
        self.next = self.next.max(seq + 1);
    }

    fn error(&mut self, e: String) {
        if self.errors.len() < 10 {
            self.errors.push(e);
        }
    }
}

/// A running call (see the module's comment).
pub struct Call {
    pub client: TurnClient,
    pub relayed: SocketAddr,
    pub peer_a: SocketAddr,
    pub peer_b: SocketAddr,
    server: SocketAddr,
    sock: UdpSocket,
    answers: mpsc::Receiver<Vec<u8>>,
    streams: Vec<Arc<Mutex<Stream>>>,
    sent: Arc<Mutex<[u32; 4]>>,
    stop: Arc<AtomicBool>,
    stop_sending: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// What a finished call saw, by stream.
pub struct CallReport {
    pub sent: [u32; 4],
    pub received: [u32; 4],
    pub longest_gap: [Duration; 4],
    pub errors: Vec<String>,
}

impl CallReport {
    /// Every packet arrived, in order, from the right address.
    pub fn assert_whole(&self, context: &str) {
        assert!(
            self.errors.is_empty(),
            "{:?}\n{self}\n{context}",
            self.errors
        );
        assert_eq!(
            self.sent, self.received,
            "every packet arrived\n{self}\n{context}"
        );
    }

    pub fn longest(&self) -> Duration {
        self.longest_gap.iter().copied().max().unwrap_or_default()
    }
}

impl std::fmt::Display for CallReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (k, name) in NAMES.iter().enumerate() {
            writeln!(
                f,
                "{name}: sent {}, received {}, longest gap {:?}",
                self.sent[k], self.received[k], self.longest_gap[k]
            )?;
        }
        Ok(())
    }
}

fn peer_receiver(
    k: usize,
    sock: UdpSocket,
    from: SocketAddr,
    stream: Arc<Mutex<Stream>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            let Ok((n, src)) = sock.recv_from(&mut buf) else {
                continue;
            };
            let mut s = stream.lock().unwrap();
            if src != from {
                s.error(format!("{}: from {src}, not the relay {from}", NAMES[k]));
            } else if let Some(seq) = seq_of(&buf[..n]) {
                s.got(NAMES[k], seq);
            }
        }
    })
}

impl Call {
    /// Allocates on `server` (as `user`), permits `b`, binds [`CHANNEL`] to `a`, and
    /// starts the traffic.
    pub fn start(server: SocketAddr, user: &str, password: &str) -> Call {
        let mut client = TurnClient::udp(server, user, password);
        let relayed = client.must_allocate();
        let peer_a = udp_socket(Duration::from_millis(100));
        let peer_b = udp_socket(Duration::from_millis(100));
        let (a, b) = (peer_a.local_addr().unwrap(), peer_b.local_addr().unwrap());
        client.permit(b);
        client.bind(CHANNEL, a);
        let sock = client.udp_socket().try_clone().unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let streams: Vec<Arc<Mutex<Stream>>> = (0..4)
            .map(|_| Arc::new(Mutex::new(Stream::default())))
            .collect();
        let mut threads = vec![
            peer_receiver(
                0,
                peer_a.try_clone().unwrap(),
                relayed,
                streams[0].clone(),
                stop.clone(),
            ),
            peer_receiver(
                1,
                peer_b.try_clone().unwrap(),
                relayed,
                streams[1].clone(),
                stop.clone(),
            ),
        ];
        // The client's receiver: ChannelData from a, Data indications from b, and the
        // answers to requests made meanwhile.
        let (answers_tx, answers) = mpsc::channel::<Vec<u8>>();
        {
            let (sock, stop) = (sock.try_clone().unwrap(), stop.clone());
            let (to_a, to_b) = (streams[2].clone(), streams[3].clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(n) = sock.recv(&mut buf) else {
                        continue;
                    };
                    let f = &buf[..n];
                    if proto::is_channel_data(f[0]) {
                        let Some((ch, data)) = proto::parse_channel_data(f) else {
                            continue;
                        };
                        let mut s = to_a.lock().unwrap();
                        if ch != CHANNEL {
                            s.error(format!("ChannelData on {ch:#x}"));
                        } else if let Some(seq) = seq_of(data) {
                            s.got(NAMES[2], seq);
                        }
                    } else if let Ok(m) = Message::parse(f) {
                        if m.class() == Class::Indication && m.method() == method::DATA {
                            let mut s = to_b.lock().unwrap();
                            let from = m.xor_address(attr::XOR_PEER_ADDRESS).ok().flatten();
                            if from != Some(b) {
                                s.error(format!("Data indication from {from:?}"));
                            } else if let Some(seq) = m.data().and_then(seq_of) {
                                s.got(NAMES[3], seq);
                            }
                        } else {
                            let _ = answers_tx.send(f.to_vec());
                        }
                    }
                }
            }));
        }
        // Every 2 ms one packet to a peer (ChannelData and Send in turn) and one from a
        // peer (a and b in turn).
        let sent = Arc::new(Mutex::new([0u32; 4]));
        let stop_sending = Arc::new(AtomicBool::new(false));
        {
            let (sock, stop, sent) = (
                sock.try_clone().unwrap(),
                stop_sending.clone(),
                sent.clone(),
            );
            let (peer_a, peer_b) = (peer_a.try_clone().unwrap(), peer_b.try_clone().unwrap());
            threads.push(std::thread::spawn(move || {
                let start = Instant::now();
                let mut tick = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut n = sent.lock().unwrap();
                    let k = (tick % 2) as usize;
                    let payload = seq_payload(n[k], 160);
                    if k == 0 {
                        sock.send_to(&channel_data(CHANNEL, &payload), server)
                            .unwrap();
                        peer_a.send_to(&payload, relayed).unwrap();
                    } else {
                        sock.send_to(&send_indication(b, &payload), server).unwrap();
                        peer_b.send_to(&payload, relayed).unwrap();
                    }
                    n[k] += 1;
                    n[k + 2] += 1;
                    drop(n);
                    tick += 1;
                    let due = start + Duration::from_millis(2 * tick);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
            }));
        }
        Call {
            client,
            relayed,
            peer_a: a,
            peer_b: b,
            server,
            sock,
            answers,
            streams,
            sent,
            stop,
            stop_sending,
            threads,
        }
    }

    /// A request on the call's 5-tuple (signed with its credentials and nonce), sent
    /// up to 5 times; `None` without an answer.
    pub fn ask(&self, m: u16, attrs: &dyn Fn(&mut MessageWriter<'_>)) -> Option<Answer> {
        let req = self
            .client
            .build(m, self.client.nonce.as_deref(), attrs, &|w| {
                w.fingerprint();
            });
        let tid = Message::parse(&req).ok()?.transaction_id();
        for _ in 0..5 {
            self.sock.send_to(&req, self.server).ok()?;
            let until = Instant::now() + Duration::from_millis(500);
            while let Ok(a) = self
                .answers
                .recv_timeout(until.saturating_duration_since(Instant::now()))
            {
                if Message::parse(&a).is_ok_and(|m| m.transaction_id() == tid) {
                    return Some(Answer { raw: a });
                }
            }
        }
        None
    }

    /// After whatever happened to the server: a Refresh and a ChannelBind of `number`
    /// to `peer` succeed, and an Allocate on the same 5-tuple is 437 (the allocation is
    /// the same one). Returns what went wrong.
    pub fn check_alive(&self, lifetime: u32, number: u16, peer: SocketAddr) -> Result<(), String> {
        let describe = |a: Option<Answer>| a.map_or("no answer".to_owned(), |a| a.describe());
        let r = self.ask(method::REFRESH, &|w| {
            w.u32_attr(attr::LIFETIME, lifetime);
        });
        if !r.as_ref().is_some_and(Answer::is_success) {
            return Err(format!("Refresh: {}", describe(r)));
        }
        let r = self.ask(method::CHANNEL_BIND, &|w| {
            let [x, y] = number.to_be_bytes();
            w.attr(attr::CHANNEL_NUMBER, &[x, y, 0, 0]);
            w.xor_address(attr::XOR_PEER_ADDRESS, peer);
        });
        if !r.as_ref().is_some_and(Answer::is_success) {
            return Err(format!("ChannelBind {number:#x}: {}", describe(r)));
        }
        let r = self.ask(method::ALLOCATE, &super::turn::udp_transport);
        if r.as_ref().and_then(Answer::code) != Some(437) {
            return Err(format!("Allocate again (want 437): {}", describe(r)));
        }
        Ok(())
    }

    /// The longest silence on any of the four directions since the last call (or the
    /// start), and starts measuring afresh.
    pub fn take_longest_gap(&self) -> Duration {
        let mut longest = Duration::ZERO;
        for s in &self.streams {
            let mut s = s.lock().unwrap();
            longest = longest.max(s.longest_gap);
            s.longest_gap = Duration::ZERO;
        }
        longest
    }

    /// From now on up to `n` packets of each direction may go missing (a process killed
    /// with packets it had read and not yet sent); 0 to require every packet again.
    /// Order is still required. Returns how many went missing so far, by direction.
    pub fn allow_loss(&self, n: u32) -> [u32; 4] {
        let mut lost = [0; 4];
        for (k, s) in self.streams.iter().enumerate() {
            let mut s = s.lock().unwrap();
            s.loss_budget = n;
            lost[k] = s.lost;
        }
        lost
    }

    /// Stops sending, gives the last packets `settle` to arrive, and reports.
    pub fn finish(self, settle: Duration) -> CallReport {
        self.stop_sending.store(true, Ordering::Relaxed);
        std::thread::sleep(settle);
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let sent = *self.sent.lock().unwrap();
        let mut report = CallReport {
            sent,
            received: [0; 4],
            longest_gap: [Duration::ZERO; 4],
            errors: Vec::new(),
        };
        for (k, s) in self.streams.iter().enumerate() {
            let s = s.lock().unwrap();
            report.received[k] = s.next;
            report.longest_gap[k] = s.longest_ever;
            report.errors.extend(s.errors.iter().cloned());
        }
        report
    }
}
