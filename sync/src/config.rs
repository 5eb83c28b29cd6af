//! The `[sync]` section: one job per product, each with a source and a destination root.
//!
//! The section may live in its own file or in the gateway's config file. In the gateway's
//! file, the `pinned_export` of every export-tree origin whose `root` is a job's destination
//! is added to that job's pins. Unknown keys are errors.
//!
//! Every file is read as the gateway reads its own: with the `MIRROR_GATEWAY__...`
//! environment overrides applied (see [`mirror_plugins::config_file`]). So a job key, an
//! origin's `root` or a `pinned_export` set by a variable counts here as it does in the
//! gateway.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mirror_plugins::config_file::{self, Sources};
use mirror_plugins::settings::{parse, render, with_range, SettingError};
use serde::Deserialize;

use crate::signature::PublicKey;

pub use mirror_plugins::config_file::ConfigError;

/// Maximum value of every `*_secs` key: 315,360,000 s, that is 10 years of 365 days. No schedule
/// or retention needs more, and the limit keeps every time computed from these keys far from
/// the range where adding them to a clock reading overflows.
pub const MAX_SECS: u64 = 10 * 365 * 24 * 60 * 60;

/// Text of [`MAX_SECS`] in messages.
const MAX_SECS_TEXT: &str = "315360000 (10 years)";

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

/// Reads the file at `path`, applies the environment overrides in `env` and validates its
/// `[sync]` section.
pub fn load(path: &Path, env: &[(String, String)]) -> Result<SyncConfig, Vec<ConfigError>> {
    let text = config_file::read_file(path).map_err(|e| vec![e])?;
    load_str(&text, path, env)
}

/// Validates config `text` as if read from `path` (relative paths resolve against the
/// directory of `path`), with the environment overrides in `env` applied.
///
/// Besides the errors of [`from_document`], an override that sets a key of `[sync]` and
/// cannot be applied is an error. The errors of other overrides are left to the gateway, which
/// reports them when it loads the file.
pub fn load_str(
    text: &str,
    path: &Path,
    env: &[(String, String)],
) -> Result<SyncConfig, Vec<ConfigError>> {
    let file = path.display().to_string();
    let (root, sources, override_errors) =
        config_file::parse_document(text, &file, env.iter().cloned()).map_err(|e| vec![e])?;
    let mut errors: Vec<ConfigError> = override_errors
        .into_iter()
        .filter(|e| is_sync_key(&e.key))
        .collect();
    match from_document(&root, &sources, path, env) {
        Ok(config) if errors.is_empty() => Ok(config),
        Ok(_) => Err(errors),
        Err(more) => {
            errors.extend(more);
            Err(errors)
        }
    }
}

/// Returns whether the dotted `key` of a config error lies in the `[sync]` section.
pub fn is_sync_key(key: &str) -> bool {
    key.strip_prefix("sync")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
}

/// Validates the `[sync]` section of `root`, a config document read from `path` with the
/// environment overrides already applied. `sources` names the variable that set each key, and
/// `env` is applied to the file that `sync.gateway_config` names, if any.
///
/// Every error of the section is reported: those of the schedule keys, of each job and of the
/// jobs taken together. Only a job table that does not parse (an unknown key, a value of the
/// wrong type, a missing key) hides the other errors of that job.
pub fn from_document(
    root: &toml::Table,
    sources: &Sources,
    path: &Path,
    env: &[(String, String)],
) -> Result<SyncConfig, Vec<ConfigError>> {
    let report = Report {
        file: path.display().to_string(),
        sources,
    };
    let dir = path.parent().unwrap_or(Path::new("")).to_path_buf();
    let Some(section) = root.get("sync").cloned() else {
        let reason = "no [sync] section; add one [sync.jobs.<name>] table per product";
        return Err(vec![report.error("sync", None, reason.to_string())]);
    };
    let (schedule, jobs_value) = split_section(section).map_err(|e| report.within("sync", e))?;
    let mut errors = Vec::new();
    let raw = match parse::<RawSync>(schedule) {
        Ok(raw) => {
            errors.extend(report.within("sync", check_schedule(&raw)));
            Some(raw)
        }
        Err(list) => {
            errors.extend(report.within("sync", list));
            None
        }
    };
    let mut pins = gateway_pins(root, &dir);
    if let Some(gateway) = raw.as_ref().and_then(|raw| raw.gateway_config.as_ref()) {
        match read_gateway_pins(&dir.join(gateway), env) {
            Ok(more) => pins.extend(more),
            Err(reason) => {
                errors.push(report.error("sync.gateway_config", Some(render_str(gateway)), reason))
            }
        }
    }
    let raw_jobs = match jobs_value.map(parse::<BTreeMap<String, toml::Value>>) {
        None => BTreeMap::new(),
        Some(Ok(jobs)) => jobs,
        Some(Err(list)) => return Err(concat(errors, report.within("sync.jobs", list))),
    };
    if raw_jobs.is_empty() {
        let reason = "no job; add one [sync.jobs.<name>] table per product";
        errors.push(report.error("sync.jobs", None, reason.to_string()));
    }
    let mut jobs = Vec::new();
    let mut places = Vec::new();
    for (name, value) in raw_jobs {
        match job(&name, value, &dir, &pins, &mut places) {
            Ok(job) => jobs.push(job),
            Err(list) => errors.extend(report.within(&format!("sync.jobs.{name}"), list)),
        }
    }
    errors.extend(report.within("sync.jobs", check_jobs(&places)));
    match raw {
        Some(raw) if errors.is_empty() => Ok(SyncConfig {
            path: path.to_path_buf(),
            jobs,
            interval: Duration::from_secs(raw.interval_secs),
            jitter: Duration::from_secs(raw.jitter_secs),
            max_lag: Duration::from_secs(raw.max_lag_secs),
        }),
        _ => Err(errors),
    }
}

