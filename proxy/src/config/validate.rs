//! Validation: from the parsed TOML table to a [`GatewayConfig`], collecting every error.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mirror_plugins::settings::{self, join_key, render, SettingError};
use mirror_plugins::{build_plugin, BuildContext, Plugin};
use serde::de::DeserializeOwned;
use toml::{Table, Value};

use super::schema::{
    AdminSection, ByteSize, CacheSection, DomainSection, LogSection, OriginSection, RouteSection,
    ServerSection,
};
use super::{
    AccessLogFormat, AccessLogTarget, AdminSettings, CacheSettings, ConfigError, DiskCacheSettings,
    Domain, ExportTreeOrigin, GatewayConfig, HttpOrigin, LogSettings, Origin, OriginKind, Route,
    ServerSettings, StaleWindows,
};
use crate::client_ip::{Cidr, TrustedProxies};
use crate::host::{HostError, HostMatcher};
use crate::origin::export_tree::validate_export_id;
use mirror_plugins::config_file::Sources;

mod tls;

/// Collects errors and attributes each to the file or to the variable that set its key.
struct Errors<'a> {
    file: String,
    sources: &'a Sources,
    list: Vec<ConfigError>,
}

impl Errors<'_> {
    fn push(&mut self, key: &str, value: Option<String>, reason: impl Into<String>) {
        let source = self.sources.source_of(key, &self.file);
        let reason = one_line(&reason.into());
        self.list.push(ConfigError::new(source, key, value, reason));
    }

    fn extend(&mut self, parent: &str, errors: Vec<SettingError>) {
        for e in errors {
            let e = e.within(parent);
            let reason = match documented_range(&e.key) {
                Some(range) => settings::with_range(&e.reason, range),
                None => e.reason,
            };
            self.push(&e.key, e.value, reason);
        }
    }

    /// Parses `value` (or the type's default when absent) and records its errors under `key`.
    fn section<T: DeserializeOwned + Default>(&mut self, value: Option<Value>, key: &str) -> T {
        match value {
            None => T::default(),
            Some(value) => self.parse(value, key).unwrap_or_default(),
        }
    }

    fn parse<T: DeserializeOwned>(&mut self, value: Value, key: &str) -> Option<T> {
        match settings::parse::<T>(value) {
            Ok(parsed) => Some(parsed),
            Err(errors) => {
                self.extend(key, errors);
                None
            }
        }
    }
}

/// The largest `server.*_secs` wait accepted.
const MAX_SERVER_WAIT_SECS: u64 = 86_400;
/// The largest `cache.disk_sweep_interval_secs` accepted: one day. A longer interval is most
/// likely a typing error, and it would leave dead entries on disk for days.
const MAX_DISK_SWEEP_INTERVAL_SECS: u64 = 86_400;

/// Returns the range that docs/configuration.md gives for a whole-number key of the gateway's
/// own sections or of the budget plugins, so that a type error states it in place of the
/// type's limits.
fn documented_range(key: &str) -> Option<&'static str> {
    let name = key.rsplit('.').next().unwrap_or(key);
    if key.contains(".plugins[") {
        // Keys of the budget and ttl plugins whose 0 is rejected after parsing.
        return match name {
            "burst" | "max_concurrent_per_ip" => Some("from 1 to 4294967295"),
            "timeout_ms" => Some("from 1 to 10000"),
            "index_per_hour"
            | "download_per_hour"
            | "domain_index_per_hour"
            | "domain_download_per_hour"
            | "ttl_secs" => Some("of at least 1"),
            _ => None,
        };
    }
    match name {
        "threads" if key == "server.threads" => Some("from 1 to 512"),
        "proxy_protocol_timeout_ms" => Some("from 1 to 60000"),
        "disk_sweep_interval_secs" => Some("from 1 to 86400"),
        "lock_wait_timeout_secs"
        | "lock_age_timeout_secs"
        | "max_origin_requests"
        | "connect_timeout_ms"
        | "read_timeout_ms"
        | "write_timeout_ms" => Some("of at least 1"),
        _ => None,
    }
}

/// Validates the whole configuration; `path` is the config file's path.
pub(super) fn validate(
    mut root: Table,
    path: &Path,
    sources: &Sources,
) -> Result<GatewayConfig, Vec<ConfigError>> {
    let mut errors = Errors {
        file: path.display().to_string(),
        sources,
        list: Vec::new(),
    };
    let config_dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let tls_keys = tls::take_keys(&mut root);
    let mut warnings = Errors {
        file: errors.file.clone(),
        sources,
        list: Vec::new(),
    };

    let server: ServerSection = errors.section(root.remove("server"), "server");
    let log: LogSection = errors.section(root.remove("log"), "log");
    let cache: CacheSection = errors.section(root.remove("cache"), "cache");
    let admin: AdminSection = errors.section(root.remove("admin"), "admin");
    let domains_value = root.remove("domains");
    // `[sync]` belongs to the sync task, which validates it from the same document (see
    // `config::load_str`).
    root.remove("sync");
    for (key, value) in &root {
        errors.push(
            key,
            Some(render(value)),
            "unknown top-level key; the sections are server, log, cache, admin, domains and sync",
        );
    }

    let server = validate_server(server, &config_dir, &mut errors, &mut warnings);
    let log = validate_log(log, &config_dir, &mut errors);
    warn_disk_keys_without_dir(&cache, &mut warnings);
    let cache = validate_cache(cache, &config_dir, &mut errors);
    let admin = validate_admin(admin, &config_dir, &mut errors);
    let domains = validate_domains(domains_value, &config_dir, &mut errors);
    let plain_listen = server.as_ref().map_or(&[][..], |s| s.listen.as_slice());
    let tls = tls::TlsCheck {
        dir: &config_dir,
        now: std::time::SystemTime::now(),
        errors: &mut errors,
        warnings: &mut warnings,
    }
    .run(tls_keys, &domains, plain_listen);
    if let Some(admin) = &admin {
        check_admin_port(admin.listen, plain_listen, &tls.listen, &mut errors);
    }
    if let Some(cache) = &cache {
        warn_short_lock_waits(cache.lock_wait_timeout, &domains, &mut warnings);
        warn_lock_age_within_wait(cache, &domains, &mut warnings);
    }
    warn_look_alike_ids(&domains, &mut warnings);

    match (server, log, cache) {
        (Some(server), Some(log), Some(cache)) if errors.list.is_empty() => Ok(GatewayConfig {
            path: path.to_path_buf(),
            server,
            log,
            cache,
            admin,
            domains,
            tls,
            sync: None,
            warnings: warnings.list,
        }),
        _ => Err(errors.list),
    }
}

