//! Events queued behind a held head cannot be sent before it: `/status`
//! counts them with the held (`held`, of which `held_queued` are queued),
//! not with the pending, and the oldest pending age is that of an event
//! that can be sent. The count is kept through every way a hold ends:
//! identity released, held budget expired; and a replay behind a held head.

mod common;

use churnzero_forwarder::outbox::{
    ClaimedEvent, IdentityUpdate, NewEvent, Outbox, OutboxStatus, SettleOutcome, WriterConfig,
};
use std::time::{Duration, Instant};

fn event(n: u32, user: &str) -> NewEvent {
    NewEvent {
        source: "source-hash".into(),
        message_id: format!("m-{user}-{n}"),
        kind: "track",
        order_key: user.into(),
        payload: format!(r#"{{"type":"track","userId":"{user}","event":"e{n}"}}"#),
        forward: true,
        identity: None,
        audience: Vec::new(),
    }
}

fn identify(user: &str) -> NewEvent {
    NewEvent {
        kind: "identify",
        message_id: format!("m-{user}-identify"),
        identity: Some(IdentityUpdate {
            user_id: user.into(),
            account: Some(format!("acc-{user}")),
            contact: Some(user.into()),
            previous_id: None,
        }),
        ..event(0, user)
    }
}

/// Claims everything due and settles `held_user`'s events as held, the
/// others as released (never sent).
async fn hold(outbox: &Outbox, held_user: &str) -> Vec<ClaimedEvent> {
    let claimed = outbox.claim(100, Duration::from_secs(60)).await.unwrap();
    let settlements = claimed
        .iter()
        .map(|e| {
            common::settlement(
                e,
                if e.order_key == held_user {
                    SettleOutcome::Held {
                        error: "unresolved identity".into(),
                        map_as_of: e.claimed_at,
                    }
                } else {
                    SettleOutcome::Release
                },
            )
        })
        .collect();
    outbox.settle(settlements).await.unwrap();
    claimed
}

fn counts(s: &OutboxStatus) -> (i64, i64, i64, i64) {
    (s.pending, s.held, s.held_queued, s.in_flight)
}

on_both_backends! {
#[tokio::test]
async fn events_behind_a_held_head_count_as_held_and_do_not_age_the_pending(db: &Path) {
    let outbox = Outbox::open(db, WriterConfig::default())
        .await
        .unwrap();
    // h: three events, the first of which will wait for ids; p: one event
    // accepted clearly later.
    outbox
        .ingest(vec![event(1, "h"), event(2, "h"), event(3, "h")])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let p_sent = Instant::now();
    outbox.ingest(vec![event(1, "p")]).await.unwrap();
    hold(&outbox, "h").await;

    let s = outbox.status().await.unwrap();
    assert_eq!(counts(&s), (1, 3, 2, 0), "{s:?}");
    // The oldest pending is p's event, not h's queued ones (300 ms older).
    let pending_ms = s.oldest_pending_age_seconds * 1000.0;
    assert!(
        pending_ms <= p_sent.elapsed().as_millis() as f64 + 5.0,
        "oldest pending {pending_ms} ms"
    );
    assert!(
        s.oldest_held_age_seconds * 1000.0 >= pending_ms + 250.0,
        "{s:?}"
    );

    // More of h's events arrive while it is held: they count as held too.
    outbox.ingest(vec![event(4, "h")]).await.unwrap();
    let s = outbox.status().await.unwrap();
    assert_eq!(counts(&s), (1, 4, 3, 0), "{s:?}");

    // h's ids arrive: the head is released and its queue is pending again.
    outbox.ingest(vec![identify("h")]).await.unwrap();
    let s = outbox.status().await.unwrap();
    assert_eq!((s.held, s.held_queued), (0, 0), "{s:?}");
    assert_eq!(s.pending, 6, "h's four, p's and the identify: {s:?}");
    assert!(s.oldest_pending_age_seconds * 1000.0 >= 300.0, "{s:?}");
}
}

on_both_backends! {
/// A held outcome holds its key only when its event is the key's head once
/// the rest of the settle is written; behind an event retried in the same
/// settle it queues instead, and behind a held head it queues behind it. A
/// worker settles a batch so when a user's first event is sent and the
/// ones after it wait for ids (the key is blocked from then on), and the
/// request fails (retried) or succeeds (delivered). Each backend decides
/// this in its own way (PostgreSQL holds them all and lets its
/// normalisation queue those behind a head, SQLite decides per event): the
/// states must be the same.
#[tokio::test]
async fn held_outcomes_hold_only_the_head_the_settle_leaves(db: &Path) {
    let outbox = Outbox::open(db, WriterConfig::default()).await.unwrap();
    let group = [("r", 3), ("d", 3), ("h", 2)]
        .iter()
        .flat_map(|(user, n)| (1..=*n).map(move |i| event(i, user)))
        .collect();
    assert_eq!(outbox.ingest(group).await.unwrap().stored, 8);
    let mut claimed = outbox.claim(100, Duration::from_secs(60)).await.unwrap();
    assert_eq!(claimed.len(), 8, "every head with its queue: {claimed:?}");
    claimed.sort_by_key(|e| e.id);
    let now = churnzero_forwarder::outbox::now_ms();
    let mut first = std::collections::HashSet::new();
    let settlements = claimed
        .iter()
        .map(|e| {
            let held = SettleOutcome::Held {
                error: "unresolved identity".into(),
                map_as_of: e.claimed_at,
            };
            let outcome = match (e.order_key.as_str(), first.insert(e.order_key.clone())) {
                ("r", true) => SettleOutcome::Retry {
                    at: now,
                    error: "HTTP 503".into(),
                },
                ("d", true) => SettleOutcome::Delivered,
                _ => held,
            };
            common::settlement(e, outcome)
        })
        .collect();
    outbox.settle(settlements).await.unwrap();
    // r: its retried head is due, the two behind it pending with it.
    // d: its second event holds the key, the third queued behind it.
    // h: its head holds the key, the second queued behind it.
    let s = outbox.status().await.unwrap();
    assert_eq!((counts(&s), s.delivered), ((3, 4, 2, 0), 1), "{s:?}");
    let messages = |batch: &[ClaimedEvent]| {
        let mut batch = batch.to_vec();
        batch.sort_by_key(|e| e.id);
        batch
            .iter()
            .map(|e| {
                let v: serde_json::Value = serde_json::from_str(&e.payload).unwrap();
                format!("{}{}", e.order_key, &v["event"].as_str().unwrap()[1..])
            })
            .collect::<Vec<_>>()
    };
    let again = outbox.claim(100, Duration::from_secs(60)).await.unwrap();
    assert_eq!(messages(&again), ["r1", "r2", "r3"]);
    let delivered = again
        .iter()
        .map(|e| common::settlement(e, SettleOutcome::Delivered))
        .collect();
    outbox.settle(delivered).await.unwrap();
    // Their ids arrive: each key is sent from the head it held, in order.
    outbox
        .ingest(vec![identify("d"), identify("h")])
        .await
        .unwrap();
    let released = outbox.claim(100, Duration::from_secs(60)).await.unwrap();
    let tracks: Vec<ClaimedEvent> = released
        .into_iter()
        .filter(|e| e.kind == "track")
        .collect();
    assert_eq!(messages(&tracks), ["d2", "d3", "h1", "h2"]);
}
}

/// Holds x's head, lets its held budget run out (the head dies, the
/// follower is pending), then holds the follower in turn: the dead head's id.
async fn expire_and_hold_again(outbox: &Outbox) -> i64 {
    outbox
        .ingest(vec![event(1, "x"), event(2, "x")])
        .await
        .unwrap();
    hold(outbox, "x").await;
    assert_eq!(counts(&outbox.status().await.unwrap()), (0, 2, 1, 0));

    // The held budget runs out: the head is dead, the follower is pending.
    tokio::time::sleep(Duration::from_millis(20)).await;
    outbox
        .maintain(Duration::from_secs(3600), Duration::from_millis(1))
        .await
        .unwrap();
    let s = outbox.status().await.unwrap();
    assert_eq!((counts(&s), s.dead), ((1, 0, 0, 0), 1), "{s:?}");
    let dead_id = outbox.dead_list(&Default::default()).await.unwrap()[0].id;

    // The follower is held in turn.
    hold(outbox, "x").await;
    assert_eq!(counts(&outbox.status().await.unwrap()), (0, 1, 0, 0));
    dead_id
}

on_both_backends! {
#[tokio::test]
async fn the_held_count_follows_expiry(db: &Path) {
    let outbox = Outbox::open(db, WriterConfig::default()).await.unwrap();
    expire_and_hold_again(&outbox).await;
}
}

// SQLite only: where a replayed older event lands beside a held head is the
// engine's choice (PostgreSQL makes the lowest id of a key its head again).
#[tokio::test]
async fn a_replay_behind_a_held_head_counts_as_held() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&dir.path().join("o.db"), WriterConfig::default())
        .await
        .unwrap();
    let dead_id = expire_and_hold_again(&outbox).await;
    // Replaying the dead head puts it in the queue behind that held event:
    // held as well.
    assert_eq!(outbox.replay(Some(vec![dead_id])).await.unwrap(), 1);
    let s = outbox.status().await.unwrap();
    assert_eq!((counts(&s), s.dead), ((0, 2, 1, 0), 0), "{s:?}");
}

