//! Live reload: a new configuration replaces the running one without dropping a request.
//!
//! On SIGHUP, and when the config file or a TLS certificate, key or OCSP file changes on disk
//! (checked every 2 seconds), the configuration is read and validated again. If anything is invalid the gateway keeps running on the old
//! configuration and logs every error. Otherwise a new [`GatewayState`] is built and swapped in
//! atomically: requests that already started finish with the state they started with, and new
//! requests use the new one. Connections, keep-alive included, stay open.
//!
//! A reload also reads the TLS certificates, keys and OCSP responses again, so certificates
//! renewed in place are served from the next handshake on, and hands the `[sync]` section to
//! the sync scheduler (see [`crate::sync_service`]); an invalid `[sync]` rejects the reload.
//!
//! What a reload keeps: the cache (both tiers), the access log, the plugins' counters (quota
//! counts and rate-limit buckets live in process-wide registries keyed by domain id) and the
//! export-tree file servers. What needs a restart: the settings [`restart_needed`] compares
//! (listeners, threads, shutdown timing, the admin listener, `[cache]` except `debug_headers`,
//! log target, format and level, ...), and an export-tree origin that is new or whose root
//! changed (its file server is not running). Each such setting whose value differs from the
//! one the process started with is logged on every reload.
//! htpasswd files are re-read by their plugin when they change, without a reload.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::access_log::AccessLog;
use crate::cache::CacheTier;
use crate::config::{self, GatewayConfig};
use crate::gateway::{DomainRuntime, GatewayState};
use crate::routing::Router;
use crate::sync_service::SyncControl;
use crate::upstream::Upstream;

/// How often the config file's metadata is checked for changes.
const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// The parts every state shares, whatever the configuration.
pub struct Shared {
    pub cache: Arc<CacheTier>,
    pub access_log: AccessLog,
    pub rejections: Arc<Mutex<crate::metrics::Rejections>>,
    pub runtime_dir: PathBuf,
    /// The running export-tree file servers: socket path to the tree root they serve.
    pub export_trees: HashMap<PathBuf, PathBuf>,
    /// The TLS listeners' certificate store and addresses; a reload swaps the store's contents.
    pub tls: Arc<crate::tls::TlsState>,
}

/// Builds the state for `config`, reusing what `shared` holds.
pub fn build_state(config: &GatewayConfig, shared: &Shared) -> Result<GatewayState, String> {
    let mut domains = Vec::new();
    for domain in &config.domains {
        let mut upstreams = Vec::new();
        for origin in &domain.origins {
            let upstream =
                Upstream::new(&domain.id, origin, &shared.runtime_dir).map_err(|reason| {
                    format!("domain {}, origin {}: {reason}", domain.id, origin.name)
                })?;
            if let Upstream::ExportTree { tree, socket } = &upstream {
                let running = shared.export_trees.get(socket);
                if running.map(PathBuf::as_path) != Some(tree.root()) {
                    return Err(format!(
                        "domain {}, origin {}: a new export tree, or a new root for one, needs a restart",
                        domain.id, origin.name
                    ));
                }
            }
            upstreams.push(upstream);
        }
        let slots = usize::try_from(domain.max_origin_requests).unwrap_or(usize::MAX);
        domains.push(DomainRuntime {
            config: domain.clone(),
            upstreams,
            origin_slots: Arc::new(tokio::sync::Semaphore::new(slots)),
        });
    }
    Ok(GatewayState {
        debug_headers: config.cache.debug_headers,
        rejections: Arc::clone(&shared.rejections),
        router: Router::new(&config.domains).map_err(|e| e.to_string())?,
        domains,
        cache: Arc::clone(&shared.cache),
        access_log: shared.access_log.clone(),
        trusted_proxies: config.server.trusted_proxies.clone(),
        send_timeout: config.server.send_timeout,
        keepalive_timeout: config.server.keepalive_timeout,
        tcp_nopush: config.server.tcp_nopush,
        pipelining: config.server.pipelining,
        tls: Arc::clone(&shared.tls),
    })
}

