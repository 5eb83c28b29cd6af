//! A `CacheMeta` kept by the memory tier, in the cheapest form that gives it back.
//!
//! Pingora hands a storage its `CacheMeta` when a fill starts and expects one back on every hit.
//! Deserializing it from bytes parses the response header again, which was about a sixth of
//! the instructions of a small cached hit. Most entries were filled once and never revalidated:
//! [`CacheMeta::new`] and its public setters rebuild those from the parsed header and the time
//! fields, for the price of a header clone, equal in every field Pingora reads. Only the
//! origin's spelling of header names is not kept, which the gateway drops from every response
//! anyway. The others (an entry refreshed by a 304 has an `updated` time after its `created`
//! time, which no public setter writes) stay serialized.

use std::time::SystemTime;

use pingora::cache::key::HashBinary;
use pingora::cache::CacheMeta;
use pingora::http::ResponseHeader;
use pingora::Result;

use super::raw_header;

/// A `CacheMeta` as the memory tier keeps it.
#[derive(Debug, Clone)]
pub enum StoredMeta {
    /// The parts that [`CacheMeta::new`] and the public setters rebuild exactly.
    Parsed(Box<ParsedMeta>),
    /// The output of `CacheMeta::serialize`, with the header stored raw (see [`raw_header`]).
    Serialized(Vec<u8>, Vec<u8>),
}

/// The fields of a `CacheMeta` whose `updated` time and provenance equal its `created` time.
#[derive(Debug, Clone)]
pub struct ParsedMeta {
    header: ResponseHeader,
    fresh_until: SystemTime,
    created: SystemTime,
    stale_while_revalidate_sec: u32,
    stale_if_error_sec: u32,
    variance: Option<HashBinary>,
    epoch_override: Option<SystemTime>,
}

impl StoredMeta {
    /// Keeps `meta` parsed when it can be rebuilt exactly, else serialized.
    pub fn of(meta: &CacheMeta) -> Result<Self> {
        let created = meta.created();
        if meta.updated() != created || meta.provenance() != created {
            let (internal, header) = raw_header::store_raw(meta.serialize()?);
            return Ok(Self::Serialized(internal, header));
        }
        Ok(Self::Parsed(Box::new(ParsedMeta {
            header: compact(meta.response_header()),
            fresh_until: meta.fresh_until(),
            created,
            stale_while_revalidate_sec: meta.stale_while_revalidate_sec(),
            stale_if_error_sec: meta.stale_if_error_sec(),
            variance: meta.variance(),
            epoch_override: meta.epoch_override(),
        })))
    }

    /// Keeps the output of `CacheMeta::serialize` (read from another tier), parsed when it can
    /// be rebuilt exactly. Bytes that do not deserialize stay as they are, so that the hit
    /// fails the same way it would have in the other tier.
    pub fn from_serialized(meta: (Vec<u8>, Vec<u8>)) -> Self {
        if let Ok(Ok(parsed)) = CacheMeta::deserialize(&meta.0, &meta.1).map(|m| Self::of(&m)) {
            return parsed;
        }
        let (internal, header) = raw_header::store_raw(meta);
        Self::Serialized(internal, header)
    }

    /// Builds the `CacheMeta` back.
    pub fn rebuild(&self) -> Result<CacheMeta> {
        let parsed = match self {
            Self::Parsed(parsed) => parsed,
            Self::Serialized(internal, header) => return CacheMeta::deserialize(internal, header),
        };
        let mut meta = CacheMeta::new(
            parsed.fresh_until,
            parsed.created,
            parsed.stale_while_revalidate_sec,
            parsed.stale_if_error_sec,
            parsed.header.clone(),
        );
        if let Some(variance) = parsed.variance {
            meta.set_variance(variance);
        }
        if let Some(epoch) = parsed.epoch_override {
            meta.set_epoch_override(epoch);
        }
        Ok(meta)
    }
}

