//! Resource usage of a process, read from `/proc/<pid>`: resident memory, CPU time and
//! context switches.

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

/// What a process's threads have used so far: CPU time to the nanosecond, from the
/// scheduler's own accounting (`/proc/<pid>/task/<tid>/schedstat`), and context switches,
/// voluntary (a thread waited) and not (it was preempted). Threads that exited are not in
/// it, so take differences over windows in which the process keeps its threads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub cpu_ns: u64,
    pub switches: u64,
}

impl std::ops::Sub for Counters {
    type Output = Counters;
    fn sub(self, before: Counters) -> Counters {
        Counters {
            cpu_ns: self.cpu_ns.saturating_sub(before.cpu_ns),
            switches: self.switches.saturating_sub(before.switches),
        }
    }
}

/// [`Counters`] of `pid`, summed over its threads.
pub fn counters(pid: u32) -> Result<Counters> {
    let dir = format!("/proc/{pid}/task");
    let mut total = Counters::default();
    for task in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let path = task?.path();
        // A thread may exit between the listing and the read; it has nothing left to add.
        let (Ok(sched), Ok(status)) = (
            std::fs::read_to_string(path.join("schedstat")),
            std::fs::read_to_string(path.join("status")),
        ) else {
            continue;
        };
        let t = parse_task(&sched, &status)
            .ok_or_else(|| anyhow!("malformed schedstat or status in {}", path.display()))?;
        total.cpu_ns += t.cpu_ns;
        total.switches += t.switches;
    }
    Ok(total)
}

fn parse_task(schedstat: &str, status: &str) -> Option<Counters> {
    let cpu_ns = schedstat.split_whitespace().next()?.parse().ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
    };
    Some(Counters {
        cpu_ns,
        switches: field("voluntary_ctxt_switches:")? + field("nonvoluntary_ctxt_switches:")?,
    })
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
    fn task_counters() {
        let status = "Name:\tx\nvoluntary_ctxt_switches:\t12\nnonvoluntary_ctxt_switches:\t3\n";
        assert_eq!(
            parse_task("1500 20 7\n", status),
            Some(Counters {
                cpu_ns: 1500,
                switches: 15
            })
        );
        assert_eq!(parse_task("", status), None);
        assert_eq!(parse_task("1 2 3", "Name:\tx\n"), None);
    }

    #[test]
    fn own_threads_add_up() {
        let me = std::process::id();
        let before = counters(me).unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        // A fixed amount of work, not of wall time: a loaded machine may not run it soon.
        let worker = std::thread::spawn(move || {
            let mut x = 0u64;
            for i in 0..20_000_000u64 {
                x = std::hint::black_box(x.wrapping_add(i));
            }
            done.send(x).unwrap();
            // Alive while it is counted: an exited thread leaves the task list.
            std::thread::sleep(std::time::Duration::from_millis(300));
        });
        finished.recv().unwrap();
        let used = counters(me).unwrap() - before;
        assert!(used.cpu_ns >= 2_000_000, "{used:?}");
        assert!(used.switches >= 1, "{used:?}");
        worker.join().unwrap();
    }

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        let r = rss(me).unwrap();
        assert!(r.now_kib > 0 && r.peak_kib >= r.now_kib);
        assert!(cpu_seconds(me).unwrap() >= 0.0);
    }
}
