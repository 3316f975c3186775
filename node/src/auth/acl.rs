//! A session's compiled permissions: the rules of its credential and roles with `%u` and `%c`
//! already substituted, compiled once at CONNECT into regex sets and topic filters, so a check
//! allocates nothing. Deny rules win over allow rules; no matching allow rule means deny.

use regex::RegexSet;

use super::state::{Access, Rule};
use crate::broker::topic;

#[derive(Debug, Clone)]
struct Matchers {
    allow_regex: RegexSet,
    deny_regex: RegexSet,
    allow_patterns: Vec<String>,
    deny_patterns: Vec<String>,
}

impl Matchers {
    fn compile(rules: &[&Rule], wants: fn(Access) -> bool, subst: &dyn Fn(&str, bool) -> String) -> Result<Matchers, String> {
        let pick = |deny: bool, regex: bool| -> Vec<String> {
            rules
                .iter()
                .filter(|r| r.deny == deny && wants(r.access))
                .filter_map(|r| if regex { r.topic_regex.as_deref() } else { r.pattern.as_deref() })
                .map(|text| subst(text, regex))
                .collect()
        };
        let set = |patterns: Vec<String>| RegexSet::new(patterns.iter().map(|p| format!("^(?:{p})$"))).map_err(|e| e.to_string());
        Ok(Matchers {
            allow_regex: set(pick(false, true))?,
            deny_regex: set(pick(true, true))?,
            allow_patterns: pick(false, false),
            deny_patterns: pick(true, false),
        })
    }

    fn allows_topic(&self, name: &str) -> bool {
        let denied = self.deny_regex.is_match(name) || self.deny_patterns.iter().any(|p| topic::matches(p, name));
        !denied && (self.allow_regex.is_match(name) || self.allow_patterns.iter().any(|p| topic::matches(p, name)))
    }

    fn allows_filter(&self, filter: &str) -> bool {
        let denied = self.deny_regex.is_match(filter) || self.deny_patterns.iter().any(|p| topic::intersects(p, filter));
        !denied && (self.allow_regex.is_match(filter) || self.allow_patterns.iter().any(|p| topic::covers(p, filter)))
    }
}

/// What one session may publish and subscribe to.
#[derive(Debug, Clone)]
pub struct Acl {
    /// `None`: no authorization configured, everything is allowed.
    rules: Option<Box<Directions>>,
}

#[derive(Debug, Clone)]
struct Directions {
    read: Matchers,
    write: Matchers,
}

impl Acl {
    /// Everything allowed (no authorization configured).
    pub fn allow_all() -> Acl {
        Acl { rules: None }
    }

    /// Compiles `rules` for a client: `%u` becomes `username`, `%c` the client id. In regex
    /// rules the substituted values are escaped, so they match literally.
    pub fn compile<'a>(rules: impl IntoIterator<Item = &'a Rule>, username: &str, client_id: &str) -> Result<Acl, String> {
        let rules: Vec<&Rule> = rules.into_iter().collect();
        let subst = |text: &str, regex: bool| {
            let (u, c) =
                if regex { (regex::escape(username), regex::escape(client_id)) } else { (username.to_string(), client_id.to_string()) };
            text.replace("%u", &u).replace("%c", &c)
        };
        let read = Matchers::compile(&rules, Access::allows_read, &subst)?;
        let write = Matchers::compile(&rules, Access::allows_write, &subst)?;
        Ok(Acl { rules: Some(Box::new(Directions { read, write })) })
    }

    pub fn may_publish(&self, name: &str) -> bool {
        self.rules.as_ref().is_none_or(|r| r.write.allows_topic(name))
    }

    /// A subscription is allowed when an allow rule covers every topic of the filter and no
    /// deny rule could match one of them.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        self.rules.as_ref().is_none_or(|r| r.read.allows_filter(filter))
    }
}

