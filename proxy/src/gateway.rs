//! The Pingora proxy application: each `ProxyHttp` phase of a request, in order.
//!
//! Glossary: *downstream* is the client side, *upstream* or *origin* the server the gateway
//! fetches from, a *domain* one mirror site (its hosts, routes, origins and plugins), a *route*
//! a path prefix mapped to one origin. Cache words follow RFC 9111: *fresh*, *stale*,
//! *revalidate*, *validator*.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::{HeaderName, HeaderValue, Method, StatusCode};
use mirror_plugins::{LocalResponse, LogRecord, RequestInfo, RequestState, Verdict};
use pingora::cache::{CacheKey, CachePhase, ForcedFreshness, NoCacheReason, RespCacheable};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::HttpModules;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, Result};

use crate::access_log::{AccessEntry, AccessLog};
use crate::cache::memory::body_chunks;
use crate::cache::{
    cache_key, cache_status, decide_cacheability, key_hash, CacheTier, FreshHit, NoStoreReason,
};
use crate::client_ip::TrustedProxies;
use crate::config::Domain;
use crate::respond::{self, error_response, write_local};
use crate::routing::{match_route, Router};
use crate::upstream::Upstream;

/// A domain with its origins ready to use.
pub struct DomainRuntime {
    pub config: Domain,
    /// One entry per `config.origins` entry, same order.
    pub upstreams: Vec<Upstream>,
    /// Slots for concurrent origin requests, `config.max_origin_requests` of them.
    pub origin_slots: Arc<tokio::sync::Semaphore>,
}

/// Everything the gateway needs to serve requests.
pub struct GatewayState {
    /// Whether responses that were not stored carry `X-Cache-Reason`.
    pub debug_headers: bool,
    pub router: Router,
    pub domains: Vec<DomainRuntime>,
    /// Shared by every state a reload makes.
    pub cache: Arc<CacheTier>,
    pub access_log: AccessLog,
    pub trusted_proxies: TrustedProxies,
    /// Maximum wait for a client to take one write of a response (`server.send_timeout_secs`).
    pub send_timeout: std::time::Duration,
    /// How long an idle HTTP/1 connection waits for its next request; zero turns keep-alive off
    /// (`server.keepalive_timeout_secs`).
    pub keepalive_timeout: std::time::Duration,
    /// Whether large bodies from the cache go out with the client socket corked
    /// (`server.tcp_nopush`).
    pub tcp_nopush: bool,
    /// Whether HTTP/1.1 requests sent ahead on one connection are served in order
    /// (`server.pipelining`).
    pub pipelining: bool,
    /// Requests a plugin rejected, by domain id, the plugin's label (`rejected_by`) and its
    /// reason (`rejected_reason`).
    pub rejections: Arc<parking_lot::Mutex<crate::metrics::Rejections>>,
    /// Certificates, HTTPS addresses and the per-request TLS checks; shared by every state.
    pub tls: Arc<crate::tls::TlsState>,
}

/// The proxy application that Pingora drives.
pub struct Gateway {
    /// The current state; a reload swaps in a new one, and each request keeps the state it
    /// started with.
    state: Arc<ArcSwap<GatewayState>>,
    /// Where requests are counted for `/metrics` and the status page.
    monitor: Arc<crate::status::Monitor>,
}

impl Gateway {
    /// Serves requests with whatever state `state` holds when each request starts.
    pub fn new(state: Arc<ArcSwap<GatewayState>>) -> Self {
        Self {
            state,
            monitor: Arc::default(),
        }
    }

    /// Counts requests in `monitor`, the gateway instance's own, in place of an unread one.
    pub fn with_monitor(mut self, monitor: Arc<crate::status::Monitor>) -> Self {
        self.monitor = monitor;
        self
    }
}

/// Per-request state, created by `new_ctx` and filled in as the request moves on.
pub struct RequestCtx {
    /// The gateway state this request started with, kept across a reload.
    state: Arc<GatewayState>,
    start: Instant,
    domain: Option<usize>,
    route: Option<usize>,
    /// The normalised path.
    path: String,
    /// The query, kept only for HTTP origins (export trees ignore it).
    query: Option<String>,
    /// The path to request from the origin, decoded; see [`RequestCtx::upstream_uri`].
    origin_path: String,
    /// The export that serves this request, for export-tree origins.
    export_id: Option<String>,
    /// The client IP resolved from the peer and trusted `X-Forwarded-For` entries.
    client_ip: Option<IpAddr>,
    plugin_state: RequestState,
    /// `X-Cache-Status` of a response the gateway made itself.
    local_cache_status: Option<&'static str>,
    /// `X-Cache-Status` that `response_filter` sent. The cache's phase can change after the
    /// header went out (a fill that fails mid-body turns MISS into BYPASS), and the log and
    /// metrics record what the client got.
    sent_cache_status: Option<&'static str>,
    /// The client socket corked for a large body served from the cache; uncorked in `logging`,
    /// once the response is written.
    cork: Option<crate::cork::Cork>,
    no_store: Option<NoStoreReason>,
    first_attempt: usize,
    attempts: usize,
    /// Whether the origin request was already retried after its reused connection failed.
    retried_reused: bool,
    /// Whether the request's `If-Match` or `If-Unmodified-Since` failed against the response
    /// from the cache, which then goes out as `412`.
    precondition_failed: bool,
    /// This request's origin slot, held until the request ends.
    origin_slot: Option<tokio::sync::OwnedSemaphorePermit>,
    /// When the request first asked for an origin peer, for the upstream duration metric.
    upstream_timer: crate::metrics::UpstreamTimer,
}

/// After a failed refresh of an expired entry, requests within its stale-if-error window get
/// the entry for this long without a new origin request.
const REFRESH_BACKOFF: std::time::Duration = std::time::Duration::from_secs(1);

