//! Exponential backoff for retries: a first delay, doubled after each
//! failure up to a ceiling, and the first again once things work. The
//! supervisor's Postgres restarts and the events listener's reconnects
//! both wait this way.

use std::time::Duration;

/// The delays between attempts: `first`, twice that, ... up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    /// How long to wait before this attempt; the next wait is twice as
    /// long, up to the ceiling.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = delay.saturating_mul(2).min(self.max);
        delay
    }

    /// It worked: the next wait is the first again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_ceiling_and_resets() {
        let ms = Duration::from_millis;
        let mut backoff = Backoff::new(ms(500), Duration::from_secs(30));
        let delays: Vec<Duration> = (0..9).map(|_| backoff.next_delay()).collect();
        assert_eq!(
            delays,
            [500, 1000, 2000, 4000, 8000, 16_000, 30_000, 30_000, 30_000].map(ms)
        );
        backoff.reset();
        assert_eq!(backoff.next_delay(), ms(500));
        assert_eq!(backoff.next_delay(), ms(1000));
        // No overflow however long it fails.
        let mut huge = Backoff::new(Duration::MAX / 2, Duration::MAX);
        for _ in 0..4 {
            assert!(huge.next_delay() >= Duration::MAX / 2);
        }
    }
}
