//! Basic authentication against an Apache htpasswd file.
//!
//! # Formats
//!
//! Each entry is `user:hash`. Accepted hashes are bcrypt (`$2y$`, `$2a$`, `$2b$`, as made by
//! `htpasswd -B`), Apache MD5 (`$apr1$`, `htpasswd -m`) and base-64 SHA-1 (`{SHA}`,
//! `htpasswd -s`). Any other format (plain text, crypt(3) DES, `$5$`/`$6$` SHA-crypt) and any
//! malformed hash fails closed, so that user cannot log in. Each such line is logged as a
//! warning once per load of the file, with its line number and user name but never its hash. Blank
//! lines, `#` comments, CRLF line ends and surrounding whitespace are ignored. When a user
//! appears twice, the first line applies.
//!
//! # Caching
//!
//! A successful check is remembered for `cache_ttl_secs`, keyed by a SHA-256 of the raw
//! `Authorization` value and the file's generation, for at most `cache_entries` credentials:
//! a remembered check costs microseconds, where a bcrypt check costs milliseconds and runs on
//! the blocking thread pool. Failures are never remembered. An unknown user is checked against
//! a stand-in hash of the same kind and cost as the file's first usable entry, so it takes as
//! long as a wrong password.
//!
//! # Reload
//!
//! On the request path, at most once per `reload_check_ms`, the file's inode, size and
//! modification time are compared with those of the loaded file. A change loads the file
//! again, starts a new generation and empties the cache. A file modified less than two seconds
//! ago is read again even with unchanged metadata, since coarse modification times can hide a
//! second write; its contents are compared by digest. A file that disappears, cannot be read or
//! is not UTF-8 leaves the previous users in place, and the error is logged once per change.

mod apr1;
mod file;
mod header;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, StatusCode};
use parking_lot::Mutex;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tracing::{debug, error, info, warn};

use crate::settings::{self, render, SettingError};
use crate::watched_file::FileStamp;
use crate::{BuildContext, LocalResponse, Plugin, RequestInfo, RequestState, Verdict};
use file::{LineIssue, Snapshot, Users};
use header::Credentials;

/// Label recorded in [`RequestState::rejected_by`] for requests this plugin turns away.
pub const REJECTED_BY: &str = "htpasswd";

/// Maximum number of line warnings logged per load of a file. The rest are counted in one
/// summary warning.
const MAX_LOGGED_ISSUES: usize = 50;

/// Builds the plugin from its settings table, loading the file once.
///
/// A file that cannot be read is an error on the key `file`, so the gateway does not start
/// without its users.
pub fn build(
    settings: toml::Value,
    ctx: &BuildContext<'_>,
) -> Result<Arc<dyn Plugin>, Vec<SettingError>> {
    Ok(Arc::new(Htpasswd::new(settings, ctx)?))
}

/// The `htpasswd` plugin: admits requests whose Basic credentials match the file.
pub struct Htpasswd {
    domain: String,
    path: PathBuf,
    challenge: HeaderValue,
    reload_every: Duration,
    current: ArcSwap<Generation>,
    reload: Mutex<ReloadState>,
    cache: VerifiedCache,
    /// Bounds the password checks that run at once on the blocking pool.
    check_slots: Arc<Semaphore>,
    /// Password checks done, cache hits excluded.
    checks: AtomicU64,
}

/// Result of one call of [`Htpasswd::check_reload`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The last check was less than `reload_check_ms` ago, or another request is checking.
    NotDue,
    /// The file contains what was loaded.
    Unchanged,
    /// The file changed and was loaded; `users` counts the users who can log in.
    Reloaded { users: usize },
    /// The file could not be loaded and the previous users stay. `logged` is true for the
    /// check that logged the error, the first one after each change.
    Failed { logged: bool },
}

