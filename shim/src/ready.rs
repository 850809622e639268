//! `etcd-shim wait-ready`: polls the running shim's `/ready` until it passes. The classic
//! sidecar's postStart hook runs it, because the kubelet starts the next container only
//! once that hook returns; so the application starts after the shim is ready, as it does
//! behind a native sidecar's startup probe. The image has no shell or curl, hence a
//! subcommand of the shim binary itself.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between probes.
const PAUSE: Duration = Duration::from_millis(250);

/// Where to reach an admin server listening on `listen`: a wildcard address means this
/// host's loopback.
pub fn probe_address(listen: SocketAddr) -> SocketAddr {
    if listen.ip().is_unspecified() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), listen.port())
    } else {
        listen
    }
}

/// Waits until `GET /ready` on `addr` answers 200, for at most `timeout`; the error says
/// what the last probe saw.
pub fn wait_ready(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match probe(addr) {
            Ok((200, _)) => return Ok(()),
            Ok((code, body)) => format!("/ready answered {code}: {}", body.trim()),
            Err(e) => format!("cannot reach {addr}: {e}"),
        };
        if Instant::now() + PAUSE >= deadline {
            return Err(format!("not ready after {timeout:?}; {last}"));
        }
        std::thread::sleep(PAUSE);
    }
}

/// One HTTP/1.0 GET: the status code and the body.
fn probe(addr: SocketAddr) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)?;
    s.set_read_timeout(Some(PROBE_TIMEOUT))?;
    s.set_write_timeout(Some(PROBE_TIMEOUT))?;
    s.write_all(b"GET /ready HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut text = String::new();
    s.take(64 * 1024).read_to_string(&mut text)?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer");
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((code, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Answers 503 `answers_before_ok` times, then 200.
    fn server(answers_before_ok: usize) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for (i, conn) in l.incoming().enumerate() {
                let Ok(mut c) = conn else { return };
                let mut buf = [0u8; 1024];
                let _ = c.read(&mut buf);
                let answer = if i < answers_before_ok {
                    "HTTP/1.1 503 Service Unavailable\r\n\r\nbroker: the broker does not admit this tenant"
                } else {
                    "HTTP/1.1 200 OK\r\n\r\nok"
                };
                let _ = c.write_all(answer.as_bytes());
            }
        });
        addr
    }

    #[test]
    fn returns_once_ready() {
        let addr = server(3);
        wait_ready(addr, Duration::from_secs(10)).unwrap();
    }

    #[test]
    fn gives_up_with_the_last_reason() {
        let addr = server(usize::MAX);
        let err = wait_ready(addr, Duration::from_millis(600)).unwrap_err();
        assert!(
            err.contains("503") && err.contains("does not admit"),
            "{err}"
        );
    }

    #[test]
    fn a_wildcard_listener_is_probed_on_loopback() {
        assert_eq!(
            probe_address("0.0.0.0:9379".parse().unwrap()),
            "127.0.0.1:9379".parse().unwrap()
        );
        assert_eq!(
            probe_address("10.0.0.5:9379".parse().unwrap()),
            "10.0.0.5:9379".parse().unwrap()
        );
    }
}
