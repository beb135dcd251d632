//! Delivery: a dispatcher claims due events from the outbox under a lease and
//! hands each batch to one of `--workers` concurrent workers, which resolve
//! identities, map to ChurnZero actions (or take the actions an earlier
//! attempt stored, so a retry never drifts), POST them and settle every
//! event as delivered, retried, held or dead. Every request passes the flow
//! control shared with the sync lane ([`flow`]: the destination gate that
//! slows the whole pool when ChurnZero struggles, the adaptive concurrency
//! limit, the rate cap); a worker never waits there, or sends, beyond what
//! its lease covers.

pub mod flow;
pub mod gate;
pub mod retry;

use crate::churnzero::client::{ChurnZeroClient, SendOutcome};
use crate::churnzero::mapping::{self, Ids, MappingConfig};
use crate::churnzero::poison::Isolation;
pub use crate::identity::KnownIds;
use crate::identity::resolve;
use crate::outbox::{ClaimedEvent, Outbox, SettleOutcome, Settlement, now_ms};
use flow::{FlowControl, Lane};
use retry::{RetryDecision, RetryPolicy};
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, watch};

/// Settings of the delivery pool (from `serve`).
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    pub workers: usize,
    pub batch_size: usize,
    pub flush_interval: Duration,
    pub request_timeout: Duration,
    pub retry: RetryPolicy,
}

impl DeliveryConfig {
    /// Long enough for the flush wait and the sequential requests of one
    /// claim (up to eight requests, each with the few extra requests a poison
    /// split may need); an event whose worker vanished comes back after it.
    pub fn lease(&self) -> Duration {
        let derived = self.flush_interval
            + self.request_timeout * (4 * REQUESTS_PER_CLAIM as u32)
            + Duration::from_secs(30);
        match lease_override() {
            // Never so short that one request and its settle cannot fit.
            Some(lease) => {
                lease.max(self.flush_interval + self.request_timeout + 2 * self.settle_margin())
            }
            None => derived,
        }
    }

    /// Time kept free at the end of a lease for the outcome to be written.
    pub fn settle_margin(&self) -> Duration {
        (self.request_timeout / 2).min(Duration::from_secs(5))
    }
}

/// Internal, undocumented on purpose: `FORWARDER_LEASE` shortens the claim
/// lease so that tests can outlast it for real (a gate pause longer than the
/// lease) without waiting minutes. Not a contract flag; operators never need
/// it, as the derived lease always covers a claim's requests.
fn lease_override() -> Option<Duration> {
    std::env::var("FORWARDER_LEASE")
        .ok()
        .and_then(|v| crate::config::parse_duration(&v).ok())
        .filter(|d| !d.is_zero())
}

/// Requests' worth of events one claim may take when that many are due. A
/// worker sends them as consecutive requests of at most `--batch-size`
/// actions (never more than one in flight per worker), so `--workers` still
/// bounds the requests in flight, while the outbox's per-claim and
/// per-settle costs (statements, one commit each) are shared by up to eight
/// requests when a backlog drains. Eight rather than four: SQLite's one
/// writer spent nearly all of a distinct-user drain in claims and settles,
/// and halving their number raised that drain by about a fifth (see the
/// README). When little is due, a claim takes what there is and nothing
/// waits longer.
const REQUESTS_PER_CLAIM: usize = 8;

/// Everything a worker needs, shared.
struct Context {
    outbox: Outbox,
    client: ChurnZeroClient,
    mapping: Arc<MappingConfig>,
    config: DeliveryConfig,
    /// The one gate toward ChurnZero, shared with the sync lane.
    flow: Arc<FlowControl>,
    /// Lets a worker waiting at a closed gate give its events back at
    /// shutdown instead of holding the process up.
    shutdown: watch::Receiver<bool>,
}

impl Context {
    fn claim_size(&self) -> usize {
        // Under a rate cap the cap sets the pace: claims follow the sending
        // a request at a time instead of leasing eight requests ahead.
        if self.flow.capped() {
            self.config.batch_size
        } else {
            self.config.batch_size * REQUESTS_PER_CLAIM
        }
    }
}