/// Splits the `[sync]` section into its schedule keys and its `jobs` table, which are parsed
/// apart so that an error in one leaves the other checked.
fn split_section(
    section: toml::Value,
) -> Result<(toml::Value, Option<toml::Value>), Vec<SettingError>> {
    match section {
        toml::Value::Table(mut table) => {
            let jobs = table.remove("jobs");
            Ok((toml::Value::Table(table), jobs))
        }
        other => Err(vec![SettingError::new(
            "",
            Some(render(&other)),
            "must be a table; write a [sync] section with one [sync.jobs.<name>] table per product",
        )]),
    }
}

/// Returns `first` followed by `then`.
fn concat<T>(mut first: Vec<T>, then: Vec<T>) -> Vec<T> {
    first.extend(then);
    first
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

/// The destination and the directory source of a job, for the checks across jobs (see
/// [`check_jobs`]).
struct JobPlace {
    name: String,
    destination: PathBuf,
    /// The path of a directory source, when the source is one and valid.
    source_dir: Option<PathBuf>,
}

/// Validates one job. Every error of the job is returned, unless its table does not parse.
/// When the destination is valid, the job's place is added to `places`, even if other keys of
/// the job are invalid, so that the checks across jobs cover it too.
fn job(
    name: &str,
    value: toml::Value,
    dir: &Path,
    pins: &[(PathBuf, String)],
    places: &mut Vec<JobPlace>,
) -> Result<JobSettings, Vec<SettingError>> {
    let bad = |key: &str, value: String, reason: &str| SettingError::new(key, Some(value), reason);
    let mut errors = Vec::new();
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        errors.push(SettingError::new(
            "",
            None,
            "job names use only A-Z a-z 0-9 - _ (e.g. concelier)",
        ));
    }
    let raw: RawJob = parse(value).map_err(|list| concat(std::mem::take(&mut errors), list))?;
    errors.extend(check_limits(&raw));
    let source = match source(raw.source, dir) {
        Ok(source) => Some(source),
        Err(list) => {
            errors.extend(within_settings("source", list));
            None
        }
    };
    let destination = if raw.destination.trim().is_empty() {
        let reason = "must name a directory, e.g. \"/var/lib/mirror-data/concelier\"";
        errors.push(bad("destination", render_str(&raw.destination), reason));
        None
    } else {
        let destination = dir.join(&raw.destination);
        let written = render_str(&raw.destination);
        let destination_errors = check_destination(&destination, source.as_ref(), &written);
        if destination_errors.is_empty() {
            places.push(JobPlace {
                name: name.to_string(),
                destination: destination.clone(),
                source_dir: match &source {
                    Some(SourceSettings::Directory { path }) => Some(path.clone()),
                    _ => None,
                },
            });
        }
        errors.extend(destination_errors);
        Some(destination)
    };
    let public_key = match &raw.public_key {
        None => None,
        Some(file) => match PublicKey::from_pem_file(&dir.join(file)) {
            Ok(key) => Some(Arc::new(key)),
            Err(reason) => {
                errors.push(bad("public_key", render_str(file), &reason));
                None
            }
        },
    };
    for (i, id) in raw.pinned.iter().enumerate() {
        if crate::export_id::parse(id).is_none() {
            let key = format!("pinned[{i}]");
            let reason = "is not an export id like 20260101T120000Z";
            errors.push(bad(&key, render_str(id), reason));
        }
    }
    let (Some(source), Some(destination)) = (source, destination) else {
        return Err(errors);
    };
    if !errors.is_empty() {
        return Err(errors);
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

/// Checks the schedule keys of `[sync]`: every pause between runs must be positive, and every
/// time at most [`MAX_SECS`].
fn check_schedule(raw: &RawSync) -> Vec<SettingError> {
    let mut errors = Vec::new();
    let interval = check_secs("interval_secs", raw.interval_secs, 1, 300);
    let jitter = check_secs("jitter_secs", raw.jitter_secs, 0, 30);
    let both_in_range = interval.is_none() && jitter.is_none();
    errors.extend(interval);
    errors.extend(jitter);
    if both_in_range && raw.jitter_secs >= raw.interval_secs {
        let reason = format!(
            "must be less than interval_secs ({}), e.g. a tenth of it",
            raw.interval_secs
        );
        errors.push(SettingError::new(
            "jitter_secs",
            Some(raw.jitter_secs.to_string()),
            reason,
        ));
    }
    errors.extend(check_secs("max_lag_secs", raw.max_lag_secs, 1, 900));
    errors
}

/// Checks the limits of a job: counts, the delete fraction and the times.
fn check_limits(raw: &RawJob) -> Vec<SettingError> {
    let bad = |key: &str, value: String, reason: &str| SettingError::new(key, Some(value), reason);
    let mut errors = Vec::new();
    if raw.keep_snapshots == 0 {
        let reason = "must be at least 1 (the published snapshot)";
        errors.push(bad("keep_snapshots", "0".into(), reason));
    }
    errors.extend(check_secs("grace_secs", raw.grace_secs, 0, 600));
    if !(0.0..=1.0).contains(&raw.max_delete_fraction) {
        let value = raw.max_delete_fraction.to_string();
        let reason = "must be between 0.0 and 1.0, e.g. 0.5";
        errors.push(bad("max_delete_fraction", value, reason));
    }
    if !(1..=256).contains(&raw.concurrency) {
        let value = raw.concurrency.to_string();
        errors.push(bad(
            "concurrency",
            value,
            "must be between 1 and 256, e.g. 8",
        ));
    }
    errors.extend(check_secs("deadline_secs", raw.deadline_secs, 1, 240));
    errors
}

/// Checks that `value`, found at the `*_secs` key `key`, is between `min` and [`MAX_SECS`].
/// `example` is a typical value, named in the message.
fn check_secs(key: &str, value: u64, min: u64, example: u64) -> Option<SettingError> {
    let reason = if value < min {
        format!("must be at least {min}, e.g. {example}")
    } else if value > MAX_SECS {
        format!("must be between {min} and {MAX_SECS_TEXT}, e.g. {example}")
    } else {
        return None;
    };
    Some(SettingError::new(key, Some(value.to_string()), reason))
}

/// Returns the documented range of a whole-number key of the section, for messages about a
/// value of the wrong type or sign (see [`with_range`]).
fn documented_range(key: &str) -> Option<&'static str> {
    match key.rsplit('.').next()? {
        "interval_secs" | "max_lag_secs" | "deadline_secs" => Some("from 1 to 315360000"),
        "jitter_secs" | "grace_secs" => Some("from 0 to 315360000"),
        "keep_snapshots" => Some("of 1 or more"),
        "concurrency" => Some("from 1 to 256"),
        _ => None,
    }
}

fn source(value: toml::Value, dir: &Path) -> Result<SourceSettings, Vec<SettingError>> {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .map(str::to_string);
    match kind.as_deref() {
        Some("directory") => directory_source(parse(value)?, dir),
        Some("s3") => s3_source(parse(value)?),
        _ => Err(vec![SettingError::new(
            "kind",
            value.get("kind").map(render),
            "must be \"directory\" or \"s3\"",
        )]),
    }
}

/// Validates a directory source.
///
/// A `path` that does not exist is accepted: the run that finds it missing fails, and the
/// next run tries again. This lets a job read another job's `latest` before that job's first
/// run has made it, and keeps one job's missing source from stopping every other job. An
/// existing `path` that is not a directory is an error.
fn directory_source(raw: RawDirectory, dir: &Path) -> Result<SourceSettings, Vec<SettingError>> {
    let written = Some(render_str(&raw.path));
    if raw.path.trim().is_empty() {
        let reason = "must name a directory, e.g. \"/srv/rsync/concelier/latest\"";
        return Err(vec![SettingError::new("path", written, reason)]);
    }
    let path = dir.join(&raw.path);
    if let Ok(meta) = std::fs::metadata(&path) {
        if !meta.is_dir() {
            let reason = "is not a directory; point path at the directory that holds one \
                          export (its mirror/ tree)";
            return Err(vec![SettingError::new("path", written, reason)]);
        }
    }
    Ok(SourceSettings::Directory { path })
}

fn s3_source(raw: RawS3) -> Result<SourceSettings, Vec<SettingError>> {
    let mut errors = Vec::new();
    if let Some(endpoint) = &raw.endpoint {
        let plain = endpoint.starts_with("http://");
        if !plain && !endpoint.starts_with("https://") {
            let reason = "must be an http:// or https:// URL";
            errors.push(SettingError::new(
                "endpoint",
                Some(render_str(endpoint)),
                reason,
            ));
        } else if plain && !raw.allow_http {
            let reason = "is plain HTTP; use https://, or set allow_http = true to accept it";
            errors.push(SettingError::new(
                "endpoint",
                Some(render_str(endpoint)),
                reason,
            ));
        }
    }
    if let Some(reason) = bucket_error(&raw.bucket, &raw.prefix) {
        errors.push(SettingError::new(
            "bucket",
            Some(render_str(&raw.bucket)),
            reason,
        ));
    }
    if !errors.is_empty() {
        return Err(errors);
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

/// Tells whether `name` follows the general rules of S3 bucket names: 3 to 63 characters of
/// `a-z`, `0-9`, `.` and `-`, starting and ending with a letter or a digit.
fn is_bucket_name(name: &str) -> bool {
    let edge = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let bytes = name.as_bytes();
    (3..=63).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'.' || *b == b'-')
        && edge(bytes.first())
        && edge(bytes.last())
}

/// Returns why `bucket` is not a bucket name, or `None` when it is one. `prefix` is the
/// source's key prefix, used to suggest the fix for a URL or path written as the bucket.
fn bucket_error(bucket: &str, prefix: &str) -> Option<String> {
    if bucket.is_empty() {
        return Some("must name a bucket".into());
    }
    if is_bucket_name(bucket) {
        return None;
    }
    let rules = "use 3 to 63 characters of a-z 0-9 . -, starting and ending with a letter or \
                 digit";

    let (scheme, rest) = bucket.split_once("://").unwrap_or(("", bucket));
    if scheme.is_empty() && !rest.contains('/') {
        return Some(format!("is not a valid bucket name; {rules}"));
    }
    if !scheme.is_empty() && !scheme.eq_ignore_ascii_case("s3") {
        return Some(format!(
            "is a URL, not a bucket name; put the store's URL in endpoint, the bucket name in \
             bucket and the key prefix in prefix ({rules})"
        ));
    }

    let problem = match scheme.is_empty() {
        true => "contains \"/\", so it is not a bucket name",
        false => "is a URL, not a bucket name",
    };

    let (name, keys) = rest.split_once('/').unwrap_or((rest, ""));
    let mut suggested = keys.trim_start_matches('/').to_string();
    if !suggested.is_empty() && !suggested.ends_with('/') {
        suggested.push('/');
    }
    suggested.push_str(prefix);

    let example = match (is_bucket_name(name), suggested.is_empty()) {
        (false, _) => format!(" ({rules})"),
        (true, true) => format!(", e.g. bucket = {name:?}"),
        (true, false) => format!(", e.g. bucket = {name:?} and prefix = {suggested:?}"),
    };
    Some(format!(
        "{problem}; put the bucket name in bucket and the rest in prefix{example}"
    ))
}

/// Checks a job's `destination` (`written` is its value as written) on its own and against the job's source:
/// it must not be the file system root, and it must neither be, lie inside nor contain a
/// directory source.
fn check_destination(
    destination: &Path,
    source: Option<&SourceSettings>,
    written: &str,
) -> Vec<SettingError> {
    let bad = |reason: String| {
        vec![SettingError::new(
            "destination",
            Some(written.into()),
            reason,
        )]
    };
    if is_root(destination) {
        return bad(
            "is the file system root; the destination must be a directory of its own, because \
             a run creates and removes entries in it, e.g. \"/var/lib/mirror-data/concelier\""
                .into(),
        );
    }
    let Some(SourceSettings::Directory { path }) = source else {
        return Vec::new();
    };
    let source = path.display();
    let reason = match relation(destination, path) {
        None => return Vec::new(),
        Some(Relation::Same) => format!(
            "is also the job's source.path ({source:?}), so a run would copy its own \
             snapshots; point destination at a directory outside the source"
        ),
        Some(Relation::Inside) => format!(
            "is inside the job's source.path ({source:?}), so each run would copy the \
             snapshots of the runs before it; point destination at a directory outside the \
             source"
        ),
        Some(Relation::Contains) => format!(
            "contains the job's source.path ({source:?}); the destination holds only the \
             job's snapshots, so move the source out of it"
        ),
    };
    bad(reason)
}

/// Checks the jobs against each other: each job needs a destination of its own, and no
/// destination may be or lie inside another job's directory source, which that job would then
/// copy. Keys are relative to `sync.jobs`.
fn check_jobs(jobs: &[JobPlace]) -> Vec<SettingError> {
    let mut errors = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let key = format!("{}.destination", job.name);
        let written = Some(render_str(&job.destination.display().to_string()));
        let earlier = jobs[..i]
            .iter()
            .find(|other| relation(&job.destination, &other.destination) == Some(Relation::Same));
        if let Some(other) = earlier {
            let reason = format!(
                "is also the destination of job {} ({:?}); give each job a directory of its own",
                other.name,
                other.destination.display().to_string(),
            );
            errors.push(SettingError::new(&key, written.clone(), reason));
        }
        for other in jobs.iter().filter(|other| other.name != job.name) {
            let Some(path) = &other.source_dir else {
                continue;
            };
            let place = match relation(&job.destination, path) {
                Some(Relation::Same) => "is",
                Some(Relation::Inside) => "is inside",
                _ => continue,
            };
            let reason = format!(
                "{place} the source.path of job {} ({:?}), so that job would copy this job's \
                 snapshots; point destination at a directory outside every directory source",
                other.name,
                path.display().to_string(),
            );
            errors.push(SettingError::new(&key, written.clone(), reason));
        }
    }
    errors
}

/// Position of one path relative to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Relation {
    Same,
    Inside,
    Contains,
}

