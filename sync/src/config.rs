//! The `[sync]` section: one job per product, each with a source and a destination root.
//!
//! The section may live in its own file or in the gateway's config file. In the gateway's
//! file, the `pinned_export` of every export-tree origin whose `root` is a job's destination
//! is added to that job's pins. Unknown keys are errors.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mirror_plugins::settings::{parse, render, SettingError};
use serde::Deserialize;

use crate::signature::PublicKey;

/// The whole sync configuration.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// The file it was read from.
    pub path: PathBuf,
    /// The jobs, ordered by name.
    pub jobs: Vec<JobSettings>,
    /// Pause between two scheduled runs when the gateway runs the jobs (`interval_secs`).
    pub interval: Duration,
    /// Largest random change, either way, of each pause (`jitter_secs`, below `interval`).
    pub jitter: Duration,
    /// Age of the newest synced data above which the gateway reports itself not ready
    /// (`max_lag_secs`).
    pub max_lag: Duration,
}

/// One job: fill `destination` from `source`.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSettings {
    /// The job's name, its key under `[sync.jobs]` (e.g. `concelier`).
    pub name: String,
    pub source: SourceSettings,
    /// The export root the gateway serves, holding snapshots and `latest`.
    pub destination: PathBuf,
    /// Snapshots kept, the published one included (at least 1).
    pub keep_snapshots: usize,
    /// Minimum time a replaced snapshot is kept after it stopped being `latest`, even past
    /// `keep_snapshots`, so that downloads in progress can finish.
    pub grace: Duration,
    /// Largest share (0 to 1) of the current files a new snapshot may remove.
    pub max_delete_fraction: f64,
    /// Downloads in flight at once.
    pub concurrency: usize,
    /// Maximum duration of a run, from listing to publishing.
    pub deadline: Duration,
    /// Key that every `bundle.json` must be signed with, when set.
    pub public_key: Option<Arc<PublicKey>>,
    /// Export ids never removed: the job's `pinned` list and the gateway's `pinned_export`.
    pub pinned: Vec<String>,
}

impl JobSettings {
    /// Builds a job with the default limits.
    pub fn new(name: &str, source: SourceSettings, destination: impl Into<PathBuf>) -> Self {
        Self {
            name: name.to_string(),
            source,
            destination: destination.into(),
            keep_snapshots: default_keep(),
            grace: Duration::from_secs(default_grace()),
            max_delete_fraction: default_fraction(),
            concurrency: default_concurrency(),
            deadline: Duration::from_secs(default_deadline()),
            public_key: None,
            pinned: Vec::new(),
        }
    }
}

/// The source of a job's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSettings {
    /// `kind = "directory"`: a local directory, e.g. an rsync target.
    Directory { path: PathBuf },
    /// `kind = "s3"`: a prefix of an S3 bucket.
    S3(S3Settings),
}

/// An S3 source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Settings {
    pub bucket: String,
    /// The key prefix of one export, e.g. `concelier/latest/`; empty for the whole bucket.
    pub prefix: String,
    /// Region; from `AWS_REGION` or `AWS_DEFAULT_REGION` when unset.
    pub region: Option<String>,
    /// Endpoint URL of an S3-compatible store; AWS when unset.
    pub endpoint: Option<String>,
    /// Path-style URLs (`endpoint/bucket/key`) rather than virtual-hosted ones.
    pub path_style: bool,
    /// Allows an `http://` endpoint; off by default.
    pub allow_http: bool,
}

/// One invalid setting in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// Dotted key, e.g. `sync.jobs.concelier.keep_snapshots`.
    pub key: String,
    /// The value found there, as TOML.
    pub value: Option<String>,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.file.display())?;
        match (&self.key, &self.value) {
            (key, _) if key.is_empty() => {}
            (key, Some(value)) => write!(f, "{key} = {value}: ")?,
            (key, None) => write!(f, "{key}: ")?,
        }
        f.write_str(&self.reason)
    }
}

/// Reads and validates the `[sync]` section of the file at `path`.
pub fn load(path: &Path) -> Result<SyncConfig, Vec<ConfigError>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![error(
            path,
            "",
            None,
            format!("cannot read the config file: {e}"),
        )]
    })?;
    load_str(&text, path)
}

