//! Events queued behind a held head cannot be sent before it: `/status`
//! counts them with the held (`held`, of which `held_queued` are queued),
//! not with the pending, and the oldest pending age is that of an event
//! that can be sent. The count is kept through every way a hold ends:
//! identity released, held budget expired; and a replay behind a held head.

mod common;

use churnzero_forwarder::outbox::{
    ClaimedEvent, IdentityUpdate, NewEvent, Outbox, OutboxStatus, SettleOutcome, Settlement,
    WriterConfig,
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
        .map(|e| Settlement {
            id: e.id,
            lease: e.lease,
            order_key: e.order_key.clone(),
            first_attempt_at: e.first_attempt_at,
            outcome: if e.order_key == held_user {
                SettleOutcome::Held {
                    error: "unresolved identity".into(),
                    map_as_of: e.claimed_at,
                }
            } else {
                SettleOutcome::Release
            },
            actions: None,
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
