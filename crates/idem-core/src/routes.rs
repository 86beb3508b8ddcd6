//! Route patterns and the table that maps a request to its route and policy.

use std::sync::Arc;

use http::Method;

use crate::policy::{Policy, PolicyError};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param,
    Rest,
}

impl Segment {
    /// One segment of `pattern`; `last`: whether it ends the pattern (where alone a
    /// `{*name}` may stand).
    fn parse(pattern: &str, part: &str, last: bool) -> Result<Self, PatternError> {
        if let Some(name) = part.strip_prefix("{*").and_then(|p| p.strip_suffix('}')) {
            if !last || name.is_empty() {
                return Err(PatternError::MisplacedRest {
                    pattern: pattern.to_owned(),
                });
            }
            return Ok(Segment::Rest);
        }
        if let Some(name) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
            if name.is_empty() || name.contains(['{', '}', '*']) {
                return Err(PatternError::BadParameter {
                    pattern: pattern.to_owned(),
                    segment: part.to_owned(),
                });
            }
            return Ok(Segment::Param);
        }
        if part.contains(['{', '}']) {
            return Err(PatternError::PartialBraces {
                pattern: pattern.to_owned(),
            });
        }
        Ok(Segment::Literal(part.to_owned()))
    }
}

/// A path pattern such as `/v1/charges/{id}/capture`: `{name}` matches one segment,
/// a final `{*name}` matches the rest of the path (one or more segments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    segments: Vec<Segment>,
}

/// Why a route pattern was refused; the message quotes the pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PatternError {
    /// The pattern is not an absolute path.
    #[error("{pattern:?} must start with '/'")]
    NotAbsolute {
        /// The pattern as written.
        pattern: String,
    },
    /// A `{*name}` segment that has no name or is not the last one.
    #[error("{pattern:?}: a {{*name}} segment must be named and come last")]
    MisplacedRest {
        /// The pattern as written.
        pattern: String,
    },
    /// A `{name}` segment whose name is empty or holds `{`, `}` or `*`.
    #[error("{pattern:?}: bad parameter {segment:?}")]
    BadParameter {
        /// The pattern as written.
        pattern: String,
        /// The refused segment.
        segment: String,
    },
    /// Braces around part of a segment only (`/a/x{id}`).
    #[error("{pattern:?}: braces must enclose a whole segment, as in /charges/{{id}}")]
    PartialBraces {
        /// The pattern as written.
        pattern: String,
    },
}

impl Pattern {
    /// Parses a pattern; the error says what is wrong.
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err(PatternError::NotAbsolute {
                pattern: text.to_owned(),
            });
        };
        let parts: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        let last = parts.len().saturating_sub(1);
        let segments = parts
            .iter()
            .enumerate()
            .map(|(i, part)| Segment::parse(text, part, i == last))
            .collect::<Result<_, _>>()?;
        Ok(Pattern {
            text: text.to_owned(),
            segments,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether a request path matches. Allocates nothing: it runs for every request.
    pub fn matches(&self, path: &str) -> bool {
        let path = path.strip_prefix('/').unwrap_or(path);
        // A trailing slash is the same resource (`/v1/charges/` = `/v1/charges`).
        let trimmed = path.strip_suffix('/').unwrap_or(path);
        let mut parts = (!path.is_empty())
            .then(|| trimmed.split('/'))
            .into_iter()
            .flatten();
        for seg in &self.segments {
            let part = parts.next();
            match (seg, part) {
                (Segment::Rest, part) => return part.is_some(),
                (Segment::Param, Some(p)) if !p.is_empty() => {}
                (Segment::Literal(l), Some(p)) if p == l.as_str() => {}
                _ => return false,
            }
        }
        parts.next().is_none()
    }
}

/// One configured route.
#[derive(Debug, Clone)]
pub struct Route {
    /// The method, or `None` for any method.
    pub method: Option<Method>,
    /// The path pattern.
    pub pattern: Pattern,
    /// The route's policy.
    pub policy: Arc<Policy>,
}

/// Maps requests to (route id, policy). Routes are tried in the order they were
/// added; the first match wins; requests that match none get the default policy and
/// the route id `METHOD /path`.
#[derive(Debug, Clone)]
pub struct Routes {
    default: Arc<Policy>,
    routes: Vec<Route>,
}

impl Default for Routes {
    fn default() -> Self {
        Routes::new(Policy::default())
    }
}

impl Routes {
    /// A table with only a default policy.
    pub fn new(default: Policy) -> Self {
        Routes {
            default: Arc::new(default),
            routes: Vec::new(),
        }
    }

    /// Adds a route (`method` `None` = any method), validating its policy.
    pub fn route(
        mut self,
        method: Option<Method>,
        pattern: &str,
        policy: Policy,
    ) -> Result<Self, PolicyError> {
        let pattern = Pattern::parse(pattern).map_err(|e| PolicyError {
            field: "path".into(),
            message: e.to_string(),
        })?;
        self.routes.push(Route {
            method,
            pattern,
            policy: Arc::new(policy.validate()?),
        });
        Ok(self)
    }

    /// The default policy.
    pub fn default_policy(&self) -> &Arc<Policy> {
        &self.default
    }

    /// The configured routes.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The configured route a request matches, if any (the first, in order).
    pub fn lookup(&self, method: &Method, path: &str) -> Resolved<'_> {
        let route = self
            .routes
            .iter()
            .find(|r| r.method.as_ref().is_none_or(|m| m == method) && r.pattern.matches(path));
        Resolved {
            route,
            default: &self.default,
        }
    }

    /// The route id and policy of a request.
    pub fn resolve(&self, method: &Method, path: &str) -> (String, &Arc<Policy>) {
        let resolved = self.lookup(method, path);
        (resolved.id(method, path), resolved.policy())
    }
}

