//! Streams a fill to a temp file and publishes it with an atomic rename when it finishes.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::cache::key::HashBinary;
use pingora::cache::storage::{HandleMiss, MissFinishType};
use pingora::{Error, ErrorType, Result};
use tokio::sync::watch;

use super::files::{self, blocking_io, io_error};
use super::format::{unix_secs, Header};
use super::index::Slot;
use super::tail::{FileTap, TailProgress};
use super::DiskStorage;

/// Bytes buffered before a write reaches the temp file.
const WRITE_BUFFER: usize = 256 * 1024;

/// A fill in progress. Dropping it before `finish` deletes the temp file.
pub struct DiskMiss {
    storage: &'static DiskStorage,
    name: HashBinary,
    tmp: PathBuf,
    header: Option<Header>,
    writer: Option<Writer>,
    /// Body bytes accepted so far.
    written: u64,
    state: State,
    /// Readers following this fill through the temp file; set by [`DiskMiss::tap`], after
    /// which every write is flushed to the file before it is announced.
    tap: Option<watch::Sender<TailProgress>>,
}

/// The temp file and the running body checksum, moved to blocking threads for each write.
struct Writer {
    out: BufWriter<File>,
    crc: crc32fast::Hasher,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// The fill failed; the temp file is already deleted.
    Failed,
    /// The entry was published.
    Done,
}

impl DiskMiss {
    /// Creates the temp file and writes the header placeholder (the body fields are zero).
    pub async fn start(
        storage: &'static DiskStorage,
        name: HashBinary,
        header: Header,
    ) -> Result<Self> {
        let tmp = storage.new_temp_path();
        let path = tmp.clone();
        let head = header.encode();
        let pad = header.body_offset as usize - head.len();
        let created = blocking_io(move || {
            let mut out = BufWriter::with_capacity(WRITE_BUFFER, files::create_temp_file(&path)?);
            out.write_all(&head)?;
            out.write_all(&vec![0; pad])?;
            Ok(out)
        })
        .await;
        match created {
            Ok(out) => Ok(Self {
                storage,
                name,
                tmp,
                header: Some(header),
                writer: Some(Writer {
                    out,
                    crc: crc32fast::Hasher::new(),
                }),
                written: 0,
                state: State::Open,
                tap: None,
            }),
            Err(e) => {
                files::remove_quietly(&tmp);
                storage.note_write_error(&format!("cannot create {}: {e}", tmp.display()));
                Err(io_error(ErrorType::FileCreateError, "create", &tmp, e))
            }
        }
    }

    /// Lets readers follow this fill as it is written: they read the temp file up to the
    /// length announced in the returned tap, and get an error if the fill fails.
    pub fn tap(&mut self) -> FileTap {
        let sender = self
            .tap
            .get_or_insert_with(|| watch::channel(TailProgress::Writing(self.written)).0);
        FileTap {
            path: self.tmp.clone(),
            body_offset: self.header.as_ref().map_or(0, |h| h.body_offset),
            progress: sender.subscribe(),
        }
    }

    fn announce(&self, progress: TailProgress) {
        if let Some(tap) = &self.tap {
            tap.send_replace(progress);
        }
    }

    /// Ends the fill as failed: deletes the temp file and counts the error.
    fn fail(&mut self, reason: &str) {
        self.announce(TailProgress::Aborted);
        if let Some(writer) = self.writer.take() {
            // Drop the buffered bytes without writing them to a file about to be deleted.
            drop(writer.out.into_parts());
        }
        files::remove_quietly(&self.tmp);
        self.state = State::Failed;
        self.storage.note_write_error(reason);
    }

    fn closed_error(&self) -> Box<Error> {
        Error::explain(
            ErrorType::InternalError,
            format!("disk cache: fill of {} already ended", self.tmp.display()),
        )
    }
}

#[async_trait]
impl HandleMiss for DiskMiss {
    async fn write_body(&mut self, data: Bytes, _eof: bool) -> Result<()> {
        if self.state != State::Open {
            return Err(self.closed_error());
        }
        let total = self.written + data.len() as u64;
        if total > self.storage.max_object {
            let reason = format!(
                "body exceeds the disk cache object limit of {} bytes",
                self.storage.max_object
            );
            self.fail(&reason);
            return Error::e_explain(ErrorType::InternalError, format!("disk cache: {reason}"));
        }
        if data.is_empty() {
            return Ok(());
        }
        let Some(mut writer) = self.writer.take() else {
            return Err(self.closed_error());
        };
        let flush = self.tap.is_some();
        let written = blocking_io(move || {
            writer.out.write_all(&data)?;
            writer.crc.update(&data);
            if flush {
                writer.out.flush()?;
            }
            Ok(writer)
        })
        .await;
        match written {
            Ok(writer) => {
                self.writer = Some(writer);
                self.written = total;
                self.announce(TailProgress::Writing(total));
                Ok(())
            }
            Err(e) => {
                self.fail(&format!("cannot write {}: {e}", self.tmp.display()));
                Err(io_error(ErrorType::FileWriteError, "write", &self.tmp, e))
            }
        }
    }

    async fn finish(mut self: Box<Self>) -> Result<MissFinishType> {
        let (Some(writer), Some(header), State::Open) =
            (self.writer.take(), self.header.take(), self.state)
        else {
            return Err(self.closed_error());
        };
        let (storage, name, tmp, written) =
            (self.storage, self.name, self.tmp.clone(), self.written);
        let committed =
            blocking_io(move || commit(storage, name, tmp, writer, header, written)).await;
        match committed {
            Ok(size) => {
                self.state = State::Done;
                self.announce(TailProgress::Done(written));
                Ok(MissFinishType::Created(
                    usize::try_from(size).unwrap_or(usize::MAX),
                ))
            }
            Err(e) => {
                self.fail(&format!("cannot publish {}: {e}", self.tmp.display()));
                Err(io_error(ErrorType::FileWriteError, "publish", &self.tmp, e))
            }
        }
    }
}

impl Drop for DiskMiss {
    fn drop(&mut self) {
        if self.state == State::Open {
            self.announce(TailProgress::Aborted);
            if let Some(writer) = self.writer.take() {
                drop(writer.out.into_parts());
            }
            files::remove_quietly(&self.tmp);
        }
    }
}

/// Completes the header, syncs the temp file, renames it into place and indexes it.
///
/// Returns the entry's file size.
fn commit(
    storage: &'static DiskStorage,
    name: HashBinary,
    tmp: PathBuf,
    writer: Writer,
    mut header: Header,
    written: u64,
) -> io::Result<u64> {
    header.body_len = written;
    header.body_crc = writer.crc.finalize();
    let size = header.file_len();
    if size > storage.budget {
        return Err(io::Error::other(format!(
            "entry of {size} bytes exceeds the disk cache budget of {} bytes",
            storage.budget
        )));
    }

    let file = writer
        .out
        .into_inner()
        .map_err(io::IntoInnerError::into_error)?;
    file.write_all_at(&header.encode(), 0)?;
    file.sync_data()?;
    let md = file.metadata()?;
    if md.len() != size {
        return Err(io::Error::other(format!(
            "temp file is {} bytes, expected {size}",
            md.len()
        )));
    }

    let dst = storage.entry_path(&name);
    if let Some(shard) = dst.parent() {
        files::create_private_dir(shard)?;
    }
    std::fs::rename(&tmp, &dst)?;
    let now = unix_secs(SystemTime::now());
    let slot = Slot::new(
        size,
        md.ino(),
        header.stale_until,
        now,
        Arc::new(header.key),
    );
    storage.publish(name, slot);
    Ok(size)
}