impl RequestCtx {
    /// Returns the label of the reason this request's response is not stored, for
    /// `X-Cache-Reason`. Returns `None` without a reason or with debug headers off.
    fn debug_reason(&self) -> Option<&'static str> {
        self.no_store
            .filter(|_| self.state.debug_headers)
            .map(NoStoreReason::label)
    }

    /// Returns the hash of this request's cache key in `domain`, without building the key.
    fn key_hash(&self, domain: &DomainRuntime) -> pingora::cache::key::HashBinary {
        key_hash(
            &domain.config.id,
            self.export_id.as_deref(),
            &self.path,
            self.query.as_deref(),
        )
    }

    fn new(state: Arc<GatewayState>) -> Self {
        Self {
            state,
            start: Instant::now(),
            domain: None,
            route: None,
            path: String::new(),
            query: None,
            origin_path: String::new(),
            export_id: None,
            client_ip: None,
            plugin_state: RequestState::default(),
            local_cache_status: None,
            sent_cache_status: None,
            cork: None,
            no_store: None,
            first_attempt: 0,
            attempts: 0,
            retried_reused: false,
            precondition_failed: false,
            origin_slot: None,
            upstream_timer: Default::default(),
        }
    }
}

impl RequestCtx {
    /// Returns the path and query sent to the origin: the encoded origin path, under the
    /// export's directory for an export tree, with the query for an HTTP origin. Built only
    /// when a request goes to the origin.
    fn upstream_uri(&self) -> String {
        let path = crate::path::encode(&self.origin_path);
        match (&self.export_id, &self.query) {
            (Some(export), _) => format!("/{export}{path}"),
            (None, Some(query)) => format!("{path}?{query}"),
            (None, None) => path,
        }
    }
}

impl GatewayState {
    fn domain(&self, ctx: &RequestCtx) -> Option<&DomainRuntime> {
        ctx.domain.map(|i| &self.domains[i])
    }

    fn upstream(&self, ctx: &RequestCtx) -> Option<&Upstream> {
        let domain = self.domain(ctx)?;
        let route = &domain.config.routes[ctx.route?];
        domain.upstreams.get(route.origin)
    }

    /// Routes the request, normalises its path and runs the plugins' request filters.
    ///
    /// `Err` carries the response to send in place of proxying.
    async fn prepare(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<(), LocalResponse> {
        // A client that stops reading keeps a response chunk in memory. After this long
        // without taking one write, its connection (or HTTP/2 stream) is given up.
        session
            .downstream_session
            .set_write_timeout(Some(self.send_timeout));
        // With pipelining on, Pingora keeps the bytes of a next request that arrive before this
        // response is complete and parses them once it is. With it off, Pingora sends this
        // response and closes the connection. Set on every request, so that a reload applies.
        session
            .downstream_session
            .set_pipelining_enabled(self.pipelining);
        // Pingora keeps a connection open without limit after a request that allows keep-alive,
        // or for as long as the client's own `Keep-Alive: timeout` sets. The next request on the
        // connection is read with this timeout instead. A request that closes the connection
        // (HTTP/1.0 without keep-alive, `Connection: close`) keeps it off.
        if session.get_keepalive().is_some() {
            let secs = self.keepalive_timeout.as_secs();
            session.set_keepalive((secs > 0).then_some(secs));
        }
        // A client may shut down its sending side once its requests are out and still read the
        // responses, as `nc -N` does. Pingora 0.9.1 would cancel a request still waiting for the
        // origin at that FIN. With this off it finishes the request and closes the connection
        // after the response. A client that is really gone makes the write fail instead.
        session.downstream_session.set_abort_on_close(false);
        let req = session.req_header();
        ctx.client_ip = peer_ip(session).map(|ip| self.trusted_proxies.client_ip(ip, &req.headers));
        if let Some(problem) = oversized_header(req) {
            return Err(error_response(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                &problem,
            ));
        }
        let host = request_host(req)
            .map_err(|problem| error_response(StatusCode::BAD_REQUEST, problem))?;
        if host.is_empty() && req.version == http::Version::HTTP_11 {
            // RFC 9112, section 3.2: an HTTP/1.1 request without a host is malformed.
            return Err(error_response(
                StatusCode::BAD_REQUEST,
                "an HTTP/1.1 request needs a Host header",
            ));
        }
        let domain_index = self.router.domain_for_host(host).ok_or_else(|| {
            error_response(
                StatusCode::MISDIRECTED_REQUEST,
                &format!("no mirror domain is configured for host {host:?}"),
            )
        })?;
        ctx.domain = Some(domain_index);
        let domain = &self.domains[domain_index];
        self.tls.check(session, &domain.config.id, host)?;
        if req.method != Method::GET && req.method != Method::HEAD {
            return Err(error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "this mirror is read-only; use GET or HEAD",
            ));
        }
        if announces_body(req) {
            // A body would reach HTTP origins on a reused connection, where an origin that
            // ignores GET bodies reads it as the next request. A body that never arrives would
            // also keep the request, and its origin slot, open.
            return Err(error_response(
                StatusCode::BAD_REQUEST,
                "a GET or HEAD request must not carry a body; send it without Content-Length \
                 and Transfer-Encoding",
            ));
        }
        if !session.downstream_session.is_body_empty() {
            refuse_stream_body(session).await?;
        }
        let req = session.req_header();
        ctx.path = crate::path::normalize(req.uri.path())
            .map_err(|e| error_response(StatusCode::BAD_REQUEST, &e.to_string()))?;
        let route_match = match_route(&domain.config, &ctx.path)
            .ok_or_else(|| error_response(StatusCode::NOT_FOUND, "no route serves this path"))?;
        ctx.route = Some(route_match.route);

        let info = RequestInfo {
            domain: &domain.config.id,
            method: &req.method,
            path: &ctx.path,
            query: req.uri.query(),
            headers: &req.headers,
            client_addr: ctx.client_ip,
            received: ctx.start,
        };
        ctx.plugin_state.background_refresh = session.subrequest_ctx.is_some();
        for plugin in &domain.config.plugins {
            let state = &mut ctx.plugin_state;
            let verdict = match plugin.request_filter_now(&info, state) {
                Some(verdict) => verdict,
                None => plugin.request_filter(&info, state).await,
            };
            if let Verdict::Respond(local) = verdict {
                return Err(local);
            }
        }

        let upstream = &domain.upstreams[domain.config.routes[route_match.route].origin];
        ctx.first_attempt = upstream.first_attempt();
        match upstream.export_tree() {
            Some(tree) => {
                // An export tree serves files only: a directory path has no listing, and the
                // file server would call its trailing slash malformed (400).
                if route_match.origin_path.ends_with('/') {
                    return Err(error_response(
                        StatusCode::NOT_FOUND,
                        "no file at this path",
                    ));
                }
                let active = tree.active_export().map_err(|e| {
                    tracing::error!(domain = %domain.config.id, error = %e, "no export to serve");
                    error_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no export is available yet",
                    )
                })?;
                ctx.export_id = Some(active.id);
            }
            None => ctx.query = req.uri.query().map(str::to_owned),
        }
        ctx.origin_path = route_match.origin_path;
        Ok(())
    }
}

