//! Health, readiness, metrics and the live status page, as served by the admin listener.
//!
//! `GET /healthz` and `GET /readyz` respond without credentials, for probes that send none.
//! `/metrics`, `/status` and `/status.json` need admin credentials like the rest of the admin
//! API. A [`Monitor`] holds what the gateway records about itself: its [`Metrics`] and its
//! [`Health`] (whether the server started its services, whether shutdown began, and the sync
//! task's lag hook). One monitor serves a gateway instance for its whole life, across config
//! reloads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use parking_lot::RwLock;
use pingora::server::ShutdownWatch;
use pingora::services::background::{background_service, BackgroundService, GenBackgroundService};

use crate::admin::json_string;
use crate::cache::TierSnapshot;
use crate::gateway::{DomainRuntime, GatewayState};
use crate::metrics::{DomainSummary, Metrics, ScrapeInputs, STATUS_CLASSES};
use crate::upstream::Upstream;

/// The status page: one self-contained HTML file with inline CSS and JavaScript.
pub const STATUS_PAGE: &str = include_str!("status_page.html");

/// Maximum wait for a TCP connection when `/readyz` probes an HTTP origin.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The metrics and health of a gateway instance, shared by its proxy and admin services.
#[derive(Default)]
pub struct Monitor {
    pub metrics: Metrics,
    pub health: Health,
}

/// The facts `/readyz` and the status page need besides the metrics.
#[derive(Default)]
pub struct Health {
    started: AtomicBool,
    draining: AtomicBool,
    /// When the graceful shutdown began.
    drain_started: OnceLock<Instant>,
    sync: RwLock<Option<Arc<SyncLagHook>>>,
}

/// The sync task's view of how old the served data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncFreshness {
    /// Age of the newest synced data; `None` until the first run finished.
    pub lag: Option<Duration>,
    /// The lag above which `/readyz` reports the gateway not ready.
    pub max_lag: Duration,
}

/// An admin response: status, `Content-Type` and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

type LagProvider = Box<dyn Fn() -> Option<Duration> + Send + Sync>;

struct SyncLagHook {
    max_lag: Duration,
    provider: LagProvider,
}

impl Health {
    /// Creates the state of a process that has not started its services yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that the server started its services; the listening sockets were bound before.
    pub fn mark_started(&self) {
        self.started.store(true, Ordering::Relaxed);
    }

    /// Records that a graceful shutdown began, so `/readyz` responds 503 `draining` from now on.
    pub fn start_draining(&self) {
        let _ = self.drain_started.set(Instant::now());
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Returns the time since the graceful shutdown began, or `None` before it began.
    pub fn draining_for(&self) -> Option<Duration> {
        self.drain_started.get().map(Instant::elapsed)
    }

    /// Returns whether a graceful shutdown began.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Installs the sync task's lag hook: `provider` returns the age of the newest synced data,
    /// or `None` before the first run finished. `/readyz` fails while the age exceeds
    /// `max_lag` (a `None` age does not fail it), and the status page shows the age. A later
    /// call replaces the hook. The provider is called on every `/readyz` and `/status.json`
    /// request, so it must be cheap and must not block.
    pub fn set_sync_lag_provider(
        &self,
        max_lag: Duration,
        provider: impl Fn() -> Option<Duration> + Send + Sync + 'static,
    ) {
        let provider = Box::new(provider);
        *self.sync.write() = Some(Arc::new(SyncLagHook { max_lag, provider }));
    }

    /// Removes the sync task's lag hook, as when a reload removes the `[sync]` section.
    pub fn clear_sync_lag_provider(&self) {
        *self.sync.write() = None;
    }

    /// Returns the sync freshness, or `None` when no lag hook is installed.
    pub fn sync_freshness(&self) -> Option<SyncFreshness> {
        // The provider runs outside the lock, so it may install another hook.
        let hook = self.sync.read().clone()?;
        Some(SyncFreshness {
            lag: (hook.provider)(),
            max_lag: hook.max_lag,
        })
    }
}

/// Returns a background service that marks the monitor's health started when the server
/// starts its services, and draining when Pingora broadcasts a graceful shutdown. Add it to the
/// server once. `drain` is the server's limits for the shutdown, for the log line.
pub fn lifecycle_service(
    monitor: Arc<Monitor>,
    drain: DrainLimits,
) -> GenBackgroundService<LifecycleWatch> {
    background_service(
        "mirror-gateway lifecycle",
        LifecycleWatch { monitor, drain },
    )
}

/// How long a graceful shutdown may take: Pingora waits `grace_period`, then gives its
/// runtimes up to `shutdown_timeout` to finish their tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainLimits {
    pub grace_period: Duration,
    pub shutdown_timeout: Duration,
}

