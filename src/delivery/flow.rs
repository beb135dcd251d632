//! Flow control toward ChurnZero: one place every request to `/i` passes,
//! real-time delivery and the audience sync lane alike.
//!
//! A request goes out when, in this order, the destination gate is open
//! (see [`Gate`]: a 429 or a run of failures pauses everyone), a
//! concurrency slot is free (the adaptive limit, at most `--workers`), and
//! the hard rate cap (`--max-actions-per-second`, this instance's share of
//! it) has tokens for its actions. Each attempt is timed alone and its
//! outcome feeds the limit ([`Aimd`]) and the gate.
//!
//! Real time goes first: the sync lane takes a slot only when no real-time
//! sender waits for one, and holds at most one, so a sync window of any
//! size delays a real-time request by at most one request's time.

use super::gate::Gate;
use super::retry::RetryPolicy;
use crate::churnzero::client::{ChurnZeroClient, SendOutcome};
use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Serialize;
use serde_json::{Map, Value};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Weight of the newest interval in the RTT baseline (as Vector's default).
const EWMA_ALPHA: f64 = 0.4;
/// An interval whose RTT is this many standard deviations above the
/// baseline counts as back-pressure.
const DEVIATION_SCALE: f64 = 2.5;
/// The limit after back-pressure, as a share of the limit before.
const DECREASE_RATIO: f64 = 0.9;
/// The least rise over the baseline that counts as back-pressure, as a
/// share of the baseline: with a steady service the deviation shrinks
/// towards zero and a microsecond of jitter would otherwise cut the limit.
const NOISE_FLOOR: f64 = 0.1;
/// How far above the baseline an interval's RTT may be and still count as
/// "not above it" for an increase: Vector's strict `<=` fails on about
/// half the intervals of a steady but noisy service.
const INCREASE_TOLERANCE: f64 = 0.05;

/// A mean and a variance, both exponentially weighted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ewma {
    pub mean: f64,
    pub variance: f64,
}

impl Ewma {
    fn update(this: &mut Option<Ewma>, x: f64) {
        match this {
            None => {
                *this = Some(Ewma {
                    mean: x,
                    variance: 0.0,
                })
            }
            Some(e) => {
                let diff = x - e.mean;
                let incr = EWMA_ALPHA * diff;
                e.mean += incr;
                e.variance = (1.0 - EWMA_ALPHA) * (e.variance + diff * incr);
            }
        }
    }
}

/// The adaptive concurrency decision, apart from any I/O: Vector's AIMD on
/// round-trip times against an EWMA baseline, with its known faults fixed.
/// Every input carries its time, so tests drive it with a made-up clock.
///
/// Once per interval (one baseline RTT long) it looks at the interval:
///
/// - an RTT above the baseline by more than 2.5 deviations (and at least
///   10%): a queue is building at ChurnZero; the limit is multiplied by 0.9
///   (at least 1);
/// - else, when senders wanted more than the limit during the interval and
///   its RTT was not above the baseline (within 5%): the limit grows by 1,
///   or doubles while below half the "recovery mark" (slow start).
///
/// Back-pressure (a 408, 429 or 5xx, a timeout) acts at once rather than at
/// the interval's end: the first in an interval multiplies the limit by
/// 0.9, each further one takes one slot off (not below half the limit the
/// interval began with). A refusal comes back in a millisecond, and a slot
/// it frees would otherwise go straight to another request that is
/// refused too, for the rest of the interval.
///
/// The baseline learns only from intervals without congestion (or at a
/// limit of 1, where no queue can be this sender's doing): fed the RTTs of
/// a queue it causes, it would take the queue for the service's normal
/// speed and the limit would climb until ChurnZero refuses requests.
///
/// The recovery mark is the limit the first decrease of a congestion
/// episode settled on: after an outage has cut the limit to 1, it climbs
/// back in a few intervals instead of one slot per interval. At start the
/// mark is the ceiling, so the first climb is quick too.
#[derive(Debug, Clone)]
pub struct Aimd {
    ceiling: usize,
    adaptive: bool,
    limit: usize,
    recover_to: usize,
    baseline: Option<Ewma>,
    window_rtt_sum: f64,
    window_samples: u32,
    window_back_pressure: bool,
    window_reached_limit: bool,
    /// The limit when the interval began, and whether back-pressure has
    /// cut it in this interval already.
    window_start_limit: usize,
    window_cut: bool,
    next_update: Option<Instant>,
    last_was_decrease: bool,
}

