//! The gate in front of password checks: a per-source-address rate limit (token buckets in a
//! bounded table) and a limit on concurrent checks (argon2id is slow by design; unbounded, a
//! flood of CONNECTs with passwords would take every core). Owns the `rampart_password_*` metrics.
//! Time is an input, so the rate limit is tested without sleeping.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::telemetry::metrics;

/// Source addresses tracked at most; past it, idle entries are dropped first, then the least
/// recently refilled ones.
pub const MAX_TRACKED_SOURCES: usize = 65_536;

/// A password check refused because its source address started too many recently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many password checks from this address; retry in {retry_after:?}")]
pub struct RateLimited {
    /// When the source may try again.
    pub retry_after: Duration,
}

/// One source address's token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    /// When `tokens` was last brought up to date.
    refilled: Instant,
}

#[derive(Debug)]
pub struct PasswordGate {
    checks: Arc<Semaphore>,
    /// Tokens per second each source gains; 0: no rate limit.
    rate: f64,
    burst: f64,
    max_sources: usize,
    sources: Mutex<HashMap<IpAddr, Bucket>>,
}

/// A slot to run one password check in; the slot is freed when this is dropped.
#[derive(Debug)]
pub struct PasswordPermit {
    _permit: OwnedSemaphorePermit,
}

impl Drop for PasswordPermit {
    fn drop(&mut self) {
        metrics::password_checks_in_progress(-1);
    }
}

impl PasswordGate {
    /// `max_concurrent` checks at once (at least 1); each source address may start
    /// `per_source_per_minute` checks a minute on average and `burst` at once (0 per minute: no
    /// rate limit).
    pub fn new(max_concurrent: usize, per_source_per_minute: u32, burst: u32) -> PasswordGate {
        PasswordGate {
            checks: Arc::new(Semaphore::new(max_concurrent.max(1))),
            rate: f64::from(per_source_per_minute) / 60.0,
            burst: f64::from(burst.max(1)),
            max_sources: MAX_TRACKED_SOURCES,
            sources: Mutex::new(HashMap::new()),
        }
    }

    /// The same gate tracking at most `max_sources` source addresses (at least 1).
    pub fn with_max_sources(mut self, max_sources: usize) -> PasswordGate {
        self.max_sources = max_sources.max(1);
        self
    }

    /// Takes one of `source`'s tokens at `now`, or refuses (counted in
    /// `rampart_password_checks_rate_limited_total`) when it has none left.
    pub fn admit(&self, source: IpAddr, now: Instant) -> Result<(), RateLimited> {
        if self.rate == 0.0 {
            return Ok(());
        }
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if !sources.contains_key(&source) && sources.len() >= self.max_sources {
            self.evict(&mut sources, now);
        }
        let bucket = sources.entry(source).or_insert(Bucket { tokens: self.burst, refilled: now });
        self.refill(bucket, now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let retry_after = Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate);
        drop(sources);
        metrics::password_check_rate_limited();
        Err(RateLimited { retry_after })
    }

