//! `GET /v1/projects/{writeKey}/settings` (and `/projects/...`, the path the
//! mobile libraries build from a `cdnHost` without `/v1`). Every client
//! library fetches this object before it sends anything, and takes from it
//! the `apiHost` to send to. Answering it with the forwarder's own address
//! is what lets a library be pointed here with one option (`cdnURL`,
//! `cdnHost`) and nothing else.

use super::client_addr::TrustedProxies;
use axum::http::{HeaderMap, header};
use serde_json::{Value, json};

/// The address clients use to reach the forwarder (`--public-url`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicUrl {
    /// `http` or `https`.
    pub protocol: String,
    /// Host, port and path prefix, without a trailing slash:
    /// `events.example.com`, `example.com:8443/segment`.
    pub host: String,
}

impl PublicUrl {
    pub fn parse(text: &str) -> Result<PublicUrl, String> {
        let text = text.trim().trim_end_matches('/');
        let (protocol, host) = text
            .split_once("://")
            .ok_or_else(|| format!("`{text}` must start with http:// or https://"))?;
        let protocol = protocol.to_ascii_lowercase();
        if protocol != "http" && protocol != "https" {
            return Err(format!("`{text}` must start with http:// or https://"));
        }
        if host.is_empty() || host.contains(['?', '#', ' ']) {
            return Err(format!("`{text}` has no host, or a query"));
        }
        Ok(PublicUrl {
            protocol,
            host: host.to_string(),
        })
    }
}

/// A `Host` value fit to be written into the answer: host or address and
/// an optional port, nothing else.
fn plausible_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-:[]_".contains(c))
}

/// Where the answer says to send: `--public-url` when set; otherwise the
/// request's `Host` (HTTP/1.1) or authority (HTTP/2), overridden by
/// `X-Forwarded-Host` / `-Proto` from a trusted proxy. `None` when the
/// request names no usable host.
pub fn public_address(
    public_url: Option<&PublicUrl>,
    trusted: &TrustedProxies,
    peer: Option<std::net::IpAddr>,
    tls: bool,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
) -> Option<PublicUrl> {
    if let Some(url) = public_url {
        return Some(url.clone());
    }
    let (fwd_host, fwd_proto) = match peer {
        Some(peer) => trusted.forwarded(peer, headers),
        None => (None, None),
    };
    let host = fwd_host
        .or_else(|| headers.get(header::HOST).and_then(|v| v.to_str().ok()))
        .or_else(|| uri.authority().map(|a| a.as_str()))?
        .trim();
    if !plausible_host(host) {
        return None;
    }
    let protocol = match fwd_proto.map(str::to_ascii_lowercase).as_deref() {
        Some("https") => "https",
        Some("http") => "http",
        _ if tls || uri.scheme_str() == Some("https") => "https",
        _ => "http",
    };
    Some(PublicUrl {
        protocol: protocol.to_string(),
        host: host.to_string(),
    })
}

/// The settings object for a known write key. `apiKey` repeats the write
/// key the client put in the path (the libraries require the field); no
/// other key or token is in it. Everything that would make a library load
/// code or send elsewhere is off: no remote plugins, no middleware, no
/// destinations but this one, metrics sampled at 0.
pub fn settings_object(write_key: &str, address: &PublicUrl) -> Value {
    json!({
        "integrations": {
            "Segment.io": {
                "apiKey": write_key,
                "apiHost": format!("{}/v1", address.host),
                "protocol": address.protocol,
                "unbundledIntegrations": [],
                "addBundledMetadata": false,
                "maybeBundledConfigIds": {}
            }
        },
        "plan": {},
        "edgeFunction": {},
        "analyticsNextEnabled": true,
        "middlewareSettings": {},
        "enabledMiddleware": {},
        "metrics": { "sampleRate": 0 },
        "legacyVideoPluginsEnabled": false,
        "remotePlugins": [],
        "consentSettings": { "allCategories": [], "hasUnmappedDestinations": false }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn public_url_parses() {
        let u = PublicUrl::parse("https://events.example.com/").unwrap();
        assert_eq!(u.protocol, "https");
        assert_eq!(u.host, "events.example.com");
        let u = PublicUrl::parse("HTTP://example.com:8443/segment").unwrap();
        assert_eq!(
            (u.protocol.as_str(), u.host.as_str()),
            ("http", "example.com:8443/segment")
        );
        for bad in ["events.example.com", "ftp://x", "https://", "https://x?y=1"] {
            assert!(PublicUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn address_from_the_request() {
        let trusted = TrustedProxies::parse(&["127.0.0.1"]).unwrap();
        let uri: axum::http::Uri = "/v1/projects/k/settings".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        h.insert(
            "x-forwarded-host",
            HeaderValue::from_static("events.example.com"),
        );
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        let from = |peer: &str, tls: bool| {
            public_address(None, &trusted, Some(peer.parse().unwrap()), tls, &uri, &h).unwrap()
        };
        let a = from("127.0.0.1", false);
        assert_eq!(
            (a.protocol.as_str(), a.host.as_str()),
            ("https", "events.example.com")
        );
        let a = from("203.0.113.5", false);
        assert_eq!(
            (a.protocol.as_str(), a.host.as_str()),
            ("http", "127.0.0.1:8080")
        );
        assert_eq!(from("203.0.113.5", true).protocol, "https");
        let fixed = PublicUrl::parse("https://fixed.example.com").unwrap();
        assert_eq!(
            public_address(Some(&fixed), &trusted, None, false, &uri, &h).unwrap(),
            fixed
        );
        let mut bad = HeaderMap::new();
        bad.insert(header::HOST, HeaderValue::from_static("x\"><script>"));
        assert!(public_address(None, &trusted, None, false, &uri, &bad).is_none());
    }
}