/// Runs the dispatcher until `shutdown` turns true, then waits for in-flight
/// requests (each bounded by the request timeout) before returning.
pub async fn run(
    outbox: Outbox,
    client: ChurnZeroClient,
    mapping: Arc<MappingConfig>,
    config: DeliveryConfig,
    flow: Arc<FlowControl>,
    shutdown: watch::Receiver<bool>,
) {
    let ctx = Arc::new(Context {
        outbox,
        client,
        mapping,
        config,
        flow,
        shutdown: shutdown.clone(),
    });
    let permits = Arc::new(Semaphore::new(ctx.config.workers));
    // Under a rate cap one claim at a time already outpaces the sending.
    let loops = if ctx.flow.capped() {
        1
    } else {
        ctx.outbox.claim_loops()
    };
    let dispatchers = (0..loops).map(|_| dispatch(ctx.clone(), permits.clone(), shutdown.clone()));
    futures_util::future::join_all(dispatchers).await;
    // Let in-flight workers finish: each request is bounded by the timeout.
    let deadline = ctx.config.request_timeout + Duration::from_secs(5);
    let all = ctx.config.workers as u32;
    match tokio::time::timeout(deadline, permits.acquire_many(all)).await {
        Ok(_) => tracing::info!("delivery stopped: no request in flight"),
        Err(_) => tracing::warn!(
            "delivery stopped with requests still in flight; their leases will expire"
        ),
    }
}

/// One claim loop: waits for a free worker and an open gate, claims, hands
/// the batch to a worker, until `shutdown` turns true. Several loops share
/// the workers when the outbox lets claims overlap.
async fn dispatch(ctx: Arc<Context>, permits: Arc<Semaphore>, mut shutdown: watch::Receiver<bool>) {
    let lease = ctx.config.lease();
    let stored = ctx.outbox.stored_signal();
    'dispatch: loop {
        if *shutdown.borrow() {
            break;
        }
        // Wait for a free worker and an open gate, stopping on shutdown.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = shutdown.changed() => break,
        };
        tokio::select! {
            _ = ctx.flow.gate().wait_open() => {}
            _ = shutdown.changed() => break,
        }
        // A sender already waits for the rate cap: claim when it has its
        // tokens, so that the keys this instance leases are the ones it is
        // about to send (see FlowControl::rate_bound).
        while ctx.flow.rate_bound() {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                _ = shutdown.changed() => break 'dispatch,
            }
        }
        let notified = stored.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let mut batch = match ctx.outbox.claim(ctx.claim_size(), lease).await {
            Ok(b) => {
                count_claim(&b);
                b
            }
            Err(e) => {
                tracing::error!(error = %e, "claiming events failed");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.changed() => break,
                }
                continue;
            }
        };
        if batch.is_empty() {
            drop(permit);
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = shutdown.changed() => break,
            }
            continue;
        }
        // A partial batch of fresh events waits up to --flush-interval
        // (counted from its oldest event) for company.
        let oldest = batch.iter().map(|e| e.accepted_at).min().unwrap_or(0);
        let deadline = oldest + ctx.config.flush_interval.as_millis() as i64;
        while batch.len() < ctx.config.batch_size && batch.iter().all(|e| e.attempts == 1) {
            let wait = deadline - now_ms();
            if wait <= 0 {
                break;
            }
            let more = stored.notified();
            tokio::pin!(more);
            more.as_mut().enable();
            tokio::select! {
                _ = &mut more => {}
                _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => {}
                _ = shutdown.changed() => {
                    release(&ctx, batch).await;
                    break 'dispatch;
                }
            }
            match ctx
                .outbox
                .claim(ctx.config.batch_size - batch.len(), lease)
                .await
            {
                Ok(extra) => {
                    count_claim(&extra);
                    batch.extend(extra);
                }
                Err(e) => tracing::error!(error = %e, "claiming events failed"),
            }
        }
        batch.sort_by_key(|e| e.id);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let settlements = deliver(&ctx, batch).await;
            settle_with_retries(&ctx, settlements).await;
            drop(permit);
        });
    }
}

/// Counts a claim that leased something: how many events a claim takes
/// tells an operator whether a backlog drains in full claims or in a
/// trickle of small ones.
fn count_claim(batch: &[ClaimedEvent]) {
    if !batch.is_empty() {
        metrics::counter!("delivery_claims_total").increment(1);
        metrics::counter!("delivery_claimed_events_total").increment(batch.len() as u64);
    }
}