/// The task of [`lifecycle_service`].
pub struct LifecycleWatch {
    monitor: Arc<Monitor>,
    drain: DrainLimits,
}

#[async_trait]
impl BackgroundService for LifecycleWatch {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let health = &self.monitor.health;
        health.mark_started();
        loop {
            if *shutdown.borrow_and_update() {
                health.start_draining();
                let DrainLimits {
                    grace_period,
                    shutdown_timeout,
                } = self.drain;
                tracing::info!(
                    grace_period_secs = grace_period.as_secs(),
                    shutdown_timeout_secs = shutdown_timeout.as_secs(),
                    "shutdown started; draining for {} s, then stopping within {} s",
                    grace_period.as_secs(),
                    shutdown_timeout.as_secs()
                );
                return;
            }
            if shutdown.changed().await.is_err() {
                return;
            }
        }
    }
}

impl Reply {
    /// Builds a JSON reply.
    pub fn json(status: StatusCode, body: String) -> Self {
        Self {
            status,
            content_type: "application/json",
            body: body.into_bytes(),
        }
    }

    /// Builds the HTTP response, with `WWW-Authenticate` when the reply is a 401.
    pub fn into_response(self) -> Response<Vec<u8>> {
        let mut builder = Response::builder()
            .status(self.status)
            .header(http::header::CONTENT_TYPE, self.content_type)
            .header(http::header::CACHE_CONTROL, "no-store")
            .header(http::header::CONTENT_LENGTH, self.body.len());
        if self.status == StatusCode::UNAUTHORIZED {
            builder = builder.header(
                http::header::WWW_AUTHENTICATE,
                "Basic realm=\"mirror-gateway admin\", charset=\"UTF-8\"",
            );
        }
        builder
            .body(self.body)
            .unwrap_or_else(|_| Response::new(Vec::new()))
    }
}

/// Serves the endpoints open without credentials, `/healthz` and `/readyz`. Returns `None` for
/// any other path.
pub async fn public_endpoint(
    state: &GatewayState,
    monitor: &Monitor,
    method: &Method,
    path: &str,
) -> Option<Reply> {
    if !matches!(path, "/healthz" | "/readyz") {
        return None;
    }
    if method != Method::GET && method != Method::HEAD {
        return Some(method_not_allowed());
    }
    if path == "/healthz" {
        return Some(Reply {
            status: StatusCode::OK,
            content_type: "text/plain; charset=utf-8",
            body: b"ok\n".to_vec(),
        });
    }
    let reasons = readiness(state, &monitor.health).await;
    let status = match reasons.is_empty() {
        true => StatusCode::OK,
        false => StatusCode::SERVICE_UNAVAILABLE,
    };
    let list: Vec<String> = reasons.iter().map(|r| json_string(r)).collect();
    let body = format!(
        "{{\"ready\":{},\"reasons\":[{}]}}\n",
        reasons.is_empty(),
        list.join(",")
    );
    Some(Reply::json(status, body))
}

/// Serves `/metrics`, `/status` and `/status.json` for an authenticated admin. Returns `None`
/// for any other path. `now` is the time `/status.json` reports.
pub fn admin_endpoint(
    state: &GatewayState,
    monitor: &Monitor,
    method: &Method,
    path: &str,
    now: SystemTime,
) -> Option<Reply> {
    if !matches!(path, "/metrics" | "/status" | "/status.json") {
        return None;
    }
    if method != Method::GET && method != Method::HEAD {
        return Some(method_not_allowed());
    }
    Some(match path {
        "/metrics" => match monitor.metrics.render(&scrape_inputs(state)) {
            Ok(text) => Reply {
                status: StatusCode::OK,
                content_type: crate::metrics::CONTENT_TYPE,
                body: text.into_bytes(),
            },
            Err(e) => {
                tracing::error!(error = %e, "cannot render the metrics");
                let message = format!("cannot render the metrics: {e}");
                Reply::json(StatusCode::INTERNAL_SERVER_ERROR, error_json(&message))
            }
        },
        "/status" => Reply {
            status: StatusCode::OK,
            content_type: "text/html; charset=utf-8",
            body: STATUS_PAGE.as_bytes().to_vec(),
        },
        _ => Reply::json(StatusCode::OK, status_json(state, monitor, now)),
    })
}

