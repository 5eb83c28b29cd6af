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
                    // The message alone: the error's `Display` appends a line naming the key
                    // again and a blank line, and the key is shown beside the reason already.
                    let reason = describe_expected(e.into_inner().message().trim_end());
                    SettingError::new(key, shown, reason)
                });
            errors.extend(err);
            Err(errors)
        }
    }
}

/// Rewrites the `expected ...` part of each line of a deserializer's message in the words of
/// the config file, so `expected u32` becomes `expected a whole number`. Lines that name no
/// Rust or serde type are kept as they are, and so is the offending value.
fn describe_expected(message: &str) -> String {
    message
        .split_inclusive('\n')
        .map(|line| {
            let (text, newline) = match line.strip_suffix('\n') {
                Some(text) => (text, "\n"),
                None => (line, ""),
            };
            if let Some(name) = text
                .strip_prefix("missing field `")
                .and_then(|rest| rest.strip_suffix('`'))
            {
                return format!("{text}; add the key `{name}`, which has no default{newline}");
            }
            let Some((found, expected)) = text.rsplit_once(", expected ") else {
                return line.to_string();
            };
            match plain_type(found, expected) {
                Some(plain) => format!("{found}, expected {plain}{newline}"),
                None => line.to_string(),
            }
        })
        .collect()
}

