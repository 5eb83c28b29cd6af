//! The in-memory index of published entries, in least-recently-used order.

use std::collections::BTreeMap;
use std::sync::Arc;

use pingora::cache::key::HashBinary;

use super::format::EntryKey;
use crate::cache::by_domain::EntriesByDomain;
use crate::cache::KeyHashMap;

/// Index record of one published entry file.
#[derive(Debug, Clone)]
pub struct Slot {
    /// Inode of the file, so a file replaced by another process is not deleted by mistake.
    pub ino: u64,
    /// Unix seconds after which the entry is past its stale windows.
    pub stale_until: u64,
    /// Unix seconds of the file's mtime as last set: its recency survives a restart.
    pub touched: u64,
    pub key: Arc<EntryKey>,
    size: u64,
    tick: u64,
}

impl Slot {
    /// Describes a file of `size` bytes (header and body).
    pub fn new(size: u64, ino: u64, stale_until: u64, touched: u64, key: Arc<EntryKey>) -> Self {
        Self {
            ino,
            stale_until,
            touched,
            key,
            size,
            tick: 0,
        }
    }

    /// Returns the file size the slot accounts for.
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// Published entries by combined key hash, with their total size and recency order.
#[derive(Debug, Default)]
pub struct Index {
    map: KeyHashMap<Slot>,
    order: BTreeMap<u64, HashBinary>,
    next_tick: u64,
    bytes: u64,
    by_domain: EntriesByDomain,
}

impl Index {
    /// Returns the number of entries.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Returns the total size of all entries.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Returns the number of entries of `domain` (the key's user tag).
    pub fn domain_len(&self, domain: &str) -> u64 {
        self.by_domain.get(domain)
    }

    /// Returns an entry without changing its recency.
    pub fn get(&self, name: &HashBinary) -> Option<&Slot> {
        self.map.get(name)
    }

    /// Inserts an entry as the most recently used one; returns the entry it replaced.
    pub fn insert(&mut self, name: HashBinary, mut slot: Slot) -> Option<Slot> {
        let old = self.remove(&name);
        slot.tick = self.bump();
        self.order.insert(slot.tick, name);
        self.bytes += slot.size;
        self.by_domain.add(&slot.key.user_tag);
        self.map.insert(name, slot);
        old
    }

    /// Marks an entry as the most recently used one and returns it.
    pub fn touch(&mut self, name: &HashBinary) -> Option<&mut Slot> {
        let tick = self.bump();
        let slot = self.map.get_mut(name)?;
        self.order.remove(&slot.tick);
        slot.tick = tick;
        self.order.insert(tick, *name);
        Some(slot)
    }

    /// Removes an entry.
    pub fn remove(&mut self, name: &HashBinary) -> Option<Slot> {
        let slot = self.map.remove(name)?;
        self.order.remove(&slot.tick);
        self.bytes -= slot.size;
        self.by_domain.remove(&slot.key.user_tag);
        Some(slot)
    }

    /// Removes an entry only if it still describes the file with inode `ino`.
    pub fn remove_if_ino(&mut self, name: &HashBinary, ino: u64) -> Option<Slot> {
        match self.map.get(name) {
            Some(slot) if slot.ino == ino => self.remove(name),
            _ => None,
        }
    }

    /// Removes least recently used entries until the total is at most `budget`.
    ///
    /// `keep` is never removed (the entry just published or read). Returns the removed entries;
    /// the caller deletes their files.
    pub fn evict_over(
        &mut self,
        budget: u64,
        keep: Option<&HashBinary>,
    ) -> Vec<(HashBinary, Slot)> {
        let mut victims = Vec::new();
        let mut excess = self.bytes.saturating_sub(budget);
        for name in self.order.values() {
            if excess == 0 {
                break;
            }
            if Some(name) == keep {
                continue;
            }
            let size = self.map.get(name).map_or(0, |s| s.size);
            excess = excess.saturating_sub(size);
            victims.push(*name);
        }
        victims
            .into_iter()
            .filter_map(|name| self.remove(&name).map(|slot| (name, slot)))
            .collect()
    }

    /// Returns the names of the entries a predicate selects.
    pub fn select(&self, pred: impl Fn(&Slot) -> bool) -> Vec<HashBinary> {
        self.map
            .iter()
            .filter(|(_, slot)| pred(slot))
            .map(|(name, _)| *name)
            .collect()
    }

    /// Visits every entry, least recently used first.
    pub fn iter_lru(&self) -> impl Iterator<Item = (&HashBinary, &Slot)> {
        self.order
            .values()
            .filter_map(|name| self.map.get(name).map(|slot| (name, slot)))
    }

    fn bump(&mut self) -> u64 {
        self.next_tick += 1;
        self.next_tick
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(size: u64) -> Slot {
        let key = EntryKey {
            primary_hash: [0; 16],
            variance: None,
            user_tag: "t".into(),
            primary: Box::new([]),
        };
        Slot::new(size, 1, 0, 0, Arc::new(key))
    }

    fn name(n: u8) -> HashBinary {
        [n; 16]
    }

    #[test]
    fn index_counts_bytes_on_replace() {
        let mut index = Index::default();
        index.insert(name(1), slot(10));
        index.insert(name(1), slot(4));
        assert_eq!((index.len(), index.bytes()), (1, 4));
    }

    #[test]
    fn index_evicts_least_recent_first() {
        let mut index = Index::default();
        for n in 1..=3 {
            index.insert(name(n), slot(10));
        }
        index.touch(&name(1));
        let victims: Vec<_> = index
            .evict_over(20, None)
            .into_iter()
            .map(|v| v.0)
            .collect();
        assert_eq!(victims, vec![name(2)]);
        assert_eq!(index.bytes(), 20);
    }

    #[test]
    fn index_eviction_spares_kept_entry() {
        let mut index = Index::default();
        index.insert(name(1), slot(10));
        index.insert(name(2), slot(10));
        let victims: Vec<_> = index
            .evict_over(10, Some(&name(1)))
            .into_iter()
            .map(|v| v.0)
            .collect();
        assert_eq!(victims, vec![name(2)]);
    }

    #[test]
    fn index_counts_entries_by_domain() {
        let mut index = Index::default();
        index.insert(name(1), slot(10));
        index.insert(name(1), slot(10));
        index.insert(name(2), slot(10));
        assert_eq!(index.domain_len("t"), 2);
        index.evict_over(10, None);
        assert_eq!(index.domain_len("t"), 1);
        assert_eq!(index.domain_len("other"), 0);
    }

    #[test]
    fn index_remove_checks_inode() {
        let mut index = Index::default();
        index.insert(name(1), slot(10));
        assert!(index.remove_if_ino(&name(1), 2).is_none());
        assert!(index.remove_if_ino(&name(1), 1).is_some());
        assert_eq!(index.bytes(), 0);
    }
}
