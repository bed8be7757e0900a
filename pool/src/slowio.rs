//! The slow-I/O deadline (pool property `slow_io_deadline`) and what it means for `clear` and
//! `online`.
//!
//! The tree (`cairn_vdev::dispatch`) faults a mirror child "too slow" when one of its writes or
//! flushes has not finished within the deadline while a sibling holding every txg took it. Such a
//! child may still have writes in flight (a device cannot take a write back): before `clear` or
//! `online` brings it back, [`drain`] waits until they are done, so that none of them lands on top
//! of what the resilver writes.

use crate::error::{PoolError, Result};
use crate::pool::Inner;
use cairn_vdev::dispatch::DEFAULT_SLOW_MS;
use cairn_vdev::tree::LeafVdev;
use std::time::{Duration, Instant};

/// The property's name.
pub const PROP: &str = "slow_io_deadline";

/// The longest deadline accepted (one hour).
const MAX_MS: u64 = 3_600_000;

/// How long `clear`/`online` wait for a leaf's writes in flight before refusing.
const DRAIN_WAIT: Duration = Duration::from_secs(10);

/// `off` (or `0`), or a duration: `N` or `Ns` seconds, `Nms` milliseconds, `Nm` minutes. Returns
/// milliseconds (0 = off).
pub fn parse(v: &str) -> Result<u64> {
    let bad = || {
        PoolError::Invalid(format!(
            "invalid {PROP} '{v}': expected off or a duration such as 10s, 500ms or 2m (at most \
             1 hour)"
        ))
    };
    if v == "off" {
        return Ok(0);
    }
    let (num, mult) = if let Some(n) = v.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = v.strip_suffix('m') {
        (n, 60_000)
    } else {
        (v, 1000)
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    let ms = n.checked_mul(mult).ok_or_else(bad)?;
    if ms > MAX_MS {
        return Err(bad());
    }
    Ok(ms)
}

/// The default, as the property shows it.
pub fn default_str() -> String {
    format!("{}s", DEFAULT_SLOW_MS / 1000)
}

impl Inner {
    /// Give every top-level vdev the deadline the pool's properties say (at open, after a change of
    /// the property and after `add`). A stored value that does not parse counts as the default.
    pub(crate) fn apply_slow_io(&mut self) -> Result<()> {
        let props = self.user_props()?;
        let ms = props
            .get(PROP)
            .and_then(|v| parse(v).ok())
            .unwrap_or(DEFAULT_SLOW_MS);
        self.tree.set_slow_ms(ms);
        Ok(())
    }
}

/// Wait until no I/O of `lv` is in flight (a write left behind as too slow), for at most
/// [`DRAIN_WAIT`]; refuse if some still is.
pub(crate) fn drain(lv: &LeafVdev) -> Result<()> {
    let start = Instant::now();
    loop {
        let n = lv.queue.inflight();
        if n == 0 {
            return Ok(());
        }
        if start.elapsed() > DRAIN_WAIT {
            return Err(PoolError::Invalid(format!(
                "{}: {n} I/O request(s) still in progress on the device (it is too slow); try \
                 again later",
                lv.path()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines() {
        assert_eq!(parse("off").unwrap(), 0);
        assert_eq!(parse("0").unwrap(), 0);
        assert_eq!(parse("10").unwrap(), 10_000);
        assert_eq!(parse("2s").unwrap(), 2000);
        assert_eq!(parse("500ms").unwrap(), 500);
        assert_eq!(parse("2m").unwrap(), 120_000);
        for bad in [
            "",
            "s",
            "-1",
            "1.5s",
            "2h",
            "99999999999999999999",
            "61m",
            "1 s",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
