//! The on-disk layout of one cache entry: fixed header, key data, serialized meta, body.
//!
//! Byte layout (integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `MGWCACHE` |
//! | 8 | 4 | format version |
//! | 12 | 4 | CRC-32 of bytes `0..meta_end` with this field zeroed |
//! | 16 | 8 | body offset (the header region's length, a multiple of 4 KiB) |
//! | 24 | 8 | body length |
//! | 32 | 4 | CRC-32 of the body |
//! | 36 | 4 | flags (bit 0: a variance hash is present) |
//! | 40 | 8 | fresh until, Unix seconds |
//! | 48 | 8 | stale until (fresh until plus the longer stale window), Unix seconds |
//! | 56 | 16 | primary hash |
//! | 72 | 16 | variance hash (zero when absent) |
//! | 88 | 2 | user tag length |
//! | 90 | 2 | reserved, zero |
//! | 92 | 4 | primary key length |
//! | 96 | 4 | internal meta length |
//! | 100 | 4 | response header blob length |
//! | 104 | .. | user tag, primary key, internal meta, header blob, zero padding |
//!
//! The padding between the meta and the body is room for `update_meta` to rewrite a grown
//! meta in place.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pingora::cache::key::{CacheHashKey, CompactCacheKey, HashBinary};

/// Identifies a cache entry file.
pub const MAGIC: [u8; 8] = *b"MGWCACHE";
/// Version of the entry layout; a file with another version is discarded.
pub const VERSION: u32 = 1;
/// Length of the fixed part of the header.
pub const FIXED_LEN: usize = 104;
/// Bytes read at once when a header is first read; most headers fit.
pub const FIRST_READ: usize = 4096;

/// Alignment of the body offset.
const ALIGN: usize = 4096;
/// Minimum free room left after the meta for in-place rewrites.
const META_SLACK: usize = 1024;
/// Largest user tag accepted in a header.
const MAX_TAG: usize = 1024;
/// Largest primary key accepted in a header.
const MAX_PRIMARY: usize = 64 * 1024;
/// Largest serialized meta blob (each of the two) accepted in a header.
const MAX_META: usize = 1024 * 1024;
/// Largest header region accepted when reading.
const MAX_HEADER: u64 = 4 * 1024 * 1024;
const FLAG_VARIANCE: u32 = 1;

/// The key data stored with an entry: enough to rebuild its `CompactCacheKey`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryKey {
    pub primary_hash: HashBinary,
    pub variance: Option<HashBinary>,
    pub user_tag: Box<str>,
    /// The primary key bytes as given to `CacheKey::new` (empty if unknown).
    pub primary: Box<[u8]>,
}

/// A decoded or to-be-written header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub body_offset: u64,
    pub body_len: u64,
    pub body_crc: u32,
    pub fresh_until: u64,
    pub stale_until: u64,
    pub key: EntryKey,
    /// `CacheMeta::serialize()` output: internal meta, response header blob.
    pub meta: (Vec<u8>, Vec<u8>),
}

/// Reason a header failed to decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatError {
    /// The buffer is shorter than the header; read this many bytes and retry.
    Short(usize),
    BadMagic,
    Version(u32),
    HeaderChecksum,
    Invalid(String),
}

impl std::fmt::Display for FormatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Short(n) => write!(f, "header truncated: {n} bytes needed"),
            Self::BadMagic => write!(f, "bad magic"),
            Self::Version(v) => write!(f, "format version {v}, expected {VERSION}"),
            Self::HeaderChecksum => write!(f, "header checksum mismatch"),
            Self::Invalid(reason) => write!(f, "invalid header: {reason}"),
        }
    }
}

impl EntryKey {
    /// Builds the key data of a `CacheKey`-like value; `primary` is the raw primary key.
    pub fn new(key: &impl CacheHashKey, primary: &[u8]) -> Self {
        Self {
            primary_hash: key.primary_bin(),
            variance: key.variance_bin(),
            user_tag: key.user_tag().into(),
            primary: primary.into(),
        }
    }

    /// Returns the compact cache key (what eviction managers and purges use).
    pub fn compact(&self) -> CompactCacheKey {
        CompactCacheKey {
            primary: self.primary_hash,
            variance: self.variance.map(Box::new),
            user_tag: self.user_tag.clone(),
        }
    }

    /// Returns the combined hash, which names the entry's file.
    pub fn combined(&self) -> HashBinary {
        self.compact().combined_bin()
    }
}

