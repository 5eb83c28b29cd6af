//! Prometheus metrics of one gateway instance, kept in the instance's own registry.
//!
//! Per-request metrics are updated as requests end. The cache tiers' counters and the plugins'
//! rejection counts are read when `/metrics` is scraped ([`Metrics::render`]), so they always
//! match `/cache/stats` and `/limits/stats`. Every metric is prefixed
//! `mirror_gateway_`, uses base units (seconds, bytes) and ends counters in `_total`.
//!
//! Label values come from the config or from fixed sets, never from raw request data, so the
//! number of series stays bounded: `domain` is a configured domain id (`-` for requests that
//! matched no domain), `method` is `GET`, `HEAD` or `other`, `status_class` is one of
//! [`STATUS_CLASSES`], and `cache_status` is an `X-Cache-Status` value.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Mutex, RwLock};
use pingora_prometheus::prometheus::core::Collector;
use pingora_prometheus::prometheus::proto::{Metric, MetricFamily};
use pingora_prometheus::prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::cache::TierSnapshot;
use crate::proxy_protocol::Rejection;
use crate::tls::HandshakeFailure;

/// The `Content-Type` of the text exposition format that [`Metrics::render`] writes.
pub const CONTENT_TYPE: &str = pingora_prometheus::prometheus::TEXT_FORMAT;

/// Values of the `status_class` label, in the order of [`DomainSummary::by_class`]; `none` is a
/// request that ended before a response header was sent (the client went away).
pub const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

/// `X-Cache-Status` values that count as served from the cache in the hit ratio.
const CACHE_HITS: [&str; 4] = ["HIT", "STALE", "UPDATING", "REVALIDATED"];
/// `X-Cache-Status` values of cache lookups that the origin served.
const CACHE_MISSES: [&str; 2] = ["MISS", "EXPIRED"];

/// Histogram buckets in seconds: from a memory hit to a multi-gigabyte bundle download.
const DURATION_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Maximum length of an origin error message kept for the status page, in bytes.
const MAX_ERROR_MESSAGE: usize = 300;

/// The metrics of one gateway instance. Shared by the states that config reloads make, so
/// counters continue across reloads.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    body_bytes: IntCounterVec,
    request_duration: HistogramVec,
    upstream_duration: HistogramVec,
    origin_errors: IntCounterVec,
    tls_handshakes: IntCounterVec,
    tls_failures: IntCounterVec,
    proxy_protocol_rejections: IntCounterVec,
    proxy_protocol_ignored: IntCounterVec,
    reloads: IntCounterVec,
    last_reload_ok: IntGaugeVec,
    last_reload_time: IntGaugeVec,
    sync_runs: IntCounterVec,
    sync_lag: GaugeVec,
    sync_last_success: IntGaugeVec,
    sync_export_time: IntGaugeVec,
    tallies: RwLock<HashMap<String, Arc<DomainTally>>>,
    started: Instant,
}

/// A finished client request, as recorded in the gateway's logging phase.
#[derive(Debug, Clone, Copy)]
pub struct RequestRecord<'a> {
    /// The domain id, or `None` when the request matched no domain.
    pub domain: Option<&'a str>,
    pub method: &'a http::Method,
    /// The status sent downstream; 0 when no response header was sent.
    pub status: u16,
    /// The `X-Cache-Status` value.
    pub cache_status: &'a str,
    pub body_bytes: u64,
    pub duration: Duration,
    /// True for the gateway's own background refresh of a stale entry, which is not counted.
    pub background: bool,
}

/// The last origin failure of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginError {
    /// The `kind` label: `connect`, `timeout`, `status_5xx` or `other`.
    pub kind: &'static str,
    pub message: String,
    pub at: SystemTime,
}

/// Counters of one domain since the gateway started, for the status page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainSummary {
    pub requests: u64,
    /// Requests per status class, in the order of [`STATUS_CLASSES`].
    pub by_class: [u64; 6],
    /// Requests served from the cache (`HIT`, `STALE`, `UPDATING`, `REVALIDATED`).
    pub cache_hits: u64,
    /// Requests that looked up the cache: the hits plus `MISS` and `EXPIRED`.
    pub cache_lookups: u64,
    pub body_bytes: u64,
    pub origin_errors: u64,
    pub last_origin_error: Option<OriginError>,
}

/// Requests that plugins rejected, by domain id, plugin label (`rejected_by`) and the
/// plugin's reason (`rejected_reason`), if it gives one.
pub type Rejections = BTreeMap<(String, &'static str, Option<&'static str>), u64>;

/// Inputs that [`Metrics::render`] reads at scrape time besides the registry.
#[derive(Debug, Clone, Default)]
pub struct ScrapeInputs {
    /// The configured domain ids; `auth_failures_total` starts at 0 for each.
    pub domains: Vec<String>,
    /// Each cache tier's label (`memory`, `disk`) and counters.
    pub tiers: Vec<(&'static str, TierSnapshot)>,
    /// Requests rejected by plugins, by domain id, plugin label and reason.
    pub rejections: Rejections,
    /// The `quota` plugin's rejections of these domains.
    pub quota: Vec<mirror_plugins::quota::RejectionCount>,
}

/// When a request started talking to its origin; a field of the request's context.
#[derive(Debug, Clone, Copy, Default)]
pub struct UpstreamTimer {
    started: Option<Instant>,
}

impl UpstreamTimer {
    /// Records the start of the origin exchange at `now`, unless an earlier attempt did.
    pub fn start(&mut self, now: Instant) {
        self.started.get_or_insert(now);
    }

