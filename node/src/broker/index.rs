//! The subscription index: a topic trie that publishers read without taking any lock.
//!
//! Readers load the current root from an [`ArcSwap`] and walk an immutable snapshot. Writers
//! (SUBSCRIBE, UNSUBSCRIBE, session end) serialise on a mutex that no publisher touches, copy
//! only the nodes on the changed path (`Arc::make_mut`), and publish the new root. Child maps
//! are persistent hash maps (`imbl`), so copying a node with 100 000 children is O(1) and a
//! change costs O(log n) instead of a full copy. A client gets its SUBACK after the new root is
//! visible, so every later PUBLISH sees its subscription.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use foldhash::quality::RandomState;
use mqttbytes::QoS;

use super::mailbox::Mailbox;
use super::message::{max_qos, SessionId};

/// Options of one subscription (MQTT 5 subscription options; v3.1.1 uses the defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub subscription_id: Option<usize>,
}

/// A subscription as stored in the index.
#[derive(Debug, Clone)]
pub struct Subscriber {
    pub session: SessionId,
    pub mailbox: Arc<Mailbox>,
    pub options: SubscriptionOptions,
}

/// The members of one `$share/<group>/<filter>`; each message goes to one of them.
#[derive(Debug, Clone)]
struct ShareGroup {
    /// `$share/<group>/<filter>`, carried by the deliveries to the group.
    route: Arc<str>,
    members: Vec<Subscriber>,
    next: Arc<AtomicUsize>,
}

impl ShareGroup {
    fn new(group: &str, filter: &str) -> ShareGroup {
        ShareGroup { route: format!("$share/{group}/{filter}").into(), members: Vec::new(), next: Arc::default() }
    }

    /// Round robin over the members not in `except`, preferring ones with a connected client.
    fn pick(&self, except: &[SessionId]) -> Option<Route> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.members.len();
        let candidates = (0..n).map(|i| &self.members[(start + i) % n]).filter(|m| !except.contains(&m.session));
        let chosen = candidates.clone().find(|m| m.mailbox.is_online()).or_else(|| candidates.clone().next())?;
        Some(Route { shared: Some(self.route.clone()), ..to_route(chosen) })
    }
}

/// A persistent map of a trie node, hashed with a per-process random seed (topic levels come
/// from clients).
type HashMap<K, V> = imbl::GenericHashMap<K, V, RandomState, imbl::shared_ptr::DefaultSharedPtr>;

#[derive(Debug, Clone, Default)]
struct Node {
    children: HashMap<Arc<str>, Arc<Node>>,
    subscribers: Vec<Subscriber>,
    groups: HashMap<Arc<str>, ShareGroup>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subscribers.is_empty() && self.groups.is_empty()
    }
}

/// A session's matching subscriptions merged into one delivery decision.
#[derive(Debug, Clone)]
pub struct Route {
    pub session: SessionId,
    pub mailbox: Arc<Mailbox>,
    pub qos: QoS,
    pub retain_as_published: bool,
    pub subscription_ids: Vec<usize>,
    /// The shared group (`$share/<group>/<filter>`) this session was chosen in, if any.
    pub shared: Option<Arc<str>>,
}

#[derive(Debug, Default)]
pub struct SubscriptionIndex {
    published: ArcSwap<Node>,
    writer: Mutex<Arc<Node>>,
    count: AtomicUsize,
}

impl SubscriptionIndex {
    pub fn new() -> SubscriptionIndex {
        SubscriptionIndex::default()
    }

