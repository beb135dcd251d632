//! Per-client event rate limit (`--client-rate-limit`). A browser write key
//! is public, so anyone can send with it; this caps what one client address
//! can put into the outbox. It counts events, not requests: a batch of 50
//! costs 50, so batching cannot be used to get around it.
//!
//! The state is governor's keyed GCRA limiter (one 8-byte cell per client).
//! Its memory is bounded: clients idle long enough to have a full burst
//! again are indistinguishable from new ones and are dropped by a sweep,
//! and if more than [`MAX_TRACKED`] clients are active at once the whole
//! state is started afresh rather than growing without end.

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

/// A client may spend this many seconds' worth of its rate at once.
pub const BURST_SECONDS: u32 = 10;
/// Most client addresses whose state is kept. 65,536 cells are a few MB.
pub const MAX_TRACKED: usize = 65_536;
/// Least time between two sweeps of idle clients: a sweep walks the whole
/// map, so a flood of new addresses must not trigger one per request.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The shared limiter of one `serve`.
pub struct ClientRateLimit {
    quota: Quota,
    burst: NonZeroU32,
    limiter: RwLock<DefaultKeyedRateLimiter<IpAddr>>,
    last_sweep: Mutex<Instant>,
}

impl std::fmt::Debug for ClientRateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientRateLimit")
            .field("burst", &self.burst)
            .field("tracked", &self.tracked())
            .finish()
    }
}

/// IPv6 clients are counted per /64: one host usually owns a whole /64 and
/// could otherwise take a fresh allowance from each of its addresses.
fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & (u128::MAX << 64)).into()),
        },
        v4 => v4,
    }
}

impl ClientRateLimit {
    /// `None` when the limit is off (0).
    pub fn new(events_per_second: u32) -> Option<ClientRateLimit> {
        let rate = NonZeroU32::new(events_per_second)?;
        let burst = rate.saturating_mul(NonZeroU32::new(BURST_SECONDS).expect("non-zero"));
        let quota = Quota::per_second(rate).allow_burst(burst);
        Some(ClientRateLimit {
            quota,
            burst,
            limiter: RwLock::new(RateLimiter::keyed(quota)),
            last_sweep: Mutex::new(Instant::now()),
        })
    }

    /// Spends `events` of `client`'s allowance, or says how long to wait.
    /// A batch larger than the whole burst costs the whole burst, so it
    /// passes once the client has been idle long enough and is never
    /// refused for ever.
    pub fn check(&self, client: IpAddr, events: usize) -> Result<(), Duration> {
        let cost = u32::try_from(events.max(1))
            .ok()
            .and_then(NonZeroU32::new)
            .map_or(self.burst, |n| n.min(self.burst));
        let verdict = {
            let limiter = self.limiter.read().unwrap_or_else(|e| e.into_inner());
            match limiter.check_key_n(&key(client), cost) {
                Ok(Ok(())) => Ok(()),
                Ok(Err(not_until)) => Err(not_until.wait_time_from(limiter.clock().now())),
                // cost <= burst: cannot happen; treat as allowed.
                Err(_) => Ok(()),
            }
        };
        self.maintain();
        verdict
    }

    /// Client addresses with state right now.
    pub fn tracked(&self) -> usize {
        self.limiter.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// At most once per [`SWEEP_EVERY`]: drops idle clients, and starts
    /// afresh when more than [`MAX_TRACKED`] are active at once.
    fn maintain(&self) {
        let Ok(mut last) = self.last_sweep.try_lock() else {
            return;
        };
        if last.elapsed() < SWEEP_EVERY {
            return;
        }
        *last = Instant::now();
        let limiter = self.limiter.read().unwrap_or_else(|e| e.into_inner());
        limiter.retain_recent();
        limiter.shrink_to_fit();
        let over = limiter.len() > MAX_TRACKED;
        drop(limiter);
        if over {
            metrics::counter!("client_rate_limit_resets_total").increment(1);
            tracing::warn!(
                max = MAX_TRACKED,
                "more client addresses active at once than the rate limiter tracks; its state starts afresh"
            );
            *self.limiter.write().unwrap_or_else(|e| e.into_inner()) =
                RateLimiter::keyed(self.quota);
        }
        metrics::gauge!("client_rate_limit_tracked").set(self.tracked() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(n.into())
    }

    #[test]
    fn off_when_zero() {
        assert!(ClientRateLimit::new(0).is_none());
    }

    #[test]
    fn counts_events_and_says_how_long_to_wait() {
        // 2 events/s, burst 20.
        let l = ClientRateLimit::new(2).unwrap();
        let a = ip(1);
        assert!(l.check(a, 15).is_ok());
        assert!(l.check(a, 5).is_ok());
        let wait = l.check(a, 1).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        // Another client is untouched.
        assert!(l.check(ip(2), 20).is_ok());
        // A batch larger than the burst costs the burst: refused now, but
        // not for ever (a fresh client passes with it).
        assert!(l.check(a, 1000).is_err());
        assert!(l.check(ip(3), 1000).is_ok());
    }

    #[test]
    fn ipv6_counts_per_64() {
        let l = ClientRateLimit::new(1).unwrap();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert!(l.check(a, 10).is_ok());
        assert!(l.check(b, 1).is_err());
        assert!(l.check("2001:db8:1:3::1".parse().unwrap(), 1).is_ok());
    }

    #[test]
    fn memory_is_bounded_whatever_the_number_of_clients() {
        let l = ClientRateLimit::new(1000).unwrap();
        for n in 0..(MAX_TRACKED as u32 + 50_000) {
            let _ = l.check(ip(n), 1);
            if n % 10_000 == 0 {
                // Let the sweep run as if a second had passed.
                *l.last_sweep.lock().unwrap() -= SWEEP_EVERY;
            }
        }
        *l.last_sweep.lock().unwrap() -= SWEEP_EVERY;
        let _ = l.check(ip(0), 1);
        assert!(l.tracked() <= MAX_TRACKED, "{}", l.tracked());
    }
}