    /// Waits for a free check slot (counted in `rampart_password_check_waits_total` when all are
    /// busy); the check runs while the returned permit lives (`rampart_password_checks_in_progress`).
    pub async fn permit(&self) -> PasswordPermit {
        let permit = match self.checks.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                metrics::password_check_waited();
                self.checks.clone().acquire_owned().await.expect("the password check semaphore is never closed")
            }
        };
        metrics::password_checks_in_progress(1);
        PasswordPermit { _permit: permit }
    }

    /// Source addresses currently tracked.
    pub fn tracked_sources(&self) -> usize {
        self.sources.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The tokens `bucket` holds at `now` (no fewer than it has: time never runs backwards here).
    fn tokens_at(&self, bucket: &Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(bucket.refilled).as_secs_f64();
        (bucket.tokens + elapsed * self.rate).min(self.burst)
    }

    fn refill(&self, bucket: &mut Bucket, now: Instant) {
        bucket.tokens = self.tokens_at(bucket, now);
        bucket.refilled = bucket.refilled.max(now);
    }

    /// Makes room for a new source: drops every idle entry (bucket full again, so forgetting it
    /// changes nothing); if that frees less than an eighth of the table, also drops the least
    /// recently refilled entries down to seven eighths, so the next evictions are far apart.
    fn evict(&self, sources: &mut HashMap<IpAddr, Bucket>, now: Instant) {
        sources.retain(|_, bucket| self.tokens_at(bucket, now) < self.burst);
        let keep = self.max_sources - self.max_sources.div_ceil(8);
        if sources.len() > keep {
            let mut times: Vec<Instant> = sources.values().map(|b| b.refilled).collect();
            let excess = sources.len() - keep;
            let (_, cutoff, _) = times.select_nth_unstable(excess - 1);
            let cutoff = *cutoff;
            let mut removed = 0;
            sources.retain(|_, bucket| {
                let evict = removed < excess && bucket.refilled <= cutoff;
                removed += usize::from(evict);
                !evict
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn a_source_gets_its_burst_then_one_check_per_interval() {
        let gate = PasswordGate::new(1, 60, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            gate.admit(ip(1), t0).unwrap();
        }
        let refused = gate.admit(ip(1), t0).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(1));
        assert!(gate.admit(ip(1), t0 + Duration::from_millis(500)).is_err());
        gate.admit(ip(1), t0 + Duration::from_millis(1500)).unwrap();
        assert!(gate.admit(ip(1), t0 + Duration::from_millis(1600)).is_err());
        // Other sources have their own bucket.
        gate.admit(ip(2), t0).unwrap();
    }

    #[test]
    fn a_quiet_source_gets_no_more_than_its_burst_back() {
        let gate = PasswordGate::new(1, 60, 2);
        let t0 = Instant::now();
        gate.admit(ip(1), t0).unwrap();
        gate.admit(ip(1), t0).unwrap();
        let later = t0 + Duration::from_secs(3600);
        gate.admit(ip(1), later).unwrap();
        gate.admit(ip(1), later).unwrap();
        assert!(gate.admit(ip(1), later).is_err());
    }

    #[test]
    fn time_going_backwards_takes_no_tokens_and_gives_none() {
        let gate = PasswordGate::new(1, 60, 1);
        let t0 = Instant::now() + Duration::from_secs(10);
        gate.admit(ip(1), t0).unwrap();
        assert!(gate.admit(ip(1), t0 - Duration::from_secs(5)).is_err());
        gate.admit(ip(1), t0 + Duration::from_secs(1)).unwrap();
    }

    #[test]
    fn zero_per_minute_turns_the_rate_limit_off() {
        let gate = PasswordGate::new(1, 0, 0);
        let t0 = Instant::now();
        for _ in 0..1000 {
            gate.admit(ip(1), t0).unwrap();
        }
        assert_eq!(gate.tracked_sources(), 0);
    }

    #[test]
    fn the_table_stays_bounded_and_idle_sources_go_first() {
        let gate = PasswordGate::new(1, 60, 2).with_max_sources(16);
        let t0 = Instant::now();
        for i in 1..=15 {
            gate.admit(ip(i), t0).unwrap();
        }
        // A busy source: it has used its burst recently and must stay limited.
        let busy_at = t0 + Duration::from_millis(1500);
        gate.admit(ip(0), busy_at).unwrap();
        gate.admit(ip(0), busy_at).unwrap();
        assert_eq!(gate.tracked_sources(), 16);
        // Two seconds in, the one-shot sources have their burst back: forgetting them loses nothing.
        let t1 = t0 + Duration::from_secs(2);
        gate.admit(ip(100), t1).unwrap();
        assert_eq!(gate.tracked_sources(), 2);
        assert!(gate.admit(ip(0), t1).is_err(), "the busy source kept its bucket");
    }

    #[test]
    fn a_table_full_of_busy_sources_drops_the_oldest_eighth() {
        let gate = PasswordGate::new(1, 1, 1).with_max_sources(16);
        let t0 = Instant::now();
        for i in 0..16u8 {
            gate.admit(ip(i), t0 + Duration::from_millis(u64::from(i))).unwrap();
        }
        let now = t0 + Duration::from_millis(100);
        gate.admit(ip(200), now).unwrap();
        assert_eq!(gate.tracked_sources(), 14 + 1);
        // The two oldest were forgotten (fresh buckets), the newer ones are still limited.
        gate.admit(ip(0), now).unwrap();
        assert!(gate.admit(ip(15), now).is_err());
        for i in 0..100u8 {
            let _ = gate.admit(IpAddr::from([10, 1, 0, i]), now);
            assert!(gate.tracked_sources() <= 16);
        }
    }

    #[tokio::test]
    async fn permits_bound_concurrent_checks() {
        let gate = Arc::new(PasswordGate::new(2, 0, 0));
        let a = gate.permit().await;
        let _b = gate.permit().await;
        let waiting = tokio::spawn({
            let gate = gate.clone();
            async move { gate.permit().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "a third check waits");
        drop(a);
        tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap();
    }
}
