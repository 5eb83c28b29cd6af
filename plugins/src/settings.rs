//! Typed settings from TOML tables, with every unknown key and the first invalid value reported.

use serde::de::DeserializeOwned;

/// One invalid setting: where it is, what it holds and why it was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingError {
    /// Dotted path of the key, relative to the table that was parsed (empty for the table).
    pub key: String,
    /// The value found there, rendered as TOML, when there is one.
    pub value: Option<String>,
    pub reason: String,
}

impl SettingError {
    /// Builds an error for `key` holding `value`.
    pub fn new(key: impl Into<String>, value: Option<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            value,
            reason: reason.into(),
        }
    }

    /// Prefixes the key with the path of the table it came from.
    pub fn within(mut self, parent: &str) -> Self {
        self.key = join_key(parent, &self.key);
        self
    }
}

/// Joins a parent key path and a child key with a dot, leaving out empty parts.
pub fn join_key(parent: &str, child: &str) -> String {
    match (parent.is_empty(), child.is_empty()) {
        (true, _) => child.to_string(),
        (_, true) => parent.to_string(),
        _ if child.starts_with('[') => format!("{parent}{child}"),
        _ => format!("{parent}.{child}"),
    }
}

/// Deserializes `value` into `T`, rejecting unknown keys.
///
/// Every unknown key is reported, each as its own error. A value of the wrong type stops the
/// deserializer, so only the first such value in this table is reported.
pub fn parse<T: DeserializeOwned>(value: toml::Value) -> Result<T, Vec<SettingError>> {
    let mut unknown = Vec::new();
    let source = value.clone();
    let result: Result<T, _> = serde_ignored::deserialize(value, |path| {
        unknown.push(path.to_string());
    });
    let mut errors: Vec<SettingError> = unknown
        .into_iter()
        .map(|key| {
            let shown = lookup(&source, &key).map(render);
            SettingError::new(key, shown, "unknown key; remove it or check its spelling")
        })
        .collect();
    match result {
        Ok(parsed) if errors.is_empty() => Ok(parsed),
        Ok(_) => Err(errors),
        Err(_) => {
            let err = serde_path_to_error::deserialize::<_, T>(source.clone())
                .err()
                .map(|e| {
                    let key = e.path().to_string();
                    let key = if key == "." { String::new() } else { key };
                    let shown = lookup(&source, &key).map(render);
                    let reason = describe_expected(&e.into_inner().to_string());
                    SettingError::new(key, shown, reason)
                });
            errors.extend(err);
            Err(errors)
        }
    }
}

/// Rewrites the `expected ...` part of each line of a deserializer's message in the words of
/// the config file, so `expected u32` becomes `expected a whole number from 0 to 4294967295`.
/// Lines that name no Rust or serde type are kept as they are, and so is the offending value.
fn describe_expected(message: &str) -> String {
    message
        .split_inclusive('\n')
        .map(|line| {
            let (text, newline) = match line.strip_suffix('\n') {
                Some(text) => (text, "\n"),
                None => (line, ""),
            };
            let Some((found, expected)) = text.rsplit_once(", expected ") else {
                return line.to_string();
            };
            match plain_type(expected) {
                Some(plain) => format!("{found}, expected {plain}{newline}"),
                None => line.to_string(),
            }
        })
        .collect()
}

/// Returns the config-file words for a type as serde's `expected` text names it, or `None`
/// for text that needs no rewording.
fn plain_type(expected: &str) -> Option<String> {
    fn range(min: impl std::fmt::Display, max: impl std::fmt::Display) -> Option<String> {
        Some(format!("a whole number from {min} to {max}"))
    }
    match expected {
        "u8" => range(u8::MIN, u8::MAX),
        "u16" => range(u16::MIN, u16::MAX),
        "u32" => range(u32::MIN, u32::MAX),
        "u64" => range(u64::MIN, u64::MAX),
        "u128" => range(u128::MIN, u128::MAX),
        "usize" => range(usize::MIN, usize::MAX),
        "i8" => range(i8::MIN, i8::MAX),
        "i16" => range(i16::MIN, i16::MAX),
        "i32" => range(i32::MIN, i32::MAX),
        "i64" => range(i64::MIN, i64::MAX),
        "i128" => range(i128::MIN, i128::MAX),
        "isize" => range(isize::MIN, isize::MAX),
        "f32" | "f64" => Some("a number".into()),
        "a boolean" => Some("true or false".into()),
        "a character" => Some("a string of one character".into()),
        "path string" => Some("a path as a string".into()),
        // The toml crate's text when an enum of unit variants gets a value that is not a string.
        "string only" => Some("a string".into()),
        "a sequence" => Some("an array".into()),
        "a map" => Some("a table".into()),
        _ if expected.starts_with("struct ") || expected.starts_with("internally tagged enum ") => {
            Some("a table".into())
        }
        _ => None,
    }
}

