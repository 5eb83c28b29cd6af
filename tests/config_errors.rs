//! Config validation: every kind of error is reported with its source, key, value and reason.

use std::path::PathBuf;

use mirror_proxy::config::{load_str, ConfigError, GatewayConfig};

/// A valid domain: an export-tree origin, an HTTP origin, `htpasswd` and `ttl`.
const DOMAIN: &str = r#"
[domains.primary]
hosts = ["mirror.example.org", "*.mirror.example.org"]

[domains.primary.origins.tree]
kind = "export_tree"
root = "tree"

[domains.primary.origins.web]
kind = "http"
addresses = ["127.0.0.1:9"]

[[domains.primary.routes]]
prefix = "/concelier/exports/mirror/"
origin = "tree"
origin_path = "/mirror/"

[[domains.primary.routes]]
prefix = "/"
origin = "web"

[[domains.primary.plugins]]
name = "htpasswd"
file = "users.htpasswd"

[[domains.primary.plugins]]
name = "ttl"

[[domains.primary.plugins.rules]]
pattern = "/concelier/exports/mirror/**"
ttl_secs = 300
cache_control = "public, max-age=300"
"#;

/// A second domain with its own hosts.
const COMMUNITY: &str = r#"
[domains.community]
hosts = ["community.example.org"]

[domains.community.origins.tree]
kind = "export_tree"
root = "tree"

[[domains.community.routes]]
prefix = "/"
origin = "tree"
"#;

/// A user `mirror` with password `password`, as `htpasswd -s` writes it.
const USERS: &str = "mirror:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n";

/// A config directory with an export tree (`tree/`) and an htpasswd file (`users.htpasswd`).
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("tree/20260101T120000Z/mirror")).expect("tree");
        std::fs::write(dir.path().join("users.htpasswd"), USERS).expect("htpasswd");
        Self { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("gateway.toml")
    }

    fn file(&self) -> String {
        self.path().display().to_string()
    }

    fn load(&self, text: &str, env: &[(&str, &str)]) -> Result<GatewayConfig, Vec<ConfigError>> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        load_str(text, &self.path(), env.collect::<Vec<_>>())
    }

    fn errors(&self, text: &str, env: &[(&str, &str)]) -> Vec<ConfigError> {
        match self.load(text, env) {
            Ok(_) => panic!("config was accepted:\n{text}"),
            Err(errors) => errors,
        }
    }

    fn config(&self, text: &str, env: &[(&str, &str)]) -> GatewayConfig {
        self.load(text, env)
            .unwrap_or_else(|errors| panic!("config was rejected: {errors:#?}"))
    }

    /// Loads `text` and checks that the one error on `key` comes from the config file, shows
    /// `value` and gives a reason containing `reason`.
    fn expect(&self, text: &str, key: &str, value: Option<&str>, reason: &str) -> ConfigError {
        let errors = self.errors(text, &[]);
        let error = on_key(&errors, key);
        assert_eq!(error.source, self.file(), "source of {error}");
        assert_eq!(error.value.as_deref(), value, "value of {error}");
        assert!(error.reason.contains(reason), "reason of {error}");
        error.clone()
    }
}

/// Returns the error on `key`, failing the test with the whole list when there is none.
fn on_key<'a>(errors: &'a [ConfigError], key: &str) -> &'a ConfigError {
    let found = errors.iter().find(|e| e.key == key);
    found.unwrap_or_else(|| panic!("no error on {key:?}; got {errors:#?}"))
}

/// Returns `DOMAIN` with `from` replaced by `to`; `from` must occur in it.
fn domain_with(from: &str, to: &str) -> String {
    assert!(DOMAIN.contains(from), "DOMAIN has no {from:?}");
    DOMAIN.replacen(from, to, 1)
}

#[test]
fn valid_domain_loads() {
    let fx = Fixture::new();
    let config = fx.config(DOMAIN, &[]);
    assert_eq!(config.domains.len(), 1);
}

#[test]
fn valid_defaults_apply() {
    let fx = Fixture::new();
    let config = fx.config(DOMAIN, &[]);
    assert_eq!(
        config.server.listen,
        ["127.0.0.1:8080".parse().expect("addr")]
    );
    assert_eq!(config.server.threads, 2);
    assert_eq!(config.server.grace_period.as_secs(), 5);
    assert_eq!(config.server.shutdown_timeout.as_secs(), 5);
    assert_eq!(config.server.upstream_keepalive_pool_size, 128);
    assert_eq!(config.log.level, "info");
    assert_eq!(config.cache.memory_bytes, 256 << 20);
    assert_eq!(config.cache.max_object_bytes, 64 << 20);
    assert_eq!(config.cache.lock_wait_timeout.as_secs(), 35);
    assert_eq!(config.cache.lock_age_timeout.as_secs(), 60);
}

#[test]
fn syntax_error_names_line() {
    let fx = Fixture::new();
    let errors = fx.errors("[server]\nthreads = 2\nlisten = \"a\" \"b\"\n[log]\n", &[]);
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].source, format!("{}:3", fx.file()));
    assert!(
        errors[0].reason.starts_with("invalid TOML"),
        "{}",
        errors[0]
    );
}

#[test]
fn syntax_error_is_one_line() {
    let fx = Fixture::new();
    let errors = fx.errors("[server\nthreads = 2\n", &[]);
    assert_eq!(errors.len(), 1);
    let reason = &errors[0].reason;
    assert!(reason.starts_with("invalid TOML"), "{reason}");
    assert!(!reason.contains('\n'), "{reason:?}");
    assert!(
        reason.contains("; "),
        "both parts of the message: {reason:?}"
    );
}

#[test]
fn top_level_unknown_key() {
    let fx = Fixture::new();
    let text = format!("cahce = {{ memory_bytes = 1 }}\n{DOMAIN}");
    fx.expect(
        &text,
        "cahce",
        Some("{ memory_bytes = 1 }"),
        "unknown top-level key",
    );
}

#[test]
fn server_unknown_key() {
    let fx = Fixture::new();
    let text = format!("[server]\nthread = 4\n{DOMAIN}");
    fx.expect(&text, "server.thread", Some("4"), "unknown key");
}

#[test]
fn log_unknown_key() {
    let fx = Fixture::new();
    let text = format!("[log]\nlevl = \"debug\"\n{DOMAIN}");
    fx.expect(&text, "log.levl", Some("\"debug\""), "unknown key");
}

#[test]
fn cache_unknown_key() {
    let fx = Fixture::new();
    let text = format!("[cache]\nmemory = \"1GiB\"\n{DOMAIN}");
    fx.expect(&text, "cache.memory", Some("\"1GiB\""), "unknown key");
}

#[test]
fn server_wrong_type() {
    let fx = Fixture::new();
    let text = format!("[server]\nthreads = \"four\"\n{DOMAIN}");
    let error = fx.expect(&text, "server.threads", Some("\"four\""), "invalid type");
    assert!(!error.reason.contains('\n'), "{error}");
}

#[test]
fn route_wrong_type() {
    let fx = Fixture::new();
    let text = domain_with("prefix = \"/\"", "prefix = 1");
    fx.expect(
        &text,
        "domains.primary.routes[1].prefix",
        Some("1"),
        "invalid type",
    );
}

#[test]
fn listen_not_address() {
    let fx = Fixture::new();
    let text = format!("[server]\nlisten = [\"localhost:8080\"]\n{DOMAIN}");
    let value = Some("\"localhost:8080\"");
    fx.expect(
        &text,
        "server.listen[0]",
        value,
        "not an IP address with a port",
    );
}

