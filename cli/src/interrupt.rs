//! Ctrl-C and SIGTERM during a long foreground command (a scrub or trim run without the daemon):
//! the signal only sets a flag, and the command stops at its next step in a resumable state
//! (a scrub pauses, a trim is suspended) instead of dying with its progress claiming it still runs.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Once;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static SIGNAL: AtomicI32 = AtomicI32::new(0);
static INSTALL: Once = Once::new();

extern "C" fn on_signal(sig: libc::c_int) {
    // Only atomic stores: async-signal-safe.
    SIGNAL.store(sig, Ordering::SeqCst);
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// From now on SIGINT and SIGTERM set the flag [`interrupted`] reads instead of ending the process.
pub fn catch() {
    INSTALL.call_once(|| {
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: `on_signal` is an `extern "C"` function that only stores to atomics, which
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

/// The exit code of a command stopped by the signal: 128 + its number (130 for Ctrl-C, 143 for
/// SIGTERM), as a shell reports a process the signal ended.
pub fn exit_code() -> u8 {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => 130,
        s => (128 + s).clamp(0, 255) as u8,
    }
}
