//! etcd-shim-bench: measures etcd-shim against direct etcd and etcd's grpc-proxy on the
//! same machine in one run, plus the sidecar's memory, the broker's cost per shim and the
//! injector's admission latency, and writes BENCHMARKS.md.

mod fairness;
mod gobench;
mod injector;
mod load;
mod report;
mod scale;
mod stack;
mod stats;
mod usage;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use etcd_shim_core::parse_duration;

use crate::injector::Injector;
use crate::report::{Machine, MemoryRow, Report, Target, WorkloadResult};
use crate::stack::{DIRECT, SHIM, Stack};
use crate::stats::{Cost, Sample};

#[derive(Debug, Parser)]
#[command(name = "etcd-shim-bench", version, about)]
struct Args {
    /// Rounds: each workload runs once per endpoint per round; figures are medians.
    #[arg(long, env = "ETCD_SHIM_BENCH_ROUNDS", default_value_t = 3)]
    rounds: usize,
    /// Measured time of one workload against one endpoint in one round.
    #[arg(long, env = "ETCD_SHIM_BENCH_DURATION", default_value = "1500ms", value_parser = parse_duration)]
    duration: Duration,
    /// Unmeasured time before each measurement.
    #[arg(long, env = "ETCD_SHIM_BENCH_WARMUP", default_value = "300ms", value_parser = parse_duration)]
    warmup: Duration,
    /// Client connections (HTTP/2) per endpoint; concurrent tasks share them round-robin.
    #[arg(long, env = "ETCD_SHIM_BENCH_CONNECTIONS", default_value_t = 4)]
    connections: usize,
    /// Watch streams in the fan-out workload.
    #[arg(long, env = "ETCD_SHIM_BENCH_WATCHERS", default_value_t = 1000)]
    watchers: usize,
    /// Puts per second into the watched key.
    #[arg(long, env = "ETCD_SHIM_BENCH_WATCH_RATE", default_value_t = 20)]
    watch_rate: u32,
    /// How long the fan-out writer runs.
    #[arg(long, env = "ETCD_SHIM_BENCH_WATCH_DURATION", default_value = "3s", value_parser = parse_duration)]
    watch_duration: Duration,
    /// Wait after the workloads before reading memory "after".
    #[arg(long, env = "ETCD_SHIM_BENCH_AFTER", default_value = "60s", value_parser = parse_duration)]
    after: Duration,
    /// Shim counts for the broker scale test, comma-separated; 0 skips it.
    #[arg(
        long,
        env = "ETCD_SHIM_BENCH_SCALE",
        value_delimiter = ',',
        default_value = "100,500,1000"
    )]
    scale: Vec<usize>,
    /// How often each simulated shim writes its key in the scale test.
    #[arg(long, env = "ETCD_SHIM_BENCH_SCALE_TRICKLE", default_value = "5s", value_parser = parse_duration)]
    scale_trickle: Duration,
    /// Measuring window of each scale row.
    #[arg(long, env = "ETCD_SHIM_BENCH_SCALE_WINDOW", default_value = "15s", value_parser = parse_duration)]
    scale_window: Duration,
    /// Admission reviews per second sent to the injector (open loop); 0 skips it.
    #[arg(long, env = "ETCD_SHIM_BENCH_INJECTOR_RATE", default_value_t = 200)]
    injector_rate: u32,
    /// How long the injector is sent reviews.
    #[arg(long, env = "ETCD_SHIM_BENCH_INJECTOR_DURATION", default_value = "10s", value_parser = parse_duration)]
    injector_duration: Duration,
    /// How long the well-behaved tenant is measured in the fairness scene, alone and
    /// again beside the aggressive tenant; 0 skips it.
    #[arg(long, env = "ETCD_SHIM_BENCH_FAIRNESS_DURATION", default_value = "15s", value_parser = parse_duration)]
    fairness_duration: Duration,
    /// Slow watch streams the aggressive tenant holds in the fairness scene.
    #[arg(long, env = "ETCD_SHIM_BENCH_FAIRNESS_WATCHERS", default_value_t = 100)]
    fairness_watchers: usize,
    /// A smoke run: one short round of everything, a few watchers and shims, no wait.
    /// Overrides the sizes above.
    #[arg(long, env = "ETCD_SHIM_BENCH_QUICK")]
    quick: bool,
    /// etcd's own load generator (`tools/benchmark`, scripts/etcd builds it), run as a
    /// second generator beside the Rust one; without it, only the Rust one runs.
    #[arg(long, env = "ETCD_SHIM_BENCH_GO_BENCHMARK")]
    go_benchmark: Option<PathBuf>,
    /// Where to write the report (Markdown); the chart goes beside it as `<name>.svg`.
    #[arg(long, env = "ETCD_SHIM_BENCH_OUT", default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// Also write the results as JSON here.
    #[arg(long, env = "ETCD_SHIM_BENCH_JSON")]
    json: Option<PathBuf>,
    /// The command line to print in the report (scripts/bench passes its own).
    #[arg(long, env = "ETCD_SHIM_BENCH_COMMAND")]
    command: Option<String>,
}