impl Htpasswd {
    /// Builds the plugin from its settings table, like [`build`], keeping the concrete type.
    pub fn new(settings: toml::Value, ctx: &BuildContext<'_>) -> Result<Self, Vec<SettingError>> {
        let settings: Settings = settings::parse(settings)?;
        let path = ctx.resolve(&settings.file);
        let challenge = challenge_value(&settings.realm);
        let snapshot = file::read_snapshot(&path).map_err(|err| file_error(&settings, &path, &err));
        let (challenge, snapshot) = match (challenge, snapshot) {
            (Ok(challenge), Ok(snapshot)) => (challenge, snapshot),
            (challenge, snapshot) => {
                return Err(challenge.err().into_iter().chain(snapshot.err()).collect());
            }
        };
        let (users, issues) = file::parse(&snapshot.text);
        log_issues(ctx.domain, &path, &issues);
        info!(domain = ctx.domain, file = %path.display(), users = users.usable(),
            "htpasswd file loaded");
        warn_if_no_users(ctx.domain, &path, users.usable());
        let slots = std::thread::available_parallelism().map_or(4, NonZeroUsize::get);
        Ok(Self {
            domain: ctx.domain.to_owned(),
            path,
            challenge,
            reload_every: Duration::from_millis(settings.reload_check_ms),
            current: ArcSwap::from_pointee(Generation { number: 0, users }),
            reload: Mutex::new(ReloadState::new(&snapshot)),
            cache: VerifiedCache::new(
                settings.cache_entries,
                Duration::from_secs(settings.cache_ttl_secs),
            ),
            check_slots: Arc::new(Semaphore::new(slots)),
            checks: AtomicU64::new(0),
        })
    }

    /// Returns the user whose Basic credentials the request carries, or `None` for a request
    /// to turn away: no or several `Authorization` headers, an unusable value, an unknown user
    /// or a wrong password.
    ///
    /// Checks the file for changes first (see [`Self::check_reload`]). `now` dates cache
    /// entries and reload checks.
    pub async fn authenticate(&self, headers: &HeaderMap, now: Instant) -> Option<String> {
        self.check_reload(now);
        let mut values = headers.get_all(AUTHORIZATION).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            debug!(domain = %self.domain, "no single Authorization header");
            return None;
        };
        // Only values that passed a check are cached, so a hit needs no parsing.
        let current = self.current.load_full();
        let key = cache_key(value.as_bytes(), current.number);
        if let Some(user) = self.cache.get(&key, now) {
            return Some(user);
        }
        let credentials = match header::parse_basic(value.as_bytes()) {
            Ok(credentials) => credentials,
            Err(reason) => {
                debug!(domain = %self.domain, %reason, "unusable Authorization header");
                return None;
            }
        };
        let user = credentials.user.clone();
        if self.check_password(Arc::clone(&current), credentials).await {
            self.cache.insert(key, user.clone(), now, current.number);
            Some(user)
        } else {
            debug!(domain = %self.domain, user = ?user, "wrong user name or password");
            None
        }
    }

    /// Loads the file again if its metadata changed since it was loaded, at most once per
    /// `reload_check_ms` measured on `now`.
    ///
    /// A file that cannot be loaded leaves the previous users in place and logs an error once
    /// per change.
    pub fn check_reload(&self, now: Instant) -> ReloadOutcome {
        let Some(mut state) = self.reload.try_lock() else {
            return ReloadOutcome::NotDue;
        };
        if let Some(last) = state.last_check {
            if now.saturating_duration_since(last) < self.reload_every {
                return ReloadOutcome::NotDue;
            }
        }
        state.last_check = Some(now);
        let stamp = match std::fs::metadata(&self.path) {
            Ok(meta) => FileStamp::of(&meta),
            Err(err) => return self.fail(&mut state, FailureKey::Stat(err.kind()), &err),
        };
        if stamp == state.stamp && !stamp.is_unsettled(SystemTime::now()) {
            self.recover(&mut state);
            return ReloadOutcome::Unchanged;
        }
        match file::read_snapshot(&self.path) {
            Ok(snapshot) => self.apply(&mut state, snapshot),
            Err(err) => self.fail(&mut state, FailureKey::Load(stamp), &err),
        }
    }

    /// Returns the path of the htpasswd file, resolved against the config file's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Counts the users of the loaded file who can log in.
    pub fn user_count(&self) -> usize {
        self.current.load().users.usable()
    }

    /// Builds the 401 response with a Basic challenge.
    fn challenge(&self) -> LocalResponse {
        LocalResponse::text(
            StatusCode::UNAUTHORIZED,
            "401 Unauthorized: valid credentials are required\n",
        )
        .with_header(WWW_AUTHENTICATE, self.challenge.clone())
    }

    /// Checks a password on the blocking pool; bcrypt costs milliseconds of CPU.
    async fn check_password(&self, current: Arc<Generation>, credentials: Credentials) -> bool {
        self.checks.fetch_add(1, Ordering::Relaxed);
        let Ok(permit) = Arc::clone(&self.check_slots).acquire_owned().await else {
            return false;
        };
        let check = move || {
            let _permit = permit;
            let password = credentials.password.as_bytes();
            current.users.verify(&credentials.user, password)
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => runtime.spawn_blocking(check).await.unwrap_or(false),
            Err(_) => check(),
        }
    }

    /// Installs a newly read file unless its contents are those already loaded.
    fn apply(&self, state: &mut ReloadState, snapshot: Snapshot) -> ReloadOutcome {
        state.stamp = snapshot.stamp;
        if snapshot.digest == state.digest {
            self.recover(state);
            return ReloadOutcome::Unchanged;
        }
        let (users, issues) = file::parse(&snapshot.text);
        log_issues(&self.domain, &self.path, &issues);
        let usable = users.usable();
        state.digest = snapshot.digest;
        state.generation += 1;
        state.failure = None;
        let number = state.generation;
        self.current.store(Arc::new(Generation { number, users }));
        self.cache.reset(number);
        info!(domain = %self.domain, file = %self.path.display(), users = usable,
            generation = number, "htpasswd file reloaded");
        warn_if_no_users(&self.domain, &self.path, usable);
        ReloadOutcome::Reloaded { users: usable }
    }

    /// Logs a failed reload unless the same failure was logged last.
    fn fail(
        &self,
        state: &mut ReloadState,
        key: FailureKey,
        err: &dyn fmt::Display,
    ) -> ReloadOutcome {
        let logged = state.failure.as_ref() != Some(&key);
        if logged {
            error!(domain = %self.domain, file = %self.path.display(),
                "cannot reload htpasswd file: {err}; the users loaded before stay in place");
            state.failure = Some(key);
        }
        ReloadOutcome::Failed { logged }
    }

    /// Notes that the loaded file is readable again after a failure.
    fn recover(&self, state: &mut ReloadState) {
        if state.failure.take().is_some() {
            info!(domain = %self.domain, file = %self.path.display(),
                "htpasswd file is readable again and unchanged");
        }
    }
}