/// Notes `status` for the requests waiting on this request's fill, if it fills the cache and
/// the fill is about to fail (see `cache/lock.rs`).
fn note_fill_status(session: &Session, ctx: &RequestCtx, status: u16) {
    if !session.cache.is_cache_lock_writer() {
        return;
    }
    if let Some(domain) = ctx.state.domain(ctx) {
        ctx.state
            .cache
            .note_fill_status(ctx.key_hash(domain), status);
    }
}

/// Sets what every response from the cache or the origin carries: HTTP/1.1, `X-Cache-Reason`
/// with `reason` when debug headers are on, the plugins' fields, and in one insert `leading`
/// and the fields of [`respond::insert_gateway_fields`]: `status` as `X-Cache-Status`, and
/// the `ttl` rule's `Cache-Control` unless `policy` omits it.
fn finish_response_header(
    ctx: &RequestCtx,
    resp: &mut ResponseHeader,
    status: &'static str,
    reason: Option<&str>,
    leading: impl IntoIterator<Item = (HeaderName, HeaderValue)>,
    policy: respond::PolicyField,
) -> Result<()> {
    // An HTTP/1.0 origin's version must not reach the client: the gateway speaks HTTP/1.1.
    if resp.version == http::Version::HTTP_10 {
        resp.set_version(http::Version::HTTP_11);
    }
    if let Some(reason) = reason.filter(|_| ctx.state.debug_headers) {
        resp.insert_header("x-cache-reason", reason)?;
    }
    if let Some(domain) = ctx.state.domain(ctx) {
        for plugin in &domain.config.plugins {
            plugin.response_filter(resp, &ctx.plugin_state)?;
        }
    }
    respond::insert_gateway_fields(resp, &ctx.plugin_state, status, leading, policy);
    Ok(())
}

/// Returns the `Age` of a response that fills the cache (a miss, or an expired entry fetched
/// again in full): the origin's own, which the stored header leaves out because hits send the
/// age that the entry's epoch gives.
fn filling_age(session: &Session, phase: &CachePhase) -> Option<(HeaderName, HeaderValue)> {
    if !matches!(phase, CachePhase::Miss | CachePhase::Expired) {
        return None;
    }
    let meta = session.cache.maybe_cache_meta()?;
    let age = meta.created().duration_since(meta.epoch()).ok()?.as_secs();
    (age > 0).then(|| (http::header::AGE, HeaderValue::from(age)))
}

/// Returns whether a response in `phase` has its body read from the cache: not a miss or a
/// bypass, whose body arrives from the origin as it comes. A hit may still read a fill in
/// progress, whose handler cannot seek.
fn body_from_cache(phase: &CachePhase) -> bool {
    matches!(
        phase,
        CachePhase::Hit
            | CachePhase::Stale
            | CachePhase::StaleUpdating
            | CachePhase::Revalidated
            | CachePhase::RevalidatedNoCache(_)
    )
}

/// Checks a 304 the origin sent for the revalidation of a stored response. When the 304 names a
/// strong `ETag` the stored response does not have, it validates another representation
/// (RFC 9111, section 4.3.4): the stored response must not be refreshed by it. The 304's
/// `ETag` is dropped, so the client gets the stored body with its own `ETag`, and the request
/// is marked so that `response_cache_filter` leaves the entry as it was, still expired, so
/// that the next request revalidates again.
fn reject_conflicting_304(session: &Session, resp: &mut ResponseHeader, ctx: &mut RequestCtx) {
    let Some(stored) = session.cache.maybe_cache_meta() else {
        return;
    };
    let stored_etag = stored.response_header().headers.get(http::header::ETAG);
    let origin_etag = resp.headers.get(http::header::ETAG);
    let conflicts = crate::cache::validator_conflicts(
        stored_etag.map(HeaderValue::as_bytes),
        origin_etag.map(HeaderValue::as_bytes),
    );
    if !conflicts {
        return;
    }
    let etag_text = |etag: Option<&HeaderValue>| {
        etag.map_or("none".to_owned(), |v| {
            String::from_utf8_lossy(v.as_bytes()).into_owned()
        })
    };
    let (stored_etag, origin_etag) = (etag_text(stored_etag), etag_text(origin_etag));
    tracing::warn!(path = %ctx.path, %stored_etag, %origin_etag,
        "the origin answered a revalidation with 304 for another ETag; the stored response is served but not refreshed");
    resp.remove_header(&http::header::ETAG);
    ctx.no_store = Some(NoStoreReason::ValidatorMismatch);
}

