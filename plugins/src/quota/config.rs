//! The `quota` plugin's settings: parsing, defaults and validation.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::store::Limits;
use crate::settings::{self, SettingError};
use crate::ttl::PathPattern;
use crate::BuildContext;

/// Path patterns counted against the index budget unless `index_paths` is set.
pub const DEFAULT_INDEX_PATHS: &[&str] = &[
    "/concelier/exports/index.json",
    "/excititor/mirror/domains.json",
    "/excititor/mirror/*/index.json",
];
/// Path patterns counted against the download budget unless `download_paths` is set.
pub const DEFAULT_DOWNLOAD_PATHS: &[&str] = &[
    "/concelier/exports/mirror/**",
    "/excititor/mirror/*/exports/**",
];
/// Key prefix in Redis unless `redis.key_prefix` is set.
pub const DEFAULT_KEY_PREFIX: &str = "mirror-gateway:quota";
/// Maximum wait for Redis on the request path unless `redis.timeout_ms` is set.
pub const DEFAULT_TIMEOUT_MS: u64 = 50;
/// Requests a replica counts in Redis ahead of use unless `redis.reserve` is set.
pub const DEFAULT_RESERVE: u64 = 64;
/// Largest `redis.reserve`.
pub const MAX_RESERVE: u64 = 1024;

/// The handling of counted requests while the shared store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Count in this process alone until the store responds again.
    #[default]
    FailOpen,
    /// Reject counted requests with 429 until the store responds again.
    FailClosed,
}

/// The validated settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub index: Limits,
    pub download: Limits,
    pub index_paths: Vec<PathPattern>,
    pub download_paths: Vec<PathPattern>,
    pub count_cache_hits: bool,
    /// The state file, resolved against the config directory.
    pub state_file: Option<PathBuf>,
    pub redis: Option<RedisConfig>,
}

/// The validated `redis` table.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub client: redis::Client,
    pub key_prefix: String,
    pub timeout: Duration,
    pub failure_mode: FailureMode,
    /// Requests of one principal counted in Redis ahead of use, while its budgets have room
    /// (see `redis_store`); 0 checks every request in Redis.
    pub reserve: u64,
}

#[derive(Debug, Deserialize)]
struct Raw {
    index_per_hour: u64,
    download_per_hour: u64,
    domain_index_per_hour: Option<u64>,
    domain_download_per_hour: Option<u64>,
    index_paths: Option<Vec<String>>,
    download_paths: Option<Vec<String>>,
    #[serde(default = "yes")]
    count_cache_hits: bool,
    state_file: Option<PathBuf>,
    redis: Option<RawRedis>,
}

#[derive(Debug, Deserialize)]
struct RawRedis {
    url: String,
    #[serde(default = "default_prefix")]
    key_prefix: String,
    #[serde(default = "default_timeout")]
    timeout_ms: u64,
    #[serde(default)]
    failure_mode: FailureMode,
    #[serde(default = "default_reserve")]
    reserve: u64,
}

fn yes() -> bool {
    true
}

fn default_prefix() -> String {
    DEFAULT_KEY_PREFIX.to_owned()
}

fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_MS
}

fn default_reserve() -> u64 {
    DEFAULT_RESERVE
}

/// Parses and checks the settings table; reports every invalid key it can.
pub fn parse(value: toml::Value, ctx: &BuildContext<'_>) -> Result<Config, Vec<SettingError>> {
    let raw: Raw = settings::parse(value)?;
    let mut errors = Vec::new();
    let mut budget = |key: &str, value: Option<u64>| {
        if value == Some(0) {
            errors.push(SettingError::new(
                key,
                Some("0".into()),
                "a budget must be at least 1 request per hour; remove the plugin to not count",
            ));
        }
        value
    };
    let index = Limits {
        principal: budget("index_per_hour", Some(raw.index_per_hour)).unwrap_or(1),
        domain: budget("domain_index_per_hour", raw.domain_index_per_hour),
    };
    let download = Limits {
        principal: budget("download_per_hour", Some(raw.download_per_hour)).unwrap_or(1),
        domain: budget("domain_download_per_hour", raw.domain_download_per_hour),
    };
    let index_paths = patterns(
        "index_paths",
        raw.index_paths,
        DEFAULT_INDEX_PATHS,
        &mut errors,
    );
    let download_paths = patterns(
        "download_paths",
        raw.download_paths,
        DEFAULT_DOWNLOAD_PATHS,
        &mut errors,
    );
    let state_file = raw.state_file.map(|path| ctx.resolve(&path));
    if let Some(path) = &state_file {
        if let Err(reason) = check_state_path(path) {
            errors.push(SettingError::new(
                "state_file",
                Some(format!("{:?}", path.display().to_string())),
                reason,
            ));
        }
    }
    let redis = raw.redis.and_then(|r| match redis_config(r) {
        Ok(config) => Some(config),
        Err(e) => {
            errors.push(e.within("redis"));
            None
        }
    });
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Config {
        index,
        download,
        index_paths,
        download_paths,
        count_cache_hits: raw.count_cache_hits,
        state_file,
        redis,
    })
}

