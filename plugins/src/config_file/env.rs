//! Environment overrides: `MIRROR_GATEWAY__<KEY>__<KEY>...=value` sets one key of the file.
//!
//! Segments are separated by a double underscore. A segment names the file's key of the same
//! text, else the key that is equal to it once both are upper-cased with `-` turned into `_`.
//! So `MIRROR_GATEWAY__DOMAINS__PRIMARY__HOSTS` sets `domains.primary.hosts`, and
//! `MIRROR_GATEWAY__DOMAINS__PRIMARY__PLUGINS__0__FILE` sets the `file` of the domain's first
//! plugin. A key the file does not have is created (in lower case), so that validation reports
//! it if it is unknown.
//!
//! Values replace the file's value. Where the file has a string, the variable's text is taken
//! as that string. Elsewhere it is read as a TOML value (`8080`, `true`, `["a", "b"]`). Text
//! that is not valid TOML is an error where the file has a value of another type, and is taken
//! as a string for a key the file does not have.
//!
//! An error names the variable as its source. So does a validation error on a key that a
//! variable set or created, or on a key inside a table it created.
//!
//! Two aliases take the names of the per-domain budget settings of earlier mirror deployments
//! (`maxIndexRequestsPerHour`, `maxDownloadRequestsPerHour`):
//! `MIRROR_GATEWAY__DOMAINS__<ID>__MAXINDEXREQUESTSPERHOUR` and `..._MAXDOWNLOADREQUESTSPERHOUR`
//! set `index_per_hour` and `download_per_hour` of the domain's `quota` plugin entry, which the
//! file or a variable that sets the domain's whole plugin list must list. A variable that ends
//! in one of these names but lacks the prefix is ignored with a warning.

use std::collections::BTreeMap;

use toml::{Table, Value};

use super::ConfigError;

/// Prefix of the environment variables that override config keys.
pub const ENV_PREFIX: &str = "MIRROR_GATEWAY__";

/// Which environment variable set which key path, for error messages.
#[derive(Debug, Default)]
pub struct Sources {
    /// Per variable: the outermost key it created, or the key it set when it created none.
    overrides: Vec<(String, String)>,
}

impl Sources {
    /// Returns the source to name in an error about `key`: the variable that set it or a
    /// table containing it, else `file`.
    pub fn source_of<'a>(&'a self, key: &str, file: &'a str) -> &'a str {
        self.variable_for(key).unwrap_or(file)
    }

    /// Returns the variable that set `key` or a table containing it, if any.
    pub fn variable_for(&self, key: &str) -> Option<&str> {
        self.overrides
            .iter()
            .filter(|(path, _)| {
                key == path
                    || key.starts_with(&format!("{path}."))
                    || key.starts_with(&format!("{path}["))
            })
            .max_by_key(|(path, _)| path.len())
            .map(|(_, var)| var.as_str())
    }
}

/// The variable that names the config file, which is not an override.
const CONFIG_VARIABLE: &str = "MIRROR_GATEWAY_CONFIG";

/// Returns a warning for each variable of `env` that looks meant as an override but is not
/// one: `MIRROR_GATEWAY_DOMAINS__PRIMARY__HOSTS` with one underscore after the prefix, or a
/// budget setting name without the prefix, such as `MAXINDEXREQUESTSPERHOUR`. Overrides are
/// applied without them, so a typo or an env file kept from an earlier deployment would
/// otherwise go unnoticed. Also a warning for each of two or more overrides whose names differ
/// only in case, which set the same key.
pub fn near_miss_warnings(env: &[(String, String)]) -> Vec<ConfigError> {
    let one_underscore = &ENV_PREFIX[..ENV_PREFIX.len() - 1];
    let mut warnings = Vec::new();
    for (name, _) in env {
        if name.starts_with(ENV_PREFIX) || name == CONFIG_VARIABLE {
            continue;
        }
        let upper = name.to_ascii_uppercase();
        let reason = if upper.starts_with(one_underscore) {
            format!(
                "this variable is ignored; an override starts with {ENV_PREFIX} \
                 (upper case, two underscores), as {ENV_PREFIX}SERVER__LISTEN"
            )
        } else if let Some((alias, _)) = BUDGET_ALIAS_KEYS.iter().find(|(a, _)| upper.ends_with(a))
        {
            format!(
                "this variable is ignored; a domain's budget is set by \
                 {ENV_PREFIX}DOMAINS__<ID>__{alias} with the domain's id as <ID>, \
                 e.g. {ENV_PREFIX}DOMAINS__PRIMARY__{alias}"
            )
        } else {
            continue;
        };
        warnings.push(ConfigError::new(name.clone(), "", None, reason));
    }
    warnings.extend(same_key_warnings(env));
    warnings
}

