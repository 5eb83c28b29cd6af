//! Normalises request paths into the one canonical form that routing, auth, cache keys and the file server share.
//!
//! [`normalize`] takes the path part of an origin-form request target (the caller has already cut
//! the query off at the first `?`) and applies these rules, in this order:
//!
//! 1. The raw path may be at most [`MAX_PATH_BYTES`] bytes and must start with `/`. An empty
//!    path, `*`, and absolute-form leftovers such as `http://host/x` are rejected.
//! 2. Percent escapes are decoded exactly once. `%2e`/`%2E` becomes `.` before dot segments are
//!    resolved, so `/%2e%2e/x` climbs like `/../x`. These are rejected:
//!    - an encoded slash `%2f`/`%2F` (it would move a segment boundary),
//!    - a backslash, raw or encoded as `%5c`/`%5C`,
//!    - a control character (0x00-0x1f, 0x7f), raw or encoded,
//!    - a malformed escape (`%zz`, or a `%` with fewer than two hex digits after it),
//!    - decoded bytes that are not valid UTF-8.
//!
//!    A `%` produced by decoding `%25` is never decoded again: `/%252e%252e/x` gives the literal
//!    path `/%2e%2e/x`, whose segments are names, not dot segments.
//! 3. Runs of slashes collapse to one, `.` segments are dropped and `..` removes the segment
//!    before it. A `..` with nothing left to remove is rejected with [`PathError::AboveRoot`], so
//!    traversal attempts are answered with 400 instead of being silently clamped. At most
//!    [`MAX_SEGMENTS`] non-empty segments (dot segments included) are accepted.
//! 4. A trailing slash is kept (`/a/b/` stays `/a/b/`), and a path that ends in a dot segment
//!    names a directory (`/a/b/..` gives `/a/`, `/a/.` gives `/a/`), as in RFC 3986.
//!
//! The result is the DECODED path: non-ASCII stays UTF-8, `%20` becomes a space, `%3F` a literal
//! `?`. Raw paths that decode to the same bytes name the same resource. Because the result is
//! decoded, it is not itself a request target: feeding it to [`normalize`] again would decode a
//! second time. Use [`encode`] to turn it back into a path that is safe to send upstream or to
//! put in a `Location` header. For every normalised `p`, `normalize(&encode(p))` returns `p`.

use std::fmt::Write as _;

/// Maximum length of a raw path, in bytes.
pub const MAX_PATH_BYTES: usize = 8 * 1024;

/// Maximum number of non-empty segments in one path, dot segments included.
pub const MAX_SEGMENTS: usize = 256;

/// Reason a request path was rejected. Every variant maps to a 400 response.
///
/// Offsets are byte positions in the raw path. The display text never repeats the path itself,
/// so it is safe to log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path is empty or does not start with `/` (`*`, `http://host/x`, `x/y`).
    #[error("invalid request path: it must start with '/', so '*' and absolute URLs are rejected")]
    NotOriginForm,
    /// The raw path is longer than [`MAX_PATH_BYTES`].
    #[error("request path is too long: {len} bytes, the maximum is {MAX_PATH_BYTES}")]
    TooLong { len: usize },
    /// The path has more than [`MAX_SEGMENTS`] non-empty segments.
    #[error("request path has too many segments: the maximum is {MAX_SEGMENTS}")]
    TooManySegments,
    /// A `%` is not followed by two hex digits.
    #[error(
        "invalid percent escape at byte {offset} of the request path: use '%' and two hex digits"
    )]
    BadEscape { offset: usize },
    /// `%2f` or `%2F` appears in the path.
    #[error(
        "encoded slash (%2F) at byte {offset} of the request path is rejected: send '/' as is"
    )]
    EncodedSlash { offset: usize },
    /// A backslash appears, raw or as `%5c`/`%5C`.
    #[error(
        "backslash at byte {offset} of the request path is rejected: separate segments with '/'"
    )]
    Backslash { offset: usize },
    /// A control character (0x00-0x1f or 0x7f) appears, raw or percent-encoded.
    #[error("control character at byte {offset} of the request path is rejected")]
    ControlChar { offset: usize },
    /// The decoded bytes are not valid UTF-8.
    #[error("invalid request path: its percent-decoded bytes are not valid UTF-8")]
    NotUtf8,
    /// A `..` segment would climb above `/`.
    #[error("request path is rejected: a '..' segment climbs above the root")]
    AboveRoot,
}

