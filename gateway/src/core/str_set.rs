//! A set of strings for per-session bookkeeping (filters held, presence
//! entered). A session usually holds a handful, and a `HashSet`'s smallest
//! table (four buckets and their control bytes, ~128 bytes of heap) plus its
//! 48 inline bytes cost more than the strings themselves, for every
//! connection. Up to [`SMALL`] elements live in an exactly sized vector
//! (searched linearly); beyond that, in a hash set.

use std::collections::HashSet;

/// Elements kept in the vector before the set becomes a hash set.
const SMALL: usize = 16;

/// A set of strings, small while it is small.
#[derive(Debug, Clone)]
pub enum StrSet {
    /// At most [`SMALL`] elements, capacity exactly the length.
    Few(Vec<String>),
    /// More than [`SMALL`] elements (it stays a hash set once it was one).
    Many(Box<HashSet<String>>),
}

impl Default for StrSet {
    fn default() -> Self {
        StrSet::Few(Vec::new())
    }
}

impl StrSet {
    /// An empty set (no allocation).
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `s` is in the set.
    pub fn contains(&self, s: &str) -> bool {
        match self {
            StrSet::Few(v) => v.iter().any(|x| x == s),
            StrSet::Many(h) => h.contains(s),
        }
    }

    /// Adds `s`; `false` if it was there already.
    pub fn insert(&mut self, s: String) -> bool {
        match self {
            StrSet::Few(v) => {
                if v.contains(&s) {
                    return false;
                }
                if v.len() < SMALL {
                    // Grow by one: a doubling vector would keep up to
                    // twice the slots it needs, per session.
                    v.reserve_exact(1);
                    v.push(s);
                } else {
                    let mut h: HashSet<String> = v.drain(..).collect();
                    h.insert(s);
                    *self = StrSet::Many(Box::new(h));
                }
                true
            }
            StrSet::Many(h) => h.insert(s),
        }
    }

    /// Removes `s`; `false` if it was not there.
    pub fn remove(&mut self, s: &str) -> bool {
        match self {
            StrSet::Few(v) => match v.iter().position(|x| x == s) {
                Some(i) => {
                    v.swap_remove(i);
                    v.shrink_to_fit();
                    true
                }
                None => false,
            },
            StrSet::Many(h) => h.remove(s),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            StrSet::Few(v) => v.len(),
            StrSet::Many(h) => h.len(),
        }
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements, in no particular order.
    pub fn iter(&self) -> Iter<'_> {
        match self {
            StrSet::Few(v) => Iter::Few(v.iter()),
            StrSet::Many(h) => Iter::Many(h.iter()),
        }
    }
}

/// An iterator over a [`StrSet`]'s elements.
pub enum Iter<'a> {
    /// Over the vector.
    Few(std::slice::Iter<'a, String>),
    /// Over the hash set.
    Many(std::collections::hash_set::Iter<'a, String>),
}

impl<'a> Iterator for Iter<'a> {
    type Item = &'a String;

    fn next(&mut self) -> Option<&'a String> {
        match self {
            Iter::Few(i) => i.next(),
            Iter::Many(i) => i.next(),
        }
    }
}

impl<'a> IntoIterator for &'a StrSet {
    type Item = &'a String;
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl IntoIterator for StrSet {
    type Item = String;
    type IntoIter = std::vec::IntoIter<String>;

    fn into_iter(self) -> Self::IntoIter {
        match self {
            StrSet::Few(v) => v.into_iter(),
            StrSet::Many(h) => h.into_iter().collect::<Vec<_>>().into_iter(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_as_a_set_on_both_sides_of_the_threshold() {
        let mut s = StrSet::new();
        assert!(s.is_empty());
        for i in 0..40 {
            assert!(s.insert(format!("f{i}")), "f{i} is new");
            assert!(!s.insert(format!("f{i}")), "f{i} twice");
            assert_eq!(s.len(), i + 1);
            assert_eq!(matches!(s, StrSet::Many(_)), i >= SMALL, "representation at {}", i + 1);
        }
        assert!(s.contains("f0") && s.contains("f39") && !s.contains("f40"));
        let mut all: Vec<&String> = s.iter().collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 40);
        for i in 0..40 {
            assert!(s.remove(&format!("f{i}")));
            assert!(!s.remove(&format!("f{i}")));
        }
        assert!(s.is_empty());
    }

    #[test]
    fn a_small_set_holds_exactly_its_elements() {
        let mut s = StrSet::new();
        s.insert("a".into());
        s.insert("b".into());
        s.insert("c".into());
        let StrSet::Few(v) = &s else { panic!("small") };
        assert_eq!(v.capacity(), 3, "no spare slots");
        assert!(s.remove("b"));
        let StrSet::Few(v) = &s else { panic!("small") };
        assert_eq!(v.capacity(), 2);
        let mut left: Vec<&String> = (&s).into_iter().collect();
        left.sort();
        assert_eq!(left, ["a", "c"]);
        let mut owned: Vec<String> = s.clone().into_iter().collect();
        owned.sort();
        assert_eq!(owned, ["a", "c"]);
        assert_eq!(std::mem::size_of::<StrSet>(), 24, "as small inline as a Vec");
    }
}
