//! The config file's schema: serde structs that mirror the TOML layout, before validation.
//!
//! Nothing here is trusted: `validate.rs` turns these into the types the gateway runs on.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct ServerSection {
    pub listen: Vec<String>,
    pub threads: usize,
    pub runtime_dir: Option<String>,
    pub grace_period_secs: u64,
    pub shutdown_timeout_secs: u64,
    pub upstream_keepalive_pool_size: usize,
    pub trusted_proxies: Vec<String>,
    pub pid_file: Option<String>,
    pub send_timeout_secs: u64,
    pub keepalive_timeout_secs: u64,
    pub reload_on_change: bool,
    pub tcp_nopush: bool,
    pub pipelining: bool,
    pub proxy_protocol: bool,
    pub proxy_protocol_timeout_ms: u64,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            listen: vec!["127.0.0.1:8080".into()],
            threads: 2,
            runtime_dir: None,
            grace_period_secs: 5,
            shutdown_timeout_secs: 5,
            upstream_keepalive_pool_size: 128,
            trusted_proxies: Vec::new(),
            pid_file: None,
            send_timeout_secs: 60,
            keepalive_timeout_secs: 75,
            reload_on_change: true,
            tcp_nopush: true,
            pipelining: true,
            proxy_protocol: false,
            proxy_protocol_timeout_ms: 5_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct LogSection {
    pub access_log: String,
    pub access_log_format: String,
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            access_log: "stdout".into(),
            access_log_format: "combined".into(),
            level: "info".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct CacheSection {
    pub memory_bytes: ByteSize,
    /// `None`: 64 MiB, or `memory_bytes` when that is smaller.
    pub max_object_bytes: Option<ByteSize>,
    pub lock_wait_timeout_secs: u64,
    pub lock_age_timeout_secs: u64,
    pub debug_headers: bool,
    pub disk_dir: Option<String>,
    /// `None`: 20 GiB.
    pub disk_bytes: Option<ByteSize>,
    /// `None`: 4 GiB, or `disk_bytes` when that is smaller.
    pub disk_max_object_bytes: Option<ByteSize>,
    pub disk_sweep_interval_secs: u64,
}

impl Default for CacheSection {
    fn default() -> Self {
        Self {
            memory_bytes: ByteSize(256 << 20),
            max_object_bytes: None,
            lock_wait_timeout_secs: 35,
            lock_age_timeout_secs: 60,
            debug_headers: false,
            disk_dir: None,
            disk_bytes: None,
            disk_max_object_bytes: None,
            disk_sweep_interval_secs: 600,
        }
    }
}

/// `[admin]`: the admin listener, off unless `listen` is set.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct AdminSection {
    pub listen: Option<String>,
    pub htpasswd: Option<String>,
}

/// One domain's table: `[domains.<id>]`.
#[derive(Debug, Deserialize)]
pub struct DomainSection {
    pub hosts: Vec<String>,
    #[serde(default)]
    pub routes: Vec<toml::Value>,
    #[serde(default)]
    pub origins: BTreeMap<String, toml::Value>,
    #[serde(default)]
    pub plugins: Vec<toml::Value>,
    /// How long after expiry a stored response is still served while one background request
    /// refreshes it.
    #[serde(default = "default_stale_while_revalidate_secs")]
    pub stale_while_revalidate_secs: u32,
    /// How long after expiry a stored response is served when the origin fails.
    #[serde(default = "default_stale_if_error_secs")]
    pub stale_if_error_secs: u32,
    /// How long a request waits for another request's fill of the same key; unset uses
    /// `cache.lock_wait_timeout_secs`.
    pub lock_wait_timeout_secs: Option<u64>,
    /// Most requests this domain sends to its origins at once.
    #[serde(default = "default_max_origin_requests")]
    pub max_origin_requests: u32,
}

fn default_max_origin_requests() -> u32 {
    64
}

fn default_stale_while_revalidate_secs() -> u32 {
    60
}

fn default_stale_if_error_secs() -> u32 {
    86_400
}

/// The TLS keys of `[server]`, taken out of the section before the rest is parsed.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ServerTlsSection {
    pub tls_listen: Vec<String>,
    pub tls_default_domain: Option<String>,
}

/// The TLS keys of `[domains.<id>]`, taken out of the table before the rest is parsed.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct DomainTlsSection {
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    pub tls_ocsp: Option<String>,
    pub redirect_to_https: bool,
}

impl ServerTlsSection {
    /// The keys this section takes from `[server]`.
    pub const KEYS: &'static [&'static str] = &["tls_listen", "tls_default_domain"];
}

