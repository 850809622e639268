//! A second load generator: etcd's own `benchmark` tool (Go, gRPC stubs of etcd's API),
//! against the same endpoints in the same rounds as the Rust one, so that no ratio rests
//! on one client library.

use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::stats::median;

/// A workload of the tool, named as the Rust workload it stands beside.
pub struct GoWorkload {
    pub name: &'static str,
    conns: usize,
    clients: usize,
    /// Requests per run.
    pub total: usize,
    args: &'static [&'static str],
}

/// Put of 256-byte values over 1,000 keys, and linearizable Range of one seeded key, at
/// one client and at 100 (over 4 connections, as the Rust generator).
pub fn workloads() -> Vec<GoWorkload> {
    const PUT: &[&str] = &[
        "put",
        "--key-size",
        "7",
        "--val-size",
        "256",
        "--key-space-size",
        "1000",
    ];
    const RANGE: &[&str] = &["range", "k/00000", "--consistency", "l"];
    let w = |name, conns, clients, total, args| GoWorkload {
        name,
        conns,
        clients,
        total,
        args,
    };
    vec![
        w("put c1", 1, 1, 2_000, PUT),
        w("put c100", 4, 100, 20_000, PUT),
        w("range one key, linearizable, c1", 1, 1, 2_000, RANGE),
        w("range one key, linearizable, c100", 4, 100, 20_000, RANGE),
    ]
}

/// Runs `w` once against `endpoint` (`host:port`) and returns requests per second.
pub fn run(tool: &str, w: &GoWorkload, endpoint: &str) -> Result<f64> {
    let out = Command::new(tool)
        .arg(format!("--endpoints={endpoint}"))
        .arg(format!("--conns={}", w.conns))
        .arg(format!("--clients={}", w.clients))
        .args(w.args)
        .arg(format!("--total={}", w.total))
        .output()
        .with_context(|| format!("running {tool}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{tool} {} failed: {}{}",
            w.args[0],
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    requests_per_sec(&stdout).with_context(|| format!("no Requests/sec in: {stdout}"))
}

/// The summary's `Requests/sec:` figure, the tool's one precise number (its latencies
/// are printed to 0.1 ms).
fn requests_per_sec(summary: &str) -> Option<f64> {
    summary
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))?
        .trim()
        .parse()
        .ok()
}

/// One workload through the tool against one endpoint, over the rounds.
#[derive(Debug, Clone, Serialize)]
pub struct GoResult {
    pub workload: String,
    pub endpoint: String,
    pub rounds: Vec<f64>,
    pub ops_per_sec: f64,
    /// Over direct etcd's, through the tool.
    pub ratio: f64,
    /// The Rust generator's ratio for the same workload and endpoint.
    pub rust_ratio: f64,
}

impl GoResult {
    /// How far the two generators' ratios are apart, relative to the Rust one.
    pub fn disagreement(&self) -> f64 {
        if self.rust_ratio > 0.0 {
            (self.ratio / self.rust_ratio - 1.0).abs()
        } else {
            f64::INFINITY
        }
    }
}

/// Medians and ratios: `rounds[endpoint]` for one workload, `direct` the index of direct
/// etcd, `rust_ratio` the Rust generator's ratio for an endpoint's name.
pub fn results(
    workload: &str,
    names: &[&str],
    rounds: Vec<Vec<f64>>,
    direct: usize,
    rust_ratio: impl Fn(&str) -> f64,
) -> Vec<GoResult> {
    let medians: Vec<f64> = rounds.iter().map(|r| median(r.clone())).collect();
    let base = medians[direct];
    names
        .iter()
        .zip(rounds)
        .zip(medians)
        .map(|((name, rounds), m)| GoResult {
            workload: workload.to_owned(),
            endpoint: (*name).to_owned(),
            rounds,
            ops_per_sec: m,
            ratio: if base > 0.0 { m / base } else { 0.0 },
            rust_ratio: rust_ratio(name),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_summary() {
        let out = "Summary:\n  Total:\t1.1883 secs.\n  Slowest:\t0.0046 secs.\n  \
                   Average:\t0.0006 secs.\n  Stddev:\t0.0002 secs.\n  \
                   Requests/sec:\t1683.0122\n\nResponse time histogram:\n";
        assert_eq!(requests_per_sec(out), Some(1683.0122));
        assert_eq!(requests_per_sec("Summary:\n"), None);
    }

    #[test]
    fn ratios_are_to_direct_and_compared_with_rust() {
        let r = results(
            "put c1",
            &["direct etcd", "etcd-shim"],
            vec![vec![1000.0, 1200.0, 1100.0], vec![500.0, 440.0, 660.0]],
            0,
            |name| if name == "etcd-shim" { 0.5 } else { 1.0 },
        );
        assert_eq!(r[0].ratio, 1.0);
        assert_eq!(r[1].ops_per_sec, 500.0);
        assert!((r[1].ratio - 500.0 / 1100.0).abs() < 1e-9);
        assert!((r[1].disagreement() - (1.0 - 500.0 / 1100.0 / 0.5)).abs() < 1e-9);
    }
}
