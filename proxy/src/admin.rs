//! The admin listener: statistics, metrics, health and purges, on its own address with its own
//! users.
//!
//! Off unless `[admin] listen` is set. Every request needs Basic Auth from the admin htpasswd
//! file, except `GET /healthz` and `GET /readyz`, which probes reach without credentials.
//! Endpoints:
//!
//! | method and path | what it does |
//! |---|---|
//! | `GET /healthz` | 200 `ok` while the process runs (no credentials) |
//! | `GET /readyz` | 200 when ready to serve, else 503 with the reasons as JSON (no credentials) |
//! | `GET /metrics` | Prometheus metrics, text exposition format |
//! | `GET /status` | the live status page (HTML) |
//! | `GET /status.json` | the status page's data: per-domain counters, cache tiers, origin health |
//! | `GET /cache/stats` | the cache tiers' counters as JSON |
//! | `GET /limits/stats` | requests rejected by plugins, per domain and plugin, the `rate_limit` plugin's rejections per reason, and the `quota` plugin's rejections per class and reason |
//! | `POST /cache/purge?domain=D&path=P` | removes path `P` of domain `D` (every query and export; add `&query=Q` for one query) |
//! | `POST /cache/purge?domain=D&prefix=P` | removes every path of `D` starting with `P` |
//! | `POST /cache/purge?domain=D` | removes everything stored for `D` |
//!
//! Purges answer `{"purged": N}` with the number of stored responses removed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use mirror_plugins::htpasswd::Htpasswd;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::cache::{PurgeScope, TierSnapshot};
use crate::gateway::GatewayState;
use crate::status::{self, Reply};

/// The admin HTTP application.
pub struct AdminApp {
    /// The current gateway state; a reload swaps it.
    state: Arc<ArcSwap<GatewayState>>,
    users: Arc<Htpasswd>,
    /// The metrics and health that `/metrics`, `/readyz` and `/status.json` report.
    monitor: Arc<crate::status::Monitor>,
}

impl AdminApp {
    /// Serves the admin API for `state`, to the users of `users`.
    pub fn new(state: Arc<ArcSwap<GatewayState>>, users: Arc<Htpasswd>) -> Self {
        Self {
            state,
            users,
            monitor: Arc::default(),
        }
    }

    /// Reports `monitor`, the gateway instance's own, in place of an empty one.
    pub fn with_monitor(mut self, monitor: Arc<crate::status::Monitor>) -> Self {
        self.monitor = monitor;
        self
    }

    async fn handle(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
    ) -> (StatusCode, String) {
        match (method, path) {
            (&Method::GET | &Method::HEAD, "/cache/stats") => (
                StatusCode::OK,
                stats_json(
                    &self.state.load().cache.memory_stats(),
                    self.state.load().cache.disk_stats(),
                ),
            ),
            (&Method::GET | &Method::HEAD, "/limits/stats") => (StatusCode::OK, self.limits_json()),
            (&Method::POST, "/cache/purge") => match self.purge_scope(query) {
                Ok(scope) => {
                    let state = self.state.load_full();
                    let task = tokio::task::spawn_blocking(move || {
                        let purged = state.cache.purge(&scope);
                        (scope, purged)
                    });
                    let Ok((scope, purged)) = task.await else {
                        return (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            error_json("the purge failed; see the error log"),
                        );
                    };
                    tracing::info!(%scope, purged, "cache purge");
                    (StatusCode::OK, format!("{{\"purged\":{purged}}}\n"))
                }
                Err((status, message)) => (status, error_json(&message)),
            },
            (_, "/cache/stats" | "/cache/purge" | "/limits/stats") => (
                StatusCode::METHOD_NOT_ALLOWED,
                error_json(
                    "use GET or HEAD for /cache/stats and /limits/stats, POST for /cache/purge",
                ),
            ),
            _ => (StatusCode::NOT_FOUND, error_json(UNKNOWN_ENDPOINT)),
        }
    }

