//! Reading a fill while it is written: readers follow the temp file up to the announced length.
//!
//! The reader of the request that fills can also take the rest of the body from a [`Relay`]
//! when the disk copy fails, so that this request still sends the whole response.

use std::any::Any;
use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use pingora::cache::storage::HandleHit;
use pingora::cache::trace::SpanHandle;
use pingora::cache::{CacheKey, Storage};
use pingora::{Error, ErrorType, Result};
use tokio::sync::{watch, Notify};

use super::files::blocking_io;

/// Largest chunk read from the file at once.
const READ_CHUNK: u64 = 256 * 1024;

/// Maximum body bytes a [`Relay`] keeps queued for its reader. The filling request's reader
/// takes them only as fast as its client reads, while the origin's body keeps arriving, and
/// nothing else bounds the difference. A relay that would queue more fails, cutting that
/// client's response off with an error.
pub const RELAY_MAX_BYTES: usize = 64 << 20;

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
    /// descriptor after the fill renames it into place, or deletes it.
    pub fn reader(&self) -> std::io::Result<TailHit> {
        Ok(TailHit {
            file: Arc::new(File::open(&self.path)?),
            body_offset: self.body_offset,
            progress: self.progress.clone(),
            position: 0,
            relay: None,
        })
    }

    /// Opens a reader like [`Self::reader`] that goes on with `relay` when the disk copy
    /// fails. Only the first reader of a relay gets it; later ones are plain readers.
    pub fn reader_with_relay(&self, relay: &Arc<Relay>) -> std::io::Result<TailHit> {
        let mut reader = self.reader()?;
        if !relay.claimed.swap(true, Ordering::AcqRel) {
            reader.relay = Some(Arc::clone(relay));
        }
        Ok(reader)
    }
}

/// The body of a fill after its disk copy failed, kept in memory for the reader of the
/// request that fills. That reader reads the temp file up to where the copy failed, through
/// its open descriptor, then takes the chunks queued here.
#[derive(Default)]
pub struct Relay {
    state: Mutex<RelayState>,
    changed: Notify,
    /// Whether a reader took this relay.
    claimed: AtomicBool,
}

#[derive(Default)]
struct RelayState {
    /// Body bytes that the temp file contains for the reader; `None` while the disk copy works.
    diverted_at: Option<u64>,
    chunks: VecDeque<Bytes>,
    queued_bytes: usize,
    /// `Some(true)` once the body is complete, `Some(false)` when the fill failed.
    complete: Option<bool>,
}

impl Relay {
    /// Returns whether a reader took this relay, and so reads what is pushed to it.
    pub fn claimed(&self) -> bool {
        self.claimed.load(Ordering::Acquire)
    }

    /// Notes that the disk copy failed after `on_disk` body bytes, which the temp file contains.
    /// Call it before the fill's readers learn of the failure.
    pub fn divert(&self, on_disk: u64) {
        self.state.lock().diverted_at.get_or_insert(on_disk);
        self.changed.notify_waiters();
    }

    /// Queues the next chunk of the body. Returns `false`, failing the relay, when the reader
    /// is more than [`RELAY_MAX_BYTES`] behind.
    pub fn push(&self, chunk: Bytes) -> bool {
        let mut state = self.state.lock();
        if state.complete.is_some() {
            return false;
        }
        let accepted = state.queued_bytes + chunk.len() <= RELAY_MAX_BYTES;
        if accepted {
            state.queued_bytes += chunk.len();
            state.chunks.push_back(chunk);
        } else {
            state.chunks.clear();
            state.queued_bytes = 0;
            state.complete = Some(false);
        }
        drop(state);
        self.changed.notify_waiters();
        accepted
    }

    /// Ends the body: complete, or failed. A relay ends once.
    pub fn end(&self, complete: bool) {
        self.state.lock().complete.get_or_insert(complete);
        self.changed.notify_waiters();
    }

    fn diverted_at(&self) -> Option<u64> {
        self.state.lock().diverted_at
    }

    /// Takes the next queued chunk, waiting for one; `None` at the end of a complete body.
    async fn next_chunk(&self) -> Result<Option<Bytes>> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before the state is checked, so a change after the check wakes it.
            notified.as_mut().enable();
            {
                let mut state = self.state.lock();
                if let Some(chunk) = state.chunks.pop_front() {
                    state.queued_bytes -= chunk.len();
                    return Ok(Some(chunk));
                }
                match state.complete {
                    Some(true) => return Ok(None),
                    Some(false) => return aborted(),
                    None => {}
                }
            }
            notified.await;
        }
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
    /// The source of the rest of the body when the disk copy fails. Only the filling request's
    /// reader has one.
    relay: Option<Arc<Relay>>,
}