/// What one interval decided, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Increased,
    Decreased,
    Held,
}

impl Aimd {
    /// `ceiling` is `--workers`. Not adaptive: the limit stays at the
    /// ceiling and only the baseline is kept, for display.
    pub fn new(ceiling: usize, adaptive: bool) -> Aimd {
        let ceiling = ceiling.max(1);
        let limit = if adaptive { 1 } else { ceiling };
        Aimd {
            ceiling,
            adaptive,
            limit,
            recover_to: ceiling,
            baseline: None,
            window_rtt_sum: 0.0,
            window_samples: 0,
            window_back_pressure: false,
            window_reached_limit: false,
            window_start_limit: limit,
            window_cut: false,
            next_update: None,
            last_was_decrease: false,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn ceiling(&self) -> usize {
        self.ceiling
    }

    /// The RTT baseline in seconds, once there is one.
    pub fn baseline(&self) -> Option<Ewma> {
        self.baseline
    }

    /// A request started with `in_flight` requests now out (itself
    /// included): at the limit, the interval shows demand beyond it.
    pub fn started(&mut self, in_flight: usize) {
        if in_flight >= self.limit {
            self.window_reached_limit = true;
        }
    }

    /// Notes senders waiting for a slot: demand beyond the limit too.
    pub fn saw_waiting(&mut self) {
        self.window_reached_limit = true;
    }

    /// A request ended at `now`: `rtt` when the service answered it
    /// normally (that attempt alone), `back_pressure` when it pushed back.
    /// Returns what was decided when the limit changed or an interval
    /// ended here.
    pub fn finished(
        &mut self,
        now: Instant,
        rtt: Option<Duration>,
        back_pressure: bool,
    ) -> Option<Change> {
        if let Some(rtt) = rtt {
            self.window_rtt_sum += rtt.as_secs_f64();
            self.window_samples += 1;
        }
        let mut cut = None;
        if back_pressure {
            self.window_back_pressure = true;
            if self.adaptive && self.limit > 1 {
                if !self.window_cut {
                    self.decrease();
                    self.window_cut = true;
                    cut = Some(Change::Decreased);
                } else if self.limit > (self.window_start_limit / 2).max(1) {
                    self.limit -= 1;
                    cut = Some(Change::Decreased);
                }
            }
        }
        let current =
            (self.window_samples > 0).then(|| self.window_rtt_sum / self.window_samples as f64);
        let Some(past) = self.baseline else {
            // No baseline yet: the first measured interval sets it.
            if let Some(current) = current {
                Ewma::update(&mut self.baseline, current);
                self.next_update = Some(now + Duration::from_secs_f64(current));
                self.reset_window();
            }
            return cut;
        };
        if self.next_update.is_some_and(|t| now < t) {
            return cut;
        }
        let (change, healthy) = if self.adaptive {
            self.decide(past, current)
        } else {
            (Change::Held, true)
        };
        if let Some(current) = current {
            if healthy || self.limit == 1 {
                Ewma::update(&mut self.baseline, current);
            }
        }
        let mean = self.baseline.map_or(past.mean, |b| b.mean);
        self.next_update = Some(now + Duration::from_secs_f64(mean));
        self.reset_window();
        Some(cut.unwrap_or(change))
    }

    /// The end of an interval: the change, and whether the interval was
    /// free of congestion (so that its RTT may teach the baseline).
    fn decide(&mut self, past: Ewma, current: Option<f64>) -> (Change, bool) {
        if self.window_back_pressure {
            // Already cut when it came.
            self.last_was_decrease = true;
            return (Change::Held, false);
        }
        let allowance = (past.variance.sqrt() * DEVIATION_SCALE).max(past.mean * NOISE_FLOOR);
        if current.is_some_and(|c| c > past.mean + allowance) {
            if self.limit > 1 {
                self.decrease();
                return (Change::Decreased, false);
            }
            self.last_was_decrease = true;
            return (Change::Held, false);
        }
        let fast = current.is_some_and(|c| c <= past.mean * (1.0 + INCREASE_TOLERANCE));
        if fast && self.window_reached_limit && self.limit < self.ceiling {
            self.limit = if self.limit * 2 < self.recover_to {
                self.limit * 2
            } else {
                self.limit + 1
            }
            .min(self.ceiling);
            self.last_was_decrease = false;
            return (Change::Increased, true);
        }
        if current.is_some() {
            self.last_was_decrease = false;
        }
        (Change::Held, true)
    }

    fn decrease(&mut self) {
        let next = ((self.limit as f64 * DECREASE_RATIO) as usize).clamp(1, self.limit - 1);
        if !self.last_was_decrease {
            // The first cut of an episode: what to climb back to quickly.
            self.recover_to = next.max(1);
        }
        self.limit = next;
        self.last_was_decrease = true;
    }

    fn reset_window(&mut self) {
        self.window_rtt_sum = 0.0;
        self.window_samples = 0;
        self.window_back_pressure = false;
        self.window_reached_limit = false;
        self.window_start_limit = self.limit;
        self.window_cut = false;
    }
}

/// Who is sending: real-time delivery goes before the sync lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    RealTime,
    Sync,
}

/// Settings of [`FlowControl`] (from `serve`).
#[derive(Debug, Clone, Copy)]
pub struct FlowSettings {
    /// `--workers`: the most requests in flight.
    pub ceiling: usize,
    /// `--adaptive-concurrency`.
    pub adaptive: bool,
    /// `--max-actions-per-second` for all instances together; 0: none.
    pub max_actions_per_second: u32,
    /// For the gate's pauses.
    pub retry: RetryPolicy,
}

/// The flow figures of `/status` (`flow`), `/metrics` and the status page.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FlowStatus {
    pub adaptive: bool,
    /// Requests allowed in flight now.
    pub concurrency_limit: usize,
    /// `--workers`: what the limit never exceeds.
    pub concurrency_ceiling: usize,
    /// Requests out now (or holding a slot while the cap's tokens come).
    pub in_flight: usize,
    /// Of `in_flight`, sync lane requests (0 or 1).
    pub sync_in_flight: usize,
    /// Real-time senders waiting for a slot.
    pub waiting: usize,
    /// The RTT baseline (EWMA of per-interval mean RTT), once measured.
    pub rtt_baseline_ms: Option<f64>,
    /// Its standard deviation.
    pub rtt_deviation_ms: Option<f64>,
    /// `--max-actions-per-second` (all instances); 0: no cap.
    pub max_actions_per_second: u32,
    /// Live instances the cap is shared by.
    pub share_instances: u32,
    /// This instance's share of the cap (actions/s); 0: no cap.
    pub instance_actions_per_second: u32,
    /// Time senders spent waiting for the cap's tokens, summed over them.
    pub throttled_seconds_total: f64,
    /// Whether the destination gate is open (no pause in force).
    pub gate_open: bool,
}

