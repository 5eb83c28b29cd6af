//! Reading a fill while it is written: readers follow the temp file up to the announced length.

use std::any::Any;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::cache::storage::HandleHit;
use pingora::cache::trace::SpanHandle;
use pingora::cache::{CacheKey, Storage};
use pingora::{Error, ErrorType, Result};
use tokio::sync::watch;

use super::files::blocking_io;

/// Largest chunk read from the file at once.
const READ_CHUNK: u64 = 256 * 1024;

/// How far a fill got, in body bytes flushed to its temp file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TailProgress {
    Writing(u64),
    Done(u64),
    /// The fill failed; the body will never be complete.
    Aborted,
}

/// Where a fill's body is written and how far it got.
#[derive(Debug, Clone)]
pub struct FileTap {
    pub path: PathBuf,
    /// Offset of the body in the file.
    pub body_offset: u64,
    pub progress: watch::Receiver<TailProgress>,
}

impl FileTap {
    /// Opens a reader at the start of the body. The file stays readable through the open
    /// descriptor after the fill renames it into place.
    pub fn reader(&self) -> std::io::Result<TailHit> {
        Ok(TailHit {
            file: Arc::new(File::open(&self.path)?),
            body_offset: self.body_offset,
            progress: self.progress.clone(),
            position: 0,
        })
    }
}

/// A hit that streams a body while its fill is still running; an aborted fill is an error,
/// never a clean end.
pub struct TailHit {
    file: Arc<File>,
    body_offset: u64,
    progress: watch::Receiver<TailProgress>,
    /// Body bytes handed out so far.
    position: u64,
}

#[async_trait]
impl HandleHit for TailHit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        loop {
            let progress = *self.progress.borrow_and_update();
            let available = match progress {
                TailProgress::Aborted => return aborted(),
                TailProgress::Writing(n) | TailProgress::Done(n) => n,
            };
            if self.position < available {
                let len = (available - self.position).min(READ_CHUNK);
                let (file, offset) = (Arc::clone(&self.file), self.body_offset + self.position);
                let chunk = blocking_io(move || {
                    let mut buf = vec![0; len as usize];
                    file.read_exact_at(&mut buf, offset)?;
                    Ok(buf)
                })
                .await
                .map_err(|e| {
                    Error::because(ErrorType::ReadError, "disk cache: reading a fill", e)
                })?;
                self.position += len;
                return Ok(Some(Bytes::from(chunk)));
            }
            if matches!(progress, TailProgress::Done(_)) {
                return Ok(None);
            }
            if self.progress.changed().await.is_err()
                && !matches!(*self.progress.borrow(), TailProgress::Done(_))
            {
                return aborted();
            }
        }
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        Ok(())
    }

    fn should_count_access(&self) -> bool {
        false
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

fn aborted() -> Result<Option<Bytes>> {
    Error::e_explain(
        ErrorType::ReadError,
        "the cache fill this response streams from was aborted",
    )
}
