//! The audience sync lane (Segment Engage).
//!
//! Engage recomputes audiences and sends every membership as an identify;
//! ChurnZero only needs the changes, in batches, at a pace it can take.
//! Ingest stores audience updates in `audience_pending`, one row per user and
//! attribute (last value wins). This lane wakes every `--sync-interval` and
//! runs a *window*:
//!
//! 1. it walks the pending updates written before the window started, a page
//!    of users at a time (memory stays bounded however large the sync);
//! 2. resolves each user's account and contact ids from the identity map; a
//!    user without both ids stays pending for the next window;
//! 3. merges the updates of one contact (several users can be the same
//!    contact after an alias; the latest update of an attribute wins);
//! 4. drops values equal to the one ChurnZero last accepted for that
//!    (account, contact, attribute), recording them as skipped;
//! 5. sends one contact `setAttribute` per contact with the changed values,
//!    paced to at most `--sync-max-per-minute` actions a minute;
//! 6. records each accepted value in `audience_delivered` and removes the
//!    pending rows it used up, in one writer transaction per request.
//!
//! A failed request is retried with the delivery retry schedule while the
//! retry still fits before the next window; otherwise the window stops and
//! the next one sends the (by then possibly newer) values. Pending updates
//! have no retry budget: the latest membership is always worth sending. A
//! request ChurnZero refuses with a non-retryable status is split until the
//! refused contact is alone; its updates are dropped and the error shows in
//! `/status`.
//!
//! Schedule: the first window runs one interval after the first start (the
//! planned time is kept in the database, so restarts do not postpone it;
//! a time missed while the process was down runs at once). A window that
//! outlasts the interval is followed at once by the next one, still paced.
//! The lane has its own task, pacing and backoff: real-time delivery never
//! waits for it.
//!
//! `/status` (`sync`): `next_run_at`, `pending_contacts` (users with pending
//! updates, unresolved ones included), and for the last window that had work
//! (sent, skipped or dropped something) `last_run_at` (its start),
//! `last_run_sent` and `last_run_skipped` (attribute values; they grow while
//! that window is in progress). See docs/sync-lane.md.

use crate::churnzero::client::{ChurnZeroClient, SendOutcome};
use crate::churnzero::mapping::{self, Ids, MappingConfig};
use crate::churnzero::poison::Isolation;
use crate::delivery::retry::RetryPolicy;
use crate::identity::{self, KnownIds, PartialIds};
use crate::outbox::{
    AudienceOp, AudienceSettlement, DeliveredValue, Outbox, PendingUpdate, StoreError, now_ms,
};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The role whose holder runs the windows when several instances share
/// one outbox (PostgreSQL), and how long its lease lasts without renewal:
/// the leader renews it before every request, and a follower takes over
/// within this time after the leader stops.
const LEADER_ROLE: &str = "sync_lane";
const LEADER_TTL: Duration = Duration::from_secs(30);

/// Users read per page of a window.
const PAGE_USERS: usize = 500;

/// Settings of the sync lane.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// Time between the starts of two windows (`--sync-interval`).
    pub interval: Duration,
    /// Actions per minute at most (`--sync-max-per-minute`).
    pub max_per_minute: u32,
    /// Most actions in one request (`--batch-size`).
    pub batch_size: usize,
    /// Backoff between attempts of a failed request.
    pub retry: RetryPolicy,
}

/// Spaces the lane's requests so that, over any stretch of time, at most
/// `max_per_minute` actions a minute go out (plus one request's worth).
/// A request carries at most one second's share of the rate, so a large
/// first sync becomes a steady trickle rather than bursts followed by
/// silence.
#[derive(Debug, Clone)]
pub struct Pacer {
    per_action: Duration,
    chunk: usize,
    next_at: Option<Instant>,
}

impl Pacer {
    pub fn new(max_per_minute: u32, batch_size: usize) -> Pacer {
        let rate = max_per_minute.max(1);
        Pacer {
            per_action: Duration::from_secs(60) / rate,
            chunk: ((rate / 60).max(1) as usize).min(batch_size.max(1)),
            next_at: None,
        }
    }

