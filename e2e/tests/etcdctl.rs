//! The etcd data path through shim and broker with etcdctl (Go clientv3) as the client:
//! two tenants, each in its own pod, against a real etcd.

use std::time::Duration;

use anyhow::Result;
use etcd_shim_e2e::{PREFIX_A, PREFIX_B, TwoTenants, wait_for};

fn lines(s: &str) -> Vec<&str> {
    s.lines().collect()
}

#[test]
fn kv_put_get_delete_stay_inside_each_tenant() -> Result<()> {
    let env = TwoTenants::start()?;
    let a = &env.a;
    assert_eq!(a.etcdctl_ok(&["put", "k1", "v1"])?.trim(), "OK");
    a.etcdctl_ok(&["put", "k2", "v2"])?;
    a.etcdctl_ok(&["put", "other", "x"])?;
    assert_eq!(lines(&a.etcdctl_ok(&["get", "k1"])?), ["k1", "v1"]);
    assert_eq!(
        lines(&a.etcdctl_ok(&["get", "k", "--prefix"])?),
        ["k1", "v1", "k2", "v2"]
    );
    assert_eq!(
        lines(&a.etcdctl_ok(&["get", "k2", "--from-key", "--keys-only"])?)
            .into_iter()
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>(),
        ["k2", "other"]
    );
    let all = a.etcdctl_ok(&["get", "", "--prefix", "-w", "fields"])?;
    assert!(all.contains("\"Count\" : 3"), "{all}");

    // Tenant B sees none of it, and its own key of the same name is separate.
    let b = &env.b;
    assert_eq!(b.etcdctl_ok(&["get", "", "--prefix"])?, "");
    assert_eq!(b.etcdctl_ok(&["get", "", "--from-key"])?, "");
    b.etcdctl_ok(&["put", "k1", "b-value"])?;
    assert_eq!(lines(&a.etcdctl_ok(&["get", "k1"])?), ["k1", "v1"]);

    // Deletes are confined too.
    assert_eq!(a.etcdctl_ok(&["del", "k", "--prefix"])?.trim(), "2");
    assert_eq!(a.etcdctl_ok(&["del", "", "--from-key"])?.trim(), "1");
    assert_eq!(lines(&b.etcdctl_ok(&["get", "k1"])?), ["k1", "b-value"]);

    // The cluster admin's view: each tenant's keys live under its own prefix.
    let raw = env.etcd.etcdctl(&["get", "/", "--prefix", "--keys-only"])?;
    let raw = String::from_utf8(raw.stdout)?;
    let keys: Vec<&str> = raw.lines().filter(|l| !l.is_empty()).collect();
    assert!(keys.contains(&format!("{PREFIX_B}k1").as_str()), "{keys:?}");
    assert!(!keys.iter().any(|k| k.starts_with(PREFIX_A)), "{keys:?}");
    assert!(
        keys.iter().all(|k| k.starts_with("/etcd-shim/")),
        "{keys:?}"
    );
    Ok(())
}

#[test]
fn txn_compares_and_branches() -> Result<()> {
    let env = TwoTenants::start()?;
    let a = &env.a;
    a.etcdctl_ok(&["put", "counter", "1"])?;
    let txn = |compare: &str| -> Result<String> {
        let mut cmd = a.command(etcd_shim_e2e::etcd_tool("etcdctl"));
        cmd.args(["--endpoints", "http://127.0.0.1:2379", "txn"]);
        let script = format!("{compare}\n\nput counter 2\nput audit yes\n\nget counter\n\n");
        run_with_stdin(cmd, &script)
    };
    let out = txn("value(\"counter\") = \"1\"")?;
    assert_eq!(lines(&out), ["SUCCESS", "", "OK", "", "OK"]);
    let out = txn("value(\"counter\") = \"1\"")?;
    assert_eq!(lines(&out), ["FAILURE", "", "counter", "2"]);
    // The same compare from tenant B looks at B's own (missing) key.
    let out = {
        let mut cmd = env.b.command(etcd_shim_e2e::etcd_tool("etcdctl"));
        cmd.args(["--endpoints", "http://127.0.0.1:2379", "txn"]);
        run_with_stdin(cmd, "mod(\"counter\") > \"0\"\n\nput x 1\n\nput y 1\n\n")?
    };
    assert_eq!(lines(&out)[0], "FAILURE");
    assert_eq!(
        lines(&env.b.etcdctl_ok(&["get", "", "--prefix", "--keys-only"])?)[0],
        "y"
    );
    Ok(())
}