#[test]
fn listen_empty() {
    let fx = Fixture::new();
    let text = format!("[server]\nlisten = []\n{DOMAIN}");
    fx.expect(&text, "server.listen", Some("[]"), "at least one address");
}

#[test]
fn listen_twice() {
    let fx = Fixture::new();
    let text = format!("[server]\nlisten = [\"127.0.0.1:80\", \"127.0.0.1:80\"]\n{DOMAIN}");
    fx.expect(
        &text,
        "server.listen[1]",
        Some("\"127.0.0.1:80\""),
        "listed twice",
    );
}

#[test]
fn threads_zero() {
    let fx = Fixture::new();
    let text = format!("[server]\nthreads = 0\n{DOMAIN}");
    fx.expect(&text, "server.threads", Some("0"), "between 1 and 512");
}

#[test]
fn runtime_dir_missing() {
    let fx = Fixture::new();
    let text = format!("[server]\nruntime_dir = \"run\"\n{DOMAIN}");
    fx.expect(
        &text,
        "server.runtime_dir",
        Some("\"run\""),
        "is not a directory",
    );
}

#[test]
fn log_level_unparsable() {
    let fx = Fixture::new();
    let text = format!("[log]\nlevel = \"mirror_proxy=loud\"\n{DOMAIN}");
    let value = Some("\"mirror_proxy=loud\"");
    fx.expect(&text, "log.level", value, "not a log filter");
}

#[test]
fn log_level_misspelt() {
    let fx = Fixture::new();
    let text = format!("[log]\nlevel = \"inof\"\n{DOMAIN}");
    fx.expect(
        &text,
        "log.level",
        Some("\"inof\""),
        "\"inof\" is not a level",
    );
}

#[test]
fn log_level_with_targets() {
    let fx = Fixture::new();
    let text = format!("[log]\nlevel = \"WARN,mirror_proxy=debug\"\n{DOMAIN}");
    assert_eq!(fx.config(&text, &[]).log.level, "WARN,mirror_proxy=debug");
}

#[test]
fn access_log_empty() {
    let fx = Fixture::new();
    let text = format!("[log]\naccess_log = \"\"\n{DOMAIN}");
    fx.expect(
        &text,
        "log.access_log",
        Some("\"\""),
        "\"stdout\", \"off\" or a file path",
    );
}

#[test]
fn access_log_no_directory() {
    let fx = Fixture::new();
    let text = format!("[log]\naccess_log = \"logs/access.log\"\n{DOMAIN}");
    let value = Some("\"logs/access.log\"");
    fx.expect(&text, "log.access_log", value, "does not exist");
}

#[test]
fn access_log_is_directory() {
    let fx = Fixture::new();
    let text = format!("[log]\naccess_log = \"tree\"\n{DOMAIN}");
    fx.expect(&text, "log.access_log", Some("\"tree\""), "is a directory");
}

#[test]
fn access_log_file_not_created() {
    let fx = Fixture::new();
    let text = format!("[log]\naccess_log = \"access.log\"\n{DOMAIN}");
    fx.config(&text, &[]);
    assert!(!fx.dir.path().join("access.log").exists());
}

#[test]
fn memory_too_small() {
    let fx = Fixture::new();
    let text = format!("[cache]\nmemory_bytes = \"512KiB\"\nmax_object_bytes = 1\n{DOMAIN}");
    fx.expect(
        &text,
        "cache.memory_bytes",
        Some("\"512KiB\""),
        "at least 1 MiB",
    );
}

#[test]
fn size_unit_unknown() {
    let fx = Fixture::new();
    let text = format!("[cache]\nmemory_bytes = \"2 GB5\"\n{DOMAIN}");
    fx.expect(
        &text,
        "cache.memory_bytes",
        Some("\"2 GB5\""),
        "unknown size unit",
    );
}

#[test]
fn max_object_over_memory() {
    let fx = Fixture::new();
    let text = format!("[cache]\nmemory_bytes = \"8MiB\"\nmax_object_bytes = \"9MiB\"\n{DOMAIN}");
    let value = Some("\"9MiB\"");
    fx.expect(
        &text,
        "cache.max_object_bytes",
        value,
        "between 1 and cache.memory_bytes",
    );
}

#[test]
fn object_limits_default_to_small_budgets() {
    let fx = Fixture::new();
    let text = format!(
        "[cache]\nmemory_bytes = \"8MiB\"\ndisk_dir = \"disk\"\ndisk_bytes = \"100MiB\"\n{DOMAIN}"
    );
    let config = fx.config(&text, &[]);
    assert_eq!(config.cache.max_object_bytes, 8 << 20);
    let disk = config.cache.disk.as_ref().expect("disk tier");
    assert_eq!(disk.max_object_bytes, 100 << 20);

    let text = format!("[cache]\ndisk_dir = \"disk\"\ndisk_bytes = \"8GiB\"\n{DOMAIN}");
    let config = fx.config(&text, &[]);
    let disk = config.cache.disk.as_ref().expect("disk tier");
    assert_eq!(disk.max_object_bytes, 4 << 30);
}

#[test]
fn lock_age_zero() {
    let fx = Fixture::new();
    let text = format!("[cache]\nlock_age_timeout_secs = 0\n{DOMAIN}");
    fx.expect(
        &text,
        "cache.lock_age_timeout_secs",
        Some("0"),
        "at least 1 second",
    );
}

#[test]
fn domains_missing() {
    let fx = Fixture::new();
    fx.expect(
        "[server]\nthreads = 2\n",
        "domains",
        None,
        "define at least one domain",
    );
}

#[test]
fn domain_id_invalid() {
    let fx = Fixture::new();
    let text = DOMAIN.replace("domains.primary", "domains.Primary");
    fx.expect(&text, "domains.Primary", None, "a domain id uses");
}

#[test]
fn domain_unknown_key() {
    let fx = Fixture::new();
    let text = domain_with("hosts = [", "aliases = []\nhosts = [");
    fx.expect(&text, "domains.primary.aliases", Some("[]"), "unknown key");
}

#[test]
fn hosts_empty() {
    let fx = Fixture::new();
    let text = domain_with("\"mirror.example.org\", \"*.mirror.example.org\"", "");
    fx.expect(
        &text,
        "domains.primary.hosts",
        Some("[]"),
        "at least one host",
    );
}

#[test]
fn hosts_missing() {
    let fx = Fixture::new();
    let text = domain_with(
        "hosts = [\"mirror.example.org\", \"*.mirror.example.org\"]",
        "",
    );
    let errors = fx.errors(&text, &[]);
    let error = on_key(&errors, "domains.primary");
    assert!(error.reason.contains("missing field `hosts`"), "{error}");
}

#[test]
fn host_pattern_invalid() {
    let fx = Fixture::new();
    let text = domain_with("\"*.mirror.example.org\"", "\"mirror.*.example.org\"");
    let value = Some("\"mirror.*.example.org\"");
    fx.expect(
        &text,
        "domains.primary.hosts[1]",
        value,
        "only allowed as the whole first",
    );
}

#[test]
fn host_pattern_with_port() {
    let fx = Fixture::new();
    let text = domain_with("\"mirror.example.org\"", "\"mirror.example.org:443\"");
    let value = Some("\"mirror.example.org:443\"");
    fx.expect(&text, "domains.primary.hosts[0]", value, "take no port");
}

