//! A session's compiled permissions: the rules of its credential and roles with `%u` and `%c`
//! already substituted, compiled once at CONNECT into regex sets and topic filters, so a check
//! allocates nothing. Deny rules win over allow rules; no matching allow rule means deny.

use regex::RegexSet;

use super::state::{Access, Rule};
use crate::topic;

#[derive(Debug, Clone)]
struct Matchers {
    /// `None` when there is no such rule: an empty set still costs kilobytes, and most
    /// credentials have plain topic patterns only.
    allow_regex: Option<RegexSet>,
    deny_regex: Option<RegexSet>,
    allow_patterns: Vec<String>,
    deny_patterns: Vec<String>,
}

impl Matchers {
    /// Compiles the rules of one direction. `subst` gives a rule's text with `%u`/`%c` filled
    /// in, or `None` when a substituted value is unsafe for an allow rule (which is then left out).
    fn compile(rules: &[&Rule], wants: fn(Access) -> bool, subst: &dyn Fn(&str, bool, bool) -> Option<String>) -> Result<Matchers, String> {
        let pick = |deny: bool, regex: bool| -> Vec<String> {
            rules
                .iter()
                .filter(|r| r.deny == deny && wants(r.access))
                .filter_map(|r| if regex { r.topic_regex.as_deref() } else { r.pattern.as_deref() })
                .filter_map(|text| subst(text, regex, deny))
                .collect()
        };
        let set = |patterns: Vec<String>| -> Result<Option<RegexSet>, String> {
            if patterns.is_empty() {
                return Ok(None);
            }
            RegexSet::new(patterns.iter().map(|p| format!("^(?:{p})$"))).map(Some).map_err(|e| e.to_string())
        };
        Ok(Matchers {
            allow_regex: set(pick(false, true))?,
            deny_regex: set(pick(true, true))?,
            allow_patterns: pick(false, false),
            deny_patterns: pick(true, false),
        })
    }

    /// The rule that decides for one topic name: deny rules first, then allow rules.
    fn decide_topic<'a>(&'a self, name: &str) -> Verdict<'a> {
        if let Some(set) = self.deny_regex.as_ref().filter(|set| set.is_match(name)) {
            return Verdict::Regex { allow: false, set };
        }
        if let Some(p) = self.deny_patterns.iter().find(|p| topic::matches(p, name)) {
            return Verdict::Pattern { allow: false, pattern: p };
        }
        if let Some(set) = self.allow_regex.as_ref().filter(|set| set.is_match(name)) {
            return Verdict::Regex { allow: true, set };
        }
        match self.allow_patterns.iter().find(|p| topic::matches(p, name)) {
            Some(p) => Verdict::Pattern { allow: true, pattern: p },
            None => Verdict::NoRule,
        }
    }

    /// The rule that decides whether a subscription filter may be granted: refused when a deny
    /// rule covers every topic of the filter, or when no allow rule can match any of them.
    /// Granted otherwise — which topics are delivered is decided per message by
    /// [`Matchers::decide_topic`]. A `topic_regex` allow rule is taken to possibly match any
    /// filter with wildcards (deciding whether a regex and a filter share a topic is not done
    /// here; the per-message check keeps it safe).
    fn decide_filter<'a>(&'a self, filter: &str) -> Verdict<'a> {
        let literal = !filter.contains(['+', '#']);
        if literal {
            return self.decide_topic(filter);
        }
        if let Some(p) = self.deny_patterns.iter().find(|p| topic::covers(p, filter)) {
            return Verdict::Pattern { allow: false, pattern: p };
        }
        if let Some(p) = self.allow_patterns.iter().find(|p| topic::intersects(p, filter)) {
            return Verdict::Pattern { allow: true, pattern: p };
        }
        if let Some(set) = &self.allow_regex {
            return Verdict::Regex { allow: true, set };
        }
        Verdict::NoRule
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
                let regex = set.matches(name).iter().next().or((!set.is_empty()).then_some(0)).map(|i| set.patterns()[i].clone());
                format!("{} rule topic_regex {:?}", kind(*allow), regex.unwrap_or_default())
            }
            Verdict::Pattern { allow, pattern } => format!("{} rule pattern {pattern:?}", kind(*allow)),
            Verdict::NoRule => "no rule allows it".into(),
        }
    }
}

