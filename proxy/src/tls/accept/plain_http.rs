//! Detection of a plain HTTP/1.x request sent to a TLS listener, and the 400 response it gets.
//!
//! A TLS connection starts with a handshake record, whose first byte is the content type 22
//! (0x16). An HTTP/1.x request starts with its method, a token, and a space. The gateway reads at
//! most [`MAX_PREFIX`] bytes and stops as soon as the bytes read rule out one of the two, so it
//! recognises a TLS client by the first byte.

/// Maximum length of a method that counts as HTTP. The longest method that RFC 7237 registers,
/// `UPDATEREDIRECTREF`, has 17 characters.
const MAX_METHOD_LEN: usize = 20;

/// Maximum number of bytes read before the decision: the longest method and the space after it.
pub(super) const MAX_PREFIX: usize = MAX_METHOD_LEN + 1;

/// The response to a plain HTTP request on a TLS listener, sent before the connection closes.
pub(super) const RESPONSE: &[u8] = concat!(
    "HTTP/1.1 400 Bad Request\r\n",
    "Content-Type: text/plain; charset=utf-8\r\n",
    "Content-Length: 111\r\n",
    "Connection: close\r\n",
    "X-Cache-Status: BYPASS\r\n",
    "\r\n",
    "400 Bad Request: this port accepts only HTTPS, and the request came as plain HTTP. ",
    "Send it to an https:// URL.\n",
)
.as_bytes();

/// The classification of the first bytes of a connection on a TLS listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Prefix {
    /// A method and a space: the start of an HTTP/1.x request line.
    PlainHttp,
    /// Bytes that no HTTP/1.x request starts with, a TLS record among them.
    NotHttp,
    /// The start of a method with no space yet: more bytes are needed to decide.
    Incomplete,
}

/// Classifies the first bytes a client sent.
///
/// A method here is an uppercase ASCII letter followed by uppercase letters and `-`, at most
/// [`MAX_METHOD_LEN`] characters, which covers every method of RFC 9110 and RFC 7237. Lowercase
/// and other token characters that RFC 9110 allows count as not HTTP, and so go to the TLS
/// handshake. A slice of [`MAX_PREFIX`] bytes is never [`Prefix::Incomplete`].
pub(super) fn classify(prefix: &[u8]) -> Prefix {
    for (index, &byte) in prefix.iter().enumerate() {
        let is_method_char = match index {
            0 => byte.is_ascii_uppercase(),
            _ => byte.is_ascii_uppercase() || byte == b'-',
        };
        if byte == b' ' && index > 0 {
            return Prefix::PlainHttp;
        }
        if !is_method_char || index >= MAX_METHOD_LEN {
            return Prefix::NotHttp;
        }
    }
    Prefix::Incomplete
}

/// Returns the method at the start of `prefix`, for the log, when `classify` found plain HTTP.
pub(super) fn method(prefix: &[u8]) -> &str {
    let end = prefix.iter().position(|&b| b == b' ').unwrap_or(0);
    // `classify` accepts only ASCII bytes in a method, so the conversion succeeds on its input.
    std::str::from_utf8(&prefix[..end]).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_cases() {
        let cases: [(&[u8], Prefix); 15] = [
            (b"", Prefix::Incomplete),
            (b"G", Prefix::Incomplete),
            (b"GET", Prefix::Incomplete),
            (b"GET ", Prefix::PlainHttp),
            (b"GET / HTTP/1.1\r\n", Prefix::PlainHttp),
            (b"HEAD /", Prefix::PlainHttp),
            (b"VERSION-CONTROL /", Prefix::PlainHttp),
            (b"UPDATEREDIRECTREF /", Prefix::PlainHttp),
            (b"PRI * HTTP/2.0", Prefix::PlainHttp),
            (&[0x16, 0x03, 0x01, 0x02, 0x00], Prefix::NotHttp),
            (b" GET", Prefix::NotHttp),
            (b"get / HTTP/1.1", Prefix::NotHttp),
            (b"-GET ", Prefix::NotHttp),
            (b"SSH-2.0-OpenSSH_9.6\r\n", Prefix::NotHttp),
            (b"GET\r\n", Prefix::NotHttp),
        ];
        for (prefix, expected) in cases {
            let text = String::from_utf8_lossy(prefix);
            assert_eq!(classify(prefix), expected, "{text:?}");
        }
    }

    #[test]
    fn classify_method_length_limit() {
        let longest = [b'A'; MAX_METHOD_LEN];
        assert_eq!(classify(&longest), Prefix::Incomplete);
        let with_space = [&longest[..], b" "].concat();
        assert_eq!(with_space.len(), MAX_PREFIX);
        assert_eq!(classify(&with_space), Prefix::PlainHttp);
        let too_long = [b'A'; MAX_PREFIX];
        assert_eq!(classify(&too_long), Prefix::NotHttp);
    }

    #[test]
    fn method_of_prefix() {
        assert_eq!(method(b"GET / HTTP/1.1"), "GET");
        assert_eq!(method(b"VERSION-CONTROL "), "VERSION-CONTROL");
    }

    #[test]
    fn response_content_length_matches_body() {
        let text = std::str::from_utf8(RESPONSE).expect("ASCII response");
        let (head, body) = text.split_once("\r\n\r\n").expect("end of header");
        let length = head
            .lines()
            .find_map(|line| line.strip_prefix("Content-Length: "))
            .expect("Content-Length");
        assert_eq!(length.parse::<usize>().expect("number"), body.len());
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
        assert!(head.contains("\r\nConnection: close"), "{head}");
        assert!(body.contains("https://"), "{body}");
    }
}