/// Gives a claimed but unsent batch back at once (used at shutdown).
async fn release(ctx: &Context, batch: Vec<ClaimedEvent>) {
    let items = batch
        .into_iter()
        .map(|e| Settlement {
            id: e.id,
            lease: e.lease,
            order_key: e.order_key,
            first_attempt_at: e.first_attempt_at,
            outcome: SettleOutcome::Release,
            actions: None,
        })
        .collect();
    settle_with_retries(ctx, items).await;
}

async fn settle_with_retries(ctx: &Context, items: Vec<Settlement>) {
    // An outcome counts only while its lease holds (the lease is its
    // expiry, in ms): while the storage is unreachable, keep trying until
    // then, so that an outage shorter than the lease does not leave these
    // users' events leased, and stalled, until it runs out.
    let lease_ends = items.iter().map(|s| s.lease).min().unwrap_or(0);
    let mut delay = Duration::from_millis(100);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match ctx.outbox.settle(items.clone()).await {
            Ok(()) => return,
            Err(e) => {
                let transient = e.is_transient();
                tracing::error!(error = %e, attempt, "recording delivery outcomes failed");
                let retry_at = now_ms() + delay.as_millis() as i64;
                if (!transient && attempt >= 5) || retry_at >= lease_ends {
                    break;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 4).min(Duration::from_secs(2));
            }
        }
    }
    // The leases expire and the events are claimed again: at-least-once.
    tracing::error!(
        events = items.len(),
        "giving up recording outcomes; events will be retried after their lease"
    );
}

/// One event of a batch, parsed and mapped.
struct Unit {
    index: usize,
}

enum Fate {
    Delivered,
    Retry {
        error: String,
        retry_after: Option<Duration>,
    },
    Dead(String),
    Held(String),
    /// Never sent: shutdown came while the gate was closed.
    Release,
}

/// Why the rest of a batch is not sent.
#[derive(Clone)]
enum Stop {
    Retry(String, Option<Duration>),
    Release,
}

/// What one attempt does with one stored event.
#[derive(Debug, Clone, PartialEq)]
pub enum Attempt {
    /// Send these actions. `fresh` when they were resolved and mapped just
    /// now (the event had none stored): unless delivered, they are kept
    /// with the event in [`stored_form`] so that every later attempt sends
    /// the same.
    Send {
        actions: Vec<Map<String, Value>>,
        fresh: bool,
    },
    /// Nothing to send to ChurnZero (an alias, a page with page events off,
    /// an audience-only identify): done.
    Nothing,
    /// Its ids are not known yet: hold it.
    Unresolved,
    /// The stored event cannot be used at all.
    Invalid(String),
}

/// Decides what an attempt sends for an event: the actions stored by its
/// first attempt when there are some (whatever the identity map or the
/// mapping file say now), else the event resolved against `known` (the
/// identity map's entry for its user) and mapped with `cfg`. Pure, so that
/// the stable-payload property can be checked without a server.
pub fn attempt(
    cfg: &MappingConfig,
    kind: &str,
    event: &Value,
    stored: Option<&str>,
    known: Option<&KnownIds>,
) -> Attempt {
    let own = || mapping::ids_from_event(cfg, event);
    attempt_with(cfg, kind, event, stored, own, known)
}

/// [`attempt`] with the event's own ids computed by the caller, who needed
/// them already to know whose identities to look up.
fn attempt_with(
    cfg: &MappingConfig,
    kind: &str,
    event: &Value,
    stored: Option<&str>,
    own: impl FnOnce() -> mapping::PartialIds,
    known: Option<&KnownIds>,
) -> Attempt {
    if let Some(stored) = stored {
        return match serde_json::from_str::<Vec<Map<String, Value>>>(stored) {
            Ok(actions) if actions.is_empty() => Attempt::Nothing,
            Ok(actions) => Attempt::Send {
                actions,
                fresh: false,
            },
            Err(e) => Attempt::Invalid(format!("stored actions are not valid JSON: {e}")),
        };
    }
    if !event.is_object() {
        return Attempt::Invalid("stored payload is not a JSON object".into());
    }
    if kind == "alias" {
        return Attempt::Nothing;
    }
    let Some(ids) = resolve(own(), known) else {
        // Nothing to send in real time (an audience-only identify, a page
        // with page events off): there is nothing to wait for.
        let probe = Ids {
            account: String::new(),
            contact: String::new(),
        };
        if mapping::map_event(cfg, event, &probe).is_empty() {
            return Attempt::Nothing;
        }
        return Attempt::Unresolved;
    };
    let actions = mapping::map_event(cfg, event, &ids);
    if actions.is_empty() {
        return Attempt::Nothing;
    }
    Attempt::Send {
        actions,
        fresh: true,
    }
}

