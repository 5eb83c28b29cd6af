//! Notices, through inotify, when an entry directly under an export root is created, removed or
//! renamed, so that the active export is read from disk again only after such a change.
//!
//! The root's path can also come to name another directory: a parent directory renamed or
//! replaced (a blue/green swap of `/srv/mirror`). So each directory above the root is watched
//! too, for changes to the one entry on the way down, and such a change ends the watch. The
//! export tree then starts a new watch on what the path names now.
//!
//! NOTE: a filesystem mounted over the root or one of its parents after the watch started
//! sends no event, so the gateway keeps serving what lies under the mount until a reload.
//!
//! The kernel queues an event before the `rename`, `symlink` or `unlink` that caused it returns.
//! A read of the queue made after a switch of `latest` has returned therefore finds that switch.
//! So reusing the last resolution while the queue is empty serves exactly what reading the link
//! on every request would serve, for one non-blocking `read` instead of two path lookups.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::statfs::{self, FsType};

/// Result of one look at the watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// No entry of the root changed since the last look.
    Nothing,
    /// An entry of the root was created, removed or renamed: read the root again.
    Changed,
    /// The watch ended: the root was removed, moved away or unmounted, a directory above it
    /// no longer leads to it, the kernel dropped events, or reading failed. Nothing more will
    /// be reported; a new watch follows the path as it is now.
    Ended,
}

/// An inotify watch on one directory's entries and on the path that leads to it.
#[derive(Debug)]
pub struct RootWatch {
    inotify: Inotify,
    /// The watch on the root itself.
    root: i32,
    /// Each directory above the root: its watch, and the name of its entry on the way to the
    /// root.
    ancestors: Vec<(i32, OsString)>,
    /// Room for the queued events, allocated once: a look usually finds none.
    buffer: Vec<u8>,
}

/// Reason a directory gets no watch.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The directory is on a filesystem that can change without telling this kernel.
    #[error("filesystem type {0:#x} can change without an inotify event here (a network or FUSE filesystem)")]
    NotLocal(u64),
    /// The kernel rejected the watch, for example at the `fs.inotify.max_user_instances`
    /// limit.
    #[error("{0}")]
    Kernel(#[from] Errno),
    /// The directory's filesystem could not be identified.
    #[error("statfs failed: {0}")]
    Statfs(Errno),
}

/// Bytes read from the queue at once: at least one event with the longest name (16 + 256).
const READ_BYTES: usize = 4096;

/// Bytes of an event before its name: watch descriptor, mask, cookie and name length.
const EVENT_HEADER_BYTES: usize = 16;

/// Filesystems whose changes all pass through this kernel, so that inotify reports every one
/// of them. A network filesystem (NFS, CIFS, a FUSE mount) can be changed by another machine
/// without an event here, so a root there is read on every request instead. On overlay, only
/// changes made through the overlay itself are reported, which is the only supported way to
/// change it.
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

/// Returns the name of filesystem type `kind` when it is in [`LOCAL_FILESYSTEMS`].
fn local_name(kind: FsType) -> Option<&'static str> {
    LOCAL_FILESYSTEMS
        .iter()
        .find(|(local, _)| *local == kind)
        .map(|(_, name)| *name)
}

/// Returns the events that can change which export is active: an entry created, removed or
/// renamed, and the directory itself removed or moved. The same events on a directory above
/// the root tell whether the root's path still leads to the same directory.
fn watched_events() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_ONLYDIR
}

/// Returns the events after which a watched directory no longer lies where it did.
fn ending_events() -> AddWatchFlags {
    AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_UNMOUNT
        | AddWatchFlags::IN_IGNORED
}

impl RootWatch {
    /// Starts watching `root`'s entries and the directories above it. `root` must be
    /// canonical (no symlink, `.` or `..` in it).
    ///
    /// Fails when `root` is on a filesystem outside [`LOCAL_FILESYSTEMS`], or when the
    /// kernel rejects a watch.
    pub fn new(root: &Path) -> Result<Self, WatchError> {
        let kind = statfs::statfs(root)
            .map_err(WatchError::Statfs)?
            .filesystem_type();
        if local_name(kind).is_none() {
            return Err(WatchError::NotLocal(kind.0 as u64));
        }
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        // From the top down: each directory is watched before the next one is looked up in
        // it, so a swap made while the watches are being added is reported by one of them.
        let mut ancestors = Vec::new();
        let mut steps: Vec<(&Path, &std::ffi::OsStr)> = Vec::new();
        let mut below = root;
        while let (Some(parent), Some(name)) = (below.parent(), below.file_name()) {
            steps.push((parent, name));
            below = parent;
        }
        for (parent, name) in steps.into_iter().rev() {
            let wd = inotify.add_watch(parent, watched_events())?.as_raw();
            ancestors.push((wd, name.to_os_string()));
        }
        let root_wd = inotify.add_watch(root, watched_events())?.as_raw();
        Ok(Self {
            inotify,
            root: root_wd,
            ancestors,
            buffer: vec![0; READ_BYTES],
        })
    }