/// One request of mixed events, `(n, user)` each: a pair seen before is the
/// same message again, and user "f"'s events are acknowledged but not
/// forwarded.
fn mixed(events: &[(u32, &str)]) -> Vec<NewEvent> {
    events
        .iter()
        .map(|(n, user)| NewEvent {
            forward: *user != "f",
            ..event(*n, user)
        })
        .collect()
}

/// Ingest keeps the counters of the rows it inserts (pending heads, events
/// queued behind their user's head, and those queued behind a held head)
/// in its own transaction, without triggers: requests that share one
/// group, repeats within a request and across requests, filtered events.
/// `check` also compares the counters with a count of the rows themselves.
async fn mixed_ingest_counts<F, Fut>(outbox: &Outbox, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    // Two requests at once (one group when the writer takes them together):
    // heads a, b, c; a queued twice; repeats of a#1 and b#1; one filtered.
    let (r1, r2) = tokio::join!(
        outbox.ingest(mixed(&[(1, "a"), (2, "a"), (1, "b"), (1, "f"), (1, "a")])),
        outbox.ingest(mixed(&[(3, "a"), (1, "c"), (1, "b")])),
    );
    let (r1, r2) = (r1.unwrap(), r2.unwrap());
    assert_eq!(
        (
            r1.stored + r2.stored,
            r1.duplicates + r2.duplicates,
            r1.filtered + r2.filtered
        ),
        (5, 2, 1),
        "{r1:?} {r2:?}"
    );
    let s = outbox.status().await.unwrap();
    assert_eq!(counts(&s), (5, 0, 0, 0), "{s:?}");
    assert_eq!((s.accepted, s.duplicates, s.filtered), (5, 2, 1), "{s:?}");
    check().await;

    // Only repeats: nothing is stored, nothing counted but the repeats.
    let r = outbox
        .ingest(mixed(&[(1, "a"), (3, "a"), (1, "c")]))
        .await
        .unwrap();
    assert_eq!((r.stored, r.duplicates), (0, 3), "{r:?}");
    let s = outbox.status().await.unwrap();
    assert_eq!(counts(&s), (5, 0, 0, 0), "{s:?}");
    check().await;

    // a's head waits for ids: its queue counts as held, and so do a's
    // events that arrive now, beside new heads and their queues.
    hold(outbox, "a").await;
    let s = outbox.status().await.unwrap();
    assert_eq!(counts(&s), (2, 3, 2, 0), "{s:?}");
    outbox
        .ingest(mixed(&[(4, "a"), (1, "d"), (2, "d"), (5, "a"), (2, "b")]))
        .await
        .unwrap();
    let s = outbox.status().await.unwrap();
    assert_eq!(counts(&s), (5, 5, 4, 0), "{s:?}");
    check().await;

    // a's ids arrive in the same request as more of a's events (inserted
    // as held, then released with the rest): nothing is held any more.
    outbox
        .ingest(vec![event(6, "a"), identify("a")])
        .await
        .unwrap();
    let s = outbox.status().await.unwrap();
    assert_eq!(counts(&s), (12, 0, 0, 0), "{s:?}");
    assert_eq!(s.accepted, 12, "{s:?}");
    check().await;

    // Everything is delivered: every counter is back at zero. The first
    // settle gives one event back unsent, so deliveries are counted both
    // through a settle of mixed outcomes and through all-delivered ones.
    let mut first = true;
    loop {
        let claimed = outbox.claim(100, Duration::from_secs(60)).await.unwrap();
        if claimed.is_empty() {
            break;
        }
        // With the claim's leases in flight, too.
        check().await;
        let settlements = claimed
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let outcome = if first && i == 0 {
                    SettleOutcome::Release
                } else {
                    SettleOutcome::Delivered
                };
                common::settlement(e, outcome)
            })
            .collect();
        outbox.settle(settlements).await.unwrap();
        first = false;
        check().await;
    }
    let s = outbox.status().await.unwrap();
    assert_eq!((counts(&s), s.delivered), ((0, 0, 0, 0), 12), "{s:?}");
    check().await;
}

