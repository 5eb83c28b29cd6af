//! Parses `Authorization: Basic` header values into a user name and a password.

use std::fmt;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;

/// Longest `Authorization` value accepted, in bytes; longer values are rejected unread.
pub const MAX_HEADER_LEN: usize = 8 * 1024;

/// The standard base-64 alphabet, with or without `=` padding.
const BASIC_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A user name and password taken from a Basic `Authorization` header.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Everything before the first `:`; never contains `:`.
    pub user: String,
    /// Everything after the first `:`, which may itself contain `:`.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Reason an `Authorization` value is not usable Basic credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    Empty,
    TooLong,
    NotBasic,
    NoCredentials,
    InvalidBase64,
    InvalidUtf8,
    NoColon,
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Empty => "empty Authorization header",
            Self::TooLong => "Authorization header longer than 8 KiB",
            Self::NotBasic => "Authorization scheme is not Basic",
            Self::NoCredentials => "Basic Authorization header without credentials",
            Self::InvalidBase64 => "Basic credentials are not valid base64",
            Self::InvalidUtf8 => "Basic credentials are not valid UTF-8",
            Self::NoColon => "Basic credentials have no `:` between user and password",
        })
    }
}

/// Parses a raw `Authorization` value of the form `Basic <base64 of user:password>`.
///
/// The scheme is matched without regard to case and is followed by one or more spaces or tabs.
/// Padding of the base-64 token is optional. The decoded text must be UTF-8 and is split at its
/// first `:`.
pub fn parse_basic(value: &[u8]) -> Result<Credentials, HeaderError> {
    if value.len() > MAX_HEADER_LEN {
        return Err(HeaderError::TooLong);
    }
    let value = trim_blanks(value);
    if value.is_empty() {
        return Err(HeaderError::Empty);
    }
    let (scheme, token) = match value.iter().position(|b| is_blank(*b)) {
        Some(at) => (&value[..at], trim_blanks(&value[at..])),
        None => (value, &value[value.len()..]),
    };
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return Err(HeaderError::NotBasic);
    }
    if token.is_empty() {
        return Err(HeaderError::NoCredentials);
    }
    let decoded = BASIC_BASE64
        .decode(token)
        .map_err(|_| HeaderError::InvalidBase64)?;
    let text = String::from_utf8(decoded).map_err(|_| HeaderError::InvalidUtf8)?;
    let (user, password) = text.split_once(':').ok_or(HeaderError::NoColon)?;
    Ok(Credentials {
        user: user.to_owned(),
        password: password.to_owned(),
    })
}

fn is_blank(byte: u8) -> bool {
    byte == b' ' || byte == b'\t'
}

/// Removes spaces and tabs from both ends.
fn trim_blanks(mut value: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = value {
        if !is_blank(*first) {
            break;
        }
        value = rest;
    }
    while let [rest @ .., last] = value {
        if !is_blank(*last) {
            break;
        }
        value = rest;
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(user: &str, password: &str) -> Result<Credentials, HeaderError> {
        Ok(Credentials {
            user: user.into(),
            password: password.into(),
        })
    }

    #[test]
    fn parse_basic_table() {
        let long = format!("Basic {}", "A".repeat(MAX_HEADER_LEN));
        let cases: &[(&[u8], Result<Credentials, HeaderError>)] = &[
            (b"Basic YWxpY2U6c2VjcmV0", ok("alice", "secret")),
            (b"basic YWxpY2U6c2VjcmV0", ok("alice", "secret")),
            (b"BASIC YWxpY2U6c2VjcmV0", ok("alice", "secret")),
            (b"Basic \t  YWxpY2U6c2VjcmV0", ok("alice", "secret")),
            (b"Basic\tYWxpY2U6c2VjcmV0", ok("alice", "secret")),
            (b"  Basic YWxpY2U6c2VjcmV0  ", ok("alice", "secret")),
            // "alice:se:cret" with its padding and without.
            (b"Basic YWxpY2U6c2U6Y3JldA==", ok("alice", "se:cret")),
            (b"Basic YWxpY2U6c2U6Y3JldA", ok("alice", "se:cret")),
            // "alice:" and ":secret".
            (b"Basic YWxpY2U6", ok("alice", "")),
            (b"Basic OnNlY3JldA==", ok("", "secret")),
            // "j\u{f6}rg:p\u{e4}ss" in UTF-8.
            (b"Basic asO2cmc6cMOkc3M=", ok("j\u{f6}rg", "p\u{e4}ss")),
            (b"", Err(HeaderError::Empty)),
            (b"   ", Err(HeaderError::Empty)),
            (b"Basic", Err(HeaderError::NoCredentials)),
            (b"Basic   ", Err(HeaderError::NoCredentials)),
            (b"Bearer YWxpY2U6c2VjcmV0", Err(HeaderError::NotBasic)),
            (b"BasicYWxpY2U6c2VjcmV0", Err(HeaderError::NotBasic)),
            (b"Digest username=alice", Err(HeaderError::NotBasic)),
            (b"Basic YWxp Y2U6c2VjcmV0", Err(HeaderError::InvalidBase64)),
            (b"Basic YWxpY2U6c2VjcmV0!", Err(HeaderError::InvalidBase64)),
            (b"Basic YWxpY2U6c2VjcmV0=", Err(HeaderError::InvalidBase64)),
            (b"Basic YWxpY2U_c2VjcmV0", Err(HeaderError::InvalidBase64)),
            (b"Basic Y", Err(HeaderError::InvalidBase64)),
            // 0xff 0xfe ':' 'x' is not UTF-8.
            (b"Basic //46eA==", Err(HeaderError::InvalidUtf8)),
            // "alicesecret".
            (b"Basic YWxpY2VzZWNyZXQ=", Err(HeaderError::NoColon)),
            (long.as_bytes(), Err(HeaderError::TooLong)),
        ];
        for (value, expected) in cases {
            let shown = String::from_utf8_lossy(value);
            assert_eq!(&parse_basic(value), expected, "value {shown:?}");
        }
    }

    #[test]
    fn parse_basic_accepts_exact_limit() {
        // 6 bytes of "Basic " and a token of "YTpi" ("a:b") padded with spaces to the limit.
        let mut value = b"Basic YTpi".to_vec();
        value.resize(MAX_HEADER_LEN, b' ');
        assert_eq!(parse_basic(&value), ok("a", "b"));
    }

    #[test]
    fn debug_hides_password() {
        let shown = format!("{:?}", ok("alice", "hunter2"));
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
