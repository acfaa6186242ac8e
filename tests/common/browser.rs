//! The browser tests' headless-Chromium runner: opens a page, collects what it POSTs, cleans up.

mod devtools;
pub mod http;

pub use http::PageServer;

use super::{require_tool, ChildGuard};
use http::Posted;
use std::process::Command;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

/// Flags of every run: headless without a sandbox (CI containers run as root), nothing
/// fetched or updated in the background, no QUIC, a DevTools port of Chromium's choice
/// (written to `<profile>/DevToolsActivePort`, for screenshots).
const FLAGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--remote-debugging-port=0",
];

/// Chromium flags of a call: fake camera and microphone, no permission prompt, and
/// timers and rendering kept going in a page nobody looks at.
pub const CALL_FLAGS: &[&str] = &[
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
];

/// At most this much of a result goes into an assertion message.
const CONTEXT_MAX: usize = 8000;

/// What a page reported, with its log.
pub struct PageResult {
    /// The result, parsed.
    pub v: serde_json::Value,
    /// The result as POSTed.
    pub raw: String,
    /// The lines the page POSTed to /log, in order.
    pub log: String,
    /// From starting Chromium to the result.
    pub elapsed: Duration,
}

impl PageResult {
    /// The result (its first 8000 bytes) and the page log, for assertion messages.
    pub fn context(&self) -> String {
        let mut raw = self.raw.clone();
        if raw.len() > CONTEXT_MAX {
            let mut cut = CONTEXT_MAX;
            while !raw.is_char_boundary(cut) {
                cut -= 1;
            }
            raw.truncate(cut);
            raw.push_str("...");
        }
        format!("result: {raw}\npage log:\n{}", self.log)
    }
}

/// Headless Chromium on one page, with the page server the page reports to: a page of
/// `tests/browser/` (whose `common.js` POSTs the log and the result), or a page served
/// elsewhere that is given the server's `/result` URL (turnstone's self-test page).
/// Dropping it kills Chromium (its whole process group, printing its output if the test
/// panics), then stops the server, then removes the profile (the fields' order).
pub struct Chromium {
    process: ChildGuard,
    pages: PageServer,
    profile: tempfile::TempDir,
    started: Instant,
    /// The page's log lines taken by [`Self::wait_log`], not yet in a result.
    log: Vec<String>,
}

impl Chromium {
    /// Starts Chromium on `url` with [`FLAGS`], `extra_args` and a fresh profile; the page
    /// reports to `pages`. Panics with the install hint if there is no `chromium`.
    pub fn launch(pages: PageServer, url: &str, extra_args: &[&str]) -> Chromium {
        Chromium::launch_in(None, pages, url, extra_args)
    }

    /// [`Chromium::launch`] with Chromium's networking inside the network namespace
    /// `netns` (its full name; `ip netns exec`), if given: the page server must listen
    /// there too (start it on a thread in the namespace).
    pub fn launch_in(
        netns: Option<&str>,
        pages: PageServer,
        url: &str,
        extra_args: &[&str],
    ) -> Chromium {
        let chromium = require_tool("chromium", "apt-get install -y chromium");
        let profile = tempfile::Builder::new()
            .prefix("turnstone-chromium-")
            .tempdir()
            .expect("profile dir");
        let mut cmd = match netns {
            // `ip netns exec` execs Chromium: the guard's process group is Chromium's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(chromium);
                c
            }
            None => Command::new(chromium),
        };
        cmd.args(FLAGS)
            .args(extra_args)
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url);
        let started = Instant::now();
        Chromium {
            process: ChildGuard::spawn("chromium", &mut cmd),
            pages,
            profile,
            started,
            log: Vec::new(),
        }
    }

    /// Waits until the page logs a line containing `needle` (within `timeout` from
    /// now) and returns it; panics (with the log) if none comes, the page reports its
    /// result first, or Chromium exits. The lines stay in the log of the result.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                failed(
                    &format!("the page logged no {needle:?} within {timeout:?}"),
                    &self.log,
                );
            }
            match self.pages.recv(left.min(Duration::from_millis(200))) {
                Ok(Posted::Log(l)) => {
                    let found = l.contains(needle);
                    self.log.push(l);
                    if found {
                        return self.log[self.log.len() - 1].clone();
                    }
                }
                Ok(Posted::Result(r)) => failed(
                    &format!("the page reported before logging {needle:?}: {r}"),
                    &self.log,
                ),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => failed("the page server ended", &self.log),
            }
            if let Some(st) = self.process.try_wait() {
                failed(&format!("chromium exited early ({st})"), &self.log);
            }
        }
    }

    /// Waits for the page's result until `timeout` after the start, collecting its log on
    /// the way; panics (with the log) if none comes, Chromium exits first, or the result
    /// is not JSON. Chromium keeps running (e.g. for [`Self::screenshot`]).
    pub fn wait_result(&mut self, timeout: Duration) -> PageResult {
        let deadline = self.started + timeout;
        let mut log = std::mem::take(&mut self.log);
        let raw = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                failed(&format!("no result from the page within {timeout:?}"), &log);
            }
            match self.pages.recv(left.min(Duration::from_millis(200))) {
                Ok(Posted::Result(r)) => break r,
                Ok(Posted::Log(l)) => log.push(l),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => failed("the page server ended", &log),
            }
            if let Some(st) = self.process.try_wait() {
                failed(&format!("chromium exited early ({st})"), &log);
            }
        };
        let elapsed = self.started.elapsed();
        // Lines the page logged after reporting, if they are in already.
        while let Some(Posted::Log(l)) = self.pages.try_recv() {
            log.push(l);
        }
        let log = log.join("\n");
        let v = serde_json::from_str(&raw)
            .unwrap_or_else(|e| panic!("bad result JSON ({e}): {raw}\npage log:\n{log}"));
        PageResult {
            v,
            raw,
            log,
            elapsed,
        }
    }

    /// The viewport of the open page whose URL contains `url_part`, as PNG.
    pub fn screenshot(&self, url_part: &str) -> Vec<u8> {
        devtools::screenshot(self.profile.path(), url_part)
    }
}

/// Panics with `why` and the page log (Chromium's output follows from its guard).
fn failed(why: &str, log: &[String]) -> ! {
    panic!("{why}\npage log:\n{}", log.join("\n"))
}

/// Opens `page` (a file of `tests/browser/` with its query, e.g.
/// `/index.html?turn=...`) in headless Chromium with `extra_args`, and returns what it
/// reports within `timeout`. Chromium and the page server are gone when it returns.
pub fn run_page(page: &str, extra_args: &[&str], timeout: Duration) -> PageResult {
    let pages = PageServer::start();
    let url = pages.url(page);
    Chromium::launch(pages, &url, extra_args).wait_result(timeout)
}

/// `s` as a URL query value (everything but RFC 3986 unreserved characters escaped).
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