fn validate_server(
    s: ServerSection,
    dir: &Path,
    errors: &mut Errors<'_>,
    warnings: &mut Errors<'_>,
) -> Option<ServerSettings> {
    let before = errors.list.len();
    if s.listen.is_empty() {
        errors.push(
            "server.listen",
            Some("[]".into()),
            "list at least one address such as \"127.0.0.1:8080\"",
        );
    }
    let mut listen = Vec::new();
    for (i, text) in s.listen.iter().enumerate() {
        match text.parse::<SocketAddr>() {
            Ok(addr) if listen.contains(&addr) => errors.push(
                &format!("server.listen[{i}]"),
                Some(format!("{text:?}")),
                "listed twice; the second bind would fail, so remove one",
            ),
            Ok(addr) => listen.push(addr),
            Err(_) => errors.push(
                &format!("server.listen[{i}]"),
                Some(format!("{text:?}")),
                "not an IP address with a port; write e.g. \"0.0.0.0:8080\" or \"[::1]:8080\"",
            ),
        }
    }
    if !(1..=512).contains(&s.threads) {
        errors.push(
            "server.threads",
            Some(s.threads.to_string()),
            "must be between 1 and 512",
        );
    }
    if s.upstream_keepalive_pool_size > MAX_UPSTREAM_POOL_SIZE {
        errors.push(
            "server.upstream_keepalive_pool_size",
            Some(s.upstream_keepalive_pool_size.to_string()),
            format!(
                "must be at most {MAX_UPSTREAM_POOL_SIZE}; it is a count of idle connections \
                 per worker thread, and the pool reserves memory for each at start"
            ),
        );
    }
    if s.send_timeout_secs == 0 {
        errors.push(
            "server.send_timeout_secs",
            Some("0".into()),
            "must be at least 1 second; leave the key out for the default of 60",
        );
    }
    // A day is far beyond any useful wait; larger values are most likely typing errors.
    for (key, secs) in [
        ("server.send_timeout_secs", s.send_timeout_secs),
        ("server.keepalive_timeout_secs", s.keepalive_timeout_secs),
        ("server.grace_period_secs", s.grace_period_secs),
        ("server.shutdown_timeout_secs", s.shutdown_timeout_secs),
    ] {
        if secs > MAX_SERVER_WAIT_SECS {
            errors.push(
                key,
                Some(secs.to_string()),
                format!("must be at most {MAX_SERVER_WAIT_SECS} seconds (one day)"),
            );
        }
    }
    let trusted_proxies = validate_trusted_proxies(&s.trusted_proxies, errors, warnings);
    validate_proxy_protocol(&s, errors);
    let runtime_dir = s.runtime_dir.map(|d| (resolve(dir, &d), d));
    if let Some((path, text)) = &runtime_dir {
        if !path.is_dir() {
            errors.push(
                "server.runtime_dir",
                Some(format!("{text:?}")),
                format!(
                    "{} is not a directory; create it, or remove the key to use \
                     $XDG_RUNTIME_DIR or the temp directory",
                    path.display()
                ),
            );
        }
    }
    (errors.list.len() == before).then(|| ServerSettings {
        listen,
        threads: s.threads,
        runtime_dir: runtime_dir.map(|(path, _)| path),
        grace_period: Duration::from_secs(s.grace_period_secs),
        shutdown_timeout: Duration::from_secs(s.shutdown_timeout_secs),
        upstream_keepalive_pool_size: s.upstream_keepalive_pool_size,
        trusted_proxies,
        pid_file: pid_file(dir, s.pid_file.as_deref(), warnings),
        send_timeout: Duration::from_secs(s.send_timeout_secs),
        keepalive_timeout: Duration::from_secs(s.keepalive_timeout_secs),
        reload_on_change: s.reload_on_change,
        tcp_nopush: s.tcp_nopush,
        pipelining: s.pipelining,
        proxy_protocol: s.proxy_protocol,
        proxy_protocol_timeout: Duration::from_millis(s.proxy_protocol_timeout_ms),
    })
}

/// Resolves `server.pid_file`. A configured path whose directory is missing is only a warning:
/// `run` starts without writing the file, and a service manager may create the directory just
/// before the start (systemd's `RuntimeDirectory=`), after a `check` by hand.
fn pid_file(dir: &Path, configured: Option<&str>, warnings: &mut Errors<'_>) -> PathBuf {
    let Some(configured) = configured else {
        return super::default_pid_file();
    };
    let path = resolve(dir, configured);
    if let Some(parent) = path.parent().filter(|p| !p.is_dir()) {
        warnings.push(
            "server.pid_file",
            Some(format!("{configured:?}")),
            format!(
                "its directory {} does not exist, so `run` cannot write the pid file and \
                 `mirror-gateway reload` and logrotate will not find the process; create the \
                 directory or choose another path",
                parent.display()
            ),
        );
    }
    path
}

/// The largest `server.upstream_keepalive_pool_size` accepted. Pingora sizes the pool's tables
/// for it when the gateway starts: 10 million took 120 MB before the first request, and 100
/// billion used memory without bound. Far more idle origin connections than any origin accepts.
const MAX_UPSTREAM_POOL_SIZE: usize = 100_000;

/// The largest `server.proxy_protocol_timeout_ms` accepted. A proxy sends its header as soon as
/// it connects or with the first bytes of the client, so a longer wait only keeps connections
/// open for clients that send nothing.
const MAX_PROXY_PROTOCOL_TIMEOUT_MS: u64 = 60_000;

