//! The results, and how they are written: BENCHMARKS.md, an SVG chart of throughput
//! ratios, and JSON for machines.

use std::fmt::Write as _;

use serde::Serialize;

use crate::fairness::FairnessResult;
use crate::gobench::GoResult;
use crate::injector::InjectorResult;
use crate::scale::ScaleResult;
use crate::stack::{DIRECT, FLOORS, PROXY, SHIM, TWO_H2_RELAYS};
use crate::stats::{Cost, Sample};

#[derive(Debug, Serialize)]
pub struct Report {
    pub date: String,
    pub command: String,
    pub machine: Machine,
    /// How the run was configured, as `flag = value` lines.
    pub settings: Vec<(String, String)>,
    pub workloads: Vec<WorkloadResult>,
    pub memory: Vec<MemoryRow>,
    pub shim_binary_bytes: u64,
    pub scale: Vec<ScaleResult>,
    /// None when the run skipped it (`--injector-rate 0`).
    pub injector: Option<InjectorResult>,
    /// None when the run skipped it (`--fairness-duration 0`).
    pub fairness: Option<FairnessResult>,
    /// etcd's benchmark tool beside the Rust generator; empty when not run.
    pub go: Vec<GoResult>,
    pub targets: Vec<Target>,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub memory: String,
    pub cpu: String,
    pub kernel: String,
    pub etcd: String,
}

#[derive(Debug, Serialize)]
pub struct WorkloadResult {
    pub name: String,
    pub concurrency: usize,
    /// One per endpoint, medians across rounds.
    pub endpoints: Vec<EndpointResult>,
}

#[derive(Debug, Serialize)]
pub struct EndpointResult {
    pub endpoint: String,
    /// How many processes serve it (the entries of `median.cost` that count).
    pub processes: usize,
    pub median: Sample,
    /// Median throughput over direct etcd's.
    pub ratio: f64,
    pub rounds: Vec<Sample>,
}

impl WorkloadResult {
    /// `per_endpoint`: name, number of serving processes, and one sample per round.
    pub fn new(
        name: &str,
        concurrency: usize,
        per_endpoint: Vec<(&str, usize, Vec<Sample>)>,
    ) -> Self {
        let medians: Vec<(String, usize, Sample, Vec<Sample>)> = per_endpoint
            .into_iter()
            .map(|(e, n, rounds)| (e.to_owned(), n, Sample::median(&rounds), rounds))
            .collect();
        let direct = medians
            .iter()
            .find(|(e, _, _, _)| e == DIRECT)
            .map(|(_, _, s, _)| s.ops_per_sec)
            .unwrap_or(0.0);
        let endpoints = medians
            .into_iter()
            .map(|(endpoint, processes, median, rounds)| EndpointResult {
                processes,
                ratio: if direct > 0.0 {
                    median.ops_per_sec / direct
                } else {
                    0.0
                },
                endpoint,
                median,
                rounds,
            })
            .collect();
        Self {
            name: name.to_owned(),
            concurrency,
            endpoints,
        }
    }

    pub fn get(&self, endpoint: &str) -> Option<&EndpointResult> {
        self.endpoints.iter().find(|e| e.endpoint == endpoint)
    }
}

#[derive(Debug, Serialize)]
pub struct MemoryRow {
    pub process: String,
    pub idle_kib: u64,
    /// Largest RSS sampled during the load phase, and the workload running then.
    pub load_kib: u64,
    pub load_workload: String,
    /// The kernel's high-water mark at the end of the load phase.
    pub hwm_kib: u64,
    pub after_kib: u64,
}

#[derive(Debug, Serialize)]
pub struct Target {
    pub what: String,
    pub wanted: String,
    pub measured: String,
    /// None when the run did not measure it (e.g. a quick run without 1,000 shims).
    pub met: Option<bool>,
}

