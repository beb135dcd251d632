//! The retry schedule: exponential from `--retry-initial`, capped at
//! `--retry-max`, full jitter, `Retry-After` as a floor, and a budget after
//! which an event is dead. Pure: the clock and the random source come in as
//! arguments, so tests can pin them.

use std::time::Duration;

/// The three knobs of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
    pub budget: Duration,
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Try again at this time (ms since the epoch).
    At(i64),
    /// The budget is spent: the event is dead.
    Exhausted,
}

impl RetryPolicy {
    /// The upper bound of the jittered delay after `attempt` failures (1-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(40);
        let ceiling = self.initial.saturating_mul(1u32 << exp.min(31));
        if exp > 31 {
            self.max
        } else {
            ceiling.min(self.max)
        }
    }

    /// Full jitter: a uniform pick in `[0, ceiling]` (`unit` is in `[0, 1)`),
    /// never below `Retry-After` when the server gave one. The floor keeps a
    /// zero pick from retrying in the same instant.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>, unit: f64) -> Duration {
        let ceiling = self.ceiling(attempt);
        let jittered = ceiling.mul_f64(unit.clamp(0.0, 1.0));
        let floor = Duration::from_millis(10).min(ceiling);
        let d = jittered.max(floor);
        match retry_after {
            Some(ra) => d.max(ra.min(self.max.max(ra).min(Duration::from_secs(3600)))),
            None => d,
        }
    }

    /// When to try again, or that the budget (counted from the first
    /// attempt) is spent.
    pub fn decide(
        &self,
        now_ms: i64,
        first_attempt_ms: i64,
        attempt: u32,
        retry_after: Option<Duration>,
        unit: f64,
    ) -> RetryDecision {
        let deadline = first_attempt_ms.saturating_add(self.budget.as_millis() as i64);
        if now_ms >= deadline {
            return RetryDecision::Exhausted;
        }
        let at = now_ms.saturating_add(self.delay(attempt, retry_after, unit).as_millis() as i64);
        // The last try happens at the budget's end rather than never.
        RetryDecision::At(at.min(deadline))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(300),
            budget: Duration::from_secs(4 * 3600),
        }
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        let p = policy();
        let c: Vec<u64> = (1..=12).map(|a| p.ceiling(a).as_secs()).collect();
        assert_eq!(c, vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(p.ceiling(200), Duration::from_secs(300));
    }

    #[test]
    fn full_jitter_spans_zero_to_ceiling() {
        let p = policy();
        assert_eq!(p.delay(4, None, 0.5), Duration::from_secs(4));
        assert_eq!(p.delay(4, None, 0.999_999).as_millis(), 7999);
        assert_eq!(p.delay(4, None, 0.0), Duration::from_millis(10));
    }

    #[test]
    fn retry_after_is_a_floor() {
        let p = policy();
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(30)), 0.5),
            Duration::from_secs(30)
        );
        assert_eq!(
            p.delay(9, Some(Duration::from_secs(1)), 0.5),
            Duration::from_secs(128)
        );
    }

    #[test]
    fn budget_is_counted_from_the_first_attempt() {
        let p = policy();
        let first = 1_000_000;
        assert_eq!(
            p.decide(first + 1000, first, 1, None, 0.5),
            RetryDecision::At(first + 1500)
        );
        let late = first + 4 * 3600 * 1000 - 100;
        assert_eq!(
            p.decide(late, first, 15, None, 0.9),
            RetryDecision::At(first + 4 * 3600 * 1000)
        );
        assert_eq!(
            p.decide(first + 4 * 3600 * 1000, first, 16, None, 0.5),
            RetryDecision::Exhausted
        );
    }
}
