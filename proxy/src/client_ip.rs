//! Resolves a request's client IP from the socket peer and, behind trusted proxies, from
//! `X-Forwarded-For`.
//!
//! The peer is the client unless it lies in a range of `server.trusted_proxies`. Then the
//! `X-Forwarded-For` list is read from the right, the end the trusted proxies appended to:
//! trusted addresses are skipped and the first untrusted one is the client. A client that is
//! not a trusted proxy cannot change its address with the header, and neither can a client
//! behind one, because the walk stops at the first address no trusted proxy vouches for.
//!
//! Rules for the list, which is the comma-joined values of every `X-Forwarded-For` header in
//! order:
//! - Empty entries (`a, , b`) are skipped, as HTTP list syntax allows.
//! - An entry is an IP address, optionally with a port: `192.0.2.1`, `192.0.2.1:4711`,
//!   `2001:db8::1`, `[2001:db8::1]` and `[2001:db8::1]:443`.
//! - When every entry is trusted, the leftmost entry is the client.
//! - An entry that is not an address (`unknown`, an obfuscated name, bytes that are not UTF-8)
//!   ends the walk as if the list began just after it, because nothing left of it can be
//!   trusted. The client is then the last address examined, or the peer when the malformed
//!   entry is the rightmost. The list is split on commas byte by byte, so a malformed entry
//!   never hides the entries to its right.
//!
//! IPv4-mapped IPv6 addresses (`::ffff:192.0.2.1`, what a dual-stack listener reports for an
//! IPv4 client) are read as the IPv4 address, both for matching and in the result. A mapped
//! network in `server.trusted_proxies` is read as the IPv4 network it covers.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use http::HeaderMap;

/// A network written as `address/prefix-length`, such as `10.0.0.0/8` or `2001:db8::/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

/// An invalid network; the message names the text and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CidrError(String);

impl Cidr {
    /// Returns whether `ip` lies in this network. IPv4 and IPv6 networks never match each
    /// other's addresses, except that an IPv4-mapped IPv6 address matches as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        if ip.is_ipv4() != self.network.is_ipv4() {
            return false;
        }
        let width = if ip.is_ipv4() { 32 } else { 128 };
        mask_bits(ip_bits(ip), self.prefix, width) == ip_bits(self.network)
    }

    /// Returns the prefix length in bits; 0 is a network that contains every address of its
    /// family.
    pub fn prefix_len(&self) -> u8 {
        self.prefix
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// Parses `address/prefix-length`; a bare address is a network of that one address. Bits
    /// set after the prefix are an error, since they suggest a typo in the address or length.
    ///
    /// An IPv4-mapped network (`::ffff:10.0.0.0/104`) becomes the IPv4 network it covers
    /// (`10.0.0.0/8`), because [`Cidr::contains`] matches mapped addresses as IPv4. A mapped
    /// address with a prefix shorter than /96 is an error, since that network would also
    /// cover IPv6 addresses that are not IPv4-mapped.
    fn from_str(text: &str) -> Result<Self, CidrError> {
        let (addr_text, prefix_text) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = addr_text.parse().map_err(|_| {
            CidrError(format!(
                "{addr_text:?} is not an IP address; write a network such as \"10.0.0.0/8\" or \
                 \"2001:db8::/32\""
            ))
        })?;
        let width: u8 = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix_text {
            None => width,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= width)
                .ok_or_else(|| {
                    CidrError(format!(
                        "prefix length {p:?} is not a number from 0 to {width}; write e.g. \
                     \"{network}/{width}\" for this one address"
                    ))
                })?,
        };
        let mapped = match network {
            IpAddr::V6(v6) => v6.to_ipv4_mapped(),
            IpAddr::V4(_) => None,
        };
        if mapped.is_some() && prefix < MAPPED_PREFIX {
            return Err(CidrError(format!(
                "{text:?} is an IPv4-mapped address with a prefix shorter than /96, which \
                 would also cover addresses that are not IPv4-mapped; write an IPv4 network \
                 such as \"10.0.0.0/8\" instead, or a prefix of at least /96"
            )));
        }
        let bits = ip_bits(network);
        let masked = mask_bits(bits, prefix, width);
        if masked != bits {
            return Err(CidrError(format!(
                "{text:?} has address bits set after the /{prefix} prefix; write \"{}/{prefix}\"",
                bits_to_ip(masked, network.is_ipv4())
            )));
        }
        match mapped {
            Some(v4) => Ok(Self {
                network: IpAddr::V4(v4),
                prefix: prefix - MAPPED_PREFIX,
            }),
            None => Ok(Self { network, prefix }),
        }
    }
}

