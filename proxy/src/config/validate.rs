//! Validation: from the parsed TOML table to a [`GatewayConfig`], collecting every error.

use std::collections::{BTreeMap, HashSet};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use mirror_plugins::settings::{self, join_key, render, SettingError};
use mirror_plugins::{build_plugin, BuildContext};
use serde::de::DeserializeOwned;
use toml::{Table, Value};

use super::env::Sources;
use super::schema::{
    CacheSection, DomainSection, LogSection, OriginSection, RouteSection, ServerSection,
};
use super::{
    AccessLogTarget, CacheSettings, ConfigError, Domain, ExportTreeOrigin, GatewayConfig,
    HttpOrigin, LogSettings, Origin, OriginKind, Route, ServerSettings,
};
use crate::host::HostMatcher;

/// Collects errors and attributes each to the file or to the variable that set its key.
struct Errors<'a> {
    file: String,
    sources: &'a Sources,
    list: Vec<ConfigError>,
}

impl Errors<'_> {
    fn push(&mut self, key: &str, value: Option<String>, reason: impl Into<String>) {
        let source = self
            .sources
            .variable_for(key)
            .map(str::to_owned)
            .unwrap_or_else(|| self.file.clone());
        self.list.push(ConfigError::new(source, key, value, reason));
    }

    fn extend(&mut self, parent: &str, errors: Vec<SettingError>) {
        for e in errors {
            let e = e.within(parent);
            self.push(&e.key, e.value, e.reason);
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

    let server: ServerSection = errors.section(root.remove("server"), "server");
    let log: LogSection = errors.section(root.remove("log"), "log");
    let cache: CacheSection = errors.section(root.remove("cache"), "cache");
    let domains_value = root.remove("domains");
    for (key, value) in &root {
        errors.push(
            key,
            Some(render(value)),
            "unknown top-level key; the sections are server, log, cache and domains",
        );
    }

    let server = validate_server(server, &config_dir, &mut errors);
    let log = validate_log(log, &config_dir, &mut errors);
    let cache = validate_cache(cache, &mut errors);
    let domains = validate_domains(domains_value, &config_dir, &mut errors);

    match (server, log, cache) {
        (Some(server), Some(log), Some(cache)) if errors.list.is_empty() => Ok(GatewayConfig {
            path: path.to_path_buf(),
            server,
            log,
            cache,
            domains,
        }),
        _ => Err(errors.list),
    }
}

fn validate_server(
    s: ServerSection,
    dir: &Path,
    errors: &mut Errors<'_>,
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
    (errors.list.len() == before).then(|| ServerSettings {
        listen,
        threads: s.threads,
        runtime_dir: s.runtime_dir.map(|d| resolve(dir, &d)),
        grace_period: Duration::from_secs(s.grace_period_secs),
        shutdown_timeout: Duration::from_secs(s.shutdown_timeout_secs),
        upstream_keepalive_pool_size: s.upstream_keepalive_pool_size,
    })
}

fn validate_log(s: LogSection, dir: &Path, errors: &mut Errors<'_>) -> Option<LogSettings> {
    let access_log = match s.access_log.as_str() {
        "stdout" | "-" => AccessLogTarget::Stdout,
        "off" => AccessLogTarget::Off,
        "" => {
            errors.push(
                "log.access_log",
                Some("\"\"".into()),
                "write \"stdout\", \"off\" or a file path",
            );
            return None;
        }
        other => AccessLogTarget::File(resolve(dir, other)),
    };
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&s.level) {
        errors.push(
            "log.level",
            Some(format!("{:?}", s.level)),
            format!("not a log filter ({e}); write e.g. \"info\" or \"mirror_proxy=debug,info\""),
        );
        return None;
    }
    Some(LogSettings {
        access_log,
        level: s.level,
    })
}

fn validate_cache(s: CacheSection, errors: &mut Errors<'_>) -> Option<CacheSettings> {
    let before = errors.list.len();
    if s.memory_bytes.0 < 1 << 20 {
        errors.push(
            "cache.memory_bytes",
            Some(s.memory_bytes.0.to_string()),
            "must be at least 1 MiB",
        );
    }
    if s.max_object_bytes.0 == 0 || s.max_object_bytes.0 > s.memory_bytes.0 {
        errors.push(
            "cache.max_object_bytes",
            Some(s.max_object_bytes.0.to_string()),
            "must be between 1 and cache.memory_bytes; larger objects could never be stored",
        );
    }
    if s.lock_wait_timeout_secs == 0 || s.lock_age_timeout_secs == 0 {
        errors.push(
            "cache.lock_wait_timeout_secs",
            Some(s.lock_wait_timeout_secs.to_string()),
            "lock timeouts must be at least 1 second",
        );
    }
    (errors.list.len() == before).then(|| CacheSettings {
        memory_bytes: usize::try_from(s.memory_bytes.0).unwrap_or(usize::MAX),
        max_object_bytes: usize::try_from(s.max_object_bytes.0).unwrap_or(usize::MAX),
        lock_wait_timeout: Duration::from_secs(s.lock_wait_timeout_secs),
        lock_age_timeout: Duration::from_secs(s.lock_age_timeout_secs),
    })
}

fn validate_domains(value: Option<Value>, dir: &Path, errors: &mut Errors<'_>) -> Vec<Domain> {
    let tables: BTreeMap<String, Value> = match value {
        None => BTreeMap::new(),
        Some(value) => errors.parse(value, "domains").unwrap_or_default(),
    };
    if tables.is_empty() {
        errors.push(
            "domains",
            None,
            "define at least one domain, e.g. [domains.primary]",
        );
    }
    let mut domains = Vec::new();
    for (id, table) in tables {
        if let Some(domain) = validate_domain(&id, table, dir, errors) {
            domains.push(domain);
        }
    }
    let patterns = domains
        .iter()
        .enumerate()
        .flat_map(|(i, d)| d.hosts.iter().map(move |h| (h.clone(), i)));
    if let Err(e) = HostMatcher::new(patterns) {
        errors.push("domains.*.hosts", None, e.to_string());
    }
    domains
}