/// Validates config `text` as if read from `path` (relative paths resolve against the
/// directory of `path`).
pub fn load_str(text: &str, path: &Path) -> Result<SyncConfig, Vec<ConfigError>> {
    let mut root: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| vec![error(path, "", None, format!("invalid TOML: {e}"))])?;
    let dir = path.parent().unwrap_or(Path::new("")).to_path_buf();
    let Some(section) = root.remove("sync") else {
        let reason = "no [sync] section; add one [sync.jobs.<name>] table per product";
        return Err(vec![error(path, "sync", None, reason.to_string())]);
    };
    let raw: RawSync = parse(section).map_err(|errors| within(path, "sync", errors))?;
    check_schedule(&raw).map_err(|errors| within(path, "sync", errors))?;
    let mut pins = gateway_pins(&root, &dir);
    if let Some(gateway) = &raw.gateway_config {
        let gateway_path = dir.join(gateway);
        pins.extend(read_gateway_pins(&gateway_path).map_err(|reason| {
            vec![error(
                path,
                "sync.gateway_config",
                Some(render_str(gateway)),
                reason,
            )]
        })?);
    }
    if raw.jobs.is_empty() {
        let reason = "no job; add one [sync.jobs.<name>] table per product";
        return Err(vec![error(path, "sync.jobs", None, reason.to_string())]);
    }
    let mut jobs = Vec::new();
    let mut errors = Vec::new();
    for (name, value) in raw.jobs {
        match job(&name, value, &dir, &pins) {
            Ok(job) => jobs.push(job),
            Err(list) => errors.extend(within(path, &format!("sync.jobs.{name}"), list)),
        }
    }
    if errors.is_empty() {
        Ok(SyncConfig {
            path: path.to_path_buf(),
            jobs,
            interval: Duration::from_secs(raw.interval_secs),
            jitter: Duration::from_secs(raw.jitter_secs),
            max_lag: Duration::from_secs(raw.max_lag_secs),
        })
    } else {
        Err(errors)
    }
}

#[derive(Deserialize)]
struct RawSync {
    gateway_config: Option<String>,
    #[serde(default = "default_interval")]
    interval_secs: u64,
    #[serde(default = "default_jitter")]
    jitter_secs: u64,
    #[serde(default = "default_max_lag")]
    max_lag_secs: u64,
    #[serde(default)]
    jobs: BTreeMap<String, toml::Value>,
}

