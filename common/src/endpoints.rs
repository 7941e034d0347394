//! The administrator's allow-list of repository endpoints (`--allowed-endpoint`).
//!
//! A run's `s3.endpoint` and `rest.url` are written by the tenant, and restic sends the repository
//! credentials to them (REST as HTTP basic auth, S3 the access key id in the SigV4 header). With an
//! allow-list, a run whose endpoint is not on it fails before any Secret is read. Without one,
//! every endpoint is allowed and only the credentials label (see `backend`) guards the Secrets.

use std::str::FromStr;

use crate::finding::Finding;
use stowage_api::BackendSpec;

pub const ENDPOINT_NOT_ALLOWED: &str = "EndpointNotAllowed";

/// `host`, `host:port`, `*.domain` or `*.domain:port`. A leading `*.` matches one or more labels
/// (`*.example.com` matches `s3.eu.example.com`, not `example.com`); hosts compare without case.
/// Without a port, any port is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointPattern {
    host: HostPattern,
    port: Option<u16>,
    text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Exact(String),
    /// The suffix, with its leading dot (`.example.com`).
    Subdomain(String),
}

impl FromStr for EndpointPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let text = s.trim().to_ascii_lowercase();
        let bad = |why: &str| {
            format!(
                "not an endpoint pattern: {s:?} ({why}; e.g. s3.example.com, *.example.com:9000)"
            )
        };
        if text.is_empty() || text.contains("://") || text.contains('/') || text.contains('@') {
            return Err(bad("give a host, optionally with a port"));
        }
        let (host, port) = split_port(&text).map_err(|why| bad(&why))?;
        let host = if let Some(rest) = host.strip_prefix("*.") {
            if rest.is_empty() || rest.contains('*') {
                return Err(bad("'*.' must be followed by a domain"));
            }
            HostPattern::Subdomain(format!(".{rest}"))
        } else if host.contains('*') {
            return Err(bad("'*' is allowed only as a leading '*.'"));
        } else if host.is_empty() {
            return Err(bad("the host is empty"));
        } else {
            HostPattern::Exact(host.to_string())
        };
        Ok(Self { host, port, text })
    }
}

impl std::fmt::Display for EndpointPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// Splits `host[:port]`, with IPv6 hosts in brackets (`[::1]:9000`).
fn split_port(authority: &str) -> Result<(&str, Option<u16>), String> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let end = rest.find(']').ok_or("an IPv6 address lacks its ']'")?;
        let after = &rest[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err("unexpected text after ']'".into()),
        };
        (&authority[..end + 2], port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(p) => Some(
            p.parse::<u16>()
                .map_err(|_| format!("{p:?} is not a port"))?,
        ),
        None => None,
    };
    Ok((host, port))
}

impl EndpointPattern {
    fn matches(&self, host: &str, port: u16) -> bool {
        let host_ok = match &self.host {
            HostPattern::Exact(h) => h == host,
            HostPattern::Subdomain(suffix) => {
                host.len() > suffix.len() && host.ends_with(suffix.as_str())
            }
        };
        host_ok && self.port.is_none_or(|p| p == port)
    }
}

/// The host (lower case, IPv6 in brackets) and port restic will connect to for `url`. A URL without
/// a scheme is how restic's S3 backend takes an endpoint (`s3.amazonaws.com`): HTTPS.
fn host_and_port(url: &str) -> Option<(String, u16)> {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (s.to_ascii_lowercase(), r),
        None => ("https".to_string(), url),
    };
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let authority = authority.to_ascii_lowercase();
    let (host, port) = split_port(&authority).ok()?;
    if host.is_empty() {
        return None;
    }
    let port = match (port, scheme.as_str()) {
        (Some(p), _) => p,
        (None, "http") => 80,
        (None, "https") => 443,
        (None, _) => return None,
    };
    Some((host.to_string(), port))
}