#[test]
fn host_in_two_domains() {
    let fx = Fixture::new();
    let community = COMMUNITY.replace("\"community.example.org\"", "\"Mirror.Example.org\"");
    let text = format!("{DOMAIN}{community}");
    let key = "domains.primary.hosts[0]";
    fx.expect(
        &text,
        key,
        Some("\"mirror.example.org\""),
        "domain `community`",
    );
}

#[test]
fn host_twice_in_one_domain() {
    let fx = Fixture::new();
    let text = domain_with("\"*.mirror.example.org\"", "\"MIRROR.example.org\"");
    fx.config(&text, &[]);
}

#[test]
fn origin_kind_unknown() {
    let fx = Fixture::new();
    let text = domain_with("kind = \"http\"", "kind = \"s3\"");
    let key = "domains.primary.origins.web.kind";
    fx.expect(&text, key, Some("\"s3\""), "unknown variant `s3`");
}

#[test]
fn origin_name_invalid() {
    let fx = Fixture::new();
    let text = domain_with("origins.web]", "origins.\"web/1\"]");
    fx.expect(
        &text,
        "domains.primary.origins.web/1",
        None,
        "an origin name uses",
    );
}

#[test]
fn http_origin_no_addresses() {
    let fx = Fixture::new();
    let text = domain_with("[\"127.0.0.1:9\"]", "[]");
    let errors = fx.errors(&text, &[]);
    let key = "domains.primary.origins.web.addresses";
    assert!(on_key(&errors, key).reason.contains("at least one"));
    assert_eq!(errors.len(), 1, "{errors:#?}");
}

#[test]
fn http_origin_address_without_port() {
    let fx = Fixture::new();
    let text = domain_with("\"127.0.0.1:9\"", "\"127.0.0.1\"");
    let key = "domains.primary.origins.web.addresses[0]";
    fx.expect(&text, key, Some("\"127.0.0.1\""), "cannot resolve");
}

#[test]
fn http_origin_bad_port() {
    let fx = Fixture::new();
    let text = domain_with("\"127.0.0.1:9\"", "\"localhost:http\"");
    let key = "domains.primary.origins.web.addresses[0]";
    fx.expect(&text, key, Some("\"localhost:http\""), "invalid port value");
}

#[test]
fn http_origin_timeout_zero() {
    let fx = Fixture::new();
    let text = domain_with("kind = \"http\"", "kind = \"http\"\nread_timeout_ms = 0");
    let key = "domains.primary.origins.web.read_timeout_ms";
    fx.expect(&text, key, Some("0"), "at least 1 millisecond");
}

#[test]
fn http_origin_bad_host() {
    let fx = Fixture::new();
    let text = domain_with("kind = \"http\"", "kind = \"http\"\nhost = \"a\\nb\"");
    let key = "domains.primary.origins.web.host";
    fx.expect(
        &text,
        key,
        Some("\"a\\nb\""),
        "not a valid Host header value",
    );
}

#[test]
fn http_origin_unknown_key() {
    let fx = Fixture::new();
    let text = domain_with("kind = \"http\"", "kind = \"http\"\nroot = \"tree\"");
    let errors = fx.errors(&text, &[]);
    let error = on_key(&errors, "domains.primary.origins.web.root");
    assert_eq!(error.value.as_deref(), Some("\"tree\""));
    assert!(error.reason.contains("unknown key"), "{error}");
}

#[test]
fn export_origin_unknown_keys_each_named() {
    let fx = Fixture::new();
    let text = domain_with(
        "root = \"tree\"",
        "root = \"tree\"\npinned = \"x\"\nrooot = \"y\"",
    );
    let errors = fx.errors(&text, &[]);
    for (key, value) in [("pinned", "\"x\""), ("rooot", "\"y\"")] {
        let error = on_key(&errors, &format!("domains.primary.origins.tree.{key}"));
        assert_eq!(error.value.as_deref(), Some(value));
        assert!(error.reason.contains("unknown key"), "{error}");
    }
    assert_eq!(errors.len(), 2, "{errors:?}");
}

#[test]
fn export_root_missing() {
    let fx = Fixture::new();
    let text = domain_with("root = \"tree\"", "root = \"gone\"");
    let key = "domains.primary.origins.tree.root";
    fx.expect(&text, key, Some("\"gone\""), "does not exist; create it");
    // A file where the tree should be.
    let text = domain_with("root = \"tree\"", "root = \"users.htpasswd\"");
    fx.expect(
        &text,
        key,
        Some("\"users.htpasswd\""),
        "is not a directory; point it at the export tree",
    );
}

#[test]
fn upstream_pool_size_bounded() {
    let fx = Fixture::new();
    let text = format!("[server]\nupstream_keepalive_pool_size = 100001\n{DOMAIN}");
    fx.expect(
        &text,
        "server.upstream_keepalive_pool_size",
        Some("100001"),
        "must be at most 100000",
    );
    let text = format!("[server]\nupstream_keepalive_pool_size = 100000\n{DOMAIN}");
    assert_eq!(
        fx.config(&text, &[]).server.upstream_keepalive_pool_size,
        100_000
    );
}

#[test]
fn export_root_missing_spares_routes() {
    let fx = Fixture::new();
    let text = domain_with("root = \"tree\"", "root = \"gone\"");
    let errors = fx.errors(&text, &[]);
    assert_eq!(errors.len(), 1, "{errors:#?}");
}

#[test]
fn pinned_export_invalid() {
    let fx = Fixture::new();
    let text = domain_with(
        "root = \"tree\"",
        "root = \"tree\"\npinned_export = \"../x\"",
    );
    let key = "domains.primary.origins.tree.pinned_export";
    fx.expect(&text, key, Some("\"../x\""), "an export id uses");
}

#[test]
fn pinned_export_hidden() {
    let fx = Fixture::new();
    let text = domain_with(
        "root = \"tree\"",
        "root = \"tree\"\npinned_export = \".tmp-1\"",
    );
    let key = "domains.primary.origins.tree.pinned_export";
    fx.expect(&text, key, Some("\".tmp-1\""), "starts with '.'");
}

#[test]
fn pinned_export_absent() {
    let fx = Fixture::new();
    let pin = "root = \"tree\"\npinned_export = \"20250101T000000Z\"";
    let text = domain_with("root = \"tree\"", pin);
    let key = "domains.primary.origins.tree.pinned_export";
    fx.expect(
        &text,
        key,
        Some("\"20250101T000000Z\""),
        "is not a directory",
    );
}

#[test]
fn pinned_export_present() {
    let fx = Fixture::new();
    let pin = "root = \"tree\"\npinned_export = \"20260101T120000Z\"";
    fx.config(&domain_with("root = \"tree\"", pin), &[]);
}

#[test]
fn routes_missing() {
    let fx = Fixture::new();
    let text = COMMUNITY.replace(
        "[[domains.community.routes]]\nprefix = \"/\"\norigin = \"tree\"\n",
        "",
    );
    fx.expect(
        &text,
        "domains.community.routes",
        None,
        "at least one route",
    );
}

#[test]
fn route_prefix_not_normalised() {
    let fx = Fixture::new();
    let text = domain_with("prefix = \"/\"", "prefix = \"/a//b/../\"");
    let key = "domains.primary.routes[1].prefix";
    fx.expect(
        &text,
        key,
        Some("\"/a//b/../\""),
        "normalised absolute path",
    );
}

#[test]
fn route_prefix_encoded() {
    let fx = Fixture::new();
    let text = domain_with("prefix = \"/\"", "prefix = \"/a%2Fb/\"");
    let key = "domains.primary.routes[1].prefix";
    fx.expect(&text, key, Some("\"/a%2Fb/\""), "no `%`");
}