/// A request's place in a [`Routes`] table: the route it matched, or the default.
#[derive(Debug, Clone, Copy)]
pub struct Resolved<'a> {
    route: Option<&'a Route>,
    default: &'a Arc<Policy>,
}

impl<'a> Resolved<'a> {
    /// The policy that applies.
    pub fn policy(&self) -> &'a Arc<Policy> {
        self.route.map_or(self.default, |r| &r.policy)
    }

    /// The matched route, if any.
    pub fn route(&self) -> Option<&'a Route> {
        self.route
    }

    /// The route id records are scoped to: `METHOD pattern` for a configured route,
    /// `METHOD path` for the default. Built only for requests that carry a key.
    pub fn id(&self, method: &Method, path: &str) -> String {
        let method = method.as_str();
        let rest = self.route.map_or(path, |r| r.pattern.as_str());
        // Written into one buffer of the right size, without the formatting machinery.
        let mut id = String::with_capacity(method.len() + 1 + rest.len());
        id.push_str(method);
        id.push(' ');
        id.push_str(rest);
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn patterns_match_segments() {
        let p = Pattern::parse("/v1/charges/{id}/capture").unwrap();
        assert!(p.matches("/v1/charges/ch_1/capture"));
        assert!(p.matches("/v1/charges/ch_1/capture/"));
        assert!(!p.matches("/v1/charges//capture"));
        assert!(!p.matches("/v1/charges/ch_1"));
        assert!(!p.matches("/v1/charges/ch_1/capture/x"));
        let rest = Pattern::parse("/files/{*path}").unwrap();
        assert!(rest.matches("/files/a/b/c"));
        assert!(!rest.matches("/files"));
        assert!(Pattern::parse("/").unwrap().matches("/"));
        assert!(Pattern::parse("/").unwrap().matches(""));
        assert!(!Pattern::parse("/").unwrap().matches("//"));
        assert!(Pattern::parse("/{id}").unwrap().matches("/x/"));
        assert!(!Pattern::parse("/{id}").unwrap().matches("//"));
        assert!(!rest.matches("/files/"));
        assert!(rest.matches("/files//"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["v1/charges", "/a/{", "/a/x{id}", "/a/{*rest}/b", "/a/{}"] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn first_matching_route_wins_and_default_uses_the_path() {
        let routes = Routes::default()
            .route(
                Some(Method::POST),
                "/v1/charges/{id}/capture",
                Policy::default().with_ttl(Duration::from_secs(3600)),
            )
            .unwrap()
            .route(
                None,
                "/v1/{*rest}",
                Policy::default().with_ttl(Duration::from_secs(7200)),
            )
            .unwrap();
        let (id, p) = routes.resolve(&Method::POST, "/v1/charges/ch_9/capture");
        assert_eq!(id, "POST /v1/charges/{id}/capture");
        assert_eq!(p.ttl, Duration::from_secs(3600));
        let (id, p) = routes.resolve(&Method::PATCH, "/v1/charges/ch_9/capture");
        assert_eq!(id, "PATCH /v1/{*rest}");
        assert_eq!(p.ttl, Duration::from_secs(7200));
        let (id, p) = routes.resolve(&Method::POST, "/other");
        assert_eq!(id, "POST /other");
        assert_eq!(p.ttl, Duration::from_secs(86400));
    }

    #[test]
    fn route_policies_are_validated() {
        let err = Routes::default()
            .route(
                None,
                "/x",
                Policy::default().with_mismatch_status(http::StatusCode::CONTINUE),
            )
            .unwrap_err();
        assert_eq!(err.field, "mismatch_status");
        let err = Routes::default()
            .route(None, "x", Policy::default())
            .unwrap_err();
        assert_eq!(err.field, "path");
    }
}