    /// Returns the name of `root`'s filesystem when a watch there reports every change.
    pub fn local_filesystem(root: &Path) -> Result<Option<&'static str>, WatchError> {
        let kind = statfs::statfs(root)
            .map_err(WatchError::Statfs)?
            .filesystem_type();
        Ok(local_name(kind))
    }

    /// Reads every queued event and returns what they amount to, without blocking.
    pub fn look(&mut self) -> Seen {
        let mut seen = Seen::Nothing;
        loop {
            match nix::unistd::read(&self.inotify, &mut self.buffer) {
                Ok(0) => return Seen::Ended,
                Ok(read) => match self.sort(read) {
                    Seen::Ended => return Seen::Ended,
                    Seen::Changed => seen = Seen::Changed,
                    Seen::Nothing => {}
                },
                Err(Errno::EAGAIN) => return seen,
                Err(Errno::EINTR) => {}
                Err(_) => return Seen::Ended,
            }
        }
    }

    /// Sorts the first `read` bytes of the buffer, as `read` returned them. Each event is a
    /// 16-byte header (watch descriptor, mask, cookie, name length, in native byte order)
    /// followed by the name, padded with NUL bytes.
    fn sort(&self, read: usize) -> Seen {
        let field = |event: &[u8], at: usize| {
            let bytes: [u8; 4] = event[at..at + 4].try_into().expect("4 bytes");
            u32::from_ne_bytes(bytes)
        };
        let mut seen = Seen::Nothing;
        let mut rest = &self.buffer[..read];
        while rest.len() >= EVENT_HEADER_BYTES {
            let wd = field(rest, 0) as i32;
            let mask = AddWatchFlags::from_bits_truncate(field(rest, 4));
            let name_len = field(rest, 12) as usize;
            let name = rest
                .get(EVENT_HEADER_BYTES..EVENT_HEADER_BYTES + name_len)
                .unwrap_or_default();
            let name = &name[..name.iter().position(|b| *b == 0).unwrap_or(name.len())];
            if mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                // Events were lost, some possibly about a directory above the root.
                return Seen::Ended;
            }
            if wd == self.root {
                if mask.intersects(ending_events()) {
                    return Seen::Ended;
                }
                seen = Seen::Changed;
            } else if let Some((_, on_path)) = self.ancestors.iter().find(|(a, _)| *a == wd) {
                if mask.intersects(ending_events()) || name == on_path.as_bytes() {
                    return Seen::Ended;
                }
            }
            rest = rest
                .get(EVENT_HEADER_BYTES + name_len..)
                .unwrap_or_default();
        }
        seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    fn watched_dir() -> Option<(tempfile::TempDir, RootWatch)> {
        let tmp = tempfile::tempdir().expect("tempdir");
        if RootWatch::local_filesystem(tmp.path())
            .ok()
            .flatten()
            .is_none()
        {
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

    #[test]
    fn parent_rename_ends_the_watch() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("mirror").join("concelier");
        fs::create_dir_all(&root).expect("mkdir");
        if RootWatch::local_filesystem(&root).ok().flatten().is_none() {
            eprintln!("skipped: the temp directory is on a filesystem without watches");
            return;
        }
        let mut watch = RootWatch::new(&root).expect("watch on a local filesystem");
        // Other entries of the directories above the root do not matter.
        fs::create_dir(tmp.path().join("other")).expect("mkdir");
        fs::create_dir(tmp.path().join("mirror").join("excititor")).expect("mkdir");
        assert_eq!(watch.look(), Seen::Nothing);

        fs::rename(tmp.path().join("mirror"), tmp.path().join("mirror.old")).expect("mv");
        assert_eq!(watch.look(), Seen::Ended);
    }
}
