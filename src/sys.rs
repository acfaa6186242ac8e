//! The one module of turnstone with `unsafe` code: operating-system calls that neither
//! std nor nix wraps. Everything else in the crate is `deny(unsafe_code)`.

/// Asks glibc's allocator to give the free pages of every malloc arena back to the kernel
/// (`malloc_trim(0)`). glibc returns freed memory on its own only from the top of each
/// arena, so after a wave of allocations ends, pages freed below a small live object stay
/// resident. The caller runs it off the relay path, after a wave (it briefly locks each
/// arena in turn). Returns whether anything was released; elsewhere than glibc, nothing
/// to do.
pub fn release_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes no pointer and has no precondition; glibc serialises
        // it with every other allocator call.
        #[allow(unsafe_code)]
        let released = unsafe { nix::libc::malloc_trim(0) } == 1;
        released
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Fixes glibc's trim threshold at its documented default (128 KiB) instead of letting
/// it grow: glibc raises the threshold each time a large block is freed (up to 64 MiB),
/// and a worker's arena then keeps that much free memory at its top for good, which
/// [`release_free_memory`] cannot return (it trims the top of the main arena only).
/// Called once at start, before the workers exist.
pub fn configure_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt takes two integers and has no precondition.
        #[allow(unsafe_code)]
        let _ = unsafe { nix::libc::mallopt(nix::libc::M_TRIM_THRESHOLD, 128 * 1024) };
    }
}

/// Decides when a wave of allocations has ended and memory should be given back: after
/// at least [`MemoryTrim::MIN_WAVE`] allocations ended since the last high-water mark and
/// at most half of that mark is left, on the second check in a row; and once more
/// [`MemoryTrim::FOLLOW_UP`] checks later, for what the workers freed when they compacted
/// their tables at their next tick.
#[derive(Debug, Default)]
pub struct MemoryTrim {
    high: usize,
    pending: bool,
    follow_up: Option<u32>,
}

impl MemoryTrim {
    pub const MIN_WAVE: usize = 1000;
    pub const FOLLOW_UP: u32 = 3;

    /// Called about twice a second with the number of live allocations; true when
    /// [`release_free_memory`] should run now.
    pub fn check(&mut self, live: usize) -> bool {
        if let Some(n) = self.follow_up.take() {
            if n <= 1 {
                return true;
            }
            self.follow_up = Some(n - 1);
        }
        self.high = self.high.max(live);
        let ended = self.high - live;
        if ended >= Self::MIN_WAVE && live <= self.high / 2 {
            if self.pending {
                self.pending = false;
                self.high = live;
                self.follow_up = Some(Self::FOLLOW_UP);
                return true;
            }
            self.pending = true;
        } else {
            self.pending = false;
        }
        false
    }
}

/// Takes ownership of a file descriptor this process was given by number: one received
/// in an `SCM_RIGHTS` message (the kernel installed it in our table for us, nobody else
/// owns it), or the hand-over socket an upgrading parent left open across `exec` and
/// named in `TURNSTONE_UPGRADE_FD`. Returns `None` for a number that is not an open
/// descriptor of this process (checked with `F_GETFD` first), so a wrong number from
/// the environment cannot make two owners of one descriptor that is open elsewhere in
/// the process: the caller takes it only once, at start, before opening anything else.
pub fn adopt_fd(raw: std::os::fd::RawFd) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    if raw < 0 {
        return None;
    }
    // SAFETY: F_GETFD reads the descriptor's flags and has no precondition.
    #[allow(unsafe_code)]
    let open = unsafe { nix::libc::fcntl(raw, nix::libc::F_GETFD) } != -1;
    if !open {
        return None;
    }
    // SAFETY: `raw` is open (just checked) and, per this function's contract, owned by
    // nothing else in the process: the kernel just gave it to us, or it was inherited
    // and is taken once.
    #[allow(unsafe_code)]
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
    Some(fd)
}

#[cfg(test)]
mod tests {
    use super::MemoryTrim;

    #[test]
    fn trims_after_a_wave_ends_and_once_more_later() {
        let mut t = MemoryTrim::default();
        assert!(!t.check(0));
        assert!(!t.check(5000));
        assert!(!t.check(4000), "a fifth ended: not a wave's end");
        assert!(!t.check(100), "first check after the wave");
        assert!(t.check(50), "second check: trim");
        assert!(!t.check(50));
        assert!(!t.check(50));
        assert!(t.check(50), "the follow-up trim");
        assert!(!t.check(50), "nothing new ended");
        assert!(!t.check(0));
        // A small churn never trims.
        for live in [10, 500, 20, 900, 0, 999, 0, 0, 0] {
            assert!(!t.check(live));
        }
        // The next wave trims again.
        assert!(!t.check(3000));
        assert!(!t.check(0));
        assert!(t.check(0));
        // The release itself is safe to call at any time.
        let _ = super::release_free_memory();
    }
}
