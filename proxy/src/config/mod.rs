//! The gateway's configuration: one TOML file, every key overridable from the environment.
//!
//! `load` reads the file, applies `MIRROR_GATEWAY__...` environment overrides (see
//! [`mirror_plugins::config_file::env`]), deserializes the schema (`schema.rs`) and validates
//! it into the types below. The `[sync]` section of the same document is validated by the
//! sync crate. Every error is collected and returned together, each naming its source (file
//! or environment variable), key, value and reason, the way `nginx -t` lists problems.

pub mod schema;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mirror_plugins::config_file::{self, env};
use mirror_plugins::Plugin;
use mirror_sync::SyncConfig;

use crate::client_ip::TrustedProxies;

pub use config_file::{ConfigError, ENV_PREFIX};

/// A validated configuration, ready to run.
#[derive(Clone)]
pub struct GatewayConfig {
    /// The file it was loaded from.
    pub path: PathBuf,
    pub server: ServerSettings,
    pub log: LogSettings,
    pub cache: CacheSettings,
    /// The admin listener, when configured.
    pub admin: Option<AdminSettings>,
    pub domains: Vec<Domain>,
    /// TLS listeners, each domain's certificate and HTTPS redirect, the default certificate.
    pub tls: TlsConfig,
    /// The `[sync]` section, whose jobs the gateway runs, or `None` when the file has none.
    pub sync: Option<SyncConfig>,
    /// Problems that do not stop the gateway, such as a host name that the domain's
    /// certificate does not cover; `App::build` logs them.
    pub warnings: Vec<ConfigError>,
}

/// The validated TLS keys: `server.tls_listen`, `server.tls_default_domain` and the `tls_*`
/// and `redirect_to_https` keys of each domain.
#[derive(Debug, Clone, Default)]
pub struct TlsConfig {
    /// TCP addresses for HTTPS; port 0 picks a free port at start. Empty: no TLS.
    pub listen: Vec<SocketAddr>,
    /// Id of the domain whose certificate answers handshakes without a server name or with
    /// one no domain takes; `None` refuses those handshakes.
    pub default_domain: Option<String>,
    /// Per domain id, for every domain; a domain absent here serves no TLS.
    pub domains: std::collections::BTreeMap<String, DomainTls>,
}

/// A domain's TLS settings.
#[derive(Debug, Clone, Default)]
pub struct DomainTls {
    /// The certificate chain and key, loaded; `None`: the domain serves no TLS.
    pub cert: Option<Arc<crate::tls::DomainCert>>,
    /// Whether plain-HTTP requests get 308 to the same URL over HTTPS.
    pub redirect_to_https: bool,
}

/// The admin listener's address and users.
#[derive(Clone)]
pub struct AdminSettings {
    pub listen: SocketAddr,
    pub users: Arc<mirror_plugins::htpasswd::Htpasswd>,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// TCP addresses for plain HTTP; port 0 picks a free port at start.
    pub listen: Vec<SocketAddr>,
    /// Worker threads of the proxy service.
    pub threads: usize,
    /// Directory for the internal sockets of export-tree origins; `None` picks one at start.
    pub runtime_dir: Option<PathBuf>,
    pub grace_period: Duration,
    pub shutdown_timeout: Duration,
    pub upstream_keepalive_pool_size: usize,
    /// Peers whose `X-Forwarded-For`, and PROXY header with `proxy_protocol`, name the client;
    /// empty trusts no peer.
    pub trusted_proxies: TrustedProxies,
    /// Where `run` writes its process id, for `mirror-gateway reload`.
    pub pid_file: PathBuf,
    /// Maximum wait for a client to take one write of a response.
    pub send_timeout: Duration,
    /// How long an idle HTTP/1 connection waits for its next request; zero turns keep-alive
    /// off.
    pub keepalive_timeout: Duration,
    /// Whether a change on disk of the config file or a TLS file it names reloads by itself.
    pub reload_on_change: bool,
    /// Whether the client socket is corked while a large body goes out from the cache.
    pub tcp_nopush: bool,
    /// Whether an HTTP/1.1 client may send its next request before it has read the response
    /// to the previous one on the same connection.
    pub pipelining: bool,
    /// Whether the client listeners read a PROXY protocol header on new connections.
    pub proxy_protocol: bool,
    /// How long a new connection may take to send its PROXY header or first byte.
    pub proxy_protocol_timeout: Duration,
}

/// Returns the pid file used when `server.pid_file` is not set: in `$XDG_RUNTIME_DIR`, else
/// `/tmp`.
pub fn default_pid_file() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join("mirror-gateway.pid")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    Stdout,
    File(PathBuf),
    Off,
}

/// The format of access-log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLogFormat {
    /// nginx's `combined` format followed by domain, user, cache status and request time.
    Combined,
    /// One JSON object a line.
    Json,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub access_log: AccessLogTarget,
    pub access_log_format: AccessLogFormat,
    /// A `tracing` filter directive such as `info` or `mirror_proxy=debug,info`.
    pub level: String,
}

#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// Byte budget of the memory tier.
    pub memory_bytes: usize,
    /// Responses larger than this are served but not stored.
    pub max_object_bytes: usize,
    /// How long a request waits for another request's fill of the same key.
    pub lock_wait_timeout: Duration,
    /// After this long a fill is presumed stuck and waiters compete again.
    pub lock_age_timeout: Duration,
    /// Whether responses that were not stored carry `X-Cache-Reason` with the reason label.
    pub debug_headers: bool,
    /// The disk tier behind the memory tier, when configured.
    pub disk: Option<DiskCacheSettings>,
}