/// Checks `server.proxy_protocol` and its timeout.
fn validate_proxy_protocol(s: &ServerSection, errors: &mut Errors<'_>) {
    let timeout = s.proxy_protocol_timeout_ms;
    if !(1..=MAX_PROXY_PROTOCOL_TIMEOUT_MS).contains(&timeout) {
        errors.push(
            "server.proxy_protocol_timeout_ms",
            Some(timeout.to_string()),
            format!(
                "must be between 1 and {MAX_PROXY_PROTOCOL_TIMEOUT_MS} milliseconds; leave the \
                 key out for the default of 5000"
            ),
        );
    }
    if s.proxy_protocol && s.trusted_proxies.is_empty() {
        errors.push(
            "server.proxy_protocol",
            Some("true".into()),
            "the gateway uses PROXY headers only from peers in server.trusted_proxies, which is \
             empty; list the networks of the proxies that send the header there",
        );
    }
}

/// Parses each `server.trusted_proxies` entry as a network, reporting every invalid one and
/// warning about each network of prefix length 0, which trusts every peer.
fn validate_trusted_proxies(
    entries: &[String],
    errors: &mut Errors<'_>,
    warnings: &mut Errors<'_>,
) -> TrustedProxies {
    let mut ranges = Vec::new();
    for (i, text) in entries.iter().enumerate() {
        match text.trim().parse::<Cidr>() {
            Ok(range) => {
                if range.prefix_len() == 0 {
                    warnings.push(
                        &format!("server.trusted_proxies[{i}]"),
                        Some(format!("{text:?}")),
                        "trusts every peer, so every client can choose its own address for \
                         quota and rate limits with X-Forwarded-For; list only the networks \
                         of your proxies",
                    );
                }
                ranges.push(range);
            }
            Err(e) => errors.push(
                &format!("server.trusted_proxies[{i}]"),
                Some(format!("{text:?}")),
                e.to_string(),
            ),
        }
    }
    TrustedProxies::new(ranges)
}

/// Warns about domain ids that differ only in case or in `-` against `_`. An environment
/// override names a domain by its id in upper case with `_` for `-`, so it reaches only one
/// of them.
fn warn_look_alike_ids(domains: &[Domain], warnings: &mut Errors<'_>) {
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    for domain in domains {
        let segment = domain.id.to_ascii_uppercase().replace('-', "_");
        match seen.get(&segment) {
            Some(first) => warnings.push(
                &format!("domains.{}", domain.id),
                None,
                format!(
                    "looks like domain {first:?} to environment overrides: both are \
                     MIRROR_GATEWAY__DOMAINS__{segment}__..., which reaches only one; \
                     give the domains ids that differ in more than case, '-' and '_'"
                ),
            ),
            None => {
                seen.insert(segment, &domain.id);
            }
        }
    }
}

/// Warns about each domain whose lock wait (`cache_wait`, or its own) is no longer than the
/// connect plus read timeout of one of its HTTP origins. Requests waiting on another request's
/// origin request then get 504 before that request has failed, also where stale-if-error would
/// serve them the stored entry.
fn warn_short_lock_waits(cache_wait: Duration, domains: &[Domain], warnings: &mut Errors<'_>) {
    for domain in domains {
        let wait = domain.lock_wait_timeout.unwrap_or(cache_wait);
        for origin in &domain.origins {
            let OriginKind::Http(http) = &origin.kind else {
                continue;
            };
            let origin_time = http.connect_timeout + http.read_timeout;
            if wait > origin_time {
                continue;
            }
            let key = match domain.lock_wait_timeout {
                Some(_) => format!("domains.{}.lock_wait_timeout_secs", domain.id),
                None => "cache.lock_wait_timeout_secs".to_owned(),
            };
            warnings.push(
                &key,
                Some(wait.as_secs().to_string()),
                format!(
                    "is not longer than the {} ms (connect_timeout_ms + read_timeout_ms) that \
                     origin {:?} of domain {:?} may take to fail, so requests waiting on \
                     another request's origin request get 504 before it fails, even where a \
                     stale entry could be served; set it above {} s",
                    origin_time.as_millis(),
                    origin.name,
                    domain.id,
                    origin_time.as_secs_f64().ceil() as u64
                ),
            );
        }
    }
}

/// Warns when a lock wait (the cache's, or a domain's own) is not shorter than
/// `cache.lock_age_timeout_secs`. Waiters then still wait when the fill is presumed stuck, and
/// one of them starts a second origin request for the same object.
fn warn_lock_age_within_wait(cache: &CacheSettings, domains: &[Domain], warnings: &mut Errors<'_>) {
    let age = cache.lock_age_timeout;
    let waits = std::iter::once((
        "cache.lock_wait_timeout_secs".to_owned(),
        cache.lock_wait_timeout,
    ))
    .chain(domains.iter().filter_map(|domain| {
        let key = format!("domains.{}.lock_wait_timeout_secs", domain.id);
        domain.lock_wait_timeout.map(|wait| (key, wait))
    }));
    for (key, wait) in waits {
        if wait >= age {
            warnings.push(
                &key,
                Some(wait.as_secs().to_string()),
                format!(
                    "is not shorter than cache.lock_age_timeout_secs ({} s), so a fill that runs \
                     that long is presumed stuck while requests still wait on it, and a second \
                     origin request starts; raise cache.lock_age_timeout_secs above it",
                    age.as_secs()
                ),
            );
        }
    }
}

/// Reports an admin address that `server.listen` or `server.tls_listen` has too: the second
/// bind would fail at start. Port 0 picks a different free port for each, so it never clashes.
fn check_admin_port(
    admin: SocketAddr,
    plain: &[SocketAddr],
    tls: &[SocketAddr],
    errors: &mut Errors<'_>,
) {
    if admin.port() == 0 {
        return;
    }
    let clash = |addresses: &[SocketAddr]| {
        addresses
            .iter()
            .find(|other| listeners_overlap(admin, **other))
            .copied()
    };
    let (key, other) = match (clash(plain), clash(tls)) {
        (Some(other), _) => ("server.listen", other),
        (None, Some(other)) => ("server.tls_listen", other),
        (None, None) => return,
    };
    let reason = if other == admin {
        format!("{key} has this address too")
    } else {
        format!("{key} has \"{other}\", which takes this address too")
    };
    errors.push(
        "admin.listen",
        Some(format!("\"{admin}\"")),
        format!("{reason}; the admin listener needs a port of its own, so change one of them"),
    );
}

