//! The `ttl` plugin: per-path cache lifetimes and the `Cache-Control` sent downstream.
//!
//! A domain lists rules in order; the first rule whose pattern matches the normalised request
//! path decides. Patterns are absolute paths in which a `*` matches any characters inside one
//! segment and a `**` segment matches any number of segments, none included. A request that no
//! rule matches gets no policy: the cache then follows the origin's own `Cache-Control`.
//!
//! The policy's TTL replaces the origin's freshness lifetime when the response is stored,
//! unless the origin forbids storing it (`no-store`, `private`, `Set-Cookie`) or the status is
//! an error; see the gateway's cache documentation for the full list.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use serde::Deserialize;

use crate::settings::{self, SettingError};
use crate::{BuildContext, CachePolicy, Plugin, RequestInfo, RequestState, Verdict};

/// Settings of the `ttl` plugin as written in the config file.
#[derive(Debug, Deserialize)]
struct TtlSettings {
    rules: Vec<RuleSettings>,
}

#[derive(Debug, Deserialize)]
struct RuleSettings {
    pattern: String,
    ttl_secs: u64,
    cache_control: Option<String>,
    #[serde(default)]
    cache_not_found: bool,
    stale_while_revalidate_secs: Option<u64>,
    stale_if_error_secs: Option<u64>,
}

/// A compiled path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    segments: Vec<Segment>,
    /// The whole pattern when it has no `*`: then a path matches only when equal to it.
    literal: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// `**`: any number of segments.
    AnyDepth,
    /// A segment in which `*` matches any characters; stored split at the `*`s.
    Glob(Vec<String>),
}

/// Segments of a path that [`PathPattern::matches`] splits without allocating.
const INLINE_SEGMENTS: usize = 32;

impl PathPattern {
    /// Compiles a pattern such as `/excititor/mirror/**/index.json`.
    pub fn parse(pattern: &str) -> Result<Self, String> {
        let rest = pattern
            .strip_prefix('/')
            .ok_or("a pattern must start with `/`")?;
        if pattern
            .chars()
            .any(|c| c.is_control() || c == '\\' || c == '?')
        {
            return Err("a pattern cannot contain control characters, `\\` or `?`".into());
        }
        let mut segments = Vec::new();
        for part in rest.split('/') {
            if part == "**" {
                segments.push(Segment::AnyDepth);
            } else if part.contains("**") {
                return Err("`**` must be a whole segment".into());
            } else if part == "." || part == ".." {
                return Err("a pattern cannot contain `.` or `..` segments".into());
            } else {
                segments.push(Segment::Glob(part.split('*').map(str::to_owned).collect()));
            }
        }
        let literal = (!pattern.contains('*')).then(|| pattern.to_owned());
        Ok(Self { segments, literal })
    }

    /// Returns whether the normalised `path` matches this pattern.
    pub fn matches(&self, path: &str) -> bool {
        if let Some(literal) = &self.literal {
            return path == literal;
        }
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        // Paths of a mirror have a handful of segments; they are split on the stack.
        let mut inline = [""; INLINE_SEGMENTS];
        let mut count = 0;
        for part in rest.split('/') {
            let Some(slot) = inline.get_mut(count) else {
                let parts: Vec<&str> = rest.split('/').collect();
                return match_segments(&self.segments, &parts);
            };
            *slot = part;
            count += 1;
        }
        match_segments(&self.segments, &inline[..count])
    }
}

fn match_segments(pattern: &[Segment], parts: &[&str]) -> bool {
    match pattern.split_first() {
        None => parts.is_empty(),
        Some((Segment::AnyDepth, tail)) => {
            (0..=parts.len()).any(|skip| match_segments(tail, &parts[skip..]))
        }
        Some((Segment::Glob(pieces), tail)) => match parts.split_first() {
            Some((part, rest)) => match_glob(pieces, part) && match_segments(tail, rest),
            None => false,
        },
    }
}

