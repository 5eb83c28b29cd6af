//! Why a TLS handshake with a client failed: a small fixed set of reasons, read from OpenSSL's
//! error.

use std::fmt;

use pingora::tls::ssl::{self, SslAlert};

/// The reason a client's TLS handshake failed, the `reason` label of
/// `mirror_gateway_tls_handshake_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandshakeFailure {
    /// The client offers no TLS version the gateway accepts (TLS 1.2 and 1.3).
    ProtocolVersion,
    /// The client and the gateway share no cipher suite, key-exchange group or signature
    /// algorithm.
    NoSharedCipher,
    /// The server name (SNI) is missing or selects no domain with a certificate, and there is
    /// no `tls_default_domain`.
    UnknownSni,
    /// The client ended the handshake with a fatal alert, for example because it does not
    /// trust the certificate.
    ClientAlert,
    /// The connection closed or broke before the handshake finished.
    Aborted,
    /// The client sent bytes that are not a well-formed TLS handshake, and not the start of a
    /// plain HTTP/1.x request either.
    Malformed,
    /// The client sent the start of a plain HTTP/1.x request (a method and a space) and got a
    /// 400 response in plain HTTP instead of a handshake.
    PlainHttp,
    /// The handshake did not finish within the listener's handshake timeout.
    Timeout,
    /// Any other failure, including a certificate the gateway could not install.
    Other,
}

impl HandshakeFailure {
    /// Every reason, in the order the docs list them.
    pub const ALL: [Self; 9] = [
        Self::ProtocolVersion,
        Self::NoSharedCipher,
        Self::UnknownSni,
        Self::ClientAlert,
        Self::Aborted,
        Self::Malformed,
        Self::PlainHttp,
        Self::Timeout,
        Self::Other,
    ];