fn validate_domain(id: &str, table: Value, dir: &Path, errors: &mut Errors<'_>) -> Option<Domain> {
    let key = format!("domains.{id}");
    let before = errors.list.len();
    let id_ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !id_ok {
        errors.push(
            &key,
            None,
            "a domain id uses 1 to 64 of a-z, 0-9, `-` and `_`",
        );
    }
    let section: DomainSection = errors.parse(table, &key)?;
    if section.hosts.is_empty() {
        errors.push(
            &format!("{key}.hosts"),
            Some("[]".into()),
            "list at least one host name",
        );
    }
    let origins = validate_origins(section.origins, &key, dir, errors);
    let routes = validate_routes(section.routes, &origins, &key, errors);
    let ctx = BuildContext {
        domain: id,
        config_dir: dir,
    };
    let mut plugins = Vec::new();
    for (i, entry) in section.plugins.into_iter().enumerate() {
        let entry_key = format!("{key}.plugins[{i}]");
        match plugin_name(entry) {
            Ok((name, settings)) => match build_plugin(&name, settings, &ctx) {
                Ok(plugin) => plugins.push(plugin),
                Err(list) => errors.extend(&entry_key, list),
            },
            Err(e) => errors.extend(&entry_key, vec![e]),
        }
    }
    (errors.list.len() == before).then(|| Domain {
        id: id.to_string(),
        hosts: section.hosts,
        routes,
        origins,
        plugins,
    })
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
            } => validate_http_origin(&key, addresses, host, errors).map(|(addresses, host)| {
                OriginKind::Http(HttpOrigin {
                    addresses,
                    host,
                    connect_timeout: Duration::from_millis(connect_timeout_ms.max(1)),
                    read_timeout: Duration::from_millis(read_timeout_ms.max(1)),
                    write_timeout: Duration::from_millis(write_timeout_ms.max(1)),
                    idle_timeout: Duration::from_secs(idle_timeout_secs),
                })
            }),
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
        if let Err(e) = address
            .to_socket_addrs()
            .map(|mut a| a.next().ok_or("no address"))
        {
            errors.push(
                &format!("{key}.addresses[{i}]"),
                Some(format!("{address:?}")),
                format!("cannot resolve ({e}); write \"host:port\" such as \"127.0.0.1:8081\""),
            );
        }
    }
    let host = host
        .or_else(|| addresses.first().cloned())
        .unwrap_or_default();
    if http::HeaderValue::from_str(&host).is_err() || host.is_empty() {
        errors.push(
            &format!("{key}.host"),
            Some(format!("{host:?}")),
            "not a valid Host header value",
        );
    }
    (errors.list.len() == before).then_some((addresses, host))
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
    if !root_path.is_dir() {
        errors.push(
            &format!("{key}.root"),
            Some(format!("{root:?}")),
            format!(
                "{} is not a directory; point it at the export tree the sync job fills",
                root_path.display()
            ),
        );
    }
    if let Some(pin) = &pinned_export {
        let valid = !pin.is_empty()
            && pin != "."
            && pin != ".."
            && pin
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !valid {
            errors.push(
                &format!("{key}.pinned_export"),
                Some(format!("{pin:?}")),
                "an export id uses letters, digits, `.`, `_` and `-`, e.g. \"20260101T120000Z\"",
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
        if let Some(route) = validate_route(route, origins, &key, errors) {
            if !seen.insert(route.prefix.clone()) {
                errors.push(
                    &join_key(&key, "prefix"),
                    Some(format!("{:?}", route.prefix)),
                    "another route has the same prefix",
                );
            }
            routes.push(route);
        }
    }
    routes.sort_by(|a, b| b.prefix.len().cmp(&a.prefix.len()));
    routes
}

fn validate_route(
    route: RouteSection,
    origins: &[Origin],
    key: &str,
    errors: &mut Errors<'_>,
) -> Option<Route> {
    let before = errors.list.len();
    if crate::path::normalize(&route.prefix).ok().as_deref() != Some(route.prefix.as_str()) {
        errors.push(
            &format!("{key}.prefix"),
            Some(format!("{:?}", route.prefix)),
            "must be a normalised absolute path: starting with `/`, no `.`/`..` segments, no `//`, no `%`",
        );
    }
    let origin = origins.iter().position(|o| o.name == route.origin);
    if origin.is_none() {
        let known: Vec<_> = origins.iter().map(|o| o.name.as_str()).collect();
        errors.push(
            &format!("{key}.origin"),
            Some(format!("{:?}", route.origin)),
            format!(
                "no origin of that name in this domain; defined: {}",
                known.join(", ")
            ),
        );
    }
    if let Some(path) = &route.origin_path {
        let valid = path.starts_with('/') && path.ends_with('/') == route.prefix.ends_with('/');
        if !valid || path.contains(['?', '#', '%']) {
            errors.push(
                &format!("{key}.origin_path"),
                Some(format!("{path:?}")),
                "must start with `/`, end with `/` exactly when the prefix does, and hold no `?`, `#` or `%`",
            );
        }
    }
    (errors.list.len() == before).then(|| Route {
        prefix: route.prefix,
        origin: origin.unwrap_or_default(),
        origin_path: route.origin_path,
        forward_authorization: route.forward_authorization,
    })
}

fn resolve(dir: &Path, path: &str) -> PathBuf {
    let path = Path::new(path);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        dir.join(path)
    }
}
