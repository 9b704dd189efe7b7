//! The MQTT topic-filter rule, as a pure function shared by every crate.
//!
//! The gateway's topic trie applies the same rule to many subscriptions at
//! once; this function answers it for one filter and one channel (config
//! rules, cursor checks, validation). Its table of examples lives with the
//! trie in the gateway's `channel` module, which tests both against it.

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

/// Prefix of MQTT 5 shared subscriptions: `$share/{group}/{filter}`.
pub const SHARE_PREFIX: &str = "$share/";

/// Splits a shared subscription `$share/{group}/{filter}` into group and
/// filter; `None` for any other filter. The one `$share/` parser: the
/// router, the engine and the MQTT front end all use it.
pub fn parse_shared(filter: &str) -> Option<(&str, &str)> {
    filter.strip_prefix(SHARE_PREFIX)?.split_once('/')
}
