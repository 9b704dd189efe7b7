//! Channel names, MQTT-style filters, and the one topic matcher.
//!
//! A channel name is MQTT topic syntax: UTF-8, levels separated by `/`,
//! 1..=256 bytes, no NUL, no `+` or `#`. A filter may use `+` (exactly one
//! level) and `#` (this level and everything below, last level only), as in
//! MQTT.
//!
//! Names whose first level is `$SYS`, `$share` or `$presence` (any ASCII
//! case; [`RESERVED_LEVELS`]) are reserved for the gateway:
//! `$presence/<channel>` carries presence events, `$share/{group}/{filter}`
//! is a shared subscription, `$SYS` is kept for broker status as MQTT
//! brokers use it. Nobody publishes to them; only `$presence/...` and
//! `$share/...` may be subscribed. Any other `$` name (`$aws/things/1`, as
//! devices moving from cloud IoT brokers use) is an ordinary channel, with
//! MQTT's one rule for `$` topics (MQTT 3.1.1 and 5 §4.7.2): a filter
//! starting with a wildcard never matches a `$` channel.
//!
//! | filter | matches | does not match |
//! |---|---|---|
//! | `a/b` | `a/b` | `a`, `a/b/c` |
//! | `a/+/c` | `a/x/c`, `a//c` | `a/c`, `a/x/y/c` |
//! | `a/#` | `a`, `a/b`, `a/b/c` | `ab` |
//! | `#` | `a`, `a/b` | `$presence/a`, `$aws/a` |
//! | `+/a` | `x/a` | `$aws/a` |
//! | `$aws/#` | `$aws/things/1` | `aws/things/1` |
//! | `$aws/+/1` | `$aws/things/1` | `$gcp/things/1` |
//! | `$presence/#` | `$presence/a` | `a` |
//!
//! [`TopicTrie`] is the only matcher in the gateway: every protocol's
//! subscriptions live in one trie, so a filter means the same everywhere.

use std::collections::HashMap;

use switchboard_proto::ErrorCode;
use switchboard_protocols::port::CoreError;

/// Longest channel name or filter, in bytes.
pub const MAX_NAME_LEN: usize = 256;

/// Prefix of the reserved presence channels.
pub const PRESENCE_PREFIX: &str = "$presence/";

/// Why a name or filter is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Zero bytes.
    #[error("must not be empty")]
    Empty,
    /// Over [`MAX_NAME_LEN`] bytes.
    #[error("longer than {MAX_NAME_LEN} bytes")]
    TooLong,
    /// Contains NUL.
    #[error("must not contain NUL")]
    Nul,
    /// A wildcard in a channel name.
    #[error("a channel name must not contain '+' or '#'")]
    Wildcard,
    /// A wildcard not alone in its level, or `#` not last.
    #[error("'+' and '#' must fill a whole level, and '#' must be the last level")]
    MisplacedWildcard,
}

fn check_common(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    if name.contains('\0') {
        return Err(NameError::Nul);
    }
    Ok(())
}

/// Checks a concrete channel name (reserved names included).
pub fn validate_channel(name: &str) -> Result<(), NameError> {
    check_common(name)?;
    if name.contains(['+', '#']) {
        return Err(NameError::Wildcard);
    }
    Ok(())
}

/// Checks a subscription filter.
pub fn validate_filter(filter: &str) -> Result<(), NameError> {
    check_common(filter)?;
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        match level {
            "+" => {}
            "#" if last => {}
            l if l.contains(['+', '#']) => return Err(NameError::MisplacedWildcard),
            _ => {}
        }
    }
    Ok(())
}

pub use switchboard_proto::topic::{SHARE_PREFIX, parse_shared};

