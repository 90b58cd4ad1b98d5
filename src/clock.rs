//! Wall-clock time as keepd stores it: whole seconds since the Unix epoch
//! (a clock before 1970 reads as 0 rather than failing).

use std::time::{SystemTime, UNIX_EPOCH};

/// `t` in whole seconds since the epoch.
pub fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Now, in whole seconds since the epoch.
pub fn unix_now() -> u64 {
    unix_seconds(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn seconds_since_the_epoch() {
        assert_eq!(unix_seconds(UNIX_EPOCH + Duration::from_millis(1_999)), 1);
        assert_eq!(unix_seconds(UNIX_EPOCH - Duration::from_secs(5)), 0);
        assert!(unix_now() > 1_700_000_000);
    }
}
