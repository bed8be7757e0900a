//! Ctrl-C and SIGTERM during a long foreground command (a scrub or trim run without the daemon):
//! the signal only sets a flag, and the command stops at its next step in a resumable state
//! (a scrub pauses, a trim is suspended) instead of dying with its progress claiming it still runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static INSTALL: Once = Once::new();

extern "C" fn on_signal(_sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// From now on SIGINT and SIGTERM set the flag [`interrupted`] reads instead of ending the process.
pub fn catch() {
    INSTALL.call_once(|| {
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: `on_signal` is an `extern "C"` function that only stores to an atomic, which
            // is async-signal-safe; installing it replaces the default disposition for `sig`.
            unsafe {
                libc::signal(sig, on_signal as *const () as libc::sighandler_t);
            }
        }
    });
}

/// Has SIGINT or SIGTERM arrived since [`catch`]?
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}
