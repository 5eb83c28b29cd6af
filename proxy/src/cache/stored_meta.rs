//! A `CacheMeta` kept by the memory tier, in the cheapest form that gives it back.
//!
//! Pingora hands a storage its `CacheMeta` when a fill starts and expects one back on every hit.
//! Deserializing it from bytes parses the response header again, which was about a sixth of
//! the instructions of a small cached hit. The memory tier keeps the parsed header and the time
//! fields instead, and rebuilds the meta with [`CacheMeta::new`] and its public setters, for
//! the price of a header clone. Two fields have no public setter:
//!
//! - `updated`, the time of the last 304 refresh. Pingora reads it only as the epoch that the
//!   age counts from, so the rebuilt meta carries it as its epoch override.
//! - `provenance`, which a 200 refresh of a stale entry copies from the entry it replaces.
//!   Pingora reads it only to reject variants older than the primary entry of a response with
//!   `Vary`. An entry whose response has no `Vary` is rebuilt with its creation time there,
//!   and one with `Vary` and an older provenance stays serialized.
//!
//! The origin's spelling of header names is not kept either: the gateway drops it from every
//! response anyway.

use std::time::SystemTime;

use pingora::cache::key::HashBinary;
use pingora::cache::CacheMeta;
use pingora::http::ResponseHeader;
use pingora::Result;

use super::raw_header;

/// A `CacheMeta` as the memory tier keeps it.
#[derive(Debug, Clone)]
pub enum StoredMeta {
    /// The parts that [`CacheMeta::new`] and the public setters rebuild.
    Parsed(Box<ParsedMeta>),
    /// The output of `CacheMeta::serialize`, with the header stored raw (see [`raw_header`]).
    Serialized(Vec<u8>, Vec<u8>),
}

