//! Health, readiness, metrics and the live status page, as served by the admin listener.
//!
//! `GET /healthz` and `GET /readyz` respond without credentials, for probes that send none.
//! `/metrics`, `/status` and `/status.json` need admin credentials like the rest of the admin
//! API. A [`Monitor`] holds what the gateway records about itself: its [`Metrics`] and its
//! [`Health`] (whether the server started its services, whether shutdown began, and the sync
//! task's lag hook). One monitor serves a gateway instance for its whole life, across config
//! reloads.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use parking_lot::RwLock;
use pingora::server::ShutdownWatch;
use pingora::services::background::{background_service, BackgroundService, GenBackgroundService};

use crate::admin::json_string;
use crate::cache::TierSnapshot;
use crate::gateway::GatewayState;
use crate::metrics::{DomainSummary, Metrics, ScrapeInputs, STATUS_CLASSES};
use crate::readiness::{domains_readiness, DomainReadiness};

/// The status page: one self-contained HTML file with inline CSS and JavaScript.
pub const STATUS_PAGE: &str = include_str!("status_page.html");

/// The metrics and health of a gateway instance, shared by its proxy and admin services.
#[derive(Default)]
pub struct Monitor {
    pub metrics: Metrics,
    pub health: Health,
    /// Client connections open on the proxy's listeners.
    pub connections: Arc<Connections>,
}

/// A count of open client connections, so that a graceful shutdown can end once none is left.
#[derive(Debug, Default)]
pub struct Connections(AtomicUsize);

impl Connections {
    /// Counts one more open connection until the returned guard is dropped.
    pub fn open(self: &Arc<Self>) -> OpenConnection {
        self.0.fetch_add(1, Ordering::SeqCst);
        OpenConnection(Arc::clone(self))
    }

    /// Returns how many connections are open.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// One open connection of [`Connections`].
pub struct OpenConnection(Arc<Connections>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::SeqCst);
    }
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

    /// Returns whether the server started its services.
    pub fn is_started(&self) -> bool {
        self.started.load(Ordering::Relaxed)
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
        self.into_response_allowing("GET, HEAD")
    }

    /// Turns the reply into a response, with `allow` as the `Allow` field of a 405.
    pub fn into_response_allowing(self, allow: &str) -> Response<Vec<u8>> {
        let mut builder = Response::builder()
            .status(self.status)
            .header(http::header::CONTENT_TYPE, self.content_type)
            .header(http::header::CACHE_CONTROL, "no-store")
            .header(http::header::CONTENT_LENGTH, self.body.len());
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            builder = builder.header(http::header::ALLOW, allow);
        }
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
    let reasons = crate::readiness::readiness(state, &monitor.health).await;
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
pub async fn admin_endpoint(
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
        _ => {
            let readiness = domains_readiness(state).await;
            Reply::json(StatusCode::OK, status_json(state, monitor, &readiness, now))
        }
    })
}

/// Builds the `/status.json` document (fields in docs/configuration.md) with the domains'
/// readiness verdicts.
pub fn status_json(
    state: &GatewayState,
    monitor: &Monitor,
    readiness: &[DomainReadiness],
    now: SystemTime,
) -> String {
    let rejections = state.rejections.lock().clone();
    let quota_rejections = mirror_plugins::quota::rejection_counts();
    let freshness = monitor.health.sync_freshness();
    let domains: Vec<String> = state
        .domains
        .iter()
        .map(|domain| {
            let id = domain.config.id.as_str();
            let mut by_plugin: std::collections::BTreeMap<&str, u64> = Default::default();
            for ((_, plugin, _), count) in rejections.iter().filter(|((d, _, _), _)| d == id) {
                *by_plugin.entry(plugin).or_default() += count;
            }
            let plugins: Vec<String> = by_plugin
                .iter()
                .map(|(plugin, count)| format!("{}:{count}", json_string(plugin)))
                .collect();
            let summary = monitor.metrics.domain_summary(id);
            let rejections = quota_rejections_json(&quota_rejections, id);
            let usage = quota_usage_json(&mirror_plugins::quota::usage(id, now));
            let quota = QuotaJson {
                rejections: &rejections,
                usage: &usage,
            };
            let verdict = readiness.iter().find(|r| r.id == id);
            domain_json(id, &summary, &plugins, quota, freshness, verdict)
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
    readiness: Option<&DomainReadiness>,
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
    let readiness = readiness.map_or("null".into(), readiness_json);
    format!(
        "{{\"id\":{},\"requests\":{},\"status\":{{{}}},\"cache_hits\":{},\"cache_lookups\":{},\"body_bytes\":{},\"rejections\":{{{}}},\"quota_rejections\":[{}],\"quota\":[{}],\"origin\":{{\"errors\":{},\"last_error\":{last_error}}},\"sync\":{sync},\"readiness\":{readiness}}}",
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

fn readiness_json(verdict: &DomainReadiness) -> String {
    let problems: Vec<String> = verdict
        .origin_problems
        .iter()
        .map(|p| json_string(p))
        .collect();
    format!(
        "{{\"servable\":{},\"cache_entries\":{},\"origins_probed\":{},\"problems\":[{}]}}",
        verdict.servable(),
        verdict.cache_entries,
        verdict.origins_probed,
        problems.join(",")
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
        let json = domain_json("primary", &DomainSummary::default(), &[], quota, None, None);
        assert!(json.contains("\"sync\":{\"configured\":false}"), "{json}");
        assert!(json.contains("\"status\":{\"1xx\":0,\"2xx\":0"), "{json}");
    }
}
