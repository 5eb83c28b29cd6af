//! Config errors: each names its source, key, value and the reason it was rejected.

use std::fmt;

/// One problem in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The config file's path, or the environment variable that set the value.
    pub source: String,
    /// Dotted key path, e.g. `domains.primary.routes[0].prefix`; empty for the whole file.
    pub key: String,
    /// The value found, rendered as TOML.
    pub value: Option<String>,
    pub reason: String,
}

impl ConfigError {
    /// Builds an error.
    pub fn new(
        source: impl Into<String>,
        key: impl Into<String>,
        value: Option<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            source: source.into(),
            key: key.into(),
            value,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.source)?;
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        if let Some(value) = &self.value {
            write!(f, " = {value}")?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// Turns a TOML syntax error into a config error that names the line.
pub fn syntax_error(file: &str, text: &str, err: &toml::de::Error) -> ConfigError {
    let location = err
        .span()
        .map(|span| {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("{file}:{line}")
        })
        .unwrap_or_else(|| file.to_string());
    // The parser's message may span lines ("invalid table header" and "expected ..."); each
    // error is printed as one line.
    let message = err
        .message()
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    ConfigError::new(location, "", None, format!("invalid TOML: {message}"))
}
