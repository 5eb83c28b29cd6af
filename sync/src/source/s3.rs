//! An S3 bucket (or an S3-compatible store) as a source, through `object_store`.
//!
//! Listing is streamed page by page and kept as one small entry per key. `object_store`
//! retries requests that fail with 5xx, 429, timeouts or connection errors, with exponential
//! backoff and jitter. A body cut off mid-download is fetched again here, with the same kind
//! of backoff. Every download carries `If-Match` with the listed ETag, so an
//! object replaced after the listing is noticed and fetched again under its new ETag.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ClientOptions, GetOptions, ObjectStore, RetryConfig};
use rand::Rng;

use super::{aws_profile, write_chunks, Fetched, Listed, Source};
use crate::config::S3Settings;
use crate::error::SyncError;

/// How many times one object is fetched before its download fails.
const MAX_ATTEMPTS: u32 = 4;

/// Timing of requests and retries.
#[derive(Debug, Clone)]
pub struct S3Tuning {
    /// Retries of one request after a transient failure.
    pub max_retries: usize,
    /// First backoff; it doubles after each retry, with jitter.
    pub init_backoff: Duration,
    /// Longest backoff.
    pub max_backoff: Duration,
    /// No retry starts later than this after the first attempt.
    pub retry_timeout: Duration,
    /// Limit for one request, body included.
    pub request_timeout: Duration,
}

impl Default for S3Tuning {
    fn default() -> Self {
        Self {
            max_retries: 6,
            init_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            retry_timeout: Duration::from_secs(120),
            request_timeout: Duration::from_secs(600),
        }
    }
}

/// Reads objects under a prefix of one bucket.
#[derive(Clone)]
pub struct S3Source {
    store: Arc<AmazonS3>,
    bucket: String,
    /// The prefix with one trailing `/`, or empty for the whole bucket.
    prefix: String,
    tuning: S3Tuning,
}

impl S3Source {
    /// Builds a client for `settings`, with credentials from `env`.
    ///
    /// Credentials are looked up as the AWS tools do: `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`), else the profile `AWS_PROFILE` of the
    /// shared credentials file, else web identity (`AWS_WEB_IDENTITY_TOKEN_FILE`,
    /// `AWS_ROLE_ARN`), the container endpoint, then instance metadata. Other `AWS_*`
    /// variables that `object_store` reads are applied first, and `settings` override them.
    pub fn new(
        settings: &S3Settings,
        env: &[(String, String)],
        tuning: S3Tuning,
    ) -> Result<Self, String> {
        let mut builder = AmazonS3Builder::new();
        for (key, value) in env.iter().filter(|(k, _)| k.starts_with("AWS_")) {
            if let Ok(config_key) = key.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
                builder = builder.with_config(config_key, value);
            }
        }
        let has_env_keys = env.iter().any(|(k, _)| k == "AWS_ACCESS_KEY_ID");
        if !has_env_keys {
            if let Some(creds) = aws_profile::from_env(env)? {
                builder = builder
                    .with_access_key_id(creds.access_key_id)
                    .with_secret_access_key(creds.secret_access_key);
                if let Some(token) = creds.session_token {
                    builder = builder.with_token(token);
                }
            }
        }
        builder = builder
            .with_bucket_name(&settings.bucket)
            .with_virtual_hosted_style_request(!settings.path_style)
            .with_retry(retry_config(&tuning))
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(settings.allow_http)
                    .with_timeout(tuning.request_timeout)
                    .with_connect_timeout(Duration::from_secs(10)),
            );
        if let Some(region) = &settings.region {
            builder = builder.with_region(region);
        }
        if let Some(endpoint) = &settings.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        let store = builder
            .build()
            .map_err(|e| format!("S3 client for bucket {:?}: {e}", settings.bucket))?;
        let prefix = settings.prefix.trim_matches('/');
        Ok(Self {
            store: Arc::new(store),
            bucket: settings.bucket.clone(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            tuning,
        })
    }

    async fn fetch_once(
        &self,
        location: &ObjectPath,
        etag: &str,
        dest: &Path,
    ) -> Result<Fetched, Attempt> {
        let options = GetOptions {
            if_match: real_etag(etag).map(str::to_string),
            ..GetOptions::default()
        };
        let result = match self.store.get_opts(location, options).await {
            Ok(result) => result,
            Err(object_store::Error::Precondition { .. }) => return Err(Attempt::Replaced),
            Err(e @ object_store::Error::NotFound { .. }) => {
                return Err(Attempt::Missing(with_hint(&e)))
            }
            Err(e) => return Err(Attempt::Fatal(with_hint(&e))),
        };
        let expected = result.meta.size;
        let etag = result
            .meta
            .e_tag
            .clone()
            .unwrap_or_else(|| etag.to_string());
        let (size, sha256) = write_chunks(dest, result.into_stream())
            .await
            .map_err(Attempt::Transient)?;
        if size != expected {
            return Err(Attempt::Transient(format!(
                "got {size} bytes of {expected}"
            )));
        }
        Ok(Fetched { size, etag, sha256 })
    }
}

