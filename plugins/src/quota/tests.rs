//! Unit tests of the quota plugin: budgets, windows, principals, reloads and state files.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, Method, StatusCode};

use super::*;

/// 2026-01-01T12:00:00Z.
const NOON: u64 = 1_767_268_800;
const INDEX: &str = "/concelier/exports/index.json";
const BUNDLE: &str = "/concelier/exports/mirror/primary/bundle.json";

fn at(offset_secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOON + offset_secs)
}

fn settings(text: &str) -> toml::Value {
    toml::Value::Table(text.parse::<toml::Table>().expect("valid TOML"))
}

fn build_in(registry: &Registry, domain: &str, text: &str) -> QuotaPlugin {
    let ctx = BuildContext {
        domain,
        config_dir: Path::new("/"),
    };
    match QuotaPlugin::with_registry(settings(text), &ctx, registry) {
        Ok(plugin) => plugin,
        Err(errors) => panic!("settings rejected: {errors:?}"),
    }
}

fn build(text: &str) -> QuotaPlugin {
    build_in(&Registry::new(), "primary", text)
}

fn build_errors(text: &str) -> Vec<SettingError> {
    let ctx = BuildContext {
        domain: "primary",
        config_dir: Path::new("/"),
    };
    match QuotaPlugin::with_registry(settings(text), &ctx, &Registry::new()) {
        Ok(_) => panic!("settings accepted: {text}"),
        Err(errors) => errors,
    }
}

/// Who sends a request.
#[derive(Clone, Copy)]
enum Sender<'a> {
    User(&'a str),
    Ip(IpAddr),
    Nobody,
}

/// Runs the request filter for `path` and returns its verdict and the request state.
async fn send(
    plugin: &QuotaPlugin,
    path: &str,
    from: Sender<'_>,
    now: SystemTime,
) -> (Verdict, RequestState) {
    let headers = HeaderMap::new();
    let mut state = RequestState::default();
    let client_addr = match from {
        Sender::User(name) => {
            state.user = Some(name.to_owned());
            Some(IpAddr::V4(Ipv4Addr::LOCALHOST))
        }
        Sender::Ip(ip) => Some(ip),
        Sender::Nobody => None,
    };
    let req = RequestInfo {
        domain: "primary",
        method: &Method::GET,
        path,
        query: None,
        headers: &headers,
        client_addr,
        received: std::time::Instant::now(),
    };
    let verdict = plugin.check_at(&req, &mut state, now).await;
    (verdict, state)
}

/// Returns the statuses of `n` requests (200 for a request let through).
async fn statuses(plugin: &QuotaPlugin, path: &str, from: Sender<'_>, n: usize) -> Vec<u16> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(status(&send(plugin, path, from, at(10)).await.0));
    }
    out
}

fn status(verdict: &Verdict) -> u16 {
    match verdict {
        Verdict::Continue => 200,
        Verdict::Respond(local) => local.status.as_u16(),
    }
}

fn header<'a>(verdict: &'a Verdict, name: &str) -> Option<&'a str> {
    match verdict {
        Verdict::Continue => None,
        Verdict::Respond(local) => local
            .headers
            .iter()
            .find(|(n, _)| n.as_str() == name)
            .and_then(|(_, v)| v.to_str().ok()),
    }
}

fn body(verdict: &Verdict) -> String {
    match verdict {
        Verdict::Continue => String::new(),
        Verdict::Respond(local) => String::from_utf8_lossy(&local.body).into_owned(),
    }
}

const SMALL: &str = "index_per_hour = 2\ndownload_per_hour = 3";

#[tokio::test]
async fn budget_rejects_after_limit() {
    let plugin = build(SMALL);
    let got = statuses(&plugin, INDEX, Sender::User("alice"), 3).await;
    assert_eq!(got, [200, 200, 429]);
}

#[tokio::test]
async fn budget_rejection_names_budget_and_quota() {
    let plugin = build(SMALL);
    statuses(&plugin, INDEX, Sender::User("alice"), 2).await;
    let (verdict, state) = send(&plugin, INDEX, Sender::User("alice"), at(10)).await;
    assert!(body(&verdict).contains("\"budget\":\"index requests per hour\""));
    assert_eq!(state.rejected_by, Some(REJECTED_BY));
    assert_eq!(state.rejected_reason, Some("index:principal"));
}

#[tokio::test]
async fn budget_state_counts_down_remaining() {
    let plugin = build(SMALL);
    let (_, first) = send(&plugin, BUNDLE, Sender::User("alice"), at(0)).await;
    let (_, second) = send(&plugin, BUNDLE, Sender::User("alice"), at(0)).await;
    let remaining: Vec<u64> = [first, second]
        .iter()
        .filter_map(|s| s.rate_limit.map(|b| b.remaining))
        .collect();
    assert_eq!(remaining, [2, 1]);
}

#[tokio::test]
async fn path_outside_classes_is_not_counted() {
    let plugin = build(SMALL);
    let got = statuses(&plugin, "/concelier/other.json", Sender::User("alice"), 5).await;
    assert_eq!(got, [200; 5]);
}

