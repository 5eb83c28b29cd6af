//! TLS termination: each domain's certificate chosen by SNI, and the TLS checks on requests.
//!
//! A handshake's server name (SNI) selects a domain with the same exact and wildcard rules as
//! the `Host` header ([`HostMatcher`]), and the handshake gets that domain's certificate. A
//! handshake without SNI, or whose name selects no domain with a certificate, gets the default
//! domain's certificate when `server.tls_default_domain` is set and fails otherwise, so a
//! client never receives another domain's certificate by accident.
//!
//! Each TLS connection remembers the domain whose certificate it got. A request on it whose host
//! belongs to another domain gets 421 Misdirected Request: an HTTP/2 connection that a client
//! reuses for a second host name cannot reach another domain. Certificates live in a
//! [`TlsStore`], which [`TlsStore::reload`] swaps without a restart.
//!
//! The gateway runs each handshake itself ([`Handshaker`]) and counts every outcome in
//! `mirror_gateway_tls_handshakes_total`, and each failure with its [`HandshakeFailure`] reason
//! in `mirror_gateway_tls_handshake_failures_total`.

mod accept;
mod certs;
mod failure;
#[cfg(test)]
mod test_certs;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{HeaderValue, StatusCode};
use mirror_plugins::LocalResponse;
use pingora::proxy::Session;

use crate::config::GatewayConfig;
use crate::host::{HostError, HostMatcher};
use crate::respond::error_response;

pub use accept::{Handshaker, ProxyListener, H2_PREFACE_WAIT, HANDSHAKE_TIMEOUT};
pub use certs::{CertFile, CertFiles, CertProblem, DomainCert, LoadedCert};
pub use failure::HandshakeFailure;

/// The certificates in use, swappable while the gateway runs.
pub struct TlsStore {
    current: ArcSwap<CertStore>,
}

/// One generation of certificates: which domain a server name selects, and its certificate.
#[derive(Default)]
pub struct CertStore {
    hosts: HostMatcher,
    domains: Vec<StoreDomain>,
    /// Index into `domains` of the domain whose certificate serves handshakes no other takes.
    default: Option<usize>,
}

/// The server name and domain of a TLS connection's handshake, kept for each request on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConnection {
    /// The server name the client sent (SNI), if any.
    pub server_name: Option<String>,
    /// The id of the domain whose certificate the handshake used.
    pub domain: Option<Arc<str>>,
}

/// The TLS part of the gateway's state: the store, the bound HTTPS addresses, request checks.
pub struct TlsState {
    store: Arc<TlsStore>,
    addrs: Vec<SocketAddr>,
}

/// An error building a [`CertStore`] from a configuration.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid host names: {0}")]
    Hosts(#[from] HostError),
    #[error(
        "server.tls_default_domain = {0:?} names no domain with a certificate; set tls_cert and \
         tls_key on that domain or change the key"
    )]
    DefaultWithoutCert(String),
}

struct StoreDomain {
    id: Arc<str>,
    cert: Option<Arc<DomainCert>>,
    redirect_to_https: bool,
}

impl TlsStore {
    /// Wraps the first generation of certificates.
    pub fn new(store: CertStore) -> Self {
        Self {
            current: ArcSwap::from_pointee(store),
        }
    }

    /// Replaces the certificates. Handshakes that start afterwards use the new ones;
    /// connections already set up keep the domain they were set up for.
    pub fn reload(&self, new: CertStore) {
        self.current.store(Arc::new(new));
    }

    /// Returns the certificates in use now.
    pub fn current(&self) -> Arc<CertStore> {
        self.current.load_full()
    }
}

impl CertStore {
    /// Builds the store of a validated configuration.
    ///
    /// # Errors
    ///
    /// Host patterns that [`HostMatcher`] rejects, or a default domain without a certificate;
    /// validation reports both before this runs.
    pub fn from_config(config: &GatewayConfig) -> Result<Self, StoreError> {
        let patterns = config
            .domains
            .iter()
            .enumerate()
            .flat_map(|(i, d)| d.hosts.iter().map(move |h| (h.clone(), i)));
        let hosts = HostMatcher::new(patterns)?;
        let domains: Vec<StoreDomain> = config
            .domains
            .iter()
            .map(|d| {
                let tls = config.tls.domains.get(&d.id);
                StoreDomain {
                    id: Arc::from(d.id.as_str()),
                    cert: tls.and_then(|t| t.cert.clone()),
                    redirect_to_https: tls.is_some_and(|t| t.redirect_to_https),
                }
            })
            .collect();
        let default = match &config.tls.default_domain {
            None => None,
            Some(id) => {
                let found = domains.iter().position(|d| *d.id == **id);
                let with_cert = found.filter(|&i| domains[i].cert.is_some());
                Some(with_cert.ok_or_else(|| StoreError::DefaultWithoutCert(id.clone()))?)
            }
        };
        Ok(Self {
            hosts,
            domains,
            default,
        })
    }