/// Reloads the configuration on request, keeping the old one when the new one is invalid.
pub struct Reloader {
    path: PathBuf,
    current: Arc<ArcSwap<GatewayState>>,
    shared: Shared,
    /// The configuration the process started with, without its domains. The restart-only
    /// settings keep its values until the process restarts, whatever a reload loads.
    started: GatewayConfig,
    /// The restart-only settings whose value in the last applied configuration differs from
    /// the value the process runs with.
    restart_pending: Mutex<Vec<&'static str>>,
    /// The watched files (the config file, then TLS certificates, keys and OCSP responses)
    /// and how they looked at the last load.
    stamps: Mutex<Vec<(PathBuf, Option<FileStamp>)>>,
    /// Watched files found missing and already logged, so that each absence is logged once.
    missing_logged: Mutex<Vec<PathBuf>>,
    /// Counts reloads and their outcome in the metrics.
    monitor: Arc<crate::status::Monitor>,
    /// Hands a new `[sync]` section to the sync scheduler.
    sync: Arc<SyncControl>,
    /// `server.reload_on_change` of the configuration applied last.
    reload_on_change: AtomicBool,
}

/// The outcome of a reload, for logs, metrics and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    Applied,
    /// The new configuration was rejected; the old one keeps running.
    Rejected(Vec<String>),
}

impl Reloader {
    /// Watches `config.path` and swaps states into `current`.
    pub fn new(
        config: &GatewayConfig,
        current: Arc<ArcSwap<GatewayState>>,
        shared: Shared,
        monitor: Arc<crate::status::Monitor>,
        sync: Arc<SyncControl>,
    ) -> Self {
        Self {
            path: config.path.clone(),
            current,
            shared,
            // Without its domains: their plugins must end with the reload that replaces them
            // (a quota plugin's state-file writer and its registered budgets, for example).
            started: GatewayConfig {
                domains: Vec::new(),
                ..config.clone()
            },
            restart_pending: Mutex::new(Vec::new()),
            stamps: Mutex::new(stamps_of(config)),
            missing_logged: Mutex::new(Vec::new()),
            monitor,
            sync,
            reload_on_change: AtomicBool::new(config.server.reload_on_change),
        }
    }

    /// Reads, validates and applies the config file, with environment overrides from `env`,
    /// and counts the outcome in the metrics.
    pub fn reload_with(&self, env: Vec<(String, String)>) -> ReloadOutcome {
        let outcome = self.apply(env);
        self.monitor
            .metrics
            .reload(outcome == ReloadOutcome::Applied);
        outcome
    }

    fn apply(&self, env: Vec<(String, String)>) -> ReloadOutcome {
        // Remember the files as they are now, so that a broken file is not reloaded again
        // every few seconds; it is reloaded when it changes again.
        {
            let mut stamps = self.stamps.lock();
            for (path, stamp) in stamps.iter_mut() {
                *stamp = FileStamp::of(path);
            }
        }
        let config = match config::load(&self.path, env) {
            Ok(config) => config,
            Err(errors) => {
                let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
                for error in &errors {
                    tracing::error!(%error, "reload rejected; the running configuration stays");
                }
                return ReloadOutcome::Rejected(errors);
            }
        };
        if let Some(error) = conflict_with_start(&self.started, &config) {
            tracing::error!(%error, "reload rejected; the running configuration stays");
            return ReloadOutcome::Rejected(vec![error]);
        }
        let certificates = match crate::tls::CertStore::from_config(&config) {
            Ok(store) => store,
            Err(e) => {
                let error = e.to_string();
                tracing::error!(%error, "reload rejected; the running configuration stays");
                return ReloadOutcome::Rejected(vec![error]);
            }
        };
        match build_state(&config, &self.shared) {
            Ok(state) => {
                for warning in &config.warnings {
                    tracing::warn!(%warning, "configuration warning");
                }
                // Certificates and keys renewed on disk are read again here.
                self.shared.tls.store().reload(certificates);
                self.warn_restart_needed(&config);
                self.current.store(Arc::new(state));
                self.sync.apply(config.sync.clone());
                let domains: Vec<&str> = config.domains.iter().map(|d| d.id.as_str()).collect();
                tracing::info!(config = %self.path.display(), ?domains, "reload applied");
                *self.stamps.lock() = stamps_of(&config);
                self.reload_on_change
                    .store(config.server.reload_on_change, Ordering::Relaxed);
                ReloadOutcome::Applied
            }
            Err(error) => {
                tracing::error!(%error, "reload rejected; the running configuration stays");
                ReloadOutcome::Rejected(vec![error])
            }
        }
    }