#[tokio::test]
async fn background_refresh_is_not_counted() {
    let plugin = build(SMALL);
    for _ in 0..3 {
        let headers = HeaderMap::new();
        let req = RequestInfo {
            domain: "primary",
            method: &Method::GET,
            path: INDEX,
            query: None,
            headers: &headers,
            client_addr: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            received: std::time::Instant::now(),
        };
        let mut state = RequestState {
            background_refresh: true,
            ..RequestState::default()
        };
        let verdict = plugin.check_at(&req, &mut state, at(10)).await;
        assert_eq!(status(&verdict), 200);
        assert_eq!(state.rate_limit, None);
    }
    let client = Sender::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let got = statuses(&plugin, INDEX, client, 3).await;
    assert_eq!(got, [200, 200, 429]);
}

#[tokio::test]
async fn path_outside_classes_sets_no_budget() {
    let plugin = build(SMALL);
    let (_, state) = send(&plugin, "/robots.txt", Sender::User("alice"), at(0)).await;
    assert_eq!(state.rate_limit, None);
}

#[test]
fn default_paths_classify_stella_surface() {
    let plugin = build(SMALL);
    let classes: Vec<Option<Class>> = [
        "/concelier/exports/index.json",
        "/excititor/mirror/domains.json",
        "/excititor/mirror/primary/index.json",
        "/concelier/exports/mirror/primary/bundle.json.jws",
        "/excititor/mirror/primary/exports/openvex/x.json",
        "/excititor/mirror/primary/other.json",
    ]
    .iter()
    .map(|path| plugin.class_of(path))
    .collect();
    let (i, d) = (Some(Class::Index), Some(Class::Download));
    assert_eq!(classes, [i, i, i, d, d, None]);
}

#[tokio::test]
async fn classes_have_separate_budgets() {
    let plugin = build(SMALL);
    statuses(&plugin, INDEX, Sender::User("alice"), 2).await;
    let got = statuses(&plugin, BUNDLE, Sender::User("alice"), 4).await;
    assert_eq!(got, [200, 200, 200, 429]);
}

#[tokio::test]
async fn window_resets_at_the_hour() {
    let plugin = build(SMALL);
    for _ in 0..2 {
        send(&plugin, INDEX, Sender::User("alice"), at(3598)).await;
    }
    let late = status(
        &send(&plugin, INDEX, Sender::User("alice"), at(3599))
            .await
            .0,
    );
    let next = status(
        &send(&plugin, INDEX, Sender::User("alice"), at(3600))
            .await
            .0,
    );
    assert_eq!((late, next), (429, 200));
}

#[tokio::test]
async fn window_retry_after_is_seconds_to_next_hour() {
    let plugin = build(SMALL);
    statuses(&plugin, INDEX, Sender::User("alice"), 2).await;
    let (verdict, _) = send(&plugin, INDEX, Sender::User("alice"), at(3000)).await;
    assert_eq!(header(&verdict, "retry-after"), Some("600"));
    assert_eq!(header(&verdict, "ratelimit-reset"), Some("600"));
}

#[tokio::test]
async fn window_reset_advances_with_clock() {
    let plugin = build("index_per_hour = 100\ndownload_per_hour = 1");
    let mut resets = Vec::new();
    for offset in [0, 1, 1799, 3599, 3600] {
        let (_, state) = send(&plugin, INDEX, Sender::User("alice"), at(offset)).await;
        resets.extend(state.rate_limit.map(|b| b.reset_secs));
    }
    assert_eq!(resets, [3600, 3599, 1801, 1, 3600]);
}

#[tokio::test]
async fn window_new_hour_restores_full_budget() {
    let plugin = build(SMALL);
    statuses(&plugin, INDEX, Sender::User("alice"), 2).await;
    let (_, state) = send(&plugin, INDEX, Sender::User("alice"), at(3600 + 5)).await;
    assert_eq!(state.rate_limit.map(|b| b.remaining), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn concurrency_lets_exactly_budget_through() {
    let plugin = Arc::new(build("index_per_hour = 600\ndownload_per_hour = 1"));
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let plugin = Arc::clone(&plugin);
            tokio::spawn(async move {
                let (verdict, _) = send(&plugin, INDEX, Sender::User("alice"), at(1)).await;
                matches!(verdict, Verdict::Continue)
            })
        })
        .collect();
    let mut passed = 0;
    for task in tasks {
        passed += usize::from(task.await.expect("task runs"));
    }
    assert_eq!(passed, 600);
}

#[tokio::test]
async fn principals_users_are_separate() {
    let plugin = build(SMALL);
    statuses(&plugin, INDEX, Sender::User("alice"), 3).await;
    let got = statuses(&plugin, INDEX, Sender::User("bob"), 3).await;
    assert_eq!(got, [200, 200, 429]);
}

#[tokio::test]
async fn principals_ips_are_separate() {
    let plugin = build(SMALL);
    let a = Sender::Ip(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)));
    let b = Sender::Ip(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)));
    statuses(&plugin, INDEX, a, 3).await;
    let got = statuses(&plugin, INDEX, b, 3).await;
    assert_eq!(got, [200, 200, 429]);
}

