//! Per-address attempt limits for login and registration: a fixed
//! one-minute window per client address, in memory (one node's view).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);
/// Past this many tracked addresses, finished windows are swept.
const SWEEP_AT: usize = 10_000;

pub struct RateLimiter {
    /// Changeable while running (SIGHUP).
    per_window: AtomicU32,
    windows: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl RateLimiter {
    pub fn per_minute(per_window: u32) -> RateLimiter {
        RateLimiter {
            per_window: AtomicU32::new(per_window),
            windows: Mutex::new(HashMap::new()),
        }
    }

    pub fn set_per_minute(&self, per_window: u32) {
        self.per_window.store(per_window, Ordering::Relaxed);
    }

    /// Counts one attempt from `addr`; `Err(wait)` when over the limit.
    pub fn check(&self, addr: IpAddr) -> Result<(), Duration> {
        self.check_at(addr, Instant::now())
    }

    fn check_at(&self, addr: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if windows.len() >= SWEEP_AT {
            windows.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
        }
        let (start, count) = windows.entry(addr).or_insert((now, 0));
        if now.duration_since(*start) >= WINDOW {
            *start = now;
            *count = 0;
        }
        if *count >= self.per_window.load(Ordering::Relaxed) {
            return Err(WINDOW.saturating_sub(now.duration_since(*start)));
        }
        *count += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_each_address_per_window() {
        let limiter = RateLimiter::per_minute(2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        assert!(limiter.check_at(a, t0).is_ok());
        assert!(limiter.check_at(a, t0).is_ok());
        let wait = limiter
            .check_at(a, t0 + Duration::from_secs(10))
            .unwrap_err();
        assert_eq!(wait, Duration::from_secs(50));
        assert!(limiter.check_at(b, t0).is_ok(), "addresses are independent");
        assert!(limiter.check_at(a, t0 + WINDOW).is_ok(), "a new window");
    }
}