    /// Reloads with the process environment.
    pub fn reload(&self) -> ReloadOutcome {
        self.reload_with(utf8_environment())
    }

    /// Logs each restart-only setting whose value in `new` differs from the value the
    /// process runs with, and remembers the list for [`Reloader::restart_pending`].
    fn warn_restart_needed(&self, new: &GatewayConfig) {
        let changed = restart_needed(&self.started, new);
        if !changed.is_empty() {
            tracing::warn!(
                ?changed,
                "these settings changed but take effect only after a restart"
            );
        }
        *self.restart_pending.lock() = changed;
    }

    /// Returns the restart-only settings, as config keys, whose value in the last applied
    /// configuration differs from the value the process started with.
    pub fn restart_pending(&self) -> Vec<&'static str> {
        self.restart_pending.lock().clone()
    }

    /// Logs a warning for each watched file that was there at the last load and is gone now,
    /// once per absence. A file that is gone does not trigger a reload, because a file being
    /// replaced by rename is briefly missing. An operator who removed it by mistake learns
    /// that the running configuration still uses the old contents.
    fn log_missing_files(&self) {
        if !self.reload_on_change.load(Ordering::Relaxed) {
            return;
        }
        let stamps = self.stamps.lock();
        let mut logged = self.missing_logged.lock();
        for path in newly_missing(&stamps, &mut logged) {
            tracing::warn!(
                file = %path.display(),
                "watched file is missing; the running configuration keeps what it loaded \
                 from it until the file is back (which reloads) or a reload succeeds without it"
            );
        }
    }

    /// Returns the first watched file that changed since the last load, if any; always `None`
    /// with `server.reload_on_change = false`.
    fn changed_file(&self) -> Option<PathBuf> {
        if !self.reload_on_change.load(Ordering::Relaxed) {
            return None;
        }
        let stamps = self.stamps.lock();
        stamps
            .iter()
            .find(|(path, stamp)| {
                let now = FileStamp::of(path);
                now.is_some() && now != *stamp
            })
            .map(|(path, _)| path.clone())
    }
}

/// Returns why `new` cannot run beside the restart-only settings the process started with,
/// although the file itself is valid. Listeners that read PROXY headers (`server.proxy_protocol`
/// at start) with no trusted proxy would count every client behind the proxies as the proxy.
fn conflict_with_start(started: &GatewayConfig, new: &GatewayConfig) -> Option<String> {
    (started.server.proxy_protocol && new.server.trusted_proxies.is_empty()).then(|| {
        "server.trusted_proxies is empty, but the listeners read PROXY headers \
         (server.proxy_protocol was true at start, and only a restart changes it), so every \
         client behind the proxies would count as the proxy; keep the proxies' networks in \
         server.trusted_proxies, or restart with proxy_protocol = false"
            .to_owned()
    })
}

/// Returns the settings that differ between `old` and `new` but take effect only after a
/// restart, as their config keys. `old` is the configuration the process started with.
fn restart_needed(old: &GatewayConfig, new: &GatewayConfig) -> Vec<&'static str> {
    let admin_listen = |c: &GatewayConfig| c.admin.as_ref().map(|a| a.listen);
    let admin_file = |c: &GatewayConfig| c.admin.as_ref().map(|a| a.users.path().to_path_buf());
    // `debug_headers` is part of each state, so a reload applies it (see `build_state`).
    let cache = |c: &GatewayConfig| {
        let cache = crate::config::CacheSettings {
            debug_headers: false,
            ..c.cache.clone()
        };
        format!("{cache:?}")
    };
    let (was, now) = (&old.server, &new.server);
    let settings = [
        (was.listen != now.listen, "server.listen"),
        (old.tls.listen != new.tls.listen, "server.tls_listen"),
        (was.threads != now.threads, "server.threads"),
        (
            was.grace_period != now.grace_period,
            "server.grace_period_secs",
        ),
        (
            was.shutdown_timeout != now.shutdown_timeout,
            "server.shutdown_timeout_secs",
        ),
        (
            was.upstream_keepalive_pool_size != now.upstream_keepalive_pool_size,
            "server.upstream_keepalive_pool_size",
        ),
        (
            was.proxy_protocol != now.proxy_protocol,
            "server.proxy_protocol",
        ),
        (
            was.proxy_protocol_timeout != now.proxy_protocol_timeout,
            "server.proxy_protocol_timeout_ms",
        ),
        (was.pid_file != now.pid_file, "server.pid_file"),
        (was.runtime_dir != now.runtime_dir, "server.runtime_dir"),
        (admin_listen(old) != admin_listen(new), "admin.listen"),
        (admin_file(old) != admin_file(new), "admin.htpasswd"),
        (cache(old) != cache(new), "cache"),
        (old.log.access_log != new.log.access_log, "log.access_log"),
        (
            old.log.access_log_format != new.log.access_log_format,
            "log.access_log_format",
        ),
        (old.log.level != new.log.level, "log.level"),
    ];
    settings
        .into_iter()
        .filter(|(differs, _)| *differs)
        .map(|(_, key)| key)
        .collect()
}