impl Args {
    fn quick(mut self) -> Self {
        if self.quick {
            self.rounds = 1;
            self.duration = Duration::from_millis(200);
            self.warmup = Duration::from_millis(50);
            self.watchers = 20;
            self.watch_rate = 20;
            self.watch_duration = Duration::from_millis(500);
            self.after = Duration::ZERO;
            self.scale = vec![10];
            self.scale_trickle = Duration::from_millis(500);
            self.scale_window = Duration::from_secs(1);
            self.injector_duration = Duration::from_secs(1);
            if !self.fairness_duration.is_zero() {
                self.fairness_duration = Duration::from_secs(1);
            }
            self.fairness_watchers = 10;
        }
        self
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse().quick();
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    let command = args.command.clone().unwrap_or_else(|| {
        std::env::args()
            .map(|a| if a.contains(' ') { format!("'{a}'") } else { a })
            .collect::<Vec<_>>()
            .join(" ")
    });
    let date = capture("date", &["-u", "+%Y-%m-%d %H:%M UTC"])?;
    eprintln!("starting etcd, grpc-proxy, broker and shim...");
    let mut stack = Stack::start()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut report = rt.block_on(measure(&args, &mut stack))?;
    report.date = date;
    report.command = command;
    report.machine = machine()?;

    let chart = args.out.with_extension("svg");
    let chart_name = chart
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let notes = if args.quick {
        "**Smoke run (`--quick`): one tiny round; these figures are not benchmarks.**"
    } else {
        ""
    };
    std::fs::write(&args.out, report.markdown(&chart_name, notes))
        .with_context(|| format!("writing {}", args.out.display()))?;
    std::fs::write(&chart, report.svg())?;
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
    }
    eprintln!("wrote {} and {}", args.out.display(), chart.display());
    Ok(())
}