/// Checks a filter that may be a shared subscription: the group is one
/// non-empty level without wildcards, the rest a valid filter.
pub fn validate_subscription(filter: &str) -> Result<(), NameError> {
    match filter.strip_prefix(SHARE_PREFIX) {
        None => validate_filter(filter),
        Some(rest) => {
            let (group, inner) = rest.split_once('/').ok_or(NameError::Empty)?;
            if group.is_empty() {
                return Err(NameError::Empty);
            }
            if group.contains(['+', '#']) {
                return Err(NameError::MisplacedWildcard);
            }
            validate_filter(inner)
        }
    }
}

/// True for a name or filter without wildcards.
pub fn is_concrete(filter: &str) -> bool {
    !filter.contains(['+', '#'])
}

pub use switchboard_proto::topic::{RESERVED_LEVELS, is_reserved};

/// The refusal of a publish (or presence) on a reserved name.
pub fn reserved_error(name: &str) -> CoreError {
    CoreError::new(
        ErrorCode::ReservedChannel,
        format!("channel {name:?} is reserved for the gateway (first level $SYS, $share or $presence)"),
    )
}

/// The presence channel of `channel` (`chat` → `$presence/chat`).
pub fn presence_channel(channel: &str) -> String {
    format!("{PRESENCE_PREFIX}{channel}")
}

pub use switchboard_proto::topic::filter_matches;

/// Validation failures as the core's protocol-level error.
pub fn channel_error(name: &str, e: NameError) -> CoreError {
    CoreError::new(ErrorCode::InvalidChannel, format!("invalid channel name {name:?}: {e}"))
}

/// Filter validation failures as the core's protocol-level error.
pub fn filter_error(filter: &str, e: NameError) -> CoreError {
    CoreError::new(ErrorCode::InvalidFilter, format!("invalid filter {filter:?}: {e}"))
}

/// Subscriptions by filter: maps each channel to the subscribers whose
/// filters match it. `V` is what a subscriber stores (e.g. its outbox).
#[derive(Debug)]
pub struct TopicTrie<K, V> {
    root: Node<K, V>,
    len: usize,
}

#[derive(Debug)]
struct Node<K, V> {
    children: HashMap<Box<str>, Node<K, V>>,
    plus: Option<Box<Node<K, V>>>,
    /// Subscribers whose filter ends with `#` at this level.
    hash: HashMap<K, V>,
    /// Subscribers whose filter ends exactly here.
    exact: HashMap<K, V>,
}

impl<K, V> Default for Node<K, V> {
    fn default() -> Self {
        Node { children: HashMap::new(), plus: None, hash: HashMap::new(), exact: HashMap::new() }
    }
}

impl<K, V> Node<K, V> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.plus.is_none() && self.hash.is_empty() && self.exact.is_empty()
    }
}

impl<K: std::hash::Hash + Eq + Copy, V> Default for TopicTrie<K, V> {
    fn default() -> Self {
        TopicTrie { root: Node::default(), len: 0 }
    }
}

impl<K: std::hash::Hash + Eq + Copy, V> TopicTrie<K, V> {
    /// An empty trie.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of (filter, key) entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if nothing is subscribed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds or replaces `key`'s subscription to a validated `filter`.
    pub fn insert(&mut self, filter: &str, key: K, value: V) {
        let mut node = &mut self.root;
        let mut levels = filter.split('/').peekable();
        while let Some(level) = levels.next() {
            if level == "#" && levels.peek().is_none() {
                if node.hash.insert(key, value).is_none() {
                    self.len += 1;
                }
                return;
            }
            node = if level == "+" {
                node.plus.get_or_insert_with(Default::default)
            } else {
                node.children.entry(level.into()).or_default()
            };
        }
        if node.exact.insert(key, value).is_none() {
            self.len += 1;
        }
    }