    /// Actions per request.
    pub fn chunk(&self) -> usize {
        self.chunk
    }

    /// The time each action costs.
    pub fn per_action(&self) -> Duration {
        self.per_action
    }

    /// When the next request may go (`None`: now).
    pub fn ready_at(&self) -> Option<Instant> {
        self.next_at
    }

    /// Books `n` actions sent at `now`: the next request waits for them.
    pub fn book(&mut self, now: Instant, n: usize) {
        let from = match self.next_at {
            Some(t) if t > now => t,
            _ => now,
        };
        self.next_at = Some(from + self.per_action * n as u32);
    }
}

/// One contact's changed attributes, ready to send.
#[derive(Debug, Clone)]
struct ContactUpdate {
    ids: Ids,
    /// Attribute key -> JSON text, ordered by key (stable payloads).
    values: BTreeMap<String, String>,
    /// The pending rows behind `values`.
    consumed: Vec<PendingUpdate>,
}

impl ContactUpdate {
    fn action(&self) -> Map<String, Value> {
        let updates: Vec<(String, Value)> = self
            .values
            .iter()
            .map(|(k, v)| {
                let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.clone()));
                (k.clone(), value)
            })
            .collect();
        mapping::audience_action(&self.ids, &updates)
    }
}

/// A page's updates merged per contact, before comparing with what was
/// delivered.
#[derive(Debug, Default)]
struct Merged {
    /// In the order their first update was read.
    contacts: Vec<ContactUpdate>,
    unresolved_users: HashSet<String>,
}

/// Resolves users to ids and merges their updates per contact; an
/// attribute's latest update wins (ties: the later row read).
fn merge(rows: Vec<PendingUpdate>, identities: &HashMap<String, KnownIds>) -> Merged {
    let mut merged = Merged::default();
    let mut index: HashMap<Ids, usize> = HashMap::new();
    let mut stamps: HashMap<(usize, String), i64> = HashMap::new();
    for row in rows {
        // Audience updates carry no ids of their own: the map's, or none.
        let Some(ids) = identity::resolve(PartialIds::default(), identities.get(&row.user_id))
        else {
            merged.unresolved_users.insert(row.user_id);
            continue;
        };
        let i = *index.entry(ids.clone()).or_insert_with(|| {
            merged.contacts.push(ContactUpdate {
                ids,
                values: BTreeMap::new(),
                consumed: Vec::new(),
            });
            merged.contacts.len() - 1
        });
        let c = &mut merged.contacts[i];
        let stamp = stamps.entry((i, row.attribute.clone())).or_insert(i64::MIN);
        if row.updated_at >= *stamp {
            *stamp = row.updated_at;
            c.values.insert(row.attribute.clone(), row.value.clone());
        }
        c.consumed.push(row);
    }
    merged
}

/// Splits merged contacts into what must be sent and what ChurnZero already
/// has (returned as a settlement that consumes those rows and counts them
/// as skipped).
fn drop_unchanged(
    contacts: Vec<ContactUpdate>,
    delivered: &HashMap<(String, String, String), String>,
) -> (Vec<ContactUpdate>, AudienceSettlement) {
    let mut skip = AudienceSettlement::default();
    let mut send = Vec::new();
    for mut c in contacts {
        let unchanged: HashSet<String> = c
            .values
            .iter()
            .filter(|(attr, value)| {
                delivered.get(&(
                    c.ids.account.clone(),
                    c.ids.contact.clone(),
                    (*attr).clone(),
                )) == Some(*value)
            })
            .map(|(attr, _)| attr.clone())
            .collect();
        skip.skipped += unchanged.len() as i64;
        c.values.retain(|attr, _| !unchanged.contains(attr));
        let (gone, kept): (Vec<_>, Vec<_>) = c
            .consumed
            .into_iter()
            .partition(|p| unchanged.contains(&p.attribute));
        skip.consumed.extend(gone);
        c.consumed = kept;
        if !c.values.is_empty() {
            send.push(c);
        }
    }
    (send, skip)
}