#[test]
fn route_origin_unknown() {
    let fx = Fixture::new();
    let text = domain_with("origin = \"web\"", "origin = \"webb\"");
    let key = "domains.primary.routes[1].origin";
    fx.expect(&text, key, Some("\"webb\""), "defined: tree, web");
}

#[test]
fn route_prefix_duplicate() {
    let fx = Fixture::new();
    let text = domain_with("prefix = \"/\"", "prefix = \"/concelier/exports/mirror/\"");
    let key = "domains.primary.routes[1].prefix";
    let value = Some("\"/concelier/exports/mirror/\"");
    fx.expect(&text, key, value, "another route has the same prefix");
}

#[test]
fn origin_path_slash_mismatch() {
    let fx = Fixture::new();
    let text = domain_with("origin_path = \"/mirror/\"", "origin_path = \"/mirror\"");
    let key = "domains.primary.routes[0].origin_path";
    fx.expect(
        &text,
        key,
        Some("\"/mirror\""),
        "ends with `/` exactly when the prefix does",
    );
}

#[test]
fn origin_path_dot_segment() {
    let fx = Fixture::new();
    let text = domain_with(
        "origin_path = \"/mirror/\"",
        "origin_path = \"/mirror/../\"",
    );
    let key = "domains.primary.routes[0].origin_path";
    fx.expect(
        &text,
        key,
        Some("\"/mirror/../\""),
        "normalised absolute path",
    );
}

#[test]
fn origin_path_query() {
    let fx = Fixture::new();
    let text = domain_with("origin_path = \"/mirror/\"", "origin_path = \"/m?x=/\"");
    let key = "domains.primary.routes[0].origin_path";
    fx.expect(&text, key, Some("\"/m?x=/\""), "`?`");
}

#[test]
fn plugin_name_unknown() {
    let fx = Fixture::new();
    let text = domain_with("name = \"ttl\"", "name = \"rate-limit\"");
    let key = "domains.primary.plugins[1].name";
    fx.expect(
        &text,
        key,
        Some("\"rate-limit\""),
        "use one of: htpasswd, ttl, rate_limit",
    );
}

#[test]
fn plugin_name_missing() {
    let fx = Fixture::new();
    let text = domain_with("name = \"htpasswd\"\n", "");
    fx.expect(
        &text,
        "domains.primary.plugins[0].name",
        None,
        "name the plugin",
    );
}

#[test]
fn plugin_setting_unknown() {
    let fx = Fixture::new();
    let text = domain_with(
        "file = \"users.htpasswd\"",
        "file = \"users.htpasswd\"\nrelm = \"x\"",
    );
    let key = "domains.primary.plugins[0].relm";
    fx.expect(&text, key, Some("\"x\""), "unknown key");
}

#[test]
fn ttl_pattern_invalid() {
    let fx = Fixture::new();
    let text = domain_with(
        "pattern = \"/concelier/exports/mirror/**\"",
        "pattern = \"/a/**b\"",
    );
    let key = "domains.primary.plugins[1].rules[0].pattern";
    fx.expect(
        &text,
        key,
        Some("\"/a/**b\""),
        "`**` must be a whole segment",
    );
}

#[test]
fn ttl_zero() {
    let fx = Fixture::new();
    let text = domain_with("ttl_secs = 300", "ttl_secs = 0");
    let key = "domains.primary.plugins[1].rules[0].ttl_secs";
    fx.expect(&text, key, Some("0"), "at least 1 second");
}

#[test]
fn ttl_cache_control_invalid() {
    let fx = Fixture::new();
    let text = domain_with("\"public, max-age=300\"", "\"public\\u0007\"");
    let key = "domains.primary.plugins[1].rules[0].cache_control";
    fx.expect(
        &text,
        key,
        Some("\"public\\u{7}\""),
        "not a valid header value",
    );
}

#[test]
fn htpasswd_file_missing() {
    let fx = Fixture::new();
    let text = domain_with("file = \"users.htpasswd\"", "file = \"nobody.htpasswd\"");
    let key = "domains.primary.plugins[0].file";
    let error = fx.expect(
        &text,
        key,
        Some("\"nobody.htpasswd\""),
        "cannot load htpasswd file",
    );
    let resolved = fx.dir.path().join("nobody.htpasswd");
    assert!(
        error.reason.contains(&resolved.display().to_string()),
        "{error}"
    );
}

/// Returns a config with eleven errors, spread over every part of the file.
fn many_errors() -> String {
    let primary = DOMAIN
        .replace("root = \"tree\"", "root = \"gone\"")
        .replace("origin = \"web\"", "origin = \"webb\"")
        .replace("name = \"ttl\"\n", "name = \"ttl\"\nrule = 1\n")
        .replace("file = \"users.htpasswd\"", "file = \"nobody.htpasswd\"");
    let community = COMMUNITY
        .replace(
            "\"community.example.org\"",
            "\"mirror.example.org\", \"a.*.org\"",
        )
        .replace("prefix = \"/\"", "prefix = \"/x/./\"");
    format!(
        "extra = true\n[server]\nthreads = 0\n[log]\nlevel = \"loud\"\n\
         [cache]\nmemory_bytes = \"64 MiB\"\nmax_object_bytes = \"1GiB\"\n{primary}{community}"
    )
}

const MANY_ERROR_KEYS: [&str; 11] = [
    "extra",
    "server.threads",
    "log.level",
    "cache.max_object_bytes",
    "domains.primary.origins.tree.root",
    "domains.primary.routes[1].origin",
    "domains.primary.plugins[0].file",
    "domains.primary.plugins[1].rule",
    "domains.primary.hosts[0]",
    "domains.community.hosts[1]",
    "domains.community.routes[0].prefix",
];

#[test]
fn many_errors_all_listed() {
    let fx = Fixture::new();
    let errors = fx.errors(&many_errors(), &[]);
    for key in MANY_ERROR_KEYS {
        on_key(&errors, key);
    }
}

#[test]
fn many_errors_counted() {
    let fx = Fixture::new();
    let errors = fx.errors(&many_errors(), &[]);
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys.len(), MANY_ERROR_KEYS.len(), "{keys:#?}");
}

#[test]
fn many_errors_have_reasons() {
    let fx = Fixture::new();
    for error in fx.errors(&many_errors(), &[]) {
        assert_eq!(error.source, fx.file(), "{error}");
        assert!(
            !error.reason.is_empty() && !error.reason.contains('\n'),
            "{error:?}"
        );
    }
}

#[test]
fn env_threads_applies() {
    let fx = Fixture::new();
    let config = fx.config(DOMAIN, &[("MIRROR_GATEWAY__SERVER__THREADS", "4")]);
    assert_eq!(config.server.threads, 4);
}

#[test]
fn env_ignores_other_variables() {
    let fx = Fixture::new();
    let env = [("MIRROR_GATEWAY_CONFIG", "/x"), ("SERVER__THREADS", "0")];
    let config = fx.config(DOMAIN, &env);
    assert_eq!(config.server.threads, 2);
    assert!(config.warnings.is_empty(), "{:#?}", config.warnings);
}

