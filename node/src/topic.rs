//! Topic names and topic filters: validation against the MQTT rules and our configured limits,
//! shared-subscription parsing (`$share/<group>/<filter>`) and filter matching.
//!
//! mqttbytes' own helpers accept `a+/b`, do not match `$SYS/x` against `$SYS/#` and let NUL
//! through, so every check lives here.

use thiserror::Error;

/// Limits applied to every topic name and filter a client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicLimits {
    /// Longest topic name or filter in bytes.
    pub max_length: usize,
    /// Most `/`-separated levels.
    pub max_levels: usize,
}

impl TopicLimits {
    /// No length or level limit: for filters that were validated when they were stored.
    pub const UNLIMITED: TopicLimits = TopicLimits { max_length: usize::MAX, max_levels: usize::MAX };
}

impl Default for TopicLimits {
    fn default() -> Self {
        TopicLimits { max_length: 65_535, max_levels: 128 }
    }
}

/// Why a topic name or filter was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TopicError {
    #[error("topic is empty")]
    Empty,
    #[error("topic is {0} bytes long, over the limit of {1}")]
    TooLong(usize, usize),
    #[error("topic has {0} levels, over the limit of {1}")]
    TooManyLevels(usize, usize),
    #[error("topic contains the NUL character")]
    Nul,
    #[error("a topic name must not contain the wildcards '+' or '#'")]
    WildcardInName,
    #[error("'+' must occupy a whole topic level")]
    BadSingleWildcard,
    #[error("'#' must be the last topic level and occupy it whole")]
    BadMultiWildcard,
    #[error("shared subscription must be $share/<group>/<filter> with a non-empty group without wildcards")]
    BadShare,
}

fn check_common(topic: &str, limits: TopicLimits) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > limits.max_length {
        return Err(TopicError::TooLong(topic.len(), limits.max_length));
    }
    if topic.contains('\0') {
        return Err(TopicError::Nul);
    }
    let levels = topic.split('/').count();
    if levels > limits.max_levels {
        return Err(TopicError::TooManyLevels(levels, limits.max_levels));
    }
    Ok(())
}

/// Checks a PUBLISH topic name.
pub fn validate_name(topic: &str, limits: TopicLimits) -> Result<(), TopicError> {
    check_common(topic, limits)?;
    if topic.contains(['+', '#']) {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Checks a plain (non-shared) SUBSCRIBE/UNSUBSCRIBE filter.
pub fn validate_filter(filter: &str, limits: TopicLimits) -> Result<(), TopicError> {
    check_common(filter, limits)?;
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('+') && level != "+" {
            return Err(TopicError::BadSingleWildcard);
        }
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(TopicError::BadMultiWildcard);
        }
    }
    Ok(())
}

/// A subscription filter split into its optional share group and the filter proper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedFilter<'a> {
    pub share_group: Option<&'a str>,
    pub filter: &'a str,
}

/// Validates a filter as sent in SUBSCRIBE and splits off `$share/<group>/`.
pub fn parse_filter(raw: &str, limits: TopicLimits) -> Result<ParsedFilter<'_>, TopicError> {
    match raw.strip_prefix("$share/") {
        None if raw == "$share" => Err(TopicError::BadShare),
        None => {
            validate_filter(raw, limits)?;
            Ok(ParsedFilter { share_group: None, filter: raw })
        }
        Some(rest) => {
            let (group, filter) = rest.split_once('/').ok_or(TopicError::BadShare)?;
            if group.is_empty() || group.contains(['+', '#']) {
                return Err(TopicError::BadShare);
            }
            validate_filter(filter, limits)?;
            Ok(ParsedFilter { share_group: Some(group), filter })
        }
    }
}

/// Whether a valid `filter` matches a valid topic `name`. Filters starting with a wildcard do not
/// match names starting with `$` (MQTT 4.7.2); `$SYS/#` does match `$SYS/x`.
pub fn matches(filter: &str, name: &str) -> bool {
    if name.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut names = name.split('/');
    for level in filter.split('/') {
        match level {
            "#" => return true,
            "+" => {
                if names.next().is_none() {
                    return false;
                }
            }
            exact => {
                if names.next() != Some(exact) {
                    return false;
                }
            }
        }
    }
    names.next().is_none()
}