/// Figures of one window, for logs and metrics.
#[derive(Debug, Default)]
struct RunReport {
    actions: u64,
    values_sent: u64,
    values_skipped: u64,
    values_dropped: u64,
    unresolved_users: u64,
    requests: u64,
}

/// Why a window ended early.
enum Stop {
    /// Shutdown was requested.
    Shutdown,
    /// ChurnZero kept failing (or the outbox did); the next window retries.
    Deferred,
}

struct Lane {
    outbox: Outbox,
    client: ChurnZeroClient,
    config: SyncConfig,
    pacer: Pacer,
    shutdown: watch::Receiver<bool>,
    /// The current window's start until its first step with work has been
    /// recorded (that step makes it the "last run" in `/status`).
    unrecorded_start: Option<i64>,
}

/// Runs the lane until shutdown: waits for each planned window, runs it,
/// plans the next. The mapping is not needed here: ingest already applied
/// it (renames, skips, audience trait list) when it stored the updates as
/// `attr_<Field>` keys, so a window sends exactly what was stored.
pub async fn run(
    outbox: Outbox,
    client: ChurnZeroClient,
    _mapping: Arc<MappingConfig>,
    config: SyncConfig,
    shutdown: watch::Receiver<bool>,
) {
    let interval_ms = config.interval.as_millis().max(1) as i64;
    let mut lane = Lane {
        pacer: Pacer::new(config.max_per_minute, config.batch_size),
        outbox,
        client,
        config,
        shutdown,
        unrecorded_start: None,
    };
    let now = now_ms();
    let planned = match lane.outbox.sync_next_run_at().await {
        Ok(Some(at)) => at.min(now + interval_ms),
        Ok(None) => now + interval_ms,
        Err(e) => {
            tracing::warn!(error = %e, "reading the sync schedule failed; planning from now");
            now + interval_ms
        }
    };
    let mut next = planned;
    lane.record(AudienceOp::Schedule { next_run_at: next })
        .await;
    metrics::gauge!("sync_next_run_timestamp_seconds").set(next as f64 / 1000.0);
    let mut leading = false;
    loop {
        let wait = Duration::from_millis((next - now_ms()).max(0) as u64);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = lane.shutdown.wait_for(|s| *s) => return,
        }
        // One instance runs the windows; the others follow the schedule it
        // keeps in the outbox, ready to take over (see LEADER_TTL).
        let now = now_ms();
        let became_leader = match lane.outbox.lead(LEADER_ROLE, LEADER_TTL).await {
            Ok(true) => !std::mem::replace(&mut leading, true),
            Ok(false) | Err(_) => {
                if std::mem::replace(&mut leading, false) {
                    tracing::info!("another instance runs the audience sync windows now");
                }
                let poll = LEADER_TTL.as_millis() as i64 / 2;
                next = match lane.outbox.sync_next_run_at().await {
                    Ok(Some(at)) => at.clamp(now + 1_000, now + poll),
                    _ => now + poll,
                };
                continue;
            }
        };
        if became_leader {
            // Taking over from another instance: its schedule stands.
            if let Ok(Some(at)) = lane.outbox.sync_next_run_at().await
                && at > now
            {
                next = at;
                continue;
            }
        }
        let started = now_ms();
        let planned_next = started + interval_ms;
        lane.unrecorded_start = Some(started);
        lane.record(AudienceOp::Schedule {
            next_run_at: planned_next,
        })
        .await;
        let clock = Instant::now();
        let deadline = clock + Duration::from_millis(interval_ms as u64);
        let mut report = RunReport::default();
        let outcome = lane.window(started, deadline, &mut report).await;
        next = planned_next.max(now_ms());
        if next != planned_next {
            lane.record(AudienceOp::Schedule { next_run_at: next })
                .await;
        }
        metrics::counter!("sync_runs_total").increment(1);
        metrics::histogram!("sync_run_duration_seconds").record(clock.elapsed().as_secs_f64());
        metrics::gauge!("sync_unresolved_users").set(report.unresolved_users as f64);
        metrics::gauge!("sync_next_run_timestamp_seconds").set(next as f64 / 1000.0);
        let how = match outcome {
            Ok(()) => "complete",
            Err(Stop::Deferred) => "deferred to the next window",
            Err(Stop::Shutdown) => "interrupted by shutdown",
        };
        tracing::info!(
            outcome = how,
            actions = report.actions,
            values_sent = report.values_sent,
            values_skipped = report.values_skipped,
            values_dropped = report.values_dropped,
            unresolved_users = report.unresolved_users,
            requests = report.requests,
            ms = clock.elapsed().as_millis() as u64,
            "audience sync run finished"
        );
        if matches!(outcome, Err(Stop::Shutdown)) {
            return;
        }
    }
}