#[tokio::test]
async fn principals_user_and_ip_are_separate() {
    let plugin = build(SMALL);
    statuses(&plugin, INDEX, Sender::User("127.0.0.1"), 2).await;
    let got = statuses(
        &plugin,
        INDEX,
        Sender::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        1,
    )
    .await;
    assert_eq!(got, [200]);
}

#[tokio::test]
async fn principals_share_unknown_without_address() {
    let plugin = build(SMALL);
    let got = statuses(&plugin, INDEX, Sender::Nobody, 3).await;
    assert_eq!(got, [200, 200, 429]);
}

#[test]
fn principal_ipv6_uses_its_64_network() {
    let headers = HeaderMap::new();
    let addr: Ipv6Addr = "2001:db8:1:2:aaaa::1".parse().expect("address");
    let req = RequestInfo {
        domain: "primary",
        method: &Method::GET,
        path: INDEX,
        query: None,
        headers: &headers,
        client_addr: Some(IpAddr::V6(addr)),
        received: std::time::Instant::now(),
    };
    assert_eq!(
        principal_of(&req, &RequestState::default()),
        "ip:2001:db8:1:2::/64"
    );
    let zeros = RequestInfo {
        client_addr: Some(IpAddr::V6("2001:db8:0:0:1::1".parse().expect("address"))),
        ..req
    };
    assert_eq!(
        principal_of(&zeros, &RequestState::default()),
        "ip:2001:db8::/64"
    );
}

#[test]
fn principal_ipv4_mapped_is_ipv4() {
    let headers = HeaderMap::new();
    let addr: Ipv6Addr = "::ffff:192.0.2.7".parse().expect("address");
    let req = RequestInfo {
        domain: "primary",
        method: &Method::GET,
        path: INDEX,
        query: None,
        headers: &headers,
        client_addr: Some(IpAddr::V6(addr)),
        received: std::time::Instant::now(),
    };
    assert_eq!(principal_of(&req, &RequestState::default()), "ip:192.0.2.7");
}

#[test]
fn principal_ipv4_matches_the_standard_formatting() {
    let headers = HeaderMap::new();
    // Every octet value in every position, with neighbours of each length.
    let addresses = (0..=255u8).flat_map(|n| {
        [
            Ipv4Addr::new(n, 7, 200, 42),
            Ipv4Addr::new(255, n, 0, 9),
            Ipv4Addr::new(1, 99, n, 100),
            Ipv4Addr::new(10, 0, 255, n),
        ]
    });
    for addr in addresses {
        let req = RequestInfo {
            domain: "primary",
            method: &Method::GET,
            path: INDEX,
            query: None,
            headers: &headers,
            client_addr: Some(IpAddr::V4(addr)),
            received: std::time::Instant::now(),
        };
        assert_eq!(
            principal_of(&req, &RequestState::default()).to_string(),
            format!("ip:{addr}")
        );
    }
}

const CEILING: &str = "index_per_hour = 3\ndownload_per_hour = 3\ndomain_index_per_hour = 4";

#[tokio::test]
async fn domain_ceiling_caps_all_principals() {
    let plugin = build(CEILING);
    statuses(&plugin, INDEX, Sender::User("alice"), 3).await;
    let got = statuses(&plugin, INDEX, Sender::User("bob"), 2).await;
    assert_eq!(got, [200, 429]);
}

#[tokio::test]
async fn domain_ceiling_rejection_names_domain_budget() {
    let plugin = build(CEILING);
    statuses(&plugin, INDEX, Sender::User("alice"), 3).await;
    statuses(&plugin, INDEX, Sender::User("bob"), 1).await;
    let (verdict, _) = send(&plugin, INDEX, Sender::User("carol"), at(10)).await;
    assert!(body(&verdict).contains("domain-wide index requests per hour"));
    assert_eq!(header(&verdict, "ratelimit-limit"), Some("4"));
}

#[tokio::test]
async fn domain_ceiling_headers_show_smaller_remaining() {
    let plugin = build(CEILING);
    statuses(&plugin, INDEX, Sender::User("alice"), 3).await;
    let (_, state) = send(&plugin, INDEX, Sender::User("bob"), at(10)).await;
    let shown = state.rate_limit.map(|b| (b.limit, b.remaining));
    assert_eq!(shown, Some((4, 0)));
}

#[tokio::test]
async fn domain_ceiling_rejection_counts_nothing() {
    let plugin = build(CEILING);
    statuses(&plugin, INDEX, Sender::User("alice"), 3).await;
    statuses(&plugin, INDEX, Sender::User("bob"), 3).await;
    assert_eq!(plugin.local_count(Class::Index, "user:bob", at(10)), 1);
}

const LATE_COUNT: &str = "index_per_hour = 2\ndownload_per_hour = 2\ncount_cache_hits = false";

#[tokio::test]
async fn cache_hits_uncounted_when_disabled() {
    let plugin = build(LATE_COUNT);
    let got = statuses(&plugin, INDEX, Sender::User("alice"), 5).await;
    assert_eq!(got, [200; 5]);
}