impl Header {
    /// Builds a header for a new entry with room for the meta to grow; body fields are zero.
    pub fn new(key: EntryKey, meta: (Vec<u8>, Vec<u8>), times: (u64, u64)) -> Result<Self, String> {
        check_limits(&key, &meta)?;
        let mut header = Self {
            body_offset: 0,
            body_len: 0,
            body_crc: 0,
            fresh_until: times.0,
            stale_until: times.1,
            key,
            meta,
        };
        header.body_offset = round_up(header.meta_end() + META_SLACK) as u64;
        Ok(header)
    }

    /// Returns a copy with a new meta, keeping the body offset when the meta fits before it.
    pub fn with_meta(&self, meta: (Vec<u8>, Vec<u8>), times: (u64, u64)) -> Result<Self, String> {
        check_limits(&self.key, &meta)?;
        let mut header = Self {
            meta,
            fresh_until: times.0,
            stale_until: times.1,
            ..self.clone()
        };
        if header.meta_end() as u64 > self.body_offset {
            header.body_offset = round_up(header.meta_end() + META_SLACK) as u64;
        }
        Ok(header)
    }

    /// Returns the offset just past the meta: the bytes the header checksum covers.
    pub fn meta_end(&self) -> usize {
        FIXED_LEN
            + self.key.user_tag.len()
            + self.key.primary.len()
            + self.meta.0.len()
            + self.meta.1.len()
    }

    /// Returns the size of the whole entry file.
    pub fn file_len(&self) -> u64 {
        self.body_offset.saturating_add(self.body_len)
    }

    /// Encodes bytes `0..meta_end` (the padding up to the body offset is not included).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.meta_end());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.body_offset.to_le_bytes());
        out.extend_from_slice(&self.body_len.to_le_bytes());
        out.extend_from_slice(&self.body_crc.to_le_bytes());
        let flags = if self.key.variance.is_some() {
            FLAG_VARIANCE
        } else {
            0
        };
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&self.fresh_until.to_le_bytes());
        out.extend_from_slice(&self.stale_until.to_le_bytes());
        out.extend_from_slice(&self.key.primary_hash);
        out.extend_from_slice(&self.key.variance.unwrap_or_default());

        // Lengths fit: `check_limits` bounded them when the header was built.
        out.extend_from_slice(&(self.key.user_tag.len() as u16).to_le_bytes());
        out.extend_from_slice(&[0; 2]);
        for len in [self.key.primary.len(), self.meta.0.len(), self.meta.1.len()] {
            out.extend_from_slice(&(len as u32).to_le_bytes());
        }
        out.extend_from_slice(self.key.user_tag.as_bytes());
        out.extend_from_slice(&self.key.primary);
        out.extend_from_slice(&self.meta.0);
        out.extend_from_slice(&self.meta.1);

        let crc = crc32fast::hash(&out);
        out[12..16].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes a header from the start of an entry file.
    ///
    /// Returns `FormatError::Short(n)` when `buf` contains fewer than the `n` bytes needed.
    pub fn decode(buf: &[u8]) -> Result<Self, FormatError> {
        if buf.len() < FIXED_LEN {
            return Err(FormatError::Short(FIXED_LEN));
        }
        let r = Reader(buf);
        if buf[..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = r.u32(8);
        if version != VERSION {
            return Err(FormatError::Version(version));
        }

        let lens = [
            r.u16(88) as usize,
            r.u32(92) as usize,
            r.u32(96) as usize,
            r.u32(100) as usize,
        ];
        let meta_end = FIXED_LEN + lens.iter().sum::<usize>();
        let body_offset = r.u64(16);
        if body_offset > MAX_HEADER || (body_offset as usize) < meta_end {
            return Err(FormatError::Invalid(format!(
                "body offset {body_offset} does not fit a {meta_end}-byte header"
            )));
        }
        if buf.len() < meta_end {
            return Err(FormatError::Short(meta_end));
        }

        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&buf[..12]);
        hasher.update(&[0; 4]);
        hasher.update(&buf[16..meta_end]);
        if hasher.finalize() != r.u32(12) {
            return Err(FormatError::HeaderChecksum);
        }
        decode_fields(&r, body_offset, lens)
    }
}

/// Converts a time to Unix seconds, saturating at both ends.
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Converts Unix seconds back to a time.
pub fn from_unix_secs(secs: u64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_secs(secs))
        .unwrap_or(UNIX_EPOCH)
}

/// Returns (fresh until, stale until) in Unix seconds for a meta's freshness fields.
pub fn meta_times(fresh_until: SystemTime, swr_sec: u32, sie_sec: u32) -> (u64, u64) {
    let fresh = unix_secs(fresh_until);
    (fresh, fresh.saturating_add(u64::from(swr_sec.max(sie_sec))))
}

