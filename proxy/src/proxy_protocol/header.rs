//! The PROXY protocol header, versions 1 and 2, parsed from bytes already read.
//!
//! Facts from HAProxy's specification (`doc/proxy-protocol.txt`, "The PROXY protocol",
//! versions 1 and 2):
//! - Version 1 is one text line of at most 107 bytes, CRLF included:
//!   `PROXY TCP4|TCP6 <source> <destination> <source port> <destination port>\r\n`, fields
//!   separated by exactly one space, ports decimal from 0 to 65535. `PROXY UNKNOWN` may be
//!   followed by anything up to the CRLF, and names no addresses.
//! - Version 2 starts with a 12-byte signature. The next byte is the version (high 4 bits, 2)
//!   and the command (low 4 bits: 0 LOCAL, 1 PROXY). The byte after it is the address family
//!   (high 4 bits) and the transport (low 4 bits). Two bytes give the length of the rest as a
//!   16-bit big-endian number. The rest contains the addresses and ports, then TLVs, which the
//!   gateway skips.
//! - A header that does not match the format exactly must make the receiver close the
//!   connection.
//!
//! Neither an HTTP/1.x request nor a TLS handshake starts with `PROXY ` or the version 2
//! signature, which is how [`detect`] tells a header from the start of the protocol after it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Maximum length of a version 1 header, the CRLF included.
pub const V1_MAX_LEN: usize = 107;

/// Length of the fixed part of a version 2 header: signature, version and command, family and
/// transport, and the length of the rest.
pub const V2_FIXED_LEN: usize = 16;

/// Number of bytes that [`detect`] needs at most to decide. No valid header is shorter: the
/// shortest version 1 header, `PROXY UNKNOWN\r\n`, has 15 bytes.
pub const DETECT_LEN: usize = V2_SIGNATURE.len();

const V1_PREFIX: &[u8] = b"PROXY ";
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// Length of the address block of each version 2 family: two addresses and two ports.
const V2_INET_LEN: usize = 2 * 4 + 2 * 2;
const V2_INET6_LEN: usize = 2 * 16 + 2 * 2;
const V2_UNIX_LEN: usize = 2 * 108;
/// Maximum length of a version 2 address block. TLVs follow the block.
pub const V2_MAX_ADDRESSES_LEN: usize = V2_UNIX_LEN;

/// A valid PROXY protocol header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The proxy relays a client connection from `source`.
    Proxied { source: SocketAddr },
    /// A version 2 `LOCAL` command: the proxy's own connection, such as a health check. The
    /// client is the proxy.
    Local,
    /// A relayed connection whose client address the header does not give: version 1
    /// `UNKNOWN`, or a version 2 header of family UNSPEC or UNIX.
    Unknown,
}

/// The protocol versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// The protocol that the first bytes of a connection start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detection {
    Header(Version),
    /// Bytes that start no PROXY header.
    NotProxy,
    /// A start of a header signature: more bytes are needed to decide.
    Incomplete,
}

/// The reason a header is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("the version 1 header has no CRLF within {V1_MAX_LEN} bytes")]
    V1TooLong,
    #[error(
        "the version 1 header is not \"PROXY TCP4|TCP6 <source> <destination> <source port> \
         <destination port>\\r\\n\" with single spaces: {0:?}"
    )]
    V1Syntax(String),
    #[error("the version 1 protocol {0:?} is not TCP4, TCP6 or UNKNOWN")]
    V1Protocol(String),
    #[error("{address:?} is not an {family} address")]
    V1Address {
        address: String,
        family: &'static str,
    },
    #[error("{0:?} is not a port: write a decimal number from 0 to 65535 without leading zeros")]
    V1Port(String),
    #[error("the version 2 signature does not match")]
    V2Signature,
    #[error("the version 2 header has version {0}, not 2")]
    V2Version(u8),
    #[error("the version 2 header has command {0}, neither LOCAL (0) nor PROXY (1)")]
    V2Command(u8),
    #[error(
        "the version 2 address family and transport byte 0x{0:02x} is not UNSPEC (0x00), \
         TCP over IPv4 (0x11), TCP over IPv6 (0x21) or a UNIX stream (0x31)"
    )]
    V2Family(u8),
    #[error("the version 2 header's length {length} is shorter than the {needed} bytes of its addresses")]
    V2Length { length: usize, needed: usize },
}

/// Returns what `prefix`, the first bytes of a connection, start. [`DETECT_LEN`] bytes always
/// decide.
pub fn detect(prefix: &[u8]) -> Detection {
    for (signature, version) in [(V1_PREFIX, Version::V1), (V2_SIGNATURE, Version::V2)] {
        if prefix.starts_with(signature) {
            return Detection::Header(version);
        }
    }
    if V1_PREFIX.starts_with(prefix) || V2_SIGNATURE.starts_with(prefix) {
        return Detection::Incomplete;
    }
    Detection::NotProxy
}