/// Domain ids that overrides cannot tell apart get a warning, and the config still loads.
#[test]
fn look_alike_domain_ids_warn() {
    let fx = Fixture::new();
    let second = COMMUNITY
        .replace("domains.community", "domains.mirror_a")
        .replace("community.example.org", "b.example.org");
    let first = COMMUNITY
        .replace("domains.community", "domains.mirror-a")
        .replace("community.example.org", "a.example.org");
    let config = fx.config(&format!("{DOMAIN}{first}{second}"), &[]);
    assert_eq!(config.warnings.len(), 1, "{:#?}", config.warnings);
    assert_eq!(config.warnings[0].key, "domains.mirror_a");
    assert!(
        config.warnings[0]
            .reason
            .contains("MIRROR_GATEWAY__DOMAINS__MIRROR_A__"),
        "{}",
        config.warnings[0]
    );
    let distinct = COMMUNITY.to_string() + &first;
    assert!(fx
        .config(&format!("{DOMAIN}{distinct}"), &[])
        .warnings
        .is_empty());
}

/// A variable that looks meant as an override but is not one is ignored with a warning.
#[test]
fn env_near_miss_warns() {
    let fx = Fixture::new();
    let env = [
        ("MIRROR_GATEWAY_SERVER__THREADS", "4"),
        ("mirror_gateway__server__threads", "5"),
    ];
    let config = fx.config(DOMAIN, &env);
    assert_eq!(config.server.threads, 2);
    let sources: Vec<&str> = config.warnings.iter().map(|w| w.source.as_str()).collect();
    assert_eq!(
        sources,
        [
            "MIRROR_GATEWAY_SERVER__THREADS",
            "mirror_gateway__server__threads"
        ]
    );
    assert!(
        config.warnings[0].reason.contains("MIRROR_GATEWAY__"),
        "{}",
        config.warnings[0]
    );
}

#[test]
fn env_invalid_value_names_variable() {
    let fx = Fixture::new();
    let text = format!("[server]\nthreads = 2\n{DOMAIN}");
    let errors = fx.errors(&text, &[("MIRROR_GATEWAY__SERVER__THREADS", "four")]);
    assert_eq!(errors[0].source, "MIRROR_GATEWAY__SERVER__THREADS");
    assert_eq!(errors[0].key, "server.threads");
    assert_eq!(errors[0].value.as_deref(), Some("\"four\""));
    assert!(
        errors[0].reason.contains("expected a TOML integer"),
        "{}",
        errors[0]
    );
}

#[test]
fn env_rejected_value_names_variable() {
    let fx = Fixture::new();
    let errors = fx.errors(DOMAIN, &[("MIRROR_GATEWAY__SERVER__THREADS", "0")]);
    let error = on_key(&errors, "server.threads");
    assert_eq!(error.source, "MIRROR_GATEWAY__SERVER__THREADS");
    assert!(error.reason.contains("between 1 and 512"), "{error}");
}

#[test]
fn env_unknown_key_names_variable() {
    let fx = Fixture::new();
    let errors = fx.errors(DOMAIN, &[("MIRROR_GATEWAY__SERVER__THREAD", "4")]);
    assert_eq!(
        on_key(&errors, "server.thread").source,
        "MIRROR_GATEWAY__SERVER__THREAD"
    );
}

#[test]
fn env_plugin_entry_file() {
    let fx = Fixture::new();
    let users = fx.dir.path().join("secrets/users");
    std::fs::create_dir_all(users.parent().expect("parent")).expect("mkdir");
    std::fs::write(&users, USERS).expect("users");
    let text = domain_with("file = \"users.htpasswd\"", "file = \"nobody.htpasswd\"");
    let var = "MIRROR_GATEWAY__DOMAINS__PRIMARY__PLUGINS__0__FILE";
    fx.config(&text, &[(var, &users.display().to_string())]);
}

#[test]
fn env_plugin_entry_missing_file() {
    let fx = Fixture::new();
    let var = "MIRROR_GATEWAY__DOMAINS__PRIMARY__PLUGINS__0__FILE";
    let errors = fx.errors(DOMAIN, &[(var, "/nonexistent/users")]);
    let error = on_key(&errors, "domains.primary.plugins[0].file");
    assert_eq!(error.source, var);
    assert_eq!(error.value.as_deref(), Some("\"/nonexistent/users\""));
}

#[test]
fn env_plugin_index_out_of_range() {
    let fx = Fixture::new();
    let var = "MIRROR_GATEWAY__DOMAINS__PRIMARY__PLUGINS__5__FILE";
    let errors = fx.errors(DOMAIN, &[(var, "x")]);
    assert_eq!(errors[0].source, var);
    assert!(
        errors[0].reason.contains("index 5 is out of range"),
        "{}",
        errors[0]
    );
}

#[test]
fn env_dashed_domain_id() {
    let fx = Fixture::new();
    let text = COMMUNITY.replace("domains.community", "domains.mirror-a");
    let env = [(
        "MIRROR_GATEWAY__DOMAINS__MIRROR_A__HOSTS",
        "[\"b.example.org\"]",
    )];
    let config = fx.config(&text, &env);
    assert_eq!(config.domains[0].hosts, ["b.example.org"]);
}

#[test]
fn env_listen_entry() {
    let fx = Fixture::new();
    let text = format!("[server]\nlisten = [\"127.0.0.1:8080\"]\n{DOMAIN}");
    let env = [("MIRROR_GATEWAY__SERVER__LISTEN__0", "0.0.0.0:8081")];
    let config = fx.config(&text, &env);
    assert_eq!(
        config.server.listen,
        ["0.0.0.0:8081".parse().expect("addr")]
    );
}

#[test]
fn env_listen_list() {
    let fx = Fixture::new();
    let env = [(
        "MIRROR_GATEWAY__SERVER__LISTEN",
        "[\"0.0.0.0:80\", \"[::]:80\"]",
    )];
    assert_eq!(fx.config(DOMAIN, &env).server.listen.len(), 2);
}

#[test]
fn env_entry_of_absent_list() {
    let fx = Fixture::new();
    let var = "MIRROR_GATEWAY__SERVER__LISTEN__0";
    let errors = fx.errors(DOMAIN, &[(var, "0.0.0.0:8081")]);
    assert_eq!(errors[0].source, var);
    assert!(
        errors[0].reason.contains("set the whole list"),
        "{}",
        errors[0]
    );
}

#[test]
fn env_new_key_typed_as_toml() {
    let fx = Fixture::new();
    let env = [("MIRROR_GATEWAY__CACHE__MEMORY_BYTES", "134217728")];
    assert_eq!(fx.config(DOMAIN, &env).cache.memory_bytes, 128 << 20);
}

#[test]
fn env_string_key_keeps_text() {
    let fx = Fixture::new();
    let text = format!("[log]\nlevel = \"info\"\n{DOMAIN}");
    let env = [("MIRROR_GATEWAY__LOG__LEVEL", "warn,mirror_proxy=debug")];
    assert_eq!(fx.config(&text, &env).log.level, "warn,mirror_proxy=debug");
}

#[test]
fn env_empty_segment() {
    let fx = Fixture::new();
    let errors = fx.errors(DOMAIN, &[("MIRROR_GATEWAY__SERVER____THREADS", "4")]);
    assert!(
        errors[0].reason.contains("empty key segment"),
        "{}",
        errors[0]
    );
}

#[test]
fn every_unknown_key_in_a_table_reported() {
    let fx = Fixture::new();
    let text = format!("[server]\nthread = 4\nlistn = []\n{DOMAIN}");
    let errors = fx.errors(&text, &[]);
    assert_eq!(on_key(&errors, "server.thread").value.as_deref(), Some("4"));
    assert_eq!(on_key(&errors, "server.listn").value.as_deref(), Some("[]"));
}

