//! Maps a request's `Host` header to the mirror domain that serves it.
//!
//! Patterns are either exact names (`mirror-primary.stella-ops.org`, `localhost`, `127.0.0.1`,
//! `[::1]`) or wildcards of the form `*.suffix`. As in nginx, `*.example.org` matches any name
//! with one or more labels in front of `example.org` (`a.example.org`, `a.b.example.org`) but not
//! `example.org` itself. List that name separately if it should match too. Wildcards never match
//! IP addresses. The nginx rules are at <https://nginx.org/en/docs/http/server_names.html>.
//!
//! Patterns and looked-up hosts are compared in lower case with one trailing dot removed. IPv6
//! literals are compared in their canonical text form, so `[0:0::1]` and `[::1]` are the same
//! host. A lookup tries the exact names first, then the wildcard with the longest suffix.

use std::borrow::Cow;
use std::collections::HashMap;

use foldhash::fast::RandomState;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Maximum length of a host name in bytes, after the trailing dot is removed.
const MAX_NAME_BYTES: usize = 253;

/// Maximum length of one DNS label in bytes.
const MAX_LABEL_BYTES: usize = 63;

/// Lookup table from `Host` header values to domain indexes, built once per configuration.
#[derive(Debug, Clone, Default)]
pub struct HostMatcher {
    /// Exact host names (lower case, canonical IPv6 in brackets) to domain index.
    exact: HashMap<String, usize, RandomState>,
    /// Wildcard suffixes (`example.org` for `*.example.org`) to domain index.
    wildcard: HashMap<String, usize, RandomState>,
}

/// Reason a host pattern list was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// A pattern that is not a valid host name or wildcard.
    #[error("host pattern {pattern:?} for domain #{domain} is invalid: {reason}")]
    Invalid {
        pattern: String,
        domain: usize,
        reason: &'static str,
    },
    /// A normalised pattern listed for two different domains.
    #[error("duplicate host pattern {name:?} in domain #{first} and domain #{second}: list it in one domain only")]
    Duplicate {
        name: String,
        first: usize,
        second: usize,
    },
}

impl HostMatcher {
    /// Builds a matcher from `(pattern, domain index)` pairs.
    ///
    /// A pattern listed twice for the same domain is accepted once.
    ///
    /// # Errors
    ///
    /// Returns [`HostError::Invalid`] for a malformed pattern (empty, whitespace, a port, `*`
    /// anywhere but as a whole first label, a bare `*` or `*.`, bad characters, over-long names)
    /// and [`HostError::Duplicate`] when one name is given to two domains.
    pub fn new(patterns: impl IntoIterator<Item = (String, usize)>) -> Result<Self, HostError> {
        let mut matcher = HostMatcher::default();
        for (pattern, domain) in patterns {
            let invalid = |reason| HostError::Invalid {
                pattern: pattern.clone(),
                domain,
                reason,
            };
            let (name, is_wildcard) = parse_pattern(&pattern).map_err(invalid)?;
            let map = if is_wildcard {
                &mut matcher.wildcard
            } else {
                &mut matcher.exact
            };
            match map.get(&name) {
                Some(&first) if first != domain => {
                    let name = if is_wildcard {
                        format!("*.{name}")
                    } else {
                        name
                    };
                    return Err(HostError::Duplicate {
                        name,
                        first,
                        second: domain,
                    });
                }
                Some(_) => {}
                None => {
                    map.insert(name, domain);
                }
            }
        }
        Ok(matcher)
    }

    /// Returns the domain index for a `Host` header value, or `None` when nothing matches.
    ///
    /// The value is lower-cased, a port (`host:8080`, `[::1]:8080`) and one trailing dot are
    /// removed. A malformed value (bad port, unbracketed IPv6, empty) matches nothing.
    pub fn lookup(&self, host_header: &str) -> Option<usize> {
        let host = host_without_port(host_header)?;
        let host = host.strip_suffix('.').unwrap_or(host);
        if host.is_empty() || host.len() > MAX_NAME_BYTES + 2 {
            return None;
        }
        if host.starts_with('[') {
            let canonical = canonical_ipv6(host)?;
            return self.exact.get(&canonical).copied();
        }
        let host = lower_case(host);
        if let Some(&domain) = self.exact.get(host.as_ref()) {
            return Some(domain);
        }
        if host.parse::<Ipv4Addr>().is_ok() {
            return None;
        }
        self.longest_wildcard(&host)
    }

    /// Walks the label boundaries of `host` from the left, so the longest suffix is tried first.
    fn longest_wildcard(&self, host: &str) -> Option<usize> {
        if self.wildcard.is_empty() {
            return None;
        }
        host.match_indices('.')
            .find_map(|(dot, _)| self.wildcard.get(&host[dot + 1..]).copied())
    }
}