/// Whether every topic matched by `filter` is also matched by `pattern` (both valid filters):
/// the test for a SUBSCRIBE against a permission pattern.
pub fn covers(pattern: &str, filter: &str) -> bool {
    if filter.starts_with('$') && pattern.starts_with(['+', '#']) {
        return false;
    }
    let mut filter_levels = filter.split('/');
    for level in pattern.split('/') {
        match (level, filter_levels.next()) {
            ("#", _) => return true,
            (_, None) | (_, Some("#")) => return false,
            ("+", Some(_)) => {}
            (exact, Some(other)) if exact == other => {}
            _ => return false,
        }
    }
    filter_levels.next().is_none()
}

/// Whether some topic is matched by both filters.
pub fn intersects(a: &str, b: &str) -> bool {
    if (a.starts_with('$') && b.starts_with(['+', '#'])) || (b.starts_with('$') && a.starts_with(['+', '#'])) {
        return false;
    }
    let (mut a_levels, mut b_levels) = (a.split('/'), b.split('/'));
    loop {
        match (a_levels.next(), b_levels.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            (None, _) | (_, None) => return false,
            (Some(x), Some(y)) if x == "+" || y == "+" || x == y => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: TopicLimits = TopicLimits { max_length: 64, max_levels: 4 };

    #[test]
    fn names() {
        assert!(validate_name("a/b/c", L).is_ok());
        assert!(validate_name("/", L).is_ok());
        assert_eq!(validate_name("", L), Err(TopicError::Empty));
        assert_eq!(validate_name("a/+/b", L), Err(TopicError::WildcardInName));
        assert_eq!(validate_name("a/#", L), Err(TopicError::WildcardInName));
        assert_eq!(validate_name("a/+/\0x", L), Err(TopicError::Nul));
        assert_eq!(validate_name("a/\0", L), Err(TopicError::Nul));
        assert_eq!(validate_name("a/b/c/d/e", L), Err(TopicError::TooManyLevels(5, 4)));
        assert_eq!(validate_name(&"x".repeat(65), L), Err(TopicError::TooLong(65, 64)));
    }

    #[test]
    fn filters() {
        for ok in ["a/+/c", "#", "+", "a/#", "+/+", "$SYS/#", "/+"] {
            assert!(validate_filter(ok, L).is_ok(), "{ok}");
        }
        assert_eq!(validate_filter("a+/b", L), Err(TopicError::BadSingleWildcard));
        assert_eq!(validate_filter("a/#/b", L), Err(TopicError::BadMultiWildcard));
        assert_eq!(validate_filter("a/b#", L), Err(TopicError::BadMultiWildcard));
        assert_eq!(validate_filter("a/\0", L), Err(TopicError::Nul));
    }

    #[test]
    fn shared() {
        let p = parse_filter("$share/g1/a/+", L).unwrap();
        assert_eq!(p, ParsedFilter { share_group: Some("g1"), filter: "a/+" });
        assert_eq!(parse_filter("a/b", L).unwrap().share_group, None);
        assert_eq!(parse_filter("$share/g1", L), Err(TopicError::BadShare));
        assert_eq!(parse_filter("$share//a", L), Err(TopicError::BadShare));
        assert_eq!(parse_filter("$share/g+/a", L), Err(TopicError::BadShare));
        assert_eq!(parse_filter("$share", L), Err(TopicError::BadShare));
        assert_eq!(parse_filter("$share/g/a+", L), Err(TopicError::BadSingleWildcard));
    }

    #[test]
    fn covering_and_intersecting() {
        assert!(covers("devices/plc-1/#", "devices/plc-1/temp"));
        assert!(covers("devices/plc-1/#", "devices/plc-1/#"));
        assert!(covers("devices/+/temp", "devices/plc-1/temp"));
        assert!(covers("devices/+/temp", "devices/+/temp"));
        assert!(!covers("devices/plc-1/#", "devices/#"));
        assert!(!covers("devices/plc-1/temp", "devices/+/temp"));
        assert!(!covers("devices/+/temp", "devices/#"));
        assert!(!covers("#", "$SYS/#"));
        assert!(covers("$SYS/#", "$SYS/broker/load"));
        assert!(intersects("devices/#", "devices/secret/x"));
        assert!(intersects("devices/+/x", "devices/a/+"));
        assert!(!intersects("devices/a", "devices/b"));
        assert!(!intersects("a/b", "a/b/c"));
        assert!(!intersects("#", "$SYS/x"));
    }

    #[test]
    fn matching() {
        assert!(matches("a/b", "a/b"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(matches("a/+", "a/b"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(matches("a/+", "a/"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "a/b"));
        assert!(matches("+/+", "/x"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert!(matches("$SYS/+", "$SYS/x"));
    }
}