/// The cap's bucket for one share.
struct Bucket {
    limiter: DefaultDirectRateLimiter,
    burst: NonZeroU32,
}

impl Bucket {
    /// A tenth of a second's worth may go at once (at least one action):
    /// enough that a request of a full batch rarely waits twice, little
    /// enough that the rate holds over a second.
    fn new(per_second: u32) -> Option<Bucket> {
        let rate = NonZeroU32::new(per_second)?;
        let burst = NonZeroU32::new((per_second / 10).max(1)).expect("non-zero");
        Some(Bucket {
            limiter: RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)),
            burst,
        })
    }
}

#[derive(Debug)]
struct Slots {
    aimd: Aimd,
    in_flight: usize,
    sync_in_flight: usize,
    waiting: usize,
}

/// The one gate toward ChurnZero of a `serve` (see the module doc).
pub struct FlowControl {
    settings: FlowSettings,
    gate: Gate,
    slots: Mutex<Slots>,
    /// Woken when a slot frees, the limit grows or a waiter leaves.
    freed: Notify,
    bucket: Mutex<Option<Arc<Bucket>>>,
    share: AtomicU32,
    throttled_us: AtomicU64,
    /// Senders waiting for the rate cap's tokens right now.
    token_waiters: AtomicUsize,
}

impl std::fmt::Debug for FlowControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowControl")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// A slot held: released when dropped (a cancelled wait or send frees it).
pub struct Admission<'a> {
    flow: &'a FlowControl,
    lane: Lane,
    measured: bool,
}