/// Returns a warning for each override that sets the same key as another, which happens when
/// their names differ only in case. Only the one applied last counts.
fn same_key_warnings(env: &[(String, String)]) -> Vec<ConfigError> {
    let mut by_key: BTreeMap<Vec<String>, Vec<&str>> = BTreeMap::new();
    for (name, _) in env.iter().filter(|(name, _)| name.starts_with(ENV_PREFIX)) {
        by_key.entry(apply_order(name)).or_default().push(name);
    }
    let mut warnings = Vec::new();
    for names in by_key.values_mut().filter(|names| names.len() > 1) {
        // `apply_overrides` applies variables of one key in this order, so the last wins.
        names.sort_unstable();
        let winner = names[names.len() - 1];
        for name in names.iter() {
            let others: Vec<&str> = names.iter().copied().filter(|n| n != name).collect();
            let reason = format!(
                "sets the same key as {}, its name differing only in case; {winner} is \
                 applied last and wins, so keep only one of them",
                others.join(", ")
            );
            warnings.push(ConfigError::new(name.to_string(), "", None, reason));
        }
    }
    warnings
}

/// Applies every `MIRROR_GATEWAY__...` variable of `env` to `root`, in the order of
/// [`apply_order`].
///
/// Returns which variable set which key, and an error for each variable that could not be
/// applied, naming the variable as its source and the key path it reached. The other
/// variables are applied all the same, so that validation can report the file's errors too.
pub fn apply_overrides(
    root: &mut Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> (Sources, Vec<ConfigError>) {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(name, _)| name.starts_with(ENV_PREFIX))
        .collect();
    vars.sort_by_cached_key(|(name, value)| (apply_order(name), name.clone(), value.clone()));
    let mut sources = Sources::default();
    let mut errors = Vec::new();
    for (name, value) in vars {
        let mut walk = Walk::default();
        match apply_one(root, &name, &value, &mut walk) {
            Ok(()) => sources
                .overrides
                .push((walk.created.unwrap_or(walk.path), name)),
            Err(reason) => errors.push(ConfigError::new(
                name,
                walk.path,
                // Before the key is reached, the value is not what `walk.path` holds.
                walk.at_key.then(|| format!("{value:?}")),
                reason,
            )),
        }
    }
    (sources, errors)
}

/// Returns the place of variable `name` in the order of application: its key segments in
/// upper case, so that a table or list is set before the keys inside it whatever the case of
/// the names. A budget alias sorts as a key inside the domain's `plugins` that comes before
/// every entry index. So it applies after a variable that sets the whole list (which may add
/// the `quota` entry), and before the variables that set keys of single entries, which win.
fn apply_order(name: &str) -> Vec<String> {
    let segments: Vec<String> = name[ENV_PREFIX.len()..]
        .split("__")
        .map(normalize)
        .collect();
    match segments.as_slice() {
        [domains, domain, alias] if budget_alias(domains, alias).is_some() => {
            // `\0` sorts before the digits of an entry index.
            vec![
                domains.clone(),
                domain.clone(),
                "PLUGINS".to_owned(),
                format!("\0{alias}"),
            ]
        }
        _ => segments,
    }
}

/// The progress of one variable through the config: the path so far and the first key it added.
#[derive(Debug, Default)]
struct Walk {
    /// Dotted path of the keys visited so far, e.g. `domains.primary.plugins[0]`.
    path: String,
    /// Path of the first key that did not exist and was created.
    created: Option<String>,
    /// The variable name that sets the value at `path`, e.g. `MIRROR_GATEWAY__SERVER__LISTEN`.
    variable: String,
    /// Whether `path` reached the key the variable sets, so that an error is about the value.
    at_key: bool,
}

