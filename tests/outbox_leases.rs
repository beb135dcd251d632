//! Claims and leases on both backends, through the outbox's own API:
//! a claim hands events out without rewriting them, counts them in flight,
//! keeps a user's order (head first, its queued followers in the same
//! batch), and an outcome only counts while its lease is held.

mod common;

use churnzero_forwarder::outbox::{
    NewEvent, Outbox, SettleOutcome, Settlement, StoreError, WriterConfig, now_ms,
};
use common::wait_for;
use std::time::Duration;

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

fn settle_all(
    claimed: &[churnzero_forwarder::outbox::ClaimedEvent],
    outcome: SettleOutcome,
) -> Vec<Settlement> {
    claimed
        .iter()
        .map(|e| common::settlement(e, outcome.clone()))
        .collect()
}

async fn open(path: &std::path::Path) -> Outbox {
    Outbox::open(path, WriterConfig::default()).await.unwrap()
}

on_both_backends! {
#[tokio::test]
async fn a_claim_takes_a_users_head_with_its_followers_and_counts_them_in_flight(db: &Path) {
    let outbox = open(db).await;
    // Interleaved users: a1 b1 a2 b2 a3 b3.
    let mut events = Vec::new();
    for n in 1..=3 {
        events.push(event(n, "a"));
        events.push(event(n, "b"));
    }
    outbox.ingest(events).await.unwrap();

    let first = outbox.claim(4, Duration::from_secs(60)).await.unwrap();
    let names: Vec<(String, i64)> = first
        .iter()
        .map(|e| (e.order_key.clone(), e.attempts))
        .collect();
    // User a's whole backlog and b's head, in acceptance order; b's
    // followers wait behind their in-flight head.
    assert_eq!(
        names,
        vec![
            ("a".into(), 1),
            ("b".into(), 1),
            ("a".into(), 1),
            ("a".into(), 1)
        ]
    );
    let s = outbox.status().await.unwrap();
    assert_eq!((s.pending, s.in_flight), (2, 4));
    // Nothing else is claimable: b's head is in flight, its followers queued.
    assert!(
        outbox
            .claim(4, Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty()
    );

    outbox
        .settle(settle_all(&first, SettleOutcome::Delivered))
        .await
        .unwrap();
    let s = outbox.status().await.unwrap();
    assert_eq!((s.pending, s.in_flight, s.delivered), (2, 0, 4));
    // b's next event was promoted and comes with its follower.
    let second = outbox.claim(4, Duration::from_secs(60)).await.unwrap();
    let payloads: Vec<&str> = second.iter().map(|e| e.payload.as_str()).collect();
    assert_eq!(payloads.len(), 2);
    assert!(payloads[0].contains("\"e2\"") && payloads[1].contains("\"e3\""));
}
}

on_both_backends! {
#[tokio::test]
async fn an_outcome_after_the_lease_expired_and_was_reclaimed_is_ignored(db: &Path) {
    let outbox = open(db).await;
    outbox.ingest(vec![event(1, "u")]).await.unwrap();

    let stale = outbox.claim(10, Duration::from_millis(1)).await.unwrap();
    assert_eq!(stale.len(), 1);
    // Wait for the lease to lapse, then let maintenance return it.
    while now_ms() <= stale[0].lease {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let report = outbox
        .maintain(Duration::from_secs(3600), Duration::from_secs(3600))
        .await
        .unwrap();
    // On PostgreSQL the heartbeat also brings expired leases back, and may
    // have done so first: either way the lease is back now.
    assert!(report.leases_released <= 1, "{report:?}");
    assert_eq!(outbox.status().await.unwrap().in_flight, 0);

    // A heartbeat's recovery may still hold the key's lock for a moment.
    let fresh = common::claim_n(1, |n| outbox.claim(n, Duration::from_secs(60))).await;
    assert_eq!(fresh.len(), 1);
    assert_eq!(fresh[0].id, stale[0].id);
    // The first worker comes back late with a failure: it no longer owns
    // the event, so nothing changes.
    outbox
        .settle(settle_all(
            &stale,
            SettleOutcome::Dead {
                reason: "late".into(),
            },
        ))
        .await
        .unwrap();
    let s = outbox.status().await.unwrap();
    assert_eq!((s.dead, s.in_flight), (0, 1));
    outbox
        .settle(settle_all(&fresh, SettleOutcome::Delivered))
        .await
        .unwrap();
    let s = outbox.status().await.unwrap();
    assert_eq!((s.delivered, s.in_flight, s.pending, s.dead), (1, 0, 0, 0));
}
}

on_both_backends! {
#[tokio::test]
async fn a_late_delivery_after_the_lease_was_reclaimed_is_ignored(db: &Path) {
    let outbox = open(db).await;
    outbox
        .ingest(vec![event(1, "late"), event(2, "late"), event(1, "other")])
        .await
        .unwrap();

    let stale = outbox.claim(10, Duration::from_millis(1)).await.unwrap();
    assert_eq!(stale.len(), 3);
    while now_ms() <= stale[0].lease {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    outbox
        .maintain(Duration::from_secs(3600), Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(outbox.status().await.unwrap().in_flight, 0);
    let fresh = common::claim_n(3, |n| outbox.claim(n, Duration::from_secs(60))).await;
    assert_eq!(fresh.len(), 3);

    // The first worker reports every event delivered, too late: the events
    // belong to the second claim, so none of them counts as delivered.
    outbox
        .settle(settle_all(&stale, SettleOutcome::Delivered))
        .await
        .unwrap();
    let s = outbox.status().await.unwrap();
    assert_eq!((s.delivered, s.in_flight), (0, 3));

    // The owner's outcome still applies, in the users' order.
    outbox
        .settle(settle_all(&fresh, SettleOutcome::Delivered))
        .await
        .unwrap();
    let s = outbox.status().await.unwrap();
    assert_eq!((s.delivered, s.in_flight, s.pending), (3, 0, 0));
}
}

on_both_backends! {
#[tokio::test]
async fn a_restart_returns_every_claim_and_keeps_the_attempt_count_honest(db: &Path) {
    {
        let outbox = open(db).await;
        outbox
            .ingest(vec![event(1, "u"), event(2, "u")])
            .await
            .unwrap();
        let claimed = outbox.claim(10, Duration::from_secs(600)).await.unwrap();
        assert_eq!(claimed.len(), 2);
        // A retry records the attempt on the row.
        outbox
            .settle(settle_all(
                &claimed,
                SettleOutcome::Retry {
                    at: now_ms(),
                    error: "HTTP 503".into(),
                },
            ))
            .await
            .unwrap();
        let again = outbox.claim(10, Duration::from_secs(600)).await.unwrap();
        assert_eq!(
            again.iter().map(|e| e.attempts).collect::<Vec<_>>(),
            vec![2, 2]
        );
        assert_eq!(outbox.status().await.unwrap().in_flight, 2);
        // The process goes away with both events in flight.
    }
    let outbox = open(db).await;
    // The claims come back: at once where the new process owns the file
    // alone (SQLite), once the gone instance's heartbeat has expired where
    // instances share the database (PostgreSQL, 10 s).
    if outbox.backend() == "sqlite" {
        let s = outbox.status().await.unwrap();
        assert_eq!((s.pending, s.in_flight), (2, 0));
    }
    wait_for("the claims to come back", Duration::from_secs(60), || async {
        outbox
            .maintain(Duration::from_secs(3600), Duration::from_secs(3600))
            .await
            .unwrap();
        let s = outbox.status().await.unwrap();
        ((s.pending, s.in_flight) == (2, 0)).then_some(())
    })
    .await;
    let claimed = common::claim_n(2, |n| outbox.claim(n, Duration::from_secs(600))).await;
    // The attempt cut short by the restart never reached ChurnZero's answer,
    // so it is not counted: this is the second recorded attempt.
    assert_eq!(
        claimed.iter().map(|e| e.attempts).collect::<Vec<_>>(),
        vec![2, 2]
    );
    assert!(claimed[0].payload.contains("\"e1\""));
}
}

on_both_backends! {
#[tokio::test]
async fn events_in_flight_count_once_against_the_backlog_limit(db: &Path) {
    let config = WriterConfig {
        max_backlog: 5,
        ..WriterConfig::default()
    };
    let outbox = Outbox::open(db, config)
        .await
        .unwrap();
    let four: Vec<NewEvent> = (1..=4).map(|n| event(n, &format!("u{n}"))).collect();
    outbox.ingest(four).await.unwrap();
    let claimed = outbox.claim(10, Duration::from_secs(60)).await.unwrap();
    assert_eq!(claimed.len(), 4);
    // 4 waiting (all in flight) + 1 fits a limit of 5; a sixth does not.
    outbox.ingest(vec![event(5, "u5")]).await.unwrap();
    let refused = outbox.ingest(vec![event(6, "u6")]).await;
    assert!(
        matches!(refused, Err(StoreError::Backlog(5))),
        "the sixth event is over the limit: {refused:?}"
    );
}
}

on_both_backends! {
#[tokio::test]
async fn events_queued_behind_a_held_head_are_held_and_do_not_age_the_pending(db: &Path) {
    let outbox = open(db).await;
    // User h: two events; user p: one event accepted clearly later.
    outbox
        .ingest(vec![event(1, "h"), event(2, "h")])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let p_sent = std::time::Instant::now();
    outbox.ingest(vec![event(1, "p")]).await.unwrap();

    // h's head waits for its ids (held), its second event queues behind it;
    // p's event goes back to pending untouched.
    let claimed = outbox.claim(10, Duration::from_secs(60)).await.unwrap();
    assert_eq!(claimed.len(), 3);
    let settlements = claimed
        .iter()
        .map(|e| {
            common::settlement(
                e,
                if e.order_key == "h" {
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

    let s = outbox.status().await.unwrap();
    // h's queued event cannot be sent before its head: it counts as held.
    assert_eq!(
        (s.pending, s.held, s.held_queued, s.in_flight),
        (1, 2, 1, 0)
    );
    let pending_ms = s.oldest_pending_age_seconds * 1000.0;
    // The oldest pending is p's event; h's older queued one does not age it.
    assert!(
        pending_ms <= p_sent.elapsed().as_millis() as f64 + 5.0,
        "oldest pending {pending_ms} ms"
    );
    assert!(s.oldest_held_age_seconds * 1000.0 > p_sent.elapsed().as_millis() as f64 + 50.0);
}
}
