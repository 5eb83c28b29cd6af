//! The plugin trait of mirror-gateway, its request phases and the built-in plugins.
//!
//! A domain lists its plugins in order. For each request the gateway calls every plugin's hook
//! for the current phase in that order:
//!
//! ```text
//!  downstream request
//!        |
//!  [routing + path normalisation]        (gateway core: picks the domain and route)
//!        |
//!  request_filter  ----Respond----> local response (401, 403, ...) -> response_filter -> logging
//!        |  Continue
//!  [cache lookup] --fresh hit-----------------------------------------> response_filter
//!        |  miss / expired
//!  upstream_request_filter          (just before the request is sent to the origin)
//!        |
//!  upstream_response_filter         (origin response header, before it is stored in the cache)
//!        |
//!  response_filter                  (every response header sent downstream: hits, misses, local)
//!        |
//!  logging                          (once per request, after the response is finished)
//! ```
//!
//! The request filter has two forms: [`Plugin::request_filter_now`], a plain call for plugins
//! that decide at once, and [`Plugin::request_filter`], which may wait and runs when the first
//! returns `None`.
//!
//! Plugins share what they learn through [`RequestState`]: the `htpasswd` plugin records the
//! authenticated user, the `ttl` plugin records the [`CachePolicy`] that the cache applies when
//! it stores the origin's response.

#![forbid(unsafe_code)]

pub mod config_file;
pub mod fields;
pub mod htpasswd;
pub mod limits;
pub mod quota;
pub mod rate_limit;
pub mod registry;
pub mod settings;
pub mod ttl;
pub mod watched_file;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use pingora::http::{RequestHeader, ResponseHeader};

pub use registry::{build_plugin, BuildContext, PLUGIN_NAMES};
pub use settings::SettingError;

/// What a plugin sees of a downstream request, after routing and path normalisation.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    /// Id of the domain the request was routed to.
    pub domain: &'a str,
    pub method: &'a Method,
    /// The normalised path: no dot segments, no repeated slashes, no encoded `/` or `.`.
    pub path: &'a str,
    /// The raw query string, without the `?`.
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The downstream peer address, when the connection has one.
    pub client_addr: Option<IpAddr>,
    /// When the gateway began the request, after reading its header. A plugin that needs the
    /// monotonic time of the request takes this instead of reading the clock again.
    pub received: Instant,
}

/// Per-request facts that plugins record for later phases and for the gateway core.
#[derive(Debug, Default, Clone)]
pub struct RequestState {
    /// True for the gateway's own background refresh of a stale cache entry, which carries the
    /// headers of the client request that triggered it. Budgets must not count it.
    pub background_refresh: bool,
    /// The user name that an authentication plugin accepted.
    pub user: Option<String>,
    /// The cache policy that applies to this request's path, set by the `ttl` plugin. The
    /// gateway also sets its `Cache-Control` downstream (see [`RequestState::cache_control`]).
    pub cache_policy: Option<Arc<CachePolicy>>,
    /// Stable label of the plugin that rejected the request (`htpasswd`, `rate_limit`,
    /// `quota`), for the access log and the rejection counters.
    pub rejected_by: Option<&'static str>,
    /// Stable label of the budget or check within that plugin that rejected the request, if it
    /// has more than one: `rate` or `concurrency` for `rate_limit`, `<class>:<reason>` for
    /// `quota` (such as `index:principal` or `download:store_unavailable`).
    pub rejected_reason: Option<&'static str>,
    /// The budget whose `RateLimit-*` fields go downstream. A plugin that rejects a request
    /// sets its own budget. Otherwise the `quota` plugin sets its budget whatever is there, and
    /// the `rate_limit` plugin only when it is unset, so the quota's fields win either way.
    /// The gateway sets the fields once, after every plugin's response filter (see
    /// [`RequestState::budget_fields`]).
    pub rate_limit: Option<limits::BudgetState>,
    /// A place among the client IP's concurrent requests, taken by the `rate_limit` plugin.
    /// It is given back when the last copy of this state is dropped, which the gateway does
    /// once the request has ended, however it ended.
    pub concurrency_slot: Option<rate_limit::ConcurrencySlot>,
    /// A request the `quota` plugin checked before the cache lookup and counts only if it goes
    /// to the origin (`count_cache_hits = false`).
    pub quota_pending: Option<quota::PendingCount>,
}

impl RequestState {
    /// Returns the `Cache-Control` field that the cache policy sets on a downstream response
    /// with `status`, which must be successful or 304. An error keeps what the origin or the
    /// gateway sent, so that a CDN never keeps an error for a payload's TTL.
    pub fn cache_control(&self, status: StatusCode) -> Option<(HeaderName, HeaderValue)> {
        let value = self.cache_policy.as_ref()?.cache_control.clone()?;
        let applies = status.is_success() || status == StatusCode::NOT_MODIFIED;
        applies.then_some((http::header::CACHE_CONTROL, value))
    }

