//! The offline operator commands, run as the real binary against a database
//! that a real server (also the real binary) filled through the known
//! scenario: `status`, `status --json`, `dead list|show|replay|purge`, beside
//! the running server and after it stopped.

mod common;

use common::*;
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

async fn cli(db: &Path, args: &[&str]) -> (i32, String, String) {
    let db = db.to_str().unwrap();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--database", db]);
    run_binary(&all).await
}

async fn ok(db: &Path, args: &[&str]) -> String {
    let (code, out, err) = cli(db, args).await;
    assert_eq!(code, 0, "{args:?} failed: {err}\n{out}");
    out
}

/// The number on the `name` row of the EVENTS table.
fn table_count(out: &str, name: &str) -> i64 {
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with(name))
        .unwrap_or_else(|| panic!("no `{name}` row in\n{out}"));
    line.trim_start()[name.len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("no count on `{line}`"))
}

fn ids_of(page: &Value) -> Vec<i64> {
    page["dead"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_i64().unwrap())
        .collect()
}

struct Env {
    mock: churnzero_forwarder::mock_churnzero::MockChurnZero,
    server: Binary,
}

/// A server on the outbox `db` names, through the operator scenario.
async fn scenario_env(db: &Path) -> Env {
    let mock = mock().await;
    poison_mock(&mock);
    let server = Binary::serve(db, &mock.url(), &[]).await;
    operator_scenario(&server.base).await;
    Env { mock, server }
}