impl TailHit {
    /// Reads the next chunk of at most [`READ_CHUNK`] bytes of the body from the file, ending
    /// before body offset `available`.
    async fn read_file(&mut self, available: u64) -> Result<Bytes> {
        let len = (available - self.position).min(READ_CHUNK);
        let (file, offset) = (Arc::clone(&self.file), self.body_offset + self.position);
        let chunk = blocking_io(move || {
            let mut buf = vec![0; len as usize];
            file.read_exact_at(&mut buf, offset)?;
            Ok(buf)
        })
        .await
        .map_err(|e| Error::because(ErrorType::ReadError, "disk cache: reading a fill", e))?;
        self.position += len;
        Ok(Bytes::from(chunk))
    }

    /// Returns the relay when the disk copy failed and the body goes on there.
    fn diverted(&self) -> Option<(Arc<Relay>, u64)> {
        let relay = self.relay.as_ref()?;
        let at = relay.diverted_at()?;
        Some((Arc::clone(relay), at))
    }
}

#[async_trait]
impl HandleHit for TailHit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        loop {
            if let Some((relay, on_disk)) = self.diverted() {
                if self.position < on_disk {
                    return self.read_file(on_disk).await.map(Some);
                }
                return relay.next_chunk().await;
            }
            let progress = *self.progress.borrow_and_update();
            let available = match progress {
                // The relay is diverted before the fill announces its failure.
                TailProgress::Aborted if self.diverted().is_some() => continue,
                TailProgress::Aborted => return aborted(),
                TailProgress::Writing(n) | TailProgress::Done(n) => n,
            };
            if self.position < available {
                return self.read_file(available).await.map(Some);
            }
            if matches!(progress, TailProgress::Done(_)) {
                return Ok(None);
            }
            if self.progress.changed().await.is_err()
                && !matches!(*self.progress.borrow(), TailProgress::Done(_))
                && self.diverted().is_none()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns a tap on a temp file whose body (from offset 0) is `body`, announced in full.
    fn tap_on(dir: &std::path::Path, body: &[u8]) -> (FileTap, watch::Sender<TailProgress>) {
        let path = dir.join("fill.tmp");
        std::fs::write(&path, body).expect("write");
        let (sender, progress) = watch::channel(TailProgress::Writing(body.len() as u64));
        let tap = FileTap {
            path,
            body_offset: 0,
            progress,
        };
        (tap, sender)
    }

    #[tokio::test]
    async fn relay_continues_after_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tap, sender) = tap_on(dir.path(), b"on disk");
        let relay = Arc::new(Relay::default());
        let mut owner = tap.reader_with_relay(&relay).expect("owner");
        let mut waiter = tap.reader_with_relay(&relay).expect("waiter");
        assert!(relay.claimed());

        relay.divert(7);
        sender.send_replace(TailProgress::Aborted);
        assert!(relay.push(Bytes::from_static(b" and after")));
        relay.end(true);

        let first = owner.read_body().await.expect("read");
        assert_eq!(first.as_deref(), Some(&b"on disk"[..]));
        let second = owner.read_body().await.expect("read");
        assert_eq!(second.as_deref(), Some(&b" and after"[..]));
        assert_eq!(owner.read_body().await.expect("end"), None);
        assert!(waiter.read_body().await.is_err(), "a waiter gets the abort");
    }

    #[tokio::test]
    async fn relay_over_limit_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tap, sender) = tap_on(dir.path(), b"");
        let relay = Arc::new(Relay::default());
        let mut owner = tap.reader_with_relay(&relay).expect("owner");
        relay.divert(0);
        drop(sender);
        assert!(relay.push(Bytes::from(vec![0; RELAY_MAX_BYTES])));
        assert!(!relay.push(Bytes::from_static(b"x")), "one byte too many");
        assert!(owner.read_body().await.is_err());
    }

    #[tokio::test]
    async fn aborted_fill_without_divert_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tap, sender) = tap_on(dir.path(), b"part");
        let relay = Arc::new(Relay::default());
        let mut owner = tap.reader_with_relay(&relay).expect("owner");
        sender.send_replace(TailProgress::Aborted);
        relay.end(false);
        assert!(owner.read_body().await.is_err());
    }
}
