//! Generates UNIQ_KEY message ids for messages that arrive without one, in the client format:
//! IP, pid, a per-process hash, milliseconds since the start of the month (UTC), counter.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::remoting::message::UniqKey;

pub struct UniqKeyGenerator {
    ip: IpAddr,
    pid: i16,
    process_hash: i32,
    counter: Mutex<i16>,
}

/// Milliseconds since 00:00 UTC on the first day of the current month.
fn millis_since_month_start(now_ms: i64) -> i32 {
    let days = now_ms.div_euclid(86_400_000);
    let millis_of_day = now_ms.rem_euclid(86_400_000);
    // Day of the month from days since the epoch (Howard Hinnant's civil_from_days).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day_of_month = day_of_year - (153 * month_index + 2) / 5; // 0-based
    i32::try_from(day_of_month * 86_400_000 + millis_of_day).unwrap_or(i32::MAX)
}

impl UniqKeyGenerator {
    pub fn new(ip: IpAddr) -> Self {
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Self {
            ip,
            pid: std::process::id() as i16,
            process_hash: (started as i64 ^ (started >> 64) as i64) as i32,
            counter: Mutex::new(0),
        }
    }

    pub fn next(&self) -> String {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let counter = {
            let mut counter = self
                .counter
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *counter = counter.wrapping_add(1);
            *counter
        };
        UniqKey {
            ip: self.ip,
            pid: self.pid,
            class_loader_hash: self.process_hash,
            millis_since_month_start: millis_since_month_start(now_ms),
            counter,
        }
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn month_start_arithmetic() {
        // 2026-11-21T05:45:00Z is 20 days and 5h45m into November.
        let now = 1_795_239_900_000;
        assert_eq!(
            millis_since_month_start(now),
            20 * 86_400_000 + (5 * 60 + 45) * 60_000
        );
        // 2024-03-01T00:00:00.001Z, just after a leap day.
        assert_eq!(millis_since_month_start(1_709_251_200_001), 1);
    }

    #[test]
    fn keys_are_distinct_and_parse() {
        let generator = UniqKeyGenerator::new("127.0.0.1".parse().expect("ip"));
        let a = generator.next();
        let b = generator.next();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.parse::<UniqKey>().is_ok());
    }
}