/// Whether a value from the network may be put into an allow rule: not empty, no MQTT
/// wildcard, no level separator, no NUL, no leading `$`. An unsafe value leaves the rule out,
/// so it can never widen a client's permissions.
pub fn is_safe_substitution(value: &str) -> bool {
    !value.is_empty() && !value.contains(['+', '#', '/', '\0']) && !value.starts_with('$')
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
    /// rules the substituted values are escaped, so they match literally. An allow rule whose
    /// substituted value is unsafe ([`is_safe_substitution`]) is left out; a deny rule keeps
    /// it (a wildcard there can only deny more).
    pub fn compile<'a>(rules: impl IntoIterator<Item = &'a Rule>, username: &str, client_id: &str) -> Result<Acl, String> {
        let rules: Vec<&Rule> = rules.into_iter().collect();
        let subst = |text: &str, regex: bool, deny: bool| {
            let unsafe_value =
                (text.contains("%u") && !is_safe_substitution(username)) || (text.contains("%c") && !is_safe_substitution(client_id));
            if unsafe_value && !deny {
                return None;
            }
            let (u, c) =
                if regex { (regex::escape(username), regex::escape(client_id)) } else { (username.to_string(), client_id.to_string()) };
            Some(text.replace("%u", &u).replace("%c", &c))
        };
        let read = Matchers::compile(&rules, Access::allows_read, &subst)?;
        let write = Matchers::compile(&rules, Access::allows_write, &subst)?;
        Ok(Acl { rules: Some(Box::new(Directions { read, write })) })
    }

    pub fn may_publish(&self, name: &str) -> bool {
        self.rules.as_ref().is_none_or(|r| r.write.decide_topic(name).allows())
    }

    /// Whether a message on topic `name` may be delivered to this client.
    pub fn may_read(&self, name: &str) -> bool {
        self.rules.as_ref().is_none_or(|r| r.read.decide_topic(name).allows())
    }

    /// Whether a subscription filter is granted: unless a deny rule covers all of it or no
    /// allow rule can match any topic under it. Each delivered message is still checked with
    /// [`Acl::may_read`].
    pub fn may_subscribe(&self, filter: &str) -> bool {
        self.rules.as_ref().is_none_or(|r| r.read.decide_filter(filter).allows())
    }

    /// True when no authorization is configured (every check allows).
    pub fn allows_all(&self) -> bool {
        self.rules.is_none()
    }

    /// Whether a publish, a read of a topic or a subscription is allowed, and the rule that
    /// decided, in words.
    pub fn explain(&self, topic: &str, action: AclAction) -> (bool, String) {
        let Some(rules) = &self.rules else { return (true, "no authorization configured".into()) };
        let verdict = match action {
            AclAction::Publish => rules.write.decide_topic(topic),
            AclAction::Read => rules.read.decide_topic(topic),
            AclAction::Subscribe => rules.read.decide_filter(topic),
        };
        (verdict.allows(), verdict.describe(topic))
    }
}

/// What [`Acl::explain`] is asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AclAction {
    Publish,
    /// Delivery of a message on a topic name.
    Read,
    Subscribe,
}

/// Most read decisions a session remembers before it starts over.
const READ_CACHE_CAPACITY: usize = 1024;

/// A session's permissions with its read decisions cached per topic (bounded; emptied when
/// the permissions change), for the check every delivered message passes.
#[derive(Debug, Clone)]
pub struct SessionAcl {
    acl: Acl,
    read_cache: std::collections::HashMap<Box<str>, bool>,
}

impl SessionAcl {
    pub fn new(acl: Acl) -> SessionAcl {
        SessionAcl { acl, read_cache: std::collections::HashMap::new() }
    }

    pub fn acl(&self) -> &Acl {
        &self.acl
    }

    /// Puts new permissions in force and forgets every cached decision.
    pub fn replace(&mut self, acl: Acl) {
        self.acl = acl;
        self.read_cache.clear();
    }