impl FlowControl {
    pub fn new(settings: FlowSettings) -> Arc<FlowControl> {
        Arc::new(FlowControl {
            settings,
            gate: Gate::new(settings.retry),
            slots: Mutex::new(Slots {
                aimd: Aimd::new(settings.ceiling, settings.adaptive),
                in_flight: 0,
                sync_in_flight: 0,
                waiting: 0,
            }),
            freed: Notify::new(),
            bucket: Mutex::new(Bucket::new(settings.max_actions_per_second).map(Arc::new)),
            share: AtomicU32::new(1),
            throttled_us: AtomicU64::new(0),
            token_waiters: AtomicUsize::new(0),
        })
    }

    /// The destination gate, for the dispatcher (it claims nothing while
    /// the gate is closed).
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// Shares the cap among `live_instances` instances (at least 1): each
    /// sends at most `--max-actions-per-second / live_instances`. Meant to
    /// be fed from the instances' heartbeats; takes effect for the next
    /// tokens taken. No effect without a cap.
    pub fn set_share(&self, live_instances: u32) {
        let n = live_instances.max(1);
        if self.share.swap(n, Ordering::SeqCst) == n {
            return;
        }
        let per_instance = self.instance_rate(n);
        *self.bucket.lock().expect("flow lock") = Bucket::new(per_instance).map(Arc::new);
        if n == u32::MAX {
            // See `server::share_rate_cap`: a starting instance's first share.
            tracing::info!(
                actions_per_second = per_instance,
                "rate cap: sending slowly until the other instances have counted this one"
            );
        } else {
            tracing::info!(
                live_instances = n,
                actions_per_second = per_instance,
                "share of the ChurnZero rate cap changed"
            );
        }
    }