/// Sets the key that `name` designates.
fn apply_one(root: &mut Table, name: &str, value: &str, walk: &mut Walk) -> Result<(), String> {
    let segments: Vec<&str> = name[ENV_PREFIX.len()..].split("__").collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Err(format!(
            "empty key segment; write keys as {ENV_PREFIX}SECTION__KEY with single `__` between them"
        ));
    }
    if let [domains, domain, alias] = segments.as_slice() {
        if let Some(key) = budget_alias(domains, alias) {
            return set_budget_alias(root, domain, key, value, walk);
        }
    }
    let (last, parents) = segments.split_last().ok_or("no key after the prefix")?;
    walk.variable = ENV_PREFIX.trim_end_matches('_').to_string();
    // The walk treats the root like any other table; it is moved back whatever happens.
    let mut top = Value::Table(std::mem::take(root));
    let result = walk_and_set(&mut top, parents, last, value, walk);
    if let Value::Table(table) = top {
        *root = table;
    }
    result
}

fn walk_and_set(
    top: &mut Value,
    parents: &[&str],
    last: &str,
    value: &str,
    walk: &mut Walk,
) -> Result<(), String> {
    let mut current = top;
    for segment in parents {
        current = child(current, segment, walk)?;
        walk.variable.push_str("__");
        walk.variable.push_str(segment);
    }
    let slot = child(current, last, walk)?;
    walk.at_key = true;
    *slot = typed_value(slot, value)?;
    Ok(())
}

/// Returns the child `segment` of `value`, creating an empty table where the key is missing.
fn child<'a>(
    value: &'a mut Value,
    segment: &str,
    walk: &mut Walk,
) -> Result<&'a mut Value, String> {
    let here = if walk.path.is_empty() {
        "the top level".to_string()
    } else {
        format!("`{}`", walk.path)
    };
    match value {
        Value::Table(table) if table.is_empty() && walk.created.is_some() && is_index(segment) => {
            Err(format!(
                "{here} is not in the file, so it has no entry {segment}; set the whole list \
                 in the variable for {here}, e.g. [\"a\", \"b\"]"
            ))
        }
        Value::Table(table) => {
            let existing = find_key(table, segment);
            let key = existing
                .clone()
                .unwrap_or_else(|| segment.to_ascii_lowercase());
            if !walk.path.is_empty() {
                walk.path.push('.');
            }
            walk.path.push_str(&key);
            if existing.is_none() && walk.created.is_none() {
                walk.created = Some(walk.path.clone());
            }
            // A new key starts as an empty table: a parent becomes a table, and a last
            // segment's value is then read as TOML (see `typed_value`).
            Ok(table
                .entry(key)
                .or_insert_with(|| Value::Table(Table::new())))
        }
        Value::Array(items) => {
            let index: usize = segment.parse().map_err(|_| {
                format!("{here} is a list; use a number such as 0 as its key segment")
            })?;
            let len = items.len();
            walk.path.push_str(&format!("[{index}]"));
            if index < len {
                return Ok(&mut items[index]);
            }
            let example = whole_list_example(&walk.variable, items);
            Err(match len {
                0 => format!(
                    "{here} is an empty list; set the whole list in one variable: {example}"
                ),
                _ => format!(
                    "{here} has entries 0 to {}; index {index} is out of range; to add an entry, \
                     set the whole list: {example}",
                    len - 1
                ),
            })
        }
        _ => Err(format!(
            "{here} is a single value, not a table; shorten the variable name"
        )),
    }
}

/// Returns `variable='[...]'` with the list's entries and a placeholder for one more, in the
/// single quotes a shell needs around a TOML array.
fn whole_list_example(variable: &str, items: &[Value]) -> String {
    let mut entries: Vec<String> = items.iter().map(Value::to_string).collect();
    if items.iter().all(Value::is_str) {
        entries.push("\"...\"".into());
    } else {
        entries.push("...".into());
    }
    format!("{variable}='[{}]'", entries.join(", "))
}