    /// Returns the metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::ProtocolVersion => "protocol_version",
            Self::NoSharedCipher => "no_shared_cipher",
            Self::UnknownSni => "unknown_sni",
            Self::ClientAlert => "client_alert",
            Self::Aborted => "aborted",
            Self::Malformed => "malformed",
            Self::PlainHttp => "plain_http",
            Self::Timeout => "timeout",
            Self::Other => "other",
        }
    }

    /// Classifies the error of a failed `SslStream::accept`.
    pub fn of_ssl_error(error: &ssl::Error) -> Self {
        if let Some(stack) = error.ssl_error() {
            return Self::of_codes(stack.errors().iter().map(|e| e.code()));
        }
        match error.code() {
            // A close_notify, an end of stream without one, or a socket error.
            ssl::ErrorCode::ZERO_RETURN | ssl::ErrorCode::SYSCALL => Self::Aborted,
            _ => Self::Other,
        }
    }

    /// Classifies the error that Pingora's TLS accept returns.
    ///
    /// Pingora 0.9.1 keeps only the text of OpenSSL's error, as the context
    /// `TLS accept() failed: <error>`, so this reads the packed OpenSSL error codes
    /// (`error:0A000102:...`) or the fixed messages of the `openssl` crate's `ssl::Error` from
    /// that text. An error whose cause is still the `ssl::Error` is classified from it.
    // NOTE: a Pingora release that words this context differently turns the reasons read here
    // into `other` (`unknown_sni` and `timeout` do not come from here). The end-to-end TLS
    // test checks each reason.
    pub fn of_accept_error(error: &pingora::Error) -> Self {
        let cause = error.root_cause().downcast_ref::<ssl::Error>();
        if let Some(cause) = cause {
            return Self::of_ssl_error(cause);
        }
        let context = error.context.as_ref().map(ToString::to_string);
        Self::of_error_text(context.as_deref().unwrap_or_default())
    }

    /// Classifies the text of an `ssl::Error`, as Pingora's accept error carries it.
    fn of_error_text(text: &str) -> Self {
        let codes: Vec<u64> = text
            .match_indices("error:")
            .filter_map(|(at, prefix)| {
                let hex = text.get(at + prefix.len()..at + prefix.len() + 8)?;
                u64::from_str_radix(hex, 16).ok()
            })
            .collect();
        if !codes.is_empty() {
            return Self::of_codes(codes);
        }
        // The texts `ssl::Error` writes for ZERO_RETURN and for SYSCALL without an I/O error.
        // SYSCALL with one writes the I/O error, which ends in `(os error N)`.
        let closed = [
            "the SSL session has been shut down",
            "unexpected EOF",
            "(os error ",
        ];
        if closed.iter().any(|message| text.contains(message)) {
            return Self::Aborted;
        }
        Self::Other
    }

    /// Classifies OpenSSL's error queue, oldest error first, by the first error with a known
    /// reason.
    fn of_codes(codes: impl IntoIterator<Item = u64>) -> Self {
        codes
            .into_iter()
            .map(Self::of_code)
            .find(|reason| *reason != Self::Other)
            .unwrap_or(Self::Other)
    }

    /// Classifies a packed OpenSSL 3 error code: a system error, or a library and a reason.
    fn of_code(code: u64) -> Self {
        if code & ERR_SYSTEM_FLAG != 0 {
            return Self::Aborted;
        }
        let library = (code >> ERR_LIB_OFFSET) & 0xFF;
        let reason = code & ERR_REASON_MASK;
        if library == ERR_LIB_SYS {
            return Self::Aborted;
        }
        if library != ERR_LIB_SSL {
            return Self::Other;
        }
        let Ok(reason) = i32::try_from(reason) else {
            return Self::Other;
        };
        if SslAlert::from_reason_code(reason).is_some() {
            return Self::ClientAlert;
        }
        match reason {
            SSL_R_UNSUPPORTED_PROTOCOL
            | SSL_R_VERSION_TOO_LOW
            | SSL_R_UNSUPPORTED_SSL_VERSION
            | SSL_R_WRONG_SSL_VERSION
            | SSL_R_INAPPROPRIATE_FALLBACK => Self::ProtocolVersion,
            SSL_R_NO_SHARED_CIPHER
            | SSL_R_NO_SHARED_GROUPS
            | SSL_R_NO_SHARED_SIGNATURE_ALGORITHMS
            | SSL_R_NO_SUITABLE_SIGNATURE_ALGORITHM => Self::NoSharedCipher,
            SSL_R_UNEXPECTED_EOF_WHILE_READING => Self::Aborted,
            SSL_R_WRONG_VERSION_NUMBER
            | SSL_R_HTTP_REQUEST
            | SSL_R_HTTPS_PROXY_REQUEST
            | SSL_R_PACKET_LENGTH_TOO_LONG
            | SSL_R_ENCRYPTED_LENGTH_TOO_LONG
            | SSL_R_RECORD_LENGTH_MISMATCH
            | SSL_R_RECORD_TOO_SMALL
            | SSL_R_BAD_RECORD_TYPE
            | SSL_R_UNKNOWN_PROTOCOL
            | SSL_R_UNEXPECTED_MESSAGE
            | SSL_R_UNEXPECTED_RECORD
            | SSL_R_LENGTH_MISMATCH
            | SSL_R_LENGTH_TOO_SHORT
            | SSL_R_BAD_PACKET
            | SSL_R_BAD_PACKET_LENGTH
            | SSL_R_BAD_LENGTH
            | SSL_R_BAD_HANDSHAKE_LENGTH
            | SSL_R_BAD_EXTENSION
            | SSL_R_BAD_KEY_SHARE
            | SSL_R_MISSING_SIGALGS_EXTENSION => Self::Malformed,
            _ => Self::Other,
        }
    }
}

impl fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

// Packing of OpenSSL 3 error codes, from `include/openssl/err.h`.
const ERR_SYSTEM_FLAG: u64 = 0x8000_0000;
const ERR_LIB_OFFSET: u64 = 23;
const ERR_REASON_MASK: u64 = 0x7F_FFFF;
const ERR_LIB_SYS: u64 = 2;
const ERR_LIB_SSL: u64 = 20;

