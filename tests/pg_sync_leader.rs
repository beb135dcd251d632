//! The audience sync lane with three instances (the real binary) on one
//! PostgreSQL database: one instance at a time runs the windows, so every
//! contact's change is sent once, not once per instance; and when that
//! instance dies, another takes the windows over within the leader lease.

mod common;

use common::*;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(90);

fn audience(user: &str, member: bool) -> Value {
    json!({"type": "identify", "userId": user, "traits": {"power_users": member},
           "context": {"personas": {"computation_class": "audience", "computation_key": "power_users",
                                    "computation_id": "aud_power_users", "space_id": "spa_1"}}})
}

/// Audience actions the mock accepted, per contact.
fn sent_per_contact(
    mock: &churnzero_forwarder::mock_churnzero::MockState,
) -> HashMap<String, usize> {
    let mut per = HashMap::new();
    for a in mock.actions() {
        if a.get("attr_power_users").is_some() {
            let c = a["contactExternalId"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            *per.entry(c).or_default() += 1;
        }
    }
    per
}

fn windows_run(b: &Binary) -> usize {
    b.logs()
        .lines()
        .filter(|l| l.contains("audience sync run finished") && !l.contains("actions=0"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_runs_the_sync_windows_and_another_takes_over_when_it_dies() {
    const CONTACTS: usize = 300;
    let Some(pg) = PgDb::create().await else {
        return;
    };
    let url = pg.url();
    let db = Path::new(&url);
    let mock = mock().await;
    let state = mock.state();
    let args = ["--sync-interval", "1s", "--sync-max-per-minute", "60000"];
    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(Binary::serve(db, &mock.url(), &args).await);
    }

    // Identities first (each contact needs its ids), then the memberships,
    // spread over the instances.
    for (n, chunk) in (0..CONTACTS).collect::<Vec<_>>().chunks(50).enumerate() {
        let mut events: Vec<Value> = chunk
            .iter()
            .map(|i| identify(&format!("c{i}"), "acct-1"))
            .collect();
        events.extend(chunk.iter().map(|i| audience(&format!("c{i}"), true)));
        let base = &instances[n % 3].base;
        let (code, body) = post(base, "/v1/batch", &json!({ "batch": events })).await;
        assert_eq!(code, 200, "{body}");
    }
    wait_for("every membership at ChurnZero", WAIT, || async {
        (sent_per_contact(&state).len() == CONTACTS).then_some(())
    })
    .await;
    // Windows keep running every second: give the others the chance to
    // send the same changes again if they were running windows too.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let per = sent_per_contact(&state);
    let twice: Vec<_> = per.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "sent more than once: {twice:?}");
    let leaders: Vec<usize> = (0..3).filter(|i| windows_run(&instances[*i]) > 0).collect();
    assert_eq!(
        leaders.len(),
        1,
        "windows with work ran on instances {leaders:?}"
    );
    let leader = leaders[0];

    // The leader dies; new memberships arrive at another instance.
    instances[leader].kill9();
    let other = (leader + 1) % 3;
    let changes: Vec<Value> = (0..CONTACTS)
        .map(|i| audience(&format!("c{i}"), false))
        .collect();
    let (code, body) = post(
        &instances[other].base,
        "/v1/batch",
        &json!({ "batch": changes }),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let died = std::time::Instant::now();
    wait_for("the changes sent by a new leader", WAIT, || async {
        let per = sent_per_contact(&state);
        (per.len() == CONTACTS && per.values().all(|n| *n == 2)).then_some(())
    })
    .await;
    let took = died.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let per = sent_per_contact(&state);
    assert!(
        per.values().all(|n| *n == 2),
        "after the takeover a change was sent more than once"
    );
    let new_leaders: Vec<usize> = (0..3)
        .filter(|i| *i != leader && windows_run(&instances[*i]) > 0)
        .collect();
    assert_eq!(new_leaders.len(), 1, "{new_leaders:?}");
    say(&format!(
        "sync leader: instance {leader} ran the windows; after its SIGKILL instance {} took \
         over and sent {CONTACTS} changes once each, {:.1} s after the kill",
        new_leaders[0],
        took.as_secs_f64()
    ));
    for b in &mut instances {
        b.kill9();
    }
    mock.shutdown().await;
}