/// Length of the prefix `::ffff:0:0/96` that IPv4-mapped IPv6 addresses share.
const MAPPED_PREFIX: u8 = 96;

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The networks whose peers may tell the client's address in `X-Forwarded-For`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    ranges: Vec<Cidr>,
}

impl TrustedProxies {
    /// Returns whether the set trusts no peer.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Builds the set from its networks; an empty set trusts no peer.
    pub fn new(ranges: Vec<Cidr>) -> Self {
        Self { ranges }
    }

    /// Returns whether `ip` lies in one of the trusted networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.ranges.iter().any(|range| range.contains(ip))
    }

    /// Returns the client IP of a request from socket peer `peer` with request `headers`,
    /// following the rules in the module documentation.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.contains(peer) {
            return peer;
        }
        let mut client = peer;
        for value in headers.get_all("x-forwarded-for").iter().rev() {
            // Split the raw bytes, not a `&str`: a byte that is not ASCII in one entry must
            // not hide the well-formed entries that trusted proxies appended to its right.
            let entries = value
                .as_bytes()
                .rsplit(|b| *b == b',')
                .map(<[u8]>::trim_ascii)
                .filter(|e| !e.is_empty());
            for entry in entries {
                let Some(hop) = parse_hop(entry) else {
                    return client;
                };
                client = hop;
                if !self.contains(hop) {
                    return hop;
                }
            }
        }
        client
    }
}

/// Parses one `X-Forwarded-For` entry: an IP address, optionally with a port, and an IPv6
/// address optionally in brackets (`[2001:db8::1]`, `[2001:db8::1]:443`). Anything else,
/// including bytes that are not UTF-8, is malformed.
fn parse_hop(entry: &[u8]) -> Option<IpAddr> {
    let entry = std::str::from_utf8(entry).ok()?;
    let ip = entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<SocketAddr>().map(|a| a.ip()))
        .ok()
        .or_else(|| {
            entry
                .strip_prefix('[')?
                .strip_suffix(']')?
                .parse::<Ipv6Addr>()
                .ok()
                .map(IpAddr::V6)
        })?;
    Some(ip.to_canonical())
}

/// Keeps the top `prefix` bits of a `width`-bit address held in the low bits of `bits`.
fn mask_bits(bits: u128, prefix: u8, width: u8) -> u128 {
    let host_bits = u32::from(width - prefix.min(width));
    let all = if width == 128 {
        u128::MAX
    } else {
        (1u128 << width) - 1
    };
    all.checked_shl(host_bits).unwrap_or(0) & all & bits
}

fn ip_bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4).into(),
        IpAddr::V6(v6) => v6.into(),
    }
}

