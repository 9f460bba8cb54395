//! Calendar arithmetic for timestamps the proxy writes itself (access-log
//! `%START_TIME%`, certificate validity in the admin `/certs` page, health
//! check event logs), so that no crate needs a date library for UTC
//! formatting.
//!
//! The conversions are Howard Hinnant's `civil_from_days` /
//! `days_from_civil` algorithms on the proleptic Gregorian calendar; they
//! are exact for every `i64` day count a timestamp can produce.

use std::time::SystemTime;

/// The civil date `(year, month 1-12, day 1-31)` of `days` since
/// 1970-01-01.
///
/// ```
/// assert_eq!(mesh_core::time::civil_from_days(0), (1970, 1, 1));
/// assert_eq!(mesh_core::time::civil_from_days(-1), (1969, 12, 31));
/// ```
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (if month <= 2 { y + 1 } else { y }, month as u32, day as u32)
}

/// Days since 1970-01-01 of the civil date `y`-`m`-`d` (month 1-12).
///
/// ```
/// assert_eq!(mesh_core::time::days_from_civil(1970, 1, 1), 0);
/// assert_eq!(mesh_core::time::days_from_civil(2000, 3, 1), 11_017);
/// ```
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `t` as RFC 3339 in UTC with milliseconds (`2026-11-22T09:10:00.123Z`),
/// the way protobuf JSON and Envoy's default access log write timestamps.
/// A time before 1970 is written as 1970-01-01T00:00:00.000Z.
pub fn rfc3339_millis(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn civil_round_trips_across_leap_years_and_eras() {
        for days in (-800_000..800_000).step_by(7) {
            let (y, m, d) = civil_from_days(days);
            assert!((1..=12).contains(&m) && (1..=31).contains(&d));
            assert_eq!(days_from_civil(y, i64::from(m), i64::from(d)), days);
        }
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_779), (2026, 11, 22));
    }

    #[test]
    fn rfc3339_millis_formats_utc() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_338_600_123);
        assert_eq!(rfc3339_millis(t), "2026-11-22T09:10:00.123Z");
        let before = SystemTime::UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(rfc3339_millis(before), "1970-01-01T00:00:00.000Z");
    }
}