fn run_with_stdin(mut cmd: std::process::Command, input: &str) -> Result<String> {
    use std::io::Write;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

#[test]
fn watch_from_revision_with_prev_kv() -> Result<()> {
    let env = TwoTenants::start()?;
    let (a, b) = (&env.a, &env.b);
    a.etcdctl_ok(&["put", "w/1", "old"])?;
    let rev = revision(a)?;
    // Watch from the next revision: every write below is delivered however long the
    // watch takes to start.
    let mut watch = a.etcdctl_spawn(
        "watch",
        &[
            "watch",
            "w/",
            "--prefix",
            "--prev-kv",
            "--rev",
            &(rev + 1).to_string(),
        ],
    )?;
    a.etcdctl_ok(&["put", "w/1", "new"])?;
    b.etcdctl_ok(&["put", "w/1", "from-b"])?;
    a.etcdctl_ok(&["put", "w/2", "two"])?;
    a.etcdctl_ok(&["put", "elsewhere", "no"])?;
    a.etcdctl_ok(&["del", "w/1"])?;
    let expected = [
        "PUT", "w/1", "old", "w/1", "new", "PUT", "w/2", "two", "DELETE", "w/1", "new", "w/1",
    ];
    let out = wait_for("watch events", Duration::from_secs(20), || {
        let log = watch.log();
        (log.lines().count() >= expected.len()).then_some(log)
    })?;
    watch.stop();
    assert_eq!(lines(&out)[..expected.len()], expected, "{out}");
    assert!(
        !out.contains("from-b") && !out.contains("elsewhere"),
        "{out}"
    );
    Ok(())
}

fn revision(pod: &etcd_shim_e2e::Pod) -> Result<i64> {
    let out = pod.etcdctl_ok(&["get", "x", "-w", "fields"])?;
    let rev = out
        .lines()
        .find_map(|l| l.strip_prefix("\"Revision\" : "))
        .ok_or_else(|| anyhow::anyhow!("no revision in {out}"))?;
    Ok(rev.trim().parse()?)
}

#[test]
fn leases_grant_keep_alive_ttl_revoke() -> Result<()> {
    let env = TwoTenants::start()?;
    let a = &env.a;
    let out = a.etcdctl_ok(&["lease", "grant", "60"])?;
    // "lease 694d... granted with TTL(60s)"
    let id = out.split_whitespace().nth(1).expect("lease id").to_owned();
    a.etcdctl_ok(&["put", "leased", "v", "--lease", &id])?;
    let ttl = a.etcdctl_ok(&["lease", "timetolive", &id, "--keys"])?;
    assert!(ttl.contains("attached keys([leased])"), "{ttl}");
    let ka = a.etcdctl_ok(&["lease", "keep-alive", "--once", &id])?;
    assert!(
        ka.contains(&format!("lease {id} keepalived with TTL(")),
        "{ka}"
    );
    let list = a.etcdctl_ok(&["lease", "list"])?;
    assert!(list.contains(&id), "{list}");
    // Tenant B can neither see nor use A's lease.
    assert!(!env.b.etcdctl_ok(&["lease", "list"])?.contains(&id));
    let bput = env.b.etcdctl(&["put", "x", "v", "--lease", &id])?;
    assert!(String::from_utf8_lossy(&bput.stderr).contains("requested lease not found"));
    assert_eq!(
        a.etcdctl_ok(&["lease", "revoke", &id])?.trim(),
        format!("lease {id} revoked")
    );
    assert_eq!(a.etcdctl_ok(&["get", "leased"])?, "");
    let gone = a.etcdctl_ok(&["lease", "timetolive", &id])?;
    assert!(gone.contains("already expired"), "{gone}");
    Ok(())
}

#[test]
fn lock_and_elect_across_two_processes() -> Result<()> {
    let env = TwoTenants::start()?;
    let a = &env.a;
    let mut holder = a.etcdctl_spawn("lock-holder", &["lock", "mylock"])?;
    // The holder prints its lock key once it holds the lock.
    wait_for("first lock holder", Duration::from_secs(20), || {
        holder.log().contains("mylock/").then_some(())
    })?;
    let mut waiter =
        a.etcdctl_spawn("lock-waiter", &["lock", "mylock", "echo", "second-got-it"])?;
    // Tenant B's lock of the same name is a different lock: it is granted at once.
    let b_lock = env.b.etcdctl_ok(&["lock", "mylock", "echo", "b-got-it"])?;
    assert!(b_lock.contains("b-got-it"));
    assert!(
        waiter.is_running() && !waiter.log().contains("second-got-it"),
        "lock was not exclusive"
    );
    holder.stop();
    wait_for("second lock holder", Duration::from_secs(20), || {
        waiter.log().contains("second-got-it").then_some(())
    })?;

    let mut leader = a.etcdctl_spawn("leader", &["elect", "myelection", "p1"])?;
    wait_for("first leader", Duration::from_secs(20), || {
        leader.log().contains("p1").then_some(())
    })?;
    let mut observer = a.etcdctl_spawn("observer", &["elect", "-l", "myelection"])?;
    wait_for("observer sees p1", Duration::from_secs(20), || {
        observer.log().contains("p1").then_some(())
    })?;
    let mut second = a.etcdctl_spawn("candidate", &["elect", "myelection", "p2"])?;
    leader.stop();
    wait_for("p2 elected", Duration::from_secs(20), || {
        second.log().contains("p2").then_some(())
    })?;
    wait_for("observer sees p2", Duration::from_secs(20), || {
        observer.log().contains("p2").then_some(())
    })?;
    // The election's keys are the tenant's own.
    let raw = String::from_utf8(
        env.etcd
            .etcdctl(&["get", PREFIX_A, "--prefix", "--keys-only"])?
            .stdout,
    )?;
    assert!(raw.contains(&format!("{PREFIX_A}myelection/")), "{raw}");
    second.stop();
    observer.stop();
    Ok(())
}

#[test]
fn endpoint_health_status_and_members() -> Result<()> {
    let env = TwoTenants::start()?;
    let a = &env.a;
    let health = a.etcdctl(&["endpoint", "health"])?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&health.stdout),
        String::from_utf8_lossy(&health.stderr)
    );
    assert!(
        health.status.success() && text.contains("is healthy"),
        "{text}"
    );
    let status = a.etcdctl_ok(&["endpoint", "status", "-w", "fields"])?;
    let real = String::from_utf8(
        env.etcd
            .etcdctl(&["endpoint", "status", "-w", "fields"])?
            .stdout,
    )?;
    let field = |s: &str, name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(&format!("\"{name}\" : ")))
            .map(|v| v.trim().to_owned())
    };
    assert_eq!(
        field(&status, "Version"),
        field(&real, "Version"),
        "real backend version"
    );
    assert_ne!(
        field(&status, "MemberID"),
        field(&real, "MemberID"),
        "member id is synthetic"
    );
    assert_ne!(
        field(&status, "ClusterID"),
        field(&real, "ClusterID"),
        "cluster id is synthetic"
    );
    assert_eq!(field(&status, "DBSize"), Some("0".into()));
    let members = a.etcdctl_ok(&["member", "list"])?;
    assert_eq!(lines(&members).len(), 1, "{members}");
    assert!(members.contains("http://127.0.0.1:2379"), "{members}");
    Ok(())
}