/// Returns whether listening on `a` and on `b` would take the same port of one address: the
/// ports are equal and the addresses are equal, or one is a wildcard that covers the other.
/// `[::]` covers IPv4 addresses too, because Linux listens on both families there unless
/// `net.ipv6.bindv6only` is set, and the gateway leaves that setting alone.
fn listeners_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |wide: IpAddr, other: IpAddr| match (wide, other) {
        (IpAddr::V4(wide), IpAddr::V4(_)) => wide.is_unspecified(),
        (IpAddr::V6(wide), _) => wide.is_unspecified(),
        (IpAddr::V4(_), IpAddr::V6(_)) => false,
    };
    a.port() == b.port() && (a.ip() == b.ip() || covers(a.ip(), b.ip()) || covers(b.ip(), a.ip()))
}

/// Validates `[admin]`: off without `listen`; with it, an htpasswd file is required, because
/// the admin API must never be open.
fn validate_admin(s: AdminSection, dir: &Path, errors: &mut Errors<'_>) -> Option<AdminSettings> {
    let text = s.listen?;
    let listen = match text.parse::<SocketAddr>() {
        Ok(addr) => Some(addr),
        Err(_) => {
            errors.push(
                "admin.listen",
                Some(format!("{text:?}")),
                "not an IP address with a port; write e.g. \"127.0.0.1:9090\"",
            );
            None
        }
    };
    let Some(file) = s.htpasswd else {
        errors.push(
            "admin.htpasswd",
            None,
            "missing; the admin listener needs its own htpasswd file (make one with htpasswd -B)",
        );
        return None;
    };
    let mut settings = toml::Table::new();
    settings.insert("file".into(), Value::String(file));
    settings.insert("realm".into(), Value::String("mirror-gateway admin".into()));
    let ctx = BuildContext {
        domain: "admin",
        config_dir: dir,
    };
    let users = match mirror_plugins::htpasswd::Htpasswd::new(Value::Table(settings), &ctx) {
        Ok(users) => Some(std::sync::Arc::new(users)),
        Err(list) => {
            for e in list {
                let key = if e.key == "file" {
                    "htpasswd".to_string()
                } else {
                    e.key
                };
                errors.push(&join_key("admin", &key), e.value, e.reason);
            }
            None
        }
    };
    Some(AdminSettings {
        listen: listen?,
        users: users?,
    })
}

fn validate_log(s: LogSection, dir: &Path, errors: &mut Errors<'_>) -> Option<LogSettings> {
    let before = errors.list.len();
    let access_log = match s.access_log.as_str() {
        "stdout" | "-" => AccessLogTarget::Stdout,
        "off" => AccessLogTarget::Off,
        "" => {
            errors.push(
                "log.access_log",
                Some("\"\"".into()),
                "write \"stdout\", \"off\" or a file path",
            );
            AccessLogTarget::Off
        }
        other => {
            let path = resolve(dir, other);
            if let Err(reason) = check_log_file(&path) {
                errors.push("log.access_log", Some(format!("{other:?}")), reason);
            }
            AccessLogTarget::File(path)
        }
    };
    if let Err(reason) = check_level(&s.level) {
        errors.push("log.level", Some(format!("{:?}", s.level)), reason);
    }
    let access_log_format = match s.access_log_format.as_str() {
        "combined" => AccessLogFormat::Combined,
        "json" => AccessLogFormat::Json,
        other => {
            errors.push(
                "log.access_log_format",
                Some(format!("{other:?}")),
                "write \"combined\" (nginx's format plus four fields) or \"json\" (one JSON object a line)",
            );
            AccessLogFormat::Combined
        }
    };
    (errors.list.len() == before).then_some(LogSettings {
        access_log,
        access_log_format,
        level: s.level,
    })
}

/// Checks that the access log can be created at `path` without creating it.
fn check_log_file(path: &Path) -> Result<(), String> {
    if path.is_dir() {
        return Err(format!(
            "{} is a directory; name a file in it, e.g. access.log",
            path.display()
        ));
    }
    match path.parent() {
        Some(parent) if !parent.is_dir() => Err(format!(
            "directory {} does not exist; create it, or write \"stdout\" or \"off\"",
            parent.display()
        )),
        _ => Ok(()),
    }
}

/// Checks that the disk tier's directory exists, or that its parent does, so that the gateway
/// creates at most the last component: a misspelt path must not grow a new tree of
/// directories on another filesystem. An existing directory must also be one the disk tier
/// opens: a cache of this format, or empty.
fn check_disk_dir(path: &Path) -> Result<(), String> {
    if path.is_dir() {
        crate::cache::disk::check_format_read_only(path).map_err(|e| e.to_string())?;
        return check_writable(path);
    }
    if path.exists() {
        return Err(format!(
            "{} exists and is not a directory; name a directory, or remove the key to keep the \
             cache in memory only",
            path.display()
        ));
    }
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) if !parent.is_dir() => Err(format!(
            "directory {} does not exist; create it (the gateway creates only {} itself), or \
             correct the path",
            parent.display(),
            path.display()
        )),
        Some(parent) => check_writable(parent),
        None => check_writable(Path::new(".")),
    }
}

/// Checks that this process can create files in `dir`, by creating and removing an empty one.
/// The mode bits alone do not show it: a read-only mount or an immutable directory rejects new
/// files from root too.
fn check_writable(dir: &Path) -> Result<(), String> {
    let probe = dir.join(format!(
        "{}{}",
        crate::cache::disk::WRITE_PROBE_PREFIX,
        std::process::id()
    ));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!(
            "cannot create files in {} ({e}); give the gateway's user write access there, or \
             name another directory",
            dir.display()
        )),
    }
}

