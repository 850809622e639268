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
    pub clients: usize,
    pub rounds: Vec<f64>,
    pub ops_per_sec: f64,
    /// Over direct etcd's, through the tool.
    pub ratio: f64,
    /// The Rust generator's ratio for the same workload and endpoint.
    pub rust_ratio: f64,
    /// With one client, the time the endpoint adds to each request over direct etcd
    /// (1/throughput minus direct's), by the tool and by the Rust generator.
    pub added_ms: Option<f64>,
    pub rust_added_ms: Option<f64>,
}

impl GoResult {
    /// How far the two generators are apart, relative to the Rust figure: on the time
    /// added per request with one client, on the ratio otherwise. With one client a
    /// ratio is direct's time over direct's plus the hop's, so it depends on how long the
    /// generator itself takes per request; the time the hop adds does not.
    pub fn disagreement(&self) -> f64 {
        let (go, rust) = match (self.added_ms, self.rust_added_ms) {
            (Some(go), Some(rust)) => (go, rust),
            _ => (self.ratio, self.rust_ratio),
        };
        if rust > 0.0 {
            (go / rust - 1.0).abs()
        } else {
            f64::INFINITY
        }
    }
}

/// Throughput of the same workload by the Rust generator: per endpoint name.
pub struct Rust<'a> {
    pub ratio: &'a dyn Fn(&str) -> f64,
    pub ops_per_sec: &'a dyn Fn(&str) -> f64,
}

/// Medians and ratios: `rounds[endpoint]` for workload `w`, `direct` the index of direct
/// etcd, `rust` the Rust generator's figures for the same workload.
pub fn results(
    w: &GoWorkload,
    names: &[&str],
    rounds: Vec<Vec<f64>>,
    direct: usize,
    rust: Rust<'_>,
) -> Vec<GoResult> {
    let medians: Vec<f64> = rounds.iter().map(|r| median(r.clone())).collect();
    let base = medians[direct];
    let added = |ops: f64, direct: f64| {
        (w.clients == 1 && ops > 0.0 && direct > 0.0).then(|| 1e3 / ops - 1e3 / direct)
    };
    let rust_direct = (rust.ops_per_sec)(names[direct]);
    names
        .iter()
        .zip(rounds)
        .zip(medians)
        .map(|((name, rounds), m)| GoResult {
            workload: w.name.to_owned(),
            endpoint: (*name).to_owned(),
            clients: w.clients,
            rounds,
            ops_per_sec: m,
            ratio: if base > 0.0 { m / base } else { 0.0 },
            rust_ratio: (rust.ratio)(name),
            added_ms: added(m, base),
            rust_added_ms: added((rust.ops_per_sec)(name), rust_direct),
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
        let names = ["direct etcd", "etcd-shim"];
        let rust_ops = |name: &str| if name == "etcd-shim" { 1000.0 } else { 2000.0 };
        let rust_ratio = |name: &str| rust_ops(name) / 2000.0;
        let rust = || Rust {
            ratio: &rust_ratio,
            ops_per_sec: &rust_ops,
        };
        let rounds = vec![vec![1000.0, 1250.0, 1100.0], vec![500.0, 440.0, 660.0]];
        let at = |clients| GoWorkload {
            name: "put",
            conns: 1,
            clients,
            total: 10,
            args: &[],
        };

        // 100 clients: the ratios are compared.
        let r = results(&at(100), &names, rounds.clone(), 0, rust());
        assert_eq!((r[0].ratio, r[1].ops_per_sec), (1.0, 500.0));
        assert!((r[1].ratio - 500.0 / 1100.0).abs() < 1e-9);
        assert_eq!(r[1].added_ms, None);
        assert!((r[1].disagreement() - (1.0 - 500.0 / 1100.0 / 0.5)).abs() < 1e-9);

        // One client: the time added per request (Go: 2 - 0.909 ms; Rust: 1 - 0.5 ms).
        let r = results(&at(1), &names, rounds, 0, rust());
        let go_added = 1e3 / 500.0 - 1e3 / 1100.0;
        assert!((r[1].added_ms.unwrap() - go_added).abs() < 1e-9);
        assert!((r[1].rust_added_ms.unwrap() - 0.5).abs() < 1e-9);
        assert!((r[1].disagreement() - (go_added / 0.5 - 1.0)).abs() < 1e-9);
    }
}