/// Parses a version 1 header: `line` from `PROXY ` to the first LF, that LF included.
pub fn parse_v1(line: &[u8]) -> Result<Header, HeaderError> {
    let syntax = || HeaderError::V1Syntax(String::from_utf8_lossy(line).into_owned());
    if line.len() > V1_MAX_LEN {
        return Err(HeaderError::V1TooLong);
    }
    let text = line
        .strip_suffix(b"\r\n")
        .and_then(|text| std::str::from_utf8(text).ok())
        .filter(|text| !text.contains(['\r', '\n']))
        .ok_or_else(syntax)?;
    let fields: Vec<&str> = text.split(' ').collect();
    match fields.as_slice() {
        // Everything after UNKNOWN is ignored, as the specification requires.
        ["PROXY", "UNKNOWN", ..] => Ok(Header::Unknown),
        ["PROXY", protocol @ ("TCP4" | "TCP6"), source, destination, source_port, destination_port] =>
        {
            let family = if *protocol == "TCP4" { "IPv4" } else { "IPv6" };
            let source = v1_address(source, family)?;
            v1_address(destination, family)?;
            let source_port = v1_port(source_port)?;
            v1_port(destination_port)?;
            Ok(Header::Proxied {
                source: SocketAddr::new(source, source_port),
            })
        }
        ["PROXY", protocol, _, _, _, _] => Err(HeaderError::V1Protocol((*protocol).to_owned())),
        _ => Err(syntax()),
    }
}

fn v1_address(text: &str, family: &'static str) -> Result<IpAddr, HeaderError> {
    let parsed = match family {
        "IPv4" => text.parse::<Ipv4Addr>().map(IpAddr::V4).ok(),
        _ => text.parse::<Ipv6Addr>().map(IpAddr::V6).ok(),
    };
    parsed.ok_or_else(|| HeaderError::V1Address {
        address: text.to_owned(),
        family,
    })
}

/// Parses a port strictly: digits only, so no sign, and no leading zero.
fn v1_port(text: &str) -> Result<u16, HeaderError> {
    let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    let leading_zero = text.len() > 1 && text.starts_with('0');
    match text.parse::<u16>() {
        Ok(port) if digits && !leading_zero => Ok(port),
        _ => Err(HeaderError::V1Port(text.to_owned())),
    }
}

/// Checks the fixed part of a version 2 header and returns the length of the rest, which the
/// caller reads next.
pub fn v2_rest_len(fixed: &[u8; V2_FIXED_LEN]) -> Result<usize, HeaderError> {
    if !fixed.starts_with(V2_SIGNATURE) {
        return Err(HeaderError::V2Signature);
    }
    let version = fixed[12] >> 4;
    if version != 2 {
        return Err(HeaderError::V2Version(version));
    }
    let command = fixed[12] & 0x0f;
    if command > 1 {
        return Err(HeaderError::V2Command(command));
    }
    let length = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    // A LOCAL header's addresses are ignored, whatever its family byte.
    if command == 1 {
        let needed = match fixed[13] {
            0x00 => 0,
            0x11 => V2_INET_LEN,
            0x21 => V2_INET6_LEN,
            0x31 => V2_UNIX_LEN,
            other => return Err(HeaderError::V2Family(other)),
        };
        if length < needed {
            return Err(HeaderError::V2Length { length, needed });
        }
    }
    Ok(length)
}

/// Parses a whole version 2 header: the fixed part and the [`v2_rest_len`] bytes after it.
/// TLVs after the addresses are skipped without being read.
pub fn parse_v2(header: &[u8]) -> Result<Header, HeaderError> {
    let fixed: &[u8; V2_FIXED_LEN] = header
        .get(..V2_FIXED_LEN)
        .and_then(|fixed| fixed.try_into().ok())
        .ok_or(HeaderError::V2Signature)?;
    let length = v2_rest_len(fixed)?;
    let rest = &header[V2_FIXED_LEN..];
    if rest.len() != length {
        return Err(HeaderError::V2Length {
            length: rest.len(),
            needed: length,
        });
    }
    let command = fixed[12] & 0x0f;
    if command == 0 {
        return Ok(Header::Local);
    }
    let source = match fixed[13] {
        0x11 => {
            let ip: [u8; 4] = array_at(rest, 0);
            let port: [u8; 2] = array_at(rest, 8);
            SocketAddr::new(IpAddr::from(ip), u16::from_be_bytes(port))
        }
        0x21 => {
            let ip: [u8; 16] = array_at(rest, 0);
            let port: [u8; 2] = array_at(rest, 32);
            SocketAddr::new(IpAddr::from(ip), u16::from_be_bytes(port))
        }
        // UNSPEC and UNIX: `v2_rest_len` accepted no other family.
        _ => return Ok(Header::Unknown),
    };
    Ok(Header::Proxied { source })
}