impl S3Source {
    /// Returns the error of a failed or cut-short listing of this source.
    fn listing_error(&self, reason: String) -> SyncError {
        SyncError::Listing {
            source_name: self.name(),
            reason,
        }
    }

    /// Asks the store for the keys after `last`, the last key of a finished listing, and
    /// fails when there are any.
    ///
    /// The client ends a listing at the first page without a continuation token, even when
    /// the page marks itself as truncated (a store or proxy that drops the token). Such a
    /// listing would look complete, and the files after it would be deleted.
    async fn check_listing_end(
        &self,
        prefix: Option<&ObjectPath>,
        last: &ObjectPath,
    ) -> Result<(), SyncError> {
        let listing_err = |reason| self.listing_error(reason);
        let mut after = self.store.list_with_offset(prefix, last);
        match after.next().await {
            None => Ok(()),
            Some(Err(e)) => Err(listing_err(format!(
                "checking that the listing was complete failed: {}",
                with_hint(&e)
            ))),
            Some(Ok(next)) => Err(listing_err(format!(
                "the listing ended at {last:?}, but the store lists {:?} after it: a page was \
                 cut short (a store or proxy that drops continuation tokens), or the key was \
                 uploaded during the listing; run the sync again, and if this recurs check \
                 the store or the proxy in front of it",
                next.location.as_ref(),
                last = last.as_ref(),
            ))),
        }
    }
}

/// Shows the bucket and prefix only: the client's configuration includes credentials.
impl std::fmt::Debug for S3Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Source")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Source for S3Source {
    fn name(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    async fn list(&self) -> Result<Vec<Listed>, SyncError> {
        let listing_err = |reason| self.listing_error(reason);
        let prefix = match self.prefix.is_empty() {
            true => None,
            false => Some(ObjectPath::parse(&self.prefix).map_err(|e| listing_err(e.to_string()))?),
        };
        let mut stream = self.store.list(prefix.as_ref());
        let mut out = Vec::new();
        let mut last = None;
        while let Some(item) = stream.next().await {
            let meta = item.map_err(|e| match listed_key_error(&e) {
                Some(key) => SyncError::InvalidKey {
                    key: key.strip_prefix(&self.prefix).unwrap_or(&key).to_owned(),
                    reason: "has a `.`, `..` or empty segment, which could escape the snapshot",
                },
                None => listing_err(with_hint(&e)),
            })?;
            let location = meta.location.as_ref();
            last = Some(meta.location.clone());
            // A zero-length `prefix/` object is the folder marker of the prefix itself (what
            // a console's "create folder" makes); the client lists it without its slash.
            if meta.size == 0 && self.prefix.strip_suffix('/') == Some(location) {
                continue;
            }
            let Some(key) = location.strip_prefix(&self.prefix) else {
                return Err(listing_err(format!(
                    "key {location:?} is outside the prefix {:?}",
                    self.prefix
                )));
            };
            if key.is_empty() {
                continue;
            }
            let etag = match &meta.e_tag {
                Some(etag) => etag.clone(),
                None => format!("modified-{}", meta.last_modified.to_rfc3339()),
            };
            let modified = meta.last_modified.timestamp();
            out.push(Listed::new(key, meta.size, &etag).with_modified(modified));
        }
        if let Some(last) = last {
            self.check_listing_end(prefix.as_ref(), &last).await?;
        }
        Ok(out)
    }

    async fn fetch(&self, entry: &Listed, dest: &Path) -> Result<Fetched, SyncError> {
        let download_err = |reason: String| SyncError::Download {
            key: entry.key.to_string(),
            reason,
        };
        let location = ObjectPath::parse(format!("{}{}", self.prefix, entry.key))
            .map_err(|e| download_err(e.to_string()))?;
        let mut etag = entry.etag.to_string();
        let mut last = String::new();
        for attempt in 1..=MAX_ATTEMPTS {
            match self.fetch_once(&location, &etag, dest).await {
                Ok(fetched) => return Ok(fetched),
                Err(Attempt::Fatal(reason)) => return Err(download_err(reason)),
                // The client lists a key ending in `/` without its slash, so a GET of the
                // shortened key finds nothing. Only an empty object can be such a marker.
                Err(Attempt::Missing(reason)) if entry.size == 0 => {
                    return Err(download_err(format!(
                        "{reason}; or the key ends in `/` (an empty folder object with no \
                         files under it), which the S3 client lists without its slash: \
                         delete that object at the source"
                    )))
                }
                Err(Attempt::Missing(reason)) => return Err(download_err(reason)),
                Err(Attempt::Replaced) => {
                    let meta = self.store.head(&location).await.map_err(|e| {
                        download_err(format!("replaced after the listing, then HEAD failed: {e}"))
                    })?;
                    tracing::warn!(key = %entry.key, attempt, "object replaced after the listing; fetching its new version");
                    etag = meta.e_tag.unwrap_or_default();
                    last = "the object kept being replaced".to_string();
                }
                Err(Attempt::Transient(reason)) => {
                    let pause = backoff(&self.tuning, attempt);
                    tracing::warn!(key = %entry.key, attempt, error = %reason, ?pause, "download failed; retrying");
                    tokio::time::sleep(pause).await;
                    last = reason;
                }
            }
        }
        Err(download_err(format!("{last} ({MAX_ATTEMPTS} attempts)")))
    }
}

