//! Routing: from a request's host and normalised path to a domain, route and origin path.

use crate::config::{Domain, Route};
use crate::host::HostMatcher;

/// Finds the domain of a host name and the route of a path.
pub struct Router {
    hosts: HostMatcher,
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMatch {
    /// Index of the route in the domain's routes.
    pub route: usize,
    /// The path to request from the origin: the normalised path with the route's prefix
    /// replaced by its `origin_path`, when it has one.
    pub origin_path: String,
}

impl Router {
    /// Builds the host lookup of `domains`; host patterns were validated with the config.
    pub fn new(domains: &[Domain]) -> Result<Self, crate::host::HostError> {
        let patterns = domains
            .iter()
            .enumerate()
            .flat_map(|(i, d)| d.hosts.iter().map(move |h| (h.clone(), i)));
        Ok(Self {
            hosts: HostMatcher::new(patterns)?,
        })
    }

    /// Returns the index of the domain serving `host` (a `Host` header value, port allowed).
    pub fn domain_for_host(&self, host: &str) -> Option<usize> {
        self.hosts.lookup(host)
    }
}

/// Returns the first route of `domain` whose prefix matches the normalised `path`.
///
/// Routes are sorted longest prefix first, so the most specific route wins.
pub fn match_route(domain: &Domain, path: &str) -> Option<RouteMatch> {
    domain
        .routes
        .iter()
        .enumerate()
        .find(|(_, route)| prefix_matches(&route.prefix, path))
        .map(|(index, route)| RouteMatch {
            route: index,
            origin_path: origin_path(route, path),
        })
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix.ends_with('/') {
        return path.starts_with(prefix);
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

fn origin_path(route: &Route, path: &str) -> String {
    match &route.origin_path {
        Some(replacement) => {
            let rest = &path[route.prefix.len()..];
            let mut out = String::with_capacity(replacement.len() + rest.len());
            out.push_str(replacement);
            out.push_str(rest);
            out
        }
        None => path.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(routes: &[(&str, Option<&str>)]) -> Domain {
        let mut routes: Vec<Route> = routes
            .iter()
            .map(|(prefix, origin_path)| Route {
                prefix: prefix.to_string(),
                origin: 0,
                origin_path: origin_path.map(str::to_owned),
                forward_authorization: false,
            })
            .collect();
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Domain {
            id: "primary".into(),
            hosts: vec!["a.example".into()],
            routes,
            origins: Vec::new(),
            plugins: Vec::new(),
            stale: crate::config::StaleWindows::NONE,
            lock_wait_timeout: None,
            max_origin_requests: 1,
        }
    }

    #[test]
    fn route_longest_prefix_and_rewrite() {
        let d = domain(&[
            ("/concelier/exports/index.json", Some("/mirror/index.json")),
            ("/concelier/exports/mirror/", Some("/mirror/")),
            ("/", None),
        ]);
        let m = match_route(&d, "/concelier/exports/index.json").expect("route");
        assert_eq!(m.origin_path, "/mirror/index.json");
        let m = match_route(&d, "/concelier/exports/mirror/primary/bundle.json").expect("route");
        assert_eq!(m.origin_path, "/mirror/primary/bundle.json");
        let m = match_route(&d, "/other").expect("route");
        assert_eq!(m.origin_path, "/other");
    }

    #[test]
    fn route_prefix_respects_segments() {
        let d = domain(&[("/a", Some("/b"))]);
        assert_eq!(
            match_route(&d, "/a").map(|m| m.origin_path),
            Some("/b".into())
        );
        assert_eq!(
            match_route(&d, "/a/x").map(|m| m.origin_path),
            Some("/b/x".into())
        );
        assert!(match_route(&d, "/ab").is_none());
    }
}