/// Renders a TOML value the way it is written in a config file.
pub fn render(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

/// Finds the value at a dotted path such as `rules[2].ttl` or `rules.2.ttl`.
fn lookup<'a>(root: &'a toml::Value, path: &str) -> Option<&'a toml::Value> {
    let mut current = root;
    for part in path
        .split(['.', '[', ']'])
        .filter(|part| !part.is_empty() && *part != "?")
    {
        current = match current {
            toml::Value::Table(table) => table.get(part)?,
            toml::Value::Array(items) => items.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(current)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Sample {
        name: String,
        count: u32,
    }

    fn table(text: &str) -> toml::Value {
        toml::Value::Table(text.parse::<toml::Table>().expect("valid TOML"))
    }

    #[test]
    fn parse_reports_each_unknown_key() {
        let errors = parse::<Sample>(table("name = \"a\"\ncount = 1\nextra = 2\nother = \"x\""))
            .expect_err("unknown keys");
        let keys: Vec<_> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["extra", "other"]);
        assert_eq!(errors[1].value.as_deref(), Some("\"x\""));
    }

    #[test]
    fn parse_reports_wrong_type_with_value() {
        let errors = parse::<Sample>(table("name = \"a\"\ncount = \"many\"")).expect_err("type");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].key, "count");
        assert_eq!(errors[0].value.as_deref(), Some("\"many\""));
        assert!(
            errors[0].reason.contains("invalid type"),
            "{}",
            errors[0].reason
        );
    }

    #[test]
    fn parse_reports_missing_field() {
        let errors = parse::<Sample>(table("name = \"a\"")).expect_err("missing");
        assert!(errors[0].reason.contains("missing field `count`"));
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Typed {
        big: Option<u64>,
        small: Option<u32>,
        byte: Option<u8>,
        count: Option<usize>,
        signed: Option<i64>,
        ratio: Option<f64>,
        flag: Option<bool>,
        text: Option<String>,
        path: Option<std::path::PathBuf>,
        list: Option<Vec<String>>,
        inner: Option<Inner>,
        mode: Option<Mode>,
        source: Option<Source>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Mode {
        Fast,
    }

    #[derive(Debug, Deserialize)]
    #[serde(tag = "kind", rename_all = "snake_case")]
    #[allow(dead_code)]
    enum Source {
        Directory { path: String },
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Inner {
        limit: u16,
    }

    #[test]
    fn parse_names_expected_type_plainly() {
        let cases = [
            (
                "big = -1",
                "invalid value: integer `-1`, expected a whole number from 0 to \
                 18446744073709551615",
            ),
            (
                "big = 1.5",
                "invalid type: floating point `1.5`, expected a whole number from 0 to \
                 18446744073709551615",
            ),
            (
                "small = 5000000000",
                "invalid value: integer `5000000000`, expected a whole number from 0 to 4294967295",
            ),
            (
                "byte = 300",
                "invalid value: integer `300`, expected a whole number from 0 to 255",
            ),
            (
                "signed = \"x\"",
                "invalid type: string \"x\", expected a whole number from \
                 -9223372036854775808 to 9223372036854775807",
            ),
            (
                "ratio = \"fast\"",
                "invalid type: string \"fast\", expected a number",
            ),
            (
                "flag = 1",
                "invalid type: integer `1`, expected true or false",
            ),
            ("text = 1", "invalid type: integer `1`, expected a string"),
            (
                "path = 1",
                "invalid type: integer `1`, expected a path as a string",
            ),
            ("list = 1", "invalid type: integer `1`, expected an array"),
            ("inner = 1", "invalid type: integer `1`, expected a table"),
            ("source = 1", "invalid type: integer `1`, expected a table"),
            ("mode = 1", "invalid type: unit variant, expected a string"),
            ("mode = \"slow\"", "unknown variant `slow`, expected `fast`"),
            (
                "inner = { limit = 70000 }",
                "invalid value: integer `70000`, expected a whole number from 0 to 65535",
            ),
        ];
        for (text, reason) in cases {
            let errors = parse::<Typed>(table(text)).expect_err(text);
            assert_eq!(errors.len(), 1, "{text}: {errors:?}");
            let first_line = errors[0].reason.lines().next().unwrap_or_default();
            assert_eq!(first_line, reason, "{text}");
        }
        let errors = parse::<Typed>(table("count = -1")).expect_err("negative usize");
        let expected = format!("expected a whole number from 0 to {}", usize::MAX);
        assert!(errors[0].reason.contains(&expected), "{}", errors[0].reason);
    }

    #[test]
    fn parse_keeps_other_messages() {
        let errors = parse::<Sample>(table("count = 1")).expect_err("missing");
        assert!(
            errors[0].reason.starts_with("missing field `name`"),
            "{}",
            errors[0].reason
        );
    }

    #[test]
    fn join_key_handles_indexes() {
        assert_eq!(join_key("domains.a", "plugins[0]"), "domains.a.plugins[0]");
        assert_eq!(join_key("a", "[1]"), "a[1]");
        assert_eq!(join_key("", "x"), "x");
    }
}
