//! Streams a fill to a temp file and publishes it with an atomic rename when it finishes.

use std::fs::File;
use std::io;
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
use super::room::{out_of_space, Need};
use super::tail::{FileTap, Relay, TailProgress};
use super::DiskStorage;

/// A fill in progress. Dropping it before `finish` deletes the temp file.
pub struct DiskMiss {
    storage: &'static DiskStorage,
    name: HashBinary,
    tmp: PathBuf,
    header: Option<Header>,
    writer: Option<Writer>,
    /// Body bytes accepted so far, all of them written to the temp file.
    written: u64,
    /// The body length the response header announces, when it has one.
    expected: Option<u64>,
    state: State,
    /// Readers following this fill through the temp file; set by [`DiskMiss::tap`].
    tap: Option<watch::Sender<TailProgress>>,
    /// Set by [`DiskMiss::relay_on_failure`]: diverted when the fill fails.
    relay: Option<Arc<Relay>>,
}

/// The temp file and the running body checksum, moved to blocking threads for each write.
struct Writer {
    file: File,
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
    /// `expected` is the body length the response announces, if any, which sets how much room
    /// to make when the filesystem is full.
    pub async fn start(
        storage: &'static DiskStorage,
        name: HashBinary,
        header: Header,
        expected: Option<u64>,
    ) -> Result<Self> {
        let tmp = storage.new_temp_path();
        let path = tmp.clone();
        let mut head = header.encode();
        head.resize(header.body_offset as usize, 0);
        let need = Need {
            file_bytes: header.body_offset + expected.unwrap_or(0),
            remaining: header.body_offset + expected.unwrap_or(0),
        };
        let created = blocking_io(move || {
            let file = create_making_room(storage, &path, need)?;
            storage.write_making_room(&file, &head, 0, need)?;
            Ok(file)
        })
        .await;
        match created {
            Ok(file) => Ok(Self {
                storage,
                name,
                tmp,
                header: Some(header),
                writer: Some(Writer {
                    file,
                    crc: crc32fast::Hasher::new(),
                }),
                written: 0,
                expected,
                state: State::Open,
                tap: None,
                relay: None,
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

    /// Diverts `relay` when a write fails, before the readers learn of the failure, so that
    /// the reader holding the relay goes on with it. The caller pushes the rest of the body
    /// to the relay.
    pub fn relay_on_failure(&mut self, relay: Arc<Relay>) {
        self.relay = Some(relay);
    }

    fn announce(&self, progress: TailProgress) {
        if let Some(tap) = &self.tap {
            tap.send_replace(progress);
        }
    }

    /// Ends the fill as failed: deletes the temp file and counts the error. The readers learn
    /// of it as `progress`: an abort, or the end of a body that is complete although it was
    /// not stored.
    fn fail(&mut self, reason: &str, progress: TailProgress) {
        if let Some(relay) = &self.relay {
            relay.divert(self.written);
        }
        self.announce(progress);
        self.writer = None;
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

    /// Returns the room that a write of `chunk` more body bytes needs.
    fn need(&self, chunk: usize) -> Need {
        let offset = self.header.as_ref().map_or(0, |h| h.body_offset);
        let after = self.written + chunk as u64;
        let body = self.expected.unwrap_or(0).max(after);
        Need {
            file_bytes: offset + body,
            remaining: body - self.written,
        }
    }
}

/// Creates the temp file at `path`, making room when the filesystem is full.
fn create_making_room(
    storage: &DiskStorage,
    path: &std::path::Path,
    need: Need,
) -> io::Result<File> {
    match files::create_temp_file(path) {
        Err(e) if out_of_space(&e) => {
            // Evicting needs an open file on the filesystem to measure it: the directory.
            let dir = File::open(path.parent().unwrap_or(path))?;
            if storage.make_room(&dir, need.file_bytes, need.remaining) == 0 {
                return Err(e);
            }
            files::create_temp_file(path)
        }
        other => other,
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
            self.fail(&reason, TailProgress::Aborted);
            return Error::e_explain(ErrorType::InternalError, format!("disk cache: {reason}"));
        }
        if data.is_empty() {
            return Ok(());
        }
        let Some(mut writer) = self.writer.take() else {
            return Err(self.closed_error());
        };
        let storage = self.storage;
        let offset = self.header.as_ref().map_or(0, |h| h.body_offset) + self.written;
        let need = self.need(data.len());
        let written = blocking_io(move || {
            storage.write_making_room(&writer.file, &data, offset, need)?;
            writer.crc.update(&data);
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
                let reason = format!("cannot write {}: {e}", self.tmp.display());
                self.fail(&reason, TailProgress::Aborted);
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
                // Every body byte is in the temp file, which the readers have open: they get
                // the whole body although it is not stored.
                let reason = format!("cannot publish {}: {e}", self.tmp.display());
                self.fail(&reason, TailProgress::Done(written));
                Err(io_error(ErrorType::FileWriteError, "publish", &self.tmp, e))
            }
        }
    }
}

impl Drop for DiskMiss {
    fn drop(&mut self) {
        if self.state == State::Open {
            self.announce(TailProgress::Aborted);
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

    let file = writer.file;
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
        files::create_dir_below(&storage.root, shard)?;
    }
    if let Err(e) = std::fs::rename(&tmp, &dst) {
        if e.kind() == io::ErrorKind::NotFound {
            // The cache directory was deleted under the fill, after the shard was created:
            // mark what is left as a cache, so that the next start accepts it.
            if let Err(e) = files::restore_root(&storage.root) {
                let dir = storage.root.display();
                tracing::warn!(%dir, error = %e, "disk cache: cannot restore the format file");
            }
        }
        return Err(e);
    }
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
