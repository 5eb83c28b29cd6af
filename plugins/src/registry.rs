//! Builds plugins by name from their config settings.

use std::path::Path;
use std::sync::Arc;

use crate::{htpasswd, quota, rate_limit, settings::SettingError, ttl, Plugin};

/// What a plugin constructor may know about where it is configured.
#[derive(Debug, Clone, Copy)]
pub struct BuildContext<'a> {
    /// Id of the domain that lists the plugin.
    pub domain: &'a str,
    /// Directory of the config file; relative paths in settings resolve against it.
    pub config_dir: &'a Path,
}

impl BuildContext<'_> {
    /// Resolves a path from the settings against the config file's directory.
    pub fn resolve(&self, path: &Path) -> std::path::PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.config_dir.join(path)
        }
    }
}

/// Names of the built-in plugins, in the order the documentation lists them.
pub const PLUGIN_NAMES: &[&str] = &["htpasswd", "ttl", "rate_limit", "quota"];

/// Builds the plugin called `name` from its settings table (the plugin entry without `name`).
///
/// Errors name keys relative to the settings table; an unknown plugin name is reported on the
/// key `name`.
pub fn build_plugin(
    name: &str,
    settings: toml::Value,
    ctx: &BuildContext<'_>,
) -> Result<Arc<dyn Plugin>, Vec<SettingError>> {
    match name {
        "htpasswd" => htpasswd::build(settings, ctx),
        "ttl" => ttl::build(settings, ctx),
        "rate_limit" => rate_limit::build(settings, ctx),
        "quota" => quota::build(settings, ctx),
        other => Err(vec![SettingError::new(
            "name",
            Some(format!("{other:?}")),
            format!("unknown plugin; use one of: {}", PLUGIN_NAMES.join(", ")),
        )]),
    }
}