#[derive(Deserialize)]
struct RawJob {
    source: toml::Value,
    destination: String,
    #[serde(default = "default_keep")]
    keep_snapshots: usize,
    #[serde(default = "default_grace")]
    grace_secs: u64,
    #[serde(default = "default_fraction")]
    max_delete_fraction: f64,
    #[serde(default = "default_concurrency")]
    concurrency: usize,
    #[serde(default = "default_deadline")]
    deadline_secs: u64,
    public_key: Option<String>,
    #[serde(default)]
    pinned: Vec<String>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct RawDirectory {
    kind: String,
    path: String,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct RawS3 {
    kind: String,
    bucket: String,
    #[serde(default)]
    prefix: String,
    region: Option<String>,
    endpoint: Option<String>,
    #[serde(default)]
    path_style: bool,
    #[serde(default)]
    allow_http: bool,
}

fn default_interval() -> u64 {
    300
}
fn default_jitter() -> u64 {
    30
}
fn default_max_lag() -> u64 {
    900
}
fn default_keep() -> usize {
    3
}
fn default_grace() -> u64 {
    600
}
fn default_fraction() -> f64 {
    0.5
}
fn default_concurrency() -> usize {
    8
}
fn default_deadline() -> u64 {
    240
}

fn job(
    name: &str,
    value: toml::Value,
    dir: &Path,
    pins: &[(PathBuf, String)],
) -> Result<JobSettings, Vec<SettingError>> {
    let bad =
        |key: &str, value: String, reason: &str| vec![SettingError::new(key, Some(value), reason)];
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(vec![SettingError::new(
            "",
            None,
            "job names use only A-Z a-z 0-9 - _ (e.g. concelier)",
        )]);
    }
    let raw: RawJob = parse(value)?;
    check_limits(&raw)?;
    let source = source(raw.source, dir).map_err(|e| within_settings("source", e))?;
    if raw.destination.trim().is_empty() {
        return Err(bad(
            "destination",
            render_str(&raw.destination),
            "must name a directory",
        ));
    }
    let destination = dir.join(&raw.destination);
    let public_key = match &raw.public_key {
        None => None,
        Some(file) => Some(Arc::new(
            PublicKey::from_pem_file(&dir.join(file))
                .map_err(|reason| bad("public_key", render_str(file), &reason))?,
        )),
    };
    for (i, id) in raw.pinned.iter().enumerate() {
        if crate::export_id::parse(id).is_none() {
            let key = format!("pinned[{i}]");
            return Err(bad(
                &key,
                render_str(id),
                "is not an export id like 20260101T120000Z",
            ));
        }
    }
    let mut pinned = raw.pinned;
    pinned.extend(
        pins.iter()
            .filter(|(root, _)| same_dir(root, &destination))
            .map(|(_, id)| id.clone()),
    );
    Ok(JobSettings {
        name: name.to_string(),
        source,
        destination,
        keep_snapshots: raw.keep_snapshots,
        grace: Duration::from_secs(raw.grace_secs),
        max_delete_fraction: raw.max_delete_fraction,
        concurrency: raw.concurrency,
        deadline: Duration::from_secs(raw.deadline_secs),
        public_key,
        pinned,
    })
}

/// Checks the schedule keys of `[sync]`: every pause between runs must be positive.
fn check_schedule(raw: &RawSync) -> Result<(), Vec<SettingError>> {
    let bad = |key: &str, value: u64, reason: &str| {
        Err(vec![SettingError::new(
            key,
            Some(value.to_string()),
            reason,
        )])
    };
    if raw.interval_secs == 0 {
        return bad("interval_secs", 0, "must be at least 1, e.g. 300");
    }
    if raw.jitter_secs >= raw.interval_secs {
        let reason = format!(
            "must be less than interval_secs ({}), e.g. a tenth of it",
            raw.interval_secs
        );
        return bad("jitter_secs", raw.jitter_secs, &reason);
    }
    if raw.max_lag_secs == 0 {
        return bad("max_lag_secs", 0, "must be at least 1, e.g. 900");
    }
    Ok(())
}

fn check_limits(raw: &RawJob) -> Result<(), Vec<SettingError>> {
    let bad = |key: &str, value: String, reason: &str| {
        Err(vec![SettingError::new(key, Some(value), reason)])
    };
    if raw.keep_snapshots == 0 {
        return bad(
            "keep_snapshots",
            "0".into(),
            "must be at least 1 (the published snapshot)",
        );
    }
    if !(0.0..=1.0).contains(&raw.max_delete_fraction) {
        let value = raw.max_delete_fraction.to_string();
        return bad(
            "max_delete_fraction",
            value,
            "must be between 0.0 and 1.0, e.g. 0.5",
        );
    }
    if !(1..=256).contains(&raw.concurrency) {
        let value = raw.concurrency.to_string();
        return bad("concurrency", value, "must be between 1 and 256, e.g. 8");
    }
    if raw.deadline_secs == 0 {
        return bad("deadline_secs", "0".into(), "must be at least 1, e.g. 240");
    }
    Ok(())
}

fn source(value: toml::Value, dir: &Path) -> Result<SourceSettings, Vec<SettingError>> {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .map(str::to_string);
    match kind.as_deref() {
        Some("directory") => {
            let raw: RawDirectory = parse(value)?;
            Ok(SourceSettings::Directory {
                path: dir.join(raw.path),
            })
        }
        Some("s3") => s3_source(parse(value)?),
        _ => Err(vec![SettingError::new(
            "kind",
            value.get("kind").map(render),
            "must be \"directory\" or \"s3\"",
        )]),
    }
}

fn s3_source(raw: RawS3) -> Result<SourceSettings, Vec<SettingError>> {
    if raw.bucket.is_empty() {
        let reason = "must name a bucket";
        return Err(vec![SettingError::new(
            "bucket",
            Some("\"\"".into()),
            reason,
        )]);
    }
    if let Some(endpoint) = &raw.endpoint {
        let plain = endpoint.starts_with("http://");
        if !plain && !endpoint.starts_with("https://") {
            let reason = "must be an http:// or https:// URL";
            return Err(vec![SettingError::new(
                "endpoint",
                Some(render_str(endpoint)),
                reason,
            )]);
        }
        if plain && !raw.allow_http {
            let reason = "is plain HTTP; use https://, or set allow_http = true to accept it";
            return Err(vec![SettingError::new(
                "endpoint",
                Some(render_str(endpoint)),
                reason,
            )]);
        }
    }
    Ok(SourceSettings::S3(S3Settings {
        bucket: raw.bucket,
        prefix: raw.prefix,
        region: raw.region,
        endpoint: raw.endpoint,
        path_style: raw.path_style,
        allow_http: raw.allow_http,
    }))
}

/// Returns `(root, pinned export)` of every export-tree origin in a gateway config table.
fn gateway_pins(root: &toml::Table, dir: &Path) -> Vec<(PathBuf, String)> {
    let Some(domains) = root.get("domains").and_then(|d| d.as_table()) else {
        return Vec::new();
    };
    let origins = domains
        .values()
        .filter_map(|d| d.get("origins")?.as_table())
        .flat_map(|origins| origins.values());
    origins
        .filter(|o| o.get("kind").and_then(|k| k.as_str()) == Some("export_tree"))
        .filter_map(|o| {
            let root = o.get("root")?.as_str()?;
            let pin = o.get("pinned_export")?.as_str()?;
            Some((dir.join(root), pin.to_string()))
        })
        .collect()
}

fn read_gateway_pins(path: &Path) -> Result<Vec<(PathBuf, String)>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("{} is not valid TOML: {e}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new(""));
    Ok(gateway_pins(&table, dir))
}

/// Tells whether two paths name the same directory (resolved when both exist).
fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => std::path::absolute(a).ok() == std::path::absolute(b).ok(),
    }
}

fn render_str(value: &str) -> String {
    format!("{value:?}")
}

fn within_settings(parent: &str, errors: Vec<SettingError>) -> Vec<SettingError> {
    errors.into_iter().map(|e| e.within(parent)).collect()
}

fn within(file: &Path, parent: &str, errors: Vec<SettingError>) -> Vec<ConfigError> {
    errors
        .into_iter()
        .map(|e| {
            let e = e.within(parent);
            error(file, &e.key, e.value, e.reason)
        })
        .collect()
}

fn error(file: &Path, key: &str, value: Option<String>, reason: String) -> ConfigError {
    ConfigError {
        file: file.to_path_buf(),
        key: key.to_string(),
        value,
        reason,
    }
}
