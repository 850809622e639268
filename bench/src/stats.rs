//! Latency percentiles of one run and medians across rounds.

use std::time::Duration;

use serde::Serialize;

/// What one workload did against one endpoint in one round.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    pub ops_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Operations (or delivered watch events) measured.
    pub ops: u64,
    /// What each process serving the endpoint spent per operation, in the order the
    /// endpoint lists them (none for direct etcd; zero where not measured).
    pub cost: [Cost; MAX_PROCESSES],
}

/// The most processes an endpoint puts between the client and etcd.
pub const MAX_PROCESSES: usize = 2;

/// CPU time and context switches per operation of one process.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Cost {
    pub cpu_us: f64,
    pub switches: f64,
}

impl Cost {
    pub fn total(costs: &[Cost]) -> Cost {
        costs.iter().fold(Cost::default(), |a, c| Cost {
            cpu_us: a.cpu_us + c.cpu_us,
            switches: a.switches + c.switches,
        })
    }
}

impl Sample {
    /// Summarises latencies (nanoseconds, any order) observed over `elapsed`.
    pub fn from_latencies(mut nanos: Vec<u64>, elapsed: Duration) -> Self {
        nanos.sort_unstable();
        let secs = elapsed.as_secs_f64().max(1e-9);
        Self {
            ops_per_sec: nanos.len() as f64 / secs,
            p50_ms: percentile(&nanos, 0.50) as f64 / 1e6,
            p99_ms: percentile(&nanos, 0.99) as f64 / 1e6,
            ops: nanos.len() as u64,
            cost: [Cost::default(); MAX_PROCESSES],
        }
    }

    /// The median of each figure across rounds (each taken separately).
    pub fn median(rounds: &[Sample]) -> Sample {
        let pick = |f: fn(&Sample) -> f64| median(rounds.iter().map(f).collect());
        Sample {
            ops_per_sec: pick(|s| s.ops_per_sec),
            p50_ms: pick(|s| s.p50_ms),
            p99_ms: pick(|s| s.p99_ms),
            ops: median(rounds.iter().map(|s| s.ops as f64).collect()) as u64,
            cost: std::array::from_fn(|i| Cost {
                cpu_us: median(rounds.iter().map(|s| s.cost[i].cpu_us).collect()),
                switches: median(rounds.iter().map(|s| s.cost[i].switches).collect()),
            }),
        }
    }
}

/// Nearest-rank percentile of sorted values; 0 for none.
pub fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Median; the mean of the middle two for an even count; 0 for none.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.50), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&[7], 0.99), 7);
        assert_eq!(percentile(&[], 0.5), 0);
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }

    #[test]
    fn sample_from_latencies() {
        let s = Sample::from_latencies(vec![2_000_000, 1_000_000], Duration::from_secs(2));
        assert_eq!(s.ops, 2);
        assert_eq!(s.ops_per_sec, 1.0);
        assert_eq!(s.p50_ms, 1.0);
        assert_eq!(s.p99_ms, 2.0);
    }
}