// Reason codes of the SSL library, from OpenSSL 3's `include/openssl/sslerr.h`.
const SSL_R_BAD_EXTENSION: i32 = 110;
const SSL_R_BAD_HANDSHAKE_LENGTH: i32 = 332;
const SSL_R_BAD_KEY_SHARE: i32 = 108;
const SSL_R_BAD_LENGTH: i32 = 271;
const SSL_R_BAD_PACKET: i32 = 240;
const SSL_R_BAD_PACKET_LENGTH: i32 = 115;
const SSL_R_BAD_RECORD_TYPE: i32 = 443;
const SSL_R_ENCRYPTED_LENGTH_TOO_LONG: i32 = 150;
const SSL_R_HTTPS_PROXY_REQUEST: i32 = 155;
const SSL_R_HTTP_REQUEST: i32 = 156;
const SSL_R_INAPPROPRIATE_FALLBACK: i32 = 373;
const SSL_R_LENGTH_MISMATCH: i32 = 159;
const SSL_R_LENGTH_TOO_SHORT: i32 = 160;
const SSL_R_MISSING_SIGALGS_EXTENSION: i32 = 112;
const SSL_R_NO_SHARED_CIPHER: i32 = 193;
const SSL_R_NO_SHARED_GROUPS: i32 = 410;
const SSL_R_NO_SHARED_SIGNATURE_ALGORITHMS: i32 = 376;
const SSL_R_NO_SUITABLE_SIGNATURE_ALGORITHM: i32 = 118;
const SSL_R_PACKET_LENGTH_TOO_LONG: i32 = 198;
const SSL_R_RECORD_LENGTH_MISMATCH: i32 = 213;
const SSL_R_RECORD_TOO_SMALL: i32 = 298;
const SSL_R_UNEXPECTED_EOF_WHILE_READING: i32 = 294;
const SSL_R_UNEXPECTED_MESSAGE: i32 = 244;
const SSL_R_UNEXPECTED_RECORD: i32 = 245;
const SSL_R_UNKNOWN_PROTOCOL: i32 = 252;
const SSL_R_UNSUPPORTED_PROTOCOL: i32 = 258;
const SSL_R_UNSUPPORTED_SSL_VERSION: i32 = 259;
const SSL_R_VERSION_TOO_LOW: i32 = 396;
const SSL_R_WRONG_SSL_VERSION: i32 = 266;
const SSL_R_WRONG_VERSION_NUMBER: i32 = 267;

#[cfg(test)]
mod tests {
    use super::*;

    fn accept_error(text: &str) -> pingora::BError {
        pingora::Error::explain(
            pingora::ErrorType::TLSHandshakeFailure,
            format!("TLS accept() failed: {text}"),
        )
    }

    #[test]
    fn text_with_ssl_reason() {
        let cases = [
            (
                "error:0A000102:SSL routines:tls_early_post_process_client_hello:unsupported \
                 protocol:ssl/statem/statem_srvr.c:1735:",
                HandshakeFailure::ProtocolVersion,
            ),
            (
                "error:0A0000C1:SSL routines:tls_post_process_client_hello:no shared \
                 cipher:ssl/statem/statem_srvr.c:2300:",
                HandshakeFailure::NoSharedCipher,
            ),
            (
                "error:0A000418:SSL routines:ssl3_read_bytes:tlsv1 alert unknown \
                 ca:ssl/record/rec_layer_s3.c:916:SSL alert number 48",
                HandshakeFailure::ClientAlert,
            ),
            (
                "error:0A00009C:SSL routines:tls_get_more_records:http request:x.c:1:",
                HandshakeFailure::Malformed,
            ),
            (
                "error:0A000126:SSL routines::unexpected eof while reading:x.c:1:",
                HandshakeFailure::Aborted,
            ),
            (
                "error:0A000179:SSL routines::no certificate set:x.c:1:",
                HandshakeFailure::Other,
            ),
        ];
        for (text, expected) in cases {
            let got = HandshakeFailure::of_accept_error(&accept_error(text));
            assert_eq!(got, expected, "{text}");
        }
    }

    #[test]
    fn text_of_closed_connection() {
        for text in [
            "unexpected EOF",
            "the SSL session has been shut down",
            "Connection reset by peer (os error 104)",
        ] {
            let got = HandshakeFailure::of_accept_error(&accept_error(text));
            assert_eq!(got, HandshakeFailure::Aborted, "{text}");
        }
    }

    #[test]
    fn system_error_is_aborted() {
        assert_eq!(
            HandshakeFailure::of_code(0x8000_0068),
            HandshakeFailure::Aborted
        );
    }

    #[test]
    fn unknown_text_is_other() {
        let error = pingora::Error::explain(pingora::ErrorType::InternalError, "offload failed");
        assert_eq!(
            HandshakeFailure::of_accept_error(&error),
            HandshakeFailure::Other
        );
    }

    #[test]
    fn labels_unique() {
        let mut labels: Vec<&str> = HandshakeFailure::ALL.iter().map(|r| r.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), HandshakeFailure::ALL.len());
    }
}