/// The budget aliases, in upper case, each with the `quota` setting it sets.
const BUDGET_ALIAS_KEYS: [(&str, &str); 2] = [
    ("MAXINDEXREQUESTSPERHOUR", "index_per_hour"),
    ("MAXDOWNLOADREQUESTSPERHOUR", "download_per_hour"),
];

/// Returns the `quota` setting that `DOMAINS__<ID>__<alias>` sets, if `alias` is a budget alias.
fn budget_alias(domains: &str, alias: &str) -> Option<&'static str> {
    if !domains.eq_ignore_ascii_case("DOMAINS") {
        return None;
    }
    BUDGET_ALIAS_KEYS
        .iter()
        .find(|(name, _)| alias.eq_ignore_ascii_case(name))
        .map(|(_, key)| *key)
}

/// Sets `key` of the one `quota` entry in the plugins of the domain whose id matches
/// `segment`. The domain and the entry must be in the file.
fn set_budget_alias(
    root: &mut Table,
    segment: &str,
    key: &str,
    value: &str,
    walk: &mut Walk,
) -> Result<(), String> {
    let domains = root.get_mut("domains").and_then(Value::as_table_mut);
    let found = domains.and_then(|domains| {
        let id = find_key(domains, segment)?;
        let domain = domains.get_mut(&id)?;
        Some((id, domain))
    });
    let Some((id, domain)) = found else {
        walk.path = format!("domains.{}", segment.to_ascii_lowercase());
        return Err(format!(
            "the file has no domain whose id matches {segment}; the budget aliases set the \
             quota plugin of a domain the file defines"
        ));
    };

    walk.path = format!("domains.{id}.plugins");
    let plugins = domain
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .map(Vec::as_mut_slice)
        .unwrap_or_default();
    let quota: Vec<usize> = (0..plugins.len())
        .filter(|&i| plugins[i].get("name").and_then(Value::as_str) == Some("quota"))
        .collect();
    let index = match quota.as_slice() {
        [index] => *index,
        [] => {
            return Err(format!(
                "domain `{id}` lists no quota plugin; add [[domains.{id}.plugins]] with \
                 name = \"quota\" to the file, then this variable sets its {key}"
            ))
        }
        _ => {
            return Err(format!(
                "domain `{id}` lists {} quota plugins; set the key of one of them, e.g. \
                 {ENV_PREFIX}DOMAINS__{segment}__PLUGINS__{}__{}",
                quota.len(),
                quota[0],
                key.to_ascii_uppercase()
            ))
        }
    };

    walk.path = format!("domains.{id}.plugins[{index}].{key}");
    let Some(entry) = plugins[index].as_table_mut() else {
        return Err("the quota plugin entry is not a table".into());
    };
    if !entry.contains_key(key) {
        walk.created = Some(walk.path.clone());
    }
    let slot = entry
        .entry(key)
        .or_insert_with(|| Value::Table(Table::new()));
    walk.at_key = true;
    *slot = typed_value(slot, value)?;
    Ok(())
}

/// Converts the variable's text to the type of the value it replaces.
fn typed_value(existing: &Value, text: &str) -> Result<Value, String> {
    if let Value::String(_) = existing {
        return Ok(Value::String(text.to_string()));
    }
    // A text with more after the value, such as a line break and another key, is no value.
    let parsed = format!("v = {text}")
        .parse::<Table>()
        .ok()
        .filter(|table| table.len() == 1)
        .and_then(|mut table| table.remove("v"));
    match parsed {
        Some(value) => Ok(value),
        None if matches!(existing, Value::Table(t) if t.is_empty()) => {
            Ok(Value::String(text.to_string()))
        }
        None if existing.is_integer() && is_whole_number(text) => Err(format!(
            "the number is out of range; a TOML integer is at most {}",
            i64::MAX
        )),
        None => Err(format!(
            "expected a TOML {} such as the file's `{existing}`",
            existing.type_str()
        )),
    }
}

