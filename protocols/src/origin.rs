//! The `Origin` allow-list of the browser-facing routes.
//!
//! A browser stamps every WebSocket upgrade, WebTransport session request
//! and cross-origin fetch with the `Origin` of the page that made it, and a
//! page cannot forge it. Checking it stops a page on another site from
//! using a visitor's browser as a client of the gateway: opening a
//! WebSocket to a gateway on the visitor's loopback or intranet (no
//! same-origin policy protects WebSocket or WebTransport), or sending a
//! form POST that publishes. Clients that are not browsers send no
//! `Origin` and are not affected: the list is about browsers, not a
//! substitute for tokens.
//!
//! One [`OriginPolicy`] serves every route (WebSocket, MQTT over WebSocket,
//! SSE, long polling, REST and WebTransport), so the answer to "may this
//! page talk to us" is the same everywhere. Entries:
//!
//! | entry | allows `Origin` | does not allow |
//! |---|---|---|
//! | (no entries) | anything | — |
//! | `*` | anything | — |
//! | `https://app.example.com` | `https://app.example.com` | `http://app.example.com`, `https://app.example.com:8443`, `https://x.app.example.com` |
//! | `https://app.example.com:443` | `https://app.example.com` (the default port is what browsers omit) | — |
//! | `http://localhost:3000` | `http://localhost:3000` | `http://localhost:3001` |
//! | `https://*.example.com` | `https://a.example.com`, `https://a.b.example.com` | `https://example.com`, `https://a.example.com:8443`, `http://a.example.com` |
//! | `null` | `null` (sandboxed frames, `file:` pages) | — |
//!
//! Matching ignores ASCII case. This module only decides; refusing (a 403,
//! its log line and the `switchboard_origin_refused_total{route}` counter,
//! see [`refused`]) is the caller's, as is which routes ask.

use std::net::SocketAddr;

/// Which pages may use the browser-facing routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OriginPolicy {
    /// Exact origins, normalised (lowercase, default port dropped).
    exact: Vec<String>,
    /// `scheme://*.domain[:port]` entries as (`scheme://`, `.domain[:port]`).
    subdomains: Vec<(String, String)>,
    /// No entries, or `*`.
    any: bool,
}

impl OriginPolicy {
    /// Allows every origin (the default: an empty list).
    pub fn any() -> OriginPolicy {
        OriginPolicy { any: true, ..OriginPolicy::default() }
    }

    /// Builds the policy from configured entries (see the module table);
    /// an empty list allows any origin. An entry that is not an origin (a
    /// path, a trailing `/`, no scheme, a wildcard anywhere but the first
    /// label) is an error naming it.
    pub fn new<S: AsRef<str>>(entries: &[S]) -> Result<OriginPolicy, String> {
        let mut policy = OriginPolicy { any: entries.is_empty(), ..OriginPolicy::default() };
        for entry in entries {
            let raw = entry.as_ref().trim();
            let e = raw.to_ascii_lowercase();
            if e == "*" {
                policy.any = true;
                continue;
            }
            if e == "null" {
                policy.exact.push(e);
                continue;
            }
            let bad = |why: &str| format!("{raw:?} is not an origin ({why}); write scheme://host[:port]");
            let Some((scheme, authority)) = e.split_once("://") else { return Err(bad("no scheme")) };
            if scheme.is_empty() || !scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) {
                return Err(bad("bad scheme"));
            }
            if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
                return Err(bad("an origin has a host and no path, query or trailing slash"));
            }
            let authority = strip_default_port(scheme, authority);
            match authority.strip_prefix("*.") {
                Some(domain) if !domain.is_empty() && !domain.contains('*') => {
                    policy.subdomains.push((format!("{scheme}://"), format!(".{domain}")));
                }
                Some(_) => return Err(bad("a wildcard needs a domain after \"*.\"")),
                None if authority.contains('*') => return Err(bad("\"*\" may only be the first label, as *.domain")),
                None => policy.exact.push(format!("{scheme}://{authority}")),
            }
        }
        Ok(policy)
    }

    /// Whether any origin is allowed.
    pub fn allows_any(&self) -> bool {
        self.any
    }

    /// Whether a request with this `Origin` header (`None`: no header, a
    /// client that is not a browser) may go on.
    pub fn allows(&self, origin: Option<&str>) -> bool {
        let Some(origin) = origin else { return true };
        if self.any {
            return true;
        }
        let origin = origin.trim();
        if self.exact.iter().any(|o| o.eq_ignore_ascii_case(origin)) {
            return true;
        }
        let lower = origin.to_ascii_lowercase();
        self.subdomains.iter().any(|(scheme, suffix)| {
            lower
                .strip_prefix(scheme.as_str())
                .and_then(|rest| rest.strip_suffix(suffix.as_str()))
                .is_some_and(|label| !label.is_empty() && !label.contains([':', '/', '@']))
        })
    }
}

/// `host:443` for https / wss and `host:80` for http / ws, as browsers
/// never write them.
fn strip_default_port<'a>(scheme: &str, authority: &'a str) -> &'a str {
    let default = match scheme {
        "https" | "wss" => ":443",
        "http" | "ws" => ":80",
        _ => return authority,
    };
    authority.strip_suffix(default).unwrap_or(authority)
}

/// Counts and logs a request refused for its `Origin`:
/// `switchboard_origin_refused_total{route}` and one `info` line with the
/// route, the origin (at most 256 bytes of it) and the peer.
pub fn refused(route: &'static str, origin: &str, peer: Option<SocketAddr>) {
    metrics::counter!("switchboard_origin_refused_total", "route" => route).increment(1);
    let origin: String = origin.chars().take(256).collect();
    tracing::info!(route, origin = ?origin, peer = ?peer, "refused a request from a page of another origin");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_module_table_holds() {
        let p = OriginPolicy::new(&[
            "https://app.example.com",
            "https://secure.example.com:443",
            "http://localhost:3000",
            "https://*.example.org",
            "null",
        ])
        .unwrap();
        let yes = [
            "https://app.example.com",
            "HTTPS://APP.example.com",
            "https://secure.example.com",
            "http://localhost:3000",
            "https://a.example.org",
            "https://a.b.example.org",
            "null",
        ];
        let no = [
            "http://app.example.com",
            "https://app.example.com:8443",
            "https://x.app.example.com",
            "https://app.example.com.evil.com",
            "http://localhost:3001",
            "https://example.org",
            "https://.example.org",
            "https://a.example.org:8443",
            "http://a.example.org",
            "https://evil.com/.example.org",
            "",
        ];
        for o in yes {
            assert!(p.allows(Some(o)), "{o} should be allowed");
        }
        for o in no {
            assert!(!p.allows(Some(o)), "{o} should be refused");
        }
        assert!(p.allows(None), "no Origin: not a browser, not affected");
        assert!(!p.allows_any());
    }

    #[test]
    fn empty_or_star_allows_any() {
        let empty: [&str; 0] = [];
        for p in [OriginPolicy::new(&empty).unwrap(), OriginPolicy::new(&["*"]).unwrap(), OriginPolicy::any()] {
            assert!(p.allows_any());
            assert!(p.allows(Some("https://anything.example")));
            assert!(p.allows(None));
        }
    }

    #[test]
    fn entries_that_are_not_origins_are_refused() {
        for bad in [
            "app.example.com",
            "https://app.example.com/",
            "https://app.example.com/path",
            "https://",
            "https://a*.example.com",
            "https://*.",
            "https://*.*.example.com",
            "://x",
            "https://user@app.example.com",
        ] {
            let e = OriginPolicy::new(&[bad]).expect_err(bad);
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }
}
