//! Durations on the command line, for the server's flags and the clients' alike.

use std::time::Duration;

/// Parses a duration the way `humantime` does (`250us`, `2ms`, `1.5s`, `1m 30s`, `1h`), and also a bare `0`
/// (`humantime` wants a unit even there; `--max-batch-delay 0` is how users turn the delay off).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.parse::<f64>().is_ok_and(|v| v == 0.0) {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e} (e.g. 0, 250us, 2ms, 1.5s, 1m, 1h)"))
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn the_formats_users_write() {
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("0.0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("0ms").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("2ms").unwrap(), Duration::from_millis(2));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration(" 0.25ms ").unwrap(), Duration::from_micros(250));
        assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
        assert_eq!(parse_duration("250µs").unwrap(), Duration::from_micros(250));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5m").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1m 30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1.5s 2ms").unwrap(), Duration::from_millis(1502));
        assert_eq!(parse_duration("100ns").unwrap(), Duration::from_nanos(100));
    }

    #[test]
    fn what_is_refused() {
        for bad in ["", "5", "1.5", "fast", "s", "1.2.3s", "-1s", "1.5parsecs", ".", "0x", "99999999999999999999999h"] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.contains("invalid duration"), "{bad}: {err}");
        }
    }
}