/// One figure per serving process, client side first, and their sum when there are
/// several: `120 + 200 = 320 µs`. Empty for direct etcd.
fn per_process(costs: &[Cost], f: fn(&Cost) -> f64, unit: &str, decimals: usize) -> String {
    let unit = if unit.is_empty() {
        String::new()
    } else {
        format!(" {unit}")
    };
    let parts: Vec<String> = costs
        .iter()
        .map(|c| format!("{:.*}", decimals, f(c)))
        .collect();
    match parts.len() {
        0 => String::new(),
        1 => format!("{}{unit}", parts[0]),
        _ => format!(
            "{} = {:.*}{unit}",
            parts.join(" + "),
            decimals,
            f(&Cost::total(costs))
        ),
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

impl Report {
    /// BENCHMARKS.md. `chart` is the SVG's file name, linked from the page.
    pub fn markdown(&self, chart: &str, notes: &str) -> String {
        let mut s = String::new();
        let m = &self.machine;
        let _ = writeln!(s, "# Benchmarks\n");
        let _ = writeln!(
            s,
            "etcd-shim (client -> shim -> broker -> etcd) against direct etcd and etcd's own \
             `grpc-proxy` with `--namespace` (client -> proxy -> etcd), with floors beside \
             them (relays that do nothing else, [below](#what-a-hop-costs)), measured on the \
             same machine in one run. The workloads alternate between the endpoints, round \
             after round, and each figure is the median across rounds. Ratios are throughput \
             over direct etcd's in the same run.\n"
        );
        let _ = writeln!(
            s,
            "Generated by `{}` on {}. Machine: {} cores ({}), {} memory, Linux {}, {}. \
             The load generator, etcd, the proxy, the broker and the shim all share these \
             {} cores, so absolute figures are low and every extra hop costs CPU that etcd \
             would otherwise use; compare ratios, and expect more headroom where the shim \
             runs in its own pod. etcd keeps its data on tmpfs (`/dev/shm`), so it never \
             waits for a disk: every workload is CPU-bound, and whatever a hop costs comes \
             straight out of etcd's throughput.\n",
            self.command, self.date, m.nproc, m.cpu, m.memory, m.kernel, m.etcd, m.nproc
        );
        if !notes.is_empty() {
            let _ = writeln!(s, "{notes}\n");
        }
        let _ = writeln!(s, "![Throughput relative to direct etcd]({chart})\n");

        let _ = writeln!(s, "## Targets\n");
        let _ = writeln!(s, "| target | wanted | measured | verdict |");
        let _ = writeln!(s, "|---|---|---|---|");
        for t in &self.targets {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                t.what,
                t.wanted,
                t.measured,
                verdict(t.met)
            );
        }
        let _ = writeln!(s);

        self.hops(&mut s);

        let _ = writeln!(s, "## Workloads\n");
        for w in &self.workloads {
            let _ = writeln!(s, "### {}\n", w.name);
            let _ = writeln!(
                s,
                "| endpoint | ops/s | p50 | p99 | ratio to direct | CPU per request | context switches per request |"
            );
            let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|");
            for e in &w.endpoints {
                let _ = writeln!(
                    s,
                    "| {} | {:.0} | {:.3} ms | {:.3} ms | {:.2}x | {} | {} |",
                    e.endpoint,
                    e.median.ops_per_sec,
                    e.median.p50_ms,
                    e.median.p99_ms,
                    e.ratio,
                    per_process(&e.median.cost[..e.processes], |c| c.cpu_us, "µs", 0),
                    per_process(&e.median.cost[..e.processes], |c| c.switches, "", 1),
                );
            }
            let _ = writeln!(s);
        }

        self.second_generator(&mut s);

        let _ = writeln!(s, "## Memory\n");
        let _ = writeln!(
            s,
            "Resident memory (`VmRSS`, and the kernel's high-water mark `VmHWM`) from \
             `/proc/<pid>/status`: idle after start-up, the largest value sampled every 50 ms \
             during the workloads (and which workload was running), the high-water mark at \
             the end of the workloads, and again after the wait given below.\n"
        );
        let _ = writeln!(
            s,
            "| process | idle | under load (sampled max) | during | VmHWM | after |"
        );
        let _ = writeln!(s, "|---|---:|---:|---|---:|---:|");
        for r in &self.memory {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                r.process,
                mib(r.idle_kib),
                mib(r.load_kib),
                r.load_workload,
                mib(r.hwm_kib),
                mib(r.after_kib)
            );
        }
        let _ = writeln!(
            s,
            "\nThe shim's release binary: {:.1} MiB ({} bytes).\n",
            self.shim_binary_bytes as f64 / (1024.0 * 1024.0),
            self.shim_binary_bytes
        );

        let _ = writeln!(s, "## Broker scale\n");
        let _ = writeln!(
            s,
            "A fresh broker per row, with N connected shims, each holding one watch on its \
             own key and writing that key at a steady trickle. Each shim is simulated by \
             what the broker sees of it: its own HTTP/2 connection and bearer token (its own \
             tenant), speaking the same etcd gRPC a shim forwards; N real shim processes \
             would load the 2-core machine more than the broker. RSS per shim is \
             (RSS - idle RSS) / N; CPU is `utime + stime` from `/proc/<pid>/stat` over the \
             measuring window; watch latency is from just before the put to the event's \
             arrival.\n"
        );
        let _ = writeln!(
            s,
            "| shims | broker RSS idle | broker RSS | RSS per shim | broker CPU | CPU per shim | watch p50 | watch p99 | delivered | failed writes |"
        );
        let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in &self.scale {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.1} KiB | {:.2} cores | {:.2} millicores | {:.2} ms | {:.2} ms | {}/{} | {} |",
                r.shims,
                mib(r.broker_idle_rss_kib),
                mib(r.broker_rss_kib),
                r.rss_per_shim_kib,
                r.broker_cpu_cores,
                r.cpu_millicores_per_shim,
                r.watch_p50_ms,
                r.watch_p99_ms,
                r.deliveries,
                r.expected,
                r.failed_writes
            );
        }
        let _ = writeln!(s);

        if let Some(r) = &self.injector {
            let _ = writeln!(s, "## Injector\n");
            let _ = writeln!(
                s,
                "The `etcd-shim-injector` binary with a serving certificate made for the run, \
                 sent AdmissionReview requests for pod CREATE (a Deployment's pod with \
                 generateName and two containers, in a namespace opted in to injection) over \
                 HTTPS on {} keep-alive HTTP/2 connections, at a constant rate, open loop: \
                 each request is sent when due whether or not earlier ones were answered, and \
                 its latency counts from then (including any wait for an HTTP/2 stream) until \
                 the whole answer arrived; the sender's own lag behind its schedule is shown \
                 apart. An error \
                 is any answer that is not HTTP 200 with an allowed review carrying a \
                 JSONPatch, or none within 10 s. CPU is the injector's `utime + stime` over \
                 the run.\n",
                r.connections
            );
            let _ = writeln!(
                s,
                "| rate | achieved | reviews | p50 | p99 | max | errors | sender lag p99 / max | RSS idle | VmHWM | CPU |"
            );
            let _ = writeln!(
                s,
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            );
            let _ = writeln!(
                s,
                "| {}/s for {} s | {:.1}/s | {} | {:.3} ms | {:.3} ms | {:.3} ms | {} | {:.3} / {:.3} ms | {} | {} | {:.3} cores |",
                r.rate,
                r.duration_secs,
                r.achieved_per_sec,
                r.sent,
                r.p50_ms,
                r.p99_ms,
                r.max_ms,
                r.errors,
                r.lag_p99_ms,
                r.lag_max_ms,
                mib(r.rss_idle_kib),
                mib(r.rss_hwm_kib),
                r.cpu_cores
            );
            let _ = writeln!(s);
        }

        if let Some(f) = &self.fairness {
            let _ = writeln!(s, "## Fairness\n");
            let _ = writeln!(
                s,
                "Two tenants on a broker of their own that gives each the Helm chart's \
                 `defaultLimits` (500 reads/s, 100 writes/s, 1 MiB/s written, 4 MiB/s of \
                 watch events, 500 watches, 1000 leases, 256 MiB), each through its own \
                 shims, on an etcd of their own. The \
                 well-behaved tenant does {}, paced, first alone, then beside the \
                 aggressive tenant: {}. The ratio is p99 beside over p99 alone (a p99 alone \
                 under {FLOOR} ms counts as {FLOOR} ms). Errors are the well-behaved \
                 tenant's failed calls and calls slower than 5 s. The e2e test \
                 `e2e/tests/fairness.rs` asserts the bound on the same scene (on demand: \
                 it is timed, so CI skips it).\n",
                f.workload,
                f.aggressor,
                FLOOR = crate::fairness::FLOOR_MS
            );
            let _ = writeln!(
                s,
                "| well-behaved tenant | calls | p50 | p99 | ratio | errors |"
            );
            let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|");
            let _ = writeln!(
                s,
                "| alone | {} | {:.3} ms | {:.3} ms | | {} |",
                f.alone.ops, f.alone.p50_ms, f.alone.p99_ms, f.errors_alone
            );
            let _ = writeln!(
                s,
                "| beside the aggressor | {} | {:.3} ms | {:.3} ms | {:.2}x | {} |",
                f.beside.ops, f.beside.p50_ms, f.beside.p99_ms, f.ratio, f.errors
            );
            let _ = writeln!(
                s,
                "\nMeanwhile the aggressor completed {} puts ({} MiB), was refused {} calls \
                 with `too many requests`, and its watchers read {} messages.\n",
                f.aggressor_puts,
                f.aggressor_put_mib,
                f.aggressor_refused,
                f.aggressor_watch_messages
            );
        }

        let _ = writeln!(s, "## Settings\n");
        for (k, v) in &self.settings {
            let _ = writeln!(s, "- {k}: {v}");
        }
        s
    }

    /// What each hop costs on put, beside the floors: relays that do nothing else.
    fn hops(&self, s: &mut String) {
        let find = |name: &str| self.workloads.iter().find(|w| w.name == name);
        let (Some(c1), Some(c100)) = (find("put c1"), find("put c100")) else {
            return;
        };
        let Some(direct) = c1.get(DIRECT) else {
            return;
        };
        let _ = writeln!(s, "## What a hop costs\n");
        let _ = writeln!(
            s,
            "Put (256-byte values) through each endpoint, from the workloads below. The floors \
             are `etcd-shim-bench-relay` processes that only relay, on one thread each as \
             the shim and the broker run: a TCP relay copies bytes, an HTTP/2 relay \
             terminates HTTP/2 and sends each request on over one connection to etcd \
             without decoding it. etcd-shim today is two HTTP/2 hops (shim, broker), so its \
             floor is two HTTP/2 relays; a shim that relays bytes would make it a TCP and an \
             HTTP/2 hop. CPU and context switches are per request, of every process between \
             the client and etcd, client side first (`/proc/<pid>/task/*/schedstat` and \
             `status` over the whole run of the workload, warm-up included, divided by \
             every request it made).\n"
        );
        let _ = writeln!(
            s,
            "| endpoint | added p50, c1 | CPU per request, c1 | switches per request, c1 | ratio, c100 | CPU per request, c100 |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|");
        for name in FLOORS.iter().chain(&[PROXY, SHIM]) {
            let (Some(a), Some(b)) = (c1.get(name), c100.get(name)) else {
                continue;
            };
            let _ = writeln!(
                s,
                "| {} | {:+.3} ms | {} | {} | {:.2}x | {} |",
                name,
                a.median.p50_ms - direct.median.p50_ms,
                per_process(&a.median.cost[..a.processes], |c| c.cpu_us, "µs", 0),
                per_process(&a.median.cost[..a.processes], |c| c.switches, "", 1),
                b.ratio,
                per_process(&b.median.cost[..b.processes], |c| c.cpu_us, "µs", 0),
            );
        }
        let _ = writeln!(s);
    }

    /// etcd's own benchmark tool against the same endpoints, its ratios beside the Rust
    /// generator's.
    fn second_generator(&self, s: &mut String) {
        if self.go.is_empty() {
            return;
        }
        let _ = writeln!(s, "## A second load generator\n");
        let _ = writeln!(
            s,
            "etcd's own `benchmark` tool (`tools/benchmark`, built from the Go module proxy \
             by `scripts/etcd benchmark`, which names the release), run in the same rounds against the \
             same endpoints: put of 256-byte values over 1,000 keys, and linearizable Range \
             of one seeded key, with one client on one connection and 100 clients on 4. Its \
             ratio to direct etcd is set beside the Rust generator's for the workload of the \
             same name.\n"
        );
        let _ = writeln!(
            s,
            "With 100 clients the two are compared on ratios. With one client they are \
             compared on the time the endpoint adds to each request (1/throughput, less \
             direct etcd's), because a ratio there also depends on the generator's own time \
             per request. \"apart\" is how far the compared figures differ, relative to \
             the Rust one. The targets use the Rust generator's figures.\n"
        );
        let _ = writeln!(
            s,
            "On this 2-core machine the one-client figures of the two generators disagree \
             widely, and which one sees the larger added time changes from run to run: each \
             generator's own threads share the two cores with etcd and every hop, and at \
             one client a request waits for each process in its path to be scheduled, so \
             the time a hop adds depends on what else is runnable. At 100 clients, where \
             every process stays busy, the two agree far better.\n"
        );
        let _ = writeln!(
            s,
            "| workload | endpoint | ops/s (Go) | ratio (Go) | ratio (Rust) | added per request (Go) | added per request (Rust) | apart |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|");
        let ms = |v: Option<f64>| v.map(|v| format!("{v:.3} ms")).unwrap_or_default();
        for g in self.go.iter().filter(|g| g.endpoint != DIRECT) {
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {:.2}x | {:.2}x | {} | {} | {:.0}% |",
                g.workload,
                g.endpoint,
                g.ops_per_sec,
                g.ratio,
                g.rust_ratio,
                ms(g.added_ms),
                ms(g.rust_added_ms),
                g.disagreement() * 100.0
            );
        }
        let _ = writeln!(s);
    }

    /// A bar chart of throughput ratios: one row per workload, a bar per non-direct
    /// endpoint, a line at 1.0x (direct etcd).
    pub fn svg(&self) -> String {
        let (label_w, bar_w, row_h, top) = (300.0, 420.0, 36.0, 40.0);
        let max = self
            .workloads
            .iter()
            .flat_map(|w| w.endpoints.iter().map(|e| e.ratio))
            .fold(1.2f64, f64::max)
            .min(3.0);
        let x = |r: f64| label_w + bar_w * (r.min(max) / max);
        let height = top + row_h * self.workloads.len() as f64 + 30.0;
        let width = label_w + bar_w + 70.0;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(
            s,
            r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="18" font-size="14">Throughput relative to direct etcd (1.0x)</text>"#
        );
        let colors = [
            (PROXY, "#8c8c8c"),
            (SHIM, "#2b6cb0"),
            (TWO_H2_RELAYS, "#d69e2e"),
        ];
        for (i, (name, color)) in colors.iter().enumerate() {
            let lx = label_w + 140.0 * i as f64;
            let _ = writeln!(
                s,
                r#"<rect x="{lx}" y="24" width="10" height="10" fill="{color}"/><text x="{}" y="33">{name}</text>"#,
                lx + 14.0
            );
        }
        for (i, w) in self.workloads.iter().enumerate() {
            let y = top + row_h * i as f64;
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                label_w - 8.0,
                y + 15.0,
                xml(&w.name)
            );
            for (j, (name, color)) in colors.iter().enumerate() {
                let Some(e) = w.get(name) else { continue };
                let by = y + 3.0 + 10.0 * j as f64;
                let _ = writeln!(
                    s,
                    r#"<rect x="{label_w}" y="{by}" width="{:.1}" height="9" fill="{color}"/><text x="{:.1}" y="{}" font-size="10">{:.2}x</text>"#,
                    x(e.ratio) - label_w,
                    x(e.ratio) + 4.0,
                    by + 8.0,
                    e.ratio
                );
            }
        }
        let one = x(1.0);
        let _ = writeln!(
            s,
            r#"<line x1="{one:.1}" y1="{}" x2="{one:.1}" y2="{}" stroke="black" stroke-dasharray="4,3"/>"#,
            top - 4.0,
            height - 26.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{one:.1}" y="{}" text-anchor="middle">1.0x = direct etcd</text></svg>"#,
            height - 10.0
        );
        s
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
