//! `CredentialList`: the credentials of an `AuthState` in order, and their lookups — by name, by
//! exact identity, user name and client id, and the identity regexes in the order they are tried.
//! All of it lives in persistent maps (`imbl`): a clone shares everything and costs nothing, and
//! putting or removing a credential costs O(log n), so a batch of a bulk import costs what the
//! batch holds, not what the list holds, on every node. The order (`seq`) comes from the order
//! of the changes, so every node applying the same log has the same list; it is serialized as a
//! plain sequence (state files and Raft snapshots), read back in that order.

use std::cmp::Reverse;
use std::sync::Arc;

use imbl::{HashMap, OrdMap};
use regex::Regex;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::state::{Credential, PasswordMatch, X509Match};

/// Keys are `Arc<str>`: a change copies the map nodes on its path, and a copied key is then a
/// reference count, not an allocation.
#[derive(Clone, Default)]
pub struct CredentialList {
    /// Credentials by sequence number: the order they were first put in (a replaced credential
    /// keeps its place).
    order: OrdMap<u64, Arc<Credential>>,
    by_name: HashMap<Arc<str>, u64>,
    identities: HashMap<Arc<str>, Arc<Credential>>,
    usernames: HashMap<Arc<str>, Arc<Credential>>,
    /// Password credentials without user name, by the client id they are bound to.
    client_ids: HashMap<Arc<str>, Arc<Credential>>,
    /// Identity regexes (anchored), highest priority first, then in order.
    regexes: OrdMap<(Reverse<i32>, u64), (Regex, Arc<Credential>)>,
    next_seq: u64,
}

/// Why a credential could not be put.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutError {
    pub credential: String,
    pub reason: String,
    /// Its identity, user name or client id belongs to another credential.
    pub taken: bool,
}

/// What a credential is found by.
enum Key<'a> {
    Regex(&'a str, i32),
    Identity(&'a str),
    Username(&'a str),
    ClientId(&'a str),
}

impl std::fmt::Display for Key<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Regex(pattern, _) => write!(f, "identity regex {pattern:?}"),
            Key::Identity(identity) => write!(f, "identity {identity:?}"),
            Key::Username(username) => write!(f, "user name {username:?}"),
            Key::ClientId(client_id) => write!(f, "client id {client_id:?}"),
        }
    }
}

/// A credential without any (invalid: `validate_credential` says why) is in the order only.
fn key(c: &Credential) -> Option<Key<'_>> {
    match (&c.x509, &c.password) {
        (Some(X509Match { identity_regex: Some(pattern), priority, .. }), _) => Some(Key::Regex(pattern, *priority)),
        (Some(X509Match { identity: Some(identity), .. }), _) => Some(Key::Identity(identity)),
        (_, Some(PasswordMatch { username: Some(username), .. })) => Some(Key::Username(username)),
        (_, Some(PasswordMatch { username: None, client_id: Some(client_id), .. })) => Some(Key::ClientId(client_id)),
        _ => None,
    }
}

impl CredentialList {
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The credentials in order.
    pub fn iter(&self) -> impl Iterator<Item = &Credential> {
        self.order.values().map(|c| &**c)
    }

    pub fn get(&self, name: &str) -> Option<&Credential> {
        self.by_name.get(name).and_then(|seq| self.order.get(seq)).map(|c| &**c)
    }

    /// The x509 credential of an exact identity.
    pub fn by_identity(&self, identity: &str) -> Option<&Credential> {
        self.identities.get(identity).map(|c| &**c)
    }

    /// The password credential of a user name.
    pub fn by_username(&self, username: &str) -> Option<&Credential> {
        self.usernames.get(username).map(|c| &**c)
    }

    /// The password credential without user name bound to a client id.
    pub fn by_client_id(&self, client_id: &str) -> Option<&Credential> {
        self.client_ids.get(client_id).map(|c| &**c)
    }