#[test]
fn env_budget_alias_lower_case_id() {
    let fx = Fixture::new();
    let domain = COMMUNITY.replace("domains.community", "domains.anon");
    let quota = "[[domains.anon.plugins]]\nname = \"quota\"\nindex_per_hour = 600\n\
                 download_per_hour = 1200\n";
    let text = format!("{domain}\n{quota}");
    let var = "MIRROR_GATEWAY__DOMAINS__anon__MAXINDEXREQUESTSPERHOUR";
    fx.config(&text, &[(var, "1")]);

    let errors = fx.errors(&text, &[(var, "0")]);
    let error = on_key(&errors, "domains.anon.plugins[0].index_per_hour");
    assert_eq!(error.source, var, "{error}");
}

#[test]
fn budget_negative_states_minimum() {
    let fx = Fixture::new();
    let u32_range = "expected a whole number from 1 to 4294967295";
    let at_least_1 = "expected a whole number of at least 1";
    for (plugin, key, expected) in [
        (
            "name = \"rate_limit\"\nrequests_per_second = 5\nburst = -1",
            "burst",
            u32_range,
        ),
        (
            "name = \"rate_limit\"\nrequests_per_second = 5\nburst = 4294967296",
            "burst",
            u32_range,
        ),
        (
            "name = \"rate_limit\"\nrequests_per_second = 5\nburst = 2\nmax_concurrent_per_ip = -3",
            "max_concurrent_per_ip",
            u32_range,
        ),
        (
            "name = \"quota\"\nindex_per_hour = 5\ndownload_per_hour = 5\n\
             domain_download_per_hour = -2",
            "domain_download_per_hour",
            at_least_1,
        ),
        (
            "name = \"quota\"\nindex_per_hour = 5\ndownload_per_hour = 5\n\
             [domains.primary.plugins.redis]\nurl = \"redis://127.0.0.1:6379/0\"\ntimeout_ms = -1",
            "redis.timeout_ms",
            "expected a whole number from 1 to 10000",
        ),
    ] {
        let text = format!("{DOMAIN}\n[[domains.primary.plugins]]\n{plugin}\n");
        let errors = fx.errors(&text, &[]);
        let error = on_key(&errors, &format!("domains.primary.plugins[2].{key}"));
        assert!(error.reason.contains(expected), "{error}");
    }
}

#[test]
fn budget_plugin_listed_twice() {
    let fx = Fixture::new();
    for plugin in [
        "name = \"quota\"\nindex_per_hour = 5\ndownload_per_hour = 10",
        "name = \"rate_limit\"\nrequests_per_second = 5\nburst = 10",
    ] {
        let entry = format!("\n[[domains.primary.plugins]]\n{plugin}\n");
        let text = format!("{DOMAIN}{entry}{entry}");
        let errors = fx.errors(&text, &[]);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert_eq!(errors[0].key, "domains.primary.plugins[3].name", "{plugin}");
        assert!(errors[0].reason.contains("plugins[2]"), "{}", errors[0]);
    }
}

#[test]
fn state_file_shared_by_domains() {
    let fx = Fixture::new();
    let quota = |domain: &str, path: &str| {
        format!(
            "\n[[domains.{domain}.plugins]]\nname = \"quota\"\nindex_per_hour = 5\n\
             download_per_hour = 10\nstate_file = \"{path}\"\n"
        )
    };
    let text = format!(
        "{DOMAIN}{}{COMMUNITY}{}",
        quota("primary", "quota.state"),
        quota("community", "./quota.state")
    );
    fx.expect(
        &text,
        "domains.primary.plugins[2].state_file",
        Some("\"quota.state\""),
        "also the state file of domain community",
    );
    // Other spellings of one file: a detour through `..`, and a link to the directory.
    std::os::unix::fs::symlink(fx.dir.path(), fx.dir.path().join("link")).expect("symlink");
    for alias in ["tree/../quota.state", "link/quota.state"] {
        let text = format!(
            "{DOMAIN}{}{COMMUNITY}{}",
            quota("primary", "quota.state"),
            quota("community", alias)
        );
        let errors = fx.errors(&text, &[]);
        let error = on_key(&errors, "domains.primary.plugins[2].state_file");
        assert!(
            error.reason.contains("also the state file"),
            "{alias}: {error}"
        );
    }
    let own = format!(
        "{DOMAIN}{}{COMMUNITY}{}",
        quota("primary", "primary.state"),
        quota("community", "community.state")
    );
    fx.config(&own, &[]);
}

#[test]
fn threads_wrong_type_states_range() {
    let fx = Fixture::new();
    for (value, shown) in [("-1", "-1"), ("\"2\"", "\"2\""), ("1.5", "1.5")] {
        let text = format!("[server]\nthreads = {value}\n{DOMAIN}");
        let error = fx.expect(&text, "server.threads", Some(shown), "from 1 to 512");
        assert!(
            !error.reason.contains("18446744073709551615"),
            "{value}: {error}"
        );
    }
    let text = format!("[server]\nthreads = \"2\"\n{DOMAIN}");
    fx.expect(
        &text,
        "server.threads",
        Some("\"2\""),
        "write it without quotes, e.g. 2",
    );
}

#[test]
fn timeout_wrong_type_states_minimum() {
    let fx = Fixture::new();
    let text = format!("[cache]\nlock_wait_timeout_secs = -5\n{DOMAIN}");
    let error = fx.expect(
        &text,
        "cache.lock_wait_timeout_secs",
        Some("-5"),
        "expected a whole number of at least 1",
    );
    assert!(!error.reason.contains("18446744073709551615"), "{error}");
}

#[test]
fn size_fraction_suggests_smaller_unit() {
    let fx = Fixture::new();
    let text = format!("[cache]\nmemory_bytes = \"1.5GiB\"\n{DOMAIN}");
    let error = fx.expect(
        &text,
        "cache.memory_bytes",
        Some("\"1.5GiB\""),
        "sizes are whole numbers; write \"1536MiB\"",
    );
    assert!(!error.reason.contains("unknown size unit"), "{error}");
}

#[test]
fn admin_listen_same_as_server_listen() {
    let fx = Fixture::new();
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:18880\"]\n[admin]\nlisten = \"127.0.0.1:18880\"\n\
         htpasswd = \"users.htpasswd\"\n{DOMAIN}"
    );
    fx.expect(
        &text,
        "admin.listen",
        Some("\"127.0.0.1:18880\""),
        "server.listen has this address too",
    );
}

#[test]
fn admin_listen_inside_wildcard_listen() {
    let fx = Fixture::new();
    for (server, admin) in [
        ("0.0.0.0:18881", "127.0.0.1:18881"),
        ("127.0.0.1:18881", "0.0.0.0:18881"),
        ("[::]:18881", "127.0.0.1:18881"),
    ] {
        let text = format!(
            "[server]\nlisten = [\"{server}\"]\n[admin]\nlisten = \"{admin}\"\n\
             htpasswd = \"users.htpasswd\"\n{DOMAIN}"
        );
        fx.expect(
            &text,
            "admin.listen",
            Some(&format!("\"{admin}\"")),
            "which takes this address too",
        );
    }
    let apart = format!(
        "[server]\nlisten = [\"0.0.0.0:18881\"]\n[admin]\nlisten = \"[::1]:18881\"\n\
         htpasswd = \"users.htpasswd\"\n{DOMAIN}"
    );
    fx.config(&apart, &[]);
}

#[test]
fn send_timeout_zero_rejected() {
    let fx = Fixture::new();
    let text = format!("[server]\nsend_timeout_secs = 0\n{DOMAIN}");
    fx.expect(
        &text,
        "server.send_timeout_secs",
        Some("0"),
        "must be at least 1 second",
    );
    let defaults = fx.config(DOMAIN, &[]);
    assert_eq!(
        defaults.server.send_timeout,
        std::time::Duration::from_secs(60)
    );
}