impl DomainTlsSection {
    /// The keys this section takes from `[domains.<id>]`.
    pub const KEYS: &'static [&'static str] =
        &["tls_cert", "tls_key", "tls_ocsp", "redirect_to_https"];
}

/// One route: `[[domains.<id>.routes]]`.
#[derive(Debug, Deserialize)]
pub struct RouteSection {
    pub prefix: String,
    pub origin: String,
    pub origin_path: Option<String>,
    #[serde(default)]
    pub forward_authorization: bool,
}

/// One origin: `[domains.<id>.origins.<name>]`, told apart by `kind`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub enum OriginSection {
    Http {
        addresses: Vec<String>,
        host: Option<String>,
        #[serde(default = "default_connect_timeout_ms")]
        connect_timeout_ms: u64,
        #[serde(default = "default_read_timeout_ms")]
        read_timeout_ms: u64,
        #[serde(default = "default_read_timeout_ms")]
        write_timeout_ms: u64,
        #[serde(default = "default_idle_timeout_secs")]
        idle_timeout_secs: u64,
    },
    ExportTree {
        root: String,
        pinned_export: Option<String>,
    },
}

impl OriginSection {
    /// Returns the keys an origin table of `kind` may have, `kind` included, or `None` for a
    /// kind that does not exist. For a table whose `kind` selects the variant, the deserializer
    /// names only the first unknown key, so validation checks the keys with this list first.
    pub fn keys_of(kind: &str) -> Option<&'static [&'static str]> {
        match kind {
            "http" => Some(&[
                "kind",
                "addresses",
                "host",
                "connect_timeout_ms",
                "read_timeout_ms",
                "write_timeout_ms",
                "idle_timeout_secs",
            ]),
            "export_tree" => Some(&["kind", "root", "pinned_export"]),
            _ => None,
        }
    }
}

fn default_connect_timeout_ms() -> u64 {
    2_000
}

fn default_read_timeout_ms() -> u64 {
    30_000
}

fn default_idle_timeout_secs() -> u64 {
    60
}

/// A size in bytes, written as an integer or as a string with a unit (`"256MiB"`, `"2 GiB"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Returns the size as TOML: a string with the unit that divides it into the smallest
    /// whole number, binary before decimal (`"512KiB"`, `"2GB"`), or the plain number of
    /// bytes, so that an error shows it much as it was written.
    pub fn shown(self) -> String {
        let units = BINARY_UNITS.iter().chain(&DECIMAL_UNITS);
        units
            .filter(|(unit, factor)| *unit != "B" && self.0 >= *factor && self.0 % factor == 0)
            .min_by_key(|(_, factor)| self.0 / factor)
            .map_or_else(
                || self.0.to_string(),
                |(unit, factor)| format!("\"{}{unit}\"", self.0 / factor),
            )
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        de.deserialize_any(ByteSizeVisitor)
    }
}

struct ByteSizeVisitor;

impl serde::de::Visitor<'_> for ByteSizeVisitor {
    type Value = ByteSize;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a number of bytes or a size such as \"256MiB\"")
    }

    fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<ByteSize, E> {
        Ok(ByteSize(value))
    }

    fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<ByteSize, E> {
        u64::try_from(value)
            .map(ByteSize)
            .map_err(|_| E::custom(format!("a size cannot be negative ({value})")))
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<ByteSize, E> {
        parse_byte_size(text).map(ByteSize).map_err(E::custom)
    }
}

/// Parses `"512"`, `"64KiB"`, `"256 MiB"`, `"2GiB"`, `"1MB"` (decimal units are powers of 1000).
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits.parse().map_err(|_| {
        format!("invalid size {text:?}; write a number of bytes or e.g. \"256MiB\"")
    })?;
    if let Some(fraction) = unit.strip_prefix('.') {
        return Err(fractional_size(text, number, fraction));
    }
    let factor = unit_factor(unit.trim()).ok_or_else(|| {
        format!(
            "unknown size unit {:?}; use B, KiB, MiB, GiB, TiB, KB, MB or GB",
            unit.trim()
        )
    })?;
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

/// The size units, largest first within each family: powers of 1024, then powers of 1000.
const BINARY_UNITS: [(&str, u64); 5] = [
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("B", 1),
];
const DECIMAL_UNITS: [(&str, u64); 4] = [
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("KB", 1_000),
    ("B", 1),
];

/// Returns the bytes in one `unit`; an empty unit means bytes.
fn unit_factor(unit: &str) -> Option<u64> {
    match unit {
        "" => Some(1),
        "kB" => Some(1_000),
        _ => BINARY_UNITS
            .iter()
            .chain(&DECIMAL_UNITS)
            .find(|(name, _)| *name == unit)
            .map(|(_, factor)| *factor),
    }
}