    /// Returns the domain id and certificate for a handshake's server name.
    ///
    /// The name selects a domain as a `Host` header would (a name with a `:` selects none). A
    /// name that selects no domain with a certificate, or no name, gets the default domain;
    /// `None` when there is no default: the handshake must fail.
    pub fn select(&self, server_name: Option<&str>) -> Option<(&Arc<str>, &Arc<DomainCert>)> {
        let by_name = server_name
            .filter(|name| !name.contains(':'))
            .and_then(|name| self.hosts.lookup(name))
            .and_then(|i| self.with_cert(i));
        by_name.or_else(|| self.default.and_then(|i| self.with_cert(i)))
    }

    /// Returns the id of the domain that a server name selects, with or without a
    /// certificate; `None` for no name or a name that selects no domain.
    pub fn domain_of(&self, server_name: Option<&str>) -> Option<&Arc<str>> {
        let index = server_name
            .filter(|name| !name.contains(':'))
            .and_then(|name| self.hosts.lookup(name))?;
        self.domains.get(index).map(|domain| &domain.id)
    }

    /// Returns whether plain-HTTP requests for `domain` (an id) are redirected to HTTPS.
    pub fn redirects_to_https(&self, domain: &str) -> bool {
        self.domains
            .iter()
            .any(|d| *d.id == *domain && d.redirect_to_https)
    }

    fn with_cert(&self, index: usize) -> Option<(&Arc<str>, &Arc<DomainCert>)> {
        let domain = self.domains.get(index)?;
        domain.cert.as_ref().map(|cert| (&domain.id, cert))
    }
}

impl TlsState {
    /// Combines the store with the bound TLS listener addresses; the first one's port goes
    /// into HTTPS redirects.
    pub fn new(store: Arc<TlsStore>, addrs: Vec<SocketAddr>) -> Self {
        Self { store, addrs }
    }

    /// Returns the certificate store, for reloads.
    pub fn store(&self) -> &Arc<TlsStore> {
        &self.store
    }

    /// Returns the bound TLS listener addresses (port 0 resolved).
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Checks a request routed to `domain` (an id) by `host` (the request's host).
    ///
    /// # Errors
    ///
    /// 421 for a request on a TLS connection set up for another domain (or for none), 308 to
    /// the HTTPS URL for a plain-HTTP request to a domain with `redirect_to_https`.
    pub fn check(&self, session: &Session, domain: &str, host: &str) -> Result<(), LocalResponse> {
        if let Some(tls) = session.digest().and_then(|d| d.ssl_digest.as_ref()) {
            let connection = tls.extension.get::<TlsConnection>();
            if connection.and_then(|c| c.domain.as_deref()) == Some(domain) {
                return Ok(());
            }
            return Err(error_response(
                StatusCode::MISDIRECTED_REQUEST,
                &format!(
                    "this connection's certificate is not for host {host:?}; open a new \
                     connection that sends it as the server name (SNI)"
                ),
            ));
        }
        // A background refresh repeats a request that already passed this check.
        if session.subrequest_ctx.is_some() || !self.store.current().redirects_to_https(domain) {
            return Ok(());
        }
        let target = session.req_header().uri.path_and_query();
        let location = https_location(host, self.addrs.first().map(SocketAddr::port), target);
        match HeaderValue::from_str(&location) {
            Ok(value) => Err(error_response(
                StatusCode::PERMANENT_REDIRECT,
                &format!("this domain is served over HTTPS only: {location}"),
            )
            .with_header(http::header::LOCATION, value)),
            Err(_) => Err(error_response(
                StatusCode::BAD_REQUEST,
                "the request's host and path do not form a valid HTTPS URL",
            )),
        }
    }
}

/// Builds `https://host[:port]/path?query` from a request's host (its port is dropped) and
/// target; port 443 is left out.
fn https_location(
    host: &str,
    port: Option<u16>,
    target: Option<&http::uri::PathAndQuery>,
) -> String {
    let name = if host.starts_with('[') {
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        host.split(':').next().unwrap_or(host)
    };
    let port = match port {
        None | Some(443) => String::new(),
        Some(port) => format!(":{port}"),
    };
    let target = target
        .map(|t| t.as_str())
        .filter(|t| t.starts_with('/'))
        .unwrap_or("/");
    format!("https://{name}{port}{target}")
}

#[cfg(test)]
mod tests {
    use super::test_certs::{self_signed, write_pair, Names};
    use super::*;
    use std::time::SystemTime;