/// Checks a `tracing` filter such as `info` or `mirror_proxy=debug,info`.
///
/// `EnvFilter` reads a bare word that is not a level as a target name. A misspelt level such as
/// `inof` would then silence every other target, so such words are rejected here.
fn check_level(level: &str) -> Result<(), String> {
    let example = "write e.g. \"info\" or \"mirror_proxy=debug,info\"";
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(level) {
        return Err(format!("not a log filter ({e}); {example}"));
    }
    let bare = level
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty() && !d.contains(['=', '[']))
        .find(|d| d.parse::<tracing::level_filters::LevelFilter>().is_err());
    match bare {
        Some(word) => Err(format!(
            "{word:?} is not a level (trace, debug, info, warn, error, off); \
             name a module as module=level; {example}"
        )),
        None => Ok(()),
    }
}

/// Largest response kept in memory when `max_object_bytes` is not set and `memory_bytes` is
/// larger.
const DEFAULT_MAX_OBJECT_BYTES: u64 = 64 << 20;
/// Largest response kept on disk when `disk_max_object_bytes` is not set and `disk_bytes` is
/// larger.
const DEFAULT_DISK_MAX_OBJECT_BYTES: u64 = 4 << 30;
/// Size budget of the disk tier when `disk_bytes` is not set.
const DEFAULT_DISK_BYTES: u64 = 20 << 30;

/// Warns about disk tier settings in a config without `cache.disk_dir`, where they do nothing.
fn warn_disk_keys_without_dir(s: &CacheSection, warnings: &mut Errors<'_>) {
    if s.disk_dir.is_some() {
        return;
    }
    let set = [
        ("cache.disk_bytes", s.disk_bytes),
        ("cache.disk_max_object_bytes", s.disk_max_object_bytes),
    ];
    for (key, value) in set {
        if let Some(value) = value {
            warnings.push(
                key,
                Some(value.shown()),
                "has no effect without cache.disk_dir; set disk_dir to turn the disk tier on, \
                 or remove the key",
            );
        }
    }
}

fn validate_cache(s: CacheSection, dir: &Path, errors: &mut Errors<'_>) -> Option<CacheSettings> {
    let before = errors.list.len();
    if s.memory_bytes.0 < 1 << 20 {
        errors.push(
            "cache.memory_bytes",
            Some(s.memory_bytes.shown()),
            "must be at least 1 MiB",
        );
    }
    let max_object_bytes = s
        .max_object_bytes
        .map_or(s.memory_bytes.0.min(DEFAULT_MAX_OBJECT_BYTES), |b| b.0);
    if max_object_bytes == 0 || max_object_bytes > s.memory_bytes.0 {
        errors.push(
            "cache.max_object_bytes",
            Some(ByteSize(max_object_bytes).shown()),
            "must be between 1 and cache.memory_bytes; larger objects could never be stored",
        );
    }
    for (key, secs) in [
        ("cache.lock_wait_timeout_secs", s.lock_wait_timeout_secs),
        ("cache.lock_age_timeout_secs", s.lock_age_timeout_secs),
    ] {
        if secs == 0 {
            errors.push(key, Some("0".into()), "must be at least 1 second");
        }
    }
    check_disk_sweep_interval(s.disk_sweep_interval_secs, errors);
    let disk_budget = s.disk_bytes.map_or(DEFAULT_DISK_BYTES, |b| b.0);
    let disk = s.disk_dir.as_ref().map(|d| DiskCacheSettings {
        dir: resolve(dir, d),
        budget_bytes: disk_budget,
        max_object_bytes: s
            .disk_max_object_bytes
            .map_or(disk_budget.min(DEFAULT_DISK_MAX_OBJECT_BYTES), |b| b.0),
        sweep_interval: Duration::from_secs(s.disk_sweep_interval_secs),
    });
    if let (Some(disk), Some(text)) = (&disk, &s.disk_dir) {
        if text.trim().is_empty() {
            errors.push(
                "cache.disk_dir",
                Some(format!("{text:?}")),
                "is empty; name the cache directory, or remove the key to keep the cache in \
                 memory only",
            );
        } else if let Err(reason) = check_disk_dir(&disk.dir) {
            errors.push("cache.disk_dir", Some(format!("{text:?}")), reason);
        }
        if disk.budget_bytes < 1 << 20 {
            errors.push(
                "cache.disk_bytes",
                Some(ByteSize(disk.budget_bytes).shown()),
                "must be at least 1 MiB (1048576 bytes)",
            );
        }
        if disk.max_object_bytes == 0 || disk.max_object_bytes > disk.budget_bytes {
            errors.push(
                "cache.disk_max_object_bytes",
                Some(ByteSize(disk.max_object_bytes).shown()),
                "must be between 1 and cache.disk_bytes; larger objects could never be stored",
            );
        }
    }
    (errors.list.len() == before).then(|| CacheSettings {
        memory_bytes: usize::try_from(s.memory_bytes.0).unwrap_or(usize::MAX),
        max_object_bytes: usize::try_from(max_object_bytes).unwrap_or(usize::MAX),
        lock_wait_timeout: Duration::from_secs(s.lock_wait_timeout_secs),
        lock_age_timeout: Duration::from_secs(s.lock_age_timeout_secs),
        debug_headers: s.debug_headers,
        disk,
    })
}

/// Checks `cache.disk_sweep_interval_secs`. It is checked without `disk_dir` too, so that a bad
/// value is found before the disk tier is turned on.
fn check_disk_sweep_interval(secs: u64, errors: &mut Errors<'_>) {
    let key = "cache.disk_sweep_interval_secs";
    if secs == 0 {
        errors.push(
            key,
            Some("0".into()),
            "must be at least 1 second; leave the key out for the default of 600",
        );
    } else if secs > MAX_DISK_SWEEP_INTERVAL_SECS {
        errors.push(
            key,
            Some(secs.to_string()),
            format!("must be at most {MAX_DISK_SWEEP_INTERVAL_SECS} seconds (one day)"),
        );
    }
}