fn decode_fields(
    r: &Reader<'_>,
    body_offset: u64,
    lens: [usize; 4],
) -> Result<Header, FormatError> {
    let mut at = FIXED_LEN;
    let mut take = |len: usize| {
        let part = &r.0[at..at + len];
        at += len;
        part
    };
    let tag = std::str::from_utf8(take(lens[0]))
        .map_err(|_| FormatError::Invalid("user tag is not UTF-8".into()))?;
    let key = EntryKey {
        primary_hash: r.hash(56),
        variance: ((r.u32(36) & FLAG_VARIANCE) != 0).then(|| r.hash(72)),
        user_tag: tag.into(),
        primary: take(lens[1]).into(),
    };
    let meta = (take(lens[2]).to_vec(), take(lens[3]).to_vec());
    Ok(Header {
        body_offset,
        body_len: r.u64(24),
        body_crc: r.u32(32),
        fresh_until: r.u64(40),
        stale_until: r.u64(48),
        key,
        meta,
    })
}

fn check_limits(key: &EntryKey, meta: &(Vec<u8>, Vec<u8>)) -> Result<(), String> {
    let checks = [
        ("user tag", key.user_tag.len(), MAX_TAG),
        ("primary key", key.primary.len(), MAX_PRIMARY),
        ("internal meta", meta.0.len(), MAX_META),
        ("response header", meta.1.len(), MAX_META),
    ];
    for (what, len, max) in checks {
        if len > max {
            return Err(format!(
                "{what} of {len} bytes exceeds the disk cache limit of {max}"
            ));
        }
    }
    Ok(())
}

fn round_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// Reads fixed-offset little-endian fields; callers check the length first.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn bytes<const N: usize>(&self, at: usize) -> [u8; N] {
        let mut out = [0; N];
        out.copy_from_slice(&self.0[at..at + N]);
        out
    }
    fn u16(&self, at: usize) -> u16 {
        u16::from_le_bytes(self.bytes(at))
    }
    fn u32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.bytes(at))
    }
    fn u64(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.bytes(at))
    }
    fn hash(&self, at: usize) -> HashBinary {
        self.bytes(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::cache::CacheKey;

    fn header() -> Header {
        let mut key = CacheKey::new("3:abc", "primary");
        key.set_variance_key([7; 16]);
        let entry = EntryKey::new(&key, key.primary_key());
        let mut h = Header::new(entry, (vec![1, 2, 3], vec![4; 50]), (10, 20)).expect("limits");
        h.body_len = 99;
        h.body_crc = 0xdead_beef;
        h
    }

    #[test]
    fn format_round_trips() {
        let h = header();
        assert_eq!(Header::decode(&h.encode()), Ok(h));
    }

    #[test]
    fn format_aligns_body_with_slack() {
        let h = header();
        assert_eq!(h.body_offset % ALIGN as u64, 0);
        assert!(h.body_offset as usize >= h.meta_end() + META_SLACK);
    }

    #[test]
    fn format_reports_short_buffer() {
        let bytes = header().encode();
        assert_eq!(
            Header::decode(&bytes[..bytes.len() - 1]),
            Err(FormatError::Short(bytes.len()))
        );
    }

    #[test]
    fn format_detects_flipped_header_byte() {
        let mut bytes = header().encode();
        bytes[FIXED_LEN + 2] ^= 1;
        assert_eq!(Header::decode(&bytes), Err(FormatError::HeaderChecksum));
    }

    #[test]
    fn format_rejects_bad_magic_and_version() {
        let mut bytes = header().encode();
        bytes[0] = b'X';
        assert_eq!(Header::decode(&bytes), Err(FormatError::BadMagic));
        let mut bytes = header().encode();
        bytes[8] = 9;
        assert_eq!(Header::decode(&bytes), Err(FormatError::Version(9)));
    }

    #[test]
    fn format_keeps_offset_when_meta_fits() {
        let h = header();
        let grown = h
            .with_meta((vec![1; 500], vec![2; 200]), (1, 2))
            .expect("limits");
        assert_eq!(grown.body_offset, h.body_offset);
        let huge = h
            .with_meta((vec![1; 9000], vec![]), (1, 2))
            .expect("limits");
        assert!(huge.body_offset > h.body_offset);
    }

    #[test]
    fn format_combined_matches_cache_key() {
        let mut key = CacheKey::new("3:abc", "primary");
        key.set_variance_key([7; 16]);
        let entry = EntryKey::new(&key, key.primary_key());
        assert_eq!(entry.combined(), key.combined_bin());
    }

    #[test]
    fn format_rejects_oversized_tag() {
        let key = CacheKey::new("k", "t".repeat(MAX_TAG + 1));
        let entry = EntryKey::new(&key, key.primary_key());
        assert!(Header::new(entry, (vec![], vec![]), (0, 0)).is_err());
    }
}