    /// Returns the time from the first [`Self::start`] to `now`, if it was started.
    pub fn elapsed(&self, now: Instant) -> Option<Duration> {
        self.started
            .map(|start| now.saturating_duration_since(start))
    }
}

impl Metrics {
    /// Creates the metrics and registers them in a new registry of their own, so several
    /// gateways in one process never share or clash.
    pub fn new() -> Self {
        let registry = Registry::new();
        let add = Registrar(&registry);
        Self {
            requests: add.counter(REQUESTS, &REQUEST_LABELS),
            body_bytes: add.counter(BODY_BYTES, &["domain"]),
            request_duration: add.histogram(REQUEST_DURATION),
            upstream_duration: add.histogram(UPSTREAM_DURATION),
            origin_errors: add.counter(ORIGIN_ERRORS, &["domain", "kind"]),
            tls_handshakes: add.counter(TLS_HANDSHAKES, &["domain", "result"]),
            tls_failures: add.counter(TLS_FAILURES, &["domain", "reason"]),
            proxy_protocol_rejections: add.counter(PROXY_PROTOCOL_REJECTIONS, &["reason"]),
            proxy_protocol_ignored: add.counter(PROXY_PROTOCOL_IGNORED, &[]),
            reloads: add.counter(RELOADS, &["result"]),
            last_reload_ok: add.register(IntGaugeVec::new(opts(LAST_RELOAD_OK), &[])),
            last_reload_time: add.register(IntGaugeVec::new(opts(LAST_RELOAD_TIME), &[])),
            sync_runs: add.counter(SYNC_RUNS, &["job", "result"]),
            sync_lag: add.register(GaugeVec::new(opts(SYNC_LAG), &["job"])),
            sync_last_success: add.register(IntGaugeVec::new(opts(SYNC_LAST_SUCCESS), &["job"])),
            sync_export_time: add.register(IntGaugeVec::new(opts(SYNC_EXPORT_TIME), &["job"])),
            tallies: RwLock::new(HashMap::new()),
            started: Instant::now(),
            registry,
        }
    }