/// How an attempt's actions are kept with the event (`events.actions`):
/// the JSON array [`attempt`] reads back as it was, key order included.
/// Only built for an attempt that was not delivered, so the hot path (one
/// attempt, delivered) serialises nothing more than the request body.
pub fn stored_form(actions: &[Map<String, Value>]) -> String {
    serde_json::to_string(actions).expect("actions serialise")
}

async fn deliver(ctx: &Context, batch: Vec<ClaimedEvent>) -> Vec<Settlement> {
    let events: Vec<Value> = batch
        .iter()
        .map(|e| {
            if e.actions.is_some() {
                // Sent as stored: the payload is not needed.
                Value::Null
            } else {
                mapping::parse_for_mapping(&e.payload).unwrap_or(Value::Null)
            }
        })
        .collect();
    // Only users with an event lacking its own ids (and no stored actions)
    // need the identity map: events that carry both ids (the common case)
    // cost no read.
    let mut own_ids: Vec<Option<mapping::PartialIds>> = batch
        .iter()
        .zip(&events)
        .map(|(c, e)| {
            c.actions
                .is_none()
                .then(|| mapping::ids_from_event(&ctx.mapping, e))
        })
        .collect();
    let users: Vec<&str> = {
        let mut u: Vec<&str> = batch
            .iter()
            .zip(&own_ids)
            .filter(|(_, own)| {
                own.as_ref()
                    .is_some_and(|own| own.account.is_none() || own.contact.is_none())
            })
            .map(|(c, _)| c.order_key.as_str())
            .collect();
        u.sort_unstable();
        u.dedup();
        u
    };
    let known = match ctx.outbox.identities(&users).await {
        Ok(k) => k,
        Err(e) => {
            let err = format!("identity look-up failed: {e}");
            let fates = (0..batch.len())
                .map(|_| Fate::Retry {
                    error: err.clone(),
                    retry_after: None,
                })
                .collect();
            return settlements(ctx, &batch, fates, Vec::new());
        }
    };
    let mut fates: Vec<Option<Fate>> = (0..batch.len()).map(|_| None).collect();
    let mut fresh = vec![false; batch.len()];
    let mut actions_of: Vec<Vec<Map<String, Value>>> = vec![Vec::new(); batch.len()];
    let mut units = Vec::new();
    let mut blocked: HashSet<&str> = HashSet::new();
    for (i, (claimed, event)) in batch.iter().zip(&events).enumerate() {
        if blocked.contains(claimed.order_key.as_str()) {
            // An earlier event of this user waits for its ids: keep order.
            fates[i] = Some(Fate::Held(
                "waiting behind an unresolved event of the same user".into(),
            ));
            continue;
        }
        let own = own_ids[i].take();
        match attempt_with(
            &ctx.mapping,
            &claimed.kind,
            event,
            claimed.actions.as_deref(),
            || own.unwrap_or_else(|| mapping::ids_from_event(&ctx.mapping, event)),
            known.get(&claimed.order_key),
        ) {
            Attempt::Send {
                actions,
                fresh: resolved_now,
            } => {
                fresh[i] = resolved_now;
                actions_of[i] = actions;
                units.push(Unit { index: i });
            }
            Attempt::Nothing => fates[i] = Some(Fate::Delivered),
            Attempt::Invalid(reason) => fates[i] = Some(Fate::Dead(reason)),
            Attempt::Unresolved => {
                blocked.insert(claimed.order_key.as_str());
                fates[i] = Some(Fate::Held(
                    "unresolved identity: no accountExternalId/contactExternalId known yet".into(),
                ));
            }
        }
    }

    // Requests of at most --batch-size actions, an event's actions never split.
    let mut chunks: Vec<Vec<Unit>> = Vec::new();
    let mut size = 0;
    for u in units {
        let len = actions_of[u.index].len();
        if chunks.is_empty() || size + len > ctx.config.batch_size {
            chunks.push(Vec::new());
            size = 0;
        }
        size += len;
        chunks.last_mut().expect("pushed").push(u);
    }
    // The last moment a request may start: it must end (request timeout)
    // and its outcome be written (settle margin) before the earliest lease
    // of the batch runs out, or another worker could claim the same events.
    let send_by = batch.iter().map(|e| e.lease).min().unwrap_or(0)
        - (ctx.config.request_timeout + ctx.config.settle_margin()).as_millis() as i64;
    let mut stop: Option<Stop> = None;
    for chunk in chunks {
        send_isolating(ctx, chunk, &actions_of, &mut fates, &mut stop, send_by).await;
    }
    let fates: Vec<Fate> = fates
        .into_iter()
        .map(|f| f.unwrap_or(Fate::Delivered))
        .collect();
    let firsts = fates
        .iter()
        .enumerate()
        .map(|(i, fate)| match fate {
            Fate::Delivered | Fate::Held(_) => None,
            _ => fresh[i].then(|| stored_form(&actions_of[i])),
        })
        .collect();
    settlements(ctx, &batch, fates, firsts)
}

