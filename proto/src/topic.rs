//! The MQTT topic-filter rule and the gateway's reserved names, as pure
//! functions shared by every crate.
//!
//! The gateway's topic trie applies the same rule to many subscriptions at
//! once; [`filter_matches`] answers it for one filter and one channel (config
//! rules, cursor checks, validation). [`is_reserved`] is the one answer to
//! "is this name the gateway's own", asked by the core and by the MQTT front
//! end (which refuses a reserved PUBLISH topic itself). The tables of
//! examples live with the trie in the gateway's `channel` module, which
//! tests both against them.

/// Whether MQTT filter `filter` matches concrete `channel`: `+` is exactly
/// one level, `#` (last) is the level above and everything below, and a
/// filter starting with a wildcard never matches a `$` channel.
pub fn filter_matches(filter: &str, channel: &str) -> bool {
    if channel.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut f = filter.split('/');
    let mut c = channel.split('/');
    loop {
        match (f.next(), c.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(cl)) if fl == cl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// First topic levels reserved for the gateway: `$SYS` (broker status, by
/// MQTT convention), `$share` (MQTT 5 shared subscriptions) and `$presence`
/// (presence events). Compared without regard to ASCII case, so `$sys/x`
/// is as reserved as `$SYS/x`. Every other `$` name (`$aws/things/1`,
/// `$devices/x`) is an ordinary channel, except that a filter starting
/// with a wildcard does not match it (MQTT 3.1.1 and 5 §4.7.2).
pub const RESERVED_LEVELS: [&str; 3] = ["$SYS", "$share", "$presence"];

/// Whether `name` (a channel name or a filter) lies under one of the
/// [`RESERVED_LEVELS`]: its first level is one of them.
///
/// | name | reserved |
/// |---|---|
/// | `$SYS/broker/uptime`, `$sys/x`, `$SYS` | yes |
/// | `$share/g/a`, `$presence/chat` | yes |
/// | `$aws/things/1`, `$SYSTEM/x`, `$`, `a/$SYS` | no |
pub fn is_reserved(name: &str) -> bool {
    let first = name.split('/').next().unwrap_or(name);
    first.starts_with('$') && RESERVED_LEVELS.iter().any(|r| r.eq_ignore_ascii_case(first))
}

/// Prefix of MQTT 5 shared subscriptions: `$share/{group}/{filter}`.
pub const SHARE_PREFIX: &str = "$share/";

/// Splits a shared subscription `$share/{group}/{filter}` into group and
/// filter; `None` for any other filter. The one `$share/` parser: the
/// router, the engine and the MQTT front end all use it.
pub fn parse_shared(filter: &str) -> Option<(&str, &str)> {
    filter.strip_prefix(SHARE_PREFIX)?.split_once('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table of [`is_reserved`].
    #[test]
    fn reserved_names() {
        for yes in ["$SYS/broker/uptime", "$sys/x", "$SYS", "$share/g/a", "$presence/chat", "$Presence/x"] {
            assert!(is_reserved(yes), "{yes}");
        }
        for no in ["$aws/things/1", "$SYSTEM/x", "$", "a/$SYS", "sys/x", "$sharex/a", ""] {
            assert!(!is_reserved(no), "{no}");
        }
    }
}
