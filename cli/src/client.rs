//! Commands that repeat on the client's side: each round asks once (`crate::run_once`: the
//! daemon, this process, or the foreground command holding the pool) and prints, so that the
//! output streams whoever runs the command, and Ctrl-C ends the client alone.

use crate::statedir::StateDir;
use crate::Top;

/// Run `cmd` as a client-side loop if it is one; `None` if it runs once as usual.
pub fn repeat(_sd: &StateDir, _cmd: &Top, _argv: &[String]) -> Option<u8> {
    None
}
