//! Wall-clock time as the broker records it: seconds since the Unix epoch (token expiry, audit
//! entries, connection times, stored session expiry), and monotonic instants turned into it and
//! back.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// `at` (within the process lifetime) as seconds since the Unix epoch.
pub fn to_unix(at: Instant) -> u64 {
    unix_now().max(0) as u64 + at.saturating_duration_since(Instant::now()).as_secs()
}

/// Seconds since the Unix epoch as an `Instant` (now, if they have passed).
pub fn from_unix(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs.saturating_sub(unix_now().max(0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_round_trip_through_unix_seconds() {
        let later = Instant::now() + Duration::from_secs(3600);
        let back = from_unix(to_unix(later));
        assert!(back.duration_since(Instant::now()) > Duration::from_secs(3598));
        assert!(from_unix(0) <= Instant::now(), "a time long past is now");
    }
}
