//! Metrics and readiness as an operator sees them: after real traffic (successes, a
//! denial, an auth failure) the counters moved by the expected amounts and promtool finds
//! nothing to complain about; /ready follows etcd and the token file.

use std::time::Duration;

use anyhow::Result;
use etcd_shim_e2e::{Pod, TwoTenants, http_get, pod::in_netns, promtool_check, sample, wait_for};

fn shim_scrape(pod: &Pod, path: &'static str) -> Result<(u16, String)> {
    in_netns(&pod.name, move || http_get("127.0.0.1:9379", path))?
}

#[test]
fn metrics_count_real_traffic_and_pass_promtool() -> Result<()> {
    let env = TwoTenants::start()?;
    let a = &env.a;
    for i in 0..3 {
        a.etcdctl_ok(&["put", &format!("m{i}"), "v"])?;
    }
    a.etcdctl_ok(&["get", "m", "--prefix"])?;
    assert!(
        !a.etcdctl(&["defrag"])?.status.success(),
        "defrag must be refused"
    );

    // A pod whose token the broker does not know.
    let mut stranger = Pod::new()?;
    stranger.start_shim(env.broker.port, "not-a-known-token")?;
    let refused = stranger.etcdctl(&["get", "x"])?;
    assert!(String::from_utf8_lossy(&refused.stderr).contains("etcdserver: invalid auth token"));

    let broker = env.broker.metrics()?;
    promtool_check(&broker)?;
    let b = |series: &str| sample(&broker, series).unwrap_or(0.0);
    assert_eq!(
        b(r#"etcd_broker_requests_total{service="KV",method="Put",code="OK"}"#),
        3.0,
        "{broker}"
    );
    assert_eq!(
        b(r#"etcd_broker_requests_total{service="KV",method="Range",code="OK"}"#),
        1.0,
        "{broker}"
    );
    assert_eq!(
        b(r#"etcd_broker_policy_denials_total{reason="permission_denied"}"#),
        1.0,
        "{broker}"
    );
    assert_eq!(b("etcd_broker_foreign_keys_dropped_total"), 0.0, "{broker}");

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
    // refused calls number one or more; the broker counts each of them.
    let (_, stranger_metrics) = shim_scrape(&stranger, "/metrics")?;
    let refused = sample(
        &stranger_metrics,
        r#"etcd_shim_requests_total{service="KV",method="Range",code="Unauthenticated"}"#,
    )
    .unwrap_or(0.0);
    assert!(refused >= 1.0, "{stranger_metrics}");
    let broker = env.broker.metrics()?;
    assert_eq!(
        sample(&broker, "etcd_broker_auth_failures_total"),
        Some(refused),
        "{broker}"
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
    std::fs::write(a.token_file(), token)?;
    wait_for("shim ready again", Duration::from_secs(30), || {
        matches!(shim_scrape(a, "/ready"), Ok((200, _))).then_some(())
    })?;
    assert_eq!(a.etcdctl_ok(&["put", "after", "ok"])?.trim(), "OK");
    Ok(())
}