    /// Removes `key`'s subscription to `filter`; true if it existed.
    pub fn remove(&mut self, filter: &str, key: K) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = Self::remove_at(&mut self.root, &levels, key);
        if removed {
            self.len -= 1;
        }
        removed
    }

    fn remove_at(node: &mut Node<K, V>, levels: &[&str], key: K) -> bool {
        let Some((&level, rest)) = levels.split_first() else {
            return node.exact.remove(&key).is_some();
        };
        if level == "#" && rest.is_empty() {
            return node.hash.remove(&key).is_some();
        }
        if level == "+" {
            let Some(child) = node.plus.as_deref_mut() else { return false };
            let removed = Self::remove_at(child, rest, key);
            if child.is_empty() {
                node.plus = None;
            }
            removed
        } else {
            let Some(child) = node.children.get_mut(level) else { return false };
            let removed = Self::remove_at(child, rest, key);
            if child.is_empty() {
                node.children.remove(level);
            }
            removed
        }
    }

    /// Every filter with at least one subscription, once each.
    pub fn filters(&self) -> Vec<String> {
        let mut out = Vec::new();
        Self::collect(&self.root, &mut Vec::new(), &mut out);
        out
    }

    fn collect<'a>(node: &'a Node<K, V>, path: &mut Vec<&'a str>, out: &mut Vec<String>) {
        let joined = |path: &[&str], last: Option<&str>| path.iter().copied().chain(last).collect::<Vec<_>>().join("/");
        if !node.exact.is_empty() && !path.is_empty() {
            out.push(joined(path, None));
        }
        if !node.hash.is_empty() {
            out.push(joined(path, Some("#")));
        }
        for (level, child) in &node.children {
            path.push(level);
            Self::collect(child, path, out);
            path.pop();
        }
        if let Some(child) = node.plus.as_deref() {
            path.push("+");
            Self::collect(child, path, out);
            path.pop();
        }
    }

    /// Calls `f` for every subscription matching the concrete `channel`. A
    /// key subscribed through several matching filters is visited once per
    /// filter; callers that deliver once per key dedupe.
    pub fn for_each_match<'a>(&'a self, channel: &str, mut f: impl FnMut(&'a K, &'a V)) {
        let levels: Vec<&str> = channel.split('/').collect();
        Self::walk(&self.root, &levels, channel.starts_with('$'), &mut f);
    }

    fn walk<'a>(node: &'a Node<K, V>, levels: &[&str], first_dollar: bool, f: &mut impl FnMut(&'a K, &'a V)) {
        // MQTT §4.7.2: wildcards at the first level never match `$` names.
        if !first_dollar {
            node.hash.iter().for_each(|(k, v)| f(k, v));
        }
        let Some((&level, rest)) = levels.split_first() else {
            node.exact.iter().for_each(|(k, v)| f(k, v));
            return;
        };
        if let Some(child) = node.children.get(level) {
            Self::walk(child, rest, false, f);
        }
        if !first_dollar && let Some(child) = node.plus.as_deref() {
            Self::walk(child, rest, false, f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names() {
        assert_eq!(validate_channel("a/b"), Ok(()));
        assert_eq!(validate_channel("a//b"), Ok(()));
        assert_eq!(validate_channel("$presence/a"), Ok(()));
        assert_eq!(validate_channel(""), Err(NameError::Empty));
        assert_eq!(validate_channel(&"x".repeat(257)), Err(NameError::TooLong));
        assert_eq!(validate_channel(&"x".repeat(256)), Ok(()));
        assert_eq!(validate_channel("a\0b"), Err(NameError::Nul));
        assert_eq!(validate_channel("a/+"), Err(NameError::Wildcard));
        assert_eq!(validate_channel("a/#"), Err(NameError::Wildcard));
    }

    #[test]
    fn reserved_names() {
        for yes in ["$SYS/x", "$sys", "$share/g/a", "$presence/a", "$PRESENCE/a"] {
            assert!(is_reserved(yes), "{yes}");
        }
        for no in ["$aws/things/1", "$TopicA/B", "a/$SYS", "$SYSTEM"] {
            assert!(!is_reserved(no), "{no}");
            assert_eq!(validate_channel(no), Ok(()), "{no}");
        }
    }

    #[test]
    fn shared_subscriptions() {
        assert_eq!(parse_shared("$share/g/a/+"), Some(("g", "a/+")));
        assert_eq!(parse_shared("a/b"), None);
        assert_eq!(validate_subscription("$share/g/a/#"), Ok(()));
        assert!(validate_subscription("$share//a").is_err());
        assert!(validate_subscription("$share/g").is_err());
        assert!(validate_subscription("$share/g+/a").is_err());
        assert!(validate_subscription("$share/g/a/#/b").is_err());
    }

    #[test]
    fn filters() {
        for ok in ["a", "a/+/c", "a/#", "#", "+", "+/+", "$presence/#", "a//+"] {
            assert_eq!(validate_filter(ok), Ok(()), "{ok}");
        }
        for bad in ["a/#/c", "a/b#", "a+/b", "##", "a/+x", ""] {
            assert!(validate_filter(bad).is_err(), "{bad}");
        }
    }

    /// The table in the module docs, checked against both matchers.
    #[test]
    fn matching_table() {
        let cases: &[(&str, &[&str], &[&str])] = &[
            ("a/b", &["a/b"], &["a", "a/b/c"]),
            ("a/+/c", &["a/x/c", "a//c"], &["a/c", "a/x/y/c"]),
            ("a/#", &["a", "a/b", "a/b/c"], &["ab", "b/a"]),
            ("#", &["a", "a/b", "/"], &["$presence/a", "$aws/a", "$"]),
            ("+", &["a", ""], &["a/b", "$x"]),
            ("+/b", &["a/b", "/b"], &["$presence/b", "$aws/b"]),
            ("+/a", &["x/a"], &["$aws/a"]),
            ("$aws/#", &["$aws", "$aws/things/1"], &["aws/things/1", "$gcp/x"]),
            ("$aws/+/1", &["$aws/things/1"], &["$gcp/things/1", "$aws/things/2"]),
            ("$presence/#", &["$presence/a", "$presence/a/b"], &["a"]),
            ("$presence/+", &["$presence/a"], &["$presence/a/b"]),
        ];
        for (filter, yes, no) in cases {
            let mut trie = TopicTrie::new();
            trie.insert(filter, 1u64, ());
            for ch in *yes {
                assert!(filter_matches(filter, ch), "{filter} should match {ch}");
                let mut n = 0;
                trie.for_each_match(ch, |_, _| n += 1);
                assert_eq!(n, 1, "trie: {filter} should match {ch}");
            }
            for ch in *no {
                assert!(!filter_matches(filter, ch), "{filter} should not match {ch}");
                let mut n = 0;
                trie.for_each_match(ch, |_, _| n += 1);
                assert_eq!(n, 0, "trie: {filter} should not match {ch}");
            }
        }
    }

    #[test]
    fn insert_remove_and_prune() {
        let mut trie = TopicTrie::new();
        trie.insert("a/+/c", 1u64, "x");
        trie.insert("a/#", 2u64, "y");
        trie.insert("a/b/c", 3u64, "z");
        trie.insert("a/b/c", 3u64, "z2");
        assert_eq!(trie.len(), 3);
        let mut got = Vec::new();
        trie.for_each_match("a/b/c", |k, v| got.push((*k, *v)));
        got.sort();
        assert_eq!(got, vec![(1, "x"), (2, "y"), (3, "z2")]);
        trie.insert("#", 4u64, "w");
        trie.insert("/x", 4u64, "v");
        let mut filters = trie.filters();
        filters.sort();
        assert_eq!(filters, ["#", "/x", "a/#", "a/+/c", "a/b/c"]);
        assert!(trie.remove("#", 4));
        assert!(trie.remove("/x", 4));
        assert!(trie.remove("a/+/c", 1));
        assert!(!trie.remove("a/+/c", 1));
        assert!(trie.remove("a/#", 2));
        assert!(trie.remove("a/b/c", 3));
        assert!(trie.is_empty());
        assert!(trie.root.is_empty(), "empty nodes are pruned");
    }
}
