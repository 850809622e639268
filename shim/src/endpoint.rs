//! Which brokers the shim may use and in what order it dials them: the `--broker` list
//! (comma-separated URLs; a name may resolve to several addresses) and a short memory of
//! addresses that just failed, so a dead broker costs one refused connect, not one per
//! reconnect.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::Uri;
use http::uri::{Authority, Scheme};

/// Why a `--broker` value is unusable.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("no broker URL given")]
    Empty,
    #[error("invalid broker URL {url:?}: {reason}")]
    Invalid { url: String, reason: String },
    #[error("broker URLs mix http:// and https://; use one scheme for all")]
    MixedSchemes,
}

/// One broker URL: where to dial and, for TLS, the name its certificate must carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Host as written (a DNS name or an IP address, without IPv6 brackets).
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    /// `host:port` as lookups take it.
    pub fn lookup_name(&self) -> (&str, u16) {
        (&self.host, self.port)
    }
}

/// Every broker the shim may use, all with one scheme.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoints {
    pub scheme: Scheme,
    /// The first URL's authority: what requests carry as `:authority`. Connections go
    /// wherever the dialer decides; the broker does not route by authority.
    pub authority: Authority,
    pub list: Vec<Endpoint>,
}

impl Endpoints {
    /// Parses `https://host:port[,https://host2:port...]`. Spaces around commas are
    /// ignored; each URL needs a scheme, a host and a port, and nothing else.
    pub fn parse(value: &str) -> Result<Self, Error> {
        let mut scheme: Option<Scheme> = None;
        let mut authority = None;
        let mut list = Vec::new();
        for url in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let invalid = |reason: &str| Error::Invalid {
                url: url.to_owned(),
                reason: reason.to_owned(),
            };
            let uri: Uri = url
                .parse()
                .map_err(|e: http::uri::InvalidUri| Error::Invalid {
                    url: url.to_owned(),
                    reason: e.to_string(),
                })?;
            let s = uri
                .scheme()
                .cloned()
                .ok_or_else(|| invalid("needs http:// or https://"))?;
            if s != Scheme::HTTP && s != Scheme::HTTPS {
                return Err(invalid("needs http:// or https://"));
            }
            let auth = uri
                .authority()
                .cloned()
                .ok_or_else(|| invalid("needs a host"))?;
            let port = auth.port_u16().ok_or_else(|| invalid("needs a port"))?;
            if auth.as_str().contains('@') {
                return Err(invalid("must not carry credentials"));
            }
            if uri.path_and_query().is_some_and(|pq| pq.as_str() != "/") {
                return Err(invalid("must not have a path"));
            }
            let host = auth.host().trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                return Err(invalid("needs a host"));
            }
            match &scheme {
                None => scheme = Some(s),
                Some(first) if *first != s => return Err(Error::MixedSchemes),
                Some(_) => {}
            }
            authority.get_or_insert(auth.clone());
            list.push(Endpoint {
                host: host.to_owned(),
                port,
            });
        }
        match (scheme, authority) {
            (Some(scheme), Some(authority)) => Ok(Self {
                scheme,
                authority,
                list,
            }),
            _ => Err(Error::Empty),
        }
    }

    pub fn is_tls(&self) -> bool {
        self.scheme == Scheme::HTTPS
    }
}

/// An address to dial, and which endpoint it came from (for the TLS name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub addr: SocketAddr,
    pub endpoint: usize,
}

/// Remembers addresses that failed recently and orders candidates for the next dial.
#[derive(Debug)]
pub struct Selector {
    /// When each address last failed; entries older than `hold` no longer count.
    failed: HashMap<SocketAddr, Instant>,
    /// How long a failure pushes an address to the back of the order.
    hold: Duration,
    /// Where in the list healthy candidates start, fixed per process: shims started
    /// together spread over the brokers instead of all dialing the first one.
    offset: usize,
}

impl Selector {
    pub fn new(hold: Duration, offset: usize) -> Self {
        Self {
            failed: HashMap::new(),
            hold,
            offset,
        }
    }

    /// Candidates in dial order: those that have not failed within `hold`, starting at
    /// this process's offset, then the recently failed ones, longest-ago failure first,
    /// as a last resort (all brokers may have restarted at once).
    pub fn order(&mut self, candidates: &[Candidate], now: Instant) -> Vec<Candidate> {
        let hold = self.hold;
        self.failed
            .retain(|_, at| now.saturating_duration_since(*at) < hold);
        let n = candidates.len();
        let mut healthy = Vec::with_capacity(n);
        let mut failed = Vec::new();
        for i in 0..n {
            let c = candidates[(i + self.offset) % n];
            match self.failed.get(&c.addr) {
                Some(at) => failed.push((*at, c)),
                None => healthy.push(c),
            }
        }
        failed.sort_by_key(|(at, _)| *at);
        healthy.extend(failed.into_iter().map(|(_, c)| c));
        // The same address listed twice (two URLs, one broker) is dialed once.
        let mut seen = std::collections::HashSet::new();
        healthy.retain(|c| seen.insert(c.addr));
        healthy
    }