    /// A store of three domains: `a` (`a.test`, with a certificate), `b` (`*.b.test`, with a
    /// certificate), `c` (`c.test`, without).
    fn store(default: Option<usize>) -> CertStore {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = |name: &str| {
            let sub = dir.path().join(name.replace('*', "star"));
            std::fs::create_dir(&sub).expect("mkdir");
            write_pair(&sub, &self_signed(&Names::dns(&[name])));
            let files = CertFiles {
                cert: sub.join("cert.pem"),
                key: sub.join("key.pem"),
                ocsp: None,
            };
            Some(Arc::new(
                DomainCert::load(&files, SystemTime::now())
                    .expect("loads")
                    .cert,
            ))
        };
        let hosts = [("a.test", 0), ("*.b.test", 1), ("c.test", 2)];
        let domains = vec![
            StoreDomain {
                id: Arc::from("a"),
                cert: cert("a.test"),
                redirect_to_https: true,
            },
            StoreDomain {
                id: Arc::from("b"),
                cert: cert("*.b.test"),
                redirect_to_https: false,
            },
            StoreDomain {
                id: Arc::from("c"),
                cert: None,
                redirect_to_https: false,
            },
        ];
        CertStore {
            hosts: HostMatcher::new(hosts.map(|(h, i)| (h.to_string(), i))).expect("hosts"),
            domains,
            default,
        }
    }

    fn selected(store: &CertStore, name: Option<&str>) -> Option<String> {
        store.select(name).map(|(id, _)| id.to_string())
    }

    #[test]
    fn select_exact_and_wildcard() {
        let store = store(None);
        assert_eq!(selected(&store, Some("A.TEST")), Some("a".into()));
        assert_eq!(selected(&store, Some("x.y.b.test")), Some("b".into()));
    }

    #[test]
    fn select_without_default_refuses() {
        let store = store(None);
        assert_eq!(selected(&store, None), None);
        assert_eq!(selected(&store, Some("unknown.test")), None);
        assert_eq!(selected(&store, Some("c.test")), None);
        assert_eq!(selected(&store, Some("a.test:443")), None);
    }

    #[test]
    fn select_falls_back_to_default() {
        let store = store(Some(1));
        assert_eq!(selected(&store, None), Some("b".into()));
        assert_eq!(selected(&store, Some("unknown.test")), Some("b".into()));
        assert_eq!(selected(&store, Some("c.test")), Some("b".into()));
        assert_eq!(selected(&store, Some("a.test")), Some("a".into()));
    }

    #[test]
    fn domain_of_ignores_certificates() {
        let store = store(None);
        let id = |name| store.domain_of(name).map(|id| id.to_string());
        assert_eq!(id(Some("c.test")), Some("c".into()));
        assert_eq!(id(Some("x.b.test")), Some("b".into()));
        assert_eq!(id(Some("unknown.test")), None);
        assert_eq!(id(None), None);
    }

    #[test]
    fn redirects_by_domain_id() {
        let store = store(None);
        assert!(store.redirects_to_https("a"));
        assert!(!store.redirects_to_https("b"));
        assert!(!store.redirects_to_https("missing"));
    }

    #[test]
    fn reload_swaps_generation() {
        let tls = TlsStore::new(store(None));
        tls.reload(store(Some(0)));
        assert_eq!(selected(&tls.current(), None), Some("a".into()));
    }

    #[test]
    fn location_keeps_path_and_query() {
        let target: http::uri::PathAndQuery = "/x/y?q=1&r".parse().expect("target");
        assert_eq!(
            https_location("a.test:8080", Some(8443), Some(&target)),
            "https://a.test:8443/x/y?q=1&r"
        );
    }

    #[test]
    fn location_leaves_out_443() {
        assert_eq!(https_location("a.test", Some(443), None), "https://a.test/");
    }

    #[test]
    fn location_ipv6_host() {
        let target: http::uri::PathAndQuery = "/p".parse().expect("target");
        assert_eq!(
            https_location("[::1]:8080", Some(8443), Some(&target)),
            "https://[::1]:8443/p"
        );
    }
}