impl PathError {
    /// Returns a short, stable name for this error, for metrics and access-log fields.
    pub fn label(&self) -> &'static str {
        match self {
            PathError::NotOriginForm => "not_origin_form",
            PathError::TooLong { .. } => "too_long",
            PathError::TooManySegments => "too_many_segments",
            PathError::BadEscape { .. } => "bad_escape",
            PathError::EncodedSlash { .. } => "encoded_slash",
            PathError::Backslash { .. } => "backslash",
            PathError::ControlChar { .. } => "control_char",
            PathError::NotUtf8 => "not_utf8",
            PathError::AboveRoot => "above_root",
        }
    }
}

/// Normalises a raw origin-form request path (no query) by the rules in the module docs.
///
/// Returns the decoded canonical path, which always starts with `/`, never contains `//`, a `.`
/// or `..` segment, a backslash or a control character.
///
/// NOTE: the result is decoded, so it may contain `%`, `?` or `#` as plain characters. Pass it
/// through [`encode`] before it goes into an upstream request or a header.
///
/// # Errors
///
/// Returns a [`PathError`] naming the first rule the path breaks.
pub fn normalize(raw_path: &str) -> Result<String, PathError> {
    if raw_path.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong {
            len: raw_path.len(),
        });
    }
    if !raw_path.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }
    if is_normal(raw_path.as_bytes()) {
        return Ok(raw_path.to_owned());
    }
    decode_and_resolve(raw_path)
}

/// Normalises a path that starts with `/` the long way: decodes, checks and resolves it.
fn decode_and_resolve(raw_path: &str) -> Result<String, PathError> {
    let decoded = decode_once(raw_path.as_bytes())?;
    let decoded = String::from_utf8(decoded).map_err(|_| PathError::NotUtf8)?;
    resolve_segments(&decoded)
}

