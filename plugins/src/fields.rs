//! Setting response header fields cheaply, on every response.
//!
//! `ResponseHeader::insert_header` turns each name into its title-case spelling, parses it
//! back into a `HeaderName` and keeps both in two maps, so every field costs a few
//! allocations. [`insert`] writes into the `http::HeaderMap` itself instead. The first call
//! drops the header's record of the origin's name spelling: from then on the names Pingora
//! spells itself go out capitalised (`Content-Type`) and all others in lower case (`etag`,
//! `ratelimit-limit`), as HTTP/2 sends every name. HTTP treats names without regard to case.

use http::{HeaderMap, HeaderName, HeaderValue};
use pingora::http::ResponseHeader;

/// Room reserved for fields that later filters set, so that they do not grow the map again.
const SPARE_FIELDS: usize = 6;

/// Sets each field of `fields` on `resp` in order, replacing fields of the same name.
pub fn insert(
    resp: &mut ResponseHeader,
    fields: impl IntoIterator<Item = (HeaderName, HeaderValue)>,
) {
    let fields = fields.into_iter();
    let count = fields.size_hint().0;
    edit(resp, count, |headers| {
        for (name, value) in fields {
            headers.insert(name, value);
        }
    });
}

/// Runs `change` on the header map of `resp`, with room reserved for `count` more fields and
/// those of later filters. For a caller whose fields are not at hand as one iterator.
pub fn edit(resp: &mut ResponseHeader, count: usize, change: impl FnOnce(&mut HeaderMap)) {
    let mut parts = take_parts(resp);
    parts.headers.reserve(count + SPARE_FIELDS);
    change(&mut parts.headers);
    *resp = ResponseHeader::from(parts);
}

/// Moves the status, version and header map out of `resp`, leaving an empty header behind.
fn take_parts(resp: &mut ResponseHeader) -> http::response::Parts {
    let (empty, ()) = http::Response::new(()).into_parts();
    std::mem::replace(resp, ResponseHeader::from(empty)).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_replaces_and_keeps_fields() {
        let mut resp = ResponseHeader::build(203, None).expect("status");
        resp.insert_header("X-Origin-Field", "kept").expect("name");
        resp.insert_header("RateLimit-Limit", "1").expect("name");
        insert(
            &mut resp,
            [
                (
                    HeaderName::from_static("ratelimit-limit"),
                    HeaderValue::from(600u64),
                ),
                (
                    HeaderName::from_static("x-cache-status"),
                    HeaderValue::from_static("HIT"),
                ),
            ],
        );
        assert_eq!(resp.status.as_u16(), 203);
        assert_eq!(resp.headers.get_all("ratelimit-limit").iter().count(), 1);
        assert_eq!(resp.headers["ratelimit-limit"], "600");
        assert_eq!(resp.headers["x-cache-status"], "HIT");
        assert_eq!(resp.headers["x-origin-field"], "kept");

        let mut wire = Vec::new();
        resp.header_to_h1_wire(&mut wire);
        let wire = String::from_utf8(wire).expect("ascii");
        assert!(wire.contains("x-origin-field: kept\r\n"), "{wire}");
        assert!(wire.contains("ratelimit-limit: 600\r\n"), "{wire}");
    }

    #[test]
    fn later_pingora_inserts_work() {
        let mut resp = ResponseHeader::build(200, None).expect("status");
        insert(
            &mut resp,
            [(
                HeaderName::from_static("x-cache-status"),
                HeaderValue::from_static("MISS"),
            )],
        );
        resp.insert_header(http::header::CONTENT_LENGTH, 5)
            .expect("insert");
        let mut wire = Vec::new();
        resp.header_to_h1_wire(&mut wire);
        let wire = String::from_utf8(wire).expect("ascii");
        assert!(wire.contains("Content-Length: 5\r\n"), "{wire}");
        assert!(wire.contains("x-cache-status: MISS\r\n"), "{wire}");
    }
}
