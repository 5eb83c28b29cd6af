//! What the `quota` and `rate_limit` plugins share: the 429 response and the `RateLimit-*`
//! header fields of the IETF "RateLimit header fields for HTTP" draft.

use std::cell::RefCell;
use std::net::{IpAddr, Ipv6Addr};

use http::{HeaderName, HeaderValue, StatusCode};

use crate::LocalResponse;

const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

thread_local! {
    static RECENT: RefCell<Recent> = const {
        RefCell::new(Recent {
            limit: (0, HeaderValue::from_static("0")),
            reset: (0, HeaderValue::from_static("0")),
        })
    };
}

/// The state a worker thread keeps to make `RateLimit-*` values cheaply.
///
/// A budget's limit stays the same and the seconds to its reset change about once a second, so
/// most responses clone the value made last (one reference count) instead of formatting and
/// allocating a new one. The remaining count changes with every request, so each value gets
/// an allocation of its own. A value cut from a shared buffer would keep the whole buffer
/// alive, and an HTTP/2 connection's header compression table keeps recent values.
struct Recent {
    limit: (u64, HeaderValue),
    reset: (u64, HeaderValue),
}

impl Recent {
    /// Returns the value of `number` in `slot`, made again only when the number changed.
    fn reuse(slot: &mut (u64, HeaderValue), number: u64) -> HeaderValue {
        if slot.0 != number {
            *slot = (number, HeaderValue::from(number));
        }
        slot.1.clone()
    }
}

/// The state of one budget for one request, sent downstream as `RateLimit-*` fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetState {
    /// Requests the budget allows per window (`RateLimit-Limit`).
    pub limit: u64,
    /// Requests left in the current window after this one (`RateLimit-Remaining`).
    pub remaining: u64,
    /// Seconds until the budget allows requests again or resets (`RateLimit-Reset`).
    pub reset_secs: u64,
}

impl BudgetState {
    /// Returns the header fields for this state.
    pub fn headers(&self) -> [(HeaderName, HeaderValue); 3] {
        RECENT.with_borrow_mut(|recent| {
            [
                (
                    RATELIMIT_LIMIT,
                    Recent::reuse(&mut recent.limit, self.limit),
                ),
                (RATELIMIT_REMAINING, HeaderValue::from(self.remaining)),
                (
                    RATELIMIT_RESET,
                    Recent::reuse(&mut recent.reset, self.reset_secs),
                ),
            ]
        })
    }
}

/// Returns the network that budgets count a client address against: an IPv4 address itself
/// (also when written as an IPv4-mapped IPv6 address), and the `/64` network of an IPv6
/// address, because one IPv6 client commonly has a whole `/64`.
pub fn client_network(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Builds the `429 Too Many Requests` response for a budget that ran out.
///
/// `budget` names it for the client (`"download requests per hour"`), `retry_after_secs` is
/// when a request would pass again (at least 1). The body is a short JSON document.
pub fn too_many_requests(budget: &str, state: BudgetState, retry_after_secs: u64) -> LocalResponse {
    let retry = retry_after_secs.max(1);
    let body = format!(
        "{{\"error\":\"too_many_requests\",\"budget\":{},\"limit\":{},\"retry_after_secs\":{retry}}}\n",
        quoted_string(budget),
        state.limit
    );
    let mut response = LocalResponse {
        status: StatusCode::TOO_MANY_REQUESTS,
        headers: vec![
            (
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (http::header::RETRY_AFTER, HeaderValue::from(retry)),
            (
                http::header::CACHE_CONTROL,
                HeaderValue::from_static("no-store"),
            ),
        ],
        body: bytes::Bytes::from(body),
    };
    response.headers.extend(state.headers());
    response
}

/// Quotes `text` as a JSON string, which is also a TOML basic string: `"` and `\\` are
/// escaped with a backslash, and the ASCII control characters as `\\u` and four hex digits.
pub(crate) fn quoted_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_ascii_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_many_requests_has_headers_and_body() {
        let state = BudgetState {
            limit: 600,
            remaining: 0,
            reset_secs: 42,
        };
        let response = too_many_requests("index requests per hour", state, 42);
        assert_eq!(response.status, StatusCode::TOO_MANY_REQUESTS);
        let get = |name: &str| {
            response
                .headers
                .iter()
                .find(|(n, _)| n.as_str() == name)
                .map(|(_, v)| v.to_str().unwrap_or_default().to_string())
        };
        assert_eq!(get("retry-after").as_deref(), Some("42"));
        assert_eq!(get("ratelimit-limit").as_deref(), Some("600"));
        assert_eq!(get("ratelimit-remaining").as_deref(), Some("0"));
        assert_eq!(get("ratelimit-reset").as_deref(), Some("42"));
        let body = std::str::from_utf8(&response.body).unwrap_or_default();
        assert!(
            body.contains("\"budget\":\"index requests per hour\""),
            "{body}"
        );
    }

    #[test]
    fn headers_follow_changing_numbers() {
        let text = |state: BudgetState| {
            state
                .headers()
                .map(|(_, value)| value.to_str().unwrap_or_default().to_owned())
        };
        let state = |limit, remaining, reset_secs| BudgetState {
            limit,
            remaining,
            reset_secs,
        };
        assert_eq!(text(state(600, 599, 42)), ["600", "599", "42"]);
        assert_eq!(text(state(600, 598, 42)), ["600", "598", "42"]);
        assert_eq!(text(state(20, 0, 1)), ["20", "0", "1"]);
        assert_eq!(text(state(600, 597, 41)), ["600", "597", "41"]);
        assert_eq!(text(state(0, 0, 0)), ["0", "0", "0"]);
        assert_eq!(
            text(state(u64::MAX, u64::MAX, 3600)),
            [u64::MAX.to_string(), u64::MAX.to_string(), "3600".into()]
        );
    }

    #[test]
    fn client_network_groups_ipv6_by_64() {
        let network = |text: &str| client_network(text.parse().expect("address")).to_string();
        assert_eq!(network("198.51.100.7"), "198.51.100.7");
        assert_eq!(network("::ffff:198.51.100.7"), "198.51.100.7");
        assert_eq!(network("2001:db8:1:2:aaaa::3"), "2001:db8:1:2::");
        assert_eq!(network("2001:db8:1:2::ffff"), "2001:db8:1:2::");
        assert_eq!(network("::1"), "::");
    }

    #[test]
    fn retry_after_is_at_least_one_second() {
        let state = BudgetState {
            limit: 1,
            remaining: 0,
            reset_secs: 0,
        };
        let response = too_many_requests("x", state, 0);
        let retry = response
            .headers
            .iter()
            .find(|(n, _)| *n == http::header::RETRY_AFTER);
        assert_eq!(
            retry.map(|(_, v)| v.to_str().unwrap_or_default()),
            Some("1")
        );
    }
}
