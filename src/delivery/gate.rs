//! The destination gate: one per ChurnZero instance, shared by all workers.
//! A 429 or a run of failures closes it for a while so that retries never
//! storm a struggling endpoint; a success opens it again.

use super::retry::RetryPolicy;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Failures in a row before the whole pool pauses.
const FAILURES_BEFORE_PAUSE: u32 = 2;

pub struct Gate {
    policy: RetryPolicy,
    inner: Mutex<GateState>,
}

struct GateState {
    closed_until: Option<Instant>,
    consecutive_failures: u32,
}

impl Gate {
    pub fn new(policy: RetryPolicy) -> Gate {
        Gate {
            policy,
            inner: Mutex::new(GateState {
                closed_until: None,
                consecutive_failures: 0,
            }),
        }
    }

    /// Resolves when requests may be sent.
    pub async fn wait_open(&self) {
        loop {
            let until = self.inner.lock().expect("gate lock").closed_until;
            match until {
                Some(t) if t > Instant::now() => tokio::time::sleep_until(t).await,
                _ => return,
            }
        }
    }

    /// Whether a request may go now (no pause in force).
    pub fn is_open(&self) -> bool {
        let until = self.inner.lock().expect("gate lock").closed_until;
        until.is_none_or(|t| t <= Instant::now())
    }

    pub fn success(&self) {
        let mut s = self.inner.lock().expect("gate lock");
        s.consecutive_failures = 0;
        s.closed_until = None;
    }

    /// Records a retryable failure; returns how long the pool now pauses.
    pub fn failure(&self, status: Option<u16>, retry_after: Option<Duration>) -> Duration {
        let mut s = self.inner.lock().expect("gate lock");
        s.consecutive_failures += 1;
        let pause = if status == Some(429) || retry_after.is_some() {
            retry_after
                .unwrap_or(self.policy.initial)
                .min(self.policy.max)
        } else if s.consecutive_failures >= FAILURES_BEFORE_PAUSE {
            // Half the ceiling: the pool probes well before single events retry.
            self.policy
                .ceiling(s.consecutive_failures - FAILURES_BEFORE_PAUSE + 1)
                / 2
        } else {
            Duration::ZERO
        };
        if !pause.is_zero() {
            let until = Instant::now() + pause;
            s.closed_until = Some(s.closed_until.map_or(until, |t| t.max(until)));
            metrics::counter!("churnzero_pauses_total").increment(1);
        }
        pause
    }
}