fn bits_to_ip(bits: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(u32::try_from(bits).unwrap_or(u32::MAX)))
    } else {
        IpAddr::V6(Ipv6Addr::from(bits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test IP")
    }

    fn trusted(ranges: &[&str]) -> TrustedProxies {
        TrustedProxies::new(
            ranges
                .iter()
                .map(|r| r.parse().expect("test CIDR"))
                .collect(),
        )
    }

    fn headers(values: &[&[u8]]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in values {
            let value = HeaderValue::from_bytes(value).expect("test header");
            map.append("x-forwarded-for", value);
        }
        map
    }

    #[test]
    fn cidr_contains_table() {
        let cases = [
            ("10.0.0.0/8", "10.255.1.2", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("127.0.0.1/32", "127.0.0.1", true),
            ("127.0.0.1/32", "127.0.0.2", false),
            ("127.0.0.1", "127.0.0.1", true),
            ("0.0.0.0/0", "203.0.113.9", true),
            ("0.0.0.0/0", "2001:db8::1", false),
            ("10.0.0.0/8", "::ffff:10.1.2.3", true),
            ("2001:db8::/32", "2001:db8:ffff::1", true),
            ("2001:db8::/32", "2001:db9::1", false),
            ("::/0", "fe80::1", true),
            ("::/0", "192.0.2.1", false),
            ("::1/128", "::1", true),
            ("172.16.0.0/12", "172.31.255.255", true),
            ("172.16.0.0/12", "172.32.0.0", false),
        ];
        for (range, addr, expected) in cases {
            let cidr: Cidr = range.parse().expect("valid CIDR");
            assert_eq!(cidr.contains(ip(addr)), expected, "{range} contains {addr}");
        }
    }

    #[test]
    fn cidr_rejects_bad_text() {
        let cases = [
            ("10.0.0/8", "not an IP address"),
            ("10.0.0.0/33", "from 0 to 32"),
            ("2001:db8::/129", "from 0 to 128"),
            ("10.0.0.0/", "is not a number"),
            ("10.0.0.0/x", "is not a number"),
            ("10.0.0.1/8", "write \"10.0.0.0/8\""),
            ("2001:db8::1/32", "write \"2001:db8::/32\""),
            ("", "not an IP address"),
        ];
        for (text, reason) in cases {
            let error = text.parse::<Cidr>().expect_err(text).to_string();
            assert!(error.contains(reason), "{text}: {error}");
        }
    }

    #[test]
    fn cidr_displays_as_written() {
        let cidr: Cidr = "2001:db8::/32".parse().expect("valid CIDR");
        assert_eq!(cidr.to_string(), "2001:db8::/32");
    }

    #[test]
    fn cidr_mapped_network_is_ipv4() {
        let cases = [
            ("::ffff:127.0.0.3", "127.0.0.3", true),
            ("::ffff:127.0.0.3", "::ffff:127.0.0.3", true),
            ("::ffff:127.0.0.3", "127.0.0.4", false),
            ("::ffff:127.0.0.0/104", "127.1.2.3", true),
            ("::ffff:127.0.0.0/104", "::ffff:127.1.2.3", true),
            ("::ffff:127.0.0.0/104", "128.0.0.1", false),
            ("::ffff:0.0.0.0/96", "192.0.2.1", true),
            ("::ffff:0.0.0.0/96", "2001:db8::1", false),
            ("::ffff:0.0.0.0/96", "::1", false),
        ];
        for (range, addr, expected) in cases {
            let cidr: Cidr = range.parse().expect("valid CIDR");
            assert_eq!(cidr.contains(ip(addr)), expected, "{range} contains {addr}");
        }
    }

    #[test]
    fn cidr_unmapped_ipv6_stays_ipv6() {
        let cases = [
            ("::/0", "2001:db8::1", true),
            ("::/0", "::ffff:192.0.2.1", false),
            ("::/96", "::c000:201", true),
            ("::/96", "192.0.2.1", false),
            ("64:ff9b::/96", "64:ff9b::c000:201", true),
            ("64:ff9b::/96", "192.0.2.1", false),
            ("::1", "::1", true),
        ];
        for (range, addr, expected) in cases {
            let cidr: Cidr = range.parse().expect("valid CIDR");
            assert_eq!(cidr.contains(ip(addr)), expected, "{range} contains {addr}");
        }
    }

    #[test]
    fn cidr_mapped_network_displays_as_ipv4() {
        let cases = [
            ("::ffff:127.0.0.3", "127.0.0.3/32"),
            ("::ffff:127.0.0.0/104", "127.0.0.0/8"),
            ("::ffff:0:0/96", "0.0.0.0/0"),
        ];
        for (text, shown) in cases {
            let cidr: Cidr = text.parse().expect("valid CIDR");
            assert_eq!(cidr.to_string(), shown, "{text}");
        }
    }

    #[test]
    fn cidr_rejects_short_mapped_prefix() {
        let cases = [
            ("::ffff:0.0.0.0/95", "prefix of at least /96"),
            ("::ffff:0.0.0.0/80", "write an IPv4 network"),
            ("::ffff:10.0.0.1/104", "write \"::ffff:10.0.0.0/104\""),
        ];
        for (text, reason) in cases {
            let error = text.parse::<Cidr>().expect_err(text).to_string();
            assert!(error.contains(reason), "{text}: {error}");
        }
    }

    #[test]
    fn client_ip_behind_mapped_trusted_proxy() {
        let proxies = trusted(&["::ffff:127.0.0.3", "::ffff:10.0.0.0/104"]);
        let cases = [
            ("127.0.0.3", "192.0.2.1, 10.1.2.3", "192.0.2.1"),
            ("::ffff:127.0.0.3", "192.0.2.1", "192.0.2.1"),
            ("10.9.9.9", "::ffff:198.51.100.4", "198.51.100.4"),
            ("127.0.0.4", "192.0.2.1", "127.0.0.4"),
        ];
        for (peer, value, expected) in cases {
            let got = proxies.client_ip(ip(peer), &headers(&[value.as_bytes()]));
            assert_eq!(got, ip(expected), "peer {peer} with {value}");
        }
    }

    #[test]
    fn client_ip_table() {
        let proxies = trusted(&["10.0.0.0/8", "2001:db8::/32", "127.0.0.1/32"]);
        let cases: [(&str, &[&[u8]], &str, &str); 22] = [
            (
                "203.0.113.5",
                &[b"198.51.100.1"],
                "203.0.113.5",
                "untrusted peer",
            ),
            ("10.0.0.1", &[], "10.0.0.1", "trusted peer, no header"),
            ("10.0.0.1", &[b"198.51.100.1"], "198.51.100.1", "one hop"),
            (
                "10.0.0.1",
                &[b"192.0.2.66, 198.51.100.1, 10.0.0.2"],
                "198.51.100.1",
                "spoofed left part ignored",
            ),
            (
                "10.0.0.1",
                &[b"10.0.0.3, 10.0.0.2"],
                "10.0.0.3",
                "all trusted: leftmost",
            ),
            (
                "10.0.0.1",
                &[b"unknown"],
                "10.0.0.1",
                "malformed rightmost: peer",
            ),
            (
                "10.0.0.1",
                &[b"198.51.100.1, unknown, 10.0.0.2"],
                "10.0.0.2",
                "malformed hop stops the walk",
            ),
            (
                "10.0.0.1",
                &[b"garbage, 198.51.100.1"],
                "198.51.100.1",
                "malformed left of the client is never read",
            ),
            (
                "10.0.0.1",
                &[b"192.0.2.1", b"10.0.0.2"],
                "192.0.2.1",
                "two header lines",
            ),
            (
                "10.0.0.1",
                &[b"192.0.2.1,,  , 10.0.0.2"],
                "192.0.2.1",
                "empty entries skipped",
            ),
            (
                "10.0.0.1",
                &[b"192.0.2.1:4711"],
                "192.0.2.1",
                "IPv4 with port",
            ),
            (
                "10.0.0.1",
                &[b"[2001:db9::7]:443"],
                "2001:db9::7",
                "IPv6 with port",
            ),
            (
                "2001:db8::1",
                &[b"2001:db9::7"],
                "2001:db9::7",
                "IPv6 proxy",
            ),
            (
                "::ffff:10.0.0.1",
                &[b"192.0.2.1"],
                "192.0.2.1",
                "mapped peer is trusted",
            ),
            (
                "::ffff:192.0.2.1",
                &[b"10.9.9.9"],
                "192.0.2.1",
                "mapped peer canonical",
            ),
            (
                "10.0.0.1",
                &[b"\xff\xfe"],
                "10.0.0.1",
                "non-UTF-8 value: peer",
            ),
            (
                "10.0.0.1",
                &["\u{e9}, 198.51.100.7".as_bytes()],
                "198.51.100.7",
                "non-ASCII entry left of the client is never read",
            ),
            (
                "10.0.0.1",
                &[b"198.51.100.1, \xff, 10.0.0.2"],
                "10.0.0.2",
                "non-UTF-8 hop stops the walk",
            ),
            (
                "10.0.0.1",
                &[b"\xe9", b"198.51.100.7"],
                "198.51.100.7",
                "non-UTF-8 line left of the client is never read",
            ),
            (
                "10.0.0.1",
                &[b"[2001:db9::7]"],
                "2001:db9::7",
                "bracketed IPv6 without port",
            ),
            (
                "10.0.0.1",
                &[b"198.51.100.1, [2001:db8::5]"],
                "198.51.100.1",
                "bracketed trusted IPv6 skipped",
            ),
            (
                "10.0.0.1",
                &[b"[192.0.2.1]"],
                "10.0.0.1",
                "bracketed IPv4 is malformed",
            ),
        ];
        for (peer, values, expected, case) in cases {
            let got = proxies.client_ip(ip(peer), &headers(values));
            assert_eq!(got, ip(expected), "{case}");
        }
    }

    #[test]
    fn client_ip_without_trust_is_peer() {
        let got = TrustedProxies::default().client_ip(ip("127.0.0.1"), &headers(&[b"192.0.2.1"]));
        assert_eq!(got, ip("127.0.0.1"));
    }
}
