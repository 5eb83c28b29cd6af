//! Unit tests of the `rate_limit` plugin, with the clock passed in.

use std::net::IpAddr;
use std::path::Path;

use http::{HeaderMap, Method, StatusCode};

use super::*;
use crate::LocalResponse;

fn settings(text: &str) -> toml::Value {
    toml::Value::Table(text.parse::<toml::Table>().expect("valid TOML"))
}

fn build_for(domain: &str, text: &str) -> Result<Arc<dyn Plugin>, Vec<SettingError>> {
    let ctx = BuildContext {
        domain,
        config_dir: Path::new("."),
    };
    build(settings(text), &ctx)
}

fn plugin(rate: f64, burst: u32, max_concurrent_per_ip: Option<u32>) -> RateLimitPlugin {
    let limits = Limits {
        rate: Rate {
            interval: Duration::from_secs_f64(1.0 / rate),
            burst,
        },
        max_concurrent_per_ip,
    };
    RateLimitPlugin::new(limits, Arc::new(ClientTable::new()))
}

fn addr(text: &str) -> IpAddr {
    text.parse().expect("test IP")
}

/// Runs the request filter for a client at `ip` (if any) and returns the verdict.
fn admit(
    plugin: &RateLimitPlugin,
    ip: Option<&str>,
    state: &mut RequestState,
    now: Instant,
) -> Verdict {
    let headers = HeaderMap::new();
    let info = RequestInfo {
        domain: "test",
        method: &Method::GET,
        path: "/concelier/exports/index.json",
        query: None,
        headers: &headers,
        client_addr: ip.map(addr),
        received: std::time::Instant::now(),
    };
    plugin.admit(&info, state, now)
}

fn passes(plugin: &RateLimitPlugin, ip: &str, now: Instant) -> bool {
    let mut state = RequestState::default();
    matches!(admit(plugin, Some(ip), &mut state, now), Verdict::Continue)
}

fn rejection(verdict: Verdict) -> Option<LocalResponse> {
    match verdict {
        Verdict::Respond(response) => Some(response),
        Verdict::Continue => None,
    }
}

fn header<'a>(response: &'a LocalResponse, name: &str) -> Option<&'a str> {
    response
        .headers
        .iter()
        .find(|(n, _)| n.as_str() == name)
        .and_then(|(_, v)| v.to_str().ok())
}

#[test]
fn build_accepts_integer_rate() {
    let built = build_for("build-int", "requests_per_second = 5\nburst = 10");
    assert!(built.is_ok());
}

#[test]
fn build_reports_each_bad_setting() {
    let errors = build_for(
        "build-bad",
        "requests_per_second = 0.0\nburst = 0\nmax_concurrent_per_ip = 0",
    )
    .err()
    .expect("three bad settings");
    let keys: Vec<_> = errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        ["requests_per_second", "burst", "max_concurrent_per_ip"]
    );
}

#[test]
fn build_rejects_rates_out_of_range() {
    for rate in ["-1.0", "nan", "inf", "1e-9", "2e6"] {
        let text = format!("requests_per_second = {rate}\nburst = 1");
        assert!(build_for("build-range", &text).is_err(), "{rate}");
    }
}

#[test]
fn build_rejects_century_long_refill() {
    let slowest = "requests_per_second = 0.0000116\n";
    assert!(build_for("build-refill-ok", &format!("{slowest}burst = 36000")).is_ok());
    let Err(errors) = build_for("build-refill", &format!("{slowest}burst = 40000")) else {
        panic!("a refill of 109 years accepted");
    };
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].key, "burst");
    assert_eq!(errors[0].value.as_deref(), Some("40000"));
    assert!(
        errors[0].reason.contains("109 years"),
        "{}",
        errors[0].reason
    );
}

#[test]
fn huge_rate_echoed_in_exponent_form() {
    let Err(errors) = build_for("build-huge", "requests_per_second = 1e300\nburst = 1") else {
        panic!("1e300 accepted");
    };
    assert_eq!(errors[0].value.as_deref(), Some("1e300"));
}

#[test]
fn build_rejects_unknown_key() {
    let errors = build_for(
        "build-unknown",
        "requests_per_second = 1\nburst = 1\nburts = 2",
    )
    .err()
    .expect("unknown key");
    assert_eq!(errors[0].key, "burts");
}

