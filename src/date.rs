//! UTC calendar days, for quota periods and ledger rows. Small enough not to
//! need a date crate: days since the Unix epoch and back (Howard Hinnant's
//! civil-from-days algorithm).

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

/// A UTC calendar day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Day(i64);

impl Day {
    pub(crate) fn today() -> Day {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        Day(secs.div_euclid(86_400))
    }

    pub(crate) fn days(self) -> i64 {
        self.0
    }

    /// The day `days` days after 1970-01-01 (the inverse of [`Day::days`]).
    pub(crate) fn from_days(days: i64) -> Day {
        Day(days)
    }

    pub(crate) fn ymd(self) -> (i64, u32, u32) {
        let z = self.0 + 719_468;
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

    pub(crate) fn from_ymd(y: i64, m: u32, d: u32) -> Option<Day> {
        if !(1..=12).contains(&m) || d == 0 || d > days_in_month(y, m) {
            return None;
        }
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y.rem_euclid(400);
        let m = i64::from(m);
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        Some(Day(era * 146_097 + doe - 719_468))
    }

    /// Parses `YYYY-MM-DD`.
    pub(crate) fn parse(s: &str) -> Option<Day> {
        let b = s.as_bytes();
        if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
            return None;
        }
        let y = s[0..4].parse().ok()?;
        let m = s[5..7].parse().ok()?;
        let d = s[8..10].parse().ok()?;
        Day::from_ymd(y, m, d)
    }

    /// `YYYY-MM`, the key of a monthly quota period.
    pub(crate) fn month_key(self) -> String {
        let (y, m, _) = self.ymd();
        format!("{y:04}-{m:02}")
    }

    /// Seconds from now until this day ends (UTC), at least 1.
    pub(crate) fn seconds_left(self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        ((self.0 + 1) * 86_400 - now).max(1) as u64
    }

    pub(crate) fn next(self) -> Day {
        Day(self.0 + 1)
    }

    /// The first day of the next month.
    pub(crate) fn next_month_start(self) -> Day {
        let (y, m, _) = self.ymd();
        let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
        Day::from_ymd(y, m, 1).unwrap_or(Day(self.0 + 31))
    }
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

impl fmt::Display for Day {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m, d) = self.ymd();
        write!(f, "{y:04}-{m:02}-{d:02}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_across_leap_years_and_eras() {
        for days in -800_000..800_000i64 {
            let d = Day(days);
            let (y, m, dd) = d.ymd();
            assert_eq!(Day::from_ymd(y, m, dd), Some(d), "{days}");
        }
    }

    #[test]
    fn known_dates() {
        assert_eq!(Day(0).to_string(), "1970-01-01");
        assert_eq!(Day::parse("2026-11-24").unwrap().to_string(), "2026-11-24");
        assert_eq!(
            Day::parse("2024-02-29").unwrap().next().to_string(),
            "2024-03-01"
        );
        assert!(Day::parse("2025-02-29").is_none());
        assert!(Day::parse("2025-13-01").is_none());
        assert!(Day::parse("20251301").is_none());
        assert_eq!(Day::parse("2026-12-15").unwrap().month_key(), "2026-12");
        assert_eq!(
            Day::parse("2026-12-15")
                .unwrap()
                .next_month_start()
                .to_string(),
            "2027-01-01"
        );
    }
}
