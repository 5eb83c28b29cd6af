//! Notices, through inotify, when an entry directly under an export root is created, removed or
//! renamed, so that the active export is read from disk again only after such a change.
//!
//! The kernel queues an event before the `rename`, `symlink` or `unlink` that caused it returns.
//! A read of the queue made after a switch of `latest` has returned therefore finds that switch.
//! So reusing the last resolution while the queue is empty serves exactly what reading the link
//! on every request would serve, for one non-blocking `read` instead of two path lookups.

use std::io;
use std::path::Path;

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::statfs::{self, FsType};

/// Result of one look at the watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// No entry of the root changed since the last look.
    Nothing,
    /// An entry was created, removed or renamed, or the kernel dropped events: read the
    /// root again.
    Changed,
    /// The watch ended: the root was removed, moved away or unmounted, or reading failed.
    /// Nothing more will be reported.
    Ended,
}

/// An inotify watch on one directory's entries.
#[derive(Debug)]
pub struct RootWatch {
    inotify: Inotify,
    /// Room for the queued events, allocated once: a look usually finds none.
    buffer: Vec<u8>,
}

/// Bytes read from the queue at once: at least one event with the longest name (16 + 256).
const READ_BYTES: usize = 4096;

/// Bytes of an event before its name: watch descriptor, mask, cookie and name length.
const EVENT_HEADER_BYTES: usize = 16;

/// Filesystems whose changes all pass through this kernel, so that inotify reports every one
/// of them. A network filesystem (NFS, CIFS, a FUSE mount) can be changed by another machine
/// without an event here, so a root there is read on every request instead.
const LOCAL_FILESYSTEMS: [(FsType, &str); 8] = [
    (statfs::EXT4_SUPER_MAGIC, "ext2/3/4"),
    (statfs::XFS_SUPER_MAGIC, "xfs"),
    (statfs::BTRFS_SUPER_MAGIC, "btrfs"),
    (statfs::TMPFS_MAGIC, "tmpfs"),
    (statfs::OVERLAYFS_SUPER_MAGIC, "overlay"),
    (statfs::F2FS_SUPER_MAGIC, "f2fs"),
    (FsType(0x2fc1_2fc1), "zfs"),
    (FsType(0x8584_58f6), "ramfs"),
];

/// Returns the events that can change which export is active: an entry created, removed or
/// renamed, and the root itself removed or moved.
fn watched_events() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_ONLYDIR
}

/// Returns the events after which the watch reports nothing more.
fn ending_events() -> AddWatchFlags {
    AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_UNMOUNT
        | AddWatchFlags::IN_IGNORED
}

impl RootWatch {
    /// Starts watching `root`'s entries.
    ///
    /// Fails when `root` is on a filesystem outside [`LOCAL_FILESYSTEMS`], or when the
    /// kernel rejects the watch (for example at the `fs.inotify.max_user_instances` limit).
    /// The error names the cause, for the log.
    pub fn new(root: &Path) -> io::Result<Self> {
        let kind = statfs::statfs(root)?.filesystem_type();
        if !LOCAL_FILESYSTEMS.iter().any(|(local, _)| *local == kind) {
            return Err(io::Error::other(format!(
                "filesystem type {:#x} can change without an inotify event here (a network or FUSE filesystem)",
                kind.0
            )));
        }
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        inotify.add_watch(root, watched_events())?;
        Ok(Self {
            inotify,
            buffer: vec![0; READ_BYTES],
        })
    }

    /// Returns the name of `root`'s filesystem when a watch there reports every change.
    pub fn local_filesystem(root: &Path) -> Option<&'static str> {
        let kind = statfs::statfs(root).ok()?.filesystem_type();
        LOCAL_FILESYSTEMS
            .iter()
            .find(|(local, _)| *local == kind)
            .map(|(_, name)| *name)
    }

    /// Reads every queued event and returns what they amount to, without blocking.
    pub fn look(&mut self) -> Seen {
        let mut seen = Seen::Nothing;
        loop {
            match nix::unistd::read(&self.inotify, &mut self.buffer) {
                Ok(0) => return Seen::Ended,
                Ok(read) => {
                    if has_ending_event(&self.buffer[..read]) {
                        return Seen::Ended;
                    }
                    seen = Seen::Changed;
                }
                Err(Errno::EAGAIN) => return seen,
                Err(Errno::EINTR) => {}
                Err(_) => return Seen::Ended,
            }
        }
    }
}

/// Returns whether the events in `events` (as `read` returns them) include one that ends the
/// watch. Each event is a 16-byte header (watch descriptor, mask, cookie, name length in
/// native byte order) followed by the name.
fn has_ending_event(events: &[u8]) -> bool {
    let field = |event: &[u8], at: usize| {
        let bytes: [u8; 4] = event[at..at + 4].try_into().expect("4 bytes");
        u32::from_ne_bytes(bytes)
    };
    let mut rest = events;
    while rest.len() >= EVENT_HEADER_BYTES {
        let mask = AddWatchFlags::from_bits_truncate(field(rest, 4));
        if mask.intersects(ending_events()) {
            return true;
        }
        let name_len = field(rest, 12) as usize;
        rest = rest
            .get(EVENT_HEADER_BYTES + name_len..)
            .unwrap_or_default();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    fn watched_dir() -> Option<(tempfile::TempDir, RootWatch)> {
        let tmp = tempfile::tempdir().expect("tempdir");
        if RootWatch::local_filesystem(tmp.path()).is_none() {
            eprintln!("skipped: the temp directory is on a filesystem without watches");
            return None;
        }
        let watch = RootWatch::new(tmp.path()).expect("watch on a local filesystem");
        Some((tmp, watch))
    }

    #[test]
    fn quiet_root_reports_nothing() {
        let Some((tmp, mut watch)) = watched_dir() else {
            return;
        };
        assert_eq!(watch.look(), Seen::Nothing);
        fs::write(tmp.path().join("file"), b"x").expect("write");
        assert_eq!(watch.look(), Seen::Changed);
        assert_eq!(watch.look(), Seen::Nothing);
    }

    #[test]
    fn rename_over_link_is_a_change() {
        let Some((tmp, mut watch)) = watched_dir() else {
            return;
        };
        symlink("a", tmp.path().join("next")).expect("symlink");
        assert_eq!(watch.look(), Seen::Changed);
        fs::rename(tmp.path().join("next"), tmp.path().join("latest")).expect("rename");
        assert_eq!(watch.look(), Seen::Changed);
    }

    #[test]
    fn change_deeper_down_is_not_seen() {
        let Some((tmp, mut watch)) = watched_dir() else {
            return;
        };
        fs::create_dir(tmp.path().join("export")).expect("mkdir");
        assert_eq!(watch.look(), Seen::Changed);
        fs::write(tmp.path().join("export").join("file"), b"x").expect("write");
        assert_eq!(watch.look(), Seen::Nothing);
    }

    #[test]
    fn removed_root_ends_the_watch() {
        let Some((tmp, mut watch)) = watched_dir() else {
            return;
        };
        let root = tmp.path().to_path_buf();
        drop(tmp);
        assert!(!root.exists());
        assert_eq!(watch.look(), Seen::Ended);
    }
}
