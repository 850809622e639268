//! Plumbing shared by every etcd-shim component: logging setup, the shutdown and drain
//! signal, the admin HTTP server that exposes `/metrics`, `/live` and `/ready`, and the
//! accept loop every server runs.

pub mod admin;
pub mod follow;
pub mod logging;
pub mod process;
pub mod serve;
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

/// Parses a duration the one way every etcd-shim flag and file does: `humantime`'s
/// grammar (`500ms`, `10s`, `5m`, `1h30m`, `7d`), and a bare number as seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let secs = s.parse().map_err(|_| format!("invalid duration {s:?}"))?;
        return Ok(std::time::Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
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
        assert_eq!(
            super::parse_duration("1h30m"),
            Ok(Duration::from_secs(5400))
        );
        assert_eq!(
            super::parse_duration("3d"),
            Ok(Duration::from_secs(3 * 86_400))
        );
        assert_eq!(
            super::parse_duration("1.5s"),
            Ok(Duration::from_millis(1500))
        );
        for bad in ["", "x", "5 parsecs", "-1s"] {
            assert!(super::parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}

/// The synthetic identity every tenant sees: response headers and the one member of
/// MemberList carry these instead of the real cluster's ids.
pub mod ids {
    pub const CLUSTER_ID: u64 = 0x6574_6364_2d73_6869; // "etcd-shi"
    pub const MEMBER_ID: u64 = 0x7368_696d_2d6d_656d; // "shim-mem"
    pub const RAFT_TERM: u64 = 1;
}
