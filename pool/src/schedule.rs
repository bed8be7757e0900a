//! Scrub schedules (pool property `scrub_schedule`): `off`, `daily`, `weekly`, `monthly`, an interval
//! (`90s`, `12h`, `7d`, `2w`), or a 5-field cron line (minute hour day-of-month month day-of-week, in
//! local time; lists, ranges, steps and month/day names; day-of-month and day-of-week OR-ed when both
//! are restricted, as cron does).
//!
//! A scrub is due when a scheduled time has passed since the last scrub started (or when no scrub ever
//! ran), so a schedule missed while the daemon was down runs as soon as it starts.

/// Seconds of the named and interval schedules.
fn interval(s: &str) -> Option<u64> {
    match s {
        "daily" => return Some(86_400),
        "weekly" => return Some(7 * 86_400),
        "monthly" => return Some(30 * 86_400),
        _ => {}
    }
    let unit = s.chars().last()?;
    let mult = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        'w' => 7 * 86_400,
        _ => return None,
    };
    let n: u64 = s[..s.len() - 1].parse().ok()?;
    (n > 0).then_some(n * mult)
}

/// One cron field as a 64-bit set of allowed values.
fn field(f: &str, lo: u32, hi: u32, names: &[&str]) -> Option<u64> {
    let mut set = 0u64;
    let value = |x: &str| -> Option<u32> {
        if let Ok(n) = x.parse::<u32>() {
            return Some(n);
        }
        let i = names.iter().position(|n| n.eq_ignore_ascii_case(x))? as u32;
        Some(i + lo)
    };
    for part in f.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (r, s.parse::<u32>().ok().filter(|&s| s > 0)?),
            None => (part, 1),
        };
        let (a, b) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            (value(a)?, value(b)?)
        } else {
            let v = value(range)?;
            (v, if step > 1 { hi } else { v })
        };
        if a < lo || b > hi || a > b {
            return None;
        }
        let mut v = a;
        while v <= b {
            set |= 1 << v;
            v += step;
        }
    }
    Some(set)
}

struct Cron {
    min: u64,
    hour: u64,
    dom: u64,
    month: u64,
    dow: u64,
    dom_star: bool,
    dow_star: bool,
}

const MONTHS: &[&str] = &[
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAYS: &[&str] = &["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

fn cron(s: &str) -> Option<Cron> {
    let f: Vec<&str> = s.split_whitespace().collect();
    if f.len() != 5 {
        return None;
    }
    let mut dow = field(f[4], 0, 7, DAYS)?;
    if dow & (1 << 7) != 0 {
        dow |= 1; // 7 is Sunday too
    }
    Some(Cron {
        min: field(f[0], 0, 59, &[])?,
        hour: field(f[1], 0, 23, &[])?,
        dom: field(f[2], 1, 31, &[])?,
        month: field(f[3], 1, 12, MONTHS)?,
        dow,
        dom_star: f[2] == "*",
        dow_star: f[4] == "*",
    })
}

/// Local time fields of a Unix time: (minute, hour, day of month, month 1-12, day of week 0-6).
fn local(t: u64) -> (u32, u32, u32, u32, u32) {
    // SAFETY: zeroed `tm` is a valid value of a plain C struct.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let tt = t as libc::time_t;
    // SAFETY: both pointers are valid and exclusive for the call.
    unsafe { libc::localtime_r(&tt, &mut tm) };
    (
        tm.tm_min as u32,
        tm.tm_hour as u32,
        tm.tm_mday as u32,
        (tm.tm_mon + 1) as u32,
        tm.tm_wday as u32,
    )
}

impl Cron {
    fn matches(&self, t: u64) -> bool {
        let (mi, h, d, mo, wd) = local(t);
        let day = match (self.dom_star, self.dow_star) {
            (false, false) => self.dom & (1 << d) != 0 || self.dow & (1 << wd) != 0,
            _ => self.dom & (1 << d) != 0 && self.dow & (1 << wd) != 0,
        };
        self.min & (1 << mi) != 0 && self.hour & (1 << h) != 0 && self.month & (1 << mo) != 0 && day
    }

    /// The first matching minute after `t`, looking at most ~4 years ahead.
    fn next_after(&self, t: u64) -> Option<u64> {
        let mut m = t / 60 * 60 + 60;
        for _ in 0..(4 * 366 * 24 * 60) {
            if self.matches(m) {
                return Some(m);
            }
            m += 60;
        }
        None
    }
}

/// Is the schedule valid?
pub fn valid(s: &str) -> bool {
    s == "off" || interval(s).is_some() || cron(s).is_some()
}

/// When the next scrub is due, given when the last one started (`None`: never). `None` for `off`.
pub fn next_due(schedule: &str, last: Option<u64>) -> Option<u64> {
    if schedule == "off" {
        return None;
    }
    if let Some(i) = interval(schedule) {
        return Some(last.map_or(0, |l| l + i));
    }
    let c = cron(schedule)?;
    match last {
        None => Some(0),
        Some(l) => c.next_after(l),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals() {
        assert_eq!(next_due("5s", Some(100)), Some(105));
        assert_eq!(next_due("weekly", Some(0)), Some(7 * 86_400));
        assert_eq!(next_due("daily", None), Some(0));
        assert_eq!(next_due("off", Some(1)), None);
        assert!(!valid("0s") && !valid("x") && valid("12h"));
    }

    #[test]
    fn cron_lines() {
        assert!(valid("0 3 * * sun") && valid("*/15 * * * mon-fri") && valid("0 0 1 jan *"));
        assert!(!valid("61 * * * *") && !valid("* * * *"));
        // Every minute: due one minute after the last run.
        assert_eq!(next_due("* * * * *", Some(120)), Some(180));
        // Minute 30 of every hour.
        let n = next_due("30 * * * *", Some(3600 * 10)).unwrap();
        assert_eq!(local(n).0, 30);
        assert!(n > 3600 * 10 && n <= 3600 * 11);
    }
}
