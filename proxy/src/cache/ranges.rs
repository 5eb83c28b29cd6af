//! The part of a response that a `Range` request gets.
//!
//! Pingora's range filter does the work, with three corrections of RFC 9110, section 14:
//!
//! - A weak entity tag in `If-Range`, or a weak stored `ETag`, never matches (section 13.1.5
//!   requires the strong comparison), so the whole response goes out.
//! - A suffix range of length zero (`bytes=-0`) and any range of an empty representation are
//!   unsatisfiable: `416` with `Content-Range: bytes */N`. Pingora sends a `206` for those,
//!   whose `Content-Range` ends before it starts.
//! - A set of several ranges that contains such a range is ignored: the whole response goes
//!   out, which a server may always do.

use std::str::FromStr;

use http::header::{
    ACCEPT_RANGES, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, IF_RANGE,
    LAST_MODIFIED, RANGE, TRANSFER_ENCODING,
};
use http::{HeaderValue, Method, StatusCode};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{range_header_filter, RangeType};

/// Ranges in one request at most; a request with more gets the whole response.
const MAX_RANGES: Option<usize> = Some(200);

/// Decides which part of `resp` goes out for the `Range` of `req`, and sets the status and
/// fields that go with the decision.
pub fn apply(req: &RequestHeader, resp: &mut ResponseHeader) -> RangeType {
    let Some(length) = rangeable_length(req, resp) else {
        return range_header_filter(req, resp, MAX_RANGES);
    };
    if !if_range_matches(req, resp) {
        return whole(resp);
    }
    match empty_ranges(req, length) {
        EmptyRanges::None => range_header_filter(req, resp, MAX_RANGES),
        EmptyRanges::All => unsatisfiable(resp, length),
        EmptyRanges::Some => whole(resp),
    }
}

/// Returns the length of `resp` when `req` requests ranges of it: a `GET` or `HEAD` with a
/// `Range` field, and a `200` response with a valid `Content-Length`.
fn rangeable_length(req: &RequestHeader, resp: &ResponseHeader) -> Option<u64> {
    if resp.status != StatusCode::OK
        || !(req.method == Method::GET || req.method == Method::HEAD)
        || !req.headers.contains_key(RANGE)
    {
        return None;
    }
    content_length(resp)
}

/// Returns the `Content-Length` of `resp`, when it has a valid one.
pub fn content_length(resp: &ResponseHeader) -> Option<u64> {
    let length = resp.headers.get(CONTENT_LENGTH)?.to_str().ok()?;
    u64::from_str(length).ok()
}

/// Returns whether the `If-Range` of `req` matches `resp`, by the strong comparison; true
/// without an `If-Range`.
fn if_range_matches(req: &RequestHeader, resp: &ResponseHeader) -> bool {
    let Some(validator) = req.headers.get(IF_RANGE) else {
        return true;
    };
    let validator = validator.as_bytes();
    if validator.starts_with(b"\"") || validator.starts_with(b"W/") {
        let stored = resp.headers.get(ETAG).map(HeaderValue::as_bytes);
        return !validator.starts_with(b"W/") && stored.is_some_and(|tag| tag == validator);
    }
    resp.headers
        .get(LAST_MODIFIED)
        .is_some_and(|date| date.as_bytes() == validator)
}

/// How many of a request's ranges select no byte.
#[derive(Debug, PartialEq, Eq)]
enum EmptyRanges {
    None,
    Some,
    All,
}

/// Counts the ranges of `req` that select nothing of a representation of `length` bytes:
/// suffix ranges of length zero, and every range when `length` is zero. A `Range` that is not a
/// valid `bytes` range set counts as none; Pingora ignores it.
fn empty_ranges(req: &RequestHeader, length: u64) -> EmptyRanges {
    let Some(set) = req
        .headers
        .get(RANGE)
        .and_then(|range| range.to_str().ok())
        .and_then(|range| range.split_once('='))
        .filter(|(unit, _)| unit.eq_ignore_ascii_case("bytes"))
        .map(|(_, set)| set)
    else {
        return EmptyRanges::None;
    };
    let specs: Vec<&str> = set.split(',').map(str::trim).collect();
    if !specs.iter().all(|spec| is_range_spec(spec)) {
        return EmptyRanges::None;
    }
    let empty = specs
        .iter()
        .filter(|spec| length == 0 || is_zero_suffix(spec))
        .count();
    match empty {
        0 => EmptyRanges::None,
        n if n == specs.len() => EmptyRanges::All,
        _ => EmptyRanges::Some,
    }
}

/// Returns whether `spec` is a byte range: `first-last`, `first-` or `-suffix`, in digits.
fn is_range_spec(spec: &str) -> bool {
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    spec.split_once('-').is_some_and(|(first, last)| {
        digits(first) && digits(last) && !(first.is_empty() && last.is_empty())
    })
}

/// Returns whether `spec` is a suffix range of length zero: `-0`, `-00`, ...
fn is_zero_suffix(spec: &str) -> bool {
    spec.strip_prefix('-')
        .is_some_and(|digits| !digits.is_empty() && digits.bytes().all(|b| b == b'0'))
}