/// Percent-encodes a normalised path so that it is a valid request target again.
///
/// Letters, digits, `/` and the characters `-._~!$&'()*+,;=:@` are kept. Every other byte
/// (including `%`, `?`, `#`, space and non-ASCII UTF-8) is written as `%XX` in upper-case hex.
/// Use it when the path leaves the gateway, in upstream requests and `Location` headers, because
/// an upstream given the decoded form would decode a literal `%2e` a second time.
pub fn encode(normalized: &str) -> String {
    if normalized.bytes().all(is_path_safe) {
        return normalized.to_owned();
    }
    let mut out = String::with_capacity(normalized.len());
    for &byte in normalized.as_bytes() {
        if is_path_safe(byte) {
            out.push(char::from(byte));
        } else {
            // Writing into a String cannot fail.
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// Tells whether a raw path that starts with `/` is already normal: no escape, no backslash or
/// control byte, no empty or dot segment but a trailing slash, and few enough segments. Most
/// requests are, and [`normalize`] then returns them as they are, without decoding.
fn is_normal(raw: &[u8]) -> bool {
    // One pass: each segment is judged when the slash after it, or the end, is reached.
    let mut slashes = 0;
    let mut segment_start = 0;
    for (i, &byte) in raw.iter().enumerate() {
        match byte {
            b'%' | b'\\' => return false,
            b'/' => {
                if i > 0 && !normal_segment(&raw[segment_start..i], false) {
                    return false;
                }
                slashes += 1;
                segment_start = i + 1;
            }
            byte if byte.is_ascii_control() => return false,
            _ => {}
        }
    }
    normal_segment(&raw[segment_start..], true) && slashes <= MAX_SEGMENTS
}

/// Returns whether a segment stays as it is: not `.` or `..`, and not empty unless it is the
/// `last` one (a trailing slash).
fn normal_segment(segment: &[u8], last: bool) -> bool {
    !matches!(segment, b"." | b"..") && (last || !segment.is_empty())
}

/// Decodes every `%XX` escape once and enforces the byte-level rules.
fn decode_once(raw: &[u8]) -> Result<Vec<u8>, PathError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let offset = i;
        let byte = if raw[i] == b'%' {
            let value = raw
                .get(i + 1..i + 3)
                .and_then(hex_pair)
                .ok_or(PathError::BadEscape { offset })?;
            if value == b'/' {
                return Err(PathError::EncodedSlash { offset });
            }
            i += 3;
            value
        } else {
            i += 1;
            raw[offset]
        };
        if byte == b'\\' {
            return Err(PathError::Backslash { offset });
        }
        if byte.is_ascii_control() {
            return Err(PathError::ControlChar { offset });
        }
        out.push(byte);
    }
    Ok(out)
}

/// Collapses slashes and resolves dot segments of a decoded path that starts with `/`.
fn resolve_segments(decoded: &str) -> Result<String, PathError> {
    let mut stack: Vec<&str> = Vec::new();
    let mut count = 0;
    let mut ends_in_dot_segment = false;
    for segment in decoded.split('/').filter(|s| !s.is_empty()) {
        count += 1;
        if count > MAX_SEGMENTS {
            return Err(PathError::TooManySegments);
        }
        ends_in_dot_segment = matches!(segment, "." | "..");
        match segment {
            "." => {}
            ".." => {
                stack.pop().ok_or(PathError::AboveRoot)?;
            }
            name => stack.push(name),
        }
    }
    let trailing_slash = decoded.ends_with('/') || ends_in_dot_segment;
    let mut out = String::with_capacity(decoded.len());
    for name in &stack {
        out.push('/');
        out.push_str(name);
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(out)
}

/// Returns the byte that two ASCII hex digits spell, or `None` if either is not a hex digit.
fn hex_pair(pair: &[u8]) -> Option<u8> {
    let digit = |b: u8| char::from(b).to_digit(16);
    match pair {
        [hi, lo] => u8::try_from(digit(*hi)? * 16 + digit(*lo)?).ok(),
        _ => None,
    }
}

/// Tells whether a byte may appear unescaped in an encoded path (RFC 3986 `pchar` or `/`).
fn is_path_safe(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"/-._~!$&'()*+,;=:@".contains(&byte)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;

    /// Accepted inputs and the path they normalise to.
    const ACCEPTED: &[(&str, &str)] = &[
        ("/", "/"),
        ("/a", "/a"),
        ("/a/./b", "/a/b"),
        ("/a//b", "/a/b"),
        ("//x", "/x"),
        ("///", "/"),
        ("/./", "/"),
        ("/.", "/"),
        ("/a/../b", "/b"),
        ("/a/b/..", "/a/"),
        ("/a/..", "/"),
        ("/a/.", "/a/"),
        ("/a/b/", "/a/b/"),
        ("/a/b//", "/a/b/"),
        ("/a/./b/../c/", "/a/c/"),
        ("/x/%2E./y", "/y"),
        ("/a/%2e%2e/b", "/b"),
        ("/a/%2E/b", "/a/b"),
        ("/%252e%252e/x", "/%2e%2e/x"),
        ("/%2525", "/%25"),
        ("/%25", "/%"),
        ("/caf%C3%A9", "/café"),
        ("/café", "/café"),
        ("/a%20b", "/a b"),
        ("/a%3Fb", "/a?b"),
        ("/%41%42c", "/ABc"),
        ("/...", "/..."),
        ("/a/.../b", "/a/.../b"),
        ("/.a/b.", "/.a/b."),
        (
            "/concelier/exports/../exports/index.json",
            "/concelier/exports/index.json",
        ),
        (
            "/excititor/./exports//index.json",
            "/excititor/exports/index.json",
        ),
    ];

    /// Rejected inputs and the label of the error they give.
    const REJECTED: &[(&str, &str)] = &[
        ("", "not_origin_form"),
        ("*", "not_origin_form"),
        ("a/b", "not_origin_form"),
        ("http://host/x", "not_origin_form"),
        ("%2Fa", "not_origin_form"),
        ("/..", "above_root"),
        ("/../", "above_root"),
        ("/a/../..", "above_root"),
        ("/a/../../b", "above_root"),
        ("/%2e%2e/etc/passwd", "above_root"),
        ("/%2E./x", "above_root"),
        ("/.%2e", "above_root"),
        ("/a/%2f/b", "encoded_slash"),
        ("/a%2Fb", "encoded_slash"),
        ("/a%2fb", "encoded_slash"),
        ("/a\\b", "backslash"),
        ("/a%5cb", "backslash"),
        ("/a%5C..%5C..", "backslash"),
        ("/a/%00", "control_char"),
        ("/a%0d%0aSet-Cookie:x", "control_char"),
        ("/a%7f", "control_char"),
        ("/a%1F", "control_char"),
        ("/a\tb", "control_char"),
        ("/a\u{7f}", "control_char"),
        ("/%zz", "bad_escape"),
        ("/%4", "bad_escape"),
        ("/%", "bad_escape"),
        ("/a%g0", "bad_escape"),
        ("/%ff", "not_utf8"),
        ("/%C3", "not_utf8"),
        ("/%C3%28", "not_utf8"),
    ];

    #[test]
    fn is_normal_judges_each_segment() {
        let cases = [
            ("/", true),
            ("/a/b", true),
            ("/a/", true),
            ("/a/..b", true),
            ("/.well-known/x", true),
            ("/a//b", false),
            ("//", false),
            ("/.", false),
            ("/a/.", false),
            ("/a/../b", false),
            ("/./a", false),
            ("/a%2fb", false),
            ("/a\\b", false),
        ];
        for (path, normal) in cases {
            assert_eq!(is_normal(path.as_bytes()), normal, "{path}");
        }
    }

    #[test]
    fn normalize_table_accepted() {
        for (raw, want) in ACCEPTED {
            assert_eq!(normalize(raw).as_deref(), Ok(*want), "raw path {raw:?}");
        }
    }

    #[test]
    fn normalize_table_rejected() {
        for (raw, label) in REJECTED {
            let got = normalize(raw).map_err(|e| e.label());
            assert_eq!(got, Err(*label), "raw path {raw:?}");
        }
    }

    #[test]
    fn normalize_length_at_limit() {
        let raw = format!("/{}", "a".repeat(MAX_PATH_BYTES - 1));
        assert_eq!(normalize(&raw).map(|p| p.len()), Ok(MAX_PATH_BYTES));
    }

    #[test]
    fn normalize_length_over_limit() {
        let raw = format!("/{}", "a".repeat(MAX_PATH_BYTES));
        let want = PathError::TooLong {
            len: MAX_PATH_BYTES + 1,
        };
        assert_eq!(normalize(&raw), Err(want));
    }

    #[test]
    fn normalize_segments_at_limit() {
        let raw = "/a".repeat(MAX_SEGMENTS);
        assert_eq!(normalize(&raw), Ok(raw.clone()));
    }

    #[test]
    fn normalize_segments_over_limit() {
        let raw = "/a".repeat(MAX_SEGMENTS + 1);
        assert_eq!(normalize(&raw), Err(PathError::TooManySegments));
    }

    #[test]
    fn normalize_dot_segments_count() {
        let raw = "/.".repeat(MAX_SEGMENTS + 1);
        assert_eq!(normalize(&raw), Err(PathError::TooManySegments));
    }

    #[test]
    fn normalize_empty_segments_free() {
        let raw = format!("{}a", "/".repeat(MAX_SEGMENTS * 4));
        assert_eq!(normalize(&raw).as_deref(), Ok("/a"));
    }

    #[test]
    fn error_offset_points_at_escape() {
        assert_eq!(
            normalize("/ab%2fc"),
            Err(PathError::EncodedSlash { offset: 3 })
        );
    }

    #[test]
    fn error_display_names_problem() {
        let text = PathError::EncodedSlash { offset: 3 }.to_string();
        assert!(text.contains("encoded slash"), "display was {text:?}");
    }

    #[test]
    fn encode_escapes_percent() {
        assert_eq!(encode("/%2e%2e/x"), "/%252e%252e/x");
    }

    #[test]
    fn encode_escapes_query_and_space() {
        assert_eq!(encode("/a?b c#d"), "/a%3Fb%20c%23d");
    }

    #[test]
    fn encode_escapes_utf8() {
        assert_eq!(encode("/café"), "/caf%C3%A9");
    }

    #[test]
    fn encode_keeps_plain_path() {
        let path = "/concelier/exports/index.json";
        assert_eq!(encode(path), path);
    }

    /// Builds raw paths from pieces that exercise every rule. Rejected pieces are rare, so most
    /// generated paths are accepted and reach the output properties.
    fn raw_path() -> impl Strategy<Value = String> {
        let accepted = prop::sample::select(vec![
            "/", "/", "/", ".", "..", "a", "b", "é", "%2e", "%2E", "%25", "%252e", "%20", "%3F",
            "%C3%A9", "?", "#", " ", "~",
        ]);
        let rejected =
            prop::sample::select(vec!["%2f", "%5c", "%00", "%ff", "%", "%4", "\\", "\u{1}"]);
        let piece = prop_oneof![40 => accepted, 1 => rejected];
        let pieces = prop::collection::vec(piece, 0..24).prop_map(|v| v.concat());
        prop_oneof![
            8 => pieces.clone().prop_map(|s| format!("/a/b/c/{s}")),
            4 => pieces.clone().prop_map(|s| format!("/{s}")),
            1 => pieces,
            1 => any::<String>().prop_map(|s| format!("/{s}")),
        ]
    }

    #[test]
    fn raw_path_mostly_accepted() {
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let strategy = raw_path();
        let accepted = (0..1000)
            .filter_map(|_| strategy.new_tree(&mut runner).ok())
            .filter(|tree| normalize(&tree.current()).is_ok())
            .count();
        assert!(
            accepted > 300,
            "only {accepted} of 1000 generated paths were accepted"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn prop_starts_with_slash(raw in raw_path()) {
            if let Ok(path) = normalize(&raw) {
                prop_assert!(path.starts_with('/'), "{raw:?} gave {path:?}");
            }
        }

        #[test]
        fn prop_no_double_slash(raw in raw_path()) {
            if let Ok(path) = normalize(&raw) {
                prop_assert!(!path.contains("//"), "{raw:?} gave {path:?}");
            }
        }

        #[test]
        fn prop_no_dot_segments(raw in raw_path()) {
            if let Ok(path) = normalize(&raw) {
                let dot = path.split('/').any(|s| s == "." || s == "..");
                prop_assert!(!dot, "{raw:?} gave {path:?}");
            }
        }

        #[test]
        fn prop_no_control_or_backslash(raw in raw_path()) {
            if let Ok(path) = normalize(&raw) {
                let bad = path.chars().any(|c| c.is_ascii_control() || c == '\\');
                prop_assert!(!bad, "{raw:?} gave {path:?}");
            }
        }

        #[test]
        fn prop_idempotent_without_percent(raw in raw_path()) {
            match normalize(&raw) {
                Ok(path) if !path.contains('%') => {
                    prop_assert_eq!(normalize(&path), Ok(path));
                }
                _ => {}
            }
        }

        #[test]
        fn prop_encode_round_trips(raw in raw_path()) {
            if let Ok(path) = normalize(&raw) {
                prop_assert_eq!(normalize(&encode(&path)), Ok(path));
            }
        }

        #[test]
        fn prop_normal_paths_need_no_decoding(raw in raw_path()) {
            if raw.starts_with('/') && is_normal(raw.as_bytes()) {
                prop_assert_eq!(decode_and_resolve(&raw), Ok(raw.clone()));
            }
        }

        #[test]
        fn prop_never_panics(raw in any::<String>()) {
            let _ = normalize(&raw);
        }
    }
}