    fn limits_json(&self) -> String {
        let rejections = self.state.load().rejections.lock().clone();
        let mut by_plugin: std::collections::BTreeMap<(&str, &str), u64> = Default::default();
        for ((domain, plugin, _), count) in &rejections {
            *by_plugin.entry((domain, plugin)).or_default() += count;
        }
        let plugins: Vec<String> = by_plugin
            .iter()
            .map(|((domain, plugin), count)| {
                format!(
                    "{{\"domain\":{},\"plugin\":\"{plugin}\",\"count\":{count}}}",
                    json_string(domain)
                )
            })
            .collect();
        let rate_limit: Vec<String> = rejections
            .iter()
            .filter_map(|((domain, plugin, reason), count)| {
                let reason =
                    reason.filter(|_| *plugin == mirror_plugins::rate_limit::REJECTED_BY)?;
                Some(format!(
                    "{{\"domain\":{},\"reason\":\"{reason}\",\"count\":{count}}}",
                    json_string(domain)
                ))
            })
            .collect();
        let quota: Vec<String> = mirror_plugins::quota::rejection_counts()
            .iter()
            .map(|r| {
                format!(
                    "{{\"domain\":{},\"class\":\"{}\",\"reason\":\"{}\",\"count\":{}}}",
                    json_string(&r.domain),
                    r.class,
                    r.reason,
                    r.count
                )
            })
            .collect();
        format!(
            "{{\"rejections\":[{}],\"rate_limit\":[{}],\"quota\":[{}]}}\n",
            plugins.join(","),
            rate_limit.join(","),
            quota.join(",")
        )
    }

    fn purge_scope(&self, query: Option<&str>) -> Result<PurgeScope, (StatusCode, String)> {
        let bad = |message: String| (StatusCode::BAD_REQUEST, message);
        let pairs = parse_query(query.unwrap_or("")).map_err(bad)?;
        // A misspelt parameter must not widen the purge to the whole domain.
        if let Some((unknown, _)) = pairs
            .iter()
            .find(|(name, _)| !PURGE_PARAMETERS.contains(&name.as_str()))
        {
            return Err(bad(format!(
                "unknown parameter {:?}; use domain, and path (with optional query) or prefix",
                shortened(unknown)
            )));
        }
        let params: HashMap<String, String> = pairs.into_iter().collect();
        if params.contains_key("query") && !params.contains_key("path") {
            return Err(bad("`query` goes with `path` only".into()));
        }
        let domain = params
            .get("domain")
            .ok_or_else(|| bad("missing the `domain` parameter".into()))?
            .clone();
        let state = self.state.load();
        if !state.domains.iter().any(|d| d.config.id == domain) {
            let ids: Vec<&str> = state.domains.iter().map(|d| d.config.id.as_str()).collect();
            return Err((
                StatusCode::NOT_FOUND,
                format!(
                    "no domain {domain:?}; the configured domain ids are {}",
                    ids.join(", ")
                ),
            ));
        }
        let normalise = |name: &str, value: &str| {
            // Stored paths never contain `?` or `#`, so such a value would purge nothing.
            if value.contains(['?', '#']) {
                return Err(bad(format!(
                    "invalid `{name}` {:?}: a path has no `?` or `#`; give the query \
                     separately, percent-encoded (path=/a.json&query=v%3D1)",
                    shortened(value)
                )));
            }
            crate::path::normalize(value)
                .map_err(|e| bad(format!("invalid `{name}` {:?}: {e}", shortened(value))))
        };
        match (params.get("path"), params.get("prefix")) {
            (Some(_), Some(_)) => Err(bad("give `path` or `prefix`, not both".into())),
            (Some(path), None) => Ok(PurgeScope::Url {
                domain,
                path: normalise("path", path)?,
                query: params.get("query").cloned(),
            }),
            (None, Some(prefix)) => Ok(PurgeScope::Prefix {
                domain,
                prefix: normalise("prefix", prefix)?,
            }),
            (None, None) => Ok(PurgeScope::Domain(domain)),
        }
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        // Pingora's simple HTTP service keeps every connection alive. A request with
        // `Connection: close`, or from HTTP/1.0 without keep-alive, gets its connection closed
        // after the response, with `Connection: close` in it.
        if wants_close(session.req_header()) {
            session.set_keepalive(None);
        }
        let req = session.req_header();
        let (method, path, query) = (
            req.method.clone(),
            req.uri.path().to_string(),
            req.uri.query().map(str::to_owned),
        );
        let state = self.state.load_full();
        let monitor = &self.monitor;
        if let Some(reply) = status::public_endpoint(&state, monitor, &method, &path).await {
            return reply.into_response();
        }
        if self
            .users
            .authenticate(&req.headers, Instant::now())
            .await
            .is_none()
        {
            let body = error_json("valid admin credentials are required");
            return Reply::json(StatusCode::UNAUTHORIZED, body).into_response();
        }
        let now = SystemTime::now();
        if let Some(reply) = status::admin_endpoint(&state, monitor, &method, &path, now).await {
            return reply.into_response();
        }
        let (status, body) = self.handle(&method, &path, query.as_deref()).await;
        let allow = if path == "/cache/purge" {
            "POST"
        } else {
            "GET, HEAD"
        };
        Reply::json(status, body).into_response_allowing(allow)
    }
}