/// Builds the error for a size with a fraction, such as `"1.5GiB"`: sizes are whole numbers,
/// and the same size is suggested in the largest smaller unit that makes it whole.
fn fractional_size(text: &str, whole: u64, rest: &str) -> String {
    let reason = format!("invalid size {text:?}: sizes are whole numbers");
    let split = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let (fraction, unit) = rest.split_at(split);
    let unit = unit.trim();
    let (Some(factor), Ok(numerator), Ok(places)) = (
        unit_factor(unit),
        format!("{whole}{fraction}").parse::<u128>(),
        u32::try_from(fraction.len()),
    ) else {
        return format!("{reason}; write e.g. \"1536MiB\" for 1.5 GiB");
    };
    let Some(denominator) = 10u128.checked_pow(places) else {
        return format!("{reason}; write e.g. \"1536MiB\" for 1.5 GiB");
    };
    // The size in bytes is numerator * factor / denominator.
    let scaled = numerator.saturating_mul(u128::from(factor));
    let family = if BINARY_UNITS.iter().any(|(_, f)| *f == factor) {
        &BINARY_UNITS[..]
    } else {
        &DECIMAL_UNITS[..]
    };
    let exact = family
        .iter()
        .filter(|(_, f)| *f < factor)
        .find(|(_, f)| scaled % (denominator * u128::from(*f)) == 0);
    match exact {
        Some((name, f)) => format!(
            "{reason}; write \"{}{name}\"",
            scaled / (denominator * u128::from(*f))
        ),
        None => format!(
            "{reason}; write it in bytes, e.g. \"{}\"",
            scaled / denominator
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_shown_as_written() {
        let cases = [
            ("512KiB", "\"512KiB\""),
            ("2GiB", "\"2GiB\""),
            ("1MB", "\"1MB\""),
            ("2GB", "\"2GB\""),
            ("16MB", "\"16MB\""),
            ("1000", "\"1KB\""),
            ("1024", "\"1KiB\""),
            ("1500", "1500"),
        ];
        for (text, shown) in cases {
            let size = ByteSize(parse_byte_size(text).expect("size"));
            assert_eq!(size.shown(), shown, "{text}");
        }
    }

    /// Every key that `keys_of` lists is one the origin's deserializer accepts.
    #[test]
    fn origin_keys_match_the_schema() {
        let tables = [
            (
                "http",
                "kind = \"http\"\naddresses = [\"127.0.0.1:1\"]\nhost = \"h\"\n\
                 connect_timeout_ms = 1\nread_timeout_ms = 1\nwrite_timeout_ms = 1\n\
                 idle_timeout_secs = 1",
            ),
            (
                "export_tree",
                "kind = \"export_tree\"\nroot = \"r\"\npinned_export = \"p\"",
            ),
        ];
        for (kind, text) in tables {
            let table: toml::Table = text.parse().expect("TOML");
            let listed = OriginSection::keys_of(kind).expect("known kind");
            let mut keys: Vec<&str> = table.keys().map(String::as_str).collect();
            keys.sort_unstable();
            let mut expected = listed.to_vec();
            expected.sort_unstable();
            assert_eq!(keys, expected, "{kind}");
            let parsed: Result<OriginSection, _> = toml::Value::Table(table).try_into();
            assert!(parsed.is_ok(), "{kind}: {parsed:?}");
        }
        assert_eq!(OriginSection::keys_of("ftp"), None);
    }

    #[test]
    fn byte_size_fraction_suggests_smaller_unit() {
        let cases = [
            ("1.5GiB", "write \"1536MiB\""),
            ("0.5 MiB", "write \"512KiB\""),
            ("2.25GB", "write \"2250MB\""),
            ("1.1KiB", "write it in bytes, e.g. \"1126\""),
        ];
        for (text, fix) in cases {
            let error = parse_byte_size(text).expect_err(text);
            assert!(error.contains("sizes are whole numbers"), "{text}: {error}");
            assert!(error.ends_with(fix), "{text}: {error}");
            assert!(!error.contains("unknown size unit"), "{text}: {error}");
        }
    }

    #[test]
    fn byte_size_units() {
        assert_eq!(parse_byte_size("512"), Ok(512));
        assert_eq!(parse_byte_size("64KiB"), Ok(65_536));
        assert_eq!(parse_byte_size("256 MiB"), Ok(256 << 20));
        assert_eq!(parse_byte_size("1MB"), Ok(1_000_000));
        assert!(parse_byte_size("12 parsecs").is_err());
        assert!(parse_byte_size("MiB").is_err());
        assert!(parse_byte_size("99999999999TiB").is_err());
    }
}
