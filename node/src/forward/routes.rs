//! The route table of one peer: the filters it has local subscribers for, as it announced them,
//! in a trie so a topic is matched in O(levels). Pure.

use std::collections::HashMap;

#[derive(Debug, Default, Clone)]
struct Node {
    children: HashMap<String, Node>,
    /// A filter ends here.
    terminal: bool,
}

impl Node {
    fn is_empty(&self) -> bool {
        !self.terminal && self.children.is_empty()
    }
}

/// A peer's announced filters.
#[derive(Debug, Default, Clone)]
pub struct RouteTable {
    root: Node,
    len: usize,
}

impl RouteTable {
    /// A table holding exactly `filters`.
    pub fn from_filters<'a>(filters: impl IntoIterator<Item = &'a str>) -> RouteTable {
        let mut table = RouteTable::default();
        for filter in filters {
            table.insert(filter);
        }
        table
    }

    pub fn insert(&mut self, filter: &str) {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.entry(level.to_string()).or_default();
        }
        if !node.terminal {
            node.terminal = true;
            self.len += 1;
        }
    }

    pub fn remove(&mut self, filter: &str) {
        let levels: Vec<&str> = filter.split('/').collect();
        if remove_path(&mut self.root, &levels) {
            self.len -= 1;
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether some filter matches the topic name (with the MQTT rule that wildcards at the
    /// first level do not match a topic starting with `$`).
    pub fn matches(&self, topic: &str) -> bool {
        matches_from(&self.root, topic.split('/'), topic.starts_with('$'))
    }
}

fn remove_path(node: &mut Node, levels: &[&str]) -> bool {
    match levels.split_first() {
        None => std::mem::replace(&mut node.terminal, false),
        Some((level, rest)) => {
            let Some(child) = node.children.get_mut(*level) else { return false };
            let removed = remove_path(child, rest);
            if child.is_empty() {
                node.children.remove(*level);
            }
            removed
        }
    }
}

fn matches_from(node: &Node, mut levels: std::str::Split<'_, char>, dollar_at_root: bool) -> bool {
    if !dollar_at_root && node.children.get("#").is_some_and(|n| n.terminal) {
        return true;
    }
    match levels.next() {
        None => node.terminal,
        Some(level) => {
            node.children.get(level).is_some_and(|child| matches_from(child, levels.clone(), false))
                || (!dollar_at_root && node.children.get("+").is_some_and(|plus| matches_from(plus, levels, false)))
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
}
