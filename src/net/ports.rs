//! The relay port range, shared by all workers: which ports of each relay address are
//! free, handed out in random order (RFC 8656 section 7.2 asks for unpredictable ports).

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Mutex;

use rand::seq::SliceRandom;

struct Pool {
    ip: IpAddr,
    low: u16,
    /// Free ports, shuffled; `used[p - low]` says whether `p` is taken.
    free: VecDeque<u16>,
    used: Vec<bool>,
}

pub struct PortPool {
    pools: Vec<Mutex<Pool>>,
}

impl PortPool {
    pub fn new(ips: &[IpAddr], low: u16, high: u16) -> PortPool {
        let pools = ips
            .iter()
            .map(|&ip| {
                let mut ports: Vec<u16> = (low..=high).collect();
                ports.shuffle(&mut rand::rng());
                Mutex::new(Pool {
                    ip,
                    low,
                    used: vec![false; ports.len()],
                    free: ports.into(),
                })
            })
            .collect();
        PortPool { pools }
    }

    fn pool(&self, ip: IpAddr) -> Option<std::sync::MutexGuard<'_, Pool>> {
        self.pools
            .iter()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
            .find(|p| p.ip == ip)
    }

    /// Takes a free port (an even one if asked; with `pair`, port and port+1).
    pub fn take(&self, ip: IpAddr, even: bool, pair: bool) -> Option<u16> {
        let mut p = self.pool(ip)?;
        let low = p.low;
        if !even && !pair {
            while let Some(port) = p.free.pop_back() {
                let i = usize::from(port - low);
                if !p.used[i] {
                    p.used[i] = true;
                    return Some(port);
                }
            }
            return None;
        }
        let pos = p.free.iter().rposition(|&port| {
            let i = usize::from(port - low);
            let next_free = p.used.get(i + 1).is_some_and(|u| !u);
            port % 2 == 0 && !p.used[i] && (!pair || next_free)
        })?;
        let port = p.free.swap_remove_back(pos)?;
        let i = usize::from(port - low);
        p.used[i] = true;
        if pair {
            p.used[i + 1] = true;
            if let Some(k) = p.free.iter().position(|&q| q == port + 1) {
                p.free.swap_remove_back(k);
            }
        }
        Some(port)
    }

    /// Marks a port as taken by a socket that already exists (taken over in an upgrade).
    pub fn mark_taken(&self, ip: IpAddr, port: u16) {
        if let Some(mut p) = self.pool(ip) {
            let low = p.low;
            if let Some(u) = port
                .checked_sub(low)
                .and_then(|i| p.used.get_mut(usize::from(i)))
            {
                *u = true;
            }
        }
    }

    /// Returns a port to the pool.
    pub fn give_back(&self, ip: IpAddr, port: u16) {
        if let Some(mut p) = self.pool(ip) {
            let low = p.low;
            if let Some(i) = port.checked_sub(low).map(usize::from) {
                if p.used.get(i) == Some(&true) {
                    p.used[i] = false;
                    // Reused last: put it at the front so recently freed ports rest.
                    p.free.push_front(port);
                }
            }
        }
    }
}