/// Returns how path `a` lies relative to path `b`: the same directory, inside it, containing
/// it, or apart (`None`). Both their lexical forms (see [`lexical`]) and their resolved forms
/// (see [`resolved`]) are compared, and the closer relation wins.
fn relation(a: &Path, b: &Path) -> Option<Relation> {
    let of = |a: &Path, b: &Path| {
        if a == b {
            Some(Relation::Same)
        } else if a.starts_with(b) {
            Some(Relation::Inside)
        } else if b.starts_with(a) {
            Some(Relation::Contains)
        } else {
            None
        }
    };
    let by_text = of(&lexical(a), &lexical(b));
    let by_file = resolved(a).zip(resolved(b)).and_then(|(a, b)| of(&a, &b));
    by_text.into_iter().chain(by_file).min()
}

/// Returns `path` made absolute (against the working directory when relative), with `.`
/// components and trailing slashes left out and each `..` removing the component before it.
/// Symlinks are not resolved, so this is the path as written.
fn lexical(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut out = PathBuf::new();
    for component in absolute.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Returns the lexical form of `path` (see [`lexical`]) with its longest existing ancestor
/// replaced by the canonical path of that ancestor, so that symlinks there are resolved.
/// Returns `None` when not even the root can be resolved.
fn resolved(path: &Path) -> Option<PathBuf> {
    let lexical = lexical(path);
    let mut existing = lexical.as_path();
    let mut missing = Vec::new();
    loop {
        if let Ok(real) = std::fs::canonicalize(existing) {
            return Some(
                missing
                    .iter()
                    .rev()
                    .fold(real, |path, name| path.join(name)),
            );
        }
        missing.push(existing.file_name()?);
        existing = existing.parent()?;
    }
}

/// Tells whether `path` names the file system root, as written or once resolved.
fn is_root(path: &Path) -> bool {
    lexical(path).parent().is_none() || resolved(path).is_some_and(|p| p.parent().is_none())
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

/// Returns the pins of the gateway's config file at `path`, read with the overrides in `env`
/// as the gateway reads it.
fn read_gateway_pins(
    path: &Path,
    env: &[(String, String)],
) -> Result<Vec<(PathBuf, String)>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let file = path.display().to_string();
    // A variable that cannot be applied stops the gateway, which reports it. The pins come
    // from the variables that can be applied.
    let (table, _, _) = config_file::parse_document(&text, &file, env.iter().cloned())
        .map_err(|e| format!("{} is not valid TOML: {}", path.display(), e.reason))?;
    let dir = path.parent().unwrap_or(Path::new(""));
    Ok(gateway_pins(&table, dir))
}

/// Tells whether two paths name the same directory (see [`relation`]).
fn same_dir(a: &Path, b: &Path) -> bool {
    relation(a, b) == Some(Relation::Same)
}

fn render_str(value: &str) -> String {
    format!("{value:?}")
}

fn within_settings(parent: &str, errors: Vec<SettingError>) -> Vec<SettingError> {
    errors.into_iter().map(|e| e.within(parent)).collect()
}

/// Builds the errors of one document: each names the variable that set its key, else the
/// file.
struct Report<'a> {
    file: String,
    sources: &'a Sources,
}