/// Sends `units`; a refused request is split until the refused events are
/// alone (see [`Isolation`]), so a poison event harms only itself. After a
/// retryable failure nothing more is sent from this batch (order and
/// back-pressure): the rest is retried together. Nothing is sent after
/// `send_by` (ms): a closed gate is waited for only while the lease still
/// covers the request after it, and what is left then is given back
/// unsent, so no other worker can claim events this one is still sending.
async fn send_isolating(
    ctx: &Context,
    units: Vec<Unit>,
    actions_of: &[Vec<Map<String, Value>>],
    fates: &mut [Option<Fate>],
    stop: &mut Option<Stop>,
    send_by: i64,
) {
    let mut parts = Isolation::new(units);
    while let Some(part) = parts.next_part() {
        if let Some(error) = send_part(ctx, &part, actions_of, fates, stop, send_by).await {
            if let Some(poison) = parts.refused(part) {
                fates[poison.index] = Some(Fate::Dead(format!("rejected by ChurnZero: {error}")));
            }
        }
    }
}

/// Sends one part of a batch, or settles it unsent when the batch has
/// stopped or the lease has no room left. `Some(error)`: ChurnZero refused
/// it (not retryable); the part's fates are then left to the caller.
async fn send_part(
    ctx: &Context,
    units: &[Unit],
    actions_of: &[Vec<Map<String, Value>>],
    fates: &mut [Option<Fate>],
    stop: &mut Option<Stop>,
    send_by: i64,
) -> Option<String> {
    if let Some(stop) = stop.clone() {
        for u in units {
            fates[u.index] = Some(match &stop {
                Stop::Retry(error, retry_after) => Fate::Retry {
                    error: error.clone(),
                    retry_after: *retry_after,
                },
                Stop::Release => Fate::Release,
            });
        }
        return None;
    }
    let mut shutdown = ctx.shutdown.clone();
    let left = send_by - now_ms();
    if left <= 0 {
        // Even through an open gate: the request could outlast the lease.
        tracing::info!(
            events = units.len(),
            "this claim's lease has no room for another request; giving the unsent events back"
        );
        for u in units {
            fates[u.index] = Some(Fate::Release);
        }
        *stop = Some(Stop::Release);
        return None;
    }
    let room = Duration::from_millis(left as u64);
    let actions: Vec<&Map<String, Value>> = units
        .iter()
        .flat_map(|u| actions_of[u.index].iter())
        .collect();
    // Waiting (gate, a slot, the rate cap) ends at shutdown; a request
    // once sent is let finish.
    let admitted = tokio::select! {
        a = ctx.flow.admit(Lane::RealTime, actions.len(), room) => {
            if a.is_none() {
                tracing::info!(
                    events = units.len(),
                    "the destination gate or flow control holds this request past its claim's lease; giving the unsent events back"
                );
            }
            a
        }
        _ = shutdown.wait_for(|s| *s) => None,
    };
    let Some(admitted) = admitted else {
        for u in units {
            fates[u.index] = Some(Fate::Release);
        }
        *stop = Some(Stop::Release);
        return None;
    };
    let (outcome, took) = admitted.send(&ctx.client, &actions).await;
    metrics::histogram!("churnzero_request_duration_seconds").record(took.as_secs_f64());
    match outcome {
        SendOutcome::Accepted { status } => {
            tracing::info!(
                outcome = "delivered",
                status,
                actions = actions.len(),
                duration_ms = took.as_millis() as u64,
                "churnzero request delivered"
            );
            metrics::counter!("churnzero_requests_total", "outcome" => "delivered").increment(1);
            for u in units {
                fates[u.index] = Some(Fate::Delivered);
            }
        }
        SendOutcome::Retryable {
            error,
            status,
            retry_after,
        } => {
            tracing::warn!(outcome = "retry", status, actions = actions.len(), duration_ms = took.as_millis() as u64, %error, "churnzero request failed, will retry");
            metrics::counter!("churnzero_requests_total", "outcome" => "retry").increment(1);
            for u in units {
                fates[u.index] = Some(Fate::Retry {
                    error: error.clone(),
                    retry_after,
                });
            }
            *stop = Some(Stop::Retry(error, retry_after));
        }
        SendOutcome::Rejected { status, error } => {
            tracing::warn!(outcome = "rejected", status, actions = actions.len(), duration_ms = took.as_millis() as u64, %error, "churnzero refused the request");
            metrics::counter!("churnzero_requests_total", "outcome" => "rejected").increment(1);
            return Some(error);
        }
    }
    None
}