/// Returns why the gateway is not ready, or nothing when it is: shutdown began, the services
/// have not started, the sync lag is over its limit, or a domain has an unreachable origin and
/// an empty cache.
///
/// HTTP origins are probed with a TCP connection to each address. One is reachable when a
/// connection opens within its connect timeout (at most 2 s). Export-tree origins are
/// reachable when they have an export to serve. The cache tiers do not count entries per domain, so "an empty
/// cache" means no tier holds any entry.
pub async fn readiness(state: &GatewayState, health: &Health) -> Vec<String> {
    if health.is_draining() {
        return vec!["draining: the gateway is shutting down".into()];
    }
    let mut reasons = Vec::new();
    if !health.started.load(Ordering::Relaxed) {
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
    // With entries in the cache the origins do not decide readiness, so they are not probed.
    if cache_entries(state) == 0 {
        for problem in unreachable_origins(&state.domains).await {
            reasons.push(format!("{problem}, and the cache is empty"));
        }
    }
    reasons
}

/// Builds the `/status.json` document (fields in docs/configuration.md).
pub fn status_json(state: &GatewayState, monitor: &Monitor, now: SystemTime) -> String {
    let rejections = state.rejections.lock().clone();
    let quota_rejections = mirror_plugins::quota::rejection_counts();
    let freshness = monitor.health.sync_freshness();
    let domains: Vec<String> = state
        .domains
        .iter()
        .map(|domain| {
            let id = domain.config.id.as_str();
            let plugins: Vec<String> = rejections
                .iter()
                .filter(|((d, _), _)| d == id)
                .map(|((_, plugin), count)| format!("{}:{count}", json_string(plugin)))
                .collect();
            let summary = monitor.metrics.domain_summary(id);
            let rejections = quota_rejections_json(&quota_rejections, id);
            let usage = quota_usage_json(&mirror_plugins::quota::usage(id, now));
            let quota = QuotaJson {
                rejections: &rejections,
                usage: &usage,
            };
            domain_json(id, &summary, &plugins, quota, freshness)
        })
        .collect();
    let disk = state
        .cache
        .disk_stats()
        .map_or("null".into(), |d| tier_json(&d.tier()));
    format!(
        "{{\"time\":{:.3},\"uptime_seconds\":{:.3},\"draining\":{},\"cache\":{{\"memory\":{},\"disk\":{disk}}},\"domains\":[{}]}}\n",
        unix_seconds(now),
        monitor.metrics.uptime().as_secs_f64(),
        monitor.health.is_draining(),
        tier_json(&state.cache.memory_stats()),
        domains.join(",")
    )
}

/// Gathers what `/metrics` reads at scrape time; the quota plugin's process-wide counts are
/// limited to this gateway's domains.
fn scrape_inputs(state: &GatewayState) -> ScrapeInputs {
    let domains: Vec<String> = state.domains.iter().map(|d| d.config.id.clone()).collect();
    let mut tiers = vec![("memory", state.cache.memory_stats())];
    if let Some(disk) = state.cache.disk_stats() {
        tiers.push(("disk", disk.tier()));
    }
    let quota = mirror_plugins::quota::rejection_counts()
        .into_iter()
        .filter(|r| domains.contains(&r.domain))
        .collect();
    ScrapeInputs {
        rejections: state.rejections.lock().clone(),
        domains,
        tiers,
        quota,
    }
}

fn cache_entries(state: &GatewayState) -> u64 {
    let disk = state.cache.disk_stats().map_or(0, |d| d.entries);
    state.cache.memory_stats().entries + disk
}

/// Returns one line for each origin of `domains` that cannot be reached now, in config order.
/// The origins are probed at the same time, so the wait is that of the slowest probe.
async fn unreachable_origins(domains: &[DomainRuntime]) -> Vec<String> {
    let mut probes = tokio::task::JoinSet::new();
    let origins = domains.iter().flat_map(|domain| {
        let pairs = domain.config.origins.iter().zip(&domain.upstreams);
        pairs.map(move |(origin, upstream)| (&domain.config.id, &origin.name, upstream))
    });
    for (index, (domain, name, upstream)) in origins.enumerate() {
        let subject = format!("domain {domain}: origin {name}");
        match upstream {
            Upstream::Http {
                addresses,
                settings,
                ..
            } => {
                let (addresses, limit) = (addresses.clone(), settings.connect_timeout);
                probes.spawn(async move {
                    let result = probe_tcp(&addresses, limit.min(PROBE_TIMEOUT)).await;
                    let problem = result
                        .err()
                        .map(|e| format!("{subject} is unreachable ({e})"));
                    (index, problem)
                });
            }
            Upstream::ExportTree { tree, .. } => {
                let problem = tree.active_export().err();
                let problem = problem.map(|e| format!("{subject} has no export to serve ({e})"));
                probes.spawn(async move { (index, problem) });
            }
        }
    }
    let mut problems = Vec::new();
    while let Some(joined) = probes.join_next().await {
        match joined {
            Ok((index, Some(problem))) => problems.push((index, problem)),
            Ok((_, None)) => {}
            Err(e) => problems.push((usize::MAX, format!("an origin probe failed: {e}"))),
        }
    }
    problems.sort();
    problems.into_iter().map(|(_, problem)| problem).collect()
}

/// Connects to each address in turn until one accepts within `limit`; returns the last error.
async fn probe_tcp(addresses: &[std::net::SocketAddr], limit: Duration) -> Result<(), String> {
    let mut last = String::from("no address");
    for address in addresses {
        match tokio::time::timeout(limit, tokio::net::TcpStream::connect(address)).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => last = format!("{address}: {e}"),
            Err(_) => {
                last = format!(
                    "{address}: connect timed out after {} ms",
                    limit.as_millis()
                )
            }
        }
    }
    Err(last)
}