/// Matches one segment against the pieces of a glob split at its `*`s.
fn match_glob(pieces: &[String], text: &str) -> bool {
    let (first, others) = match pieces.split_first() {
        Some(split) => split,
        None => return text.is_empty(),
    };
    if others.is_empty() {
        return text == first;
    }
    let Some(mut rest) = text.strip_prefix(first.as_str()) else {
        return false;
    };
    let (last, middle) = others.split_last().unwrap_or((first, &[]));
    for piece in middle {
        match rest.find(piece.as_str()) {
            Some(at) => rest = &rest[at + piece.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last.as_str())
}

/// The `ttl` plugin: the first matching rule's policy applies to the request.
#[derive(Debug)]
pub struct TtlPlugin {
    rules: Vec<(PathPattern, Arc<CachePolicy>)>,
}

impl TtlPlugin {
    /// Returns the policy of the first rule that matches `path`.
    pub fn policy_for(&self, path: &str) -> Option<&Arc<CachePolicy>> {
        self.rules
            .iter()
            .find(|(pattern, _)| pattern.matches(path))
            .map(|(_, policy)| policy)
    }
}

/// Builds the plugin from its settings table.
pub fn build(
    settings: toml::Value,
    _ctx: &BuildContext<'_>,
) -> Result<Arc<dyn Plugin>, Vec<SettingError>> {
    let parsed: TtlSettings = settings::parse(settings)?;
    let mut errors = Vec::new();
    let mut rules = Vec::new();
    for (index, rule) in parsed.rules.into_iter().enumerate() {
        match compile_rule(rule) {
            Ok((pattern, policy)) => rules.push((pattern, Arc::new(policy))),
            Err(e) => errors.push(e.within(&format!("rules[{index}]"))),
        }
    }
    if rules.is_empty() && errors.is_empty() {
        errors.push(SettingError::new(
            "rules",
            Some("[]".into()),
            "list at least one rule",
        ));
    }
    if errors.is_empty() {
        Ok(Arc::new(TtlPlugin { rules }))
    } else {
        Err(errors)
    }
}

fn compile_rule(rule: RuleSettings) -> Result<(PathPattern, CachePolicy), SettingError> {
    let pattern = PathPattern::parse(&rule.pattern).map_err(|reason| {
        SettingError::new("pattern", Some(format!("{:?}", rule.pattern)), reason)
    })?;
    if rule.ttl_secs == 0 {
        return Err(SettingError::new(
            "ttl_secs",
            Some("0".into()),
            "a TTL must be at least 1 second; leave the path out of the rules to not cache it",
        ));
    }
    let cache_control = match rule.cache_control {
        Some(value) => Some(HeaderValue::from_str(&value).map_err(|_| {
            SettingError::new(
                "cache_control",
                Some(format!("{value:?}")),
                "not a valid header value (control characters or non-ASCII text)",
            )
        })?),
        None => None,
    };
    let policy = CachePolicy {
        pattern: rule.pattern,
        ttl: Duration::from_secs(rule.ttl_secs),
        cache_control,
        cache_not_found: rule.cache_not_found,
        stale_while_revalidate: rule.stale_while_revalidate_secs.map(Duration::from_secs),
        stale_if_error: rule.stale_if_error_secs.map(Duration::from_secs),
    };
    Ok((pattern, policy))
}

impl Plugin for TtlPlugin {
    fn name(&self) -> &'static str {
        "ttl"
    }

    fn request_filter_now(
        &self,
        req: &RequestInfo<'_>,
        state: &mut RequestState,
    ) -> Option<Verdict> {
        state.cache_policy = self.policy_for(req.path).cloned();
        Some(Verdict::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> PathPattern {
        PathPattern::parse(text).expect("valid pattern")
    }

    #[test]
    fn pattern_matches_table() {
        let cases = [
            (
                "/concelier/exports/index.json",
                "/concelier/exports/index.json",
                true,
            ),
            (
                "/concelier/exports/index.json",
                "/concelier/exports/index.jsonx",
                false,
            ),
            (
                "/concelier/exports/mirror/*/*",
                "/concelier/exports/mirror/primary/bundle.json",
                true,
            ),
            (
                "/concelier/exports/mirror/*/*",
                "/concelier/exports/mirror/primary",
                false,
            ),
            (
                "/concelier/exports/mirror/*/*",
                "/concelier/exports/mirror/a/b/c",
                false,
            ),
            (
                "/excititor/mirror/**/index.json",
                "/excititor/mirror/index.json",
                true,
            ),
            (
                "/excititor/mirror/**/index.json",
                "/excititor/mirror/a/b/index.json",
                true,
            ),
            ("/excititor/mirror/**", "/excititor/mirror/", true),
            ("/excititor/mirror/**", "/excititor/other", false),
            ("/a/*.jws", "/a/bundle.json.jws", true),
            ("/a/*.jws", "/a/bundle.json", false),
            ("/a/b*d*f", "/a/bcdef", true),
            ("/a/b*d*f", "/a/bf", false),
            ("/a/*", "/a/", true),
        ];
        for (pat, path, expected) in cases {
            assert_eq!(pattern(pat).matches(path), expected, "{pat} vs {path}");
        }
    }

    #[test]
    fn pattern_rejects_bad_input() {
        for bad in ["relative", "/a/**b", "/a/../b", "/a\\b", "/a?b"] {
            assert!(PathPattern::parse(bad).is_err(), "{bad}");
        }
    }

    fn build_from(text: &str) -> Result<Arc<dyn Plugin>, Vec<SettingError>> {
        let value = toml::Value::Table(text.parse::<toml::Table>().expect("valid TOML"));
        let ctx = BuildContext {
            domain: "primary",
            config_dir: std::path::Path::new("."),
        };
        build(value, &ctx)
    }

    #[test]
    fn build_reports_each_bad_rule() {
        let errors = build_from(
            r#"
            [[rules]]
            pattern = "nope"
            ttl_secs = 5
            [[rules]]
            pattern = "/ok"
            ttl_secs = 0
            "#,
        )
        .err()
        .expect("two bad rules");
        let keys: Vec<_> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["rules[0].pattern", "rules[1].ttl_secs"]);
    }

    #[test]
    fn first_matching_rule_wins() {
        let plugin = TtlPlugin {
            rules: vec![
                (pattern("/a/index.json"), policy("/a/index.json", 60)),
                (pattern("/a/*"), policy("/a/*", 300)),
            ],
        };
        assert_eq!(
            plugin.policy_for("/a/index.json").map(|p| p.ttl.as_secs()),
            Some(60)
        );
        assert_eq!(
            plugin.policy_for("/a/bundle.json").map(|p| p.ttl.as_secs()),
            Some(300)
        );
        assert!(plugin.policy_for("/b").is_none());
    }

    #[test]
    fn cache_control_only_on_success_and_304() {
        let mut with_value = (*policy("/a/*", 60)).clone();
        with_value.cache_control = Some(HeaderValue::from_static("public, max-age=60"));
        let state = RequestState {
            cache_policy: Some(Arc::new(with_value)),
            ..RequestState::default()
        };
        let value = |status: u16| {
            let status = http::StatusCode::from_u16(status).expect("status");
            state.cache_control(status)
        };
        let expected = Some((
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=60"),
        ));
        assert_eq!(value(200), expected);
        assert_eq!(value(206), expected);
        assert_eq!(value(304), expected);
        assert_eq!(value(404), None);
        assert_eq!(value(502), None);
        assert_eq!(
            RequestState::default().cache_control(http::StatusCode::OK),
            None
        );
    }

    fn policy(pattern: &str, secs: u64) -> Arc<CachePolicy> {
        Arc::new(CachePolicy {
            pattern: pattern.into(),
            ttl: Duration::from_secs(secs),
            cache_control: None,
            cache_not_found: false,
            stale_while_revalidate: None,
            stale_if_error: None,
        })
    }
}