fn validate_domains(value: Option<Value>, dir: &Path, errors: &mut Errors<'_>) -> Vec<Domain> {
    let tables: BTreeMap<String, Value> = match value {
        None => BTreeMap::new(),
        Some(value) => match errors.parse(value, "domains") {
            Some(tables) => tables,
            None => return Vec::new(),
        },
    };
    if tables.is_empty() {
        errors.push(
            "domains",
            None,
            "define at least one domain, e.g. [domains.primary]",
        );
    }
    check_state_files(&tables, dir, errors);
    let mut hosts = HostClaims::default();
    let mut domains = Vec::new();
    for (id, table) in tables {
        if let Some(domain) = validate_domain(&id, table, dir, &mut hosts, errors) {
            domains.push(domain);
        }
    }
    domains
}

fn validate_domain(
    id: &str,
    table: Value,
    dir: &Path,
    hosts: &mut HostClaims,
    errors: &mut Errors<'_>,
) -> Option<Domain> {
    let key = format!("domains.{id}");
    let before = errors.list.len();
    if !is_name(id) {
        errors.push(
            &key,
            None,
            "a domain id uses 1 to 64 of a-z, 0-9, `-` and `_`; rename the table",
        );
    }
    let section: DomainSection = errors.parse(table, &key)?;
    if section.max_origin_requests == 0 {
        errors.push(
            &format!("{key}.max_origin_requests"),
            Some("0".into()),
            "must be at least 1",
        );
    }
    if section.lock_wait_timeout_secs == Some(0) {
        errors.push(
            &format!("{key}.lock_wait_timeout_secs"),
            Some("0".into()),
            "must be at least 1 second",
        );
    }

    if section.hosts.is_empty() {
        errors.push(
            &format!("{key}.hosts"),
            Some("[]".into()),
            "list at least one host name",
        );
    }
    hosts.claim(&key, id, &section.hosts, errors);

    let declared: Vec<String> = section.origins.keys().cloned().collect();
    let origins = validate_origins(section.origins, &key, dir, errors);
    let routes = validate_routes(section.routes, &origins, &declared, &key, errors);
    let ctx = BuildContext {
        domain: id,
        config_dir: dir,
    };
    let plugins = validate_plugins(section.plugins, &key, &ctx, errors);

    (errors.list.len() == before).then(|| Domain {
        id: id.to_string(),
        hosts: section.hosts,
        routes,
        origins,
        plugins,
        stale: StaleWindows {
            while_revalidate: Duration::from_secs(section.stale_while_revalidate_secs.into()),
            if_error: Duration::from_secs(section.stale_if_error_secs.into()),
        },
        lock_wait_timeout: section.lock_wait_timeout_secs.map(Duration::from_secs),
        max_origin_requests: section.max_origin_requests,
    })
}

/// Host patterns accepted so far, each with the index of its domain in `owners`.
#[derive(Default)]
struct HostClaims {
    patterns: Vec<(String, usize)>,
    owners: Vec<String>,
}

impl HostClaims {
    /// Checks a domain's host patterns: each must be valid and listed by no other domain.
    ///
    /// Every pattern is checked against all accepted ones, which is quadratic in the number of
    /// hosts; configs list a few per domain.
    fn claim(&mut self, domain_key: &str, id: &str, hosts: &[String], errors: &mut Errors<'_>) {
        let owner = self.owners.len();
        self.owners.push(id.to_string());
        for (i, pattern) in hosts.iter().enumerate() {
            let candidate = (pattern.clone(), owner);
            let all = self.patterns.iter().cloned().chain([candidate.clone()]);
            let reason = match HostMatcher::new(all) {
                Ok(_) => {
                    self.patterns.push(candidate);
                    continue;
                }
                Err(HostError::Invalid { reason, .. }) => format!(
                    "{reason}; write a name such as \"mirror.example.org\", a wildcard such as \
                     \"*.example.org\" or an IP address"
                ),
                Err(HostError::Duplicate { first, .. }) => format!(
                    "domain `{}` lists this host too; list each host in one domain only",
                    self.owners[first]
                ),
            };
            errors.push(
                &format!("{domain_key}.hosts[{i}]"),
                Some(format!("{pattern:?}")),
                reason,
            );
        }
    }
}

/// Plugins that may appear once per domain: a second copy would count every request twice
/// against the same budgets.
const ONCE_PER_DOMAIN: &[&str] = &["quota", "rate_limit"];

fn validate_plugins(
    entries: Vec<Value>,
    domain_key: &str,
    ctx: &BuildContext<'_>,
    errors: &mut Errors<'_>,
) -> Vec<Arc<dyn Plugin>> {
    let mut plugins = Vec::new();
    let mut first_of: BTreeMap<String, usize> = BTreeMap::new();
    for (i, entry) in entries.into_iter().enumerate() {
        let entry_key = format!("{domain_key}.plugins[{i}]");
        match plugin_name(entry) {
            Ok((name, settings)) => {
                if ONCE_PER_DOMAIN.contains(&name.as_str()) {
                    if let Some(first) = first_of.get(&name) {
                        errors.push(
                            &join_key(&entry_key, "name"),
                            Some(render(&Value::String(name.clone()))),
                            format!(
                                "listed twice in this domain (first as plugins[{first}]), so every \
                                 request would be counted twice; merge the two entries into one"
                            ),
                        );
                        continue;
                    }
                    first_of.insert(name.clone(), i);
                }
                match build_plugin(&name, settings, ctx) {
                    Ok(plugin) => plugins.push(plugin),
                    Err(list) => errors.extend(&entry_key, list),
                }
            }
            Err(e) => errors.extend(&entry_key, vec![e]),
        }
    }
    plugins
}