/// Compiles the patterns of one class, or its defaults when the key is absent.
fn patterns(
    key: &str,
    given: Option<Vec<String>>,
    defaults: &[&str],
    errors: &mut Vec<SettingError>,
) -> Vec<PathPattern> {
    let texts = given.unwrap_or_else(|| defaults.iter().map(|p| (*p).to_owned()).collect());
    let mut out = Vec::with_capacity(texts.len());
    for (index, text) in texts.iter().enumerate() {
        match PathPattern::parse(text) {
            Ok(pattern) => out.push(pattern),
            Err(reason) => errors.push(SettingError::new(
                format!("{key}[{index}]"),
                Some(format!("{text:?}")),
                reason,
            )),
        }
    }
    out
}

/// Checks that a state file can be written at `path`: a file name in a directory that
/// exists. Whether the directory is writable shows on the first write, which logs a warning.
fn check_state_path(path: &Path) -> Result<(), String> {
    if path.is_dir() {
        return Err("is a directory; name a file in it, e.g. quota.state".into());
    }
    if path.file_name().is_none() {
        return Err(
            "names no file; write a path such as /var/lib/mirror-gateway/quota.state".into(),
        );
    }
    match path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        Some(dir) if !dir.is_dir() => Err(format!(
            "the directory {} does not exist; create it or choose a path in an existing one",
            dir.display()
        )),
        _ => Ok(()),
    }
}

fn redis_config(raw: RawRedis) -> Result<RedisConfig, SettingError> {
    if raw.url.starts_with("rediss://") {
        return Err(SettingError::new(
            "url",
            Some(format!("{:?}", redact_url(&raw.url))),
            "TLS to Redis (rediss://) is not supported; write redis://HOST:PORT/DB and reach \
             Redis over a trusted network",
        ));
    }
    let client = redis::Client::open(raw.url.as_str()).map_err(|e| {
        SettingError::new(
            "url",
            Some(format!("{:?}", redact_url(&raw.url))),
            format!(
                "not a usable Redis URL ({:?}); write it as redis://HOST:PORT/DB",
                e.kind()
            ),
        )
    })?;
    let prefix_ok = !raw.key_prefix.is_empty()
        && raw.key_prefix.len() <= 200
        && raw.key_prefix.chars().all(|c| c.is_ascii_graphic());
    if !prefix_ok {
        return Err(SettingError::new(
            "key_prefix",
            Some(format!("{:?}", raw.key_prefix)),
            "use 1 to 200 printable ASCII characters without spaces",
        ));
    }
    if !(1..=10_000).contains(&raw.timeout_ms) {
        return Err(SettingError::new(
            "timeout_ms",
            Some(raw.timeout_ms.to_string()),
            "use 1 to 10000 milliseconds; requests wait this long for Redis at most",
        ));
    }
    if raw.reserve > MAX_RESERVE {
        return Err(SettingError::new(
            "reserve",
            Some(raw.reserve.to_string()),
            format!(
                "use 0 to {MAX_RESERVE} requests; 0 checks every request in Redis, a larger \
                 value saves Redis round trips for busy principals"
            ),
        ));
    }
    Ok(RedisConfig {
        client,
        key_prefix: raw.key_prefix,
        timeout: Duration::from_millis(raw.timeout_ms),
        failure_mode: raw.failure_mode,
        reserve: raw.reserve,
    })
}

/// Replaces the password of a `redis://user:password@host` URL, and the value of a `pass` or
/// `password` query parameter (as `redis+unix://` URLs carry it), with `***`. The user part
/// ends at the last `@`, so a password that contains `/`, `?` or `#` is masked whole.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let rest = match rest.rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or("");
            format!("{user}:***@{}", &rest[at + 1..])
        }
        None => rest.to_owned(),
    };
    let rest = match rest.split_once('?') {
        Some((path, query)) => {
            let parameters: Vec<String> = query
                .split('&')
                .map(|parameter| match parameter.split_once('=') {
                    Some((name, _)) if matches!(name, "pass" | "password") => {
                        format!("{name}=***")
                    }
                    _ => parameter.to_owned(),
                })
                .collect();
            format!("{path}?{}", parameters.join("&"))
        }
        None => rest,
    };
    format!("{scheme}://{rest}")
}