/// Returns whether `text` is a sign and decimal digits, as an integer too large for TOML is.
fn is_whole_number(text: &str) -> bool {
    let digits = text.trim().trim_start_matches(['-', '+']);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

fn is_index(segment: &str) -> bool {
    segment.bytes().all(|b| b.is_ascii_digit())
}

/// Returns the key of `table` that `segment` names: the key written exactly as `segment`,
/// else the first key that is equal to it once both are normalized.
fn find_key(table: &Table, segment: &str) -> Option<String> {
    if table.contains_key(segment) {
        return Some(segment.to_string());
    }
    let normalized = normalize(segment);
    table
        .keys()
        .find(|key| normalize(key) == normalized)
        .cloned()
}

fn normalize(key: &str) -> String {
    key.to_ascii_uppercase().replace('-', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(file: &str, vars: &[(&str, &str)]) -> Result<Table, Vec<ConfigError>> {
        let mut root: Table = file.parse().expect("valid TOML");
        let env = vars.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        {
            let (_, errors) = apply_overrides(&mut root, env);
            if errors.is_empty() {
                Ok(root)
            } else {
                Err(errors)
            }
        }
    }

    #[test]
    fn override_replaces_string_and_number() {
        let root = apply(
            "[server]\nthreads = 2\nruntime_dir = \"/a\"",
            &[
                ("MIRROR_GATEWAY__SERVER__THREADS", "8"),
                ("MIRROR_GATEWAY__SERVER__RUNTIME_DIR", "/run/x"),
            ],
        )
        .expect("applied");
        assert_eq!(root["server"]["threads"].as_integer(), Some(8));
        assert_eq!(root["server"]["runtime_dir"].as_str(), Some("/run/x"));
    }

    #[test]
    fn override_reaches_list_entry_and_dashed_key() {
        let root = apply(
            "[domains.mirror-a]\nplugins = [{ name = \"htpasswd\", file = \"a\" }]",
            &[(
                "MIRROR_GATEWAY__DOMAINS__MIRROR_A__PLUGINS__0__FILE",
                "/run/secrets/h",
            )],
        )
        .expect("applied");
        assert_eq!(
            root["domains"]["mirror-a"]["plugins"][0]["file"].as_str(),
            Some("/run/secrets/h")
        );
    }

    #[test]
    fn override_creates_missing_key() {
        let root = apply(
            "",
            &[("MIRROR_GATEWAY__SERVER__LISTEN", "[\"127.0.0.1:9\"]")],
        )
        .expect("applied");
        assert_eq!(root["server"]["listen"][0].as_str(), Some("127.0.0.1:9"));
    }

    #[test]
    fn override_errors_name_variable() {
        let errors = apply(
            "[server]\nthreads = 2\nlisten = []",
            &[
                ("MIRROR_GATEWAY__SERVER__THREADS", "many"),
                ("MIRROR_GATEWAY__SERVER__LISTEN__3", "x"),
                ("MIRROR_GATEWAY__SERVER__THREADS__X", "1"),
            ],
        )
        .expect_err("three bad variables");
        let names: Vec<_> = errors.iter().map(|e| e.source.as_str()).collect();
        assert_eq!(
            names,
            [
                "MIRROR_GATEWAY__SERVER__LISTEN__3",
                "MIRROR_GATEWAY__SERVER__THREADS",
                "MIRROR_GATEWAY__SERVER__THREADS__X"
            ]
        );
    }

    #[test]
    fn index_out_of_range_suggests_whole_list() {
        let errors = apply(
            "[server]\nlisten = [\"127.0.0.1:8080\"]",
            &[("MIRROR_GATEWAY__SERVER__LISTEN__1", "127.0.0.1:8081")],
        )
        .expect_err("index 1 of a list of one");
        let reason = &errors[0].reason;
        assert!(reason.contains("index 1 is out of range"), "{reason}");
        assert!(
            reason.ends_with(
                "set the whole list: MIRROR_GATEWAY__SERVER__LISTEN='[\"127.0.0.1:8080\", \"...\"]'"
            ),
            "{reason}"
        );
    }

    #[test]
    fn override_error_names_key() {
        let errors = apply(
            "[server]\nthreads = 2",
            &[("MIRROR_GATEWAY__SERVER__THREADS", "many")],
        )
        .expect_err("not an integer");
        assert_eq!(errors[0].key, "server.threads");
    }

    const QUOTA_FILE: &str = "[domains.mirror-a]\nplugins = [{ name = \"htpasswd\", file = \"a\" }, \
                              { name = \"quota\", index_per_hour = 600, download_per_hour = 1200 }]";

    #[test]
    fn budget_alias_sets_index_budget() {
        let root = apply(
            QUOTA_FILE,
            &[(
                "MIRROR_GATEWAY__DOMAINS__MIRROR_A__MAXINDEXREQUESTSPERHOUR",
                "30",
            )],
        )
        .expect("applied");
        assert_eq!(
            root["domains"]["mirror-a"]["plugins"][1]["index_per_hour"].as_integer(),
            Some(30)
        );
    }

    #[test]
    fn budget_alias_sets_download_budget() {
        let root = apply(
            QUOTA_FILE,
            &[(
                "MIRROR_GATEWAY__DOMAINS__MIRROR_A__MAXDOWNLOADREQUESTSPERHOUR",
                "50",
            )],
        )
        .expect("applied");
        assert_eq!(
            root["domains"]["mirror-a"]["plugins"][1]["download_per_hour"].as_integer(),
            Some(50)
        );
    }

    #[test]
    fn budget_alias_creates_missing_key() {
        let root = apply(
            "[domains.a]\nplugins = [{ name = \"quota\" }]",
            &[("MIRROR_GATEWAY__DOMAINS__A__MAXINDEXREQUESTSPERHOUR", "7")],
        )
        .expect("applied");
        assert_eq!(
            root["domains"]["a"]["plugins"][0]["index_per_hour"].as_integer(),
            Some(7)
        );
    }

    #[test]
    fn budget_alias_source_names_variable() {
        let mut root: Table = "[domains.a]\nplugins = [{ name = \"quota\" }]"
            .parse()
            .expect("valid TOML");
        let var = "MIRROR_GATEWAY__DOMAINS__A__MAXDOWNLOADREQUESTSPERHOUR";
        let (sources, _) = apply_overrides(&mut root, [(var.to_string(), "x".to_string())]);
        assert_eq!(
            sources.variable_for("domains.a.plugins[0].download_per_hour"),
            Some(var)
        );
    }

    #[test]
    fn budget_alias_without_quota_plugin_fails() {
        let var = "MIRROR_GATEWAY__DOMAINS__A__MAXINDEXREQUESTSPERHOUR";
        let errors = apply("[domains.a]\nplugins = [{ name = \"ttl\" }]", &[(var, "5")])
            .expect_err("no quota plugin");
        assert_eq!(errors[0].source, var);
        assert_eq!(errors[0].value, None, "the plugin list is not the value");
        assert!(
            errors[0].reason.contains("lists no quota plugin"),
            "{:?}",
            errors[0]
        );
    }

    #[test]
    fn budget_alias_for_unknown_domain_fails() {
        let var = "MIRROR_GATEWAY__DOMAINS__B__MAXINDEXREQUESTSPERHOUR";
        let errors = apply(QUOTA_FILE, &[(var, "5")]).expect_err("no such domain");
        assert!(errors[0].reason.contains("no domain"), "{:?}", errors[0]);
    }

    #[test]
    fn budget_alias_rejects_text_for_number() {
        let var = "MIRROR_GATEWAY__DOMAINS__MIRROR_A__MAXINDEXREQUESTSPERHOUR";
        let errors = apply(QUOTA_FILE, &[(var, "many")]).expect_err("not a number");
        assert_eq!(errors[0].key, "domains.mirror-a.plugins[1].index_per_hour");
    }

    #[test]
    fn budget_alias_matches_lower_case_id() {
        let file = "[domains.anon]\nplugins = [{ name = \"quota\", index_per_hour = 600, \
                    download_per_hour = 1200 }]";
        let root = apply(
            file,
            &[(
                "MIRROR_GATEWAY__DOMAINS__anon__MAXINDEXREQUESTSPERHOUR",
                "1",
            )],
        )
        .expect("applied");
        assert_eq!(
            root["domains"]["anon"]["plugins"][0]["index_per_hour"].as_integer(),
            Some(1)
        );
    }

    #[test]
    fn budget_alias_matches_like_other_overrides() {
        let segments = ["MIRROR_A", "mirror_a", "Mirror_A", "mirror-a"];
        for segment in segments {
            let alias = format!("MIRROR_GATEWAY__DOMAINS__{segment}__MAXINDEXREQUESTSPERHOUR");
            let root = apply(QUOTA_FILE, &[(alias.as_str(), "3")]).expect(&alias);
            let quota = &root["domains"]["mirror-a"]["plugins"][1];
            assert_eq!(quota["index_per_hour"].as_integer(), Some(3), "{alias}");

            let key = format!("MIRROR_GATEWAY__DOMAINS__{segment}__PLUGINS__1__INDEX_PER_HOUR");
            let root = apply(QUOTA_FILE, &[(key.as_str(), "4")]).expect(&key);
            let domains = root["domains"].as_table().expect("domains table");
            assert_eq!(domains.len(), 1, "{key} created a domain");
            let quota = &root["domains"]["mirror-a"]["plugins"][1];
            assert_eq!(quota["index_per_hour"].as_integer(), Some(4), "{key}");
        }
    }

    #[test]
    fn budget_alias_applies_after_whole_list() {
        let plugins = "[{ name = \"quota\", index_per_hour = 5 }]";
        let root = apply(
            "[domains.d]\nhosts = [\"d.example\"]",
            &[
                (
                    "MIRROR_GATEWAY__DOMAINS__D__MAXINDEXREQUESTSPERHOUR",
                    "1000",
                ),
                ("MIRROR_GATEWAY__DOMAINS__D__PLUGINS", plugins),
            ],
        )
        .expect("applied");
        assert_eq!(
            root["domains"]["d"]["plugins"][0]["index_per_hour"].as_integer(),
            Some(1000)
        );
    }

    #[test]
    fn entry_variable_wins_over_alias_in_any_case() {
        for alias in [
            "MIRROR_GATEWAY__DOMAINS__MIRROR_A__MAXINDEXREQUESTSPERHOUR",
            "MIRROR_GATEWAY__DOMAINS__mirror_a__maxindexrequestsperhour",
        ] {
            let entry = "MIRROR_GATEWAY__DOMAINS__MIRROR_A__PLUGINS__1__INDEX_PER_HOUR";
            let root = apply(QUOTA_FILE, &[(alias, "3"), (entry, "4")]).expect(alias);
            let quota = &root["domains"]["mirror-a"]["plugins"][1];
            assert_eq!(quota["index_per_hour"].as_integer(), Some(4), "{alias}");
        }
    }

    #[test]
    fn whole_list_applies_before_entries_in_any_case() {
        let root = apply(
            "[domains.d]\nhosts = [\"d.example\"]",
            &[
                (
                    "MIRROR_GATEWAY__DOMAINS__D__PLUGINS__0__INDEX_PER_HOUR",
                    "9",
                ),
                (
                    "MIRROR_GATEWAY__domains__d__plugins",
                    "[{ name = \"quota\" }]",
                ),
            ],
        )
        .expect("applied");
        assert_eq!(
            root["domains"]["d"]["plugins"][0]["index_per_hour"].as_integer(),
            Some(9)
        );
    }

    #[test]
    fn value_with_trailing_text_rejected() {
        let errors = apply(
            "[server]\nthreads = 2",
            &[("MIRROR_GATEWAY__SERVER__THREADS", "9\nlisten = 1")],
        )
        .expect_err("trailing text");
        assert!(
            errors[0].reason.contains("expected a TOML integer"),
            "{:?}",
            errors[0]
        );
    }

    #[test]
    fn integer_out_of_range_named() {
        let var = "MIRROR_GATEWAY__DOMAINS__MIRROR_A__MAXINDEXREQUESTSPERHOUR";
        let errors = apply(QUOTA_FILE, &[(var, "99999999999999999999")]).expect_err("too large");
        assert!(errors[0].reason.contains("out of range"), "{:?}", errors[0]);
    }

    #[test]
    fn override_of_existing_domain_creates_nothing() {
        let mut root: Table =
            "[domains.anon]\nhosts = [\"a.example\"]\nplugins = [{ name = \"quota\" }]"
                .parse()
                .expect("valid TOML");
        let var = "MIRROR_GATEWAY__DOMAINS__anon__PLUGINS__0__INDEX_PER_HOUR";
        let env = [(var.to_string(), "5".to_string())];
        let (sources, errors) = apply_overrides(&mut root, env);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(sources.variable_for("domains.anon.hosts"), None);
        assert_eq!(
            sources.variable_for("domains.anon.plugins[0].index_per_hour"),
            Some(var)
        );
    }

    #[test]
    fn sources_name_created_table() {
        let mut root = Table::new();
        let var = "MIRROR_GATEWAY__DOMAINS__A__HOSTS";
        let env = [(var.to_string(), "[\"a.example\"]".to_string())];
        let (sources, errors) = apply_overrides(&mut root, env);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(sources.variable_for("domains.a.routes"), Some(var));
    }

    #[test]
    fn same_key_in_two_cases_warns() {
        let env: Vec<(String, String)> = [
            ("MIRROR_GATEWAY__SERVER__THREADS", "2"),
            ("MIRROR_GATEWAY__server__threads", "3"),
            ("MIRROR_GATEWAY__LOG__LEVEL", "info"),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
        let warnings = near_miss_warnings(&env);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        let text: Vec<String> = warnings.iter().map(ToString::to_string).collect();
        assert!(
            text[0].starts_with("MIRROR_GATEWAY__SERVER__THREADS: "),
            "{}",
            text[0]
        );
        assert!(
            text[0].contains("same key as MIRROR_GATEWAY__server__threads"),
            "{}",
            text[0]
        );
        assert!(
            text[1].contains("MIRROR_GATEWAY__server__threads is applied last"),
            "{}",
            text[1]
        );

        let mut root: Table = "[server]\nthreads = 1\n".parse().expect("toml");
        let (_, errors) = apply_overrides(&mut root, env);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(root["server"]["threads"].as_integer(), Some(3));
    }

    #[test]
    fn budget_name_without_prefix_warns() {
        let env: Vec<(String, String)> = [
            ("MAXINDEXREQUESTSPERHOUR", "600"),
            ("Mirror__Domains__0__maxDownloadRequestsPerHour", "1200"),
            ("MIRROR_GATEWAY__DOMAINS__A__MAXINDEXREQUESTSPERHOUR", "600"),
            ("MAXINDEXREQUESTSPERHOUR_OLD", "1"),
        ]
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
        let warnings = near_miss_warnings(&env);
        let sources: Vec<&str> = warnings.iter().map(|w| w.source.as_str()).collect();
        assert_eq!(
            sources,
            [
                "MAXINDEXREQUESTSPERHOUR",
                "Mirror__Domains__0__maxDownloadRequestsPerHour"
            ]
        );
        assert!(
            warnings[0]
                .reason
                .contains("MIRROR_GATEWAY__DOMAINS__<ID>__MAXINDEXREQUESTSPERHOUR"),
            "{}",
            warnings[0]
        );
        assert!(
            warnings[1]
                .reason
                .contains("MIRROR_GATEWAY__DOMAINS__<ID>__MAXDOWNLOADREQUESTSPERHOUR"),
            "{}",
            warnings[1]
        );
    }

    #[test]
    fn one_underscore_prefix_warns_once() {
        let env = vec![(
            "MIRROR_GATEWAY_DOMAINS__A__MAXINDEXREQUESTSPERHOUR".to_string(),
            "5".to_string(),
        )];
        let warnings = near_miss_warnings(&env);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].reason.contains("two underscores"),
            "{}",
            warnings[0]
        );
    }

    #[test]
    fn sources_find_longest_prefix() {
        let sources = Sources {
            overrides: vec![
                ("domains.a".into(), "V1".into()),
                ("domains.a.hosts".into(), "V2".into()),
            ],
        };
        assert_eq!(sources.variable_for("domains.a.hosts[0]"), Some("V2"));
        assert_eq!(sources.variable_for("domains.a.routes"), Some("V1"));
        assert_eq!(sources.variable_for("domains.ab"), None);
    }
}
