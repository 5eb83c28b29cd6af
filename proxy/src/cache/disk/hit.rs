//! Reads an entry's body from disk in chunks, checking the body checksum on full reads.

use std::any::Any;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::cache::key::HashBinary;
use pingora::cache::storage::HandleHit;
use pingora::cache::trace::SpanHandle;
use pingora::cache::{CacheKey, Storage};
use pingora::{Error, ErrorType, Result};

use super::files::{blocking_io, io_error};
use super::format::Header;
use super::DiskStorage;

/// Largest chunk read from disk and handed to the downstream writer at once.
const READ_CHUNK: u64 = 256 * 1024;

/// A body reader over an open entry file; seekable, so ranges are served from disk.
///
/// The file stays readable while the reader has it open, even if the entry is evicted or
/// replaced meanwhile.
pub struct DiskHit {
    storage: &'static DiskStorage,
    name: HashBinary,
    file: Arc<File>,
    ino: u64,
    body_offset: u64,
    body_len: u64,
    file_len: u64,
    expected_crc: u32,
    /// Next body offset to read.
    pos: u64,
    /// Body offset where reading stops (exclusive).
    end: u64,
    /// Running checksum while the whole body is being read from its start.
    crc: Option<crc32fast::Hasher>,
}

impl DiskHit {
    /// Creates a reader of the whole body described by `header`.
    pub fn new(
        storage: &'static DiskStorage,
        name: HashBinary,
        file: Arc<File>,
        ino: u64,
        header: &Header,
    ) -> Self {
        Self {
            storage,
            name,
            file,
            ino,
            body_offset: header.body_offset,
            body_len: header.body_len,
            file_len: header.file_len(),
            expected_crc: header.body_crc,
            pos: 0,
            end: header.body_len,
            crc: Some(crc32fast::Hasher::new()),
        }
    }

    /// Returns the length of the entry's whole body.
    pub fn body_len(&self) -> u64 {
        self.body_len
    }

    /// Deletes the entry as corrupt and returns the error that stops this read.
    fn corrupt(&self, reason: &str) -> Box<Error> {
        self.storage.discard(&self.name, self.ino, reason);
        Error::explain(
            ErrorType::FileReadError,
            format!("disk cache: entry deleted, body unusable: {reason}"),
        )
    }
}

#[async_trait]
impl HandleHit for DiskHit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        if self.pos >= self.end {
            return Ok(None);
        }
        let len = (self.end - self.pos).min(READ_CHUNK);
        let file = Arc::clone(&self.file);
        let at = self.body_offset + self.pos;
        let read = blocking_io(move || {
            let mut buf = vec![0; len as usize];
            file.read_exact_at(&mut buf, at).map(|()| buf)
        })
        .await;
        let buf = match read {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(self.corrupt("body is shorter than its header says"))
            }
            Err(e) => {
                let path = self.storage.entry_path(&self.name);
                return Err(io_error(ErrorType::FileReadError, "read", &path, e));
            }
        };
        self.pos += len;
        if let Some(crc) = self.crc.as_mut() {
            crc.update(&buf);
            if self.pos == self.body_len {
                let got = self.crc.take().map(crc32fast::Hasher::finalize);
                if got != Some(self.expected_crc) {
                    return Err(self.corrupt("body checksum mismatch"));
                }
            }
        }
        Ok(Some(Bytes::from(buf)))
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        Ok(())
    }

    fn can_seek(&self) -> bool {
        true
    }

    fn seek(&mut self, start: usize, end: Option<usize>) -> Result<()> {
        let start = start as u64;
        if start >= self.body_len {
            return Error::e_explain(
                ErrorType::InternalError,
                format!(
                    "seek start {start} is past the end of a {}-byte body",
                    self.body_len
                ),
            );
        }
        let end = end.map_or(self.body_len, |e| (e as u64).min(self.body_len));
        self.pos = start;
        self.end = end.max(start);
        // A read of the whole body is checked; a partial one cannot be.
        self.crc = (start == 0 && self.end == self.body_len).then(crc32fast::Hasher::new);
        Ok(())
    }

    fn get_eviction_weight(&self) -> usize {
        usize::try_from(self.file_len).unwrap_or(usize::MAX)
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}