/// Splits off a port and returns the host part, or `None` when the port or brackets are malformed.
fn host_without_port(value: &str) -> Option<&str> {
    let (host, port) = if value.starts_with('[') {
        let close = value.find(']')?;
        let (host, rest) = value.split_at(close + 1);
        match rest.strip_prefix(':') {
            Some(port) => (host, port),
            None if rest.is_empty() => (host, ""),
            None => return None,
        }
    } else {
        match value.split_once(':') {
            Some((host, port)) => (host, port),
            None => (value, ""),
        }
    };
    port.bytes().all(|b| b.is_ascii_digit()).then_some(host)
}

/// Lower-cases a host, allocating only when it has upper-case letters.
fn lower_case(host: &str) -> Cow<'_, str> {
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// Rewrites a bracketed IPv6 literal in its canonical text form, e.g. `[0:0::1]` as `[::1]`.
fn canonical_ipv6(bracketed: &str) -> Option<String> {
    let inner = bracketed.strip_prefix('[')?.strip_suffix(']')?;
    let address: Ipv6Addr = inner.parse().ok()?;
    Some(format!("[{address}]"))
}

/// Normalises one pattern, returning the name to store and whether it is a wildcard.
fn parse_pattern(pattern: &str) -> Result<(String, bool), &'static str> {
    if pattern.is_empty() {
        return Err("it is empty");
    }
    if pattern.chars().any(char::is_whitespace) {
        return Err("it contains whitespace");
    }
    if pattern.starts_with('[') {
        return canonical_ipv6(pattern)
            .map(|name| (name, false))
            .ok_or("it is not a bracketed IPv6 address such as [::1]");
    }
    let lower = pattern.to_ascii_lowercase();
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    let (suffix, is_wildcard) = match name.strip_prefix("*.") {
        Some(suffix) => (suffix, true),
        None => (name, false),
    };
    if suffix.contains('*') || name == "*" {
        return Err("'*' is only allowed as the whole first label, as in *.example.org");
    }
    if suffix.is_empty() {
        return Err("a wildcard needs a domain after '*.'");
    }
    check_dns_name(suffix)?;
    Ok((suffix.to_owned(), is_wildcard))
}

