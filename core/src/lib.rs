//! Plumbing shared by every etcd-shim component: logging setup, the shutdown and drain
//! signal, and the admin HTTP server that exposes `/metrics`, `/live` and `/ready`.

pub mod admin;
pub mod dirwatch;
pub mod logging;
pub mod shutdown;
pub mod tls;
pub mod token;

/// An error and its causes on one line, `outer: inner: innermost`. Some errors (kube's
/// among them) already print their cause; a cause whose text is already on the line is not
/// repeated.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text.replace('\n', " ")
}

/// Parses `500ms`, `10s`, `5m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    use std::time::Duration;
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "invalid duration unit in {s:?} (use ms, s, m or h)"
            ));
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations() {
        use std::time::Duration;
        assert_eq!(super::parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(
            super::parse_duration("250ms"),
            Ok(Duration::from_millis(250))
        );
        assert_eq!(super::parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(super::parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(super::parse_duration("3d").is_err());
        assert!(super::parse_duration("x").is_err());
    }
}

/// The synthetic identity every tenant sees: response headers and the one member of
/// MemberList carry these instead of the real cluster's ids.
pub mod ids {
    pub const CLUSTER_ID: u64 = 0x6574_6364_2d73_6869; // "etcd-shi"
    pub const MEMBER_ID: u64 = 0x7368_696d_2d6d_656d; // "shim-mem"
    pub const RAFT_TERM: u64 = 1;
}