    /// Counts a finished client request: its status class, cache outcome, body bytes and
    /// duration. Background refreshes are skipped.
    pub fn observe_request(&self, record: &RequestRecord<'_>) {
        if record.background {
            return;
        }
        let class = status_class(record.status);
        let method = match record.method.as_str() {
            "GET" => "GET",
            "HEAD" => "HEAD",
            _ => "other",
        };
        let Some(domain) = record.domain else {
            let labels = ["-", method, STATUS_CLASSES[class], record.cache_status];
            self.requests.with_label_values(&labels).inc();
            self.body_bytes
                .with_label_values(&["-"])
                .inc_by(record.body_bytes);
            self.request_duration
                .with_label_values(&["-"])
                .observe(record.duration.as_secs_f64());
            return;
        };
        let tally = self.tally(domain);
        let series = tally.series.get_or_init(|| DomainSeries {
            body_bytes: self.body_bytes.with_label_values(&[domain]),
            duration: self.request_duration.with_label_values(&[domain]),
            requests: RwLock::new(Vec::new()),
        });
        series
            .request_counter(method, class, record.cache_status, || {
                let labels = [domain, method, STATUS_CLASSES[class], record.cache_status];
                self.requests.with_label_values(&labels)
            })
            .inc();
        series.body_bytes.inc_by(record.body_bytes);
        series.duration.observe(record.duration.as_secs_f64());
        tally.requests.fetch_add(1, Ordering::Relaxed);
        tally.by_class[class].fetch_add(1, Ordering::Relaxed);
        tally
            .body_bytes
            .fetch_add(record.body_bytes, Ordering::Relaxed);
        let hit = CACHE_HITS.contains(&record.cache_status);
        if hit || CACHE_MISSES.contains(&record.cache_status) {
            tally.cache_lookups.fetch_add(1, Ordering::Relaxed);
        }
        if hit {
            tally.cache_hits.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records an origin response header with `status`, `elapsed` after the request first
    /// requested an origin peer. A 5xx status counts as an origin error of kind `status_5xx`.
    pub fn upstream_response(
        &self,
        domain: Option<&str>,
        status: u16,
        elapsed: Option<Duration>,
        now: SystemTime,
    ) {
        let label = domain.unwrap_or("-");
        if let Some(elapsed) = elapsed {
            self.upstream_duration
                .with_label_values(&[label])
                .observe(elapsed.as_secs_f64());
        }
        if status >= 500 {
            let message = format!("the origin responded with status {status}");
            self.count_origin_error(domain, "status_5xx", message, now);
        }
    }

    /// Counts an error that ended or interrupted a request's exchange with its origin, by kind:
    /// `connect`, `timeout` or `other`. Errors not caused by the origin (client side, internal)
    /// and errors carrying an HTTP status (counted by [`Self::upstream_response`], or the
    /// gateway's own origin-slot limit) are ignored.
    pub fn origin_error(&self, domain: Option<&str>, error: &pingora::Error, now: SystemTime) {
        if let Some(kind) = origin_error_kind(error) {
            let mut message = error.to_string();
            truncate_at_char(&mut message, MAX_ERROR_MESSAGE);
            self.count_origin_error(domain, kind, message, now);
        }
    }

    /// Counts a TLS handshake with a client, for the TLS listener to call once per handshake:
    /// `Ok` for one that completed (resumed ones included), `Err` with the reason for one that
    /// failed.
    ///
    /// `domain` must be a configured domain id, or `-` when no domain is known. Never pass the
    /// raw SNI name, because clients could then create series at will. Metrics:
    /// `mirror_gateway_tls_handshakes_total{domain,result="ok"|"error"}` and, for failures,
    /// `mirror_gateway_tls_handshake_failures_total{domain,reason}`.
    pub fn tls_handshake(&self, domain: &str, outcome: Result<(), HandshakeFailure>) {
        self.tls_handshakes
            .with_label_values(&[domain, result_label(outcome.is_ok())])
            .inc();
        if let Err(reason) = outcome {
            self.tls_failures
                .with_label_values(&[domain, reason.label()])
                .inc();
        }
    }

    /// Counts a connection closed while its PROXY protocol header was read:
    /// `mirror_gateway_proxy_protocol_rejections_total{reason}`.
    pub fn proxy_protocol_rejected(&self, reason: Rejection) {
        self.proxy_protocol_rejections
            .with_label_values(&[reason.label()])
            .inc();
    }

    /// Counts a PROXY protocol header that was read and ignored because its peer is not a
    /// trusted proxy: `mirror_gateway_proxy_protocol_ignored_total`.
    pub fn proxy_protocol_ignored(&self) {
        self.proxy_protocol_ignored
            .with_label_values(&[] as &[&str])
            .inc();
    }

    /// Counts a config reload, for the reload code to call once per attempt. Metrics:
    /// `mirror_gateway_config_reloads_total{result}`,
    /// `mirror_gateway_config_last_reload_successful` (1 or 0) and
    /// `mirror_gateway_config_last_reload_timestamp_seconds`.
    pub fn reload(&self, ok: bool) {
        self.reloads.with_label_values(&[result_label(ok)]).inc();
        self.last_reload_ok
            .with_label_values(&[] as &[&str])
            .set(i64::from(ok));
        self.last_reload_time
            .with_label_values(&[] as &[&str])
            .set(unix_now());
    }

    /// Counts a finished run of sync job `job`, for the sync task to call, with the job's lag
    /// in seconds (now minus the source export's time) and that export time, when known.
    /// Metrics: `mirror_gateway_sync_runs_total{job,result}`,
    /// `mirror_gateway_sync_lag_seconds{job}`,
    /// `mirror_gateway_sync_source_export_timestamp_seconds{job}` and
    /// `mirror_gateway_sync_last_success_timestamp_seconds{job}`.
    pub fn sync_run(&self, job: &str, ok: bool, lag_secs: f64, export_time: Option<SystemTime>) {
        self.sync_runs
            .with_label_values(&[job, result_label(ok)])
            .inc();
        self.sync_lag.with_label_values(&[job]).set(lag_secs);
        if let Some(time) = export_time {
            let secs = time
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            self.sync_export_time
                .with_label_values(&[job])
                .set(i64::try_from(secs).unwrap_or(i64::MAX));
        }
        if ok {
            self.sync_last_success
                .with_label_values(&[job])
                .set(unix_now());
        }
    }

    /// Removes the gauges of a sync job that a reload removed, so that no stale lag stays
    /// behind. Its run counters stay, as counters do.
    pub fn remove_sync_job(&self, job: &str) {
        let _ = self.sync_lag.remove_label_values(&[job]);
        let _ = self.sync_export_time.remove_label_values(&[job]);
        let _ = self.sync_last_success.remove_label_values(&[job]);
    }

    /// Returns the counters of `domain` since the gateway started (zeros for an unknown id).
    pub fn domain_summary(&self, domain: &str) -> DomainSummary {
        let Some(tally) = self.tallies.read().get(domain).cloned() else {
            return DomainSummary::default();
        };
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let last_error = tally.last_origin_error.lock().clone();
        DomainSummary {
            requests: load(&tally.requests),
            by_class: std::array::from_fn(|i| load(&tally.by_class[i])),
            cache_hits: load(&tally.cache_hits),
            cache_lookups: load(&tally.cache_lookups),
            body_bytes: load(&tally.body_bytes),
            origin_errors: load(&tally.origin_errors),
            last_origin_error: last_error,
        }
    }

    /// Returns how long ago these metrics were created.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Writes every metric in the text exposition format ([`CONTENT_TYPE`]): the registry's
    /// and those read from `inputs`.
    pub fn render(&self, inputs: &ScrapeInputs) -> Result<String, String> {
        let mut families = self.registry.gather();
        families.extend(scrape_families(inputs).map_err(|e| e.to_string())?);
        families.sort_by(|a, b| a.name().cmp(b.name()));
        sort_series(&mut families);
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&families, &mut out)
            .map_err(|e| format!("cannot encode the metrics: {e}"))?;
        String::from_utf8(out).map_err(|e| format!("the metrics are not UTF-8: {e}"))
    }

    fn tally(&self, domain: &str) -> Arc<DomainTally> {
        if let Some(tally) = self.tallies.read().get(domain) {
            return Arc::clone(tally);
        }
        let mut tallies = self.tallies.write();
        Arc::clone(tallies.entry(domain.to_string()).or_default())
    }

    fn count_origin_error(
        &self,
        domain: Option<&str>,
        kind: &'static str,
        message: String,
        at: SystemTime,
    ) {
        self.origin_errors
            .with_label_values(&[domain.unwrap_or("-"), kind])
            .inc();
        if let Some(domain) = domain {
            let tally = self.tally(domain);
            tally.origin_errors.fetch_add(1, Ordering::Relaxed);
            *tally.last_origin_error.lock() = Some(OriginError { kind, message, at });
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Message of the `expect`s on metric definitions: they are constants, checked by the tests.
const DEFINITION: &str = "the metric definitions are valid and registered once";

/// A metric's name and help text.
type Definition = (&'static str, &'static str);

const REQUEST_LABELS: [&str; 4] = ["domain", "method", "status_class", "cache_status"];
const REQUESTS: Definition = (
    "mirror_gateway_requests_total",
    "Client requests that ended, by domain, method, status class and X-Cache-Status.",
);
const BODY_BYTES: Definition = (
    "mirror_gateway_response_body_bytes_total",
    "Response body bytes sent to clients.",
);
const REQUEST_DURATION: Definition = (
    "mirror_gateway_request_duration_seconds",
    "Time from the start of a client request to the end of its response.",
);
const UPSTREAM_DURATION: Definition = (
    "mirror_gateway_upstream_duration_seconds",
    "Time from choosing an origin peer to the origin's response header.",
);
const ORIGIN_ERRORS: Definition = (
    "mirror_gateway_origin_errors_total",
    "Failed origin exchanges, by kind: connect, timeout, status_5xx, other.",
);
const TLS_HANDSHAKES: Definition = (
    "mirror_gateway_tls_handshakes_total",
    "TLS handshakes with clients, by domain and result.",
);
const TLS_FAILURES: Definition = (
    "mirror_gateway_tls_handshake_failures_total",
    "Failed TLS handshakes with clients, by domain and reason.",
);
const PROXY_PROTOCOL_REJECTIONS: Definition = (
    "mirror_gateway_proxy_protocol_rejections_total",
    "Client connections closed while their PROXY protocol header was read, by reason.",
);
const PROXY_PROTOCOL_IGNORED: Definition = (
    "mirror_gateway_proxy_protocol_ignored_total",
    "PROXY protocol headers read and ignored because the peer is not a trusted proxy.",
);
const RELOADS: Definition = (
    "mirror_gateway_config_reloads_total",
    "Config reload attempts, by result.",
);
const LAST_RELOAD_OK: Definition = (
    "mirror_gateway_config_last_reload_successful",
    "1 if the last config reload succeeded, 0 if it failed.",
);
const SYNC_RUNS: Definition = (
    "mirror_gateway_sync_runs_total",
    "Finished sync runs, by job and result.",
);
const SYNC_LAG: Definition = (
    "mirror_gateway_sync_lag_seconds",
    "Time from the source export's time to the end of the job's last run.",
);
const SYNC_EXPORT_TIME: Definition = (
    "mirror_gateway_sync_source_export_timestamp_seconds",
    "Unix time the source made the export the job serves, by job.",
);

const LAST_RELOAD_TIME: Definition = (
    "mirror_gateway_config_last_reload_timestamp_seconds",
    "Unix time of the last config reload attempt.",
);
const SYNC_LAST_SUCCESS: Definition = (
    "mirror_gateway_sync_last_success_timestamp_seconds",
    "Unix time of the last successful run, by job.",
);

/// Returns the current Unix time in whole seconds.
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn opts((name, help): Definition) -> Opts {
    Opts::new(name, help)
}

/// Creates metrics and registers them in one registry.
struct Registrar<'a>(&'a Registry);

impl Registrar<'_> {
    fn register<C: Collector + Clone + 'static>(&self, metric: Result<C, PromError>) -> C {
        let metric = metric.expect(DEFINITION);
        self.0.register(Box::new(metric.clone())).expect(DEFINITION);
        metric
    }

    fn counter(&self, definition: Definition, labels: &[&str]) -> IntCounterVec {
        self.register(IntCounterVec::new(opts(definition), labels))
    }

    fn histogram(&self, definition: Definition) -> HistogramVec {
        let opts = HistogramOpts::from(opts(definition)).buckets(DURATION_BUCKETS.to_vec());
        self.register(HistogramVec::new(opts, &["domain"]))
    }
}

/// Per-domain counters behind [`DomainSummary`].
#[derive(Default)]
struct DomainTally {
    requests: AtomicU64,
    by_class: [AtomicU64; 6],
    cache_hits: AtomicU64,
    cache_lookups: AtomicU64,
    body_bytes: AtomicU64,
    origin_errors: AtomicU64,
    last_origin_error: Mutex<Option<OriginError>>,
    /// The domain's Prometheus series that every request updates, looked up once instead of
    /// by their labels on every request.
    series: OnceLock<DomainSeries>,
}

/// Handles on the request series of one domain. Request series are never removed from the
/// registry, so a handle stays valid for the life of the process.
struct DomainSeries {
    body_bytes: IntCounter,
    duration: Histogram,
    /// The `requests` counters seen so far, by method, status class and cache status.
    requests: RwLock<Vec<RequestSeries>>,
}

struct RequestSeries {
    method: &'static str,
    class: usize,
    cache_status: String,
    counter: IntCounter,
}

impl DomainSeries {
    /// Returns the `requests` counter of a method, class and cache status, made by `make` the
    /// first time.
    fn request_counter(
        &self,
        method: &'static str,
        class: usize,
        cache_status: &str,
        make: impl FnOnce() -> IntCounter,
    ) -> IntCounter {
        let matches = |s: &RequestSeries| {
            s.method == method && s.class == class && s.cache_status == cache_status
        };
        if let Some(series) = self.requests.read().iter().find(|s| matches(s)) {
            return series.counter.clone();
        }
        let mut all = self.requests.write();
        if let Some(series) = all.iter().find(|s| matches(s)) {
            return series.counter.clone();
        }
        let counter = make();
        all.push(RequestSeries {
            method,
            class,
            cache_status: cache_status.to_owned(),
            counter: counter.clone(),
        });
        counter
    }
}

/// Returns the index in [`STATUS_CLASSES`] of `status`.
fn status_class(status: u16) -> usize {
    match status {
        100..=599 => usize::from(status / 100 - 1),
        _ => 5,
    }
}

fn result_label(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "error"
    }
}

/// Returns the `kind` label of an origin error, or `None` when the origin did not cause it.
fn origin_error_kind(error: &pingora::Error) -> Option<&'static str> {
    use pingora::ErrorType::*;
    if error.esource() != &pingora::ErrorSource::Upstream {
        return None;
    }
    Some(match error.etype() {
        HTTPStatus(_) => return None,
        ConnectTimedout | TLSHandshakeTimedout | ReadTimedout | WriteTimedout => "timeout",
        ConnectRefused | ConnectNoRoute | ConnectError | ConnectProxyFailure | BindError
        | SocketError | TLSHandshakeFailure | TLSWantX509Lookup | InvalidCert | HandshakeError => {
            "connect"
        }
        _ => "other",
    })
}