/// Whether the block's endpoint may be used. `at` is the block's field path. The local backend has
/// no endpoint (the agent confines its paths).
pub fn check(allowed: &[EndpointPattern], spec: &BackendSpec, at: &str) -> Result<(), Finding> {
    if allowed.is_empty() {
        return Ok(());
    }
    let (field, url) = if let Some(s) = &spec.s3 {
        ("s3.endpoint", s.endpoint.as_str())
    } else if let Some(r) = &spec.rest {
        ("rest.url", r.url.as_str())
    } else {
        return Ok(());
    };
    let list = || {
        let mut l: Vec<String> = allowed.iter().map(ToString::to_string).collect();
        l.truncate(10);
        l.join(", ")
    };
    let Some((host, port)) = host_and_port(url) else {
        return Err(Finding::new(
            ENDPOINT_NOT_ALLOWED,
            format!(
                "{at}.{field}: the host of this endpoint cannot be told, and the administrator allows only listed endpoints ({})",
                list()
            ),
        ));
    };
    if allowed.iter().any(|p| p.matches(&host, port)) {
        return Ok(());
    }
    Err(Finding::new(
        ENDPOINT_NOT_ALLOWED,
        format!(
            "{at}.{field}: {host}:{port} is not an endpoint the administrator allows (--allowed-endpoint: {}); no Secret was read",
            list()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use stowage_api::{RestBackend, S3Backend};

    fn p(s: &str) -> EndpointPattern {
        s.parse().unwrap()
    }

    #[test]
    fn patterns_parse_and_bad_ones_say_why() {
        assert_eq!(p("S3.Example.com").to_string(), "s3.example.com");
        assert!(p("*.example.com:9000").matches("a.b.example.com", 9000));
        assert!(!p("*.example.com:9000").matches("example.com", 9000));
        assert!(!p("*.example.com:9000").matches("a.example.com", 9001));
        assert!(p("[::1]:8000").matches("[::1]", 8000));
        for bad in ["", "http://x", "x/y", "a.*.com", "*.", "x:port", "u@x"] {
            let e = bad.parse::<EndpointPattern>().unwrap_err();
            assert!(e.contains("not an endpoint pattern"), "{e}");
        }
    }

    #[test]
    fn urls_yield_the_host_restic_connects_to() {
        assert_eq!(
            host_and_port("http://u:p@Rest.Example.com:8000/repo"),
            Some(("rest.example.com".into(), 8000))
        );
        assert_eq!(
            host_and_port("s3.amazonaws.com"),
            Some(("s3.amazonaws.com".into(), 443))
        );
        assert_eq!(host_and_port("http://[::1]/x"), Some(("[::1]".into(), 80)));
        // A host hidden behind a userinfo that itself contains '@' is the last one.
        assert_eq!(
            host_and_port("http://a@allowed.com@evil.com/"),
            Some(("evil.com".into(), 80))
        );
        assert_eq!(host_and_port("ftp://x"), None);
    }

    #[test]
    fn only_listed_endpoints_pass_and_the_finding_names_the_field() {
        let allowed = [p("minio.backup.svc:9000"), p("*.s3.example.com")];
        let mut spec = BackendSpec {
            s3: Some(S3Backend {
                endpoint: "http://minio.backup.svc:9000".into(),
                bucket: "b".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(check(&allowed, &spec, "spec.backend").is_ok());
        assert!(check(&[], &spec, "spec.backend").is_ok());
        spec.s3 = None;
        spec.rest = Some(RestBackend {
            url: "http://127.0.0.1:9/".into(),
            ..Default::default()
        });
        let f = check(&allowed, &spec, "spec.backend").unwrap_err();
        assert_eq!(f.reason, ENDPOINT_NOT_ALLOWED);
        assert!(
            f.message
                .starts_with("spec.backend.rest.url: 127.0.0.1:9 is not"),
            "{}",
            f.message
        );
    }
}