/// Outcomes for a batch; `firsts[i]` is the JSON of the actions event `i`
/// was resolved to by this attempt (none when it already had them), kept
/// with every outcome but delivery.
fn settlements(
    ctx: &Context,
    batch: &[ClaimedEvent],
    fates: Vec<Fate>,
    mut firsts: Vec<Option<String>>,
) -> Vec<Settlement> {
    let now = now_ms();
    firsts.resize(batch.len(), None);
    // Looked up once per batch: each look-up through the recorder builds
    // the prefixed name and hashes it, which per event was 3% of the
    // forwarder's instructions in a drain.
    let delivered_total = metrics::counter!("events_delivered_total");
    let delivery_latency = metrics::histogram!("delivery_latency_seconds");
    let dead_total = metrics::counter!("events_dead_total");
    let retried_total = metrics::counter!("events_retried_total");
    let held_total = metrics::counter!("events_held_total");
    batch
        .iter()
        .zip(fates)
        .zip(firsts)
        .map(|((e, fate), first)| {
            let outcome = match fate {
                Fate::Delivered => SettleOutcome::Delivered,
                Fate::Dead(reason) => SettleOutcome::Dead { reason },
                Fate::Held(error) => SettleOutcome::Held {
                    error,
                    map_as_of: e.claimed_at,
                },
                Fate::Release => SettleOutcome::Release,
                Fate::Retry { error, retry_after } => {
                    let unit: f64 = rand::random();
                    let attempt = e.attempts.clamp(1, u32::MAX as i64) as u32;
                    match ctx.config.retry.decide(
                        now,
                        e.first_attempt_at,
                        attempt,
                        retry_after,
                        unit,
                    ) {
                        RetryDecision::At(at) => SettleOutcome::Retry { at, error },
                        RetryDecision::Exhausted => SettleOutcome::Dead {
                            reason: format!("retry budget exhausted: {error}"),
                        },
                    }
                }
            };
            match &outcome {
                SettleOutcome::Delivered => {
                    delivered_total.increment(1);
                    // Acceptance to delivery, replays and retries included:
                    // what a user of the data waits.
                    delivery_latency.record((now - e.accepted_at).max(0) as f64 / 1000.0);
                }
                SettleOutcome::Dead { .. } => dead_total.increment(1),
                SettleOutcome::Retry { .. } => retried_total.increment(1),
                SettleOutcome::Held { .. } => held_total.increment(1),
                SettleOutcome::Release => {}
            }
            let actions = match outcome {
                SettleOutcome::Delivered | SettleOutcome::Held { .. } => None,
                _ => first,
            };
            Settlement {
                id: e.id,
                lease: e.lease,
                order_key: e.order_key.clone(),
                first_attempt_at: e.first_attempt_at,
                outcome,
                actions,
            }
        })
        .collect()
}

/// Used by the maintenance loop: how long held events may wait for ids.
pub fn held_budget(config: &DeliveryConfig) -> Duration {
    config.retry.budget
}
