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
                    SettingError::new(key, shown, e.into_inner().to_string())
                });
            errors.extend(err);
            Err(errors)
        }
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

    #[test]
    fn join_key_handles_indexes() {
        assert_eq!(join_key("domains.a", "plugins[0]"), "domains.a.plugins[0]");
        assert_eq!(join_key("a", "[1]"), "a[1]");
        assert_eq!(join_key("", "x"), "x");
    }
}
