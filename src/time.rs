//! XEP-0082 timestamps without a date library: the core only needs whole seconds in UTC.

/// Format Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_stamp(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Parse any XEP-0082 date-time (offsets and fractions included) into Unix seconds.
pub fn parse_stamp(text: &str) -> Option<i64> {
    let dt: xmpp_parsers::date::DateTime = text.parse().ok()?;
    Some(dt.0.timestamp())
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_round_trip() {
        assert_eq!(format_stamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_stamp(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_stamp(1_795_790_400), "2026-11-27T14:40:00Z");
        for t in [0, 86_399, 951_782_400, 1_795_800_000, 4_102_444_800] {
            assert_eq!(parse_stamp(&format_stamp(t)), Some(t));
        }
        assert_eq!(
            parse_stamp("2026-11-27T15:40:00.123+01:00"),
            Some(1_795_790_400)
        );
        assert_eq!(parse_stamp("yesterday"), None);
    }
}