/// The fields of a `CacheMeta` that its rebuild needs.
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
    /// Keeps `meta` parsed when the rebuilt meta behaves the same in Pingora, else serialized.
    pub fn of(meta: &CacheMeta) -> Result<Self> {
        let created = meta.created();
        let varies = meta.variance().is_some() || meta.headers().contains_key(http::header::VARY);
        if varies && meta.provenance() != created {
            let (internal, header) = raw_header::store_raw(meta.serialize()?);
            return Ok(Self::Serialized(internal, header));
        }
        // The age counts from `epoch()`: the override if set, else `updated`.
        let epoch_override = meta
            .epoch_override()
            .or(Some(meta.updated()).filter(|updated| *updated != created));
        Ok(Self::Parsed(Box::new(ParsedMeta {
            header: compact(meta.response_header()),
            fresh_until: meta.fresh_until(),
            created,
            stale_while_revalidate_sec: meta.stale_while_revalidate_sec(),
            stale_if_error_sec: meta.stale_if_error_sec(),
            variance: meta.variance(),
            epoch_override,
        })))
    }

    /// Keeps the output of `CacheMeta::serialize` (read from another tier) as [`Self::of`]
    /// would. Bytes that do not deserialize stay as they are, so that the hit fails the same
    /// way it would have in the other tier.
    pub fn from_serialized(meta: (Vec<u8>, Vec<u8>)) -> Self {
        if let Ok(Ok(parsed)) = CacheMeta::deserialize(&meta.0, &meta.1).map(|m| Self::of(&m)) {
            return parsed;
        }
        let (internal, header) = raw_header::store_raw(meta);
        Self::Serialized(internal, header)
    }

    /// Returns the stored header and the time the response's age counts from, when the
    /// response is fresh at `now` and a copy of it is the complete response to a plain
    /// request: kept parsed, a 200 with a `Content-Length`, and without `Vary`.
    pub fn fresh_at(&self, now: SystemTime) -> Option<(&ResponseHeader, SystemTime)> {
        let Self::Parsed(parsed) = self else {
            return None;
        };
        let header = &parsed.header;
        let plain = header.status == http::StatusCode::OK
            && header.headers.contains_key(http::header::CONTENT_LENGTH)
            && parsed.variance.is_none()
            && !header.headers.contains_key(http::header::VARY);
        // The same comparison as `CacheMeta::is_fresh`: fresh until and including `fresh_until`.
        (plain && parsed.fresh_until >= now)
            .then(|| (header, parsed.epoch_override.unwrap_or(parsed.created)))
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

/// Returns `meta` with a `Content-Length` of `body_len` when it is a 200 without one: the
/// origin sent a chunked or close-delimited body, whose length is known once it is stored.
/// Hits then carry the length, so ranges can be served from them. `None` when nothing changes, and for a
/// response with `Vary`, whose variants Pingora distinguishes by fields this rebuild would not
/// keep.
pub fn with_body_length(meta: &CacheMeta, body_len: u64) -> Option<CacheMeta> {
    let header = meta.response_header();
    if header.status != http::StatusCode::OK
        || header.headers.contains_key(http::header::CONTENT_LENGTH)
        || meta.variance().is_some()
        || header.headers.contains_key(http::header::VARY)
    {
        return None;
    }
    let mut header = meta.response_header_copy();
    header.remove_header(&http::header::TRANSFER_ENCODING);
    header
        .insert_header(http::header::CONTENT_LENGTH, body_len)
        .ok()?;
    let mut complete = CacheMeta::new(
        meta.fresh_until(),
        meta.created(),
        meta.stale_while_revalidate_sec(),
        meta.stale_if_error_sec(),
        header,
    );
    if meta.epoch() != meta.created() {
        complete.set_epoch_override(meta.epoch());
    }
    Some(complete)
}

/// Spare room in a stored header's map: the most fields a hit gets in its one insert (`Age`,
/// `Accept-Ranges`, `X-Cache-Status`, `Cache-Control` and three `RateLimit-*` fields) and the
/// six that `mirror_plugins::fields::edit` reserves on top.
const HIT_FIELDS: usize = 13;

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
    // Room for the fields a hit adds. A clone keeps the index's size, so the hit's first
    // insert does not rebuild the index.
    let mut fields = http::HeaderMap::with_capacity(header.headers.len() + HIT_FIELDS);
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

    fn header(vary: bool) -> ResponseHeader {
        let mut header = ResponseHeader::build(200, Some(64)).expect("valid status");
        header
            .append_header("ETag", "\"v1\"")
            .expect("valid header");
        if vary {
            header
                .append_header("Vary", "accept-encoding")
                .expect("valid header");
            header
                .append_header("Vary", "origin")
                .expect("valid header");
        }
        header
            .append_header("cache-control", "public, max-age=60")
            .expect("valid header");
        header
    }

    /// Compares what Pingora reads from a `CacheMeta`: freshness, stale windows, the epoch the
    /// age counts from, the variance and the response header. The provenance is compared
    /// only when `same_provenance` is set.
    fn assert_behaves_same(got: &CacheMeta, want: &CacheMeta, same_provenance: bool) {
        assert_eq!(got.created(), want.created(), "created");
        assert_eq!(got.fresh_until(), want.fresh_until(), "fresh_until");
        assert_eq!(got.epoch(), want.epoch(), "epoch");
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
        if same_provenance {
            assert_eq!(got.provenance(), want.provenance(), "provenance");
        }

        let got_header = got.response_header();
        let want_header = want.response_header();
        assert_eq!(got_header.status, want_header.status, "status");
        assert_eq!(got_header.headers, want_header.headers, "headers");
    }

    /// Builds a meta that a 200 refresh of a stale entry leaves: its provenance is older than
    /// its creation. No public setter writes it, so the meta is decoded from its serialized
    /// form (Pingora's version 2 layout, a MessagePack array).
    fn refreshed_meta(created: SystemTime, provenance: SystemTime, vary: bool) -> CacheMeta {
        let fresh_until = created + Duration::from_secs(60);
        let internal = rmp_serde::to_vec(&(
            2u8,
            fresh_until,
            created,
            created,
            0u32,
            0u32,
            None::<[u8; 16]>,
            None::<SystemTime>,
            Some(provenance),
        ))
        .expect("encode");
        let plain = CacheMeta::new(fresh_until, created, 0, 0, header(vary));
        let (_, header_bytes) = plain.serialize().expect("serialize");
        let meta = CacheMeta::deserialize(&internal, &header_bytes).expect("a version 2 meta");
        assert_eq!(
            meta.provenance(),
            provenance,
            "the layout above is Pingora's"
        );
        meta
    }

    #[test]
    fn new_meta_is_kept_parsed() {
        let now = SystemTime::now();
        let mut meta = CacheMeta::new(now + Duration::from_secs(60), now, 10, 20, header(true));
        meta.set_variance([7u8; 16]);
        meta.set_epoch_override(now - Duration::from_secs(5));

        let stored = StoredMeta::of(&meta).expect("store");
        assert!(matches!(stored, StoredMeta::Parsed(_)));
        let rebuilt = stored.rebuild().expect("rebuild");
        assert_behaves_same(&rebuilt, &meta, true);
        // Nothing was approximated, so even the serialized internal fields are equal.
        let internal = |meta: &CacheMeta| meta.serialize().map(|(internal, _)| internal).ok();
        assert_eq!(internal(&rebuilt), internal(&meta));
    }

    #[test]
    fn revalidated_meta_is_kept_parsed() {
        let created = SystemTime::now() - Duration::from_secs(120);
        let fresh_until = created + Duration::from_secs(60);
        let mut meta = CacheMeta::new(fresh_until, created, 0, 0, header(true));
        // What a 304 does: new freshness, and `updated` set to now.
        meta.update_freshness(SystemTime::now() + Duration::from_secs(60), 0, 0);
        assert_ne!(meta.updated(), meta.created());

        let stored = StoredMeta::of(&meta).expect("store");
        assert!(matches!(stored, StoredMeta::Parsed(_)));
        let rebuilt = stored.rebuild().expect("rebuild");
        assert_behaves_same(&rebuilt, &meta, true);
        assert_eq!(
            rebuilt.epoch(),
            meta.updated(),
            "the age counts from the refresh"
        );
    }

    #[test]
    fn refreshed_meta_without_vary_is_parsed() {
        let created = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let provenance = created - Duration::from_secs(600);
        let meta = refreshed_meta(created, provenance, false);

        let stored = StoredMeta::of(&meta).expect("store");
        assert!(matches!(stored, StoredMeta::Parsed(_)));
        let rebuilt = stored.rebuild().expect("rebuild");
        assert_behaves_same(&rebuilt, &meta, false);
        assert_eq!(rebuilt.provenance(), created);
    }

    #[test]
    fn refreshed_meta_with_vary_stays_serialized() {
        let created = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let provenance = created - Duration::from_secs(600);
        let meta = refreshed_meta(created, provenance, true);

        let stored = StoredMeta::of(&meta).expect("store");
        assert!(matches!(stored, StoredMeta::Serialized(..)));
        assert_behaves_same(&stored.rebuild().expect("rebuild"), &meta, true);
    }

    #[test]
    fn serialized_from_disk_is_parsed() {
        let now = SystemTime::now();
        let meta = CacheMeta::new(now + Duration::from_secs(60), now, 0, 5, header(false));

        let stored = StoredMeta::from_serialized(meta.serialize().expect("serialize"));
        assert!(matches!(stored, StoredMeta::Parsed(_)));
        assert_behaves_same(&stored.rebuild().expect("rebuild"), &meta, true);
    }

    #[test]
    fn fresh_at_agrees_with_pingora() {
        let now = SystemTime::now();
        let fresh_until = now + Duration::from_secs(60);
        let with_length = |status: u16, vary: bool| {
            let mut header = header(vary);
            header.set_status(status).expect("valid status");
            header
                .append_header("content-length", "3")
                .expect("valid header");
            header
        };
        let mut meta = CacheMeta::new(fresh_until, now, 0, 0, with_length(200, false));
        let epoch = now - Duration::from_secs(5);
        meta.set_epoch_override(epoch);
        let stored = StoredMeta::of(&meta).expect("store");
        for at in [now, fresh_until, fresh_until + Duration::from_nanos(1)] {
            assert_eq!(
                stored.fresh_at(at).is_some(),
                meta.is_fresh(at),
                "fresh at {at:?}"
            );
        }
        let (stored_header, age_from) = stored.fresh_at(now).expect("fresh");
        assert_eq!(age_from, meta.epoch());
        assert_eq!(&stored_header.headers, meta.headers());

        // For these, Pingora's hit path adds a framing field, skips `Accept-Ranges` or picks a
        // variant, so a copy is not the complete response.
        let no_length = CacheMeta::new(fresh_until, now, 0, 0, header(false));
        let not_ok = CacheMeta::new(fresh_until, now, 0, 0, with_length(404, false));
        let varies = CacheMeta::new(fresh_until, now, 0, 0, with_length(200, true));
        for meta in [no_length, not_ok, varies] {
            let stored = StoredMeta::of(&meta).expect("store");
            assert!(stored.fresh_at(now).is_none(), "{:?}", meta.headers());
        }
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
        let stored_value = rebuilt.headers()["x-slice"].as_bytes();
        assert_eq!(stored_value, &buffer[0..16]);
        let inside = buffer.as_ptr_range().contains(&stored_value.as_ptr());
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