/// One settle holds a head and delivers the event queued behind it (a
/// worker may settle a batch so): the delivered event leaves the held
/// queue's count as it leaves the queue. Runs after `mixed_ingest_counts`
/// on the same outbox, whose 12 events are delivered by then.
async fn a_delivered_follower_leaves_the_held_queue<F, Fut>(outbox: &Outbox, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    outbox
        .ingest(vec![event(1, "h"), event(2, "h"), event(3, "h")])
        .await
        .unwrap();
    let mut claimed = outbox.claim(100, Duration::from_secs(60)).await.unwrap();
    assert_eq!(claimed.len(), 3, "the head with its queue: {claimed:?}");
    claimed.sort_by_key(|e| e.id);
    let settlements = claimed
        .iter()
        .enumerate()
        .map(|(i, e)| {
            // The head and the last are held; the one between is delivered.
            let outcome = if i == 1 {
                SettleOutcome::Delivered
            } else {
                SettleOutcome::Held {
                    error: "unresolved identity".into(),
                    map_as_of: e.claimed_at,
                }
            };
            common::settlement(e, outcome)
        })
        .collect();
    outbox.settle(settlements).await.unwrap();
    let s = outbox.status().await.unwrap();
    assert_eq!((counts(&s), s.delivered), ((0, 2, 1, 0), 13), "{s:?}");
    check().await;
}