/// Copies `header` into a map sized to its fields, with its values in one buffer of their own.
///
/// A header parsed from an origin response keeps room for many more fields, and its values
/// may be slices of the buffer the response was read into, which a stored copy would keep
/// alive. The copy also leaves out the record of the origin's name spellings: the gateway's
/// first added field drops it anyway (see `mirror_plugins::fields`).
fn compact(header: &ResponseHeader) -> ResponseHeader {
    let total = header.headers.values().map(|v| v.len()).sum();
    let mut bytes = bytes::BytesMut::with_capacity(total);
    for value in header.headers.values() {
        bytes.extend_from_slice(value.as_bytes());
    }
    let bytes = bytes.freeze();
    let mut fields = http::HeaderMap::with_capacity(header.headers.len());
    let mut start = 0;
    for (name, value) in &header.headers {
        let end = start + value.len();
        let own_value = http::HeaderValue::from_maybe_shared(bytes.slice(start..end))
            .unwrap_or_else(|_| value.clone());
        let own_name =
            http::HeaderName::from_bytes(name.as_str().as_bytes()).unwrap_or_else(|_| name.clone());
        fields.append(own_name, own_value);
        start = end;
    }
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = header.status;
    parts.version = header.version;
    parts.headers = fields;
    // Like Pingora's serialized form, this keeps no custom reason phrase.
    ResponseHeader::from(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn header() -> ResponseHeader {
        let mut header = ResponseHeader::build(200, Some(64)).expect("valid status");
        header
            .append_header("ETag", "\"v1\"")
            .expect("valid header");
        header
            .append_header("Vary", "accept-encoding")
            .expect("valid header");
        header
            .append_header("Vary", "origin")
            .expect("valid header");
        header
            .append_header("cache-control", "public, max-age=60")
            .expect("valid header");
        header
    }

    /// Compares every field that Pingora reads from a `CacheMeta`.
    fn assert_same(got: &CacheMeta, want: &CacheMeta) {
        assert_eq!(got.created(), want.created(), "created");
        assert_eq!(got.updated(), want.updated(), "updated");
        assert_eq!(got.provenance(), want.provenance(), "provenance");
        assert_eq!(got.fresh_until(), want.fresh_until(), "fresh_until");
        assert_eq!(got.epoch(), want.epoch(), "epoch");
        assert_eq!(
            got.epoch_override(),
            want.epoch_override(),
            "epoch_override"
        );
        assert_eq!(got.variance(), want.variance(), "variance");
        assert_eq!(
            got.stale_while_revalidate_sec(),
            want.stale_while_revalidate_sec(),
            "stale_while_revalidate_sec"
        );
        assert_eq!(
            got.stale_if_error_sec(),
            want.stale_if_error_sec(),
            "stale_if_error_sec"
        );

        let got_header = got.response_header();
        let want_header = want.response_header();
        assert_eq!(got_header.status, want_header.status, "status");
        assert_eq!(got_header.headers, want_header.headers, "headers");
        assert_eq!(
            got_header.get_reason_phrase(),
            want_header.get_reason_phrase(),
            "reason phrase"
        );
        let internal = |meta: &CacheMeta| meta.serialize().map(|(internal, _)| internal).ok();
        assert_eq!(internal(got), internal(want), "serialized internal part");
    }

    #[test]
    fn new_meta_is_kept_parsed() {
        let now = SystemTime::now();
        let mut meta = CacheMeta::new(now + Duration::from_secs(60), now, 10, 20, header());
        meta.set_variance([7u8; 16]);
        meta.set_epoch_override(now - Duration::from_secs(5));

        let stored = StoredMeta::of(&meta).expect("store");
        assert!(matches!(stored, StoredMeta::Parsed(_)));
        assert_same(&stored.rebuild().expect("rebuild"), &meta);
    }

    #[test]
    fn revalidated_meta_is_kept_serialized() {
        let created = SystemTime::now() - Duration::from_secs(120);
        let mut meta = CacheMeta::new(created + Duration::from_secs(60), created, 0, 0, header());
        // What a 304 does: new freshness, and `updated` set to now.
        meta.update_freshness(SystemTime::now() + Duration::from_secs(60), 0, 0);
        assert_ne!(meta.updated(), meta.created());

        let stored = StoredMeta::of(&meta).expect("store");
        assert!(matches!(stored, StoredMeta::Serialized(..)));
        assert_same(&stored.rebuild().expect("rebuild"), &meta);
    }

    #[test]
    fn serialized_from_disk_is_parsed() {
        let now = SystemTime::now();
        let meta = CacheMeta::new(now + Duration::from_secs(60), now, 0, 5, header());

        let stored = StoredMeta::from_serialized(meta.serialize().expect("serialize"));
        assert!(matches!(stored, StoredMeta::Parsed(_)));
        assert_same(&stored.rebuild().expect("rebuild"), &meta);
    }

    #[test]
    fn parsed_header_owns_its_values() {
        let buffer = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
        let mut header = ResponseHeader::build(200, None).expect("valid status");
        let value = http::HeaderValue::from_maybe_shared(buffer.slice(0..16)).expect("value");
        header
            .append_header("x-slice", value)
            .expect("valid header");
        let now = SystemTime::now();
        let meta = CacheMeta::new(now + Duration::from_secs(60), now, 0, 0, header);

        let rebuilt = StoredMeta::of(&meta)
            .expect("store")
            .rebuild()
            .expect("rebuild");
        let kept = rebuilt.headers()["x-slice"].as_bytes();
        assert_eq!(kept, &buffer[0..16]);
        let inside = buffer.as_ptr_range().contains(&kept.as_ptr());
        assert!(
            !inside,
            "the stored value still points into the read buffer"
        );
    }

    #[test]
    fn corrupt_bytes_still_fail() {
        let stored = StoredMeta::from_serialized((b"not msgpack".to_vec(), b"junk".to_vec()));
        assert!(matches!(stored, StoredMeta::Serialized(..)));
        assert!(stored.rebuild().is_err());
    }
}