#[async_trait]
impl Plugin for Htpasswd {
    fn name(&self) -> &'static str {
        "htpasswd"
    }

    /// Records the user and continues, or responds 401 with a Basic challenge.
    async fn request_filter(&self, req: &RequestInfo<'_>, state: &mut RequestState) -> Verdict {
        match self.authenticate(req.headers, Instant::now()).await {
            Some(user) => {
                state.user = Some(user);
                Verdict::Continue
            }
            None => {
                state.rejected_by = Some(REJECTED_BY);
                Verdict::Respond(self.challenge())
            }
        }
    }
}

/// The plugin's settings table.
#[derive(Debug, Deserialize)]
struct Settings {
    file: PathBuf,
    #[serde(default = "default_realm")]
    realm: String,
    #[serde(default = "default_cache_ttl_secs")]
    cache_ttl_secs: u64,
    #[serde(default = "default_cache_entries")]
    cache_entries: usize,
    #[serde(default = "default_reload_check_ms")]
    reload_check_ms: u64,
}

fn default_realm() -> String {
    "Stella Ops mirror".to_owned()
}

fn default_cache_ttl_secs() -> u64 {
    300
}

fn default_cache_entries() -> usize {
    10_000
}

fn default_reload_check_ms() -> u64 {
    1_000
}

/// The users of one load of the file.
struct Generation {
    /// Counts loads; part of every cache key.
    number: u64,
    users: Users,
}

/// State of the reload check, kept between calls.
struct ReloadState {
    last_check: Option<Instant>,
    stamp: FileStamp,
    digest: [u8; 32],
    generation: u64,
    /// The failure logged last, cleared once the file loads again.
    failure: Option<FailureKey>,
}