#[test]
fn burst_then_429() {
    let plugin = plugin(1.0, 2, None);
    let t0 = Instant::now();
    assert!(passes(&plugin, "192.0.2.1", t0));
    assert!(passes(&plugin, "192.0.2.1", t0));
    let mut state = RequestState::default();
    let response = rejection(admit(&plugin, Some("192.0.2.1"), &mut state, t0));
    let response = response.expect("third request rejected");
    assert_eq!(response.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&response, "retry-after"), Some("1"));
    assert_eq!(header(&response, "ratelimit-limit"), Some("2"));
    assert_eq!(header(&response, "ratelimit-remaining"), Some("0"));
    assert_eq!(state.rejected_by, Some("rate_limit"));
    assert_eq!(state.rejected_reason, Some("rate"));
    let body = String::from_utf8_lossy(&response.body);
    assert!(
        body.contains("\"budget\":\"request rate of 1 per second, bursts of 2\""),
        "{body}"
    );
}

#[test]
fn rate_budget_names_fractions() {
    let cases = [
        (2.5, 4, "2.5 per second"),
        (100.0, 200, "100 per second"),
        (0.25, 1, "15 per minute"),
        (0.001, 1, "3.6 per hour"),
        (1.0 / 86_400.0, 1, "1 per day"),
    ];
    for (rate, burst, shown) in cases {
        let name = rate_budget(Rate {
            interval: Duration::from_secs_f64(1.0 / rate),
            burst,
        });
        assert_eq!(name, format!("request rate of {shown}, bursts of {burst}"));
    }
}

#[test]
fn retry_after_rounds_up() {
    let plugin = plugin(0.25, 1, None);
    let t0 = Instant::now();
    assert!(passes(&plugin, "192.0.2.1", t0));
    let mut state = RequestState::default();
    let later = t0 + Duration::from_millis(1_500);
    let response = rejection(admit(&plugin, Some("192.0.2.1"), &mut state, later));
    let retry = response.as_ref().and_then(|r| header(r, "retry-after"));
    assert_eq!(retry, Some("3"));
    assert!(passes(&plugin, "192.0.2.1", t0 + Duration::from_secs(4)));
}

#[test]
fn allowed_request_records_budget() {
    let plugin = plugin(1.0, 5, None);
    let mut state = RequestState::default();
    admit(&plugin, Some("192.0.2.1"), &mut state, Instant::now());
    let expected = BudgetState {
        limit: 5,
        remaining: 4,
        reset_secs: 1,
    };
    assert_eq!(state.rate_limit, Some(expected));
}

#[test]
fn quota_budget_wins_on_allowed_request() {
    let plugin = plugin(1.0, 5, None);
    let quota = BudgetState {
        limit: 600,
        remaining: 599,
        reset_secs: 3600,
    };
    let mut state = RequestState {
        rate_limit: Some(quota),
        ..RequestState::default()
    };
    admit(&plugin, Some("192.0.2.1"), &mut state, Instant::now());
    assert_eq!(state.rate_limit, Some(quota));
}

#[test]
fn admitted_request_carries_its_budget_fields() {
    let plugin = plugin(1.0, 5, None);
    let mut state = RequestState::default();
    admit(&plugin, Some("192.0.2.1"), &mut state, Instant::now());
    let mut resp = pingora::http::ResponseHeader::build(StatusCode::OK, None).expect("header");
    crate::fields::insert(&mut resp, state.budget_fields().into_iter().flatten());
    let remaining = resp.headers.get("ratelimit-remaining");
    assert_eq!(remaining.and_then(|v| v.to_str().ok()), Some("4"));
}

#[test]
fn principals_are_separate() {
    let plugin = plugin(1.0, 1, None);
    let t0 = Instant::now();
    assert!(passes(&plugin, "192.0.2.1", t0));
    assert!(passes(&plugin, "192.0.2.2", t0));
    assert!(!passes(&plugin, "192.0.2.1", t0));
}

#[test]
fn ipv6_clients_share_their_64() {
    let plugin = plugin(1.0, 2, Some(3));
    let t0 = Instant::now();
    assert!(passes(&plugin, "2001:db8:1:2::3", t0));
    assert!(passes(&plugin, "2001:db8:1:2::4", t0));
    assert!(!passes(&plugin, "2001:db8:1:2:ffff::5", t0));
    assert!(passes(&plugin, "2001:db8:1:3::3", t0));

    let mut running = RequestState::default();
    admit(&plugin, Some("2001:db8:9:9::1"), &mut running, t0);
    assert_eq!(plugin.table().in_flight(addr("2001:db8:9:9::")), 1);
    // A mapped IPv4 address is the IPv4 client.
    assert!(passes(&plugin, "192.0.2.9", t0));
    assert!(passes(&plugin, "::ffff:192.0.2.9", t0));
    assert!(!passes(&plugin, "192.0.2.9", t0));
}

