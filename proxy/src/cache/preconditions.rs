//! `If-Match` and `If-Unmodified-Since` on responses served from the cache (RFC 9110, section
//! 13.2.2): a failed precondition gets `412 Precondition Failed`, as nginx returns for files and
//! cached responses.
//!
//! The evaluation follows the RFC's order: `If-Match` when present, else `If-Unmodified-Since`.
//! Both apply only to a `2xx` response: a server ignores preconditions on a request whose
//! response without them would have another status. `If-None-Match` and `If-Modified-Since`
//! come after these, in Pingora's filter.

use std::time::SystemTime;

use http::header::{ETAG, IF_MATCH, IF_UNMODIFIED_SINCE, LAST_MODIFIED};
use pingora::http::{RequestHeader, ResponseHeader};

/// Returns whether `req` carries a precondition that `resp` fails, so that the client gets
/// `412` instead of `resp`.
pub fn fails(req: &RequestHeader, resp: &ResponseHeader) -> bool {
    if !resp.status.is_success() {
        return false;
    }
    if let Some(condition) = req.headers.get(IF_MATCH) {
        let current = resp.headers.get(ETAG).map(|tag| tag.as_bytes());
        return !if_match_passes(condition.as_bytes(), current);
    }
    let Some(since) = req.headers.get(IF_UNMODIFIED_SINCE) else {
        return false;
    };
    // An invalid date is ignored (RFC 9110, section 13.1.4), and so is a response without a
    // valid `Last-Modified`, as nginx does: there is no date to compare.
    match (
        http_date(since),
        resp.headers.get(LAST_MODIFIED).and_then(http_date),
    ) {
        (Some(since), Some(modified)) => modified > since,
        _ => false,
    }
}

/// Evaluates an `If-Match` field value against the response's `ETag` (RFC 9110, section
/// 13.1.1): `*` passes for any current representation, a list passes when one of its entity
/// tags matches `current` by the strong comparison. A weak tag on either side never matches,
/// and a value that is not a valid list fails.
fn if_match_passes(condition: &[u8], current: Option<&[u8]>) -> bool {
    if condition.trim_ascii() == b"*" {
        return true;
    }
    let Some(current) = current.filter(|tag| !tag.starts_with(b"W/")) else {
        return false;
    };
    let mut rest = condition;
    loop {
        rest = rest.trim_ascii_start();
        while let Some(after) = rest.strip_prefix(b",") {
            rest = after.trim_ascii_start();
        }
        if rest.is_empty() {
            return false;
        }
        let weak = rest.starts_with(b"W/");
        let tag_start = if weak { &rest[2..] } else { rest };
        let Some(after_quote) = tag_start.strip_prefix(b"\"") else {
            return false;
        };
        let Some(end) = after_quote.iter().position(|&b| b == b'"') else {
            return false;
        };
        let tag = &tag_start[..end + 2];
        if !weak && tag == current {
            return true;
        }
        rest = &after_quote[end + 1..];
    }
}

/// Parses an HTTP date in any of the three formats RFC 9110 allows.
fn http_date(value: &http::HeaderValue) -> Option<SystemTime> {
    httpdate::parse_http_date(value.to_str().ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(request: &[(&str, &str)], status: u16, response: &[(&str, &str)]) -> bool {
        let mut req = RequestHeader::build("GET", b"/bundle.json", None).expect("request");
        for (name, value) in request {
            req.insert_header(name.to_string(), *value).expect("field");
        }
        let mut resp = ResponseHeader::build(status, None).expect("response");
        for (name, value) in response {
            resp.insert_header(name.to_string(), *value).expect("field");
        }
        fails(&req, &resp)
    }

    const STORED: &[(&str, &str)] = &[
        ("etag", "\"v2\""),
        ("last-modified", "Tue, 01 Dec 2026 10:00:00 GMT"),
    ];

    #[test]
    fn if_match_compares_strongly() {
        let cases = [
            ("\"v2\"", false),
            ("*", false),
            ("\"v1\", \"v2\"", false),
            (",, \"v1\" ,\"v2\"", false),
            ("\"v1\"", true),
            ("W/\"v2\"", true),
            ("v2", true),
            ("\"v2", true),
            ("", true),
        ];
        for (condition, fails) in cases {
            assert_eq!(
                exchange(&[("if-match", condition)], 200, STORED),
                fails,
                "If-Match: {condition}"
            );
        }
    }

    #[test]
    fn if_match_without_strong_etag() {
        assert!(exchange(&[("if-match", "\"v2\"")], 200, &[]));
        assert!(exchange(
            &[("if-match", "W/\"v2\"")],
            200,
            &[("etag", "W/\"v2\"")]
        ));
        assert!(!exchange(&[("if-match", "*")], 200, &[]));
    }

    #[test]
    fn if_match_tag_may_hold_comma() {
        let stored = [("etag", "\"a,b\"")];
        assert!(!exchange(&[("if-match", "\"x\", \"a,b\"")], 200, &stored));
        assert!(exchange(&[("if-match", "\"a\", \"b\"")], 200, &stored));
    }

    #[test]
    fn if_unmodified_since_compares_dates() {
        let cases = [
            ("Tue, 01 Dec 2026 10:00:00 GMT", false),
            ("Wed, 02 Dec 2026 00:00:00 GMT", false),
            ("Tuesday, 01-Dec-26 10:00:00 GMT", false),
            ("Tue Dec  1 10:00:00 2026", false),
            ("Tue, 01 Dec 2026 09:59:59 GMT", true),
            ("yesterday", false),
        ];
        for (date, fails) in cases {
            assert_eq!(
                exchange(&[("if-unmodified-since", date)], 200, STORED),
                fails,
                "If-Unmodified-Since: {date}"
            );
        }
        let old = [("if-unmodified-since", "Mon, 01 Jan 2024 00:00:00 GMT")];
        assert!(!exchange(&old, 200, &[]), "no Last-Modified to compare");
    }

    #[test]
    fn if_match_takes_precedence() {
        let request = [
            ("if-match", "\"v2\""),
            ("if-unmodified-since", "Mon, 01 Jan 2024 00:00:00 GMT"),
        ];
        assert!(!exchange(&request, 200, STORED));
    }

    #[test]
    fn non_2xx_ignores_preconditions() {
        assert!(!exchange(&[("if-match", "\"v1\"")], 404, STORED));
        assert!(exchange(&[("if-match", "\"v1\"")], 204, STORED));
    }
}