    /// Returns the `RateLimit-*` fields of [`Self::rate_limit`], for a caller that sets them
    /// together with fields of its own; `None` without a budget.
    pub fn budget_fields(&self) -> Option<[(http::HeaderName, http::HeaderValue); 3]> {
        self.rate_limit.as_ref().map(limits::BudgetState::headers)
    }
}

/// How the cache treats a response and what `Cache-Control` goes downstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachePolicy {
    /// The pattern of the rule that matched, for logs.
    pub pattern: String,
    /// How long a stored response stays fresh.
    pub ttl: Duration,
    /// The `Cache-Control` value sent downstream on successful responses, if the rule sets one.
    pub cache_control: Option<HeaderValue>,
    /// Whether a 404 from the origin may be stored for `ttl`.
    pub cache_not_found: bool,
    /// Stale-while-revalidate window for this path; `None` uses the domain's.
    pub stale_while_revalidate: Option<Duration>,
    /// Stale-if-error window for this path; `None` uses the domain's.
    pub stale_if_error: Option<Duration>,
}

/// A response that a plugin makes itself, in place of going to the cache or the origin.
#[derive(Debug, Clone)]
pub struct LocalResponse {
    pub status: StatusCode,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

impl LocalResponse {
    /// Builds a response with a plain-text body.
    pub fn text(status: StatusCode, body: &str) -> Self {
        Self {
            status,
            headers: vec![(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            )],
            body: Bytes::copy_from_slice(body.as_bytes()),
        }
    }

    /// Adds a header to the response.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }
}

/// The outcome of a plugin's [`Plugin::request_filter`].
#[derive(Debug)]
pub enum Verdict {
    /// Let the request go on to the next plugin, then the cache and the origin.
    Continue,
    /// Stop here and send this response. Later plugins' request filters do not run.
    Respond(LocalResponse),
}

/// What a plugin sees of a finished request in [`Plugin::logging`].
#[derive(Debug, Clone, Copy)]
pub struct LogRecord<'a> {
    pub domain: &'a str,
    pub path: &'a str,
    pub status: u16,
    /// The `X-Cache-Status` value sent downstream.
    pub cache_status: &'a str,
    pub body_bytes: u64,
    pub duration: Duration,
}

/// A per-domain request plugin.
///
/// Every hook has a default that does nothing, so a plugin implements only the phases it
/// needs. Hooks run in the order the domain lists its plugins. Hooks must not block: a plugin
/// that needs CPU for milliseconds (a bcrypt check, say) moves that work off the async workers.
#[async_trait]
pub trait Plugin: Send + Sync + 'static {
    /// Returns the name this plugin has in the config file, for logs.
    fn name(&self) -> &'static str;

    /// Runs once per downstream request, after routing and before the cache lookup, when the
    /// plugin can decide without waiting. Returns `None` when it cannot, and the gateway then
    /// awaits [`Plugin::request_filter`] instead. A plugin that decides at once for most
    /// requests implements this, because it spares each request an allocation per plugin.
    ///
    /// A returned [`Verdict`] means what it means from [`Plugin::request_filter`]. The default
    /// returns `None`.
    fn request_filter_now(
        &self,
        _req: &RequestInfo<'_>,
        _state: &mut RequestState,
    ) -> Option<Verdict> {
        None
    }

    /// Runs once per downstream request, after routing and before the cache lookup, when
    /// [`Plugin::request_filter_now`] returned `None`.
    ///
    /// Returning [`Verdict::Respond`] ends the request with that response: the cache and the
    /// origin are not consulted and later plugins' request filters do not run. The default
    /// returns what [`Plugin::request_filter_now`] returns, and [`Verdict::Continue`] for
    /// `None`.
    async fn request_filter(&self, req: &RequestInfo<'_>, state: &mut RequestState) -> Verdict {
        self.request_filter_now(req, state)
            .unwrap_or(Verdict::Continue)
    }

    /// Runs just before a request goes to the origin (cache misses, expired entries and
    /// uncached requests), after the gateway has set the origin's `Host` and removed the
    /// downstream `Authorization` header. An error fails the request with a 500 and is logged.
    /// The default changes nothing.
    fn upstream_request_filter(
        &self,
        _req: &mut RequestHeader,
        _state: &mut RequestState,
    ) -> pingora::Result<()> {
        Ok(())
    }

    /// Runs on the origin's response header before the cache decides whether to store it, so
    /// what this hook changes is stored. An error fails the request and is logged. The default
    /// changes nothing.
    fn upstream_response_filter(
        &self,
        _resp: &mut ResponseHeader,
        _state: &mut RequestState,
    ) -> pingora::Result<()> {
        Ok(())
    }

    /// Runs on every response header sent downstream: cache hits, origin responses and the
    /// gateway's own responses. What this hook changes is not stored. An error fails the
    /// request and is logged. The default changes nothing.
    fn response_filter(
        &self,
        _resp: &mut ResponseHeader,
        _state: &RequestState,
    ) -> pingora::Result<()> {
        Ok(())
    }

    /// Runs once per request after the response is finished or the request failed. It cannot
    /// change the response. The default does nothing.
    fn logging(&self, _record: &LogRecord<'_>, _state: &RequestState) {}
}
