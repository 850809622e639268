//! The benchmark's smoke mode against real etcd, grpc-proxy, broker, shim, the floor relays
//! and the injector, with etcd's benchmark tool as the second load generator: it must
//! produce a complete report, with every workload measured on every endpoint, what each
//! serving process spent per request, and the injector's admission latency.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use etcd_shim_e2e::run_bounded;
use serde_json::Value;

/// Each endpoint, with the processes that serve it.
const ENDPOINTS: [(&str, usize); 7] = [
    ("direct etcd", 0),
    ("etcd grpc-proxy", 1),
    ("etcd-shim", 2),
    ("floor: TCP relay", 1),
    ("floor: HTTP/2 relay", 1),
    ("floor: TCP + HTTP/2 relays", 2),
    ("floor: 2 HTTP/2 relays", 2),
];

#[test]
fn quick_run_reports_every_endpoint_and_what_each_hop_costs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (md, json) = (dir.path().join("BENCH.md"), dir.path().join("bench.json"));
    // Where scripts/etcd keeps etcd's benchmark tool (it builds it first if missing).
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/etcd");
    let found = Command::new(&script).arg("benchmark").output()?;
    ensure!(
        found.status.success(),
        "scripts/etcd benchmark failed: {}",
        String::from_utf8_lossy(&found.stderr)
    );
    let go_tool = String::from_utf8(found.stdout)?.trim().to_owned();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_etcd-shim-bench"));
    cmd.arg("--quick")
        .arg("--go-benchmark")
        .arg(&go_tool)
        .arg("--out")
        .arg(&md)
        .arg("--json")
        .arg(&json);
    let out = run_bounded(cmd, Duration::from_secs(600))?;
    ensure!(
        out.status.success(),
        "benchmark failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    let workloads = report["workloads"].as_array().context("workloads")?;
    // 13 request workloads and the watch fan-out.
    assert_eq!(workloads.len(), 14, "{workloads:#?}");
    for w in workloads {
        let name = w["name"].as_str().context("workload name")?;
        let got: Vec<&str> = w["endpoints"]
            .as_array()
            .context("endpoints")?
            .iter()
            .filter_map(|e| e["endpoint"].as_str())
            .collect();
        let want: Vec<&str> = ENDPOINTS.iter().map(|(e, _)| *e).collect();
        assert_eq!(got, want, "{name}");
        let fanout = name.starts_with("watch fan-out");
        for (e, (_, processes)) in w["endpoints"]
            .as_array()
            .context("endpoints")?
            .iter()
            .zip(ENDPOINTS)
        {
            assert_eq!(
                e["processes"].as_u64(),
                Some(processes as u64),
                "{name}: {e}"
            );
            // Every process between the client and etcd did work for each request.
            for i in 0..processes {
                let cpu = e["median"]["cost"][i]["cpu_us"].as_f64().unwrap_or(0.0);
                assert!(fanout || cpu > 0.0, "{name}: process {i}: {e}");
            }
            let m = &e["median"];
            let (ops, p50, p99) = (
                m["ops_per_sec"].as_f64().unwrap_or(0.0),
                m["p50_ms"].as_f64().unwrap_or(0.0),
                m["p99_ms"].as_f64().unwrap_or(0.0),
            );
            assert!(ops > 0.0 && p50 > 0.0 && p99 >= p50, "{name}: {e}");
        }
        assert_eq!(w["endpoints"][0]["ratio"].as_f64(), Some(1.0), "{name}");
    }

    // etcd's benchmark tool: put and range, at 1 and 100 clients, against every endpoint.
    let go = report["go"].as_array().context("go")?;
    assert_eq!(go.len(), 4 * ENDPOINTS.len(), "{go:#?}");
    for g in go {
        let (ops, ratio) = (g["ops_per_sec"].as_f64(), g["ratio"].as_f64());
        assert!(
            ops.unwrap_or(0.0) > 0.0 && ratio.unwrap_or(0.0) > 0.0,
            "{g}"
        );
        assert!(g["rust_ratio"].as_f64().unwrap_or(0.0) > 0.0, "{g}");
    }

    let memory = report["memory"].as_array().context("memory")?;
    assert_eq!(memory.len(), 3);
    for m in memory {
        let idle = m["idle_kib"].as_u64().unwrap_or(0);
        assert!(
            idle > 0 && m["hwm_kib"].as_u64().unwrap_or(0) >= idle,
            "{m}"
        );
    }
    assert!(report["shim_binary_bytes"].as_u64().unwrap_or(0) > 0);
    let scale = report["scale"].as_array().context("scale")?;
    assert_eq!(scale.len(), 1);
    assert!(
        scale[0]["deliveries"].as_u64().unwrap_or(0) > 0,
        "{scale:#?}"
    );

    // --quick sends 200 reviews/s for 1 s; every one must have been answered with a patch.
    let inj = &report["injector"];
    assert_eq!(inj["rate"].as_u64(), Some(200), "{inj}");
    assert_eq!(inj["sent"].as_u64(), Some(200), "{inj}");
    assert_eq!(inj["errors"].as_u64(), Some(0), "{inj}");
    let (achieved, p50, p99, max) = (
        inj["achieved_per_sec"].as_f64().unwrap_or(0.0),
        inj["p50_ms"].as_f64().unwrap_or(0.0),
        inj["p99_ms"].as_f64().unwrap_or(0.0),
        inj["max_ms"].as_f64().unwrap_or(0.0),
    );
    assert!(
        achieved > 0.0 && p50 > 0.0 && p99 >= p50 && max >= p99,
        "{inj}"
    );
    let idle = inj["rss_idle_kib"].as_u64().unwrap_or(0);
    assert!(
        idle > 0 && inj["rss_hwm_kib"].as_u64().unwrap_or(0) >= idle,
        "{inj}"
    );

    let text = std::fs::read_to_string(&md)?;
    for heading in [
        "## Targets",
        "## What a hop costs",
        "## Workloads",
        "## A second load generator",
        "## Memory",
        "## Broker scale",
        "## Injector",
    ] {
        assert!(text.contains(heading), "{heading} missing:\n{text}");
    }
    for w in workloads {
        let name = w["name"].as_str().unwrap_or_default();
        assert!(text.contains(&format!("### {name}")), "{name} missing");
    }
    for (e, _) in ENDPOINTS {
        assert!(text.contains(&format!("| {e} |")), "{e} missing");
    }
    for target in [
        "put c1: CPU per request, shim + broker",
        "put c100: throughput",
    ] {
        assert!(text.contains(&format!("| {target} |")), "{target} missing");
    }
    let row = format!("| 200/s for 1 s | {achieved:.1}/s | 200 | {p50:.3} ms | {p99:.3} ms |");
    assert!(text.contains(&row), "injector row {row:?} missing:\n{text}");
    assert!(text.contains("--quick"), "the exact command is missing");
    let svg = std::fs::read_to_string(md.with_extension("svg"))?;
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("etcd-shim"));
    Ok(())
}