    /// The x509 credentials whose identity regex matches, in the order they are tried.
    pub fn regex_matches<'a>(&'a self, identity: &'a str) -> impl Iterator<Item = &'a Credential> + 'a {
        self.regexes.values().filter(move |(regex, _)| regex.is_match(identity)).map(|(_, c)| &**c)
    }

    /// Creates or replaces credentials (by name; a replaced one keeps its place), all or none:
    /// on an error the list is unchanged. An identity, user name or client id may pass from a
    /// replaced credential to another of the batch. Returns how many were replaced.
    pub fn put_all(&mut self, batch: impl IntoIterator<Item = Credential>) -> Result<usize, PutError> {
        let mut next = self.clone();
        let batch: Vec<Arc<Credential>> = batch.into_iter().map(Arc::new).collect();
        let mut names = std::collections::HashSet::new();
        if let Some(twice) = batch.iter().find(|c| !names.insert(c.name.as_str())) {
            return Err(PutError { credential: twice.name.clone(), reason: "duplicate credential name".into(), taken: false });
        }
        let mut replaced = 0;
        for c in &batch {
            if let Some((seq, old)) = next.by_name.get(c.name.as_str()).and_then(|&seq| Some((seq, next.order.get(&seq)?.clone()))) {
                next.unindex(seq, &old);
                replaced += 1;
            }
        }
        for c in batch {
            next.index(c)?;
        }
        *self = next;
        Ok(replaced)
    }

    /// Removes a credential by name.
    pub fn remove(&mut self, name: &str) -> Option<Arc<Credential>> {
        let seq = self.by_name.remove(name)?;
        let old = self.order.remove(&seq)?;
        self.unindex(seq, &old);
        Some(old)
    }

    /// Takes a credential's key out of the lookups (not out of the order).
    fn unindex(&mut self, seq: u64, c: &Credential) {
        match key(c) {
            Some(Key::Regex(_, priority)) => {
                self.regexes.remove(&(Reverse(priority), seq));
            }
            Some(Key::Identity(identity)) => {
                self.identities.remove(identity);
            }
            Some(Key::Username(username)) => {
                self.usernames.remove(username);
            }
            Some(Key::ClientId(client_id)) => {
                self.client_ids.remove(client_id);
            }
            None => {}
        }
    }

    /// Puts a credential in its place (its name's, or last) and in the lookups. On an error
    /// `self` is half changed: `put_all` works on a copy.
    fn index(&mut self, c: Arc<Credential>) -> Result<(), PutError> {
        let error = |reason: String, taken| PutError { credential: c.name.clone(), reason, taken };
        let key = key(&c);
        let owner = match &key {
            None | Some(Key::Regex(..)) => None,
            Some(Key::Identity(identity)) => self.identities.get(*identity),
            Some(Key::Username(username)) => self.usernames.get(*username),
            Some(Key::ClientId(client_id)) => self.client_ids.get(*client_id),
        };
        if let (Some(owner), Some(key)) = (owner, &key) {
            return Err(error(format!("{key} is already used by credential {:?}", owner.name), true));
        }
        let seq = match self.by_name.get(c.name.as_str()) {
            Some(&seq) => seq,
            None => {
                self.next_seq += 1;
                self.by_name.insert(c.name.as_str().into(), self.next_seq);
                self.next_seq
            }
        };
        match key {
            Some(Key::Regex(pattern, priority)) => {
                let regex = Regex::new(&format!("^(?:{pattern})$")).map_err(|e| error(format!("identity_regex: {e}"), false))?;
                self.regexes.insert((Reverse(priority), seq), (regex, c.clone()));
            }
            Some(Key::Identity(identity)) => {
                self.identities.insert(identity.into(), c.clone());
            }
            Some(Key::Username(username)) => {
                self.usernames.insert(username.into(), c.clone());
            }
            Some(Key::ClientId(client_id)) => {
                self.client_ids.insert(client_id.into(), c.clone());
            }
            None => {}
        }
        self.order.insert(seq, c);
        Ok(())
    }
}

impl TryFrom<Vec<Credential>> for CredentialList {
    type Error = PutError;

    /// A list in the given order.
    fn try_from(credentials: Vec<Credential>) -> Result<CredentialList, PutError> {
        let mut list = CredentialList::default();
        list.put_all(credentials)?;
        Ok(list)
    }
}

