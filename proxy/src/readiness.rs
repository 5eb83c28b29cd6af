//! Readiness: whether the gateway can serve now, and which domains it cannot serve and why.
//!
//! A domain is servable when every origin of the domain is reachable, or when the cache contains
//! entries of the domain, because cached responses (fresh, or stale within their windows) can
//! still be served while an origin is down. A domain whose responses are never cached is
//! servable only through its origins. `/readyz` reports the gateway ready when every
//! domain is servable and the gateway-wide checks pass. `/status.json` shows the per-domain
//! verdicts.

use std::net::SocketAddr;
use std::time::Duration;

use crate::gateway::{DomainRuntime, GatewayState};
use crate::status::{Health, SyncFreshness};
use crate::upstream::Upstream;

/// Maximum wait for a TCP connection when readiness probes an HTTP origin.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether one domain can be served now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainReadiness {
    /// The domain id.
    pub id: String,
    /// Entries of the domain in the memory tier plus those in the disk tier.
    pub cache_entries: u64,
    /// Whether the origins were probed. Origins are probed only when the domain has no cache
    /// entries, because with entries they do not decide readiness.
    pub origins_probed: bool,
    /// One line for each origin that cannot serve, in config order, such as
    /// `origin web is unreachable (...)`.
    pub origin_problems: Vec<String>,
}

impl DomainReadiness {
    /// Returns whether the domain can be served: from its cache or from its origins.
    pub fn servable(&self) -> bool {
        self.cache_entries > 0 || self.origin_problems.is_empty()
    }

    /// Returns one line for each reason the domain cannot be served, or none when it can.
    pub fn reasons(&self) -> Vec<String> {
        if self.servable() {
            return Vec::new();
        }
        self.origin_problems
            .iter()
            .map(|problem| {
                format!(
                    "domain {}: {problem}, and the domain has no cache entries",
                    self.id
                )
            })
            .collect()
    }
}

/// Returns why the gateway is not ready, or nothing when it is: shutdown began, the services
/// have not started, the sync lag is over its limit, or a domain is not servable (see
/// [`domains_readiness`]).
pub async fn readiness(state: &GatewayState, health: &Health) -> Vec<String> {
    if health.is_draining() {
        return vec!["draining: the gateway is shutting down".into()];
    }
    let mut reasons = Vec::new();
    if !health.is_started() {
        reasons.push("the listeners have not started yet".into());
    }
    if let Some(SyncFreshness {
        lag: Some(lag),
        max_lag,
    }) = health.sync_freshness()
    {
        if lag > max_lag {
            reasons.push(format!(
                "the synced data is {} s old, over the {} s limit",
                lag.as_secs(),
                max_lag.as_secs()
            ));
        }
    }
    for domain in domains_readiness(state).await {
        reasons.extend(domain.reasons());
    }
    reasons
}

/// Judges every domain of `state`, in config order.
///
/// The origins of domains without cache entries are probed, all at once, so the wait is that
/// of the slowest probe. An HTTP origin is reachable when a TCP connection to one of its
/// addresses opens within its connect timeout (at most 2 s). An export-tree origin is
/// reachable when it has an export to serve.
pub async fn domains_readiness(state: &GatewayState) -> Vec<DomainReadiness> {
    let mut verdicts: Vec<DomainReadiness> = state
        .domains
        .iter()
        .map(|domain| {
            let cache_entries = state.cache.domain_entries(&domain.config.id);
            DomainReadiness {
                id: domain.config.id.clone(),
                cache_entries,
                origins_probed: cache_entries == 0,
                origin_problems: Vec::new(),
            }
        })
        .collect();
    let to_probe: Vec<(usize, &DomainRuntime)> = state
        .domains
        .iter()
        .enumerate()
        .filter(|(index, _)| verdicts[*index].origins_probed)
        .collect();
    for (index, problem) in unreachable_origins(&to_probe).await {
        verdicts[index].origin_problems.push(problem);
    }
    verdicts
}