#[tokio::test]
async fn cache_hits_disabled_counts_origin_requests() {
    let plugin = build(LATE_COUNT);
    for _ in 0..2 {
        let (_, mut state) = send(&plugin, INDEX, Sender::User("alice"), at(10)).await;
        plugin.count_upstream_at(&mut state, at(10));
    }
    let got = statuses(&plugin, INDEX, Sender::User("alice"), 1).await;
    assert_eq!(got, [429]);
}

#[tokio::test]
async fn cache_hits_disabled_upstream_updates_remaining() {
    let plugin = build(LATE_COUNT);
    let (_, mut state) = send(&plugin, INDEX, Sender::User("alice"), at(10)).await;
    let before = state.rate_limit.map(|b| b.remaining);
    plugin.count_upstream_at(&mut state, at(10));
    let after = state.rate_limit.map(|b| b.remaining);
    assert_eq!((before, after), (Some(2), Some(1)));
}

#[tokio::test]
async fn cache_hits_disabled_counts_once_per_request() {
    let plugin = build(LATE_COUNT);
    let (_, mut state) = send(&plugin, INDEX, Sender::User("alice"), at(10)).await;
    plugin.count_upstream_at(&mut state, at(10));
    plugin.count_upstream_at(&mut state, at(10));
    assert_eq!(plugin.local_count(Class::Index, "user:alice", at(10)), 1);
}

#[tokio::test]
async fn cache_hits_counted_by_default() {
    let plugin = build(SMALL);
    let (_, mut state) = send(&plugin, INDEX, Sender::User("alice"), at(10)).await;
    plugin.count_upstream_at(&mut state, at(10));
    assert_eq!(plugin.local_count(Class::Index, "user:alice", at(10)), 1);
}

#[tokio::test]
async fn rebuild_keeps_counts() {
    let registry = Registry::new();
    let first = build_in(&registry, "primary", SMALL);
    statuses(&first, INDEX, Sender::User("alice"), 2).await;
    drop(first);
    let second = build_in(&registry, "primary", SMALL);
    let got = statuses(&second, INDEX, Sender::User("alice"), 1).await;
    assert_eq!(got, [429]);
}

#[tokio::test]
async fn rebuild_applies_new_budget_to_count_so_far() {
    let registry = Registry::new();
    let first = build_in(
        &registry,
        "primary",
        "index_per_hour = 5\ndownload_per_hour = 1",
    );
    statuses(&first, INDEX, Sender::User("alice"), 3).await;
    let second = build_in(
        &registry,
        "primary",
        "index_per_hour = 4\ndownload_per_hour = 1",
    );
    let got = statuses(&second, INDEX, Sender::User("alice"), 2).await;
    assert_eq!(got, [200, 429]);
}

#[tokio::test]
async fn rebuild_other_domain_starts_empty() {
    let registry = Registry::new();
    let primary = build_in(&registry, "primary", SMALL);
    statuses(&primary, INDEX, Sender::User("alice"), 2).await;
    let community = build_in(&registry, "community", SMALL);
    assert_eq!(community.local_count(Class::Index, "user:alice", at(10)), 0);
}

#[tokio::test]
async fn rejections_are_counted_per_reason() {
    let registry = Registry::new();
    let plugin = build_in(&registry, "primary", CEILING);
    statuses(&plugin, INDEX, Sender::User("alice"), 4).await;
    statuses(&plugin, INDEX, Sender::User("bob"), 2).await;
    let seen: Vec<(&str, &str, u64)> = registry
        .rejections()
        .into_iter()
        .filter(|r| r.count > 0)
        .map(|r| (r.class, r.reason, r.count))
        .collect();
    assert_eq!(seen, [("index", "domain", 1), ("index", "principal", 1)]);
}

/// Returns the usage of `primary` in the hour of [`at`].
fn usage_of(registry: &Registry) -> Vec<ClassUsage> {
    registry.usage("primary", Window::at(at(10)).hour)
}

#[tokio::test]
async fn usage_sums_all_principals() {
    let registry = Registry::new();
    let plugin = build_in(&registry, "primary", CEILING);
    statuses(&plugin, INDEX, Sender::User("alice"), 2).await;
    statuses(&plugin, INDEX, Sender::User("bob"), 1).await;
    statuses(&plugin, BUNDLE, Sender::User("bob"), 1).await;
    let index = ClassUsage {
        class: "index",
        requests_this_hour: 3,
        principal_limit: 3,
        domain_limit: Some(4),
    };
    let download = ClassUsage {
        class: "download",
        requests_this_hour: 1,
        principal_limit: 3,
        domain_limit: None,
    };
    assert_eq!(usage_of(&registry), [index, download]);
}

#[tokio::test]
async fn usage_starts_at_zero_next_hour() {
    let registry = Registry::new();
    let plugin = build_in(&registry, "primary", SMALL);
    statuses(&plugin, INDEX, Sender::User("alice"), 2).await;
    let next_hour = Window::at(at(3600)).hour;
    let counts: Vec<u64> = registry
        .usage("primary", next_hour)
        .iter()
        .map(|u| u.requests_this_hour)
        .collect();
    assert_eq!(counts, [0, 0]);
}

#[test]
fn usage_empty_without_live_plugin() {
    let registry = Registry::new();
    drop(build_in(&registry, "primary", SMALL));
    assert_eq!(usage_of(&registry), []);
}

