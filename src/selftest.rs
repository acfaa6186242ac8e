//! The self-test web page (`GET /selftest` on the metrics HTTP listener, when
//! `[metrics] selftest = true`): one static HTML page, embedded in the binary, that an
//! operator opens in a browser to check the TURN server the way WebRTC uses it. Like the
//! WebRTC samples "Trickle ICE" page it takes an `iceServers` entry (pre-filled from the
//! query: `?urls=...&username=...&credential=...`), gathers candidates and lists each
//! with its type, protocol, address, relayProtocol and timing; then it runs a relay-only
//! loopback call (two `RTCPeerConnection`s in the page, a data channel ping-pong) and
//! shows the round-trip time and a verdict (OK, or FAIL with the reason, including the
//! `icecandidateerror` codes). `&auto=1` runs it on load; `&report=URL` POSTs the result
//! JSON there.
//!
//! The page contains no secret and does nothing server-side: everything runs in the
//! browser. The switch is read once at start ([`set_enabled`], from `main`).

use std::sync::atomic::{AtomicBool, Ordering};

/// The page (`src/selftest.html`).
pub const PAGE: &str = include_str!("selftest.html");
/// Its content type.
pub const CONTENT_TYPE: &str = "text/html; charset=utf-8";
/// The path it is served at.
pub const PATH: &str = "/selftest";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns serving the page on or off (`[metrics] selftest`).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether the metrics listener serves [`PAGE`] at [`PATH`] (404 otherwise).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    #[test]
    fn page_is_self_contained() {
        let p = super::PAGE;
        assert!(p.starts_with("<!doctype html>"));
        assert!(p.contains("iceTransportPolicy: 'relay'"));
        assert!(p.contains("onicecandidateerror"));
        // Nothing loaded from elsewhere, and query values never go through innerHTML.
        assert!(!p.contains("src=\"http"));
        assert!(!p.contains("innerHTML"));
    }
}