/// Returns the `N` bytes of `bytes` at `start`, which [`v2_rest_len`] made sure exist.
fn array_at<const N: usize>(bytes: &[u8], start: usize) -> [u8; N] {
    let mut array = [0; N];
    array.copy_from_slice(&bytes[start..start + N]);
    array
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxied(text: &str) -> Result<Header, HeaderError> {
        Ok(Header::Proxied {
            source: text.parse().expect("test address"),
        })
    }

    #[test]
    fn detect_decides_on_few_bytes() {
        let cases: &[(&[u8], Detection)] = &[
            (b"", Detection::Incomplete),
            (b"P", Detection::Incomplete),
            (b"PROXY", Detection::Incomplete),
            (b"PROXY ", Detection::Header(Version::V1)),
            (b"PROXY TCP4", Detection::Header(Version::V1)),
            (b"\r\n\r\n\0\r\nQUI", Detection::Incomplete),
            (b"\r\n\r\n\0\r\nQUIT\n", Detection::Header(Version::V2)),
            (b"\r\n\r\n\0\r\nQUIT\n\x21", Detection::Header(Version::V2)),
            (b"PO", Detection::NotProxy),
            (b"PROXYX", Detection::NotProxy),
            (b"GET / HTTP/1.1\r\n", Detection::NotProxy),
            (b"\x16\x03\x01", Detection::NotProxy),
            (b"\r\n\r\nGET", Detection::NotProxy),
        ];
        for (bytes, expected) in cases {
            assert_eq!(detect(bytes), *expected, "{bytes:?}");
        }
    }

    #[test]
    fn v1_good_headers() {
        let max_tcp6 = "PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff \
                        ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        // The maximum header length that the specification allows: UNKNOWN with the longest
        // addresses.
        let max_unknown = max_tcp6.replace("TCP6", "UNKNOWN");
        assert_eq!(max_unknown.len(), V1_MAX_LEN);
        let cases = [
            (
                "PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n",
                proxied("192.0.2.1:56324"),
            ),
            (
                "PROXY TCP6 2001:db8::1 2001:db8::2 4711 80\r\n",
                proxied("[2001:db8::1]:4711"),
            ),
            (
                "PROXY TCP6 ::ffff:192.0.2.1 ::1 0 80\r\n",
                proxied("[::ffff:192.0.2.1]:0"),
            ),
            (
                max_tcp6,
                proxied("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
            ),
            ("PROXY UNKNOWN\r\n", Ok(Header::Unknown)),
            (max_unknown.as_str(), Ok(Header::Unknown)),
            ("PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", Ok(Header::Unknown)),
        ];
        for (line, expected) in cases {
            assert_eq!(parse_v1(line.as_bytes()), expected, "{line:?}");
        }
    }

    #[test]
    fn v1_bad_headers() {
        let too_long = format!("PROXY UNKNOWN {}\r\n", "x".repeat(V1_MAX_LEN));
        let cases = [
            "PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\n",
            "PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r",
            "PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n",
            "PROXY TCP4 192.0.2.1 198.51.100.2 56324 443 7\r\n",
            "PROXY TCP4  192.0.2.1 198.51.100.2 56324 443\r\n",
            "PROXY TCP4 192.0.2.1 198.51.100.2 56324 443 \r\n",
            "PROXY tcp4 192.0.2.1 198.51.100.2 56324 443\r\n",
            "PROXY UDP4 192.0.2.1 198.51.100.2 56324 443\r\n",
            "PROXY TCP4 2001:db8::1 198.51.100.2 56324 443\r\n",
            "PROXY TCP6 192.0.2.1 2001:db8::2 56324 443\r\n",
            "PROXY TCP4 256.0.2.1 198.51.100.2 56324 443\r\n",
            "PROXY TCP4 192.0.2 198.51.100.2 56324 443\r\n",
            "PROXY TCP4 192.0.02.1 198.51.100.2 56324 443\r\n",
            "PROXY TCP4 192.0.2.1 198.51.100.2 65536 443\r\n",
            "PROXY TCP4 192.0.2.1 198.51.100.2 56324 99999\r\n",
            "PROXY TCP4 192.0.2.1 198.51.100.2 -1 443\r\n",
            "PROXY TCP4 192.0.2.1 198.51.100.2 +80 443\r\n",
            "PROXY TCP4 192.0.2.1 198.51.100.2 080 443\r\n",
            "PROXY TCP4 192.0.2.1 198.51.100.2 0x50 443\r\n",
            "PROXY TCP4 192.0.2.1 198.51.100.2 80\r 443\r\n",
            "PROXY TCP6 [2001:db8::1] 2001:db8::2 4711 80\r\n",
            "PROXY\r\n",
            "PROXY \r\n",
            too_long.as_str(),
        ];
        for line in cases {
            let result = parse_v1(line.as_bytes());
            assert!(result.is_err(), "{line:?} parsed as {result:?}");
        }
        assert_eq!(parse_v1(too_long.as_bytes()), Err(HeaderError::V1TooLong));
    }

    /// Returns a version 2 header: signature, `version_command`, `family`, then `rest` with its
    /// length.
    fn v2(version_command: u8, family: u8, rest: &[u8]) -> Vec<u8> {
        let mut header = V2_SIGNATURE.to_vec();
        header.push(version_command);
        header.push(family);
        let length = u16::try_from(rest.len()).expect("test header length");
        header.extend_from_slice(&length.to_be_bytes());
        header.extend_from_slice(rest);
        header
    }

    /// The address block of a TCP over IPv4 header from 192.0.2.1:56324 to 198.51.100.2:443.
    const INET: [u8; 12] = [192, 0, 2, 1, 198, 51, 100, 2, 0xdc, 0x04, 0x01, 0xbb];

    fn inet6() -> Vec<u8> {
        let source: Ipv6Addr = "2001:db8::1".parse().expect("address");
        let destination: Ipv6Addr = "2001:db8::2".parse().expect("address");
        let mut rest = source.octets().to_vec();
        rest.extend_from_slice(&destination.octets());
        rest.extend_from_slice(&4711u16.to_be_bytes());
        rest.extend_from_slice(&443u16.to_be_bytes());
        rest
    }

    #[test]
    fn v2_good_headers() {
        let mut with_tlvs = INET.to_vec();
        // A PP2_TYPE_AUTHORITY TLV and a PP2_TYPE_NOOP TLV.
        with_tlvs.extend_from_slice(b"\x02\x00\x06a.test\x04\x00\x00");
        let cases = [
            (v2(0x21, 0x11, &INET), proxied("192.0.2.1:56324")),
            (v2(0x21, 0x11, &with_tlvs), proxied("192.0.2.1:56324")),
            (v2(0x21, 0x21, &inet6()), proxied("[2001:db8::1]:4711")),
            (v2(0x21, 0x31, &[0; 216]), Ok(Header::Unknown)),
            (v2(0x21, 0x00, &[]), Ok(Header::Unknown)),
            (v2(0x21, 0x00, b"\x04\x00\x00"), Ok(Header::Unknown)),
            (v2(0x20, 0x00, &[]), Ok(Header::Local)),
            // LOCAL ignores the addresses, even a block too short for its family.
            (v2(0x20, 0x11, &[]), Ok(Header::Local)),
            (v2(0x20, 0x11, &INET), Ok(Header::Local)),
        ];
        for (header, expected) in cases {
            assert_eq!(parse_v2(&header), expected, "{header:?}");
        }
    }

    #[test]
    fn v2_bad_headers() {
        let mut bad_signature = v2(0x21, 0x11, &INET);
        bad_signature[11] = b'X';
        let mut length_past_end = v2(0x21, 0x11, &INET);
        length_past_end[15] += 1;
        let cases = [
            (bad_signature, HeaderError::V2Signature),
            (v2(0x11, 0x11, &INET), HeaderError::V2Version(1)),
            (v2(0x31, 0x11, &INET), HeaderError::V2Version(3)),
            (v2(0x22, 0x11, &INET), HeaderError::V2Command(2)),
            (v2(0x2f, 0x11, &INET), HeaderError::V2Command(15)),
            (v2(0x21, 0x12, &INET), HeaderError::V2Family(0x12)),
            (v2(0x21, 0x22, &inet6()), HeaderError::V2Family(0x22)),
            (v2(0x21, 0x10, &INET), HeaderError::V2Family(0x10)),
            (v2(0x21, 0x41, &INET), HeaderError::V2Family(0x41)),
            (
                v2(0x21, 0x11, &INET[..11]),
                HeaderError::V2Length {
                    length: 11,
                    needed: 12,
                },
            ),
            (
                v2(0x21, 0x21, &INET),
                HeaderError::V2Length {
                    length: 12,
                    needed: 36,
                },
            ),
            (
                v2(0x21, 0x31, &[0; 215]),
                HeaderError::V2Length {
                    length: 215,
                    needed: 216,
                },
            ),
            (
                length_past_end,
                HeaderError::V2Length {
                    length: 12,
                    needed: 13,
                },
            ),
        ];
        for (header, expected) in cases {
            assert_eq!(parse_v2(&header), Err(expected), "{header:?}");
        }
        assert_eq!(parse_v2(&V2_SIGNATURE[..10]), Err(HeaderError::V2Signature));
    }
}