/// Debian's etcdctl 3.4, the one place the tests still use 3.4: it sends a URL-shaped
/// `:authority` (`http://127.0.0.1:2379`) that the shim repairs before the broker sees
/// it, and supported etcd releases (3.5 and later) no longer have a client that does.
#[test]
fn etcdctl_3_4_works_through_the_shim() -> Result<()> {
    const ETCDCTL_3_4: &str = "/usr/bin/etcdctl";
    let env = TwoTenants::start()?;
    let run = |args: &[&str]| -> Result<String> {
        let mut cmd = env.a.command(ETCDCTL_3_4);
        cmd.env("ETCDCTL_API", "3")
            .args(["--endpoints", "http://127.0.0.1:2379"])
            .args(args);
        let out = etcd_shim_e2e::run_bounded(cmd, Duration::from_secs(30))?;
        anyhow::ensure!(
            out.status.success(),
            "etcdctl 3.4 {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    };
    assert!(run(&["version"])?.contains("etcdctl version: 3.4"));
    run(&["put", "old-client", "yes"])?;
    assert_eq!(
        lines(&run(&["get", "old-client", "--print-value-only"])?),
        ["yes"]
    );
    // Maintenance calls are the ones whose authority needed repair.
    assert!(run(&["endpoint", "status"])?.contains("127.0.0.1:2379"));
    Ok(())
}

/// `etcdctl check perf` mixes leases, puts and ranges over a prefix of its own, then
/// deletes it; with the smallest load it runs to its end through the shim, as against
/// etcd. Its verdict on latency is this machine's speed, not the shim's semantics, so the
/// test asks that the whole load ran (every criterion was measured) and nothing failed.
#[test]
fn check_perf_runs_through_the_shim() -> Result<()> {
    let env = TwoTenants::start()?;
    let mut cmd = env.a.command(etcd_shim_e2e::etcd_tool("etcdctl"));
    cmd.args([
        "--endpoints",
        "http://127.0.0.1:2379",
        "check",
        "perf",
        "--load",
        "s",
    ]);
    let out = etcd_shim_e2e::run_bounded(cmd, Duration::from_secs(150))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Each criterion is reported as passed or failed, in etcdctl's words either way.
    for (pass, fail) in [
        ("PASS: Throughput is", "FAIL: Throughput too low"),
        (
            "PASS: Slowest request took",
            "Slowest request took too long",
        ),
        ("PASS: Stddev is", "Stddev too high"),
    ] {
        assert!(
            text.contains(pass) || text.contains(fail),
            "etcdctl check perf did not measure {pass:?}: {text}"
        );
    }
    for failed in ["Error", "ERROR", "too many errors", "etcdserver:"] {
        assert!(!text.contains(failed), "etcdctl check perf: {text}");
    }
    // It cleans up after itself, as on etcd.
    assert!(
        env.a
            .etcdctl_ok(&["get", "", "--prefix", "--keys-only"])?
            .trim()
            .is_empty()
    );
    Ok(())
}