    /// [`Acl::may_read`], cached.
    pub fn may_read(&mut self, topic: &str) -> bool {
        if self.acl.allows_all() {
            return true;
        }
        if let Some(&allowed) = self.read_cache.get(topic) {
            return allowed;
        }
        let allowed = self.acl.may_read(topic);
        if self.read_cache.len() >= READ_CACHE_CAPACITY {
            self.read_cache.clear();
        }
        self.read_cache.insert(topic.into(), allowed);
        allowed
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
        assert!(acl.may_subscribe("cpi/+/commands"), "granted: one topic under it is readable");
        assert!(acl.may_read("cpi/plc-1/commands"));
        assert!(!acl.may_read("cpi/plc-2/commands"), "the others are withheld at delivery");
        assert!(acl.may_subscribe("devices/plc-1/#"));
        assert!(acl.may_subscribe("devices/#"));
        assert!(!acl.may_subscribe("other/#"), "nothing under it is readable");
        assert!(!acl.may_subscribe("$SYS/#"), "$SYS needs an explicit rule");
        assert!(!acl.may_subscribe("+/x"));
        let directions = acl.rules.as_ref().expect("rules");
        let sets = [&directions.read, &directions.write].map(|m| (m.allow_regex.is_some(), m.deny_regex.is_some()));
        assert_eq!(sets, [(false, false); 2], "pattern rules compile no regex set");
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
        assert!(acl.may_subscribe("plant/#"), "granted; denied topics are withheld at delivery");
        assert!(acl.may_read("plant/line-1") && !acl.may_read("plant/secret/key"));
        assert!(!acl.may_subscribe("plant/secret/#"), "a deny rule covers all of it");
        assert!(!acl.may_subscribe("plant/secret/x"));
        assert!(acl.may_subscribe("plant/line-1/#"));
        assert!(!Acl::compile(&[], "u", "c").unwrap().may_publish("anything"));
        assert!(Acl::allow_all().may_subscribe("#"));
    }

    #[test]
    fn explain_names_the_deciding_rule() {
        let rules = [rule(Access::ReadWrite, Some("plant/#"), None, false), rule(Access::Write, None, Some("plant/secret/.*"), true)];
        let acl = Acl::compile(&rules, "u", "c").unwrap();
        assert_eq!(acl.explain("plant/a", AclAction::Publish), (true, "allow rule pattern \"plant/#\"".into()));
        assert_eq!(acl.explain("plant/secret/k", AclAction::Publish), (false, "deny rule topic_regex \"^(?:plant/secret/.*)$\"".into()));
        assert_eq!(acl.explain("other", AclAction::Subscribe), (false, "no rule allows it".into()));
        assert_eq!(acl.explain("plant/#", AclAction::Subscribe), (true, "allow rule pattern \"plant/#\"".into()));
    }

    #[test]
    fn unsafe_substitutions_never_widen() {
        let rules = [rule(Access::ReadWrite, Some("clients/%c/#"), None, false), rule(Access::ReadWrite, None, Some("r/%u/.*"), false)];
        for bad in ["#", "+", "a/b", "$SYS", "x\0y", ""] {
            let acl = Acl::compile(&rules, bad, bad).unwrap();
            for topic in ["clients/other/x", "clients/#", "r/other/x", "r/a/b/x"] {
                assert!(!acl.may_publish(topic), "{bad:?} must not allow {topic}");
                assert!(!acl.may_read(topic), "{bad:?} must not allow reading {topic}");
            }
            assert!(!acl.may_subscribe("clients/#"), "{bad:?}");
        }
        let deny = [rule(Access::ReadWrite, Some("clients/#"), None, false), rule(Access::Read, Some("clients/%c/secret"), None, true)];
        let acl = Acl::compile(&deny, "u", "+").unwrap();
        assert!(!acl.may_read("clients/other/secret"), "a deny rule keeps the value: it can only deny more");
        assert!(acl.may_read("clients/other/public"));
    }

    #[test]
    fn session_read_cache_follows_permission_changes() {
        let rules = [rule(Access::Read, Some("a/#"), None, false)];
        let mut session = SessionAcl::new(Acl::compile(&rules, "u", "c").unwrap());
        assert!(session.may_read("a/1") && session.may_read("a/1"));
        assert!(!session.may_read("b/1"));
        session.replace(Acl::compile(&[rule(Access::Read, Some("b/#"), None, false)], "u", "c").unwrap());
        assert!(!session.may_read("a/1") && session.may_read("b/1"));
        for i in 0..3 * READ_CACHE_CAPACITY {
            assert!(!session.may_read(&format!("x/{i}")));
        }
        assert!(session.read_cache.len() <= READ_CACHE_CAPACITY);
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
