//! The route table of one peer: the filters it has local subscribers for, and the shared
//! subscription groups it has members of (`$share/<group>/<filter>`), as it announced them, in a
//! trie so a topic is matched in O(levels). Pure.

use std::collections::BTreeSet;

/// Hashed with a per-process random seed (filters come from clients, through the peer).
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::quality::RandomState>;

#[derive(Debug, Default, Clone)]
struct Node {
    children: HashMap<String, Node>,
    /// A filter ends here.
    terminal: bool,
    /// Shared groups on the filter ending here, by their route (`$share/<group>/<filter>`).
    groups: BTreeSet<String>,
}

impl Node {
    fn is_empty(&self) -> bool {
        !self.terminal && self.groups.is_empty() && self.children.is_empty()
    }
}

/// A peer's announced routes.
#[derive(Debug, Default, Clone)]
pub struct RouteTable {
    root: Node,
    len: usize,
    groups: usize,
}

/// A route split into the filter it sits on and, for a shared group, its whole text.
fn split(route: &str) -> (&str, Option<&str>) {
    match crate::topic::parse_filter(route, crate::topic::TopicLimits::UNLIMITED) {
        Ok(crate::topic::ParsedFilter { share_group: Some(_), filter }) => (filter, Some(route)),
        _ => (route, None),
    }
}

impl RouteTable {
    /// A table holding exactly `routes`.
    pub fn from_filters<'a>(routes: impl IntoIterator<Item = &'a str>) -> RouteTable {
        let mut table = RouteTable::default();
        for route in routes {
            table.insert(route);
        }
        table
    }

    pub fn insert(&mut self, route: &str) {
        let (filter, group) = split(route);
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.entry(level.to_string()).or_default();
        }
        let added = match group {
            Some(group) => node.groups.insert(group.to_string()),
            None => !std::mem::replace(&mut node.terminal, true),
        };
        if added {
            self.len += 1;
            self.groups += usize::from(group.is_some());
        }
    }

    pub fn remove(&mut self, route: &str) {
        let (filter, group) = split(route);
        let levels: Vec<&str> = filter.split('/').collect();
        if remove_path(&mut self.root, &levels, group) {
            self.len -= 1;
            self.groups -= usize::from(group.is_some());
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether some (non-shared) filter matches the topic name (with the MQTT rule that wildcards
    /// at the first level do not match a topic starting with `$`).
    pub fn matches(&self, topic: &str) -> bool {
        let mut found = false;
        visit_matching(&self.root, topic.split('/'), topic.starts_with('$'), &mut |node| found |= node.terminal);
        found
    }

    /// Calls `visit` with every shared group whose filter matches the topic name.
    pub fn matching_groups<'a>(&'a self, topic: &str, mut visit: impl FnMut(&'a str)) {
        if self.groups > 0 {
            visit_matching(&self.root, topic.split('/'), topic.starts_with('$'), &mut |node| node.groups.iter().for_each(|g| visit(g)));
        }
    }

    /// Whether the peer announced this shared group (`$share/<group>/<filter>`).
    pub fn has_group(&self, route: &str) -> bool {
        let (filter, _) = split(route);
        let mut node = &self.root;
        for level in filter.split('/') {
            match node.children.get(level) {
                Some(child) => node = child,
                None => return false,
            }
        }
        node.groups.contains(route)
    }
}

fn remove_path(node: &mut Node, levels: &[&str], group: Option<&str>) -> bool {
    match levels.split_first() {
        None => match group {
            Some(group) => node.groups.remove(group),
            None => std::mem::replace(&mut node.terminal, false),
        },
        Some((level, rest)) => {
            let Some(child) = node.children.get_mut(*level) else { return false };
            let removed = remove_path(child, rest, group);
            if child.is_empty() {
                node.children.remove(*level);
            }
            removed
        }
    }
}

/// Visits every node whose filter matches the remaining `levels`.
fn visit_matching<'a>(node: &'a Node, mut levels: std::str::Split<'_, char>, dollar_at_root: bool, visit: &mut impl FnMut(&'a Node)) {
    if !dollar_at_root {
        if let Some(rest) = node.children.get("#") {
            visit(rest);
        }
    }
    match levels.next() {
        None => visit(node),
        Some(level) => {
            if let Some(child) = node.children.get(level) {
                visit_matching(child, levels.clone(), false, visit);
            }
            if !dollar_at_root {
                if let Some(plus) = node.children.get("+") {
                    visit_matching(plus, levels, false, visit);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_follows_the_mqtt_rules() {
        let table = RouteTable::from_filters(["a/+/c", "b/#", "$SYS/#", "exact"]);
        assert_eq!(table.len(), 4);
        for (topic, expected) in
            [("a/x/c", true), ("a/x/d", false), ("b", true), ("b/1/2", true), ("exact", true), ("exact/no", false), ("$SYS/x", true)]
        {
            assert_eq!(table.matches(topic), expected, "{topic}");
        }
        let everything = RouteTable::from_filters(["#", "+/x"]);
        assert!(everything.matches("a/b"));
        assert!(!everything.matches("$SYS/x"), "wildcards at the root never match $ topics");
    }

    #[test]
    fn agrees_with_the_topic_module() {
        let filters = ["a/+", "a/#", "+/b", "#", "a/b/c", "+/+/+"];
        let topics = ["a", "a/b", "a/b/c", "x/b", "$x/b", "a/", "/b"];
        for filter in filters {
            let table = RouteTable::from_filters([filter]);
            for topic in topics {
                assert_eq!(table.matches(topic), crate::topic::matches(filter, topic), "{filter} vs {topic}");
            }
        }
    }

    #[test]
    fn removal_prunes() {
        let mut table = RouteTable::from_filters(["a/b", "a/b/c"]);
        table.remove("a/b");
        table.remove("a/b");
        assert_eq!(table.len(), 1);
        assert!(!table.matches("a/b") && table.matches("a/b/c"));
        table.remove("a/b/c");
        assert!(table.is_empty() && table.root.children.is_empty());
    }

    #[test]
    fn shared_groups_are_kept_apart_from_filters() {
        let mut table = RouteTable::from_filters(["$share/g/a/+", "$share/h/a/+", "$share/g/#", "a/b"]);
        assert_eq!(table.len(), 4);
        assert!(!table.matches("a/x"), "a group is not a route for plain delivery");
        let mut groups = Vec::new();
        table.matching_groups("a/x", |g| groups.push(g.to_string()));
        groups.sort();
        assert_eq!(groups, ["$share/g/#", "$share/g/a/+", "$share/h/a/+"]);
        assert!(table.has_group("$share/g/a/+") && !table.has_group("$share/x/a/+") && !table.has_group("a/b"));
        table.remove("$share/g/a/+");
        table.remove("$share/h/a/+");
        table.remove("$share/g/#");
        assert!(table.matches("a/b") && !table.has_group("$share/g/#"));
        let mut none = true;
        table.matching_groups("a/b", |_| none = false);
        assert!(none && table.len() == 1);
    }
}