/// The `quota` plugin's parts of a domain's `/status.json` object, each entry already JSON.
#[derive(Clone, Copy)]
struct QuotaJson<'a> {
    rejections: &'a [String],
    usage: &'a [String],
}

/// Builds the `quota_rejections` entries of domain `id`'s `/status.json` object.
fn quota_rejections_json(
    counts: &[mirror_plugins::quota::RejectionCount],
    id: &str,
) -> Vec<String> {
    counts
        .iter()
        .filter(|r| r.domain == id)
        .map(|r| {
            let (class, reason) = (json_string(r.class), json_string(r.reason));
            format!(
                "{{\"class\":{class},\"reason\":{reason},\"count\":{}}}",
                r.count
            )
        })
        .collect()
}

/// Builds the `quota` entries of a domain's `/status.json` object.
fn quota_usage_json(usage: &[mirror_plugins::quota::ClassUsage]) -> Vec<String> {
    usage
        .iter()
        .map(|u| {
            let domain_limit = u.domain_limit.map_or("null".into(), |l| l.to_string());
            format!(
                "{{\"class\":{},\"requests_this_hour\":{},\"principal_limit\":{},\"domain_limit\":{domain_limit}}}",
                json_string(u.class),
                u.requests_this_hour,
                u.principal_limit
            )
        })
        .collect()
}