/// Largest request header field, name and value together: nginx's default line limit
/// (`large_client_header_buffers 4 8k`). Pingora 0.9.1 accepts fields of about 1 MB, which
/// would reach HTTP origins on a miss.
const MAX_FIELD_BYTES: usize = 8 * 1024;
/// Largest sum of a request's header fields, nginx's default of four 8 KiB buffers.
const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Returns why the header fields of `req` are too large, naming the field or the total.
fn oversized_header(req: &RequestHeader) -> Option<String> {
    let mut total = 0;
    for (name, value) in &req.headers {
        let size = name.as_str().len() + value.len();
        if size > MAX_FIELD_BYTES {
            return Some(format!(
                "the {name} header field has {size} bytes; send at most {MAX_FIELD_BYTES}"
            ));
        }
        total += size;
    }
    (total > MAX_HEADER_BYTES).then(|| {
        format!("the header fields have {total} bytes together; send at most {MAX_HEADER_BYTES}")
    })
}

/// How long an HTTP/2 GET or HEAD without `Content-Length` may take to end its stream.
const STREAM_END_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads the request body of an HTTP/2 GET or HEAD whose stream is still open and fails on
/// any data.
///
/// HTTP/2 has no `Transfer-Encoding`: a request without `Content-Length` announces a body only
/// by not ending its stream with the header frame. A GET usually ends it there. A client that
/// streams a body of unknown length ends it with an empty data frame, so that frame is
/// waited for. Data would be forwarded to an HTTP/1.1 origin
/// as a chunked body, which an origin that ignores GET bodies reads as the next request.
async fn refuse_stream_body(session: &mut Session) -> Result<(), LocalResponse> {
    let read = async {
        loop {
            match session.downstream_session.read_request_body().await {
                Ok(None) => return true,
                Ok(Some(data)) if data.is_empty() => continue,
                Ok(Some(_)) | Err(_) => return false,
            }
        }
    };
    match tokio::time::timeout(STREAM_END_WAIT, read).await {
        Ok(true) => Ok(()),
        _ => Err(error_response(
            StatusCode::BAD_REQUEST,
            "a GET or HEAD request must not carry a body; over HTTP/2, end the stream with \
             the request's header frame",
        )),
    }
}

/// Returns whether `req` announces a body: any `Transfer-Encoding`, or a `Content-Length`
/// other than a single `0`.
fn announces_body(req: &RequestHeader) -> bool {
    use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
    if req.headers.contains_key(TRANSFER_ENCODING) {
        return true;
    }
    let mut lengths = req.headers.get_all(CONTENT_LENGTH).iter();
    match (lengths.next(), lengths.next()) {
        (None, _) => false,
        (Some(length), None) => length.as_bytes().trim_ascii() != b"0",
        (Some(_), Some(_)) => true,
    }
}

/// Returns whether `req` requests the whole stored response as it is: no range and no
/// conditional field. The cache path serves those with ranges, 304s and validator checks.
fn wants_whole_response(req: &RequestHeader) -> bool {
    use http::header::{
        IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, IF_UNMODIFIED_SINCE, RANGE,
    };
    ![
        RANGE,
        IF_RANGE,
        IF_NONE_MATCH,
        IF_MODIFIED_SINCE,
        IF_MATCH,
        IF_UNMODIFIED_SINCE,
    ]
    .iter()
    .any(|name| req.headers.contains_key(name))
}

/// Returns the `X-Forwarded-For` value sent to an origin: every line the client sent, in order,
/// as one list (RFC 9110, section 5.3), followed by the peer's address.
fn forwarded_for(headers: &http::HeaderMap, peer: IpAddr) -> Vec<u8> {
    let mut list = Vec::new();
    for line in headers.get_all("x-forwarded-for") {
        let line = line.as_bytes().trim_ascii();
        if !line.is_empty() {
            list.extend_from_slice(line);
            list.extend_from_slice(b", ");
        }
    }
    list.extend_from_slice(peer.to_string().as_bytes());
    list
}

/// Returns the id of the request's domain, once routing found one.
fn domain_id(ctx: &RequestCtx) -> Option<&str> {
    ctx.state.domain(ctx).map(|d| d.config.id.as_str())
}