/// Returns the process environment's UTF-8 variables.
fn utf8_environment() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

/// Returns the files a reload reads: the config file and every TLS certificate, key and OCSP
/// response, each with how it looks now. htpasswd files are watched by their plugin.
fn stamps_of(config: &GatewayConfig) -> Vec<(PathBuf, Option<FileStamp>)> {
    let mut paths = vec![config.path.clone()];
    for domain in config.tls.domains.values() {
        if let Some(cert) = &domain.cert {
            let files = cert.files();
            paths.push(files.cert.clone());
            paths.push(files.key.clone());
            paths.extend(files.ocsp.clone());
        }
    }
    paths
        .into_iter()
        .map(|path| {
            let stamp = FileStamp::of(&path);
            (path, stamp)
        })
        .collect()
}

/// Returns the files of `stamps` that existed at the last load and are missing now, except
/// those in `logged`. Updates `logged` to the files missing now, so that a file is returned
/// again only after it was back in between.
fn newly_missing(
    stamps: &[(PathBuf, Option<FileStamp>)],
    logged: &mut Vec<PathBuf>,
) -> Vec<PathBuf> {
    let missing: Vec<&PathBuf> = stamps
        .iter()
        .filter(|(path, stamp)| stamp.is_some() && FileStamp::of(path).is_none())
        .map(|(path, _)| path)
        .collect();
    logged.retain(|path| missing.contains(&path));
    let new: Vec<PathBuf> = missing
        .into_iter()
        .filter(|path| !logged.contains(path))
        .cloned()
        .collect();
    logged.extend(new.iter().cloned());
    new
}

/// A file's modification time, size and inode, compared to detect a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
    /// The inode change time, in seconds and nanoseconds: a copy in place that sets the old
    /// modification time back changes only this.
    changed: (i64, i64),
}

impl FileStamp {
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        Some(Self {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode: meta.ino(),
            changed: (meta.ctime(), meta.ctime_nsec()),
        })
    }
}

/// Runs the reloader: SIGHUP and config file changes reload, SIGUSR1 reopens the access log.
pub struct ReloadService(pub Arc<Reloader>);

