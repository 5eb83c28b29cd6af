//! Writes that make room on a full filesystem by evicting least recently used entries.
//!
//! The byte budget (`disk_bytes`) can be larger than the filesystem, or other files can fill
//! it. A write that fails for want of space then evicts the least recently used entries
//! and tries again, so the tier keeps storing new objects instead of failing every fill until
//! a restart. An object larger than the whole filesystem evicts nothing.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::DiskStorage;

/// Bytes freed at least by one eviction round, so that a fill of unknown size does not evict
/// one small entry per write.
const MIN_ROOM: u64 = 1 << 20;
/// Eviction rounds per write. An evicted file that a reader still has open keeps its space
/// until the reader closes it, so a round can free less than it removed.
const ROOM_ROUNDS: usize = 8;

/// Returns whether an I/O error means the filesystem (or the user's quota) is full.
pub fn out_of_space(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// The room a fill needs.
#[derive(Debug, Clone, Copy)]
pub struct Need {
    /// Size the fill's file will have when complete, or its size so far when that is unknown.
    pub file_bytes: u64,
    /// Bytes the fill still has to write, when known.
    pub remaining: u64,
}

impl DiskStorage {
    /// Writes all of `data` at `offset` of `file`, a fill's temp file. When the filesystem is
    /// full, evicts entries to make room for `need` and tries again, up to [`ROOM_ROUNDS`]
    /// times.
    pub(super) fn write_making_room(
        &self,
        file: &File,
        mut data: &[u8],
        mut offset: u64,
        need: Need,
    ) -> io::Result<()> {
        let mut rounds = 0;
        while !data.is_empty() {
            match file.write_at(data, offset) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    data = &data[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if out_of_space(&e) && rounds < ROOM_ROUNDS => {
                    rounds += 1;
                    let remaining = need.remaining.max(data.len() as u64);
                    if self.make_room(file, need.file_bytes, remaining) == 0 {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Evicts least recently used entries until their files total at least `remaining` bytes
    /// (and [`MIN_ROOM`]), after a write to `file` found the filesystem full. Evicts nothing
    /// when a file of `file_bytes` is larger than the whole filesystem. Returns the bytes of
    /// the evicted entries.
    pub(super) fn make_room(&self, file: &File, file_bytes: u64, remaining: u64) -> u64 {
        let capacity = nix::sys::statvfs::fstatvfs(file)
            .map(|fs| fs.blocks().saturating_mul(fs.fragment_size()))
            .unwrap_or(u64::MAX);
        if file_bytes > capacity {
            return 0;
        }
        let want = remaining.max(MIN_ROOM);
        let victims = {
            let mut index = self.index.lock();
            let target = index.bytes().saturating_sub(want);
            index.evict_over(target, None)
        };
        let freed: u64 = victims.iter().map(|(_, slot)| slot.size()).sum();
        if !victims.is_empty() {
            if let Some(suppressed) = self.room_log.allow() {
                tracing::warn!(
                    dir = %self.root.display(),
                    evicted = victims.len(),
                    freed_bytes = freed,
                    filesystem_bytes = capacity,
                    budget_bytes = self.budget,
                    suppressed,
                    "disk cache: the filesystem is full; evicted least recently used entries to \
                     make room. Set disk_bytes below what the filesystem holds for the cache"
                );
            }
        }
        self.delete_victims(victims);
        freed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_filesystem_errors_are_out_of_space() {
        let full = io::Error::from_raw_os_error(libc::ENOSPC);
        assert!(out_of_space(&full));
        let quota = io::Error::from_raw_os_error(libc::EDQUOT);
        assert!(out_of_space(&quota));
        let other = io::Error::from_raw_os_error(libc::EIO);
        assert!(!out_of_space(&other));
    }
}