/// Reports a `quota` state file that two domains name: each domain rewrites the whole file, so
/// one of them would lose its counts at every restart.
fn check_state_files(tables: &BTreeMap<String, Value>, dir: &Path, errors: &mut Errors<'_>) {
    let mut owners: BTreeMap<PathBuf, String> = BTreeMap::new();
    for (id, table) in tables {
        let Some(entries) = table.get("plugins").and_then(Value::as_array) else {
            continue;
        };
        for (i, entry) in entries.iter().enumerate() {
            let is_quota = entry.get("name").and_then(Value::as_str) == Some("quota");
            let Some(path) = entry.get("state_file").and_then(Value::as_str) else {
                continue;
            };
            if !is_quota {
                continue;
            }
            let resolved = file_identity(&resolve(dir, path));
            match owners.get(&resolved) {
                Some(owner) if owner != id => errors.push(
                    &format!("domains.{id}.plugins[{i}].state_file"),
                    Some(render(&Value::String(path.to_owned()))),
                    format!(
                        "is also the state file of domain {owner}; give each domain its own file"
                    ),
                ),
                _ => {
                    owners.insert(resolved, id.clone());
                }
            }
        }
    }
}

/// Returns one spelling for the file that `path` names, so that `./quota.state`,
/// `tree/../quota.state` and a path through a link to the directory compare equal. The file
/// itself, or else its directory, is resolved by the filesystem; when neither exists, only `.`
/// segments are dropped.
fn file_identity(path: &Path) -> PathBuf {
    if let Ok(real) = std::fs::canonicalize(path) {
        return real;
    }
    let real_dir = match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) if !dir.as_os_str().is_empty() => {
            std::fs::canonicalize(dir).ok().map(|dir| dir.join(name))
        }
        _ => None,
    };
    real_dir.unwrap_or_else(|| path.components().collect())
}

/// Splits a plugin entry into its name and the rest of its table, the plugin's settings.
fn plugin_name(entry: Value) -> Result<(String, Value), SettingError> {
    let Value::Table(mut table) = entry else {
        return Err(SettingError::new(
            "",
            Some(render(&entry)),
            "a plugin entry is a table with a `name`",
        ));
    };
    match table.remove("name") {
        Some(Value::String(name)) => Ok((name, Value::Table(table))),
        Some(other) => Err(SettingError::new(
            "name",
            Some(render(&other)),
            "must be a string",
        )),
        None => Err(SettingError::new(
            "name",
            None,
            "missing; name the plugin, e.g. name = \"htpasswd\"",
        )),
    }
}

fn validate_origins(
    tables: BTreeMap<String, Value>,
    domain_key: &str,
    dir: &Path,
    errors: &mut Errors<'_>,
) -> Vec<Origin> {
    let mut origins = Vec::new();
    for (name, table) in tables {
        let key = format!("{domain_key}.origins.{name}");
        if !is_name(&name) {
            errors.push(
                &key,
                None,
                "an origin name uses 1 to 64 of a-z, 0-9, `-` and `_`; rename the table",
            );
        }
        let table = drop_unknown_origin_keys(table, &key, errors);
        let Some(section) = errors.parse::<OriginSection>(table, &key) else {
            continue;
        };
        let kind = match section {
            OriginSection::Http {
                addresses,
                host,
                connect_timeout_ms,
                read_timeout_ms,
                write_timeout_ms,
                idle_timeout_secs,
            } => {
                let timeouts = [
                    ("connect_timeout_ms", connect_timeout_ms),
                    ("read_timeout_ms", read_timeout_ms),
                    ("write_timeout_ms", write_timeout_ms),
                ];
                let timeouts_ok = check_timeouts(&key, &timeouts, errors);
                let checked = validate_http_origin(&key, addresses, host, errors);
                checked.filter(|_| timeouts_ok).map(|(addresses, host)| {
                    OriginKind::Http(HttpOrigin {
                        addresses,
                        host,
                        connect_timeout: Duration::from_millis(connect_timeout_ms),
                        read_timeout: Duration::from_millis(read_timeout_ms),
                        write_timeout: Duration::from_millis(write_timeout_ms),
                        idle_timeout: Duration::from_secs(idle_timeout_secs),
                    })
                })
            }
            OriginSection::ExportTree {
                root,
                pinned_export,
            } => validate_export_tree(&key, dir, &root, pinned_export, errors)
                .map(OriginKind::ExportTree),
        };
        if let Some(kind) = kind {
            origins.push(Origin { name, kind });
        }
    }
    origins
}

/// Reports each key of the origin table `table` (at `key`) that its `kind` does not have, and
/// removes it, so that the table's other problems are reported in the same run. A table
/// without a known `kind` is left for the deserializer to report.
fn drop_unknown_origin_keys(mut table: Value, key: &str, errors: &mut Errors<'_>) -> Value {
    let Some(fields) = table.as_table_mut() else {
        return table;
    };
    let kind = fields.get("kind").and_then(Value::as_str);
    let Some(known) = kind.and_then(OriginSection::keys_of) else {
        return table;
    };
    let unknown: Vec<String> = fields
        .keys()
        .filter(|name| !known.contains(&name.as_str()))
        .cloned()
        .collect();
    for name in unknown {
        let value = fields.remove(&name).map(|v| render(&v));
        errors.push(
            &join_key(key, &name),
            value,
            "unknown key; remove it or check its spelling",
        );
    }
    table
}

/// Reports each timeout of zero milliseconds; returns whether all were at least 1.
fn check_timeouts(key: &str, timeouts: &[(&str, u64)], errors: &mut Errors<'_>) -> bool {
    let mut ok = true;
    for (name, ms) in timeouts {
        if *ms == 0 {
            errors.push(
                &join_key(key, name),
                Some("0".into()),
                "must be at least 1 millisecond; leave the key out for the default",
            );
            ok = false;
        }
    }
    ok
}