/// Returns the config-file words for a type as serde's `expected` text names it, or `None`
/// for text that needs no rewording. `found` is serde's text for the value it rejected.
fn plain_type(found: &str, expected: &str) -> Option<String> {
    if let Some(bounds) = integer_bounds(expected) {
        return Some(describe_integer(found, &bounds));
    }
    match expected {
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

/// The smallest and largest value of an integer type, as decimal text.
struct IntegerBounds {
    min: String,
    max: String,
}

/// Returns the bounds of the integer type that serde names `expected`, if it names one.
fn integer_bounds(expected: &str) -> Option<IntegerBounds> {
    fn bounds(min: impl ToString, max: impl ToString) -> Option<IntegerBounds> {
        Some(IntegerBounds {
            min: min.to_string(),
            max: max.to_string(),
        })
    }
    match expected {
        "u8" => bounds(u8::MIN, u8::MAX),
        "u16" => bounds(u16::MIN, u16::MAX),
        "u32" => bounds(u32::MIN, u32::MAX),
        "u64" => bounds(u64::MIN, u64::MAX),
        "u128" => bounds(u128::MIN, u128::MAX),
        "usize" => bounds(usize::MIN, usize::MAX),
        "i8" => bounds(i8::MIN, i8::MAX),
        "i16" => bounds(i16::MIN, i16::MAX),
        "i32" => bounds(i32::MIN, i32::MAX),
        "i64" => bounds(i64::MIN, i64::MAX),
        "i128" => bounds(i128::MIN, i128::MAX),
        "isize" => bounds(isize::MIN, isize::MAX),
        _ => None,
    }
}

/// Describes the whole number a key expects. The type's limits are named only when the value
/// lies outside them, and a number written in quotes gets the unquoted form as the fix.
///
/// A key whose documented range is narrower than its type's gets that range from its caller
/// (see [`with_range`]).
fn describe_integer(found: &str, bounds: &IntegerBounds) -> String {
    // serde writes `invalid value: integer `N`` for a number outside the type's limits.
    let out_of_range = found
        .strip_prefix("invalid value: integer `")
        .and_then(|rest| rest.strip_suffix('`'));
    if let Some(number) = out_of_range {
        return match (number.starts_with('-'), bounds.min.as_str()) {
            (true, "0") => "a whole number, 0 or more".into(),
            (true, min) => format!("a whole number, {min} or more"),
            (false, _) => format!("a whole number, at most {}", bounds.max),
        };
    }
    let quoted = found
        .strip_prefix("invalid type: string \"")
        .and_then(|rest| rest.strip_suffix('"'))
        .filter(|text| text.trim().parse::<i64>().is_ok());
    if let Some(text) = quoted {
        return format!(
            "a whole number; write it without quotes, e.g. {}",
            text.trim()
        );
    }
    // A number with a unit, such as "60s": the key's name gives the unit.
    let with_unit = found
        .strip_prefix("invalid type: string \"")
        .and_then(|rest| rest.strip_suffix('"'))
        .map(|text| {
            text.trim()
                .trim_end_matches(|c: char| c.is_ascii_alphabetic())
        })
        .filter(|number| number.trim().parse::<i64>().is_ok());
    match with_unit {
        Some(number) => format!(
            "a whole number without quotes or unit, e.g. {}; the key's name gives the unit",
            number.trim()
        ),
        None => "a whole number".into(),
    }
}

/// Replaces the `expected a whole number ...` part of `reason` with `expected a whole number
/// {range}`, keeping what follows it after `; `. Returns `reason` unchanged when it has no
/// such part. `range` is the key's documented range, such as `from 1 to 512`.
pub fn with_range(reason: &str, range: &str) -> String {
    const EXPECTED: &str = "expected a whole number";
    let Some(start) = reason.find(EXPECTED) else {
        return reason.to_string();
    };
    let rest = &reason[start..];
    let end = rest.find("; ").map_or(reason.len(), |i| start + i);
    format!("{}{EXPECTED} {range}{}", &reason[..start], &reason[end..])
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
    fn wrong_type_reason_one_line() {
        for text in ["name = \"a\"\ncount = \"3\"", "name = \"a\""] {
            let errors = parse::<Sample>(table(text)).expect_err("bad table");
            let reason = &errors[0].reason;
            assert!(!reason.contains('\n'), "{reason:?}");
            assert!(!reason.contains("in `count`"), "{reason:?}");
        }
    }

    #[test]
    fn parse_reports_missing_field() {
        let errors = parse::<Sample>(table("name = \"a\"")).expect_err("missing");
        assert!(errors[0].reason.contains("missing field `count`"));
        assert!(
            errors[0].reason.contains("add the key `count`"),
            "{}",
            errors[0].reason
        );
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
                "invalid value: integer `-1`, expected a whole number, 0 or more",
            ),
            (
                "big = 1.5",
                "invalid type: floating point `1.5`, expected a whole number",
            ),
            (
                "big = \"2\"",
                "invalid type: string \"2\", expected a whole number; write it without quotes, \
                 e.g. 2",
            ),
            (
                "small = 5000000000",
                "invalid value: integer `5000000000`, expected a whole number, at most 4294967295",
            ),
            (
                "byte = 300",
                "invalid value: integer `300`, expected a whole number, at most 255",
            ),
            (
                "big = \"60s\"",
                "invalid type: string \"60s\", expected a whole number without quotes or unit, \
                 e.g. 60; the key's name gives the unit",
            ),
            (
                "signed = \"x\"",
                "invalid type: string \"x\", expected a whole number",
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
                "invalid value: integer `70000`, expected a whole number, at most 65535",
            ),
        ];
        for (text, reason) in cases {
            let errors = parse::<Typed>(table(text)).expect_err(text);
            assert_eq!(errors.len(), 1, "{text}: {errors:?}");
            let first_line = errors[0].reason.lines().next().unwrap_or_default();
            assert_eq!(first_line, reason, "{text}");
        }
        let errors = parse::<Typed>(table("count = -1")).expect_err("negative usize");
        let reason = &errors[0].reason;
        assert!(
            reason.contains("expected a whole number, 0 or more"),
            "{reason}"
        );
        assert!(!reason.contains(&usize::MAX.to_string()), "{reason}");
    }

    #[test]
    fn with_range_replaces_expected_part() {
        let quoted = "invalid type: string \"2\", expected a whole number; write it without \
                      quotes, e.g. 2";
        assert_eq!(
            with_range(quoted, "from 1 to 512"),
            "invalid type: string \"2\", expected a whole number from 1 to 512; write it \
             without quotes, e.g. 2"
        );
        let negative = "invalid value: integer `-1`, expected a whole number, 0 or more";
        assert_eq!(
            with_range(negative, "from 1 to 512"),
            "invalid value: integer `-1`, expected a whole number from 1 to 512"
        );
        assert_eq!(with_range("unknown key", "from 1 to 512"), "unknown key");
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
