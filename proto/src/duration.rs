//! The one duration syntax of the gateway: config values, `rewind=` query
//! parameters and MQTT `rewind` user properties, CLI flags.
//!
//! `humantime` parses the units (`500ms`, `10s`, `2m`, `1h`, `1d`, and
//! combinations such as `1h 30m`); a bare number is seconds. Written by hand
//! it was three parsers with three sets of units; this is one.

use std::time::Duration;

/// Parses a duration: a bare number of seconds (`3`, `0.5`) or humantime
/// units (`500ms`, `10s`, `2m`, `1h`, `1d`, `1h 30m`).
///
/// | text | duration |
/// |---|---|
/// | `500ms` | 0.5 s |
/// | `10s`, `10` | 10 s |
/// | `2m` | 120 s |
/// | `1h 30m` | 5 400 s |
/// | `1d` | 86 400 s |
/// | `2w` | 14 days |
/// | `x`, `-1s`, `10 parsecs` | error |
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return t
            .parse::<f64>()
            .ok()
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .ok_or_else(|| format!("bad duration {text:?}"));
    }
    humantime::parse_duration(t).map_err(|e| format!("bad duration {text:?} ({e}; use e.g. 500ms, 10s, 2m, 1h, 1d)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("2w"), Ok(Duration::from_secs(14 * 86_400)));
        for bad in ["x", "-1s", "10 parsecs", "", "1e999"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