#[async_trait]
impl BackgroundService for ReloadService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut hangup), Ok(mut user1)) = (
            signal(SignalKind::hangup()),
            signal(SignalKind::user_defined1()),
        ) else {
            tracing::error!("cannot handle SIGHUP and SIGUSR1; reload by signal is off");
            return;
        };
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = hangup.recv() => {
                    tracing::info!("SIGHUP received; reloading the configuration");
                    let reloader = Arc::clone(&self.0);
                    let _ = tokio::task::spawn_blocking(move || reloader.reload()).await;
                }
                _ = user1.recv() => {
                    tracing::info!("SIGUSR1 received; reopening the access log");
                    self.0.shared.access_log.reopen();
                }
                _ = tick.tick() => {
                    if let Some(changed) = self.0.changed_file() {
                        tracing::info!(file = %changed.display(), "watched file changed; reloading");
                        let reloader = Arc::clone(&self.0);
                        let _ = tokio::task::spawn_blocking(move || reloader.reload()).await;
                    } else {
                        self.0.log_missing_files();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> GatewayConfig {
        let dir = std::env::temp_dir();
        let text = format!(
            "{extra}\n[domains.primary]\nhosts = [\"mirror.example\"]\n\
             [domains.primary.origins.web]\nkind = \"http\"\naddresses = [\"127.0.0.1:9\"]\n\
             [[domains.primary.routes]]\nprefix = \"/\"\norigin = \"web\"\n"
        );
        crate::config::load_str(&text, &dir.join("gateway.toml"), Vec::new())
            .unwrap_or_else(|errors| panic!("config invalid: {errors:?}"))
    }

    #[test]
    fn restart_needed_names_changed_keys() {
        let base = config("[server]\nthreads = 2\n[log]\nlevel = \"info\"");
        assert!(restart_needed(&base, &base).is_empty());
        let changed = config(
            "[server]\nthreads = 4\ngrace_period_secs = 9\npid_file = \"/tmp/other.pid\"\n\
             [log]\nlevel = \"debug\"",
        );
        assert_eq!(
            restart_needed(&base, &changed),
            [
                "server.threads",
                "server.grace_period_secs",
                "server.pid_file",
                "log.level"
            ]
        );
    }

    #[test]
    fn restart_needed_names_proxy_protocol() {
        let trusted = "[server]\ntrusted_proxies = [\"10.0.0.0/8\"]\n";
        let base = config(trusted);
        let on = config(&format!("{trusted}proxy_protocol = true"));
        assert_eq!(restart_needed(&base, &on), ["server.proxy_protocol"]);
        let slower = config(&format!("{trusted}proxy_protocol_timeout_ms = 9000"));
        let key = "server.proxy_protocol_timeout_ms";
        assert_eq!(restart_needed(&base, &slower), [key]);
        let fewer = config("[server]\ntrusted_proxies = [\"10.1.0.0/16\"]\nproxy_protocol = true");
        assert!(restart_needed(&on, &fewer).is_empty());
    }

    #[test]
    fn reload_keeps_trusted_proxies_for_proxy_protocol() {
        let on = config("[server]\ntrusted_proxies = [\"10.0.0.0/8\"]\nproxy_protocol = true");
        let off_and_empty = config("[server]\nproxy_protocol = false");
        let error = conflict_with_start(&on, &off_and_empty).expect("a conflict");
        assert!(error.contains("server.trusted_proxies is empty"), "{error}");
        let fewer = config("[server]\ntrusted_proxies = [\"10.1.0.0/16\"]");
        assert_eq!(conflict_with_start(&on, &fewer), None);
        let base = config("[server]\nlisten = [\"127.0.0.1:0\"]");
        assert_eq!(conflict_with_start(&base, &off_and_empty), None);
    }

    #[test]
    fn missing_file_reported_once_per_absence() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.pem");
        std::fs::write(&path, "x").expect("write");
        let stamps = vec![(path.clone(), FileStamp::of(&path))];
        let mut logged = Vec::new();
        assert!(newly_missing(&stamps, &mut logged).is_empty());

        std::fs::remove_file(&path).expect("remove");
        assert_eq!(
            newly_missing(&stamps, &mut logged),
            std::slice::from_ref(&path)
        );
        assert!(newly_missing(&stamps, &mut logged).is_empty());

        std::fs::write(&path, "x").expect("write again");
        assert!(newly_missing(&stamps, &mut logged).is_empty());
        assert!(logged.is_empty());
        std::fs::remove_file(&path).expect("remove again");
        assert_eq!(
            newly_missing(&stamps, &mut logged),
            std::slice::from_ref(&path)
        );

        // A file that was already missing at the last load is not reported.
        let absent = vec![(dir.path().join("never.pem"), None)];
        assert!(newly_missing(&absent, &mut Vec::new()).is_empty());
    }

    #[test]
    fn restart_needed_skips_debug_headers() {
        let base = config("[cache]\nmemory_bytes = \"64MiB\"");
        let debug = config("[cache]\nmemory_bytes = \"64MiB\"\ndebug_headers = true");
        assert!(debug.cache.debug_headers);
        assert!(restart_needed(&base, &debug).is_empty());
        let larger = config("[cache]\nmemory_bytes = \"128MiB\"\ndebug_headers = true");
        assert_eq!(restart_needed(&base, &larger), ["cache"]);
    }
}