impl ReloadState {
    fn new(snapshot: &Snapshot) -> Self {
        Self {
            last_check: None,
            stamp: snapshot.stamp,
            digest: snapshot.digest,
            generation: 0,
            failure: None,
        }
    }
}

/// Tells one reload failure from another, so that each is logged once.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FailureKey {
    /// The file's metadata could not be read (it is gone, say).
    Stat(io::ErrorKind),
    /// The file with this stamp could not be read or parsed.
    Load(FileStamp),
}

/// Successful checks remembered for a while, bounded in number.
struct VerifiedCache {
    capacity: usize,
    ttl: Duration,
    inner: Mutex<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    /// The file generation whose checks may be stored.
    generation: u64,
    users: HashMap<[u8; 32], (String, Instant)>,
    /// Keys in insertion order with their insertion time, oldest first.
    order: VecDeque<([u8; 32], Instant)>,
}

impl VerifiedCache {
    fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            capacity,
            ttl,
            inner: Mutex::new(CacheInner::default()),
        }
    }

    /// Returns the user remembered under `key` if it was stored less than the TTL before `now`.
    fn get(&self, key: &[u8; 32], now: Instant) -> Option<String> {
        let inner = self.inner.lock();
        let (user, stored) = inner.users.get(key)?;
        (now.saturating_duration_since(*stored) < self.ttl).then(|| user.clone())
    }

    /// Remembers a successful check of `generation`, dropping expired entries and then the
    /// oldest ones to stay within capacity. Checks of an older generation are not stored.
    fn insert(&self, key: [u8; 32], user: String, now: Instant, generation: u64) {
        if self.capacity == 0 || self.ttl.is_zero() {
            return;
        }
        let mut inner = self.inner.lock();
        if inner.generation != generation {
            return;
        }
        while let Some(&(old_key, stored)) = inner.order.front() {
            let expired = now.saturating_duration_since(stored) >= self.ttl;
            if !expired && inner.order.len() < self.capacity {
                break;
            }
            inner.order.pop_front();
            if inner
                .users
                .get(&old_key)
                .is_some_and(|(_, at)| *at == stored)
            {
                inner.users.remove(&old_key);
            }
        }
        inner.users.insert(key, (user, now));
        inner.order.push_back((key, now));
    }

    /// Forgets every entry and accepts only checks of `generation` from now on.
    fn reset(&self, generation: u64) {
        let mut inner = self.inner.lock();
        inner.users.clear();
        inner.order.clear();
        inner.generation = generation;
    }
}

/// Hashes the raw header value with the generation, so a new file never hits old entries.
fn cache_key(value: &[u8], generation: u64) -> [u8; 32] {
    Sha256::new()
        .chain_update(value)
        .chain_update(generation.to_le_bytes())
        .finalize()
        .into()
}

/// Builds the `WWW-Authenticate` value, rejecting realms that would break its quoting.
fn challenge_value(realm: &str) -> Result<HeaderValue, SettingError> {
    let invalid = |reason: &str| {
        let shown = render(&toml::Value::String(realm.to_owned()));
        SettingError::new("realm", Some(shown), reason)
    };
    if realm
        .chars()
        .any(|c| c == '"' || c == '\\' || c.is_control())
    {
        return Err(invalid(
            "contains `\"`, `\\` or a control character; use plain text",
        ));
    }
    HeaderValue::from_str(&format!("Basic realm=\"{realm}\", charset=\"UTF-8\""))
        .map_err(|_| invalid("cannot be sent in a header; use plain text"))
}

/// Reports an unloadable file on the key `file`, naming the path it resolved to.
fn file_error(settings: &Settings, path: &Path, err: &file::LoadError) -> SettingError {
    let shown = render(&toml::Value::String(settings.file.display().to_string()));
    let reason = format!("cannot load htpasswd file {}: {err}", path.display());
    SettingError::new("file", Some(shown), reason)
}

/// Warns that a loaded file has no user who can log in: an emptied or half-copied file would
/// otherwise show only as 401s.
fn warn_if_no_users(domain: &str, path: &Path, usable: usize) {
    if usable == 0 {
        warn!(domain, file = %path.display(),
            "htpasswd file has no usable users, so every request that needs a login gets 401; \
             add users with `htpasswd -B FILE USER`, or fix the lines reported above");
    }
}