#[test]
fn usage_limits_of_newest_live_plugin() {
    let registry = Registry::new();
    let _old = build_in(&registry, "primary", SMALL);
    let new = build_in(&registry, "primary", CEILING);
    let limits = |registry: &Registry| usage_of(registry).first().map(|u| u.principal_limit);
    assert_eq!(limits(&registry), Some(3));
    drop(new);
    assert_eq!(limits(&registry), Some(2));
}

#[test]
fn settings_reject_zero_budget() {
    let errors = build_errors("index_per_hour = 0\ndownload_per_hour = 1");
    assert_eq!(errors[0].key, "index_per_hour");
}

#[test]
fn settings_require_budgets() {
    let errors = build_errors("index_per_hour = 5");
    assert!(errors[0].reason.contains("download_per_hour"), "{errors:?}");
}

#[test]
fn settings_reject_unknown_key() {
    let errors = build_errors("index_per_hour = 1\ndownload_per_hour = 1\nper_day = 3");
    assert_eq!(errors[0].key, "per_day");
}

#[test]
fn settings_report_bad_pattern_by_index() {
    let errors = build_errors(
        "index_per_hour = 1\ndownload_per_hour = 1\nindex_paths = [\"/a\", \"no-slash\"]",
    );
    assert_eq!(errors[0].key, "index_paths[1]");
}

#[test]
fn settings_reject_bad_failure_mode() {
    let errors = build_errors(
        "index_per_hour = 1\ndownload_per_hour = 1\n\
         [redis]\nurl = \"redis://127.0.0.1:1/0\"\nfailure_mode = \"fail_sometimes\"",
    );
    assert_eq!(errors[0].key, "redis.failure_mode");
}

#[test]
fn settings_redis_url_error_hides_password() {
    let errors = build_errors(
        "index_per_hour = 1\ndownload_per_hour = 1\n[redis]\nurl = \"http://u:secret@h:1/0\"",
    );
    let value = errors[0].value.clone().unwrap_or_default();
    assert_eq!(
        (errors[0].key.as_str(), value.contains("secret")),
        ("redis.url", false)
    );
}

#[test]
fn settings_reject_zero_timeout() {
    let errors = build_errors(
        "index_per_hour = 1\ndownload_per_hour = 1\n[redis]\nurl = \"redis://127.0.0.1:1\"\n\
         timeout_ms = 0",
    );
    assert_eq!(errors[0].key, "redis.timeout_ms");
}

#[test]
fn settings_reject_oversized_reserve() {
    let errors = build_errors(
        "index_per_hour = 1\ndownload_per_hour = 1\n[redis]\nurl = \"redis://127.0.0.1:1\"\n\
         reserve = 1025",
    );
    assert_eq!(errors[0].key, "redis.reserve");
    assert_eq!(errors[0].value.as_deref(), Some("1025"));
    assert!(
        errors[0].reason.contains("0 to 1024"),
        "{}",
        errors[0].reason
    );
}

#[test]
fn settings_reject_tls_redis_url() {
    let errors = build_errors(
        "index_per_hour = 1\ndownload_per_hour = 1\n[redis]\nurl = \"rediss://127.0.0.1:6380/0\"",
    );
    assert_eq!(errors[0].key, "redis.url");
    assert!(
        errors[0].reason.contains("not supported"),
        "{}",
        errors[0].reason
    );
}

#[test]
fn settings_reject_unusable_state_paths() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("plain");
    std::fs::write(&file, "").expect("file");
    let cases = [
        (dir.path().to_path_buf(), "is a directory"),
        (dir.path().join("missing/quota.state"), "does not exist"),
        (file.join("quota.state"), "does not exist"),
    ];
    for (path, reason) in cases {
        let text = format!("{SMALL}\nstate_file = {:?}", path.display().to_string());
        let errors = build_errors(&text);
        assert_eq!(errors.len(), 1, "{path:?}: {errors:?}");
        assert_eq!(errors[0].key, "state_file", "{path:?}");
        assert!(
            errors[0].reason.contains(reason),
            "{path:?}: {}",
            errors[0].reason
        );
    }
}

#[test]
fn redact_url_masks_password() {
    assert_eq!(
        config::redact_url("redis://user:pw@host:6379/0"),
        "redis://user:***@host:6379/0"
    );
    assert_eq!(
        config::redact_url("redis://u:pa/ss@127.0.0.1:6379/0"),
        "redis://u:***@127.0.0.1:6379/0"
    );
    assert_eq!(
        config::redact_url("redis+unix:///run/redis.sock?db=1&pass=secret"),
        "redis+unix:///run/redis.sock?db=1&pass=***"
    );
    assert_eq!(
        config::redact_url("redis://127.0.0.1:6379/0"),
        "redis://127.0.0.1:6379/0"
    );
}

/// Returns a loopback port with nothing listening on it.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

fn unreachable_redis(mode: &str) -> String {
    format!(
        "index_per_hour = 2\ndownload_per_hour = 2\n[redis]\nurl = \"redis://127.0.0.1:{}/0\"\n\
         timeout_ms = 200\nfailure_mode = \"{mode}\"",
        closed_port()
    )
}