impl Lane {
    /// Writes a schedule step; a failure is logged, as the lane's schedule
    /// lives on in memory and the next step writes it again.
    async fn record(&self, op: AudienceOp) {
        if let Err(e) = self.outbox.audience(op).await {
            tracing::warn!(error = %e, "recording the sync schedule failed");
        }
    }

    async fn settle(&mut self, mut s: AudienceSettlement) -> Result<(), Stop> {
        if s.consumed.is_empty() && s.delivered.is_empty() && s.error.is_none() {
            return Ok(());
        }
        let starts_run = !s.consumed.is_empty() && self.unrecorded_start.is_some();
        if starts_run {
            s.run_started_at = self.unrecorded_start;
        }
        self.outbox
            .audience(AudienceOp::Settle(s))
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "recording sync progress failed; the next window resends");
                Stop::Deferred
            })?;
        if starts_run {
            self.unrecorded_start = None;
        }
        Ok(())
    }

    fn store_failed(e: StoreError) -> Stop {
        tracing::error!(error = %e, "reading audience updates failed; the next window retries");
        Stop::Deferred
    }

    /// One window: every pending update written at or before `cut`, page by
    /// page.
    async fn window(
        &mut self,
        cut: i64,
        deadline: Instant,
        report: &mut RunReport,
    ) -> Result<(), Stop> {
        let reader = self.outbox.clone();
        let mut after = String::new();
        loop {
            if *self.shutdown.borrow() {
                return Err(Stop::Shutdown);
            }
            let users = reader
                .audience_users_after(&after, PAGE_USERS)
                .await
                .map_err(Self::store_failed)?;
            let Some(last) = users.last() else {
                return Ok(());
            };
            after = last.clone();
            let rows = reader
                .audience_pending_for(&users, cut)
                .await
                .map_err(Self::store_failed)?;
            let names: Vec<&str> = users.iter().map(String::as_str).collect();
            let identities = reader
                .identities(&names)
                .await
                .map_err(Self::store_failed)?;
            let merged = merge(rows, &identities);
            report.unresolved_users += merged.unresolved_users.len() as u64;
            let keys: Vec<(String, String, String)> = merged
                .contacts
                .iter()
                .flat_map(|c| {
                    c.values
                        .keys()
                        .map(|attr| (c.ids.account.clone(), c.ids.contact.clone(), attr.clone()))
                })
                .collect();
            let delivered = reader
                .audience_delivered_values(&keys)
                .await
                .map_err(Self::store_failed)?;
            let (send, skip) = drop_unchanged(merged.contacts, &delivered);
            let skipped = skip.skipped as u64;
            self.settle(skip).await?;
            report.values_skipped += skipped;
            metrics::counter!("sync_values_skipped_total").increment(skipped);
            let mut rest = send.into_iter().peekable();
            while rest.peek().is_some() {
                if !self
                    .outbox
                    .lead(LEADER_ROLE, LEADER_TTL)
                    .await
                    .unwrap_or(false)
                {
                    tracing::warn!(
                        "the audience sync lead passed to another instance; this window stops"
                    );
                    return Err(Stop::Deferred);
                }
                let chunk: Vec<ContactUpdate> = rest.by_ref().take(self.pacer.chunk()).collect();
                self.send(chunk, deadline, report).await?;
            }
        }
    }

    /// Sends contacts (one action each), isolating refused ones (see
    /// [`Isolation`]).
    async fn send(
        &mut self,
        contacts: Vec<ContactUpdate>,
        deadline: Instant,
        report: &mut RunReport,
    ) -> Result<(), Stop> {
        let mut parts = Isolation::new(contacts);
        while let Some(part) = parts.next_part() {
            match self.send_with_retries(&part, deadline, report).await? {
                None => {
                    let values: usize = part.iter().map(|c| c.values.len()).sum();
                    let mut s = AudienceSettlement {
                        sent: values as i64,
                        ..Default::default()
                    };
                    for c in part {
                        for (attr, value) in c.values {
                            s.delivered.push(DeliveredValue {
                                account: c.ids.account.clone(),
                                contact: c.ids.contact.clone(),
                                attribute: attr,
                                value,
                            });
                        }
                        s.consumed.extend(c.consumed);
                    }
                    self.settle(s).await?;
                    report.values_sent += values as u64;
                    metrics::counter!("sync_values_sent_total").increment(values as u64);
                }
                Some(error) => {
                    let Some(c) = parts.refused(part) else {
                        continue;
                    };
                    tracing::warn!(account = %c.ids.account, contact = %c.ids.contact, %error,
                        "ChurnZero refused an audience update; dropping it");
                    let values = c.values.len() as u64;
                    report.values_dropped += values;
                    metrics::counter!("sync_values_dropped_total").increment(values);
                    self.settle(AudienceSettlement {
                        consumed: c.consumed,
                        error: Some(format!("sync lane: rejected by ChurnZero: {error}")),
                        ..Default::default()
                    })
                    .await?;
                }
            }
        }
        Ok(())
    }

    /// Sends one request, paced, retrying retryable failures while the
    /// retry fits before the next window. `Ok(None)`: accepted;
    /// `Ok(Some(error))`: refused for good.
    async fn send_with_retries(
        &mut self,
        part: &[ContactUpdate],
        deadline: Instant,
        report: &mut RunReport,
    ) -> Result<Option<String>, Stop> {
        let actions: Vec<Map<String, Value>> = part.iter().map(ContactUpdate::action).collect();
        let mut attempt: u32 = 0;
        loop {
            if *self.shutdown.borrow() {
                return Err(Stop::Shutdown);
            }
            if let Some(at) = self.pacer.ready_at() {
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {}
                    _ = self.shutdown.wait_for(|s| *s) => return Err(Stop::Shutdown),
                }
            }
            self.pacer.book(Instant::now(), actions.len());
            report.requests += 1;
            let outcome = self.client.send(&actions).await;
            let (error, retry_after) = match outcome {
                SendOutcome::Accepted { .. } => {
                    metrics::counter!("sync_requests_total", "outcome" => "delivered").increment(1);
                    metrics::counter!("sync_actions_sent_total").increment(actions.len() as u64);
                    report.actions += actions.len() as u64;
                    return Ok(None);
                }
                SendOutcome::Rejected { error, .. } => {
                    metrics::counter!("sync_requests_total", "outcome" => "rejected").increment(1);
                    return Ok(Some(error));
                }
                SendOutcome::Retryable {
                    error, retry_after, ..
                } => {
                    metrics::counter!("sync_requests_total", "outcome" => "retry").increment(1);
                    (error, retry_after)
                }
            };
            attempt = attempt.saturating_add(1);
            self.settle(AudienceSettlement {
                error: Some(format!("sync lane: {error}")),
                ..Default::default()
            })
            .await?;
            let delay = self
                .config
                .retry
                .delay(attempt, retry_after, rand::random());
            if Instant::now() + delay >= deadline {
                tracing::warn!(%error, attempt, "audience sync request failed; the next window retries");
                return Err(Stop::Deferred);
            }
            tracing::warn!(%error, attempt, delay_ms = delay.as_millis() as u64,
                "audience sync request failed; retrying");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.shutdown.wait_for(|s| *s) => return Err(Stop::Shutdown),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(user: &str, attr: &str, value: &str, at: i64) -> PendingUpdate {
        PendingUpdate {
            user_id: user.into(),
            attribute: attr.into(),
            value: value.into(),
            updated_at: at,
        }
    }

    fn known(
        pairs: &[(&str, Option<&str>, Option<&str>)],
    ) -> HashMap<String, (Option<String>, Option<String>)> {
        pairs
            .iter()
            .map(|(u, a, c)| {
                (
                    u.to_string(),
                    (a.map(str::to_string), c.map(str::to_string)),
                )
            })
            .collect()
    }

    #[test]
    fn pacer_spreads_a_minute_of_actions() {
        let p = Pacer::new(6000, 100);
        assert_eq!(p.chunk(), 100);
        assert_eq!(p.per_action(), Duration::from_millis(10));
        // A low rate sends single actions; the batch size caps a high one.
        assert_eq!(Pacer::new(30, 100).chunk(), 1);
        assert_eq!(Pacer::new(120, 100).chunk(), 2);
        assert_eq!(Pacer::new(600_000, 100).chunk(), 100);

        let mut p = Pacer::new(120, 100);
        let t0 = Instant::now();
        assert_eq!(p.ready_at(), None);
        p.book(t0, 2);
        assert_eq!(p.ready_at(), Some(t0 + Duration::from_secs(1)));
        // Sent late: the next slot counts from the actual send.
        let late = t0 + Duration::from_secs(5);
        p.book(late, 1);
        assert_eq!(p.ready_at(), Some(late + Duration::from_millis(500)));
    }

    #[test]
    fn merge_groups_per_contact_and_keeps_the_latest_value() {
        let rows = vec![
            row("anon", "attr_a", "false", 30),
            row("anon", "attr_b", "true", 5),
            row("nobody", "attr_a", "true", 1),
            row("u1", "attr_a", "true", 20),
            row("u2", "attr_a", "true", 1),
        ];
        let ids = known(&[
            ("u1", Some("acc"), Some("c1")),
            ("anon", Some("acc"), Some("c1")),
            ("u2", Some("acc"), Some("c2")),
            ("nobody", None, Some("x")),
        ]);
        let m = merge(rows, &ids);
        assert_eq!(m.unresolved_users, HashSet::from(["nobody".to_string()]));
        assert_eq!(m.contacts.len(), 2);
        let c1 = &m.contacts[0];
        assert_eq!(c1.ids.contact, "c1");
        assert_eq!(
            c1.values,
            BTreeMap::from([
                ("attr_a".to_string(), "false".to_string()),
                ("attr_b".to_string(), "true".to_string())
            ])
        );
        assert_eq!(c1.consumed.len(), 3);
        assert_eq!(m.contacts[1].ids.contact, "c2");
    }

    #[test]
    fn unchanged_values_are_skipped_and_consumed() {
        let rows = vec![
            row("u1", "attr_a", "true", 1),
            row("u1", "attr_b", "true", 1),
            row("u2", "attr_a", "true", 1),
        ];
        let ids = known(&[
            ("u1", Some("acc"), Some("c1")),
            ("u2", Some("acc"), Some("c2")),
        ]);
        let delivered = HashMap::from([
            (
                ("acc".to_string(), "c1".to_string(), "attr_a".to_string()),
                "true".to_string(),
            ),
            (
                ("acc".to_string(), "c2".to_string(), "attr_a".to_string()),
                "true".to_string(),
            ),
        ]);
        let (send, skip) = drop_unchanged(merge(rows, &ids).contacts, &delivered);
        assert_eq!(skip.skipped, 2);
        assert_eq!(skip.consumed.len(), 2);
        assert_eq!(send.len(), 1);
        assert_eq!(send[0].values.keys().collect::<Vec<_>>(), ["attr_b"]);
        assert_eq!(send[0].consumed.len(), 1);
        let action = Value::Object(send[0].action());
        assert_eq!(
            action,
            serde_json::json!({"action": "setAttribute", "accountExternalId": "acc",
                "contactExternalId": "c1", "entity": "contact", "attr_b": true})
        );
    }
}
