//! Pacing of new connections (`limits.accept_rate`, `limits.accept_burst`): one token bucket
//! shared by every listener. A reconnect storm — a fleet coming back after a node restart — then
//! waits in the kernel's accept queue and is let in at a steady rate, instead of starting
//! thousands of TLS handshakes at once that all miss their deadline. Time is an input, so the
//! bucket is tested without sleeping.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The shared bucket: `rate` connections a second on average, `burst` at once.
#[derive(Debug)]
pub struct AcceptPacer {
    rate: f64,
    burst: f64,
    /// Tokens left (negative: connections already promised a later turn) and when counted.
    bucket: Mutex<(f64, Instant)>,
}

impl AcceptPacer {
    /// A pacer for `rate` connections a second with bursts of `burst` (at least 1); `None` for
    /// rate 0 (no pacing).
    pub fn new(rate: u32, burst: u32, now: Instant) -> Option<AcceptPacer> {
        let burst = f64::from(burst.max(1));
        (rate > 0).then(|| AcceptPacer { rate: f64::from(rate), burst, bucket: Mutex::new((burst, now)) })
    }

    /// Takes the turn of a connection accepted at `now`: how long it waits before its handshake
    /// starts (zero while the bucket has tokens). Turns are handed out in order, one every
    /// `1 / rate` seconds once the burst is spent.
    pub fn turn(&self, now: Instant) -> Duration {
        let mut bucket = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, counted) = &mut *bucket;
        *tokens = (*tokens + now.saturating_duration_since(*counted).as_secs_f64() * self.rate).min(self.burst);
        *counted = now.max(*counted);
        *tokens -= 1.0;
        if *tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-*tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_goes_in_at_once_and_the_rest_one_per_interval() {
        let start = Instant::now();
        let pacer = AcceptPacer::new(100, 3, start).unwrap();
        let waits: Vec<Duration> = (0..6).map(|_| pacer.turn(start)).collect();
        assert_eq!(&waits[..3], [Duration::ZERO; 3], "the burst");
        for (n, wait) in waits[3..].iter().enumerate() {
            let expected = Duration::from_millis(10 * (n as u64 + 1));
            assert!(wait.abs_diff(expected) < Duration::from_micros(10), "turn {n}: {wait:?}, not {expected:?}");
        }
        // A second later the bucket is full again: the next burst goes in at once.
        assert_eq!(pacer.turn(start + Duration::from_secs(1)), Duration::ZERO);
    }

    #[test]
    fn rate_zero_does_not_pace() {
        assert!(AcceptPacer::new(0, 10, Instant::now()).is_none());
    }
}
