//! Resource usage of a process, read from `/proc/<pid>`: resident memory and CPU time.

use anyhow::{Context, Result, anyhow};

/// Clock ticks per second of `utime`/`stime` in `/proc/<pid>/stat`. Linux fixes USER_HZ
/// at 100 for userspace on every architecture we run on.
const TICKS_PER_SEC: f64 = 100.0;

/// Resident set size now and its high-water mark, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rss {
    pub now_kib: u64,
    pub peak_kib: u64,
}

/// `VmRSS` and `VmHWM` from `/proc/<pid>/status`.
pub fn rss(pid: u32) -> Result<Rss> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    parse_status(&status).ok_or_else(|| anyhow!("no VmRSS/VmHWM for pid {pid}"))
}

fn parse_status(status: &str) -> Option<Rss> {
    let field = |name: &str| {
        status.lines().find_map(|l| {
            l.strip_prefix(name)?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
    };
    Some(Rss {
        now_kib: field("VmRSS:")?,
        peak_kib: field("VmHWM:")?,
    })
}

/// User plus system CPU time the process has used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    parse_stat(&stat).ok_or_else(|| anyhow!("malformed /proc/{pid}/stat"))
}

fn parse_stat(stat: &str) -> Option<f64> {
    // The command name may hold spaces and parentheses; fields resume after the last ')'.
    // After it come state (field 3) ... utime (14) and stime (15).
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / TICKS_PER_SEC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields() {
        let s = "Name:\tetcd-shim\nVmHWM:\t    5120 kB\nVmRSS:\t    4096 kB\n";
        assert_eq!(
            parse_status(s),
            Some(Rss {
                now_kib: 4096,
                peak_kib: 5120
            })
        );
        assert_eq!(parse_status("Name:\tx\n"), None);
    }

    #[test]
    fn stat_cpu_after_odd_names() {
        let s = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 1 2 3";
        assert_eq!(parse_stat(s), Some(3.0));
    }

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        let r = rss(me).unwrap();
        assert!(r.now_kib > 0 && r.peak_kib >= r.now_kib);
        assert!(cpu_seconds(me).unwrap() >= 0.0);
    }
}