impl Report<'_> {
    /// Places `errors` under the key `parent`. A type error of a whole-number key also names
    /// the key's documented range.
    fn within(&self, parent: &str, errors: Vec<SettingError>) -> Vec<ConfigError> {
        errors
            .into_iter()
            .map(|e| {
                let e = e.within(parent);
                let reason = match documented_range(&e.key) {
                    Some(range) => with_range(&e.reason, range),
                    None => e.reason,
                };
                self.error(&e.key, e.value, reason)
            })
            .collect()
    }

    fn error(&self, key: &str, value: Option<String>, reason: String) -> ConfigError {
        ConfigError::new(self.sources.source_of(key, &self.file), key, value, reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "/etc/mg/sync.toml";

    /// A job reading a directory that no test creates.
    const JOB: &str = r#"
[sync.jobs.concelier]
destination = "/var/lib/mg-test/concelier"
source = { kind = "directory", path = "/srv/mg-test/concelier/latest" }
"#;

    fn errors_of(text: &str) -> Vec<String> {
        load_str(text, Path::new(FILE), &[])
            .expect_err("invalid")
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    /// Returns the config text of one directory job.
    fn dir_job(name: &str, destination: &Path, source: &Path) -> String {
        format!(
            "[sync.jobs.{name}]\ndestination = {:?}\nsource = {{ kind = \"directory\", path = {:?} }}\n",
            destination.display().to_string(),
            source.display().to_string(),
        )
    }

    /// Returns the config text of one S3 job with `source` as the inline source table's keys.
    fn s3_job(source: &str) -> String {
        format!("[sync.jobs.c]\ndestination = \"/var/lib/mg-test/c\"\nsource = {{ kind = \"s3\", {source} }}\n")
    }

    #[test]
    fn huge_interval_rejected() {
        let text = format!("[sync]\ninterval_secs = 9223372036854775807\njitter_secs = 0\n{JOB}");
        let errors = errors_of(&text);
        assert_eq!(
            errors,
            [format!(
                "{FILE}: sync.interval_secs = 9223372036854775807: must be between 1 and \
                 315360000 (10 years), e.g. 300"
            )]
        );
    }

    #[test]
    fn every_secs_key_capped() {
        let over = MAX_SECS + 1;
        let cases = [
            (
                format!("[sync]\njitter_secs = {over}\n{JOB}"),
                "sync.jitter_secs",
            ),
            (
                format!("[sync]\nmax_lag_secs = {over}\n{JOB}"),
                "sync.max_lag_secs",
            ),
            (
                format!("{JOB}grace_secs = {over}\n"),
                "sync.jobs.concelier.grace_secs",
            ),
            (
                format!("{JOB}deadline_secs = {over}\n"),
                "sync.jobs.concelier.deadline_secs",
            ),
        ];
        for (text, key) in cases {
            let errors = errors_of(&text);
            let expected = format!("{key} = {over}: must be between");
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert!(errors[0].contains(&expected), "{errors:?}");
            assert!(errors[0].contains("315360000 (10 years)"), "{errors:?}");
        }
    }

    #[test]
    fn secs_at_cap_accepted() {
        let text = format!(
            "[sync]\ninterval_secs = {MAX_SECS}\njitter_secs = 0\nmax_lag_secs = {MAX_SECS}\n\
             {JOB}grace_secs = {MAX_SECS}\ndeadline_secs = {MAX_SECS}\n"
        );
        let config = load_str(&text, Path::new(FILE), &[]).expect("valid");
        assert_eq!(config.interval, Duration::from_secs(MAX_SECS));
        assert_eq!(config.jobs[0].grace, Duration::from_secs(MAX_SECS));
    }

    #[test]
    fn max_secs_text_matches() {
        assert!(MAX_SECS_TEXT.starts_with(&format!("{MAX_SECS} ")));
        assert_eq!(documented_range("grace_secs"), Some("from 0 to 315360000"));
    }

    #[test]
    fn negative_secs_names_range() {
        let errors = errors_of(&format!("[sync]\ninterval_secs = -1\n{JOB}"));
        assert!(
            errors[0].contains("expected a whole number from 1 to 315360000"),
            "{errors:?}"
        );
    }

    #[test]
    fn every_error_reported() {
        let text = format!(
            "[sync]\ninterval_secs = 300\njitter_secs = 500\n{JOB}concurrency = 0\n\
             keep_snapshots = 0\npinned = [\"latest\", \"old\"]\n"
        );
        let errors = errors_of(&text);
        let expected = [
            "sync.jitter_secs = 500: must be less than interval_secs (300)",
            "sync.jobs.concelier.keep_snapshots = 0: must be at least 1",
            "sync.jobs.concelier.concurrency = 0: must be between 1 and 256",
            "sync.jobs.concelier.pinned[0] = \"latest\": is not an export id",
            "sync.jobs.concelier.pinned[1] = \"old\": is not an export id",
        ];
        assert_eq!(errors.len(), expected.len(), "{errors:?}");
        for part in expected {
            assert!(
                errors.iter().any(|e| e.contains(part)),
                "{part}: {errors:?}"
            );
        }
    }

    #[test]
    fn section_and_job_errors_together() {
        let text = format!("[sync]\ninterval_secs = \"often\"\n{JOB}keep_snapshots = 0\n");
        let errors = errors_of(&text);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].contains("sync.interval_secs"), "{errors:?}");
        assert!(errors[1].contains("keep_snapshots = 0"), "{errors:?}");
    }

    #[test]
    fn section_not_table_rejected() {
        let errors = errors_of("sync = 5\n");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("sync = 5: must be a table"),
            "{errors:?}"
        );
    }

    #[test]
    fn jobs_not_table_reported_with_schedule() {
        let errors = errors_of("[sync]\ninterval_secs = 0\njobs = 5\n");
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].contains("sync.interval_secs = 0"), "{errors:?}");
        assert!(errors[1].contains("sync.jobs = 5"), "{errors:?}");
    }

    #[test]
    fn errors_of_every_job_reported() {
        let second = JOB
            .replace("concelier", "excititor")
            .replace("kind = \"directory\"", "kind = \"ftp\"");
        let text = format!("{JOB}deadline_secs = 0\n{second}");
        let errors = errors_of(&text);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].contains("concelier.deadline_secs = 0"),
            "{errors:?}"
        );
        assert!(errors[1].contains("excititor.source.kind"), "{errors:?}");
    }

    #[test]
    fn duplicate_destination_rejected() {
        let source = Path::new("/srv/mg-test/source");
        for twin in [
            "/tmp/mg-test/x/d/",
            "/tmp/mg-test/x/./d",
            "/tmp/mg-test/x/y/../d",
        ] {
            let text = format!(
                "{}{}",
                dir_job("a", Path::new("/tmp/mg-test/x/d"), source),
                dir_job("b", Path::new(twin), source)
            );
            let errors = errors_of(&text);
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert!(
                errors[0].contains(&format!(
                    "sync.jobs.b.destination = {twin:?}: is also the destination of job a \
                     (\"/tmp/mg-test/x/d\")"
                )),
                "{errors:?}"
            );
        }
    }

    #[test]
    fn duplicate_destination_of_invalid_jobs_reported() {
        let source = Path::new("/srv/mg-test/source");
        let text = format!(
            "{}keep_snapshots = 0\n{}",
            dir_job("a", Path::new("/tmp/mg-test/x/d"), source),
            s3_job("bucket = \"s3://mirror/concelier\"")
                .replace("/var/lib/mg-test/c", "/tmp/mg-test/x/d/")
        );
        let errors = errors_of(&text);
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].contains("a.keep_snapshots = 0"), "{errors:?}");
        assert!(errors[1].contains("c.source.bucket"), "{errors:?}");
        assert!(
            errors[2].contains(
                "c.destination = \"/tmp/mg-test/x/d/\": is also the destination of job a"
            ),
            "{errors:?}"
        );
    }

    #[test]
    fn duplicate_destination_through_symlink_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = dir.path().join("real");
        std::fs::create_dir(&real).expect("mkdir");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        let source = Path::new("/srv/mg-test/source");
        let text = format!(
            "{}{}",
            dir_job("a", &real, source),
            dir_job("b", &link, source)
        );
        let errors = errors_of(&text);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("is also the destination of job a"),
            "{errors:?}"
        );
    }

    #[test]
    fn destination_in_own_source_rejected() {
        let cases = [
            ("/s/mg-test/src/dest", "is inside the job's source.path"),
            ("/s/mg-test/src/", "is also the job's source.path"),
            ("/s/mg-test", "contains the job's source.path"),
        ];
        for (destination, reason) in cases {
            let text = dir_job("a", Path::new(destination), Path::new("/s/mg-test/src"));
            let errors = errors_of(&text);
            assert_eq!(errors.len(), 1, "{errors:?}");
            let expected = format!("sync.jobs.a.destination = {destination:?}: {reason}");
            assert!(errors[0].contains(&expected), "{errors:?}");
        }
    }

    #[test]
    fn destination_in_own_source_through_symlink_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("source");
        std::fs::create_dir(&source).expect("mkdir");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&source, &link).expect("symlink");
        let errors = errors_of(&dir_job("a", &link.join("dest"), &source));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("is inside the job's source.path"),
            "{errors:?}"
        );
    }

    #[test]
    fn destination_in_other_source_rejected() {
        let text = format!(
            "{}{}",
            dir_job("a", Path::new("/d/mg-test/a"), Path::new("/srv/mg-test")),
            dir_job("b", Path::new("/srv/mg-test/b"), Path::new("/srv/other"))
        );
        let errors = errors_of(&text);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains(
                "sync.jobs.b.destination = \"/srv/mg-test/b\": is inside the source.path of job \
                 a (\"/srv/mg-test\")"
            ),
            "{errors:?}"
        );
    }

    #[test]
    fn source_in_other_destination_accepted() {
        // The second job reads the first job's `latest`.
        let text = format!(
            "{}{}",
            dir_job("a", Path::new("/d/mg-test/a"), Path::new("/srv/mg-test")),
            dir_job(
                "b",
                Path::new("/d/mg-test/b"),
                Path::new("/d/mg-test/a/latest")
            )
        );
        let config = load_str(&text, Path::new(FILE), &[]).expect("valid");
        assert_eq!(config.jobs.len(), 2);
    }

    #[test]
    fn root_destination_rejected() {
        for root in ["/", "/tmp/..", "//"] {
            let text = dir_job("a", Path::new(root), Path::new("/srv/mg-test/source"));
            let errors = errors_of(&text);
            assert_eq!(errors.len(), 1, "{errors:?}");
            let expected = format!(
                "sync.jobs.a.destination = {root:?}: is the file system root; the destination \
                 must be a directory of its own"
            );
            assert!(errors[0].contains(&expected), "{errors:?}");
        }
    }

    #[test]
    fn bucket_url_rejected_with_split() {
        let errors = errors_of(&s3_job("bucket = \"s3://mirror/concelier\""));
        assert_eq!(
            errors,
            [format!(
                "{FILE}: sync.jobs.c.source.bucket = \"s3://mirror/concelier\": is a URL, not a \
                 bucket name; put the bucket name in bucket and the rest in prefix, e.g. \
                 bucket = \"mirror\" and prefix = \"concelier/\""
            )]
        );
    }

    #[test]
    fn bucket_path_rejected_with_split() {
        let errors = errors_of(&s3_job(
            "bucket = \"mirror/concelier\", prefix = \"latest/\"",
        ));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains(
                "contains \"/\", so it is not a bucket name; put the bucket name in bucket and \
                 the rest in prefix, e.g. bucket = \"mirror\" and prefix = \"concelier/latest/\""
            ),
            "{errors:?}"
        );
    }

    #[test]
    fn bucket_https_url_names_endpoint() {
        let errors = errors_of(&s3_job("bucket = \"https://s3.example.com/mirror\""));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("put the store's URL in endpoint"),
            "{errors:?}"
        );
    }

    #[test]
    fn bucket_names_checked() {
        let long = "a".repeat(64);
        for bad in [
            "ab",
            "Mirror",
            "-mirror",
            "mirror-",
            "mirror_x",
            "mirror.",
            long.as_str(),
        ] {
            let errors = errors_of(&s3_job(&format!("bucket = {bad:?}")));
            assert_eq!(errors.len(), 1, "{bad}: {errors:?}");
            let expected = format!("source.bucket = {bad:?}: is not a valid bucket name");
            assert!(errors[0].contains(&expected), "{errors:?}");
        }
        let longest = "a".repeat(63);
        for good in [
            "abc",
            "stella-mirror",
            "a.b.c",
            "0mirror9",
            longest.as_str(),
        ] {
            let text = s3_job(&format!("bucket = {good:?}"));
            assert!(load_str(&text, Path::new(FILE), &[]).is_ok(), "{good}");
        }
    }

    #[test]
    fn bucket_and_endpoint_errors_together() {
        let errors = errors_of(&s3_job("bucket = \"B\", endpoint = \"ftp://store\""));
        assert_eq!(errors.len(), 2, "{errors:?}");
    }

    #[test]
    fn source_file_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("index.json");
        std::fs::write(&file, "{}").expect("write");
        let errors = errors_of(&dir_job("a", &dir.path().join("dest"), &file));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains(&format!(
                "sync.jobs.a.source.path = {:?}: is not a directory",
                file.display().to_string()
            )),
            "{errors:?}"
        );
    }

    #[test]
    fn missing_source_accepted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = dir_job("a", &dir.path().join("dest"), &dir.path().join("missing"));
        assert!(load_str(&text, Path::new(FILE), &[]).is_ok());
    }

    #[test]
    fn empty_source_path_rejected() {
        let errors = errors_of(&JOB.replace("/srv/mg-test/concelier/latest", ""));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("source.path = \"\": must name a directory"),
            "{errors:?}"
        );
    }
}