/// Leaves `resp` whole, marked as one that ranges may be asked of.
fn whole(resp: &mut ResponseHeader) -> RangeType {
    // The insert fails only for an invalid name or value, and these are valid.
    let _ = resp.insert_header(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    RangeType::None
}

/// Turns `resp` into a `416` for a representation of `length` bytes.
fn unsatisfiable(resp: &mut ResponseHeader, length: u64) -> RangeType {
    // A valid status code, and valid names and values: none of these can fail.
    let _ = resp.set_status(StatusCode::RANGE_NOT_SATISFIABLE);
    for name in [
        ACCEPT_RANGES,
        CONTENT_TYPE,
        CONTENT_ENCODING,
        TRANSFER_ENCODING,
    ] {
        resp.remove_header(&name);
    }
    let _ = resp.insert_header(CONTENT_LENGTH, HeaderValue::from_static("0"));
    let _ = resp.insert_header(CONTENT_RANGE, format!("bytes */{length}"));
    RangeType::Invalid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(fields: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build(Method::GET, b"/bundle", None).expect("request");
        for (name, value) in fields {
            req.insert_header(name.to_string(), *value).expect("field");
        }
        req
    }

    fn response(length: u64) -> ResponseHeader {
        let mut resp = ResponseHeader::build(200, None).expect("response");
        resp.insert_header("content-length", length).expect("field");
        resp.insert_header("content-type", "application/json")
            .expect("field");
        resp.insert_header("etag", "\"strong\"").expect("field");
        resp.insert_header("last-modified", "Tue, 01 Dec 2026 00:00:00 GMT")
            .expect("field");
        resp
    }

    fn field<'a>(resp: &'a ResponseHeader, name: &str) -> Option<&'a str> {
        resp.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Returns the status and `Content-Range` that `range` (with `if_range`) gets from a
    /// response of `length` bytes.
    fn answer(range: &str, if_range: Option<&str>, length: u64) -> (u16, Option<String>) {
        let mut fields = vec![("range", range)];
        fields.extend(if_range.map(|tag| ("if-range", tag)));
        let mut resp = response(length);
        apply(&request(&fields), &mut resp);
        (
            resp.status.as_u16(),
            field(&resp, "content-range").map(str::to_owned),
        )
    }

    #[test]
    fn empty_ranges_are_unsatisfiable() {
        let unsatisfiable = |length: u64| (416, Some(format!("bytes */{length}")));
        assert_eq!(answer("bytes=-0", None, 1000), unsatisfiable(1000));
        assert_eq!(answer("bytes=-000", None, 1000), unsatisfiable(1000));
        assert_eq!(answer("bytes=-5", None, 0), unsatisfiable(0));
        assert_eq!(answer("bytes=0-", None, 0), unsatisfiable(0));
        assert_eq!(answer("bytes=0-0,-0", None, 0), unsatisfiable(0));
        // With another range the set is ignored and the whole response goes out.
        assert_eq!(answer("bytes=0-9,-0", None, 1000), (200, None));

        let mut resp = response(1000);
        apply(&request(&[("range", "bytes=-0")]), &mut resp);
        assert_eq!(field(&resp, "content-length"), Some("0"));
        assert_eq!(field(&resp, "content-type"), None);
        assert_eq!(field(&resp, "accept-ranges"), None);
    }

    #[test]
    fn satisfiable_ranges_go_to_pingora() {
        let partial = |range: &str| (206, Some(range.to_owned()));
        assert_eq!(
            answer("bytes=-1", None, 1000),
            partial("bytes 999-999/1000")
        );
        assert_eq!(answer("bytes=0-9", None, 1000), partial("bytes 0-9/1000"));
        assert_eq!(answer("bytes=5-", None, 10), partial("bytes 5-9/10"));
        assert_eq!(answer("bytes=1000-", None, 1000).0, 416);
    }

    #[test]
    fn if_range_compares_strongly() {
        let partial = (206, Some("bytes 0-9/1000".to_owned()));
        let date = "Tue, 01 Dec 2026 00:00:00 GMT";
        assert_eq!(answer("bytes=0-9", Some("\"strong\""), 1000), partial);
        assert_eq!(answer("bytes=0-9", Some(date), 1000), partial);
        for other in ["W/\"strong\"", "\"other\"", "Wed, 02 Dec 2026 00:00:00 GMT"] {
            assert_eq!(
                answer("bytes=0-9", Some(other), 1000),
                (200, None),
                "{other}"
            );
        }
        // A weak stored tag matches nothing, even itself.
        let mut resp = response(1000);
        resp.insert_header("etag", "W/\"weak\"").expect("field");
        let req = request(&[("range", "bytes=0-9"), ("if-range", "W/\"weak\"")]);
        assert!(matches!(apply(&req, &mut resp), RangeType::None));
        assert_eq!(resp.status.as_u16(), 200);
        assert_eq!(field(&resp, "accept-ranges"), Some("bytes"));
        // A mismatched If-Range leaves even an empty range unanswered as a range.
        assert_eq!(answer("bytes=-0", Some("\"other\""), 1000), (200, None));
    }

    #[test]
    fn other_requests_are_left_to_pingora() {
        let mut resp = response(1000);
        assert!(matches!(apply(&request(&[]), &mut resp), RangeType::None));
        assert_eq!(field(&resp, "accept-ranges"), Some("bytes"));
        assert_eq!(answer("items=-0", None, 1000), (200, None));
        // Pingora reads only `bytes=`, and ignores a set with a part it cannot read.
        assert_eq!(answer("bytes =-0", None, 1000), (200, None));
        assert_eq!(answer("bytes=-0,x", None, 1000), (200, None));
    }
}
