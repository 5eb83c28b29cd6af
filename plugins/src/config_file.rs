//! The config file as a TOML document, as both the gateway and the sync task read it: the
//! file's text, parsed, with the `MIRROR_GATEWAY__...` environment overrides applied (see
//! [`env`]). Both read the same document from the same file and environment, so a key set
//! by a variable means the same to each of them.

pub mod env;
mod error;

use std::path::Path;

use toml::Table;

pub use env::{Sources, ENV_PREFIX};
pub use error::{syntax_error, ConfigError};

/// Reads the config file at `path` as text.
pub fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(
            path.display().to_string(),
            "",
            None,
            format!("cannot read the config file: {e}"),
        )
    })
}

/// Parses config `text`, read from `file`, and applies the overrides in `env`. Returns the
/// document, which variable set which key, and an error for each variable that could not be
/// applied. A syntax error of the file is the only error returned as `Err`.
pub fn parse_document(
    text: &str,
    file: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(Table, Sources, Vec<ConfigError>), ConfigError> {
    let mut root: Table = text
        .parse()
        .map_err(|e: toml::de::Error| syntax_error(file, text, &e))?;
    let (sources, errors) = env::apply_overrides(&mut root, env);
    Ok((root, sources, errors))
}
