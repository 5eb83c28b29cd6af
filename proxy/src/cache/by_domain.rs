//! Entry counts per domain, kept by each tier as entries come and go.

use std::collections::HashMap;

/// The number of entries of each domain (the cache key's user tag) in one tier.
#[derive(Debug, Default)]
pub struct EntriesByDomain {
    counts: HashMap<Box<str>, u64>,
}

impl EntriesByDomain {
    /// Counts an entry of `domain` that the tier added.
    pub fn add(&mut self, domain: &str) {
        match self.counts.get_mut(domain) {
            Some(count) => *count += 1,
            None => {
                self.counts.insert(domain.into(), 1);
            }
        }
    }

    /// Counts an entry of `domain` that the tier removed.
    pub fn remove(&mut self, domain: &str) {
        if let Some(count) = self.counts.get_mut(domain) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.counts.remove(domain);
            }
        }
    }

    /// Returns the number of entries of `domain`.
    pub fn get(&self, domain: &str) -> u64 {
        self.counts.get(domain).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_and_remove() {
        let mut counts = EntriesByDomain::default();
        counts.add("a");
        counts.add("a");
        counts.add("b");
        counts.remove("a");
        assert_eq!(counts.get("a"), 1);
        assert_eq!(counts.get("b"), 1);
        assert_eq!(counts.get("c"), 0);
    }

    #[test]
    fn remove_of_absent_domain_ignored() {
        let mut counts = EntriesByDomain::default();
        counts.remove("a");
        counts.add("a");
        counts.remove("a");
        counts.remove("a");
        assert_eq!(counts.get("a"), 0);
        assert!(counts.counts.is_empty());
    }
}