impl PartialEq for CredentialList {
    fn eq(&self, other: &CredentialList) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl std::fmt::Debug for CredentialList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl Serialize for CredentialList {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for CredentialList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<CredentialList, D::Error> {
        let credentials = Vec::<Credential>::deserialize(deserializer)?;
        CredentialList::try_from(credentials)
            .map_err(|e| serde::de::Error::custom(format_args!("credentials.{}: {}", e.credential, e.reason)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::state::ClientType;

    /// A credential of one of the four key kinds; `variant` picks the kind and the key from
    /// small pools, so random batches replace, move keys between names and collide.
    fn credential(name: &str, variant: u64) -> Credential {
        let key = format!("k{}", variant % 7);
        let x509 = |identity: Option<String>, identity_regex: Option<String>| {
            Some(X509Match { identity, identity_regex, priority: (variant % 3) as i32, issuer: None })
        };
        let password = |username: Option<String>, client_id: Option<String>| {
            Some(PasswordMatch { username, client_id, hash: String::new(), scram_sha256: None, scram_sha512: None })
        };
        let (x509, password) = match variant % 4 {
            0 => (x509(Some(key), None), None),
            1 => (x509(None, Some(format!("{key}-[0-9]+"))), None),
            2 => (None, password(Some(key), None)),
            _ => (None, password(None, Some(key))),
        };
        Credential {
            name: name.into(),
            enabled: !variant.is_multiple_of(5),
            client_type: ClientType::Device,
            roles: vec![],
            rules: vec![],
            x509,
            password,
        }
    }

    /// Every lookup of a list, by name, in a comparable form (sequence numbers left out: a
    /// rebuild numbers from one).
    #[derive(Debug, PartialEq)]
    struct Lookups {
        list: Vec<Credential>,
        /// Keys to credential names, sorted.
        identities: Vec<(String, String)>,
        usernames: Vec<(String, String)>,
        client_ids: Vec<(String, String)>,
        /// (priority, pattern, name) in the order they are tried.
        regexes: Vec<(i32, String, String)>,
    }

    fn lookups(list: &CredentialList) -> Lookups {
        let names = |map: &HashMap<Arc<str>, Arc<Credential>>| {
            let mut pairs: Vec<_> = map.iter().map(|(k, c)| (k.to_string(), c.name.clone())).collect();
            pairs.sort();
            pairs
        };
        let by_name: Vec<_> = list.by_name.iter().map(|(name, seq)| (name.to_string(), list.order[seq].name.clone())).collect();
        assert!(by_name.iter().all(|(name, found)| name == found) && by_name.len() == list.len(), "by_name matches the order");
        Lookups {
            list: list.iter().cloned().collect(),
            identities: names(&list.identities),
            usernames: names(&list.usernames),
            client_ids: names(&list.client_ids),
            regexes: list.regexes.iter().map(|((Reverse(p), _), (r, c))| (*p, r.as_str().to_string(), c.name.clone())).collect(),
        }
    }

    /// Random batches of puts (new names, replacements, key changes, collisions) and deletes,
    /// applied to one list step by step: after each, its lookups equal those of a list built
    /// from scratch from the same credentials in the same order, and a refused batch changes
    /// nothing.
    #[test]
    fn incremental_changes_equal_a_rebuild() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut random = move |below: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % below
        };
        let mut list = CredentialList::default();
        let (mut applied, mut refused, mut deleted) = (0, 0, 0);
        for _ in 0..2000 {
            let before = list.clone();
            if random(4) == 0 {
                let name = format!("c{}", random(12));
                let removed = list.remove(&name);
                assert_eq!(removed.is_some(), before.get(&name).is_some());
                deleted += usize::from(removed.is_some());
            } else {
                let batch: Vec<_> = (0..1 + random(4)).map(|_| credential(&format!("c{}", random(12)), random(1000))).collect();
                match list.put_all(batch.clone()) {
                    Ok(replaced) => {
                        applied += 1;
                        let mut names = std::collections::HashSet::new();
                        assert_eq!(replaced, batch.iter().filter(|c| names.insert(&c.name) && before.get(&c.name).is_some()).count());
                        for c in &batch {
                            assert_eq!(list.get(&c.name), Some(c));
                        }
                    }
                    Err(e) => {
                        refused += 1;
                        assert_eq!(lookups(&list), lookups(&before), "refused ({e:?}): unchanged");
                    }
                }
            }
            let rebuilt = CredentialList::try_from(list.iter().cloned().collect::<Vec<_>>()).unwrap();
            assert_eq!(lookups(&list), lookups(&rebuilt));
        }
        assert!(applied > 500 && refused > 100 && deleted > 100, "{applied} applied, {refused} refused, {deleted} deleted");
    }

    #[test]
    fn batches_may_move_keys_between_their_credentials_and_are_refused_whole() {
        let mut list = CredentialList::try_from(vec![credential("a", 0), credential("b", 8)]).unwrap();
        // a has identity k0, b has k1: swapping them in one batch is allowed.
        assert_eq!(list.put_all([credential("a", 8), credential("b", 0)]), Ok(2));
        assert_eq!(list.by_identity("k0").map(|c| c.name.as_str()), Some("b"));
        let taken = list.put_all([credential("c", 16), credential("d", 0)]).unwrap_err();
        assert_eq!((taken.credential.as_str(), taken.taken), ("d", true));
        assert_eq!(taken.reason, "identity \"k0\" is already used by credential \"b\"");
        assert!(list.get("c").is_none(), "all or none");
        let twice = list.put_all([credential("e", 0), credential("e", 8)]).unwrap_err();
        assert_eq!((twice.reason.as_str(), twice.taken), ("duplicate credential name", false));
        let names: Vec<_> = list.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["a", "b"], "replaced credentials keep their place");
    }

    #[test]
    fn regexes_are_tried_by_priority_then_in_order_and_serialized_lists_read_back() {
        let list = CredentialList::try_from(vec![credential("low", 1), credential("high", 5), credential("low-too", 9)]).unwrap();
        // low: k1-[0-9]+ priority 1; high: k5-… priority 2; low-too: k2-… priority 0.
        let order: Vec<_> = list.regexes.values().map(|(_, c)| c.name.as_str()).collect();
        assert_eq!(order, ["high", "low", "low-too"]);
        assert_eq!(list.regex_matches("k5-12").map(|c| c.name.as_str()).collect::<Vec<_>>(), ["high"]);
        let json = serde_json::to_string(&list).unwrap();
        let back: CredentialList = serde_json::from_str(&json).unwrap();
        assert_eq!(lookups(&back), lookups(&list));
        let duplicate = serde_json::to_string(&[credential("x", 0), credential("y", 0)]).unwrap();
        let err = serde_json::from_str::<CredentialList>(&duplicate).unwrap_err().to_string();
        assert!(err.contains("credentials.y: identity \"k0\" is already used by credential \"x\""), "{err}");
    }
}