/// Cuts `text` to at most `max` bytes, at a character boundary.
fn truncate_at_char(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

/// Builds the families read at scrape time: cache tiers, plugin rejections, auth failures.
/// Orders the series of each family by their labels, so that two scrapes list them alike.
fn sort_series(families: &mut [MetricFamily]) {
    let labels = |m: &Metric| -> Vec<(String, String)> {
        m.get_label()
            .iter()
            .map(|pair| (pair.name().to_owned(), pair.value().to_owned()))
            .collect()
    };
    for family in families {
        family.mut_metric().sort_by_key(labels);
    }
}

fn scrape_families(inputs: &ScrapeInputs) -> Result<Vec<MetricFamily>, PromError> {
    let mut families = tier_families(&inputs.tiers)?;
    families.extend(rejection_families(inputs)?);
    // The text encoder refuses a family without series.
    families.retain(|family| !family.get_metric().is_empty());
    Ok(families)
}

const CACHE_ENTRIES: Definition = (
    "mirror_gateway_cache_entries",
    "Responses stored in the tier.",
);
const CACHE_BYTES: Definition = (
    "mirror_gateway_cache_bytes",
    "Bytes stored in the tier: response bodies in memory, whole entry files (metadata included) on disk.",
);
const CACHE_HITS_TOTAL: Definition = (
    "mirror_gateway_cache_hits_total",
    "Lookups that found the entry in the tier.",
);
const CACHE_MISSES_TOTAL: Definition = (
    "mirror_gateway_cache_misses_total",
    "Lookups that did not find the entry in the tier.",
);
const CACHE_EVICTIONS: Definition = (
    "mirror_gateway_cache_evictions_total",
    "Entries dropped to keep the tier within its byte budget.",
);
const CACHE_WRITE_ERRORS: Definition = (
    "mirror_gateway_cache_write_errors_total",
    "Failed writes to the tier.",
);
const CACHE_CORRUPT_ENTRIES: Definition = (
    "mirror_gateway_cache_corrupt_entries_total",
    "Damaged entries found in the tier and deleted (disk tier only).",
);
const CACHE_EXPIRED_ENTRIES: Definition = (
    "mirror_gateway_cache_expired_entries_total",
    "Entries deleted from the tier by the sweep after their stale windows ended (disk tier only).",
);
const REJECTIONS: Definition = (
    "mirror_gateway_rejections_total",
    "Requests that a plugin rejected with its own response, by plugin.",
);
const AUTH_FAILURES: Definition = (
    "mirror_gateway_auth_failures_total",
    "Requests that the htpasswd plugin rejected with 401: missing or wrong credentials.",
);
const RATE_LIMIT_REJECTIONS: Definition = (
    "mirror_gateway_rate_limit_rejections_total",
    "Requests the rate_limit plugin rejected, by reason: rate or concurrency.",
);
const QUOTA_REJECTIONS: Definition = (
    "mirror_gateway_quota_rejections_total",
    "Requests the quota plugin rejected, by class and reason.",
);

type PromError = pingora_prometheus::prometheus::Error;

/// Builds the cache tier families from the tiers' counters.
fn tier_families(tiers: &[(&'static str, TierSnapshot)]) -> Result<Vec<MetricFamily>, PromError> {
    let gauge = |definition| IntGaugeVec::new(opts(definition), &["tier"]);
    let counter = |definition| IntCounterVec::new(opts(definition), &["tier"]);
    let (entries, bytes) = (gauge(CACHE_ENTRIES)?, gauge(CACHE_BYTES)?);
    let hits = counter(CACHE_HITS_TOTAL)?;
    let misses = counter(CACHE_MISSES_TOTAL)?;
    let evictions = counter(CACHE_EVICTIONS)?;
    let write_errors = counter(CACHE_WRITE_ERRORS)?;
    let corrupt = counter(CACHE_CORRUPT_ENTRIES)?;
    let expired = counter(CACHE_EXPIRED_ENTRIES)?;
    for (tier, t) in tiers {
        let label = [*tier];
        entries
            .with_label_values(&label)
            .set(saturating_i64(t.entries));
        bytes.with_label_values(&label).set(saturating_i64(t.bytes));
        hits.with_label_values(&label).inc_by(t.hits);
        misses.with_label_values(&label).inc_by(t.misses);
        evictions.with_label_values(&label).inc_by(t.evictions);
        write_errors
            .with_label_values(&label)
            .inc_by(t.write_errors);
        if let Some(count) = t.corrupt_entries {
            corrupt.with_label_values(&label).inc_by(count);
        }
        if let Some(count) = t.expired_entries {
            expired.with_label_values(&label).inc_by(count);
        }
    }
    let collectors: [&dyn Collector; 8] = [
        &entries,
        &bytes,
        &hits,
        &misses,
        &evictions,
        &write_errors,
        &corrupt,
        &expired,
    ];
    Ok(collectors.iter().flat_map(|c| c.collect()).collect())
}

/// Builds the rejection, auth failure, rate limit and quota families. Auth failures are the
/// `htpasswd` plugin's rejections, and start at 0 for every configured domain.
fn rejection_families(inputs: &ScrapeInputs) -> Result<Vec<MetricFamily>, PromError> {
    let rejections = IntCounterVec::new(opts(REJECTIONS), &["domain", "plugin"])?;
    let auth = IntCounterVec::new(opts(AUTH_FAILURES), &["domain"])?;
    let rate_limit = IntCounterVec::new(opts(RATE_LIMIT_REJECTIONS), &["domain", "reason"])?;
    for domain in &inputs.domains {
        auth.with_label_values(&[domain]);
    }
    for ((domain, plugin, reason), count) in &inputs.rejections {
        rejections
            .with_label_values(&[domain.as_str(), plugin])
            .inc_by(*count);
        match (*plugin, reason) {
            (mirror_plugins::htpasswd::REJECTED_BY, _) => {
                auth.with_label_values(&[domain]).inc_by(*count);
            }
            (mirror_plugins::rate_limit::REJECTED_BY, Some(reason)) => {
                rate_limit
                    .with_label_values(&[domain.as_str(), reason])
                    .inc_by(*count);
            }
            _ => {}
        }
    }
    let quota = IntCounterVec::new(opts(QUOTA_REJECTIONS), &["domain", "class", "reason"])?;
    for r in &inputs.quota {
        quota
            .with_label_values(&[&r.domain, r.class, r.reason])
            .inc_by(r.count);
    }
    let collectors: [&dyn Collector; 4] = [&rejections, &auth, &rate_limit, &quota];
    Ok(collectors.iter().flat_map(|c| c.collect()).collect())
}

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record<'a>(
        domain: Option<&'a str>,
        status: u16,
        cache_status: &'a str,
    ) -> RequestRecord<'a> {
        RequestRecord {
            domain,
            method: &http::Method::GET,
            status,
            cache_status,
            body_bytes: 10,
            duration: Duration::from_millis(3),
            background: false,
        }
    }

    #[test]
    fn series_sorted_by_labels() {
        let series = |domain: &str| {
            let mut pair = pingora_prometheus::prometheus::proto::LabelPair::default();
            pair.set_name("domain".to_owned());
            pair.set_value(domain.to_owned());
            let mut metric = Metric::default();
            metric.set_label(vec![pair]);
            metric
        };
        let mut family = MetricFamily::default();
        family.set_name("x".to_owned());
        family.set_metric(vec![series("b"), series("c"), series("a")]);
        let mut families = [family];
        sort_series(&mut families);
        let order: Vec<&str> = families[0]
            .get_metric()
            .iter()
            .map(|m| m.get_label()[0].value())
            .collect();
        assert_eq!(order, ["a", "b", "c"]);
    }

    #[test]
    fn render_names_request_series() {
        let metrics = Metrics::new();
        metrics.observe_request(&record(Some("primary"), 200, "HIT"));
        let text = metrics.render(&ScrapeInputs::default()).expect("render");
        let line = "mirror_gateway_requests_total{cache_status=\"HIT\",domain=\"primary\",method=\"GET\",status_class=\"2xx\"} 1";
        assert!(text.contains(line), "{text}");
    }

    #[test]
    fn render_counts_each_series_apart() {
        let metrics = Metrics::new();
        let mut head = record(Some("primary"), 200, "HIT");
        head.method = &http::Method::HEAD;
        for r in [
            record(Some("primary"), 200, "HIT"),
            record(Some("primary"), 200, "MISS"),
            record(Some("primary"), 200, "HIT"),
            head,
            record(Some("other"), 200, "HIT"),
            record(None, 421, "BYPASS"),
        ] {
            metrics.observe_request(&r);
        }
        let text = metrics.render(&ScrapeInputs::default()).expect("render");
        let series = |domain: &str, method: &str, class: &str, cache: &str, n: u32| {
            format!(
                "mirror_gateway_requests_total{{cache_status=\"{cache}\",domain=\"{domain}\",\
                 method=\"{method}\",status_class=\"{class}\"}} {n}\n"
            )
        };
        for line in [
            series("primary", "GET", "2xx", "HIT", 2),
            series("primary", "GET", "2xx", "MISS", 1),
            series("primary", "HEAD", "2xx", "HIT", 1),
            series("other", "GET", "2xx", "HIT", 1),
            series("-", "GET", "4xx", "BYPASS", 1),
        ] {
            assert!(text.contains(&line), "{line} missing from {text}");
        }
        let bytes = "mirror_gateway_response_body_bytes_total{domain=\"primary\"} 40\n";
        assert!(text.contains(bytes), "{text}");
    }

    #[test]
    fn two_instances_do_not_share() {
        let (a, b) = (Metrics::new(), Metrics::new());
        a.observe_request(&record(Some("primary"), 200, "MISS"));
        assert_eq!(a.domain_summary("primary").requests, 1);
        assert_eq!(b.domain_summary("primary").requests, 0);
    }

    #[test]
    fn summary_counts_classes_and_hits() {
        let metrics = Metrics::new();
        for (status, cache) in [(200, "HIT"), (200, "MISS"), (404, "BYPASS"), (0, "BYPASS")] {
            metrics.observe_request(&record(Some("primary"), status, cache));
        }
        let summary = metrics.domain_summary("primary");
        assert_eq!(summary.by_class, [0, 2, 0, 1, 0, 1]);
        assert_eq!((summary.cache_hits, summary.cache_lookups), (1, 2));
        assert_eq!(summary.body_bytes, 40);
    }

    #[test]
    fn background_refresh_not_counted() {
        let metrics = Metrics::new();
        let mut background = record(Some("primary"), 200, "MISS");
        background.background = true;
        metrics.observe_request(&background);
        assert_eq!(metrics.domain_summary("primary").requests, 0);
    }

    #[test]
    fn upstream_5xx_is_origin_error() {
        let metrics = Metrics::new();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        metrics.upstream_response(Some("primary"), 503, Some(Duration::from_millis(5)), now);
        metrics.upstream_response(Some("primary"), 200, None, now);
        let summary = metrics.domain_summary("primary");
        assert_eq!(summary.origin_errors, 1);
        let last = summary.last_origin_error.expect("last error");
        assert_eq!((last.kind, last.at), ("status_5xx", now));
    }

    #[test]
    fn origin_error_kinds() {
        use pingora::{Error, ErrorType};
        let up = |etype| Error::new(etype).into_up();
        assert_eq!(
            origin_error_kind(&up(ErrorType::ConnectRefused)),
            Some("connect")
        );
        assert_eq!(
            origin_error_kind(&up(ErrorType::ReadTimedout)),
            Some("timeout")
        );
        assert_eq!(origin_error_kind(&up(ErrorType::H1Error)), Some("other"));
        assert_eq!(origin_error_kind(&up(ErrorType::HTTPStatus(503))), None);
        let client = Error::new(ErrorType::ReadError).into_down();
        assert_eq!(origin_error_kind(&client), None);
    }

    #[test]
    fn scrape_reads_tiers_and_rejections() {
        let mut inputs = ScrapeInputs {
            domains: vec!["primary".into(), "community".into()],
            ..ScrapeInputs::default()
        };
        let tier = TierSnapshot {
            entries: 2,
            bytes: 30,
            hits: 5,
            ..TierSnapshot::default()
        };
        inputs.tiers.push(("memory", tier));
        let disk = TierSnapshot {
            corrupt_entries: Some(4),
            expired_entries: Some(6),
            ..TierSnapshot::default()
        };
        inputs.tiers.push(("disk", disk));
        inputs
            .rejections
            .insert(("primary".into(), "htpasswd", None), 3);
        for (reason, count) in [("rate", 4), ("concurrency", 2)] {
            inputs
                .rejections
                .insert(("primary".into(), "rate_limit", Some(reason)), count);
        }
        let text = Metrics::new().render(&inputs).expect("render");
        for line in [
            "mirror_gateway_cache_entries{tier=\"memory\"} 2",
            "mirror_gateway_cache_hits_total{tier=\"memory\"} 5",
            "mirror_gateway_cache_corrupt_entries_total{tier=\"disk\"} 4",
            "mirror_gateway_cache_expired_entries_total{tier=\"disk\"} 6",
            "mirror_gateway_rejections_total{domain=\"primary\",plugin=\"htpasswd\"} 3",
            "mirror_gateway_auth_failures_total{domain=\"primary\"} 3",
            "mirror_gateway_auth_failures_total{domain=\"community\"} 0",
            "mirror_gateway_rejections_total{domain=\"primary\",plugin=\"rate_limit\"} 6",
            "mirror_gateway_rate_limit_rejections_total{domain=\"primary\",reason=\"rate\"} 4",
            "mirror_gateway_rate_limit_rejections_total{domain=\"primary\",reason=\"concurrency\"} 2",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        assert!(
            !text.contains("mirror_gateway_cache_corrupt_entries_total{tier=\"memory\"}"),
            "the memory tier has no corrupt-entry counter:\n{text}"
        );
        assert!(
            !text.contains("mirror_gateway_cache_expired_entries_total{tier=\"memory\"}"),
            "the memory tier has no expired-entry counter:\n{text}"
        );
    }

    #[test]
    fn hooks_register_series() {
        let metrics = Metrics::new();
        metrics.tls_handshake("primary", Err(HandshakeFailure::ClientAlert));
        metrics.proxy_protocol_rejected(Rejection::Missing);
        metrics.proxy_protocol_ignored();
        metrics.reload(true);
        let exported = std::time::UNIX_EPOCH + Duration::from_secs(1_796_169_600);
        metrics.sync_run("nightly", true, 42.5, Some(exported));
        let text = metrics.render(&ScrapeInputs::default()).expect("render");
        for line in [
            "mirror_gateway_tls_handshakes_total{domain=\"primary\",result=\"error\"} 1",
            "mirror_gateway_tls_handshake_failures_total{domain=\"primary\",reason=\"client_alert\"} 1",
            "mirror_gateway_proxy_protocol_rejections_total{reason=\"missing\"} 1",
            "mirror_gateway_proxy_protocol_ignored_total 1",
            "mirror_gateway_config_reloads_total{result=\"ok\"} 1",
            "mirror_gateway_config_last_reload_successful 1",
            "mirror_gateway_sync_runs_total{job=\"nightly\",result=\"ok\"} 1",
            "mirror_gateway_sync_lag_seconds{job=\"nightly\"} 42.5",
            "mirror_gateway_sync_source_export_timestamp_seconds{job=\"nightly\"} 1796169600",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }

    #[test]
    fn removed_sync_job_drops_gauges() {
        let metrics = Metrics::new();
        metrics.sync_run("nightly", true, 42.5, Some(std::time::UNIX_EPOCH));
        metrics.remove_sync_job("nightly");
        let text = metrics.render(&ScrapeInputs::default()).expect("render");
        assert!(!text.contains("mirror_gateway_sync_lag_seconds{"), "{text}");
        let export = "mirror_gateway_sync_source_export_timestamp_seconds{";
        assert!(!text.contains(export), "{text}");
        let runs = "mirror_gateway_sync_runs_total{job=\"nightly\",result=\"ok\"} 1";
        assert!(text.contains(runs), "{text}");
    }

    /// Checks that every metric deploy/grafana/mirror-gateway.json queries is one this module
    /// defines, so a rename cannot silently empty a panel.
    #[test]
    fn dashboard_queries_defined_metrics() {
        let defined: Vec<&str> = [
            REQUESTS,
            BODY_BYTES,
            REQUEST_DURATION,
            UPSTREAM_DURATION,
            ORIGIN_ERRORS,
            TLS_HANDSHAKES,
            TLS_FAILURES,
            RELOADS,
            LAST_RELOAD_OK,
            SYNC_RUNS,
            SYNC_LAG,
            CACHE_ENTRIES,
            CACHE_BYTES,
            CACHE_HITS_TOTAL,
            CACHE_MISSES_TOTAL,
            CACHE_EVICTIONS,
            CACHE_WRITE_ERRORS,
            REJECTIONS,
            AUTH_FAILURES,
            RATE_LIMIT_REJECTIONS,
            QUOTA_REJECTIONS,
        ]
        .iter()
        .map(|(name, _)| *name)
        .collect();
        let dashboard = include_str!("../../deploy/grafana/mirror-gateway.json");
        let mut queried = 0;
        for (start, _) in dashboard.match_indices("mirror_gateway_") {
            let rest = &dashboard[start..];
            let end = rest
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(rest.len());
            let name = &rest[..end];
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            assert!(defined.contains(&base), "the dashboard queries {name}");
            queried += 1;
        }
        assert!(queried > 10, "only {queried} queries found");
    }

    #[test]
    fn truncate_keeps_char_boundary() {
        let mut text = "aé".repeat(10);
        truncate_at_char(&mut text, 4);
        assert_eq!(text, "aéa");
    }

    #[test]
    fn timer_keeps_first_start() {
        let mut timer = UpstreamTimer::default();
        let t0 = Instant::now();
        timer.start(t0);
        timer.start(t0 + Duration::from_secs(5));
        assert_eq!(
            timer.elapsed(t0 + Duration::from_secs(7)),
            Some(Duration::from_secs(7))
        );
    }
}
