//! Channel names as NATS subject tokens and KV keys.
//!
//! A channel's levels (`/`-separated) become subject tokens (`.`-separated).
//! Bytes outside `[A-Za-z0-9_-]` are written `=HH` (upper-case hex) and an
//! empty level is `=` alone, so every token is non-empty, carries no
//! wildcard or separator, and is also a valid JetStream KV key token. The
//! mapping is one-to-one, so every node computes the same subject for a
//! channel and reads the channel back from a subject.

use std::fmt::Write;

/// One level as a token.
fn escape_level(level: &str, out: &mut String) {
    if level.is_empty() {
        out.push('=');
        return;
    }
    for b in level.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            let _ = write!(out, "={b:02X}");
        }
    }
}

/// Any string as one token (`/` escaped too).
pub fn token(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    escape_level(s, &mut out);
    out
}

/// `channel`'s tokens, joined by `.` (no root).
pub fn tokens(channel: &str) -> String {
    let mut out = String::with_capacity(channel.len() + 8);
    for (i, level) in channel.split('/').enumerate() {
        if i > 0 {
            out.push('.');
        }
        escape_level(level, &mut out);
    }
    out
}

/// The channel whose tokens are `tokens`; `None` if they are not this
/// module's encoding.
pub fn channel(tokens: &str) -> Option<String> {
    let mut raw = Vec::with_capacity(tokens.len());
    for (i, token) in tokens.split('.').enumerate() {
        if i > 0 {
            raw.push(b'/');
        }
        if token == "=" {
            continue;
        }
        let b = token.as_bytes();
        let mut j = 0;
        while j < b.len() {
            match b[j] {
                b'=' => {
                    let hex = std::str::from_utf8(b.get(j + 1..j + 3)?).ok()?;
                    raw.push(u8::from_str_radix(hex, 16).ok()?);
                    j += 3;
                }
                c if c.is_ascii_alphanumeric() || c == b'_' || c == b'-' => {
                    raw.push(c);
                    j += 1;
                }
                _ => return None,
            }
        }
    }
    String::from_utf8(raw).ok()
}

/// NATS subject filters covering an MQTT filter under `root`: `+` is `*`,
/// a trailing `#` is `>` plus the level above it (MQTT's `a/#` matches `a`).
/// They may cover more than the filter (MQTT's `$` rule): callers check
/// each channel with the gateway's matcher.
pub fn filter_subjects(root: &str, filter: &str) -> Vec<String> {
    let levels: Vec<&str> = filter.split('/').collect();
    let mut out = String::from(root);
    let mut parent = None;
    for (i, level) in levels.iter().enumerate() {
        match *level {
            "#" => {
                parent = (i > 0).then(|| out.clone());
                out.push_str(".>");
            }
            "+" => out.push_str(".*"),
            l => {
                out.push('.');
                escape_level(l, &mut out);
            }
        }
    }
    let mut subjects = vec![out];
    subjects.extend(parent);
    subjects
}

/// Whether every subject the NATS subject filter `b` matches is one `a`
/// matches too (`a.*` covers `a.b` and `a.*`; `a.>` covers `a.b.c`).
pub fn covers(a: &str, b: &str) -> bool {
    let (mut a, mut b) = (a.split('.'), b.split('.'));
    loop {
        match (a.next(), b.next()) {
            (None, None) => return true,
            (Some(">"), Some(_)) => return true,
            (Some(_), Some(">")) => return false,
            (Some("*"), Some(_)) => {}
            (Some(x), Some(y)) if x == y => {}
            _ => return false,
        }
    }
}

/// Whether some subject matches both filters (what NATS refuses among one
/// consumer's filters).
pub fn overlap(a: &str, b: &str) -> bool {
    let (mut a, mut b) = (a.split('.'), b.split('.'));
    loop {
        match (a.next(), b.next()) {
            (None, None) => return true,
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some("*"), Some(_)) | (Some(_), Some("*")) => {}
            (Some(x), Some(y)) if x == y => {}
            _ => return false,
        }
    }
}