#[tokio::test]
async fn redis_down_fail_open_counts_locally() {
    let plugin = build(&unreachable_redis("fail_open"));
    let got = statuses(&plugin, INDEX, Sender::User("alice"), 3).await;
    assert_eq!(got, [200, 200, 429]);
}

#[tokio::test]
async fn redis_down_fail_closed_rejects_with_429() {
    let plugin = build(&unreachable_redis("fail_closed"));
    let (verdict, state) = send(&plugin, INDEX, Sender::User("alice"), at(10)).await;
    assert_eq!(status(&verdict), 429);
    assert!(body(&verdict).contains("budget_store_unavailable"));
    assert_eq!(state.rejected_by, Some(REJECTED_BY));
    assert_eq!(state.rejected_reason, Some("index:store_unavailable"));
}

#[tokio::test]
async fn redis_down_fail_closed_has_retry_after() {
    let plugin = build(&unreachable_redis("fail_closed"));
    let (verdict, _) = send(&plugin, INDEX, Sender::User("alice"), at(10)).await;
    assert_eq!(header(&verdict, "retry-after"), Some("1"));
    assert_eq!(header(&verdict, "ratelimit-remaining"), None);
}

#[tokio::test]
async fn redis_down_reports_unavailable() {
    let plugin = build(&unreachable_redis("fail_open"));
    send(&plugin, INDEX, Sender::User("alice"), at(10)).await;
    assert_eq!(plugin.redis_available(), Some(false));
}

#[test]
fn redis_key_hashes_principal() {
    let plugin = build(&unreachable_redis("fail_open"));
    let redis = plugin.redis.as_ref().expect("redis configured");
    let key = redis.key(Class::Download, Some(b"user:alice".as_slice()), 490_907);
    let parts: Vec<&str> = key.split(':').collect();
    assert_eq!(parts.len(), 6, "{key}");
    assert_eq!(
        (parts[0], parts[1], parts[2], parts[3], parts[5]),
        ("mirror-gateway", "quota", "primary", "download", "490907")
    );
    assert_eq!(parts[4].len(), 16, "{key}");
    assert!(!key.contains("alice"), "{key}");
}

// --- state file ---------------------------------------------------------------------------

fn with_state_file(path: &Path) -> String {
    format!("{SMALL}\nstate_file = {:?}", path.display().to_string())
}

fn state_set(registry: &Registry, domain: &str) -> Vec<(Class, Arc<ClassCounts>)> {
    vec![
        (Class::Index, registry.counts(domain, Class::Index)),
        (Class::Download, registry.counts(domain, Class::Download)),
    ]
}

#[test]
fn state_file_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("quota.state");
    let before = Registry::new();
    let hour = Window::at(at(10)).hour;
    before
        .counts("primary", Class::Index)
        .add(b"user:alice", hour);
    before
        .counts("primary", Class::Index)
        .add(b"user:alice", hour);
    before
        .counts("primary", Class::Download)
        .add(b"ip:192.0.2.1", hour);

    let saved = StateFile::new(path.clone(), "primary", state_set(&before, "primary"));
    saved.save(at(20)).expect("save");

    let after = Registry::new();
    let loaded = StateFile::new(path, "primary", state_set(&after, "primary"));
    assert_eq!(loaded.load(at(30)), Ok(4));

    let limits = Limits {
        principal: 10,
        domain: Some(10),
    };
    let index = after
        .counts("primary", Class::Index)
        .peek(b"user:alice", limits, hour);
    assert_eq!(
        index.counts(),
        Counts {
            principal: 2,
            domain: 2
        }
    );
}

#[test]
fn state_file_skips_older_hours() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("quota.state");
    let before = Registry::new();
    before
        .counts("primary", Class::Index)
        .add(b"user:alice", Window::at(at(10)).hour);
    StateFile::new(path.clone(), "primary", state_set(&before, "primary"))
        .save(at(10))
        .expect("save");
    let loaded = StateFile::new(path, "primary", state_set(&Registry::new(), "primary"));
    assert_eq!(loaded.load(at(3600 + 10)), Ok(0));
}

#[test]
fn state_file_write_leaves_no_temp_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("quota.state");
    let registry = Registry::new();
    registry
        .counts("primary", Class::Index)
        .add(b"user:alice", Window::at(at(0)).hour);
    StateFile::new(path, "primary", state_set(&registry, "primary"))
        .save(at(0))
        .expect("save");
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["quota.state"]);
}

#[test]
fn state_file_write_failure_keeps_previous_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("missing-dir").join("quota.state");
    let registry = Registry::new();
    registry
        .counts("primary", Class::Index)
        .add(b"user:alice", Window::at(at(0)).hour);
    let file = StateFile::new(path, "primary", state_set(&registry, "primary"));
    assert!(file.save(at(0)).is_err());
}

#[test]
fn state_file_unchanged_is_not_written_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::new();
    registry
        .counts("primary", Class::Index)
        .add(b"user:alice", Window::at(at(0)).hour);
    let file = StateFile::new(
        dir.path().join("quota.state"),
        "primary",
        state_set(&registry, "primary"),
    );
    let writes = [file.save(at(0)).ok(), file.save(at(1)).ok()];
    assert_eq!(writes, [Some(true), Some(false)]);
}

