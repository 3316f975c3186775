//! Latency samples and percentiles, and the send timestamp carried in each payload.

use std::time::{Duration, Instant};

/// Writes the time since `base` (in nanoseconds) into the first 8 bytes of `payload`.
pub fn stamp(payload: &mut [u8], base: Instant) {
    let nanos = base.elapsed().as_nanos() as u64;
    payload[..8].copy_from_slice(&nanos.to_le_bytes());
}

/// The one-way latency of a stamped payload, or `None` if it is too short to carry a stamp.
pub fn latency(payload: &[u8], base: Instant) -> Option<Duration> {
    let sent = u64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
    Some(base.elapsed().saturating_sub(Duration::from_nanos(sent)))
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Percentiles {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

/// Percentiles of `samples` (microseconds); sorts in place. Nearest-rank method.
pub fn percentiles(samples: &mut [u64]) -> Percentiles {
    if samples.is_empty() {
        return Percentiles::default();
    }
    samples.sort_unstable();
    let rank = |p: f64| samples[((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1];
    Percentiles { p50: rank(0.50), p99: rank(0.99), max: samples[samples.len() - 1] }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut samples: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(percentiles(&mut samples), Percentiles { p50: 50, p99: 99, max: 100 });
        assert_eq!(percentiles(&mut [7]), Percentiles { p50: 7, p99: 7, max: 7 });
        assert_eq!(percentiles(&mut []), Percentiles::default());
    }

    #[test]
    fn stamps_round_trip() {
        let base = Instant::now() - Duration::from_millis(5);
        let mut payload = [0u8; 16];
        stamp(&mut payload, base);
        std::thread::sleep(Duration::from_millis(2));
        let l = latency(&payload, base).unwrap();
        assert!(l >= Duration::from_millis(2) && l < Duration::from_secs(1), "{l:?}");
        assert_eq!(latency(&payload[..4], base), None);
    }
}