on_both_backends! {
#[tokio::test]
async fn status_prints_a_table_and_the_same_json_as_the_server(db: &Path) {
    let env = scenario_env(db).await;

    let table = ok(db, &["status"]).await;
    assert_eq!(table_count(&table, "pending"), 0, "{table}");
    assert_eq!(table_count(&table, "in flight"), 0, "{table}");
    assert_eq!(table_count(&table, "held"), 3, "{table}");
    assert!(table.contains("(2 queued behind)"), "{table}");
    assert_eq!(table_count(&table, "delivered"), 6, "{table}");
    assert_eq!(table_count(&table, "dead"), 2, "{table}");
    assert!(table.contains("accepted 11"), "{table}");
    assert!(table.contains("RECENT ERRORS"), "{table}");
    assert!(table.contains("rejected by ChurnZero"), "{table}");
    assert!(table.contains("AUDIENCE SYNC"), "{table}");
    assert!(table.contains("waiting for identity"), "{table}");

    let json: Value = serde_json::from_str(&ok(db, &["status", "--json"]).await).unwrap();
    let http = status(&env.server.base).await;
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    // The server adds `flow`, the figures of its own requests to ChurnZero.
    let mut server_keys = keys(&http);
    server_keys.retain(|k| k != "flow");
    assert_eq!(keys(&json), server_keys, "same fields as GET /status");
    assert!(http["flow"].is_object(), "{http}");
    assert_eq!(keys(&json["sync"]), keys(&http["sync"]));
    for field in [
        "pending",
        "in_flight",
        "delivered",
        "dead",
        "held",
        "accepted",
        "filtered",
        "duplicates",
        "retries",
        "last_delivery_at",
        "last_error",
        "recent_errors",
        "sync",
    ] {
        assert_eq!(json[field], http[field], "{field}");
    }
    assert_eq!(json["per_minute"].as_array().unwrap().len(), 60);

    let (code, _, err) = run_binary(&["status", "--database", "/nonexistent/o.db"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("no database at /nonexistent/o.db"), "{err}");
    assert!(!table.contains(APP_KEY) && !json.to_string().contains(APP_KEY));
}
}

on_both_backends! {
#[tokio::test]
async fn dead_list_filters_pages_and_shows(db: &Path) {
    let _env = scenario_env(db).await;

    let page: Value = serde_json::from_str(&ok(db, &["dead", "list", "--json"]).await).unwrap();
    let ids = ids_of(&page);
    assert_eq!(ids.len(), 2);
    assert!(page["next_after"].is_null());

    let table = ok(db, &["dead", "list"]).await;
    assert!(table.lines().next().unwrap().contains("reason"), "{table}");
    for id in &ids {
        let row = table
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{id} ")))
            .unwrap_or_else(|| panic!("no row for {id}:\n{table}"));
        assert!(
            row.contains("u-poison") && row.contains("rejected by ChurnZero"),
            "{row}"
        );
    }

    // Paging: one at a time, with the hint for the next page.
    let first = ok(db, &["dead", "list", "--limit", "1"]).await;
    assert!(
        first.contains(&format!("more: dead list --after {}", ids[0])),
        "{first}"
    );
    let second: Value = serde_json::from_str(
        &ok(
            db,
            &[
                "dead",
                "list",
                "--json",
                "--limit",
                "1",
                "--after",
                &ids[0].to_string(),
            ],
        )
        .await,
    )
    .unwrap();
    assert_eq!(ids_of(&second), vec![ids[1]]);
    assert!(second["next_after"].is_null(), "the last page: {second}");
    let full = ok(db, &["dead", "list", "--limit", "2"]).await;
    assert!(!full.contains("more:"), "an exactly full last page: {full}");

    // Filters: reason text, and death time (RFC 3339 or an age).
    let none = ok(db, &["dead", "list", "--reason", "no such reason"]).await;
    assert_eq!(none.trim(), "no dead events");
    let some: Value = serde_json::from_str(
        &ok(db, &["dead", "list", "--json", "--reason", "REJECTED BY"]).await,
    )
    .unwrap();
    assert_eq!(ids_of(&some), ids);
    let recent: Value =
        serde_json::from_str(&ok(db, &["dead", "list", "--json", "--since", "1h"]).await).unwrap();
    assert_eq!(ids_of(&recent), ids);
    let later: Value = serde_json::from_str(
        &ok(
            db,
            &["dead", "list", "--json", "--since", "2999-01-01T00:00:00Z"],
        )
        .await,
    )
    .unwrap();
    assert!(ids_of(&later).is_empty());
    let before: Value = serde_json::from_str(
        &ok(
            db,
            &["dead", "list", "--json", "--until", "2000-01-01T00:00:00Z"],
        )
        .await,
    )
    .unwrap();
    assert!(ids_of(&before).is_empty());
    let (code, _, err) = cli(db, &["dead", "list", "--since", "last tuesday"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("--since"), "{err}");

    // Show: the reason, the attempts and the event as it will be replayed.
    let shown = ok(db, &["dead", "show", &ids[0].to_string()]).await;
    assert!(shown.contains("rejected by ChurnZero"), "{shown}");
    assert!(shown.contains("ATTEMPTS"), "{shown}");
    assert!(shown.contains(POISON), "{shown}");
    assert!(shown.contains("u-poison"), "{shown}");
    let json: Value =
        serde_json::from_str(&ok(db, &["dead", "show", "--json", &ids[0].to_string()]).await)
            .unwrap();
    assert_eq!(json["id"], ids[0]);
    assert_eq!(json["event"]["event"], POISON);
    assert_eq!(json["history"].as_array().unwrap().len(), 1);
    let (code, _, err) = cli(db, &["dead", "show", "999999"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no dead event with id 999999"), "{err}");
}
}

on_both_backends! {
#[tokio::test]
async fn dead_replay_beside_a_running_server_delivers_and_purge_deletes(db: &Path) {
    let env = scenario_env(db).await;
    let base = env.server.base.clone();
    let page: Value = serde_json::from_str(&ok(db, &["dead", "list", "--json"]).await).unwrap();
    let ids = ids_of(&page);

    // Selections that name nothing dead change nothing.
    let (code, _, err) = cli(db, &["dead", "replay", &ids[0].to_string(), "999999"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("not dead events: 999999; nothing was changed"),
        "{err}"
    );
    let (code, _, err) = cli(db, &["dead", "replay"]).await;
    assert_eq!(code, 2, "a selection is required: {err}");
    let (code, _, _) = cli(db, &["dead", "purge", "--all", &ids[0].to_string()]).await;
    assert_eq!(code, 2, "--all and ids conflict");
    let out = ok(db, &["dead", "replay", "--since", "2999-01-01T00:00:00Z"]).await;
    assert!(out.starts_with("replayed 0 dead events"), "{out}");
    assert_eq!(status(&base).await["dead"], 2);

    // ChurnZero now takes the event: a replay by id, written by the CLI
    // while the server runs, goes through the server's normal delivery.
    env.mock.state().set_faults(Default::default());
    env.mock.state().reset();
    let out = ok(db, &["dead", "replay", &ids[0].to_string()]).await;
    assert!(out.starts_with("replayed 1 dead event;"), "{out}");
    let s = wait_status(&base, "delivered", 7).await;
    assert_eq!(s["dead"], 1);
    let actions = env.mock.state().actions();
    assert_eq!(actions.len(), 1, "{actions:?}");
    assert_eq!(actions[0]["eventName"], POISON);
    assert_eq!(actions[0]["contactExternalId"], "u-poison");
    assert_eq!(actions[0]["description"], format!("{POISON} #1"));

    // Purge by reason while the server runs, as JSON.
    let out = ok(db, &["dead", "--json", "purge", "--reason", "rejected"]).await;
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["purged"], 1);
    let s = wait_status(&base, "dead", 0).await;
    assert_eq!(s["delivered"], 7);
    assert_eq!(s["held"], 3, "the held user's events are untouched");
}
}

on_both_backends! {
#[tokio::test]
async fn dead_commands_work_offline(db: &Path) {
    let env = scenario_env(db).await;
    let Env { mock, server } = env;
    server.sigterm();
    let mut server = server;
    wait_for("the server to exit", Duration::from_secs(30), || {
        let exited = server.child.try_wait().unwrap().is_some();
        async move { exited.then_some(()) }
    })
    .await;

    let out = ok(db, &["dead", "replay", "--all"]).await;
    assert!(out.starts_with("replayed 2 dead events"), "{out}");
    let s: Value = serde_json::from_str(&ok(db, &["status", "--json"]).await).unwrap();
    assert_eq!(s["dead"], 0);
    // Replayed events wait for delivery; the held user's still wait too.
    assert_eq!((&s["pending"], &s["held"]), (&json!(2), &json!(3)), "{s}");

    // A server started again delivers them once ChurnZero takes them.
    mock.state().set_faults(Default::default());
    let server = Binary::serve(db, &mock.url(), &[]).await;
    let s = wait_status(&server.base, "delivered", 8).await;
    assert_eq!(s["dead"], 0);
    let out = ok(db, &["dead", "purge", "--all"]).await;
    assert!(out.starts_with("purged 0 dead events"), "{out}");
    drop(server);
}
}