/// The disk tier's directory and limits.
#[derive(Debug, Clone)]
pub struct DiskCacheSettings {
    pub dir: PathBuf,
    /// Byte budget of the directory's entries.
    pub budget_bytes: u64,
    /// Responses larger than this are served but not stored.
    pub max_object_bytes: u64,
    /// Time between two sweeps that delete the entries past their stale windows.
    pub sweep_interval: Duration,
}

/// A mirror domain: its host names, routes, origins and plugin chain.
#[derive(Clone)]
pub struct Domain {
    pub id: String,
    pub hosts: Vec<String>,
    /// Routes sorted by descending prefix length, so the first match is the longest.
    pub routes: Vec<Route>,
    pub origins: Vec<Origin>,
    pub plugins: Vec<Arc<dyn Plugin>>,
    /// Stale windows of stored responses, unless the path's `ttl` rule sets its own.
    pub stale: StaleWindows,
    /// How long a request waits for another request's fill of the same key; `None` uses the
    /// cache-wide setting.
    pub lock_wait_timeout: Option<Duration>,
    /// Most requests this domain sends to its origins at once; more wait for a free slot.
    pub max_origin_requests: u32,
}

/// How long after expiry a stored response may still be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaleWindows {
    /// Served at once while one background request refreshes the entry.
    pub while_revalidate: Duration,
    /// Served when the origin is down, times out or returns 5xx.
    pub if_error: Duration,
}

impl StaleWindows {
    /// No stale serving.
    pub const NONE: Self = Self {
        while_revalidate: Duration::ZERO,
        if_error: Duration::ZERO,
    };
}

impl std::fmt::Debug for Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plugins: Vec<_> = self.plugins.iter().map(|p| p.name()).collect();
        f.debug_struct("Domain")
            .field("id", &self.id)
            .field("hosts", &self.hosts)
            .field("routes", &self.routes)
            .field("origins", &self.origins)
            .field("plugins", &plugins)
            .field("stale", &self.stale)
            .finish()
    }
}

/// A path prefix and the origin that serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// A prefix ending in `/` matches every path below it; any other prefix matches that exact
    /// path and the paths below it as a directory (`/a` matches `/a` and `/a/b`, not `/ab`).
    pub prefix: String,
    /// Index into [`Domain::origins`].
    pub origin: usize,
    /// Replaces the prefix in the path sent to the origin; `None` keeps the path as it is.
    pub origin_path: Option<String>,
    /// Whether the downstream `Authorization` header is passed to the origin.
    pub forward_authorization: bool,
}

#[derive(Debug, Clone)]
pub struct Origin {
    pub name: String,
    pub kind: OriginKind,
}

#[derive(Debug, Clone)]
pub enum OriginKind {
    Http(HttpOrigin),
    ExportTree(ExportTreeOrigin),
}

#[derive(Debug, Clone)]
pub struct HttpOrigin {
    /// `host:port` of each upstream server, tried in turn.
    pub addresses: Vec<String>,
    /// The `Host` header the origin expects.
    pub host: String,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    /// How long an idle keep-alive connection to the origin is kept for reuse.
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct ExportTreeOrigin {
    pub root: PathBuf,
    /// An export id to serve in place of `latest`, for rollbacks.
    pub pinned_export: Option<String>,
}

/// Loads and validates the config file at `path`, applying overrides from `env`.
///
/// `env` is usually `std::env::vars()`; only variables starting with [`ENV_PREFIX`] are used.
pub fn load(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<GatewayConfig, Vec<ConfigError>> {
    let text = config_file::read_file(path).map_err(|e| vec![e])?;
    load_str(&text, path, env)
}

/// Returns the pid file that the config file at `path` names, with the overrides in `env`,
/// without validating anything else: `server.pid_file` resolved against the file's
/// directory, else [`default_pid_file`]. An error means the file cannot be read, is not
/// TOML, or has a `server.pid_file` that is not a string.
pub fn pid_file(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<PathBuf, ConfigError> {
    let file = path.display().to_string();
    let text = config_file::read_file(path)?;
    // Errors of other variables do not matter here; a bad pid-file value is reported below.
    let (root, sources, _) = config_file::parse_document(&text, &file, env)?;
    let key = "server.pid_file";
    let value = root.get("server").and_then(|server| server.get("pid_file"));
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match value {
        None => Ok(default_pid_file()),
        Some(toml::Value::String(pid_file)) => Ok(validate::resolve(dir, pid_file)),
        Some(other) => Err(ConfigError::new(
            sources.source_of(key, &file),
            key,
            Some(other.to_string()),
            "must be a string, the path of the pid file",
        )),
    }
}

/// Validates config `text` as if it were read from `path` (relative paths resolve against
/// the directory of `path`), `[sync]` included.
pub fn load_str(
    text: &str,
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<GatewayConfig, Vec<ConfigError>> {
    let file = path.display().to_string();
    let env: Vec<(String, String)> = env.into_iter().collect();
    let near_misses = env::near_miss_warnings(&env);
    let (root, sources, mut errors) =
        config_file::parse_document(text, &file, env.iter().cloned()).map_err(|e| vec![e])?;
    // The sync task validates `[sync]` from this document, so that a key or a pinned export
    // set by a variable means the same to it as to the gateway.
    let sync = match root.contains_key("sync") {
        false => Ok(None),
        true => mirror_sync::config::from_document(&root, &sources, path, &env).map(Some),
    };
    let gateway = validate::validate(root, path, &sources);
    match (gateway, sync) {
        (Ok(mut config), Ok(sync)) if errors.is_empty() => {
            config.warnings.extend(near_misses);
            config.sync = sync;
            Ok(config)
        }
        (gateway, sync) => {
            errors.extend(gateway.err().unwrap_or_default());
            errors.extend(sync.err().unwrap_or_default());
            Err(errors)
        }
    }
}