/// An old process that drains and its replacement share one file: neither write lowers a
/// count, and each process counts on from the higher count.
#[test]
fn state_file_shared_keeps_higher_counts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("quota.state");
    let hour = Window::at(at(0)).hour;
    let limits = Limits {
        principal: 100,
        domain: None,
    };
    let count_of = |registry: &Registry| {
        registry
            .counts("primary", Class::Index)
            .peek(b"user:alice", limits, hour)
            .counts()
            .principal
    };
    let add = |registry: &Registry, times: usize| {
        for _ in 0..times {
            registry
                .counts("primary", Class::Index)
                .add(b"user:alice", hour);
        }
    };

    let old = Registry::new();
    let old_file = StateFile::new(path.clone(), "primary", state_set(&old, "primary"));
    add(&old, 3);
    old_file.save(at(1)).expect("old save");

    let new = Registry::new();
    let new_file = StateFile::new(path.clone(), "primary", state_set(&new, "primary"));
    assert_eq!(
        new_file.load(at(2)),
        Ok(2),
        "the principal's and the domain's count"
    );
    add(&new, 2);
    new_file.save(at(3)).expect("new save");
    assert_eq!(count_of(&new), 5);

    // The old process counts one more while draining, then writes on its way out.
    add(&old, 1);
    assert_eq!(old_file.save(at(4)).ok(), Some(true));
    assert_eq!(
        count_of(&old),
        5,
        "the old process took the file's higher count"
    );
    let reread = Registry::new();
    StateFile::new(path.clone(), "primary", state_set(&reread, "primary"))
        .load(at(5))
        .expect("load");
    assert_eq!(
        count_of(&reread),
        5,
        "the file kept the new process's count"
    );

    add(&new, 1);
    new_file.save(at(6)).expect("new save");
    assert_eq!(count_of(&new), 6);
    assert_eq!(
        new_file.save(at(7)).ok(),
        Some(false),
        "the merge alone is no change to write"
    );
}

fn load_text(text: &str, domain: &str) -> Result<usize, String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("quota.state");
    std::fs::write(&path, text).expect("write");
    StateFile::new(path, domain, state_set(&Registry::new(), domain)).load(at(10))
}

#[test]
fn state_file_corrupt_is_ignored() {
    let err = load_text("version = 1\ncounts = [[[", "primary").expect_err("corrupt");
    assert!(err.contains("not valid TOML"), "{err}");
}

#[test]
fn state_file_binary_is_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("quota.state");
    std::fs::write(&path, [0xff, 0xfe, 0x00, 0x80]).expect("write");
    let file = StateFile::new(path, "primary", state_set(&Registry::new(), "primary"));
    assert!(file.load(at(10)).is_err());
}

#[test]
fn state_file_old_version_is_ignored() {
    let err = load_text("version = 0\ndomain = \"primary\"\nsaved_at = 1", "primary")
        .expect_err("old version");
    assert!(err.contains("format version 0"), "{err}");
}

#[test]
fn state_file_of_other_domain_is_ignored() {
    let text = format!("version = {STATE_FILE_VERSION}\ndomain = \"community\"\nsaved_at = 1");
    let err = load_text(&text, "primary").expect_err("other domain");
    assert!(err.contains("community"), "{err}");
}

#[test]
fn state_file_wrong_shape_is_ignored() {
    let text = format!("version = {STATE_FILE_VERSION}\ndomain = \"primary\"\nsaved_at = \"x\"");
    assert!(load_text(&text, "primary").is_err());
}

#[test]
fn state_file_fifo_is_ignored_without_waiting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("quota.state");
    let made = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .expect("run mkfifo");
    assert!(made.success(), "mkfifo");
    let file = StateFile::new(path, "primary", state_set(&Registry::new(), "primary"));
    let err = file.load(at(10)).expect_err("a FIFO");
    assert!(err.contains("not a regular file"), "{err}");
}

#[test]
fn state_file_device_is_ignored() {
    let file = StateFile::new(
        "/dev/zero".into(),
        "primary",
        state_set(&Registry::new(), "primary"),
    );
    let err = file.load(at(10)).expect_err("a device");
    assert!(err.contains("not a regular file"), "{err}");
}

#[test]
fn state_file_count_at_integer_limit_still_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("quota.state");
    let registry = Registry::new();
    let hour = Window::at(at(0)).hour;
    let counts = registry.counts("primary", Class::Index);
    counts.restore(Some(b"user:alice"), hour, i64::MAX as u64);
    counts.add(b"user:alice", hour);
    let file = StateFile::new(path.clone(), "primary", state_set(&registry, "primary"));
    assert_eq!(file.save(at(1)).ok(), Some(true));
    let reread = Registry::new();
    let loaded = StateFile::new(path, "primary", state_set(&reread, "primary"));
    assert_eq!(loaded.load(at(2)), Ok(2));
    let unlimited = Limits {
        principal: u64::MAX,
        domain: None,
    };
    let principal = reread
        .counts("primary", Class::Index)
        .peek(b"user:alice", unlimited, hour)
        .counts()
        .principal;
    assert_eq!(principal, i64::MAX as u64);
}