/// Returns the IP address of the downstream connection's peer, if it is a TCP connection.
fn peer_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// Returns the request's host, or why its request target is invalid.
///
/// The host of an absolute-form target (`GET http://host/path`) wins over the `Host` header
/// (RFC 9112, section 3.2.2). Pingora 0.9.1 keeps that target only in the raw bytes. Else the
/// URI's authority (HTTP/2) or the `Host` header names it, or it is empty. A target that is
/// neither a path starting with `/` nor an `http` or `https` URL is invalid: Pingora reads a
/// bare name such as `GET index.json` as the path `/`.
fn request_host(req: &RequestHeader) -> Result<&str, &'static str> {
    use pingora::http::authority::{raw_target_authority, RawTargetAuthority};
    const INVALID: &str =
        "invalid request target: send a path that starts with '/' or an absolute http URL";
    const INVALID_HOST: &str = "invalid Host header: send the host name in ASCII, \
        an internationalised name in its xn-- form";
    let target = req.raw_path();
    match raw_target_authority(target) {
        RawTargetAuthority::Absolute {
            scheme, authority, ..
        } => {
            if !(scheme.eq_ignore_ascii_case(b"http") || scheme.eq_ignore_ascii_case(b"https")) {
                return Err(INVALID);
            }
            if authority.is_empty() || authority.contains(&b'@') {
                // RFC 9110, section 4.2.4: user information in an http URI is an error.
                return Err(
                    "invalid request target: the URL must name a host, without user information",
                );
            }
            std::str::from_utf8(authority).map_err(|_| INVALID)
        }
        RawTargetAuthority::AmbiguousAuthority => Err(INVALID),
        RawTargetAuthority::None if !target.starts_with(b"/") => Err(INVALID),
        RawTargetAuthority::None => match (req.uri.host(), req.headers.get(http::header::HOST)) {
            (Some(host), _) => Ok(host),
            (None, Some(header)) => header.to_str().map_err(|_| INVALID_HOST),
            (None, None) => Ok(""),
        },
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> Self::CTX {
        RequestCtx::new(self.state.load_full())
    }

    /// Adds no module. Pingora's default adds its response compression module switched off,
    /// which the gateway never switches on; it still ran on every request and response.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        let state = Arc::clone(&ctx.state);
        let Err(local) = state.prepare(session, ctx).await else {
            return self.serve_fresh_hit(session, ctx).await;
        };
        ctx.local_cache_status = Some("BYPASS");
        let plugins = state
            .domain(ctx)
            .map(|d| d.config.plugins.as_slice())
            .unwrap_or(&[]);
        self.close_when_draining(session);
        write_local(session, local, plugins, &ctx.plugin_state).await?;
        Ok(true)
    }

    fn request_cache_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<()> {
        let state = Arc::clone(&ctx.state);
        let method = &session.req_header().method;
        if ctx.route.is_some() && (method == Method::GET || method == Method::HEAD) {
            let wait = state.domain(ctx).and_then(|d| d.config.lock_wait_timeout);
            state.cache.enable(&mut session.cache, wait);
        }
        Ok(())
    }

    fn cache_key_callback(&self, _session: &Session, ctx: &mut Self::CTX) -> Result<CacheKey> {
        let state = Arc::clone(&ctx.state);
        let domain = state.domain(ctx).ok_or_else(|| {
            Error::explain(
                pingora::ErrorType::InternalError,
                "cache key without a domain",
            )
        })?;
        Ok(cache_key(
            &domain.config.id,
            ctx.export_id.as_deref(),
            &ctx.path,
            ctx.query.as_deref(),
        ))
    }

    /// Runs on every stored response found, fresh or stale. Returns `None`, which keeps
    /// Pingora's own decision, unless the cache clock is ahead of the system clock. Only tests
    /// move it (see `cache/clock.rs`).
    async fn cache_hit_filter(
        &self,
        _session: &mut Session,
        meta: &pingora::cache::CacheMeta,
        _hit_handler: &mut pingora::cache::storage::HitHandler,
        _is_fresh: bool,
        ctx: &mut Self::CTX,
    ) -> Result<Option<ForcedFreshness>> {
        let state = Arc::clone(&ctx.state);
        let clock = state.cache.clock();
        let now = clock.now();
        let expired_in = state.domain(ctx).filter(|_| !meta.is_fresh(now));
        if let Some(domain) = expired_in {
            let key = ctx.key_hash(domain);
            if !meta.serve_stale_if_error(now) {
                state.cache.note_stale_unservable(key);
            } else if state.cache.fill_failed_within(&key, REFRESH_BACKOFF) {
                // Served as Pingora serves a fresh hit: no lock, no refresh.
                ctx.local_cache_status = Some("STALE");
                return Ok(Some(ForcedFreshness::ForceFresh));
            }
        }
        Ok(clock.forced_freshness(meta))
    }

    fn cache_vary_filter(
        &self,
        meta: &pingora::cache::CacheMeta,
        _ctx: &mut Self::CTX,
        req: &RequestHeader,
    ) -> Option<pingora::cache::key::HashBinary> {
        crate::cache::variance(meta, req)
    }

    /// Decides whether to store an origin response. After a 304 refresh, `resp` is the stored
    /// header with the 304's `Cache-Control`, `Expires` and `ETag` merged in by Pingora. A 304
    /// for another strong `ETag` refreshes nothing (see `reject_conflicting_304`).
    /// NOTE: the 304's other fields are dropped (Pingora 0.9.1 merges only those three).
    fn response_cache_filter(
        &self,
        session: &Session,
        resp: &ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<RespCacheable> {
        if ctx.no_store == Some(NoStoreReason::ValidatorMismatch) {
            let label = NoStoreReason::ValidatorMismatch.label();
            return Ok(RespCacheable::Uncacheable(NoCacheReason::Custom(label)));
        }
        let state = Arc::clone(&ctx.state);
        let forwarded = self.credentials_reach_origin(session, ctx);
        let policy = ctx.plugin_state.cache_policy.as_deref();
        let stale = state
            .domain(ctx)
            .map_or(crate::config::StaleWindows::NONE, |d| d.config.stale);
        let now = state.cache.clock().now();
        match decide_cacheability(resp, policy, forwarded, stale, now) {
            Ok(decision) => Ok(decision),
            Err(reason) => {
                if reason == NoStoreReason::OriginError {
                    note_fill_status(session, ctx, resp.status.as_u16());
                }
                ctx.no_store = Some(reason);
                Ok(RespCacheable::Uncacheable(NoCacheReason::Custom(
                    reason.label(),
                )))
            }
        }
    }

    /// Keeps a request that waited on another request's origin request from going to the
    /// origin itself. When that origin request failed before the origin's header (see
    /// `cache/lock.rs`), the request gets the failure's status. When its wait timed out, it
    /// gets a 504. Every other request goes on to the origin.
    async fn proxy_upstream_filter(
        &self,
        session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<bool> {
        let CachePhase::Disabled(why) = session.cache.phase() else {
            return Ok(true);
        };
        let (code, reason, detail) = match why {
            NoCacheReason::CacheLockGiveUp => {
                let state = Arc::clone(&ctx.state);
                let Some(domain) = state.domain(ctx) else {
                    return Ok(true);
                };
                let key = ctx.key_hash(domain);
                let Some(code) = state.cache.fill_failed_since(&key, ctx.start) else {
                    return Ok(true);
                };
                let detail = "the origin request that this request waited for failed; retry later";
                (code, NoStoreReason::FillFailed, detail)
            }
            NoCacheReason::CacheLockTimeout => {
                let detail = "timed out waiting for another request's origin request; retry later";
                (504, NoStoreReason::LockTimeout, detail)
            }
            _ => return Ok(true),
        };
        ctx.no_store = Some(reason);
        let state = &ctx.plugin_state;
        respond::write_error_detail(session, code, "BYPASS", detail, ctx.debug_reason(), state)
            .await;
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        let state = Arc::clone(&ctx.state);
        // The origin's latency starts once a slot is free: time queued behind
        // `max_origin_requests` is the gateway's own wait.
        self.take_origin_slot(session, ctx).await?;
        ctx.upstream_timer.start(Instant::now());
        let upstream = state.upstream(ctx).ok_or_else(|| {
            Error::explain(pingora::ErrorType::InternalError, "no origin for the route")
        })?;
        upstream.peer(ctx.first_attempt, ctx.attempts)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let state = Arc::clone(&ctx.state);
        let peers = state.upstream(ctx).map_or(1, Upstream::peer_count);
        ctx.attempts += 1;
        if ctx.attempts < peers {
            tracing::warn!(peer = %peer, attempt = ctx.attempts, error = %e, "origin connect failed; trying the next address");
            e.set_retry(true);
        }
        e
    }

    /// Retries a request once on another connection when its reused pooled connection
    /// failed, as Pingora does by default, but not a second time. Pingora would go on up to
    /// its retry limit of 16, so an origin that closes every connection at once would get up
    /// to 16 requests for one.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Self::CTX,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        let replayable = session.req_header().method.is_idempotent()
            && !session.as_ref().retry_buffer_truncated();
        if replayable && client_reused && !ctx.retried_reused {
            e.retry.decide_reuse(true);
            ctx.retried_reused = e.retry();
        } else {
            e.set_retry(false);
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        let state = Arc::clone(&ctx.state);
        let uri = ctx.upstream_uri().parse().map_err(|e| {
            Error::because(pingora::ErrorType::InternalError, "invalid upstream URI", e)
        })?;
        upstream_request.set_uri(uri);
        if let Some(upstream) = state.upstream(ctx) {
            upstream_request.insert_header(http::header::HOST, upstream.host())?;
        }
        if !self.forwards_authorization(ctx) {
            upstream_request.remove_header(&http::header::AUTHORIZATION);
        }
        if let Some(addr) = session.client_addr().and_then(|a| a.as_inet()) {
            let forwarded = forwarded_for(&upstream_request.headers, addr.ip());
            upstream_request.insert_header("x-forwarded-for", forwarded)?;
        }
        if let Some(domain) = state.domain(ctx) {
            for plugin in &domain.config.plugins {
                plugin.upstream_request_filter(upstream_request, &mut ctx.plugin_state)?;
            }
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if upstream_response.status == StatusCode::NOT_MODIFIED {
            reject_conflicting_304(session, upstream_response, ctx);
        }
        let state = Arc::clone(&ctx.state);
        let elapsed = ctx.upstream_timer.elapsed(Instant::now());
        let status = upstream_response.status.as_u16();
        let now = SystemTime::now();
        self.monitor
            .metrics
            .upstream_response(domain_id(ctx), status, elapsed, now);
        if let Some(domain) = state.domain(ctx) {
            for plugin in &domain.config.plugins {
                plugin.upstream_response_filter(upstream_response, &mut ctx.plugin_state)?;
            }
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        self.close_when_draining(session);
        let phase = session.cache.phase();
        let reason = match (ctx.no_store, &phase) {
            (Some(reason), _) => Some(reason.label()),
            (None, CachePhase::Disabled(reason)) => Some(reason.as_str()),
            _ => None,
        };
        if session.req_header().version == http::Version::HTTP_10
            && upstream_response
                .headers
                .contains_key(http::header::TRANSFER_ENCODING)
        {
            // RFC 9112, section 6.1: an HTTP/1.0 client cannot read chunked framing, so an
            // origin's chunked body goes out as it arrives and ends when the connection closes.
            upstream_response.remove_header(&http::header::TRANSFER_ENCODING);
            upstream_response.insert_header(http::header::CONNECTION, "close")?;
            session.set_keepalive(None);
        }
        if ctx.precondition_failed {
            // Pingora turned the response into a header-only 304 for the filter above.
            upstream_response.set_status(StatusCode::PRECONDITION_FAILED)?;
            upstream_response.insert_header(http::header::CONTENT_LENGTH, 0)?;
        }
        let status = ctx
            .local_cache_status
            .unwrap_or_else(|| cache_status(&phase));
        ctx.sent_cache_status = Some(status);
        // A reader of a fill still in progress (its handler cannot seek) gets the body as the
        // origin sends it. It stays uncorked, because a corked tail would wait for the next piece.
        if ctx.state.tcp_nopush
            && body_from_cache(&phase)
            && session.req_header().method != Method::HEAD
            && session.cache.hit_handler().can_seek()
        {
            let length = crate::cache::ranges::content_length(upstream_response).unwrap_or(0);
            ctx.cork = crate::cork::Cork::for_body(session, length);
        }
        let age = filling_age(session, &phase);
        let policy = self.rule_field(session, ctx, &phase, upstream_response);
        finish_response_header(ctx, upstream_response, status, reason, age, policy)
    }

    /// Evaluates the request's preconditions against a response served from the cache, as an
    /// origin would: a failed `If-Match` or `If-Unmodified-Since` makes the response header-only
    /// here and `412` in `response_filter`. Otherwise `If-None-Match` and `If-Modified-Since`
    /// decide on `304`, as Pingora does.
    fn cache_not_modified_filter(
        &self,
        session: &Session,
        resp: &ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<bool> {
        let req = session.req_header();
        if crate::cache::preconditions::fails(req, resp) {
            ctx.precondition_failed = true;
            return Ok(true);
        }
        Ok(pingora::protocols::http::conditional_filter::not_modified_filter(req, resp))
    }

    fn range_header_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        _ctx: &mut Self::CTX,
    ) -> pingora::proxy::RangeType {
        crate::cache::ranges::apply(session.req_header(), resp)
    }

    /// Serves a stale entry while a background request refreshes it (error `None`), and when
    /// the origin failed (error from the upstream side), each within the entry's window.
    fn should_serve_stale(
        &self,
        session: &mut Session,
        ctx: &mut Self::CTX,
        error: Option<&Error>,
    ) -> bool {
        // An origin failure answered from the cache never reaches `fail_to_proxy`.
        if let Some(e) = error {
            self.monitor
                .metrics
                .origin_error(domain_id(ctx), e, SystemTime::now());
        }
        let serve = error.is_none_or(|e| e.esource() == &pingora::ErrorSource::Upstream);
        // After an origin failure or a 5xx response, Pingora 0.9.1 closes the client connection
        // once the stale response is sent. Turning keep-alive off here makes that response carry
        // `Connection: close`, so that the client does not send its next request into a
        // connection about to close.
        if serve && error.is_some() {
            session.set_keepalive(None);
        }
        serve
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy {
        let state = Arc::clone(&ctx.state);
        self.monitor
            .metrics
            .origin_error(domain_id(ctx), e, SystemTime::now());
        let code = respond::status_for_error(e);
        // A failed origin request is an origin error, like a 5xx response, for the reason in the
        // log and the debug header. It does not replace a reason noted before the failure.
        if *e.esource() == pingora::ErrorSource::Upstream {
            ctx.no_store.get_or_insert(NoStoreReason::OriginError);
        }
        // A failure after the response header went out (an origin that stops mid-body) leaves
        // the client with that header's status and a cut body.
        let sent = session.response_written().map(|r| r.status.as_u16());
        if code > 0 && sent.is_none() {
            let status = cache_status(&session.cache.phase());
            respond::write_error(session, code, status, ctx.debug_reason(), &ctx.plugin_state)
                .await;
        }
        let domain = state
            .domain(ctx)
            .map(|d| d.config.id.as_str())
            .unwrap_or("-");
        if code >= 500 {
            let status = sent.unwrap_or(code);
            let body_cut = sent.is_some();
            tracing::error!(domain, path = %ctx.path, status, body_cut, error = %e, "request failed");
        } else if code == 0 {
            tracing::debug!(domain, path = %ctx.path, error = %e, "client went away or stopped reading");
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// Leaves out Pingora's own line for the failures that [`Self::fail_to_proxy`] logged with
    /// the domain and path, so that each failed request logs one line: origin failures at error
    /// level, a client that went away at debug level.
    fn suppress_error_log(&self, _session: &Session, _ctx: &Self::CTX, e: &Error) -> bool {
        let code = respond::status_for_error(e);
        code == 0 || code >= 500
    }

    /// Frees the domain's origin slot once the origin's body has ended: the origin request is
    /// over, however long the client then takes to read the response.
    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<Option<std::time::Duration>> {
        if end_of_stream {
            drop(ctx.origin_slot.take());
        }
        Ok(None)
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Self::CTX) {
        // The response is finished, so the origin request is too, if it did not end before.
        drop(ctx.origin_slot.take());
        drop(ctx.cork.take());
        self.log_request(session, ctx);
    }
}

impl Gateway {
    /// Serves a plain GET or HEAD from a fresh memory-tier entry, and returns whether it did.
    ///
    /// Pingora's cache phases (key hashing, lookup, freshness, the hit's filters) cost more
    /// instructions than the rest of a small cached request. For a request whose response is
    /// the stored one as it is, this writes the same response directly: the stored header with
    /// `Age` and `Accept-Ranges` as Pingora adds them, then the fields of
    /// [`finish_response_header`]. Any other request (a range, a conditional field, a
    /// background refresh, an entry that is stale, varies, is being filled or is only on disk)
    /// gets `false` with nothing written and takes the cache path.
    async fn serve_fresh_hit(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let state = Arc::clone(&ctx.state);
        if session.subrequest_ctx.is_some()
            || ctx.route.is_none()
            || !wants_whole_response(session.req_header())
        {
            return Ok(false);
        }
        let Some(domain) = state.domain(ctx) else {
            return Ok(false);
        };

        let key = ctx.key_hash(domain);
        let Some(FreshHit {
            header,
            epoch,
            body,
        }) = state.cache.fresh_memory_hit(&key)
        else {
            return Ok(false);
        };

        let mut header = Box::new(header);
        header.set_version(http::Version::HTTP_11);
        // RFC 9111, section 4: a response served from the cache carries its age.
        let age = SystemTime::now()
            .duration_since(epoch)
            .unwrap_or_default()
            .as_secs();
        // First, in the order Pingora's hit path sets them.
        let fields = [
            (http::header::AGE, HeaderValue::from(age)),
            (
                http::header::ACCEPT_RANGES,
                HeaderValue::from_static("bytes"),
            ),
        ];
        ctx.local_cache_status = Some("HIT");
        // A stored response never carries an origin's refusal of shared caching.
        let policy = respond::PolicyField::Apply;
        finish_response_header(ctx, &mut header, "HIT", None, fields, policy)?;

        self.close_when_draining(session);
        let header_only = session.req_header().method == Method::HEAD || body.is_empty();
        // Uncorked when this function returns, after the last write.
        let _cork = if header_only || !state.tcp_nopush {
            None
        } else {
            crate::cork::Cork::for_body(session, body.len() as u64)
        };
        // Marked as the client's side, as Pingora's hit path marks them, so a client that
        // disconnects mid-body is not logged as a gateway failure.
        session
            .write_response_header(header, header_only)
            .await
            .map_err(|e| e.into_down())?;
        if !header_only {
            let mut chunks = body_chunks(&body).peekable();
            while let Some(chunk) = chunks.next() {
                let last = chunks.peek().is_none();
                session
                    .write_response_body(Some(chunk), last)
                    .await
                    .map_err(|e| e.into_down())?;
            }
        }
        Ok(true)
    }

    /// Turns keep-alive off for a response written while the gateway drains for a shutdown.
    /// Pingora 0.9.1 does so only for requests that start after the shutdown began. A response
    /// to a request in flight would carry `keep-alive` while its connection closes right after,
    /// which cuts the client's next request.
    fn close_when_draining(&self, session: &mut Session) {
        if self.monitor.health.is_draining() {
            session.set_keepalive(None);
        }
    }

    /// Waits for one of the domain's origin slots, so that a cold cache cannot flood the
    /// origin. Gives up with 503 after nine tenths of the domain's lock wait timeout.
    async fn take_origin_slot(&self, session: &Session, ctx: &mut RequestCtx) -> Result<()> {
        let state = Arc::clone(&ctx.state);
        if ctx.origin_slot.is_some() {
            return Ok(());
        }
        let Some(domain) = state.domain(ctx) else {
            return Ok(());
        };
        let lock_wait = domain
            .config
            .lock_wait_timeout
            .unwrap_or(state.cache.lock_wait_timeout());
        // A tenth shorter than the lock wait: when a filling request gives up on a slot, the
        // requests waiting on it learn of the failure (and get a stale entry) before their own
        // wait ends, not at the same moment.
        let wait = lock_wait - lock_wait / 10;
        let slots = Arc::clone(&domain.origin_slots);
        match tokio::time::timeout(wait, slots.acquire_owned()).await {
            Ok(Ok(permit)) => {
                ctx.origin_slot = Some(permit);
                Ok(())
            }
            _ => {
                note_fill_status(session, ctx, 503);
                ctx.no_store = Some(NoStoreReason::OriginBusy);
                tracing::warn!(domain = %domain.config.id, path = %ctx.path, "no free origin slot in time");
                // Marked as an origin-side error, so `should_serve_stale` serves a stale entry.
                Err(Error::explain(
                    pingora::ErrorType::HTTPStatus(503),
                    "all origin slots of the domain stayed busy",
                )
                .into_up())
            }
        }
    }

    /// Returns whether a response in `phase` gets the `ttl` rule's `Cache-Control`: not when
    /// its origin forbade shared caches to keep it, whatever the cache did with it. A request
    /// that gave up waiting on another's fill never ran the cache's own decision. A response
    /// served as stored never had such a refusal, so it needs no check.
    fn rule_field(
        &self,
        session: &Session,
        ctx: &RequestCtx,
        phase: &CachePhase,
        resp: &ResponseHeader,
    ) -> respond::PolicyField {
        let stored = matches!(
            phase,
            CachePhase::Hit | CachePhase::Stale | CachePhase::StaleUpdating
        );
        let origin_refuses = || {
            let forwarded = self.credentials_reach_origin(session, ctx);
            crate::cache::refuses_shared_caching(resp, forwarded)
        };
        if !stored && origin_refuses() {
            respond::PolicyField::Omit
        } else {
            respond::PolicyField::Apply
        }
    }

    /// Returns whether the origin receives the client's credentials: the request has an
    /// `Authorization` field and its route forwards it.
    fn credentials_reach_origin(&self, session: &Session, ctx: &RequestCtx) -> bool {
        self.forwards_authorization(ctx)
            && session
                .req_header()
                .headers
                .contains_key(http::header::AUTHORIZATION)
    }

    fn forwards_authorization(&self, ctx: &RequestCtx) -> bool {
        let state = Arc::clone(&ctx.state);
        let route = state
            .domain(ctx)
            .and_then(|d| ctx.route.map(|r| &d.config.routes[r]));
        route.is_some_and(|r| r.forward_authorization)
    }

    /// Writes the access-log line and the request metrics of a finished request.
    ///
    /// NOTE: a request still running when a stop's grace period ends is cancelled with its
    /// runtime and never reaches this step, so it gets neither.
    fn log_request(&self, session: &Session, ctx: &RequestCtx) {
        let state = Arc::clone(&ctx.state);
        let req = session.req_header();
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let cache_status = ctx
            .sent_cache_status
            .or(ctx.local_cache_status)
            .unwrap_or_else(|| cache_status(&session.cache.phase()));
        let domain = state.domain(ctx);
        let rejected_by = ctx.plugin_state.rejected_by;
        let rejected_reason = ctx.plugin_state.rejected_reason;
        if let (Some(domain), Some(by)) = (domain, rejected_by) {
            let key = (domain.config.id.clone(), by, rejected_reason);
            *state.rejections.lock().entry(key).or_default() += 1;
        }
        let duration = ctx.start.elapsed();
        let body_bytes = session.body_bytes_sent() as u64;
        self.monitor
            .metrics
            .observe_request(&crate::metrics::RequestRecord {
                domain: domain.map(|d| d.config.id.as_str()),
                method: &req.method,
                status,
                cache_status,
                body_bytes,
                duration,
                background: ctx.plugin_state.background_refresh,
            });
        if state.access_log.is_on() {
            let header = |name| {
                req.headers
                    .get(name)
                    .and_then(|v: &http::HeaderValue| v.to_str().ok())
            };
            let target = req.uri.path_and_query().map_or("-", |pq| pq.as_str());
            let version = format!("{:?}", req.version);
            state.access_log.log(&AccessEntry {
                remote_addr: ctx.client_ip.or_else(|| peer_ip(session)),
                user: ctx.plugin_state.user.as_deref(),
                time: SystemTime::now(),
                method: req.method.as_str(),
                target,
                version: &version,
                status,
                body_bytes,
                referer: header(http::header::REFERER),
                user_agent: header(http::header::USER_AGENT),
                domain: domain.map(|d| d.config.id.as_str()),
                cache_status,
                duration,
                rejected_by,
                rejected_reason: rejected_by.and(rejected_reason),
            });
        }
        if let Some(reason) = ctx.no_store {
            tracing::debug!(path = %ctx.path, reason = reason.label(), "response not stored");
        }
        if let Some(domain) = domain {
            let record = LogRecord {
                domain: &domain.config.id,
                path: &ctx.path,
                status,
                cache_status,
                body_bytes,
                duration,
            };
            for plugin in &domain.config.plugins {
                plugin.logging(&record, &ctx.plugin_state);
            }
        }
    }
}