    pub fn failed(&mut self, addr: SocketAddr, now: Instant) {
        self.failed.insert(addr, now);
    }

    pub fn succeeded(&mut self, addr: SocketAddr) {
        self.failed.remove(&addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(host: &str, port: u16) -> Endpoint {
        Endpoint {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn parses_one_or_several_urls() {
        let one = Endpoints::parse("https://broker.etcd-shim.svc:2379").unwrap();
        assert!(one.is_tls());
        assert_eq!(one.authority.as_str(), "broker.etcd-shim.svc:2379");
        assert_eq!(one.list, vec![ep("broker.etcd-shim.svc", 2379)]);

        let several =
            Endpoints::parse("https://10.0.0.1:2379, https://[fd00::2]:2380,https://b:1,").unwrap();
        assert_eq!(several.authority.as_str(), "10.0.0.1:2379");
        assert_eq!(
            several.list,
            vec![ep("10.0.0.1", 2379), ep("fd00::2", 2380), ep("b", 1)]
        );
        let plain = Endpoints::parse("http://127.0.0.1:2379/").unwrap();
        assert!(!plain.is_tls());
    }

    #[test]
    fn rejects_what_cannot_be_dialed() {
        assert_eq!(Endpoints::parse(""), Err(Error::Empty));
        assert_eq!(Endpoints::parse(" , "), Err(Error::Empty));
        assert_eq!(
            Endpoints::parse("http://a:1,https://b:2"),
            Err(Error::MixedSchemes)
        );
        for (bad, why) in [
            ("broker:2379", "http:// or https://"),
            ("https://broker", "needs a port"),
            ("ftp://broker:21", "http:// or https://"),
            ("https://user:pw@broker:2379", "credentials"),
            ("https://broker:2379/v3", "path"),
            ("https://a:1,not a url", "invalid broker URL"),
        ] {
            let err = Endpoints::parse(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    fn cands(ports: &[u16]) -> Vec<Candidate> {
        ports
            .iter()
            .enumerate()
            .map(|(i, p)| Candidate {
                addr: SocketAddr::from(([127, 0, 0, 1], *p)),
                endpoint: i,
            })
            .collect()
    }

    fn ports(order: &[Candidate]) -> Vec<u16> {
        order.iter().map(|c| c.addr.port()).collect()
    }

    #[test]
    fn healthy_addresses_come_first_from_the_offset() {
        let now = Instant::now();
        let c = cands(&[1, 2, 3]);
        assert_eq!(
            ports(&Selector::new(Duration::from_secs(5), 0).order(&c, now)),
            [1, 2, 3]
        );
        assert_eq!(
            ports(&Selector::new(Duration::from_secs(5), 1).order(&c, now)),
            [2, 3, 1]
        );
        assert_eq!(
            ports(&Selector::new(Duration::from_secs(5), 7).order(&c, now)),
            [2, 3, 1]
        );
        assert!(
            Selector::new(Duration::from_secs(5), 3)
                .order(&[], now)
                .is_empty()
        );
    }

    #[test]
    fn recently_failed_addresses_go_last_then_are_forgotten() {
        let t0 = Instant::now();
        let hold = Duration::from_secs(5);
        let mut s = Selector::new(hold, 0);
        let c = cands(&[1, 2, 3]);
        s.failed(c[0].addr, t0);
        s.failed(c[1].addr, t0 + Duration::from_secs(1));
        // Healthy first; among the failed, the one that failed longest ago first.
        assert_eq!(ports(&s.order(&c, t0 + Duration::from_secs(2))), [3, 1, 2]);
        // After the hold the first failure no longer counts.
        assert_eq!(ports(&s.order(&c, t0 + Duration::from_secs(5))), [1, 3, 2]);
        // A success clears the memory at once.
        s.failed(c[0].addr, t0 + Duration::from_secs(5));
        s.succeeded(c[1].addr);
        assert_eq!(ports(&s.order(&c, t0 + Duration::from_secs(5))), [2, 3, 1]);
        // When everything failed, everything is still tried.
        for x in &c {
            s.failed(x.addr, t0 + Duration::from_secs(6));
        }
        assert_eq!(s.order(&c, t0 + Duration::from_secs(6)).len(), 3);
    }

    #[test]
    fn an_address_listed_twice_is_dialed_once() {
        let now = Instant::now();
        let mut c = cands(&[1, 2]);
        c.push(Candidate {
            addr: c[0].addr,
            endpoint: 2,
        });
        assert_eq!(
            ports(&Selector::new(Duration::from_secs(5), 0).order(&c, now)),
            [1, 2]
        );
    }
}