/// Largest RSS seen per (process, workload), fed by a sampler while workloads run.
#[derive(Default)]
struct Peaks {
    current: String,
    max: HashMap<(&'static str, String), u64>,
}

async fn measure(args: &Args, stack: &mut Stack) -> Result<Report> {
    let watched: Vec<(&'static str, u32)> = vec![
        ("etcd-shim (sidecar)", stack.shim.pid()),
        ("broker", stack.broker.proc.pid()),
        ("etcd grpc-proxy", stack.proxy.pid()),
    ];
    // Idle: the processes have started and answered their readiness checks only.
    let idle: HashMap<&str, u64> = watched
        .iter()
        .map(|(n, pid)| Ok((*n, usage::rss(*pid)?.now_kib)))
        .collect::<Result<_>>()?;

    let endpoints = stack.endpoints();
    let mut clients = Vec::new();
    for e in &endpoints {
        let c = load::connect(&e.url, args.connections).await?;
        eprintln!("seeding keys through {}...", e.name);
        load::seed(&c).await?;
        clients.push(c);
    }

    let peaks = Arc::new(Mutex::new(Peaks::default()));
    let sampler = {
        let peaks = peaks.clone();
        let watched = watched.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tick.tick().await;
                let mut p = peaks.lock().expect("peaks lock");
                let label = p.current.clone();
                for (name, pid) in &watched {
                    if let Ok(r) = usage::rss(*pid) {
                        let m = p.max.entry((*name, label.clone())).or_default();
                        *m = (*m).max(r.now_kib);
                    }
                }
            }
        })
    };

    let workloads = load::workloads();
    let fanout = format!("watch fan-out, {} watchers", args.watchers);
    // results[workload][endpoint] = one sample per round
    let mut results: Vec<Vec<Vec<Sample>>> =
        vec![vec![Vec::new(); endpoints.len()]; workloads.len() + 1];
    let mut go_workloads = gobench::workloads();
    if args.quick {
        go_workloads.iter_mut().for_each(|w| w.total /= 20);
    }
    let mut go_rounds: Vec<Vec<Vec<f64>>> =
        vec![vec![Vec::new(); endpoints.len()]; go_workloads.len()];
    for round in 0..args.rounds {
        for (wi, w) in workloads.iter().enumerate() {
            // Rotate who goes first, so no endpoint always runs right after another's load.
            for k in 0..endpoints.len() {
                let ei = (k + round + wi) % endpoints.len();
                peaks.lock().expect("peaks lock").current = w.name.to_owned();
                let e = &endpoints[ei];
                let s = load::run(*w, &clients[ei], &e.serving, args.warmup, args.duration)
                    .await
                    .with_context(|| format!("{} against {}", w.name, e.name))?;
                eprintln!(
                    "round {}/{} {:<40} {:<26} {:>9.0} ops/s  p50 {:.3} ms  p99 {:.3} ms  {:.0} us CPU/op",
                    round + 1,
                    args.rounds,
                    w.name,
                    e.name,
                    s.ops_per_sec,
                    s.p50_ms,
                    s.p99_ms,
                    Cost::total(&s.cost).cpu_us
                );
                results[wi][ei].push(s);
            }
            stack.check_alive()?;
        }
        for k in 0..endpoints.len() {
            let ei = (k + round) % endpoints.len();
            peaks.lock().expect("peaks lock").current = fanout.clone();
            let s = load::watch_fanout(
                &clients[ei],
                args.watchers,
                args.watch_rate,
                args.watch_duration,
            )
            .await
            .with_context(|| format!("{fanout} against {}", endpoints[ei].name))?;
            eprintln!(
                "round {}/{} {:<40} {:<26} {:>9.0} events/s  p50 {:.3} ms  p99 {:.3} ms",
                round + 1,
                args.rounds,
                fanout,
                endpoints[ei].name,
                s.ops_per_sec,
                s.p50_ms,
                s.p99_ms
            );
            results[workloads.len()][ei].push(s);
        }
        stack.check_alive()?;
        if let Some(tool) = &args.go_benchmark {
            let tool = tool.to_string_lossy();
            for (gi, w) in go_workloads.iter().enumerate() {
                for k in 0..endpoints.len() {
                    let ei = (k + round + gi) % endpoints.len();
                    let e = &endpoints[ei];
                    let addr = e.url.trim_start_matches("http://");
                    let ops = tokio::task::block_in_place(|| gobench::run(&tool, w, addr))
                        .with_context(|| format!("etcd benchmark {} against {}", w.name, e.name))?;
                    eprintln!(
                        "round {}/{} {:<40} {:<26} {:>9.0} ops/s  (etcd's benchmark tool)",
                        round + 1,
                        args.rounds,
                        w.name,
                        e.name,
                        ops
                    );
                    go_rounds[gi][ei].push(ops);
                }
            }
            stack.check_alive()?;
        }
    }
    sampler.abort();
    drop(clients);

    let hwm: HashMap<&str, u64> = watched
        .iter()
        .map(|(n, pid)| Ok((*n, usage::rss(*pid)?.peak_kib)))
        .collect::<Result<_>>()?;
    if !args.after.is_zero() {
        eprintln!("waiting {:?} before reading memory again...", args.after);
        tokio::time::sleep(args.after).await;
    }
    let peaks = std::mem::take(&mut *peaks.lock().expect("peaks lock"));
    let mut memory = Vec::new();
    for (name, pid) in &watched {
        let (label, load_kib) = peaks
            .max
            .iter()
            .filter(|((n, l), _)| n == name && !l.is_empty())
            .max_by_key(|(_, v)| **v)
            .map(|((_, l), v)| (l.clone(), *v))
            .unwrap_or_default();
        memory.push(MemoryRow {
            process: (*name).to_owned(),
            idle_kib: idle[name],
            load_kib,
            load_workload: label,
            hwm_kib: hwm[name],
            after_kib: usage::rss(*pid)?.now_kib,
        });
    }
    stack.check_alive()?;

    let mut workload_results = Vec::new();
    for (wi, per_endpoint) in results.into_iter().enumerate() {
        let (name, concurrency) = match workloads.get(wi) {
            Some(w) => (w.name.to_owned(), w.concurrency),
            None => (fanout.clone(), args.watchers),
        };
        let per: Vec<(&str, usize, Vec<Sample>)> = endpoints
            .iter()
            .zip(per_endpoint)
            .map(|(e, rounds)| (e.name, e.serving.len(), rounds))
            .collect();
        workload_results.push(WorkloadResult::new(&name, concurrency, per));
    }
    let names: Vec<&str> = endpoints.iter().map(|e| e.name).collect();
    let direct = names.iter().position(|n| *n == DIRECT).unwrap_or(0);
    let mut go = Vec::new();
    if args.go_benchmark.is_some() {
        for (w, rounds) in go_workloads.iter().zip(go_rounds) {
            let same = workload_results.iter().find(|r| r.name == w.name);
            let ratio = |e: &str| same.and_then(|r| r.get(e)).map_or(0.0, |r| r.ratio);
            let ops = |e: &str| {
                same.and_then(|r| r.get(e))
                    .map_or(0.0, |r| r.median.ops_per_sec)
            };
            let rust = gobench::Rust {
                ratio: &ratio,
                ops_per_sec: &ops,
            };
            go.extend(gobench::results(w, &names, rounds, direct, rust));
        }
    }

    let mut scale = Vec::new();
    for &n in args.scale.iter().filter(|&&n| n > 0) {
        eprintln!("broker scale: {n} shims...");
        let r = scale::run(&stack.etcd.url, n, args.scale_trickle, args.scale_window)
            .await
            .with_context(|| format!("broker scale with {n} shims"))?;
        eprintln!(
            "broker scale: {n} shims: RSS {} KiB ({:.1} KiB/shim), {:.2} millicores/shim, watch p99 {:.2} ms",
            r.broker_rss_kib, r.rss_per_shim_kib, r.cpu_millicores_per_shim, r.watch_p99_ms
        );
        scale.push(r);
    }

    let injector = if args.injector_rate > 0 {
        eprintln!(
            "injector: {} reviews/s for {:?}...",
            args.injector_rate, args.injector_duration
        );
        let mut inj = tokio::task::block_in_place(Injector::start)?;
        let r = injector::run(&mut inj, args.injector_rate, args.injector_duration)
            .await
            .context("injector admission latency")?;
        eprintln!(
            "injector: {:.0} reviews/s  p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms  errors {}  sender lag max {:.3} ms",
            r.achieved_per_sec, r.p50_ms, r.p99_ms, r.max_ms, r.errors, r.lag_max_ms
        );
        Some(r)
    } else {
        None
    };

    // Last: the aggressor loads the machine, and its own etcd, long after it stops.
    let fairness = if args.fairness_duration.is_zero() {
        None
    } else {
        eprintln!(
            "fairness: a well-behaved tenant for {:?} alone, then beside an aggressive one...",
            args.fairness_duration
        );
        let r = fairness::run(args.fairness_duration, args.fairness_watchers)
            .await
            .context("fairness scene")?;
        eprintln!(
            "fairness: alone p50 {:.3} ms p99 {:.3} ms; beside p50 {:.3} ms p99 {:.3} ms; ratio {:.2}x; errors {}; aggressor {} puts ({} MiB), {} refused",
            r.alone.p50_ms,
            r.alone.p99_ms,
            r.beside.p50_ms,
            r.beside.p99_ms,
            r.ratio,
            r.errors,
            r.aggressor_puts,
            r.aggressor_put_mib,
            r.aggressor_refused
        );
        Some(r)
    };

    let shim_binary_bytes = std::fs::metadata(etcd_shim_e2e::bin("etcd-shim"))?.len();
    let mut targets = targets(&workload_results, &memory, &scale, &fanout);
    let apart = go
        .iter()
        .filter(|g| g.endpoint != DIRECT)
        .max_by(|a, b| a.disagreement().total_cmp(&b.disagreement()));
    targets.push(Target {
        what: "Rust and Go load generators agree".into(),
        wanted: "within 10%: on ratios at 100 clients, on added time per request at 1".into(),
        measured: apart
            .map(|g| {
                format!(
                    "at most {:.0}% apart ({}, {})",
                    g.disagreement() * 100.0,
                    g.endpoint,
                    g.workload
                )
            })
            .unwrap_or_default(),
        met: apart.map(|g| g.disagreement() <= 0.10),
    });
    targets.push(Target {
        what: "fairness: well-behaved p99 beside an aggressive tenant".into(),
        wanted: "<= 2x alone, no errors".into(),
        measured: fairness
            .as_ref()
            .map(|f| format!("{:.2}x, {} errors", f.ratio, f.errors_alone + f.errors))
            .unwrap_or_default(),
        met: fairness
            .as_ref()
            .map(|f| f.ratio <= 2.0 && f.errors_alone + f.errors == 0),
    });
    let settings = vec![
        ("rounds".into(), args.rounds.to_string()),
        (
            "measured time per workload, endpoint and round".into(),
            format!("{:?} after {:?} warm-up", args.duration, args.warmup),
        ),
        (
            "client connections per endpoint".into(),
            args.connections.to_string(),
        ),
        (
            "watch fan-out".into(),
            format!(
                "{} watchers on one key, {} puts/s for {:?}",
                args.watchers, args.watch_rate, args.watch_duration
            ),
        ),
        ("memory \"after\" wait".into(), format!("{:?}", args.after)),
        (
            "broker scale".into(),
            format!(
                "{:?} shims, one write per shim every {:?}, measured over {:?}",
                args.scale, args.scale_trickle, args.scale_window
            ),
        ),
        (
            "injector".into(),
            if args.injector_rate > 0 {
                format!(
                    "{} admission reviews/s for {:?} over {} HTTP/2 connections",
                    args.injector_rate,
                    args.injector_duration,
                    injector::CONNECTIONS
                )
            } else {
                "skipped".into()
            },
        ),
        (
            "fairness".into(),
            if args.fairness_duration.is_zero() {
                "skipped".into()
            } else {
                format!(
                    "{:?} alone and {:?} beside the aggressor, {} slow watchers",
                    args.fairness_duration, args.fairness_duration, args.fairness_watchers
                )
            },
        ),
        (
            "values".into(),
            "256 bytes; reads over 1,000 seeded keys".into(),
        ),
    ];
    Ok(Report {
        date: String::new(),
        command: String::new(),
        machine: Machine {
            nproc: 0,
            memory: String::new(),
            cpu: String::new(),
            kernel: String::new(),
            etcd: String::new(),
        },
        settings,
        workloads: workload_results,
        memory,
        shim_binary_bytes,
        scale,
        injector,
        fairness,
        go,
        targets,
    })
}