    /// Number of subscriptions (shared-group memberships included).
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds or replaces the subscription of `subscriber.session` on `filter` (in `group` when
    /// shared). Returns true if it replaced an existing one.
    pub fn subscribe(&self, filter: &str, group: Option<&str>, subscriber: Subscriber) -> bool {
        let replaced = self.modify(filter, |node| {
            let list = match group {
                Some(g) => &mut node.groups.entry(g.into()).or_insert_with(|| ShareGroup::new(g, filter)).members,
                None => &mut node.subscribers,
            };
            match list.iter_mut().find(|s| s.session == subscriber.session) {
                Some(existing) => {
                    *existing = subscriber;
                    true
                }
                None => {
                    list.push(subscriber);
                    false
                }
            }
        });
        if !replaced {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
        replaced
    }

    /// Removes the subscription of `session` on `filter`; true if there was one.
    pub fn unsubscribe(&self, filter: &str, group: Option<&str>, session: SessionId) -> bool {
        let removed = self.modify(filter, |node| {
            let list = match group {
                Some(g) => match node.groups.get_mut(g) {
                    Some(shared) => &mut shared.members,
                    None => return false,
                },
                None => &mut node.subscribers,
            };
            let before = list.len();
            list.retain(|s| s.session != session);
            let removed = list.len() != before;
            if let Some(g) = group {
                if node.groups.get(g).is_some_and(|s| s.members.is_empty()) {
                    node.groups.remove(g);
                }
            }
            removed
        });
        if removed {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
        removed
    }

    /// Applies `change` to the node of `filter` (created if missing), prunes empty nodes and
    /// publishes the new root.
    fn modify<R>(&self, filter: &str, change: impl FnOnce(&mut Node) -> R) -> R {
        let mut root = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let levels: Vec<&str> = filter.split('/').collect();
        let result = modify_path(&mut root, &levels, change);
        self.published.store(root.clone());
        result
    }

    /// Calls `visit` once per session with a subscription matching `topic`, with the
    /// subscriptions of that session merged (highest QoS, all subscription identifiers), and
    /// once per shared group (when `shared_groups`) for the member chosen to receive the
    /// message. `publisher` is used to honour No Local.
    pub fn route(&self, topic: &str, publisher: Option<SessionId>, shared_groups: bool, mut visit: impl FnMut(Route)) {
        let root = self.published.load();
        let mut matched: Vec<&Subscriber> = Vec::new();
        let mut shared: Vec<Route> = Vec::new();
        collect(&root, topic.split('/'), topic.starts_with('$'), &mut |node| {
            matched.extend(node.subscribers.iter().filter(|s| !(s.options.no_local && Some(s.session) == publisher)));
            if shared_groups {
                shared.extend(node.groups.values().filter_map(|group| group.pick(&[])));
            }
        });
        matched.sort_unstable_by_key(|s| s.session);
        let mut iter = matched.into_iter().peekable();
        while let Some(first) = iter.next() {
            let mut route = to_route(first);
            while let Some(next) = iter.next_if(|s| s.session == first.session) {
                route.qos = max_qos(route.qos, next.options.qos);
                route.retain_as_published |= next.options.retain_as_published;
                route.subscription_ids.extend(next.options.subscription_id);
            }
            visit(route);
        }
        shared.into_iter().for_each(visit);
    }

    /// The member of shared group `group` on exactly `filter` chosen to receive the next
    /// message, if the group has members here other than the sessions in `except`.
    pub fn shared_member(&self, filter: &str, group: &str, except: &[SessionId]) -> Option<Route> {
        let root = self.published.load();
        let mut node: &Node = &root;
        for level in filter.split('/') {
            node = node.children.get(level)?;
        }
        node.groups.get(group).and_then(|g| g.pick(except))
    }
}

fn to_route(s: &Subscriber) -> Route {
    Route {
        session: s.session,
        mailbox: s.mailbox.clone(),
        qos: s.options.qos,
        retain_as_published: s.options.retain_as_published,
        subscription_ids: s.options.subscription_id.into_iter().collect(),
        shared: None,
    }
}

fn modify_path<R>(node: &mut Arc<Node>, levels: &[&str], change: impl FnOnce(&mut Node) -> R) -> R {
    let node = Arc::make_mut(node);
    match levels.split_first() {
        None => change(node),
        Some((level, rest)) => {
            let child = node.children.entry((*level).into()).or_default();
            let result = modify_path(child, rest, change);
            if child.is_empty() {
                node.children.remove(*level);
            }
            result
        }
    }
}

/// Visits every node whose filter matches the remaining `levels` (a cloned iterator per branch,
/// so routing a message allocates nothing). At the root, wildcards do not match a topic
/// beginning with `$`.
fn collect<'a>(node: &'a Node, mut levels: std::str::Split<'_, char>, dollar_at_root: bool, visit: &mut impl FnMut(&'a Node)) {
    if !dollar_at_root {
        if let Some(hash) = node.children.get("#") {
            visit(hash);
        }
    }
    match levels.next() {
        None => visit(node),
        Some(level) => {
            if let Some(child) = node.children.get(level) {
                collect(child, levels.clone(), false, visit);
            }
            if !dollar_at_root {
                if let Some(plus) = node.children.get("+") {
                    collect(plus, levels, false, visit);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(session: SessionId, qos: QoS) -> Subscriber {
        Subscriber {
            session,
            mailbox: Arc::new(Mailbox::new(10)),
            options: SubscriptionOptions { qos, no_local: false, retain_as_published: false, subscription_id: None },
        }
    }

    fn sessions(index: &SubscriptionIndex, topic: &str) -> Vec<(SessionId, QoS)> {
        let mut out = Vec::new();
        index.route(topic, None, true, |r| out.push((r.session, r.qos)));
        out.sort_by_key(|r| r.0);
        out
    }

    #[test]
    fn wildcards_and_dollar_topics() {
        let index = SubscriptionIndex::new();
        index.subscribe("a/+/c", None, sub(1, QoS::AtMostOnce));
        index.subscribe("a/#", None, sub(2, QoS::AtMostOnce));
        index.subscribe("#", None, sub(3, QoS::AtMostOnce));
        index.subscribe("$SYS/#", None, sub(4, QoS::AtMostOnce));
        index.subscribe("+/b/c", None, sub(5, QoS::AtMostOnce));
        let all: Vec<SessionId> = sessions(&index, "a/b/c").iter().map(|r| r.0).collect();
        assert_eq!(all, vec![1, 2, 3, 5]);
        assert_eq!(sessions(&index, "a").iter().map(|r| r.0).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(sessions(&index, "$SYS/load").iter().map(|r| r.0).collect::<Vec<_>>(), vec![4]);
        assert_eq!(index.len(), 5);
    }

    #[test]
    fn overlapping_subscriptions_deliver_once_at_highest_qos() {
        let index = SubscriptionIndex::new();
        let mut s = sub(7, QoS::AtMostOnce);
        index.subscribe("x/#", None, s.clone());
        s.options.qos = QoS::ExactlyOnce;
        s.options.subscription_id = Some(9);
        index.subscribe("x/+", None, s);
        let mut routes = Vec::new();
        index.route("x/y", None, true, |r| routes.push(r));
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].qos, QoS::ExactlyOnce);
        assert_eq!(routes[0].subscription_ids, vec![9]);
    }

    #[test]
    fn resubscribe_replaces_and_unsubscribe_prunes() {
        let index = SubscriptionIndex::new();
        assert!(!index.subscribe("a/b", None, sub(1, QoS::AtMostOnce)));
        assert!(index.subscribe("a/b", None, sub(1, QoS::AtLeastOnce)));
        assert_eq!(sessions(&index, "a/b"), vec![(1, QoS::AtLeastOnce)]);
        assert!(index.unsubscribe("a/b", None, 1));
        assert!(!index.unsubscribe("a/b", None, 1));
        assert!(index.published.load().is_empty());
        assert!(index.is_empty());
    }

    #[test]
    fn no_local_skips_the_publisher() {
        let index = SubscriptionIndex::new();
        let mut s = sub(1, QoS::AtMostOnce);
        s.options.no_local = true;
        index.subscribe("t", None, s);
        let mut n = 0;
        index.route("t", Some(1), true, |_| n += 1);
        assert_eq!(n, 0);
        index.route("t", Some(2), true, |_| n += 1);
        assert_eq!(n, 1);
    }

    #[test]
    fn shared_group_round_robin() {
        let index = SubscriptionIndex::new();
        for id in 1..=3 {
            let s = sub(id, QoS::AtMostOnce);
            s.mailbox.set_online();
            index.subscribe("job/+", Some("g"), s);
        }
        let mut got = Vec::new();
        for _ in 0..6 {
            index.route("job/1", None, true, |r| got.push(r.session));
        }
        got.sort();
        assert_eq!(got, vec![1, 1, 2, 2, 3, 3]);
    }

    #[test]
    fn shared_groups_can_be_left_out() {
        let index = SubscriptionIndex::new();
        index.subscribe("job/+", Some("g"), sub(1, QoS::AtMostOnce));
        index.subscribe("job/+", None, sub(2, QoS::AtMostOnce));
        let mut got = Vec::new();
        index.route("job/1", None, false, |r| got.push(r.session));
        assert_eq!(got, [2], "a message forwarded from another node skips the groups here");
    }

    #[test]
    fn a_shared_member_is_found_by_exact_filter_and_group() {
        let index = SubscriptionIndex::new();
        index.subscribe("job/+", Some("g"), sub(1, QoS::AtLeastOnce));
        index.subscribe("job/+", Some("g"), sub(2, QoS::AtLeastOnce));
        let picks: Vec<_> = (0..4).filter_map(|_| index.shared_member("job/+", "g", &[])).map(|r| r.session).collect();
        assert_eq!(picks.len(), 4);
        assert!(picks.contains(&1) && picks.contains(&2), "round robin: {picks:?}");
        assert!(index.shared_member("job/#", "g", &[]).is_none() && index.shared_member("job/+", "h", &[]).is_none());
        let route = index.shared_member("job/+", "g", &[]).and_then(|r| r.shared);
        assert_eq!(route.as_deref(), Some("$share/g/job/+"), "the delivery names its group");
    }

    #[test]
    fn a_shared_member_that_had_the_message_is_not_chosen_again() {
        let index = SubscriptionIndex::new();
        index.subscribe("job/+", Some("g"), sub(1, QoS::AtLeastOnce));
        index.subscribe("job/+", Some("g"), sub(2, QoS::AtLeastOnce));
        for _ in 0..4 {
            assert_eq!(index.shared_member("job/+", "g", &[1]).map(|r| r.session), Some(2));
        }
        assert!(index.shared_member("job/+", "g", &[1, 2]).is_none(), "every member had it");
    }

    #[test]
    fn readers_keep_their_snapshot() {
        let index = SubscriptionIndex::new();
        index.subscribe("a", None, sub(1, QoS::AtMostOnce));
        let snapshot = index.published.load_full();
        index.unsubscribe("a", None, 1);
        assert!(!snapshot.is_empty());
        assert!(index.published.load().is_empty());
    }
}