fn stats_json(memory: &TierSnapshot, disk: Option<crate::cache::DiskSnapshot>) -> String {
    let tier = |t: &TierSnapshot| {
        format!(
            "{{\"entries\":{},\"bytes\":{},\"hits\":{},\"misses\":{},\"evictions\":{},\"write_errors\":{}}}",
            t.entries, t.bytes, t.hits, t.misses, t.evictions, t.write_errors
        )
    };
    let disk = match disk {
        Some(d) => format!(
            ",\"disk\":{{\"entries\":{},\"bytes\":{},\"budget_bytes\":{},\"hits\":{},\"misses\":{},\"evictions\":{},\"write_errors\":{},\"corrupt_entries\":{},\"expired_entries\":{}}}",
            d.entries, d.bytes, d.budget_bytes, d.hits, d.misses, d.evictions, d.write_errors, d.corrupt_entries, d.expired
        ),
        None => String::new(),
    };
    format!("{{\"memory\":{}{disk}}}\n", tier(memory))
}

/// Quotes `text` as a JSON string.
pub(crate) fn json_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn error_json(message: &str) -> String {
    format!("{{\"error\":{}}}\n", json_string(message))
}

/// The 404 message, naming every endpoint of the admin listener.
const UNKNOWN_ENDPOINT: &str = "unknown endpoint; the endpoints are GET /healthz, GET /readyz, \
     GET /metrics, GET /status, GET /status.json, GET /limits/stats, GET /cache/stats and \
     POST /cache/purge";

/// The parameters a purge accepts.
const PURGE_PARAMETERS: [&str; 4] = ["domain", "path", "prefix", "query"];

/// Decodes `query` into its parameters. A parameter given twice or not valid UTF-8 once
/// decoded is an error that names it.
/// Returns whether the connection of `req` closes after the response: the request has
/// `Connection: close`, or is HTTP/1.0 without `Connection: keep-alive`.
fn wants_close(req: &pingora::http::RequestHeader) -> bool {
    let has = |token: &str| {
        req.headers
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|part| part.trim().eq_ignore_ascii_case(token))
    };
    has("close") || (req.version == http::Version::HTTP_10 && !has("keep-alive"))
}

/// Returns `text`, cut to its first 200 characters (with `...`) when longer, for an error
/// message that names a value the client sent.
fn shortened(text: &str) -> String {
    const MAX_CHARS: usize = 200;
    match text.char_indices().nth(MAX_CHARS) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_string(),
    }
}

/// Splits a query string into its decoded parameters, in the order written. A parameter given
/// twice is an error.
fn parse_query(query: &str) -> Result<Vec<(String, String)>, String> {
    let decode = |text: &str| {
        percent_encoding::percent_decode_str(&text.replace('+', " "))
            .decode_utf8()
            .map(|v| v.into_owned())
            .map_err(|_| format!("parameter {text:?} is not valid UTF-8 once decoded"))
    };
    let mut params: Vec<(String, String)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode(name)?;
        let value = decode(value)?;
        if !seen.insert(name.clone()) {
            return Err(format!(
                "parameter {:?} is given twice; give it once",
                shortened(&name)
            ));
        }
        params.push((name, value));
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_rejects_repeated_parameter() {
        let error = parse_query("domain=a&path=/x&path=/y").expect_err("repeated");
        assert!(error.contains("\"path\" is given twice"), "{error}");
    }

    #[test]
    fn query_decodes_values() {
        let params = parse_query("domain=primary&path=%2Fconcelier%2Fexports%2Findex.json&x")
            .expect("valid query");
        let names: Vec<&str> = params.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["domain", "path", "x"]);
        let params: HashMap<String, String> = params.into_iter().collect();
        assert_eq!(params["domain"], "primary");
        assert_eq!(params["path"], "/concelier/exports/index.json");
        assert_eq!(params["x"], "");
    }

    #[test]
    fn long_values_shortened() {
        let long = "a".repeat(5000);
        let shown = shortened(&long);
        assert_eq!(shown.len(), 203);
        assert!(shown.ends_with("..."));
        assert_eq!(shortened("é".repeat(10).as_str()), "é".repeat(10));
    }

    #[test]
    fn error_json_escapes_quotes() {
        assert_eq!(
            error_json("no domain \"x\""),
            "{\"error\":\"no domain \\\"x\\\"\"}\n"
        );
    }
}