fn domain_json(
    id: &str,
    summary: &DomainSummary,
    plugins: &[String],
    quota: QuotaJson<'_>,
    freshness: Option<SyncFreshness>,
) -> String {
    let classes: Vec<String> = STATUS_CLASSES
        .iter()
        .zip(summary.by_class)
        .map(|(class, count)| format!("\"{class}\":{count}"))
        .collect();
    let last_error = summary
        .last_origin_error
        .as_ref()
        .map_or("null".into(), |e| {
            format!(
                "{{\"kind\":\"{}\",\"message\":{},\"time\":{:.3}}}",
                e.kind,
                json_string(&e.message),
                unix_seconds(e.at)
            )
        });
    let sync = match freshness {
        None => "{\"configured\":false}".to_string(),
        Some(f) => format!(
            "{{\"configured\":true,\"lag_seconds\":{},\"max_lag_seconds\":{}}}",
            f.lag
                .map_or("null".into(), |l| format!("{:.3}", l.as_secs_f64())),
            f.max_lag.as_secs_f64()
        ),
    };
    format!(
        "{{\"id\":{},\"requests\":{},\"status\":{{{}}},\"cache_hits\":{},\"cache_lookups\":{},\"body_bytes\":{},\"rejections\":{{{}}},\"quota_rejections\":[{}],\"quota\":[{}],\"origin\":{{\"errors\":{},\"last_error\":{last_error}}},\"sync\":{sync}}}",
        json_string(id),
        summary.requests,
        classes.join(","),
        summary.cache_hits,
        summary.cache_lookups,
        summary.body_bytes,
        plugins.join(","),
        quota.rejections.join(","),
        quota.usage.join(","),
        summary.origin_errors,
    )
}

fn tier_json(t: &TierSnapshot) -> String {
    format!(
        "{{\"entries\":{},\"bytes\":{},\"hits\":{},\"misses\":{},\"evictions\":{},\"write_errors\":{}}}",
        t.entries, t.bytes, t.hits, t.misses, t.evictions, t.write_errors
    )
}

fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn method_not_allowed() -> Reply {
    Reply::json(
        StatusCode::METHOD_NOT_ALLOWED,
        error_json("use GET for /healthz, /readyz, /metrics, /status and /status.json"),
    )
}

fn error_json(message: &str) -> String {
    format!("{{\"error\":{}}}\n", json_string(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_freshness_absent_without_hook() {
        assert_eq!(Health::new().sync_freshness(), None);
    }

    #[test]
    fn sync_freshness_cleared() {
        let health = Health::new();
        health.set_sync_lag_provider(Duration::from_secs(60), || None);
        health.clear_sync_lag_provider();
        assert_eq!(health.sync_freshness(), None);
    }

    #[test]
    fn sync_freshness_reads_provider() {
        let health = Health::new();
        let max_lag = Duration::from_secs(60);
        health.set_sync_lag_provider(max_lag, || Some(Duration::from_secs(90)));
        let lag = Some(Duration::from_secs(90));
        assert_eq!(
            health.sync_freshness(),
            Some(SyncFreshness { lag, max_lag })
        );
    }

    #[test]
    fn draining_flag() {
        let health = Health::new();
        assert!(!health.is_draining());
        health.start_draining();
        assert!(health.is_draining());
    }

    #[tokio::test]
    async fn lifecycle_marks_draining_on_shutdown() {
        let monitor = Arc::new(Monitor::default());
        let (sender, receiver) = tokio::sync::watch::channel(false);
        let task = tokio::spawn({
            let drain = DrainLimits {
                grace_period: Duration::ZERO,
                shutdown_timeout: Duration::ZERO,
            };
            let watch = LifecycleWatch {
                monitor: Arc::clone(&monitor),
                drain,
            };
            async move { watch.start(receiver).await }
        });
        sender.send(true).expect("send");
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("watch ends")
            .expect("join");
        assert!(monitor.health.started.load(Ordering::Relaxed));
        assert!(monitor.health.is_draining());
        assert!(monitor.health.draining_for().is_some());
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
    async fn probe_open_port() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        assert_eq!(probe_tcp(&[addr], Duration::from_secs(1)).await, Ok(()));
    }

    #[test]
    fn quota_usage_json_fields() {
        let usage = mirror_plugins::quota::ClassUsage {
            class: "index",
            requests_this_hour: 7,
            principal_limit: 100,
            domain_limit: None,
        };
        let expected = "{\"class\":\"index\",\"requests_this_hour\":7,\"principal_limit\":100,\"domain_limit\":null}";
        assert_eq!(quota_usage_json(&[usage]), [expected]);
    }

    #[test]
    fn domain_json_sync_placeholder() {
        let quota = QuotaJson {
            rejections: &[],
            usage: &[],
        };
        let json = domain_json("primary", &DomainSummary::default(), &[], quota, None);
        assert!(json.contains("\"sync\":{\"configured\":false}"), "{json}");
        assert!(json.contains("\"status\":{\"1xx\":0,\"2xx\":0"), "{json}");
    }
}