#[test]
fn state_file_missing_loads_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = StateFile::new(
        dir.path().join("absent.state"),
        "primary",
        state_set(&Registry::new(), "primary"),
    );
    assert_eq!(file.load(at(10)), Ok(0));
}

/// Building and dropping a plugin, as `mirror-gateway check` does, leaves the file alone: a
/// damaged file stays for inspection, and a missing one is not created.
#[test]
fn plugin_without_counts_writes_no_state_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let damaged = dir.path().join("damaged.state");
    std::fs::write(&damaged, "garbage ][").expect("write");
    drop(build(&with_state_file(&damaged)));
    assert_eq!(
        std::fs::read_to_string(&damaged).expect("read"),
        "garbage ]["
    );

    let missing = dir.path().join("missing.state");
    drop(build(&with_state_file(&missing)));
    assert!(!missing.exists(), "a state file was created");
}

#[tokio::test]
async fn state_file_corrupt_does_not_stop_build() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("quota.state");
    std::fs::write(&path, "garbage ][").expect("write");
    let plugin = build(&with_state_file(&path));
    let got = statuses(&plugin, INDEX, Sender::User("alice"), 1).await;
    assert_eq!(got, [200]);
}

#[tokio::test]
async fn state_file_written_when_plugin_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("quota.state");
    let plugin = build_in(&Registry::new(), "dropped", &with_state_file(&path));
    send(&plugin, INDEX, Sender::User("alice"), SystemTime::now()).await;
    drop(plugin);
    let text = std::fs::read_to_string(&path).expect("state file written");
    assert!(text.contains("user:alice"), "{text}");
}

#[tokio::test]
async fn state_file_restores_counts_in_new_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("quota.state");
    let now = SystemTime::now();
    let first = build_in(&Registry::new(), "restart", &with_state_file(&path));
    statuses_at(&first, Sender::User("alice"), 2, now).await;
    drop(first);
    let second = build_in(&Registry::new(), "restart", &with_state_file(&path));
    // The build reads the file with the real clock; a test run across an hour boundary
    // finds an empty window, which is correct there.
    let expected = if Window::at(SystemTime::now()).hour == Window::at(now).hour {
        2
    } else {
        0
    };
    assert_eq!(
        second.local_count(Class::Index, "user:alice", now),
        expected
    );
}

async fn statuses_at(plugin: &QuotaPlugin, from: Sender<'_>, n: usize, now: SystemTime) {
    for _ in 0..n {
        send(plugin, INDEX, from, now).await;
    }
}

#[test]
fn status_code_of_rejection_is_429() {
    let response = store_unavailable(
        &ClassRule {
            class: Class::Index,
            patterns: Vec::new(),
            limits: Limits {
                principal: 1,
                domain: None,
            },
            counts: Registry::new().counts("x", Class::Index),
        },
        redis_store::Unavailable {
            retry_after_secs: 3,
        },
    );
    assert_eq!(response.status, StatusCode::TOO_MANY_REQUESTS);
}

/// A state file may hold any `u64` count, above the `i64::MAX` that the writer caps counts at.
/// Such a count is cut on restore, and the next requests neither overflow a count nor pass the
/// budget: the principal's is over it, and the domain's count (without a ceiling) saturates.
#[tokio::test]
async fn state_file_count_above_integer_limit_is_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("quota.state");
    let now = SystemTime::now();
    let hour = Window::at(now).hour;
    let huge = u64::MAX;
    for late in ["", "count_cache_hits = false"] {
        std::fs::write(
            &path,
            format!(
                "version = 1\ndomain = \"primary\"\nsaved_at = 0\n\n\
                 [[counts]]\nclass = \"index\"\nhour = {hour}\ncount = {huge}\n\n\
                 [[counts]]\nclass = \"index\"\nprincipal = \"user:alice\"\nhour = {hour}\n\
                 count = {huge}\n"
            ),
        )
        .expect("write");
        let registry = Registry::new();
        let text = format!("{}\n{late}", with_state_file(&path));
        let plugin = build_in(&registry, "primary", &text);
        if Window::at(SystemTime::now()).hour != hour {
            // The build read the file in the next hour, where its counts do not apply.
            return;
        }
        assert_eq!(
            plugin.local_count(Class::Index, "user:alice", now),
            store::MAX_COUNT
        );
        let (verdict, _) = send(&plugin, INDEX, Sender::User("alice"), now).await;
        assert_eq!(status(&verdict), 429, "{late}");
        for _ in 0..2 {
            let (verdict, mut state) = send(&plugin, INDEX, Sender::User("bob"), now).await;
            assert_eq!(status(&verdict), 200, "{late}");
            plugin.count_upstream_at(&mut state, now);
        }
        assert_eq!(plugin.local_count(Class::Index, "user:bob", now), 2);
        assert_eq!(
            registry.counts("primary", Class::Index).domain_count(hour),
            store::MAX_COUNT + 2
        );
        assert_eq!(plugin.save_state(now).ok(), Some(true), "{late}");
    }
}