    fn instance_rate(&self, share: u32) -> u32 {
        match self.settings.max_actions_per_second {
            0 => 0,
            cap => (cap / share.max(1)).max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn status(&self) -> FlowStatus {
        let s = self.lock();
        let share = self.share.load(Ordering::SeqCst);
        let baseline = s.aimd.baseline();
        FlowStatus {
            adaptive: self.settings.adaptive,
            concurrency_limit: s.aimd.limit(),
            concurrency_ceiling: s.aimd.ceiling(),
            in_flight: s.in_flight,
            sync_in_flight: s.sync_in_flight,
            waiting: s.waiting,
            rtt_baseline_ms: baseline.map(|b| round3(b.mean * 1000.0)),
            rtt_deviation_ms: baseline.map(|b| round3(b.variance.sqrt() * 1000.0)),
            max_actions_per_second: self.settings.max_actions_per_second,
            share_instances: share,
            instance_actions_per_second: self.instance_rate(share),
            throttled_seconds_total: self.throttled_us.load(Ordering::Relaxed) as f64 / 1e6,
            gate_open: self.gate.is_open(),
        }
    }

    /// Waits until `lane` may send a request of `actions` actions: open
    /// gate, a slot, the cap's tokens. `None` when that takes longer than
    /// `within` (nothing is held then). Cancel-safe: dropping the future
    /// gives back whatever it held.
    pub async fn admit(
        &self,
        lane: Lane,
        actions: usize,
        within: Duration,
    ) -> Option<Admission<'_>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            tokio::time::timeout_at(deadline, self.gate.wait_open())
                .await
                .ok()?;
            let admission = tokio::time::timeout_at(deadline, self.slot(lane))
                .await
                .ok()?;
            tokio::time::timeout_at(deadline, self.tokens(actions))
                .await
                .ok()?;
            // The gate may have closed while this sender waited.
            if self.gate.is_open() {
                return Some(admission);
            }
        }
    }

    async fn slot(&self, lane: Lane) -> Admission<'_> {
        let mut waiting = WaitingGuard {
            flow: self,
            counted: false,
        };
        loop {
            let notified = self.freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = self.lock();
                let limit = s.aimd.limit();
                let free = s.in_flight < limit;
                let ok = match lane {
                    Lane::RealTime => free,
                    // Real time first: the sync lane goes only when nobody
                    // waits for a slot, and with one request at most.
                    Lane::Sync => free && s.waiting == 0 && s.sync_in_flight == 0,
                };
                if ok {
                    s.in_flight += 1;
                    if lane == Lane::Sync {
                        s.sync_in_flight += 1;
                    }
                    let n = s.in_flight;
                    s.aimd.started(n);
                    if waiting.counted {
                        s.waiting -= 1;
                        waiting.counted = false;
                    }
                    return Admission {
                        flow: self,
                        lane,
                        measured: false,
                    };
                }
                if !free {
                    s.aimd.saw_waiting();
                }
                if lane == Lane::RealTime && !waiting.counted {
                    s.waiting += 1;
                    waiting.counted = true;
                }
            }
            notified.await;
        }
    }

    /// Whether a rate cap is set: delivery then claims a request's worth
    /// at a time.
    pub fn capped(&self) -> bool {
        self.bucket.lock().expect("flow lock").is_some()
    }

    /// Whether senders are queued for the rate cap's tokens (one sending
    /// next and one behind it, which hides a claim's round trip): the cap,
    /// not the events at hand, bounds the pace, and claiming more now would
    /// only lease keys this instance cannot send for a while (which other
    /// instances of a shared outbox could).
    pub fn rate_bound(&self) -> bool {
        self.token_waiters.load(Ordering::SeqCst) >= 2
    }

    async fn tokens(&self, actions: usize) {
        if self.bucket.lock().expect("flow lock").is_none() {
            return;
        }
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.token_waiters.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.token_waiters);
        let started = Instant::now();
        let mut left = u32::try_from(actions.max(1)).unwrap_or(u32::MAX);
        while left > 0 {
            // The current bucket for every chunk: a change of share (an
            // instance came or went) applies to requests already waiting.
            let Some(bucket) = self.bucket.lock().expect("flow lock").clone() else {
                break;
            };
            let n = left.min(bucket.burst.get());
            let cells = NonZeroU32::new(n).expect("non-zero");
            match bucket.limiter.check_n(cells) {
                Ok(Ok(())) => left -= n,
                Ok(Err(not_until)) => {
                    let wait = not_until.wait_time_from(bucket.limiter.clock().now());
                    // Short naps, so that a new bucket is seen soon.
                    tokio::time::sleep(
                        wait.clamp(Duration::from_micros(100), Duration::from_millis(250)),
                    )
                    .await;
                }
                // n never exceeds the burst.
                Err(_) => left -= n,
            }
        }
        let waited = started.elapsed();
        if waited >= Duration::from_micros(500) {
            self.throttled_us
                .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
            metrics::histogram!("flow_rate_wait_seconds").record(waited.as_secs_f64());
        }
    }

    fn release(&self, lane: Lane, outcome: Option<(Instant, Option<Duration>, bool)>) {
        let mut s = self.lock();
        s.in_flight -= 1;
        if lane == Lane::Sync {
            s.sync_in_flight -= 1;
        }
        if let Some((now, rtt, back_pressure)) = outcome {
            let before = s.aimd.limit();
            if let Some(change) = s.aimd.finished(now, rtt, back_pressure) {
                if change != Change::Held {
                    tracing::debug!(
                        from = before,
                        to = s.aimd.limit(),
                        ?change,
                        "ChurnZero concurrency limit changed"
                    );
                }
            }
        }
        drop(s);
        self.freed.notify_waiters();
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Takes a real-time waiter off the count when its wait is abandoned.
struct WaitingGuard<'a> {
    flow: &'a FlowControl,
    counted: bool,
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.flow.lock().waiting -= 1;
            self.flow.freed.notify_waiters();
        }
    }
}