/// Checks a rule as written in the state (one of `topic_regex` / `pattern`, which must compile
/// or be a valid filter once `%u`/`%c` are substituted).
pub fn validate_rule(rule: &Rule) -> Result<(), String> {
    match (&rule.topic_regex, &rule.pattern) {
        (Some(regex), None) => {
            regex::Regex::new(&regex.replace("%u", "u").replace("%c", "c")).map(|_| ()).map_err(|e| format!("topic_regex {regex:?}: {e}"))
        }
        (None, Some(pattern)) => topic::validate_filter(&pattern.replace("%u", "u").replace("%c", "c"), topic::TopicLimits::UNLIMITED)
            .map_err(|e| format!("pattern {pattern:?}: {e}")),
        _ => Err("a rule needs exactly one of topic_regex and pattern".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(access: Access, pattern: Option<&str>, regex: Option<&str>, deny: bool) -> Rule {
        Rule { access, topic_regex: regex.map(str::to_string), pattern: pattern.map(str::to_string), deny }
    }

    #[test]
    fn pattern_rules_with_substitution() {
        let rules = [
            rule(Access::Write, Some("cpi/%u/telemetry"), None, false),
            rule(Access::Read, Some("cpi/%u/commands"), None, false),
            rule(Access::ReadWrite, Some("devices/%u/#"), None, false),
        ];
        let acl = Acl::compile(&rules, "plc-1", "plc-1-a").unwrap();
        assert!(acl.may_publish("cpi/plc-1/telemetry"));
        assert!(!acl.may_publish("cpi/plc-2/telemetry"));
        assert!(!acl.may_publish("cpi/plc-1/commands"));
        assert!(acl.may_subscribe("cpi/plc-1/commands"));
        assert!(!acl.may_subscribe("cpi/+/commands"), "a wildcard wider than the permission");
        assert!(acl.may_subscribe("devices/plc-1/#"));
        assert!(!acl.may_subscribe("devices/#"));
        assert!(!acl.may_subscribe("#"));
        assert!(!acl.may_subscribe("$SYS/#"), "$SYS needs an explicit rule");
    }

    #[test]
    fn regex_rules_escape_the_identity() {
        let rules = [rule(Access::ReadWrite, None, Some("sensors/%u/.*"), false)];
        let acl = Acl::compile(&rules, "dev.1", "c").unwrap();
        assert!(acl.may_publish("sensors/dev.1/temp"));
        assert!(!acl.may_publish("sensors/devX1/temp"), "'.' in the identity must match literally");
        let tbmq = [rule(Access::Write, None, Some("sensors/device-001/.*"), false)];
        let acl = Acl::compile(&tbmq, "device-001", "c").unwrap();
        assert!(acl.may_publish("sensors/device-001/x/y"));
        assert!(!acl.may_publish("sensors/device-002/x"));
    }

    #[test]
    fn deny_wins_and_default_is_deny() {
        let rules = [rule(Access::ReadWrite, Some("plant/#"), None, false), rule(Access::ReadWrite, Some("plant/secret/#"), None, true)];
        let acl = Acl::compile(&rules, "u", "c").unwrap();
        assert!(acl.may_publish("plant/line-1"));
        assert!(!acl.may_publish("plant/secret/key"));
        assert!(!acl.may_subscribe("plant/#"), "the filter could deliver denied topics");
        assert!(acl.may_subscribe("plant/line-1/#"));
        assert!(!Acl::compile(&[], "u", "c").unwrap().may_publish("anything"));
        assert!(Acl::allow_all().may_subscribe("#"));
    }

    #[test]
    fn rule_validation() {
        assert!(validate_rule(&rule(Access::Read, Some("a/%u/#"), None, false)).is_ok());
        assert!(validate_rule(&rule(Access::Read, Some("a/#/b"), None, false)).is_err());
        assert!(validate_rule(&rule(Access::Read, None, Some("a/("), false)).is_err());
        assert!(validate_rule(&rule(Access::Read, Some("a"), Some("a"), false)).is_err());
        assert!(validate_rule(&rule(Access::Read, None, None, false)).is_err());
    }
}
