//! Metrics and readiness as an operator sees them: after real traffic (successes by two
//! tenants, a denial, an auth failure, a config reload and a refused one) the counters
//! moved by the expected amounts, promtool finds nothing to complain about and every
//! metric is documented; /ready follows etcd and the token file.

use std::time::Duration;

use anyhow::Result;
use etcd_shim_e2e::{
    Pod, TwoTenants, http_get, pod::in_netns, promtool_check, replace_file, sample, wait_for,
};

fn shim_scrape(pod: &Pod, path: &'static str) -> Result<(u16, String)> {
    in_netns(&pod.name, move || http_get("127.0.0.1:9379", path))?
}

/// Tenant A is named by a rule (its own metrics label); B falls under `unlisted`.
const CONFIG: &str = "tenants:\n  - namespace: team-a\n    serviceAccount: app\n";

#[test]
fn metrics_count_real_traffic_and_pass_promtool() -> Result<()> {
    let env = TwoTenants::start_with_config(Some(CONFIG))?;
    let (a, b_pod) = (&env.a, &env.b);
    for i in 0..3 {
        a.etcdctl_ok(&["put", &format!("m{i}"), "v"])?;
    }
    a.etcdctl_ok(&["get", "m", "--prefix"])?;
    assert!(
        !a.etcdctl(&["defrag"])?.status.success(),
        "defrag must be refused"
    );
    for i in 0..2 {
        b_pod.etcdctl_ok(&["put", &format!("n{i}"), "v"])?;
    }

    // A pod whose token the broker does not know.
    let mut stranger = Pod::new()?;
    stranger.start_refused_shim(env.broker.port, "not-a-known-token")?;
    let refused = stranger.etcdctl(&["get", "x"])?;
    assert!(String::from_utf8_lossy(&refused.stderr).contains("etcdserver: invalid auth token"));

    let broker = env.broker.metrics()?;
    promtool_check(&broker)?;
    let b = |series: &str| sample(&broker, series).unwrap_or(0.0);
    assert_eq!(
        requests(&broker, "team-a/app", "Put", "OK"),
        3.0,
        "{broker}"
    );
    assert_eq!(
        requests(&broker, "team-a/app", "Range", "OK"),
        1.0,
        "{broker}"
    );
    assert_eq!(requests(&broker, "unlisted", "Put", "OK"), 2.0, "{broker}");
    assert_eq!(
        b(
            r#"etcd_broker_request_duration_seconds_count{tenant="unlisted",service="KV",method="Put"}"#
        ),
        2.0,
        "{broker}"
    );
    assert_eq!(
        b(r#"etcd_broker_policy_denials_total{reason="permission_denied"}"#),
        1.0,
        "{broker}"
    );
    assert_eq!(b("etcd_broker_foreign_keys_dropped_total"), 0.0, "{broker}");
    // Every put went to etcd, timed per backend (the broker's own calls may add more).
    assert!(
        b(r#"etcd_broker_upstream_request_duration_seconds_count{backend="default",method="Put"}"#)
            >= 5.0,
        "{broker}"
    );
    // Two HTTP/2 connections per shim (its calls, its readiness probe): A's, B's and the
    // stranger's.
    assert_eq!(b("etcd_broker_shim_connections_open"), 6.0, "{broker}");

    let (code, shim) = shim_scrape(a, "/metrics")?;
    assert_eq!(code, 200);
    promtool_check(&shim)?;
    let s = |series: &str| sample(&shim, series).unwrap_or(0.0);
    assert_eq!(
        s(r#"etcd_shim_requests_total{service="KV",method="Put",code="OK"}"#),
        3.0,
        "{shim}"
    );
    assert_eq!(
        s(
            r#"etcd_shim_requests_total{service="Maintenance",method="Defragment",code="PermissionDenied"}"#
        ),
        1.0,
        "{shim}"
    );
    assert!(
        s(r#"etcd_shim_request_duration_seconds_count{service="KV",method="Put"}"#) >= 3.0,
        "{shim}"
    );
    // clientv3 retries an invalid token (as it does against etcd with auth on), so the
    // refused calls number one or more; the broker counts each of them, with no tenant.
    let (_, stranger_metrics) = shim_scrape(&stranger, "/metrics")?;
    let refused = sample(
        &stranger_metrics,
        r#"etcd_shim_requests_total{service="KV",method="Range",code="Unauthenticated"}"#,
    )
    .unwrap_or(0.0);
    assert!(refused >= 1.0, "{stranger_metrics}");
    let broker = env.broker.metrics()?;
    // The stranger's readiness probes (Alarm GET) are refused and counted too.
    let probes = sample(
        &broker,
        r#"etcd_broker_requests_total{tenant="none",service="Maintenance",method="Alarm",code="Unauthenticated"}"#,
    )
    .unwrap_or(0.0);
    assert!(probes >= 1.0, "{broker}");
    assert_eq!(
        sample(&broker, "etcd_broker_auth_failures_total"),
        Some(refused + probes),
        "{broker}"
    );
    assert_eq!(
        sample(
            &broker,
            r#"etcd_broker_requests_total{tenant="none",service="KV",method="Range",code="Unauthenticated"}"#
        ),
        Some(refused),
        "{broker}"
    );

    // A reload: new limits for A show up as its limit series; then a broken file is
    // refused and counted, and the limits stay.
    let path = env.broker.config_path().expect("started with a config");
    let reloads = |outcome: &str| {
        env.broker.metrics().ok().map(|m| {
            sample(
                &m,
                &format!(r#"etcd_broker_config_reloads_total{{outcome="{outcome}"}}"#),
            )
            .unwrap_or(0.0)
        })
    };
    assert_eq!(reloads("success"), Some(0.0));
    replace_file(&path, &format!("{CONFIG}    limits: {{watches: 7}}\n"))?;
    wait_for("the config reload", Duration::from_secs(10), || {
        (reloads("success")? == 1.0).then_some(())
    })?;
    replace_file(&path, "tenants: [{namespace: team-a, backend: nowhere}]\n")?;
    wait_for(
        "the broken config to be refused",
        Duration::from_secs(10),
        || (reloads("failure")? == 1.0).then_some(()),
    )?;
    a.etcdctl_ok(&["put", "after-reload", "v"])?;
    let broker = env.broker.metrics()?;
    promtool_check(&broker)?;
    assert_eq!(
        sample(
            &broker,
            r#"etcd_broker_config_reloads_total{outcome="success"}"#
        ),
        Some(1.0),
        "{broker}"
    );
    assert_eq!(
        sample(
            &broker,
            r#"etcd_broker_tenant_limit{tenant="team-a/app",resource="watches"}"#
        ),
        Some(7.0),
        "{broker}"
    );
    assert_eq!(
        requests(&broker, "team-a/app", "Put", "OK"),
        4.0,
        "{broker}"
    );
    docs_name_every_family(&[&broker, &shim])?;

    // Logs (the broker runs at debug): one request line per call with tenant, method and
    // code; one audit line per denial; neither ever holds a key or a value.
    let log = env.broker.proc.log();
    let lines = |target: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains(target))
            .map(str::to_owned)
            .collect()
    };
    let requests_logged = lines("etcd_shim_broker::request");
    let audit = lines("etcd_shim_broker::audit");
    let puts_of_a = requests_logged
        .iter()
        .filter(|l| l.contains("team-a/app") && l.contains("Put") && l.contains("OK"))
        .count();
    assert_eq!(puts_of_a, 4, "{}", requests_logged.join("\n"));
    assert!(
        audit.iter().any(|l| l.contains("team-a/app")
            && l.contains("Defragment")
            && l.contains("permission_denied")),
        "{}",
        audit.join("\n")
    );
    for l in requests_logged.iter().chain(&audit) {
        assert!(
            !l.contains("m0") && !l.contains("after-reload"),
            "a key in a log line: {l}"
        );
    }
    Ok(())
}

/// `etcd_broker_requests_total` of one tenant, KV method and code.
fn requests(scrape: &str, tenant: &str, method: &str, code: &str) -> f64 {
    sample(
        scrape,
        &format!(r#"etcd_broker_requests_total{{tenant="{tenant}",service="KV",method="{method}",code="{code}"}}"#),
    )
    .unwrap_or(0.0)
}

/// Every metric family an operator scrapes is described in docs/observability.md.
fn docs_name_every_family(scrapes: &[&str]) -> Result<()> {
    let docs = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/observability.md"),
    )?;
    let missing: Vec<&str> = scrapes
        .iter()
        .flat_map(|s| s.lines())
        .filter_map(|l| l.strip_prefix("# HELP "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| !docs.contains(&format!("`{name}")))
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "not in docs/observability.md: {missing:?}"
    );
    Ok(())
}

#[test]
fn readiness_follows_etcd_and_the_token_file() -> Result<()> {
    let mut env = TwoTenants::start()?;
    let broker_ready = |port: u16| {
        http_get(&format!("127.0.0.1:{port}"), "/ready")
            .map(|(c, _)| c)
            .unwrap_or(0)
    };
    let port = env.broker.admin_port;
    assert_eq!(broker_ready(port), 200);
    // Liveness never depends on a remote.
    env.etcd.stop();
    wait_for(
        "broker not ready without etcd",
        Duration::from_secs(30),
        || (broker_ready(port) == 503).then_some(()),
    )?;
    assert_eq!(http_get(&format!("127.0.0.1:{port}"), "/live")?.0, 200);
    env.etcd.restart()?;
    wait_for("broker ready again", Duration::from_secs(30), || {
        (broker_ready(port) == 200).then_some(())
    })?;

    let a = &env.a;
    let token = std::fs::read_to_string(a.token_file())?;
    std::fs::remove_file(a.token_file())?;
    wait_for(
        "shim not ready without a token",
        Duration::from_secs(30),
        || {
            matches!(shim_scrape(a, "/ready"), Ok((503, ref body)) if body.contains("token"))
                .then_some(())
        },
    )?;
    assert_eq!(shim_scrape(a, "/live")?.0, 200);
    // As the kubelet writes a projected token: whole, by a rename. A plain write can
    // show the shim the empty file it starts with, which it counts as one more failed
    // reload than the one counted below.
    replace_file(&a.token_file(), &token)?;
    wait_for("shim ready again", Duration::from_secs(30), || {
        matches!(shim_scrape(a, "/ready"), Ok((200, _))).then_some(())
    })?;
    assert_eq!(a.etcdctl_ok(&["put", "after", "ok"])?.trim(), "OK");
    // The shim counted both changes of its token file.
    let (_, shim) = shim_scrape(a, "/metrics")?;
    for outcome in ["failure", "success"] {
        assert_eq!(
            sample(
                &shim,
                &format!(r#"etcd_shim_token_reloads_total{{outcome="{outcome}"}}"#)
            ),
            Some(1.0),
            "{shim}"
        );
    }
    Ok(())
}