#[test]
fn tcp_nopush_on_by_default() {
    let fx = Fixture::new();
    assert!(fx.config(DOMAIN, &[]).server.tcp_nopush);
    let off = format!("[server]\ntcp_nopush = false\n{DOMAIN}");
    assert!(!fx.config(&off, &[]).server.tcp_nopush);
    let text = format!("[server]\ntcp_nopush = \"on\"\n{DOMAIN}");
    fx.expect(
        &text,
        "server.tcp_nopush",
        Some("\"on\""),
        "expected true or false",
    );
}

#[test]
fn keepalive_timeout_bounds() {
    let fx = Fixture::new();
    let defaults = fx.config(DOMAIN, &[]);
    assert_eq!(
        defaults.server.keepalive_timeout,
        std::time::Duration::from_secs(75)
    );
    let off = format!("[server]\nkeepalive_timeout_secs = 0\n{DOMAIN}");
    assert_eq!(
        fx.config(&off, &[]).server.keepalive_timeout,
        std::time::Duration::ZERO
    );
    let text = format!("[server]\nkeepalive_timeout_secs = 86401\n{DOMAIN}");
    fx.expect(
        &text,
        "server.keepalive_timeout_secs",
        Some("86401"),
        "must be at most 86400 seconds",
    );
}

#[test]
fn pid_file_directory_missing_warns() {
    let fx = Fixture::new();
    let text = format!("[server]\npid_file = \"nodir/gateway.pid\"\n{DOMAIN}");
    let config = fx.config(&text, &[]);
    assert_eq!(config.warnings.len(), 1, "{:#?}", config.warnings);
    assert_eq!(config.warnings[0].key, "server.pid_file");
    assert!(
        config.warnings[0].reason.contains("does not exist"),
        "{}",
        config.warnings[0]
    );
    let text = format!("[server]\npid_file = \"gateway.pid\"\n{DOMAIN}");
    assert!(fx.config(&text, &[]).warnings.is_empty());
}

#[test]
fn pipelining_on_by_default() {
    let fx = Fixture::new();
    assert!(fx.config(DOMAIN, &[]).server.pipelining);
    let off = format!("[server]\npipelining = false\n{DOMAIN}");
    assert!(!fx.config(&off, &[]).server.pipelining);
    let text = format!("[server]\npipelining = 1\n{DOMAIN}");
    fx.expect(
        &text,
        "server.pipelining",
        Some("1"),
        "expected true or false",
    );
}

#[test]
fn admin_listen_port_zero_shared() {
    let fx = Fixture::new();
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         htpasswd = \"users.htpasswd\"\n{DOMAIN}"
    );
    fx.config(&text, &[]);
}

#[test]
fn admin_listen_same_as_env_listen() {
    let fx = Fixture::new();
    let text = format!("[admin]\nhtpasswd = \"users.htpasswd\"\n{DOMAIN}");
    let errors = fx.errors(
        &text,
        &[
            ("MIRROR_GATEWAY__SERVER__LISTEN", "[\"127.0.0.1:18880\"]"),
            ("MIRROR_GATEWAY__ADMIN__LISTEN", "127.0.0.1:18880"),
        ],
    );
    let error = on_key(&errors, "admin.listen");
    assert_eq!(error.source, "MIRROR_GATEWAY__ADMIN__LISTEN");
}

#[test]
fn disk_dir_is_file() {
    let fx = Fixture::new();
    let text = format!("[cache]\ndisk_dir = \"users.htpasswd\"\n{DOMAIN}");
    fx.expect(
        &text,
        "cache.disk_dir",
        Some("\"users.htpasswd\""),
        "exists and is not a directory",
    );
}

#[test]
fn disk_dir_parent_missing() {
    let fx = Fixture::new();
    let text = format!("[cache]\ndisk_dir = \"no/such/cache\"\n{DOMAIN}");
    let error = fx.expect(
        &text,
        "cache.disk_dir",
        Some("\"no/such/cache\""),
        "does not exist; create it",
    );
    assert!(error.reason.contains("no/such"), "{error}");
    assert!(
        !fx.dir.path().join("no").exists(),
        "check created a directory"
    );
}

/// A directory that refuses new files, as `/proc` does even to root, is reported by `check`
/// instead of failing at start.
#[test]
fn disk_dir_not_writable() {
    let fx = Fixture::new();
    let text = format!("[cache]\ndisk_dir = \"/proc/mirror-gateway-cache\"\n{DOMAIN}");
    let error = fx.expect(
        &text,
        "cache.disk_dir",
        Some("\"/proc/mirror-gateway-cache\""),
        "cannot create files in /proc",
    );
    assert!(error.reason.contains("write access"), "{error}");
}

/// `check` rejects what the disk tier would reject at start: a directory with files of
/// another program, or a cache of another format, and it writes nothing into them.
#[test]
fn disk_dir_not_a_cache() {
    let fx = Fixture::new();
    let data = fx.dir.path().join("data");
    std::fs::create_dir(&data).expect("data dir");
    std::fs::write(data.join("notes.txt"), "keep me").expect("foreign file");
    let text = format!("[cache]\ndisk_dir = \"data\"\n{DOMAIN}");
    fx.expect(
        &text,
        "cache.disk_dir",
        Some("\"data\""),
        "is not empty and has no FORMAT file",
    );
    assert!(!data.join("FORMAT").exists(), "check wrote a format file");
    assert!(data.join("notes.txt").exists(), "check removed a file");

    let other = fx.dir.path().join("other");
    std::fs::create_dir(&other).expect("other dir");
    std::fs::write(other.join("FORMAT"), "some other cache, format 9\n").expect("format file");
    let text = format!("[cache]\ndisk_dir = \"other\"\n{DOMAIN}");
    fx.expect(
        &text,
        "cache.disk_dir",
        Some("\"other\""),
        "this build writes",
    );
}

/// Disk tier settings without `disk_dir` load with a warning each; a decimal size that is too
/// small is shown as written.
#[test]
fn disk_keys_without_dir_warn() {
    let fx = Fixture::new();
    let text = format!("[cache]\ndisk_bytes = \"2GiB\"\ndisk_max_object_bytes = \"5MB\"\n{DOMAIN}");
    let config = fx.config(&text, &[]);
    assert!(config.cache.disk.is_none());
    let keys: Vec<&str> = config.warnings.iter().map(|w| w.key.as_str()).collect();
    assert_eq!(keys, ["cache.disk_bytes", "cache.disk_max_object_bytes"]);
    assert_eq!(config.warnings[0].value.as_deref(), Some("\"2GiB\""));
    assert_eq!(config.warnings[1].value.as_deref(), Some("\"5MB\""));
    assert!(config.warnings[0].reason.contains("without cache.disk_dir"));

    let small = format!("[cache]\ndisk_dir = \"cache\"\ndisk_bytes = \"1MB\"\n{DOMAIN}");
    fx.expect(
        &small,
        "cache.disk_bytes",
        Some("\"1MB\""),
        "must be at least 1 MiB (1048576 bytes)",
    );
}

#[test]
fn disk_dir_empty_text() {
    let fx = Fixture::new();
    let text = format!("[cache]\ndisk_dir = \"\"\n{DOMAIN}");
    fx.expect(
        &text,
        "cache.disk_dir",
        Some("\"\""),
        "is empty; name the cache directory",
    );
}