/// The targets of the request-cost work: same-run ratios and added latency against
/// direct etcd, CPU per request of shim and broker together, and memory.
fn targets(
    workloads: &[WorkloadResult],
    memory: &[MemoryRow],
    scale: &[ScaleResult],
    fanout: &str,
) -> Vec<Target> {
    let mut t = Vec::new();
    let find = |name: &str| workloads.iter().find(|w| w.name == name);
    let shim = |name: &str| find(name).and_then(|w| Some((w.get(DIRECT)?, w.get(SHIM)?)));
    let at_most = |what: String, want: f64, unit: &str, got: Option<f64>| {
        let decimals = match unit {
            "ms" => 3,
            "MiB" => 1,
            _ => 0,
        };
        Target {
            what,
            wanted: format!("<= {want} {unit}"),
            measured: got
                .map(|g| format!("{g:.decimals$} {unit}"))
                .unwrap_or_default(),
            met: got.map(|g| g <= want),
        }
    };
    let c1 = [
        "put c1",
        "range one key, linearizable, c1",
        "range random key, linearizable, c1",
        "txn create/update c1",
    ];
    for name in c1 {
        let added = shim(name).map(|(d, s)| s.median.p50_ms - d.median.p50_ms);
        t.push(at_most(
            format!("{name}: added p50 latency (both hops)"),
            0.12,
            "ms",
            added,
        ));
    }
    for name in c1 {
        let cpu = shim(name).map(|(_, s)| Cost::total(&s.median.cost).cpu_us);
        t.push(at_most(
            format!("{name}: CPU per request, shim + broker"),
            150.0,
            "µs",
            cpu,
        ));
    }
    for (name, want) in [
        ("put c100", 0.80),
        ("range one key, linearizable, c100", 0.85),
        ("range random key, linearizable, c100", 0.85),
        (fanout, 0.97),
    ] {
        let ratio = shim(name).map(|(_, s)| s.ratio);
        t.push(Target {
            what: format!("{name}: throughput"),
            wanted: format!(">= {want:.2}x direct"),
            measured: ratio.map(|r| format!("{r:.2}x")).unwrap_or_default(),
            met: ratio.map(|r| r >= want),
        });
    }
    for name in ["put c100", "range one key, linearizable, c100"] {
        let cpu = shim(name).map(|(_, s)| Cost::total(&s.median.cost).cpu_us);
        t.push(at_most(
            format!("{name}: CPU per request, shim + broker"),
            40.0,
            "µs",
            cpu,
        ));
    }
    let added = shim(fanout).map(|(d, s)| s.median.p50_ms - d.median.p50_ms);
    t.push(at_most(
        format!("{fanout}: added delivery p50"),
        1.0,
        "ms",
        added,
    ));
    if let Some(m) = memory.iter().find(|m| m.process.starts_with("etcd-shim")) {
        let mib = |kib: u64| Some(kib as f64 / 1024.0);
        t.push(at_most(
            "shim RSS, idle".into(),
            4.0,
            "MiB",
            mib(m.idle_kib),
        ));
        t.push(at_most(
            "shim RSS, under the heaviest load (VmHWM)".into(),
            8.0,
            "MiB",
            mib(m.hwm_kib),
        ));
    }
    let at_1000 = scale.iter().find(|s| s.shims == 1000);
    t.push(at_most(
        "broker RSS with 1,000 shims".into(),
        100.0,
        "MiB",
        at_1000.map(|s| s.broker_rss_kib as f64 / 1024.0),
    ));
    t
}

use crate::scale::ScaleResult;

/// Output of a short command, trimmed.
fn capture(cmd: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Result<String> {
    let cmd = cmd.as_ref();
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {}", cmd.to_string_lossy()))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn machine() -> Result<Machine> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| format!("{:.1} GiB", kib as f64 / (1024.0 * 1024.0)))
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let etcd = capture(etcd_shim_e2e::etcd_tool("etcd"), &["--version"])?
        .lines()
        .next()
        .unwrap_or("etcd (unknown version)")
        .to_owned();
    Ok(Machine {
        nproc: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        memory,
        cpu,
        kernel,
        etcd,
    })
}