#[test]
fn user_is_the_principal() {
    let plugin = plugin(1.0, 1, None);
    let t0 = Instant::now();
    let as_user = |user: &str, ip: &str| {
        let mut state = RequestState {
            user: Some(user.into()),
            ..RequestState::default()
        };
        matches!(admit(&plugin, Some(ip), &mut state, t0), Verdict::Continue)
    };
    assert!(as_user("alice", "192.0.2.1"));
    assert!(as_user("bob", "192.0.2.1"));
    assert!(!as_user("alice", "192.0.2.2"));
    assert!(passes(&plugin, "192.0.2.1", t0));
}

#[test]
fn no_principal_is_not_counted() {
    let plugin = plugin(1.0, 1, Some(1));
    let t0 = Instant::now();
    for _ in 0..3 {
        let mut state = RequestState::default();
        assert!(matches!(
            admit(&plugin, None, &mut state, t0),
            Verdict::Continue
        ));
    }
}

#[test]
fn concurrency_cap_and_release() {
    let plugin = plugin(1000.0, 100, Some(2));
    let t0 = Instant::now();
    let ip = addr("192.0.2.1");
    let mut first = RequestState::default();
    let mut second = RequestState::default();
    admit(&plugin, Some("192.0.2.1"), &mut first, t0);
    admit(&plugin, Some("192.0.2.1"), &mut second, t0);
    assert_eq!(plugin.table().in_flight(ip), 2);
    let mut third = RequestState::default();
    let response = rejection(admit(&plugin, Some("192.0.2.1"), &mut third, t0));
    let body = response.map(|r| String::from_utf8_lossy(&r.body).into_owned());
    assert!(body.is_some_and(|b| b.contains("concurrent requests")));
    assert_eq!(third.rejected_by, Some("rate_limit"));
    assert_eq!(third.rejected_reason, Some("concurrency"));
    drop(first);
    assert_eq!(plugin.table().in_flight(ip), 1);
    assert!(passes(&plugin, "192.0.2.1", t0));
    assert!(passes(&plugin, "192.0.2.2", t0));
}

#[test]
fn concurrency_released_on_rate_rejection() {
    let plugin = plugin(1.0, 1, Some(5));
    let t0 = Instant::now();
    let mut running = RequestState::default();
    admit(&plugin, Some("192.0.2.1"), &mut running, t0);
    let mut rejected = RequestState::default();
    let verdict = admit(&plugin, Some("192.0.2.1"), &mut rejected, t0);
    assert!(matches!(verdict, Verdict::Respond(_)));
    assert!(rejected.concurrency_slot.is_none());
    assert_eq!(plugin.table().in_flight(addr("192.0.2.1")), 1);
}

#[test]
fn concurrency_counts_ip_not_user() {
    let plugin = plugin(1000.0, 100, Some(1));
    let t0 = Instant::now();
    let mut alice = RequestState {
        user: Some("alice".into()),
        ..RequestState::default()
    };
    admit(&plugin, Some("192.0.2.1"), &mut alice, t0);
    let mut bob = RequestState {
        user: Some("bob".into()),
        ..RequestState::default()
    };
    let verdict = admit(&plugin, Some("192.0.2.1"), &mut bob, t0);
    assert!(matches!(verdict, Verdict::Respond(_)));
}

#[test]
fn rebuild_keeps_counts() {
    let text = "requests_per_second = 0.001\nburst = 1\nmax_concurrent_per_ip = 1";
    let first = build_for("rebuild-keeps", text).expect("first build");
    let mut running = RequestState::default();
    let headers = HeaderMap::new();
    let info = RequestInfo {
        domain: "rebuild-keeps",
        method: &Method::GET,
        path: "/",
        query: None,
        headers: &headers,
        client_addr: Some(addr("192.0.2.1")),
        received: std::time::Instant::now(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(first.request_filter(&info, &mut running));
    drop(first);
    let second = build_for("rebuild-keeps", text).expect("second build");
    let table = shared_table("rebuild-keeps");
    assert_eq!(table.in_flight(addr("192.0.2.1")), 1);
    drop(running);
    let mut state = RequestState::default();
    let verdict = rt.block_on(second.request_filter(&info, &mut state));
    assert!(
        matches!(verdict, Verdict::Respond(_)),
        "bucket kept across rebuild"
    );
    let other = shared_table("rebuild-other-domain");
    assert!(!Arc::ptr_eq(&table, &other));
}
