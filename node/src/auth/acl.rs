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

    /// The first rule that decides for a topic name (`filter = false`) or a subscription
    /// filter: deny rules first, then allow rules. A pattern allows a filter only when it covers
    /// it, and denies it when they intersect.
    fn decide<'a>(&'a self, name: &str, filter: bool) -> Verdict<'a> {
        let hits = |p: &String, deny: bool| match (filter, deny) {
            (false, _) => topic::matches(p, name),
            (true, true) => topic::intersects(p, name),
            (true, false) => topic::covers(p, name),
        };
        if self.deny_regex.is_match(name) {
            return Verdict::Regex { allow: false, set: &self.deny_regex };
        }
        if let Some(p) = self.deny_patterns.iter().find(|p| hits(p, true)) {
            return Verdict::Pattern { allow: false, pattern: p };
        }
        if self.allow_regex.is_match(name) {
            return Verdict::Regex { allow: true, set: &self.allow_regex };
        }
        match self.allow_patterns.iter().find(|p| hits(p, false)) {
            Some(p) => Verdict::Pattern { allow: true, pattern: p },
            None => Verdict::NoRule,
        }
    }
}

/// Which kind of rule decided.
enum Verdict<'a> {
    Regex { allow: bool, set: &'a RegexSet },
    Pattern { allow: bool, pattern: &'a str },
    NoRule,
}

impl Verdict<'_> {
    fn allows(&self) -> bool {
        matches!(self, Verdict::Regex { allow: true, .. } | Verdict::Pattern { allow: true, .. })
    }

    /// The rule in words (for the admin API's dry run).
    fn describe(&self, name: &str) -> String {
        let kind = |allow: bool| if allow { "allow" } else { "deny" };
        match self {
            Verdict::Regex { allow, set } => {
                let regex = set.matches(name).iter().next().map(|i| set.patterns()[i].clone()).unwrap_or_default();
                format!("{} rule topic_regex {regex:?}", kind(*allow))
            }
            Verdict::Pattern { allow, pattern } => format!("{} rule pattern {pattern:?}", kind(*allow)),
            Verdict::NoRule => "no rule allows it".into(),
        }
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
        self.rules.as_ref().is_none_or(|r| r.write.decide(name, false).allows())
    }

    /// A subscription is allowed when an allow rule covers every topic of the filter and no
    /// deny rule could match one of them.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        self.rules.as_ref().is_none_or(|r| r.read.decide(filter, true).allows())
    }

    /// Whether a publish (`subscribe = false`) or subscription is allowed, and the rule that
    /// decided, in words.
    pub fn explain(&self, topic: &str, subscribe: bool) -> (bool, String) {
        let Some(rules) = &self.rules else { return (true, "no authorization configured".into()) };
        let verdict = if subscribe { rules.read.decide(topic, true) } else { rules.write.decide(topic, false) };
        (verdict.allows(), verdict.describe(topic))
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
    fn explain_names_the_deciding_rule() {
        let rules = [rule(Access::ReadWrite, Some("plant/#"), None, false), rule(Access::Write, None, Some("plant/secret/.*"), true)];
        let acl = Acl::compile(&rules, "u", "c").unwrap();
        assert_eq!(acl.explain("plant/a", false), (true, "allow rule pattern \"plant/#\"".into()));
        assert_eq!(acl.explain("plant/secret/k", false), (false, "deny rule topic_regex \"^(?:plant/secret/.*)$\"".into()));
        assert_eq!(acl.explain("other", true), (false, "no rule allows it".into()));
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