/// Returns, for each origin of `domains` that cannot be reached now, its domain's index and
/// one line about it, in config order.
async fn unreachable_origins(domains: &[(usize, &DomainRuntime)]) -> Vec<(usize, String)> {
    let mut probes = tokio::task::JoinSet::new();
    // The origin's place in config order and its domain's index, by probe task.
    let mut subjects = std::collections::HashMap::new();
    let origins = domains.iter().flat_map(|(domain, runtime)| {
        let pairs = runtime.config.origins.iter().zip(&runtime.upstreams);
        pairs.map(move |(origin, upstream)| (*domain, &origin.name, upstream))
    });
    for (order, (domain, name, upstream)) in origins.enumerate() {
        let subject = format!("origin {name}");
        let task = match upstream {
            Upstream::Http {
                addresses,
                settings,
                ..
            } => {
                let (addresses, limit) = (addresses.clone(), settings.connect_timeout);
                probes.spawn(async move {
                    let result = probe_tcp(&addresses, limit.min(PROBE_TIMEOUT)).await;
                    result
                        .err()
                        .map(|e| format!("{subject} is unreachable ({e})"))
                })
            }
            Upstream::ExportTree { tree, .. } => {
                let problem = tree.active_export().err();
                let problem = problem.map(|e| format!("{subject} has no export to serve ({e})"));
                probes.spawn(async move { problem })
            }
        };
        subjects.insert(task.id(), (order, domain));
    }
    let mut problems = Vec::new();
    while let Some(joined) = probes.join_next_with_id().await {
        let (id, problem) = match joined {
            Ok((id, problem)) => (id, problem),
            Err(e) => {
                tracing::error!(error = %e, "an origin probe failed");
                (e.id(), Some(format!("its probe failed: {e}")))
            }
        };
        if let (Some(&(order, domain)), Some(problem)) = (subjects.get(&id), problem) {
            problems.push((order, domain, problem));
        }
    }
    problems.sort();
    problems
        .into_iter()
        .map(|(_, domain, problem)| (domain, problem))
        .collect()
}

/// Connects to every address at once and succeeds when one accepts within `limit`. Otherwise
/// it returns the error of the address listed last. The probe takes at most `limit`, however
/// many addresses the origin has.
async fn probe_tcp(addresses: &[SocketAddr], limit: Duration) -> Result<(), String> {
    let mut attempts = tokio::task::JoinSet::new();
    for (order, &address) in addresses.iter().enumerate() {
        attempts.spawn(async move {
            let outcome =
                tokio::time::timeout(limit, tokio::net::TcpStream::connect(address)).await;
            let result = match outcome {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("{address}: {e}")),
                Err(_) => Err(format!(
                    "{address}: connect timed out after {} ms",
                    limit.as_millis()
                )),
            };
            (order, result)
        });
    }
    let mut last: Option<(usize, String)> = None;
    while let Some(joined) = attempts.join_next().await {
        let (order, error) = match joined {
            Ok((_, Ok(()))) => return Ok(()),
            Ok((order, Err(error))) => (order, error),
            Err(e) => (usize::MAX, format!("connect attempt failed: {e}")),
        };
        if last.as_ref().is_none_or(|(seen, _)| order >= *seen) {
            last = Some((order, error));
        }
    }
    Err(last.map_or_else(|| String::from("no address"), |(_, error)| error))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(cache_entries: u64, origin_problems: &[&str]) -> DomainReadiness {
        DomainReadiness {
            id: "primary".into(),
            cache_entries,
            origins_probed: cache_entries == 0,
            origin_problems: origin_problems.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn servable_by_origin_or_cache() {
        assert!(verdict(0, &[]).servable());
        assert!(verdict(3, &["origin web is unreachable (refused)"]).servable());
        assert!(!verdict(0, &["origin web is unreachable (refused)"]).servable());
    }

    #[test]
    fn reasons_name_domain_and_origin() {
        let reasons = verdict(0, &["origin web is unreachable (refused)"]).reasons();
        assert_eq!(
            reasons,
            [
                "domain primary: origin web is unreachable (refused), and the domain has no \
              cache entries"
            ]
        );
        assert!(verdict(1, &["origin web is unreachable"])
            .reasons()
            .is_empty());
    }

    #[tokio::test]
    async fn probe_refused_port() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let result = probe_tcp(&[addr], Duration::from_secs(1)).await;
        assert!(result.is_err(), "{result:?}");
    }

    #[tokio::test]
    async fn probe_addresses_at_once() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let open = listener.local_addr().expect("addr");
        let closed = {
            let spare = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            spare.local_addr().expect("addr")
        };
        // A refused address listed first does not hide an open one after it.
        assert_eq!(
            probe_tcp(&[closed, open], Duration::from_secs(1)).await,
            Ok(())
        );
        let error = probe_tcp(&[open, closed], Duration::from_secs(1)).await;
        assert_eq!(error, Ok(()));
        drop(listener);
        let error = probe_tcp(&[open, closed], Duration::from_secs(1))
            .await
            .expect_err("both closed");
        assert!(error.starts_with(&closed.to_string()), "{error}");
        assert_eq!(
            probe_tcp(&[], Duration::from_secs(1)).await,
            Err("no address".to_owned())
        );
    }

    #[tokio::test]
    async fn probe_open_port() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        assert_eq!(probe_tcp(&[addr], Duration::from_secs(1)).await, Ok(()));
    }
}