impl Admission<'_> {
    /// Sends the request this admission was for, timing this attempt
    /// alone, and feeds its outcome to the limit and the gate.
    pub async fn send<A: std::borrow::Borrow<Map<String, Value>> + Sync>(
        mut self,
        client: &ChurnZeroClient,
        actions: &[A],
    ) -> (SendOutcome, Duration) {
        let started = Instant::now();
        let outcome = client.send(actions).await;
        let took = started.elapsed();
        let (rtt, back_pressure) = match &outcome {
            SendOutcome::Accepted { .. } => {
                self.flow.gate.success();
                (Some(took), false)
            }
            SendOutcome::Rejected { .. } => {
                self.flow.gate.success();
                (None, false)
            }
            SendOutcome::Retryable {
                status,
                retry_after,
                error,
            } => {
                self.flow.gate.failure(*status, *retry_after);
                let pushed_back = status.is_some() || error.starts_with("timeout");
                (None, pushed_back)
            }
        };
        self.measured = true;
        self.flow
            .release(self.lane, Some((Instant::now(), rtt, back_pressure)));
        (outcome, took)
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if !self.measured {
            self.flow.release(self.lane, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Runs one interval at the limit, ending at `*now` (moved on past the
    /// interval): `refused` of its requests push back, the rest take `rtt`.
    fn interval(a: &mut Aimd, now: &mut Instant, rtt: Duration, refused: usize) -> Change {
        let n = a.limit();
        for i in 0..n {
            a.started(i + 1);
        }
        a.saw_waiting();
        let end = *now + rtt.max(MS) * 2;
        let mut change = None;
        for i in 0..n {
            let pushed_back = i < refused;
            let sample = (!pushed_back).then_some(rtt);
            // The last answer ends the interval.
            let at = if i + 1 == n { end } else { *now };
            if let Some(c) = a.finished(at, sample, pushed_back) {
                change = change.or(Some(c));
            }
        }
        *now = end;
        change.unwrap_or(Change::Held)
    }

    #[test]
    fn a_steady_service_takes_the_limit_up_to_the_ceiling() {
        let mut a = Aimd::new(32, true);
        let mut now = Instant::now();
        assert_eq!(a.limit(), 1);
        // Noise of a few percent around 50 ms: Vector's strict `<=`
        // would stall here about every other interval.
        let mut limits = Vec::new();
        for i in 0..40 {
            let rtt = if i % 2 == 0 { 50 * MS } else { 52 * MS };
            interval(&mut a, &mut now, rtt, 0);
            limits.push(a.limit());
        }
        assert_eq!(a.limit(), 32, "{limits:?}");
        // Slow start from the first interval with a baseline to half the
        // ceiling, then one at a time.
        assert_eq!(&limits[..7], &[1, 2, 4, 8, 16, 17, 18], "{limits:?}");
    }

    fn at_ceiling(ceiling: usize, now: &mut Instant) -> Aimd {
        let mut a = Aimd::new(ceiling, true);
        for _ in 0..60 {
            interval(&mut a, now, 50 * MS, 0);
        }
        assert_eq!(a.limit(), ceiling);
        a
    }

    #[test]
    fn back_pressure_and_a_building_queue_cut_the_limit_by_a_tenth() {
        let mut now = Instant::now();
        let mut a = at_ceiling(32, &mut now);
        assert_eq!(interval(&mut a, &mut now, 50 * MS, 1), Change::Decreased);
        assert_eq!(a.limit(), 28);
        // An RTT far above the baseline (a queue building) cuts it too...
        assert_eq!(interval(&mut a, &mut now, 100 * MS, 0), Change::Decreased);
        assert_eq!(a.limit(), 25);
        // ...and does not become the baseline.
        assert!((a.baseline().unwrap().mean - 0.050).abs() < 0.002);
        // Noise within the floor does not.
        let mut b = at_ceiling(8, &mut now);
        assert_ne!(interval(&mut b, &mut now, 54 * MS, 0), Change::Decreased);
        assert_eq!(b.limit(), 8);
    }

    #[test]
    fn a_burst_of_refusals_takes_a_slot_per_refusal_at_once() {
        let mut now = Instant::now();
        let mut a = at_ceiling(16, &mut now);
        // 16 out, a service that holds 8: the 8 refused come back first.
        for _ in 0..8 {
            a.finished(now, None, true);
        }
        // 16 * 0.9, then one per refusal, not below half of 16.
        assert_eq!(a.limit(), 8);
    }

    #[test]
    fn after_falling_to_one_the_limit_climbs_back_quickly() {
        let mut now = Instant::now();
        let mut a = at_ceiling(32, &mut now);
        // An outage: every request pushes back until the limit is 1.
        let mut intervals = 0;
        while a.limit() > 1 {
            let n = a.limit();
            interval(&mut a, &mut now, 50 * MS, n);
            intervals += 1;
            assert!(intervals < 20);
        }
        // The first cut set the mark (32 * 0.9 = 28): recovery doubles up
        // to half of it, then goes one at a time.
        let mut climb = Vec::new();
        for _ in 0..6 {
            interval(&mut a, &mut now, 50 * MS, 0);
            climb.push(a.limit());
        }
        assert_eq!(climb, [2, 4, 8, 16, 17, 18]);
    }

    #[test]
    fn a_service_that_got_slower_for_good_is_learned_at_a_limit_of_one() {
        let mut now = Instant::now();
        let mut a = at_ceiling(8, &mut now);
        let mut rounds = 0;
        // 50 ms became 200 ms whatever the concurrency: the limit falls,
        // then the baseline learns the new speed and the limit climbs.
        while a.limit() > 1 {
            interval(&mut a, &mut now, 200 * MS, 0);
            rounds += 1;
            assert!(rounds < 20);
        }
        for _ in 0..30 {
            interval(&mut a, &mut now, 200 * MS, 0);
        }
        assert_eq!(a.limit(), 8);
    }

    #[test]
    fn only_demand_beyond_the_limit_raises_it() {
        let mut a = Aimd::new(32, true);
        let mut now = Instant::now();
        for _ in 0..10 {
            // One request at a time, never at a limit above 1 once raised.
            a.started(1);
            now += 100 * MS;
            a.finished(now, Some(50 * MS), false);
        }
        assert!(a.limit() <= 2, "{}", a.limit());
    }

    #[test]
    fn fixed_concurrency_keeps_the_ceiling_and_still_measures() {
        let mut a = Aimd::new(6, false);
        let mut now = Instant::now();
        assert_eq!(a.limit(), 6);
        interval(&mut a, &mut now, 50 * MS, 6);
        interval(&mut a, &mut now, 40 * MS, 0);
        interval(&mut a, &mut now, 40 * MS, 0);
        assert_eq!(a.limit(), 6);
        assert!(a.baseline().is_some());
    }

    fn flow(cap: u32) -> Arc<FlowControl> {
        FlowControl::new(FlowSettings {
            ceiling: 2,
            adaptive: false,
            max_actions_per_second: cap,
            retry: RetryPolicy {
                initial: Duration::from_millis(50),
                max: Duration::from_secs(1),
                budget: Duration::from_secs(60),
            },
        })
    }

    /// A task that takes a slot for `lane`, says so, and holds it until told.
    fn holder(
        f: &Arc<FlowControl>,
        lane: Lane,
    ) -> (
        tokio::sync::oneshot::Receiver<()>,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let (got_tx, got_rx) = tokio::sync::oneshot::channel();
        let (free_tx, free_rx) = tokio::sync::oneshot::channel::<()>();
        let f = f.clone();
        tokio::spawn(async move {
            let _slot = f.admit(lane, 1, Duration::from_secs(5)).await.unwrap();
            let _ = got_tx.send(());
            let _ = free_rx.await;
        });
        (got_rx, free_tx)
    }

    #[tokio::test]
    async fn the_sync_lane_waits_while_real_time_senders_wait() {
        let f = flow(0);
        let (a_got, a_free) = holder(&f, Lane::RealTime);
        let (b_got, b_free) = holder(&f, Lane::RealTime);
        a_got.await.unwrap();
        b_got.await.unwrap();
        // Both slots taken: a real-time sender waits, then the sync lane.
        let (mut rt_got, rt_free) = holder(&f, Lane::RealTime);
        while f.status().waiting == 0 {
            tokio::task::yield_now().await;
        }
        let (mut sync_got, sync_free) = holder(&f, Lane::Sync);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        // One slot frees: it goes to the real-time sender.
        a_free.send(()).unwrap();
        (&mut rt_got).await.unwrap();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(sync_got.try_recv().is_err(), "sync went before real time");
        b_free.send(()).unwrap();
        sync_got.await.unwrap();
        assert_eq!(f.status().sync_in_flight, 1);
        // At most one sync request at a time, even with a slot free.
        rt_free.send(()).unwrap();
        while f.status().in_flight > 1 {
            tokio::task::yield_now().await;
        }
        assert!(
            f.admit(Lane::Sync, 1, Duration::from_millis(50))
                .await
                .is_none()
        );
        sync_free.send(()).unwrap();
        while f.status().in_flight > 0 {
            tokio::task::yield_now().await;
        }
        let s = f.status();
        assert_eq!((s.in_flight, s.sync_in_flight, s.waiting), (0, 0, 0));
    }

    /// Actions admitted in `span` to a sender taking 10 at a time.
    async fn admitted_in(f: &Arc<FlowControl>, span: Duration) -> u64 {
        let end = Instant::now() + span;
        let mut n = 0;
        while Instant::now() < end {
            let a = f.admit(Lane::RealTime, 10, span).await;
            if a.is_some() {
                n += 10;
            }
        }
        n
    }

    #[tokio::test]
    async fn the_cap_holds_and_a_share_change_changes_the_rate() {
        let f = flow(1000);
        let whole = admitted_in(&f, Duration::from_millis(600)).await;
        f.set_share(4);
        assert_eq!(f.status().instance_actions_per_second, 250);
        let quarter = admitted_in(&f, Duration::from_millis(600)).await;
        // 1000/s over 0.6 s is 600 (plus a burst of 100); 250/s is 150
        // (plus 25). Loose bounds: timers on a busy machine run late.
        assert!((400..=760).contains(&whole), "whole rate: {whole}");
        assert!((80..=240).contains(&quarter), "quarter rate: {quarter}");
        assert!(f.status().throttled_seconds_total > 0.0);
    }
}