fn validate_http_origin(
    key: &str,
    addresses: Vec<String>,
    host: Option<String>,
    errors: &mut Errors<'_>,
) -> Option<(Vec<String>, String)> {
    let before = errors.list.len();
    if addresses.is_empty() {
        errors.push(
            &format!("{key}.addresses"),
            Some("[]".into()),
            "list at least one \"host:port\"",
        );
    }
    for (i, address) in addresses.iter().enumerate() {
        // Resolved here only to check it; the gateway resolves it again when it starts and
        // keeps the first address until it restarts.
        let problem = match address.to_socket_addrs().map(|mut a| a.next()) {
            Ok(Some(_)) => continue,
            Ok(None) => "the name resolves to no address".to_string(),
            Err(e) => e.to_string(),
        };
        errors.push(
            &format!("{key}.addresses[{i}]"),
            Some(format!("{address:?}")),
            format!("cannot resolve ({problem}); write \"host:port\" such as \"127.0.0.1:8081\""),
        );
    }
    let host = host.or_else(|| addresses.first().cloned());
    if let Some(host) = &host {
        if http::HeaderValue::from_str(host).is_err() || host.is_empty() {
            errors.push(
                &format!("{key}.host"),
                Some(format!("{host:?}")),
                "not a valid Host header value; write a name such as \"concelier.internal\"",
            );
        }
    }
    (errors.list.len() == before).then(|| (addresses, host.unwrap_or_default()))
}

fn validate_export_tree(
    key: &str,
    dir: &Path,
    root: &str,
    pinned_export: Option<String>,
    errors: &mut Errors<'_>,
) -> Option<ExportTreeOrigin> {
    let before = errors.list.len();
    let root_path = resolve(dir, root);
    let root_ok = root_path.is_dir();
    if !root_ok {
        let problem = if root_path.exists() {
            "is not a directory; point it at the export tree the sync job fills"
        } else {
            "does not exist; create it (`mkdir -p`, owned by the user that the sync runs as) \
             before the first sync, or point it at the export tree the sync job fills"
        };
        errors.push(
            &format!("{key}.root"),
            Some(format!("{root:?}")),
            format!("{} {problem}", root_path.display()),
        );
    }
    if let Some(pin) = &pinned_export {
        let problem = match validate_export_id(pin) {
            Err(reason) => Some(format!(
                "{reason}; an export id uses letters, digits, `.`, `_` and `-`, does not start \
                 with `.`, e.g. \"20260101T120000Z\""
            )),
            Ok(()) if root_ok && !root_path.join(pin).is_dir() => Some(format!(
                "{} is not a directory; pin an export that exists or remove the key",
                root_path.join(pin).display()
            )),
            Ok(()) => None,
        };
        if let Some(reason) = problem {
            errors.push(
                &format!("{key}.pinned_export"),
                Some(format!("{pin:?}")),
                reason,
            );
        }
    }
    (errors.list.len() == before).then_some(ExportTreeOrigin {
        root: root_path,
        pinned_export,
    })
}

fn validate_routes(
    entries: Vec<Value>,
    origins: &[Origin],
    declared: &[String],
    domain_key: &str,
    errors: &mut Errors<'_>,
) -> Vec<Route> {
    if entries.is_empty() {
        errors.push(
            &format!("{domain_key}.routes"),
            None,
            "add at least one route with a prefix and an origin",
        );
    }
    let mut routes = Vec::new();
    let mut seen = HashSet::new();
    for (i, entry) in entries.into_iter().enumerate() {
        let key = format!("{domain_key}.routes[{i}]");
        let Some(route) = errors.parse::<RouteSection>(entry, &key) else {
            continue;
        };
        if seen.contains(&route.prefix) {
            errors.push(
                &join_key(&key, "prefix"),
                Some(format!("{:?}", route.prefix)),
                "another route has the same prefix; merge them or change one",
            );
        }
        seen.insert(route.prefix.clone());
        if let Some(route) = validate_route(route, origins, declared, &key, errors) {
            routes.push(route);
        }
    }
    routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
    routes
}

fn validate_route(
    route: RouteSection,
    origins: &[Origin],
    declared: &[String],
    key: &str,
    errors: &mut Errors<'_>,
) -> Option<Route> {
    let before = errors.list.len();
    if !is_normalized(&route.prefix) {
        errors.push(
            &format!("{key}.prefix"),
            Some(format!("{:?}", route.prefix)),
            "must be a normalised absolute path: starting with `/`, no `.`/`..` segments, no `//`, no `%`",
        );
    }
    // An origin that is declared but invalid has its own errors; the route is not blamed.
    if !declared.contains(&route.origin) {
        let known = if declared.is_empty() {
            "none; add [domains.<id>.origins.<name>]".to_string()
        } else {
            declared.join(", ")
        };
        errors.push(
            &format!("{key}.origin"),
            Some(format!("{:?}", route.origin)),
            format!("no origin of that name in this domain; defined: {known}"),
        );
    }
    if let Some(path) = &route.origin_path {
        let valid = is_normalized(path) && path.ends_with('/') == route.prefix.ends_with('/');
        if !valid || path.contains(['?', '#']) {
            errors.push(
                &format!("{key}.origin_path"),
                Some(format!("{path:?}")),
                "must be a normalised absolute path (no `.`/`..` segments, no `//`, no `%`, `?` \
                 or `#`) that ends with `/` exactly when the prefix does",
            );
        }
    }
    let origin = origins.iter().position(|o| o.name == route.origin)?;
    (errors.list.len() == before).then_some(Route {
        prefix: route.prefix,
        origin,
        origin_path: route.origin_path,
        forward_authorization: route.forward_authorization,
    })
}

/// Returns whether `path` is already in the form that request paths are normalised to.
fn is_normalized(path: &str) -> bool {
    !path.contains('%') && crate::path::normalize(path).ok().as_deref() == Some(path)
}

/// Returns whether `name` can be a domain id or an origin name: 1 to 64 of a-z, 0-9, `-`, `_`.
fn is_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Joins the lines of a library's message with `; `, leaving out the ``in `key` `` line that
/// toml adds, since the error shows the key already.
fn one_line(reason: &str) -> String {
    let lines: Vec<&str> = reason
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .filter(|line| !line.starts_with("in `") || !line.ends_with('`'))
        .collect();
    lines.join("; ")
}

/// Resolves a path of the config file against the file's directory `dir`.
pub(super) fn resolve(dir: &Path, path: &str) -> PathBuf {
    let path = Path::new(path);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        dir.join(path)
    }
}