#[test]
fn disk_dir_last_component_missing() {
    let fx = Fixture::new();
    let text = format!("[cache]\ndisk_dir = \"cache\"\n{DOMAIN}");
    let config = fx.config(&text, &[]);
    let disk = config.cache.disk.expect("disk tier");
    assert_eq!(disk.dir, fx.dir.path().join("cache"));
}

#[test]
fn disk_sweep_interval_out_of_range() {
    let fx = Fixture::new();
    let zero = format!("[cache]\ndisk_dir = \"cache\"\ndisk_sweep_interval_secs = 0\n{DOMAIN}");
    fx.expect(
        &zero,
        "cache.disk_sweep_interval_secs",
        Some("0"),
        "must be at least 1 second",
    );
    let day_and_one =
        format!("[cache]\ndisk_dir = \"cache\"\ndisk_sweep_interval_secs = 86401\n{DOMAIN}");
    fx.expect(
        &day_and_one,
        "cache.disk_sweep_interval_secs",
        Some("86401"),
        "must be at most 86400 seconds",
    );
    let without_disk = format!("[cache]\ndisk_sweep_interval_secs = 0\n{DOMAIN}");
    fx.expect(
        &without_disk,
        "cache.disk_sweep_interval_secs",
        Some("0"),
        "must be at least 1 second",
    );
    let negative = format!("[cache]\ndisk_sweep_interval_secs = -5\n{DOMAIN}");
    fx.expect(
        &negative,
        "cache.disk_sweep_interval_secs",
        Some("-5"),
        "from 1 to 86400",
    );
}

#[test]
fn disk_sweep_interval_default_and_set() {
    let fx = Fixture::new();
    let default = format!("[cache]\ndisk_dir = \"cache\"\n{DOMAIN}");
    let disk = fx.config(&default, &[]).cache.disk.expect("disk tier");
    assert_eq!(disk.sweep_interval, std::time::Duration::from_secs(600));
    for secs in [1, 86_400] {
        let text =
            format!("[cache]\ndisk_dir = \"cache\"\ndisk_sweep_interval_secs = {secs}\n{DOMAIN}");
        let disk = fx.config(&text, &[]).cache.disk.expect("disk tier");
        assert_eq!(disk.sweep_interval, std::time::Duration::from_secs(secs));
    }
}

#[test]
fn trusted_proxies_everything_warns() {
    let fx = Fixture::new();
    for network in ["0.0.0.0/0", "::/0"] {
        let text = format!("[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"{network}\"]\n{DOMAIN}");
        let config = fx.config(&text, &[]);
        let warning = on_key(&config.warnings, "server.trusted_proxies[1]");
        assert!(
            warning
                .reason
                .contains("every client can choose its own address"),
            "{warning}"
        );
        assert!(
            !config
                .warnings
                .iter()
                .any(|w| w.key == "server.trusted_proxies[0]"),
            "{:#?}",
            config.warnings
        );
    }
}

#[test]
fn proxy_protocol_defaults_off() {
    let fx = Fixture::new();
    let config = fx.config(DOMAIN, &[]);
    assert!(!config.server.proxy_protocol);
    let timeout = config.server.proxy_protocol_timeout;
    assert_eq!(timeout, std::time::Duration::from_secs(5));

    let text = format!(
        "[server]\ntrusted_proxies = [\"10.0.0.0/8\"]\nproxy_protocol = true\n\
         proxy_protocol_timeout_ms = 250\n{DOMAIN}"
    );
    let config = fx.config(&text, &[]);
    assert!(config.server.proxy_protocol);
    let timeout = config.server.proxy_protocol_timeout;
    assert_eq!(timeout, std::time::Duration::from_millis(250));
}

#[test]
fn proxy_protocol_needs_trusted_proxies() {
    let fx = Fixture::new();
    let text = format!("[server]\nproxy_protocol = true\n{DOMAIN}");
    let error = fx.expect(
        &text,
        "server.proxy_protocol",
        Some("true"),
        "server.trusted_proxies, which is empty",
    );
    assert!(error.reason.contains("list the networks"), "{error}");
}

#[test]
fn proxy_protocol_timeout_range() {
    let fx = Fixture::new();
    for millis in ["0", "60001"] {
        let text = format!("[server]\nproxy_protocol_timeout_ms = {millis}\n{DOMAIN}");
        let key = "server.proxy_protocol_timeout_ms";
        fx.expect(&text, key, Some(millis), "between 1 and 60000 milliseconds");
    }
    let text = format!("[server]\nproxy_protocol_timeout_ms = -5\n{DOMAIN}");
    let errors = fx.errors(&text, &[]);
    let error = on_key(&errors, "server.proxy_protocol_timeout_ms");
    assert!(error.reason.contains("from 1 to 60000"), "{error}");
}

#[test]
fn short_lock_wait_warns() {
    let fx = Fixture::new();
    let defaults = fx.config(DOMAIN, &[]);
    assert!(defaults.warnings.is_empty(), "{:#?}", defaults.warnings);

    let text = format!("[cache]\nlock_wait_timeout_secs = 32\n{DOMAIN}");
    let config = fx.config(&text, &[]);
    let warning = on_key(&config.warnings, "cache.lock_wait_timeout_secs");
    assert_eq!(warning.value.as_deref(), Some("32"));
    assert!(warning.reason.contains("32000 ms"), "{warning}");
    assert!(warning.reason.contains("above 32 s"), "{warning}");

    let domain = domain_with(
        "[domains.primary.origins.tree]",
        "lock_wait_timeout_secs = 5\n\n[domains.primary.origins.tree]",
    );
    let config = fx.config(&domain, &[]);
    on_key(&config.warnings, "domains.primary.lock_wait_timeout_secs");
}

#[test]
fn lock_age_within_wait_warns() {
    let fx = Fixture::new();
    let text = format!("[cache]\nlock_age_timeout_secs = 10\n{DOMAIN}");
    let config = fx.config(&text, &[]);
    let warning = on_key(&config.warnings, "cache.lock_wait_timeout_secs");
    assert!(
        warning.reason.contains("lock_age_timeout_secs (10 s)"),
        "{warning}"
    );

    let text =
        format!("[cache]\nlock_age_timeout_secs = 40\nlock_wait_timeout_secs = 39\n{DOMAIN}");
    let config = fx.config(&text, &[]);
    let age_warnings = config
        .warnings
        .iter()
        .filter(|w| w.reason.contains("lock_age_timeout_secs"))
        .count();
    assert_eq!(age_warnings, 0, "{:#?}", config.warnings);
}

#[test]
fn server_waits_capped_at_one_day() {
    let fx = Fixture::new();
    for key in [
        "send_timeout_secs",
        "grace_period_secs",
        "shutdown_timeout_secs",
    ] {
        let text = format!("[server]\n{key} = 86401\n{DOMAIN}");
        fx.expect(
            &text,
            &format!("server.{key}"),
            Some("86401"),
            "at most 86400 seconds",
        );
    }
}

#[test]
fn env_index_out_of_range_suggests_list() {
    let fx = Fixture::new();
    let var = "MIRROR_GATEWAY__SERVER__LISTEN__1";
    let text = format!("[server]\nlisten = [\"127.0.0.1:8080\"]\n{DOMAIN}");
    let errors = fx.errors(&text, &[(var, "127.0.0.1:8081")]);
    let error = on_key(&errors, "server.listen[1]");
    assert_eq!(error.source, var);
    assert!(
        error
            .reason
            .contains("MIRROR_GATEWAY__SERVER__LISTEN='[\"127.0.0.1:8080\", \"...\"]'"),
        "{error}"
    );
}
