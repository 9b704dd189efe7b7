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
}