/// Checks a lower-case DNS name: labels of letters, digits, `-` and `_`, within length limits.
fn check_dns_name(name: &str) -> Result<(), &'static str> {
    if name.len() > MAX_NAME_BYTES {
        return Err("the name is longer than 253 bytes");
    }
    if name.contains(':') {
        return Err("patterns take no port; remove the ':port' part");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("it has an empty label (two dots in a row or a leading dot)");
        }
        if label.len() > MAX_LABEL_BYTES {
            return Err("a label is longer than 63 bytes");
        }
        let allowed =
            |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_';
        if !label.bytes().all(allowed) {
            return Err(
                "only letters, digits, '-', '_' and '.' are allowed (use punycode for IDNs)",
            );
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label may not start or end with '-'");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(patterns: &[(&str, usize)]) -> Result<HostMatcher, HostError> {
        HostMatcher::new(patterns.iter().map(|(p, d)| (p.to_string(), *d)))
    }

    fn sample() -> HostMatcher {
        matcher(&[
            ("mirror-primary.stella-ops.org", 0),
            ("Mirror-Community.Stella-Ops.org.", 1),
            ("localhost", 2),
            ("127.0.0.1", 2),
            ("[::1]", 2),
            ("*.a.example", 3),
            ("*.b.a.example", 4),
            ("exact.b.a.example", 5),
        ])
        .expect("sample patterns are valid")
    }

    /// Host header values and the domain they select.
    const LOOKUPS: &[(&str, Option<usize>)] = &[
        ("mirror-primary.stella-ops.org", Some(0)),
        ("MIRROR-PRIMARY.Stella-Ops.ORG", Some(0)),
        ("mirror-primary.stella-ops.org.", Some(0)),
        ("mirror-primary.stella-ops.org:443", Some(0)),
        ("mirror-primary.stella-ops.org.:8443", Some(0)),
        ("mirror-primary.stella-ops.org:", Some(0)),
        ("mirror-community.stella-ops.org", Some(1)),
        ("localhost:8080", Some(2)),
        ("127.0.0.1", Some(2)),
        ("127.0.0.1:80", Some(2)),
        ("[::1]", Some(2)),
        ("[::1]:8080", Some(2)),
        ("[0:0:0:0:0:0:0:1]:8080", Some(2)),
        ("x.a.example", Some(3)),
        ("x.y.a.example", Some(3)),
        ("x.b.a.example", Some(4)),
        ("x.y.b.a.example", Some(4)),
        ("b.a.example", Some(3)),
        ("exact.b.a.example", Some(5)),
        ("a.example", None),
        ("example", None),
        ("xa.example", None),
        ("stella-ops.org", None),
        ("other.stella-ops.org", None),
        ("mirror-primary.stella-ops.org..", None),
        ("mirror-primary.stella-ops.org:https", None),
        ("localhost:80:80", None),
        ("::1", None),
        ("[::1", None),
        ("[::1]x", None),
        ("[::2]", None),
        ("[nonsense]", None),
        ("", None),
        (".", None),
        (":80", None),
    ];

    #[test]
    fn lookup_table() {
        let hosts = sample();
        for (header, want) in LOOKUPS {
            assert_eq!(hosts.lookup(header), *want, "host header {header:?}");
        }
    }

    #[test]
    fn lookup_wildcard_skips_ipv4() {
        let hosts = matcher(&[("*.0.1", 0)]).expect("pattern is valid");
        assert_eq!(hosts.lookup("10.0.0.1"), None);
    }

    #[test]
    fn lookup_empty_matcher() {
        let hosts = matcher(&[]).expect("no patterns is valid");
        assert_eq!(hosts.lookup("localhost"), None);
    }

    #[test]
    fn new_rejects_invalid() {
        let cases = [
            "",
            " ",
            "mirror.example ",
            "mirror .example",
            "*",
            "*.",
            "*..",
            "a.*.example",
            "*a.example",
            "**.example",
            "*.*.example",
            "a*.example",
            ".example",
            "a..example",
            "localhost:8080",
            "[::1]:8080",
            "[not-ipv6]",
            "café.example",
            "-a.example",
            "a-.example",
            "a/b",
            "..",
        ];
        for pattern in cases {
            let got = matcher(&[(pattern, 0)]);
            assert!(
                matches!(got, Err(HostError::Invalid { .. })),
                "pattern {pattern:?} gave {got:?}"
            );
        }
    }

    #[test]
    fn new_rejects_long_label() {
        let pattern = format!("{}.example", "a".repeat(64));
        let got = matcher(&[(&pattern, 0)]);
        assert!(matches!(got, Err(HostError::Invalid { .. })), "{got:?}");
    }

    #[test]
    fn new_accepts_longest_label() {
        let pattern = format!("{}.example", "a".repeat(63));
        let hosts = matcher(&[(&pattern, 7)]).expect("63-byte label is valid");
        assert_eq!(hosts.lookup(&pattern), Some(7));
    }

    #[test]
    fn new_rejects_duplicate_exact() {
        let got = matcher(&[("Mirror.Example", 0), ("mirror.example.", 1)]);
        let want = HostError::Duplicate {
            name: "mirror.example".into(),
            first: 0,
            second: 1,
        };
        assert_eq!(got.err(), Some(want));
    }

    #[test]
    fn new_rejects_duplicate_wildcard() {
        let got = matcher(&[("*.mirror.example", 2), ("*.MIRROR.example", 0)]);
        let want = HostError::Duplicate {
            name: "*.mirror.example".into(),
            first: 2,
            second: 0,
        };
        assert_eq!(got.err(), Some(want));
    }

    #[test]
    fn new_rejects_duplicate_ipv6() {
        let got = matcher(&[("[::1]", 0), ("[0::1]", 1)]);
        assert!(matches!(got, Err(HostError::Duplicate { .. })), "{got:?}");
    }

    #[test]
    fn new_accepts_repeat_same_domain() {
        let hosts = matcher(&[("localhost", 1), ("LOCALHOST", 1)]).expect("same domain twice");
        assert_eq!(hosts.lookup("localhost"), Some(1));
    }

    #[test]
    fn new_accepts_wildcard_and_exact_apart() {
        let hosts = matcher(&[("*.mirror.example", 0), ("mirror.example", 1)])
            .expect("wildcard and its apex are different names");
        assert_eq!(hosts.lookup("mirror.example"), Some(1));
    }

    #[test]
    fn error_display_names_both_domains() {
        let err = matcher(&[("a.example", 3), ("a.example", 4)]).err();
        let text = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(text.contains("#3"), "{text:?}");
        assert!(text.contains("#4"), "{text:?}");
    }

    #[test]
    fn error_display_names_pattern() {
        let err = matcher(&[("a.*.example", 0)]).err();
        let text = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(text.contains("a.*.example"), "{text:?}");
    }
}