/// Logs each line of a freshly loaded file that gives no usable entry.
fn log_issues(domain: &str, path: &Path, issues: &[LineIssue]) {
    for issue in issues.iter().take(MAX_LOGGED_ISSUES) {
        let user = issue.user.as_deref().unwrap_or("");
        warn!(domain, file = %path.display(), line = issue.line, user = ?user,
            "htpasswd line ignored: {}", issue.problem);
    }
    if let Some(more) = issues
        .len()
        .checked_sub(MAX_LOGGED_ISSUES)
        .filter(|n| *n > 0)
    {
        warn!(domain, file = %path.display(), "{more} more htpasswd lines ignored");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use std::fs;

    // Lines made with `htpasswd -nbs sam pw2` and `htpasswd -nbm amy pw1`.
    const SAM: &str = "sam:{SHA}8Wyi36Noi/CMek4hVErxW9WYy3A=";
    const AMY: &str = "amy:$apr1$Oc37A.hY$i2ql/lh/lsFjguB64sjzO0";
    const SEC: Duration = Duration::from_secs(1);

    struct Fixture {
        dir: tempfile::TempDir,
        path: PathBuf,
    }

    fn fixture(text: &str) -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("users");
        fs::write(&path, text).expect("write users");
        Fixture { dir, path }
    }

    fn table(text: &str) -> toml::Value {
        toml::Value::Table(text.parse::<toml::Table>().expect("valid TOML"))
    }

    fn try_plugin(fx: &Fixture, settings: &str) -> Result<Htpasswd, Vec<SettingError>> {
        let ctx = BuildContext {
            domain: "test",
            config_dir: fx.dir.path(),
        };
        Htpasswd::new(table(&format!("file = \"users\"\n{settings}")), &ctx)
    }

    fn plugin(fx: &Fixture, settings: &str) -> Htpasswd {
        try_plugin(fx, settings).expect("plugin")
    }

    fn error_keys(fx: &Fixture, settings: &str) -> Vec<String> {
        let errors = try_plugin(fx, settings).err().expect("setting errors");
        errors.into_iter().map(|e| e.key).collect()
    }

    fn basic(user: &str, password: &str) -> HeaderMap {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let mut headers = HeaderMap::new();
        let value = HeaderValue::from_str(&format!("Basic {token}")).expect("header value");
        headers.insert(AUTHORIZATION, value);
        headers
    }

    async fn login(p: &Htpasswd, user: &str, password: &str, now: Instant) -> Option<String> {
        p.authenticate(&basic(user, password), now).await
    }

    fn checks(p: &Htpasswd) -> u64 {
        p.checks.load(Ordering::Relaxed)
    }

    fn cached(p: &Htpasswd) -> usize {
        p.cache.inner.lock().users.len()
    }

    #[test]
    fn settings_defaults() {
        let fx = fixture(SAM);
        let p = plugin(&fx, "");
        assert_eq!(p.reload_every, SEC);
        assert_eq!(p.cache.ttl, Duration::from_secs(300));
        assert_eq!(p.cache.capacity, 10_000);
    }

    #[test]
    fn settings_challenge_names_realm() {
        let fx = fixture(SAM);
        let p = plugin(&fx, "realm = \"Lab\"");
        let expected = "Basic realm=\"Lab\", charset=\"UTF-8\"";
        assert_eq!(p.challenge, expected);
    }

    #[test]
    fn settings_reject_unknown_key() {
        assert_eq!(error_keys(&fixture(SAM), "colour = 1"), ["colour"]);
    }

    #[test]
    fn settings_reject_quote_in_realm() {
        assert_eq!(error_keys(&fixture(SAM), "realm = 'a\"b'"), ["realm"]);
    }

    #[test]
    fn settings_reject_control_in_realm() {
        assert_eq!(error_keys(&fixture(SAM), "realm = \"a\\nb\""), ["realm"]);
    }

    #[test]
    fn settings_report_missing_file_with_path() {
        let fx = fixture(SAM);
        fs::remove_file(&fx.path).expect("remove");
        let errors = try_plugin(&fx, "").err().expect("setting errors");
        assert_eq!(errors[0].key, "file");
        let shown = fx.path.display().to_string();
        assert!(errors[0].reason.contains(&shown), "{}", errors[0].reason);
    }

    #[test]
    fn settings_report_file_and_realm_together() {
        let fx = fixture(SAM);
        fs::remove_file(&fx.path).expect("remove");
        assert_eq!(error_keys(&fx, "realm = '\"'"), ["realm", "file"]);
    }

    #[test]
    fn settings_reject_non_utf8_file() {
        let fx = fixture("");
        fs::write(&fx.path, b"sam:\xff\n").expect("write");
        assert_eq!(error_keys(&fx, ""), ["file"]);
    }

    #[test]
    fn build_returns_named_plugin() {
        let fx = fixture(SAM);
        let ctx = BuildContext {
            domain: "test",
            config_dir: fx.dir.path(),
        };
        let built = build(table("file = \"users\""), &ctx).expect("plugin");
        assert_eq!(built.name(), "htpasswd");
    }

    #[tokio::test]
    async fn authenticate_accepts_right_password() {
        let fx = fixture(SAM);
        let p = plugin(&fx, "");
        assert_eq!(
            login(&p, "sam", "pw2", Instant::now()).await.as_deref(),
            Some("sam")
        );
    }

    #[tokio::test]
    async fn authenticate_rejects_wrong_password() {
        let fx = fixture(SAM);
        let p = plugin(&fx, "");
        assert_eq!(login(&p, "sam", "pw1", Instant::now()).await, None);
    }

    #[tokio::test]
    async fn authenticate_checks_unknown_user() {
        let fx = fixture(SAM);
        let p = plugin(&fx, "");
        assert_eq!(login(&p, "nobody", "pw2", Instant::now()).await, None);
        assert_eq!(checks(&p), 1);
    }

    #[tokio::test]
    async fn authenticate_rejects_missing_header() {
        let fx = fixture(SAM);
        let p = plugin(&fx, "");
        assert_eq!(
            p.authenticate(&HeaderMap::new(), Instant::now()).await,
            None
        );
        assert_eq!(checks(&p), 0);
    }

    #[tokio::test]
    async fn authenticate_rejects_repeated_header() {
        let fx = fixture(SAM);
        let p = plugin(&fx, "");
        let mut headers = basic("sam", "pw2");
        let copy = headers[AUTHORIZATION].clone();
        headers.append(AUTHORIZATION, copy);
        assert_eq!(p.authenticate(&headers, Instant::now()).await, None);
    }

    #[tokio::test]
    async fn request_filter_sets_user() {
        let fx = fixture(AMY);
        let p = plugin(&fx, "");
        let headers = basic("amy", "pw1");
        let mut state = RequestState::default();
        let verdict = p.request_filter(&request(&headers), &mut state).await;
        assert!(matches!(verdict, Verdict::Continue));
        assert_eq!(state.user.as_deref(), Some("amy"));
    }

    #[tokio::test]
    async fn request_filter_challenges() {
        let fx = fixture(AMY);
        let p = plugin(&fx, "");
        let headers = basic("amy", "nope");
        let mut state = RequestState::default();
        let Verdict::Respond(resp) = p.request_filter(&request(&headers), &mut state).await else {
            panic!("expected a 401");
        };
        assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
        let challenge = resp
            .headers
            .iter()
            .find(|(name, _)| name == WWW_AUTHENTICATE);
        let expected = "Basic realm=\"Stella Ops mirror\", charset=\"UTF-8\"";
        assert_eq!(
            challenge.map(|(_, v)| v.as_bytes()),
            Some(expected.as_bytes())
        );
        assert_eq!(state.rejected_by, Some(REJECTED_BY));
        assert_eq!(state.user, None);
    }

    fn request(headers: &HeaderMap) -> RequestInfo<'_> {
        RequestInfo {
            domain: "test",
            method: &http::Method::GET,
            path: "/concelier/exports/index.json",
            query: None,
            headers,
            client_addr: None,
            received: std::time::Instant::now(),
        }
    }

    #[tokio::test]
    async fn cache_hit_skips_check() {
        let fx = fixture(SAM);
        let p = plugin(&fx, "");
        let t0 = Instant::now();
        login(&p, "sam", "pw2", t0).await;
        let again = login(&p, "sam", "pw2", t0 + SEC).await;
        assert_eq!(again.as_deref(), Some("sam"));
        assert_eq!(checks(&p), 1);
    }

    #[tokio::test]
    async fn cache_entry_lives_until_ttl() {
        let fx = fixture(SAM);
        let p = plugin(&fx, "cache_ttl_secs = 10");
        let t0 = Instant::now();
        login(&p, "sam", "pw2", t0).await;
        login(&p, "sam", "pw2", t0 + 9 * SEC).await;
        assert_eq!(checks(&p), 1);
        login(&p, "sam", "pw2", t0 + 10 * SEC).await;
        assert_eq!(checks(&p), 2);
    }

    #[tokio::test]
    async fn cache_ignores_failures() {
        let fx = fixture(SAM);
        let p = plugin(&fx, "");
        let t0 = Instant::now();
        login(&p, "sam", "bad", t0).await;
        login(&p, "sam", "bad", t0).await;
        assert_eq!((checks(&p), cached(&p)), (2, 0));
    }

    #[tokio::test]
    async fn cache_zero_ttl_disables() {
        let fx = fixture(SAM);
        let p = plugin(&fx, "cache_ttl_secs = 0");
        let t0 = Instant::now();
        login(&p, "sam", "pw2", t0).await;
        login(&p, "sam", "pw2", t0).await;
        assert_eq!(checks(&p), 2);
    }

    #[tokio::test]
    async fn cache_drops_oldest_when_full() {
        let fx = fixture(&format!("{SAM}\n{AMY}"));
        let p = plugin(&fx, "cache_entries = 1");
        let t0 = Instant::now();
        login(&p, "sam", "pw2", t0).await;
        login(&p, "amy", "pw1", t0 + SEC).await;
        assert_eq!(cached(&p), 1);
        login(&p, "sam", "pw2", t0 + 2 * SEC).await;
        assert_eq!(checks(&p), 3);
    }

    #[tokio::test]
    async fn cache_cleared_on_change() {
        let fx = fixture(SAM);
        let p = plugin(&fx, "");
        let t0 = Instant::now();
        login(&p, "sam", "pw2", t0).await;
        fs::write(&fx.path, format!("{SAM}\n{AMY}\n")).expect("rewrite");
        let outcome = p.check_reload(t0 + 2 * SEC);
        assert_eq!(outcome, ReloadOutcome::Reloaded { users: 2 });
        assert_eq!(cached(&p), 0);
    }

    #[test]
    fn cache_refuses_older_generation() {
        let cache = VerifiedCache::new(10, SEC);
        cache.reset(2);
        cache.insert([1; 32], "sam".into(), Instant::now(), 1);
        assert_eq!(cache.inner.lock().users.len(), 0);
    }

    #[test]
    fn cache_key_depends_on_generation() {
        assert_ne!(cache_key(b"Basic x", 0), cache_key(b"Basic x", 1));
    }

    #[test]
    fn reload_waits_for_interval() {
        let fx = fixture(SAM);
        let p = plugin(&fx, "reload_check_ms = 1000");
        let t0 = Instant::now();
        assert_eq!(p.check_reload(t0), ReloadOutcome::Unchanged);
        let soon = t0 + Duration::from_millis(999);
        assert_eq!(p.check_reload(soon), ReloadOutcome::NotDue);
        assert_eq!(p.check_reload(t0 + SEC), ReloadOutcome::Unchanged);
    }

    #[tokio::test]
    async fn reload_swaps_passwords() {
        let fx = fixture(SAM);
        let p = plugin(&fx, "cache_ttl_secs = 0");
        let t0 = Instant::now();
        fs::write(&fx.path, "sam:{SHA}Sx/p3CumeGNqNvSxKr0/u+VQ3Pc=\n").expect("rewrite");
        assert!(matches!(p.check_reload(t0), ReloadOutcome::Reloaded { .. }));
        assert_eq!(login(&p, "sam", "pw2", t0).await, None);
    }

    fn set_modified(path: &Path, time: SystemTime) {
        let file = fs::File::options().write(true).open(path).expect("open");
        file.set_modified(time).expect("set modification time");
    }

    #[test]
    fn reload_rereads_recent_same_stamp() {
        let fx = fixture(SAM);
        let p = plugin(&fx, "");
        let modified = fs::metadata(&fx.path).and_then(|m| m.modified());
        // Same length, inode and modification time: only the contents differ.
        fs::write(&fx.path, SAM.replace("8Wyi", "9Wyi")).expect("rewrite");
        set_modified(&fx.path, modified.expect("modification time"));
        let outcome = p.check_reload(Instant::now());
        assert_eq!(outcome, ReloadOutcome::Reloaded { users: 1 });
    }

    /// A copy in place that sets the old modification time back (`cp -p`, `rsync --inplace -t`)
    /// keeps inode, length and modification time, but changes the inode change time.
    #[test]
    fn reload_sees_rewrite_with_old_mtime() {
        let fx = fixture(SAM);
        let old = SystemTime::now() - Duration::from_secs(3600);
        set_modified(&fx.path, old);
        let p = plugin(&fx, "");
        fs::write(&fx.path, SAM.replace("8Wyi", "9Wyi")).expect("rewrite");
        set_modified(&fx.path, old);
        let outcome = p.check_reload(Instant::now());
        assert_eq!(outcome, ReloadOutcome::Reloaded { users: 1 });
    }

    #[test]
    fn reload_ignores_same_contents() {
        let fx = fixture(SAM);
        let p = plugin(&fx, "");
        fs::remove_file(&fx.path).expect("remove");
        fs::write(&fx.path, SAM).expect("rewrite");
        assert_eq!(p.check_reload(Instant::now()), ReloadOutcome::Unchanged);
    }

    #[tokio::test]
    async fn reload_keeps_users_when_file_deleted() {
        let fx = fixture(SAM);
        let p = plugin(&fx, "cache_ttl_secs = 0");
        let t0 = Instant::now();
        fs::remove_file(&fx.path).expect("remove");
        assert_eq!(p.check_reload(t0), ReloadOutcome::Failed { logged: true });
        assert_eq!(
            p.check_reload(t0 + SEC),
            ReloadOutcome::Failed { logged: false }
        );
        let user = login(&p, "sam", "pw2", t0 + 2 * SEC).await;
        assert_eq!(user.as_deref(), Some("sam"));
    }

    #[test]
    fn reload_logs_again_after_recovery() {
        let fx = fixture(SAM);
        let p = plugin(&fx, "");
        let t0 = Instant::now();
        fs::remove_file(&fx.path).expect("remove");
        p.check_reload(t0);
        fs::write(&fx.path, AMY).expect("restore");
        assert!(matches!(
            p.check_reload(t0 + SEC),
            ReloadOutcome::Reloaded { .. }
        ));
        fs::remove_file(&fx.path).expect("remove again");
        assert_eq!(
            p.check_reload(t0 + 2 * SEC),
            ReloadOutcome::Failed { logged: true }
        );
    }

    #[test]
    fn reload_keeps_users_when_unreadable() {
        let fx = fixture(SAM);
        let p = plugin(&fx, "");
        let t0 = Instant::now();
        fs::remove_file(&fx.path).expect("remove");
        fs::create_dir(&fx.path).expect("directory in its place");
        assert_eq!(p.check_reload(t0), ReloadOutcome::Failed { logged: true });
        assert_eq!(
            p.check_reload(t0 + SEC),
            ReloadOutcome::Failed { logged: false }
        );
        assert_eq!(p.user_count(), 1);
    }

    #[test]
    fn reload_keeps_users_when_not_utf8() {
        let fx = fixture(SAM);
        let p = plugin(&fx, "");
        fs::write(&fx.path, b"amy:\xff\xfe\n").expect("rewrite");
        assert_eq!(
            p.check_reload(Instant::now()),
            ReloadOutcome::Failed { logged: true }
        );
        assert_eq!(p.user_count(), 1);
    }

    #[test]
    fn reload_counts_only_usable_users() {
        let fx = fixture(SAM);
        let p = plugin(&fx, "");
        fs::write(&fx.path, format!("{AMY}\nplain:secret\n{SAM}\n{SAM}\n")).expect("rewrite");
        let outcome = p.check_reload(Instant::now());
        assert_eq!(outcome, ReloadOutcome::Reloaded { users: 2 });
    }
}