/// The failure kinds of one download attempt.
enum Attempt {
    /// The ETag no longer matches: fetch the new version.
    Replaced,
    /// The object is not there (any more).
    Missing(String),
    /// The body broke off or was short: try again after a pause.
    Transient(String),
    /// `object_store` already retried, or retrying cannot help.
    Fatal(String),
}

fn retry_config(tuning: &S3Tuning) -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: tuning.init_backoff,
            max_backoff: tuning.max_backoff,
            base: 2.0,
        },
        max_retries: tuning.max_retries,
        retry_timeout: tuning.retry_timeout,
    }
}

/// Returns the pause before attempt `attempt + 1`: exponential, capped, with full jitter
/// between half and all of it.
fn backoff(tuning: &S3Tuning, attempt: u32) -> Duration {
    let base = tuning.init_backoff.saturating_mul(1 << attempt.min(16));
    let capped = base.min(tuning.max_backoff);
    capped.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
}

/// Returns the ETag to send in `If-Match`, or `None` for the listing's stand-in tag.
fn real_etag(etag: &str) -> Option<&str> {
    (!etag.is_empty() && !etag.starts_with("modified-")).then_some(etag)
}

/// Returns the text of `error` with what to do about the common S3 failures.
fn with_hint(error: &object_store::Error) -> String {
    let text = error.to_string();
    let has = |code: &str| text.contains(code);
    let hint = if has("NoSuchBucket") {
        Some("check `bucket`, and `region` or `endpoint`")
    } else if has("SignatureDoesNotMatch")
        || has("InvalidAccessKeyId")
        || has("AccessDenied")
        || has("ExpiredToken")
        || matches!(
            error,
            object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }
        )
    {
        Some(
            "check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the \
             profile AWS_PROFILE names) and that they may list and read the bucket",
        )
    } else if has("NoSuchKey") || matches!(error, object_store::Error::NotFound { .. }) {
        Some("the object was deleted after the listing; run the sync again")
    } else {
        None
    };
    match hint {
        Some(hint) => format!("{text}; {hint}"),
        None => text,
    }
}

/// Returns the key of a listed object that the S3 client rejected as a path (a `.` or `..`
/// segment, an empty segment), so that the error names the key like other hostile keys.
fn listed_key_error(error: &object_store::Error) -> Option<String> {
    use object_store::path::Error as PathError;
    match error {
        object_store::Error::InvalidPath {
            source: PathError::EmptySegment { path } | PathError::BadSegment { path, .. },
        } => Some(path.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::with_hint;

    fn generic(message: &str) -> object_store::Error {
        object_store::Error::Generic {
            store: "S3",
            source: message.to_string().into(),
        }
    }

    #[test]
    fn hints_name_the_fix() {
        let cases = [
            (
                "403 Forbidden: <Code>SignatureDoesNotMatch</Code>",
                "check the credentials",
            ),
            ("404 Not Found: <Code>NoSuchBucket</Code>", "check `bucket`"),
            (
                "404 Not Found: <Code>NoSuchKey</Code>",
                "deleted after the listing",
            ),
        ];
        for (message, hint) in cases {
            let text = with_hint(&generic(message));
            assert!(text.contains(message), "{text}");
            assert!(text.contains(hint), "{text}");
        }
        assert_eq!(
            with_hint(&generic("timed out")),
            "Generic S3 error: timed out"
        );
    }
}