on_both_backends! {
#[tokio::test]
async fn ingest_counts_what_it_stores(db: &Path) {
    let outbox = Outbox::open(db, WriterConfig::default()).await.unwrap();
    mixed_ingest_counts(&outbox, || async {}).await;
    a_delivered_follower_leaves_the_held_queue(&outbox, || async {}).await;
}
}

/// SQLite keeps `state_counts` and `held_keys` by hand on ingest and on
/// delivery: after each step they must equal a count of the rows.
#[tokio::test]
async fn sqlite_counters_match_the_rows_after_ingest_and_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let outbox = Outbox::open(&path, WriterConfig::default()).await.unwrap();
    let url = format!("sqlite://{}", path.display());
    let check = || {
        let url = url.clone();
        async move {
            use sqlx::Connection;
            let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
            // Row 1 counts leases and row 6 the queued behind a held head.
            let drift: Vec<(i64, i64, i64)> = sqlx::query_as(
                "SELECT c.state, c.n, CASE c.state \
                   WHEN 1 THEN (SELECT COUNT(*) FROM leases) \
                   WHEN 6 THEN (SELECT COUNT(*) FROM events q WHERE q.state = 5 \
                     AND EXISTS (SELECT 1 FROM events h WHERE h.order_key = q.order_key \
                                 AND h.state = 4)) \
                   ELSE (SELECT COUNT(*) FROM events e WHERE e.state = c.state) END AS actual \
                 FROM state_counts c WHERE c.n <> actual",
            )
            .fetch_all(&mut conn)
            .await
            .unwrap();
            assert!(drift.is_empty(), "(state, counter, rows): {drift:?}");
            let (kept, counted): (i64, i64) = sqlx::query_as(
                "SELECT (SELECT COALESCE(SUM(queued), 0) FROM held_keys), \
                        (SELECT n FROM state_counts WHERE state = 6)",
            )
            .fetch_one(&mut conn)
            .await
            .unwrap();
            assert_eq!(kept, counted, "held_keys against state_counts row 6");
            conn.close().await.unwrap();
        }
    };
    mixed_ingest_counts(&outbox, check).await;
    a_delivered_follower_leaves_the_held_queue(&outbox, check).await;
}

/// PostgreSQL keeps its sharded counters by hand on ingest (migration 0013)
/// and by triggers on every other change: after each step the sums of the
/// 16 shards must equal a count of the rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_counters_match_the_rows_after_ingest_and_delivery() {
    let Some(pg) = common::PgDb::create().await else {
        return;
    };
    let url = pg.url();
    let outbox = Outbox::open(std::path::Path::new(&url), WriterConfig::default())
        .await
        .unwrap();
    let check = || {
        let url = url.clone();
        async move {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
            // (counter, rows) per state, then leases and the held queues.
            let pairs: (i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64) =
                sqlx::query_as(
                    "SELECT (SELECT sum(s0) FROM counters)::int8, \
                            (SELECT count(*) FROM events WHERE state = 0), \
                            (SELECT sum(s2) FROM counters)::int8, \
                            (SELECT count(*) FROM events WHERE state = 2), \
                            (SELECT sum(s4) FROM counters)::int8, \
                            (SELECT count(*) FROM events WHERE state = 4), \
                            (SELECT sum(s5) FROM counters)::int8, \
                            (SELECT count(*) FROM events WHERE state = 5), \
                            (SELECT sum(leased) FROM counters)::int8, \
                            (SELECT count(*) FROM leases), \
                            (SELECT sum(held_queued) FROM counters)::int8, \
                            (SELECT count(*) FROM events q WHERE q.state = 5 AND EXISTS \
                               (SELECT 1 FROM events h WHERE h.order_key = q.order_key \
                                AND h.state = 4))",
                )
                .fetch_one(&mut conn)
                .await
                .unwrap();
            let (a, b, c, d, e, f, g, h, i, j, k, l) = pairs;
            assert_eq!(
                [(a, b), (c, d), (e, f), (g, h), (i, j), (k, l)],
                [(b, b), (d, d), (f, f), (h, h), (j, j), (l, l)],
                "(counter, rows) for states 0, 2, 4, 5, leases, held queues"
            );
            conn.close().await.unwrap();
        }
    };
    mixed_ingest_counts(&outbox, check).await;
    a_delivered_follower_leaves_the_held_queue(&outbox, check).await;
}