/// Whether `filter` has a wildcard token.
pub fn is_wildcard(filter: &str) -> bool {
    filter.split('.').any(|t| t == "*" || t == ">")
}

/// `filters` without those another one covers (and without repeats),
/// sorted; `None` when two that remain still overlap. Literal subjects
/// only meet wildcards (two literals overlap only when equal), so the cost
/// is a sort of the literals plus the wildcards against each other.
pub fn disjoint(filters: Vec<String>) -> Option<Vec<String>> {
    let (mut wild, mut literal): (Vec<String>, Vec<String>) = filters.into_iter().partition(|f| is_wildcard(f));
    wild.sort();
    wild.dedup();
    // Wider filters first (fewer tokens, `>`), so narrower ones meet what
    // covers them.
    wild.sort_by_key(|f| (f.split('.').count(), !f.ends_with('>')));
    let mut kept: Vec<String> = Vec::with_capacity(wild.len());
    for f in wild {
        if kept.iter().any(|k| covers(k, &f)) {
            continue;
        }
        if kept.iter().any(|k| overlap(k, &f)) {
            // `a.>` after `a.*.c`, say: keep it only if it covers them all.
            kept.retain(|k| !covers(&f, k));
            if kept.iter().any(|k| overlap(k, &f)) {
                return None;
            }
        }
        kept.push(f);
    }
    literal.sort_unstable();
    literal.dedup();
    // A literal a wildcard does not cover does not overlap it either.
    literal.retain(|l| !kept.iter().any(|k| covers(k, l)));
    kept.extend(literal);
    kept.sort();
    Some(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_tokens() {
        for name in ["a", "a/b", "a//b", "/a", "a/", "$presence/x y", "é/ü.ö", "a-b_c/=", "a.b", "*", ">"] {
            let t = tokens(name);
            assert!(!t.split('.').any(str::is_empty), "{name:?} → {t:?} has an empty token");
            assert!(
                t.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-=.".contains(&b)),
                "{name:?} → {t:?} is not a KV key"
            );
            assert_eq!(channel(&t).as_deref(), Some(name), "{t:?}");
        }
        assert_ne!(tokens("a/b"), tokens("a.b"));
        assert_eq!(channel("a.=2"), None);
        assert_eq!(channel("a.*"), None);
    }

    #[test]
    fn filters_become_subject_filters() {
        assert_eq!(filter_subjects("r", "a/+/c"), ["r.a.*.c"]);
        assert_eq!(filter_subjects("r", "a/#"), ["r.a.>", "r.a"]);
        assert_eq!(filter_subjects("r", "#"), ["r.>"]);
        assert_eq!(filter_subjects("r", "a b/+"), ["r.a=20b.*"]);
    }

    #[test]
    fn filters_cover_and_overlap() {
        assert!(covers("r.a.*", "r.a.b"));
        assert!(covers("r.a.*", "r.a.*"));
        assert!(covers("r.>", "r.a.*.c"));
        assert!(covers("r.a.>", "r.a.b.c"));
        assert!(!covers("r.a.>", "r.a"));
        assert!(!covers("r.a.*", "r.a.>"));
        assert!(!covers("r.a.b", "r.a.*"));
        assert!(!covers("r.a", "r.a.b"));
        assert!(overlap("r.a.*", "r.*.b"));
        assert!(overlap("r.>", "r.a"));
        assert!(!overlap("r.a.*", "r.b.*"));
        assert!(!overlap("r.a", "r.a.b"));
        assert_eq!(
            disjoint(vec!["r.a.b".into(), "r.a.*".into(), "r.c".into(), "r.c".into()]).unwrap(),
            ["r.a.*", "r.c"]
        );
        assert_eq!(disjoint(vec!["r.a.*.c".into(), "r.a.>".into(), "r.a".into()]).unwrap(), ["r.a", "r.a.>"]);
        assert_eq!(disjoint(vec!["r.a.*".into(), "r.*.b".into()]), None);
    }
}
