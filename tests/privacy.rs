//! Personal data needs the admin token. After a scenario that leaves
//! delivered, held, pending and dead events of named users (and an identify
//! with an email), the open endpoints (`/status`, `/metrics`, `/healthz`,
//! `/readyz`, the status page) carry counts, ages and reasons but no user
//! id, email or payload; the dead letters themselves answer only to the
//! token.

mod common;

use common::*;
use serde_json::json;

const PEOPLE: &[&str] = &[
    "u-good",
    "u-poison",
    "nobody",
    "u-dup",
    "u-private",
    "u-private@example.com",
];

#[tokio::test]
async fn open_endpoints_carry_no_user_ids_and_dead_letters_need_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let mock = mock().await;
    poison_mock(&mock);
    let server = start(settings(&dir.path().join("o.db"), &mock.url())).await;
    let base = format!("http://{}", server.addr);
    let sc = operator_scenario(&base).await;
    let (code, _) = post(&base, "/v1/identify", &identify("u-private", "acc-private")).await;
    assert_eq!(code, 200);
    wait_status(&base, "delivered", sc.delivered + 1).await;

    for path in ["/status", "/metrics", "/healthz", "/readyz", "/"] {
        let r = client().get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path} stays open");
        let body = r.text().await.unwrap();
        for who in PEOPLE {
            assert!(!body.contains(who), "{path} shows {who}: {body}");
        }
        assert!(!body.contains("\"properties\""), "{path} shows a payload");
    }
    // The reasons are there, without whose events they were.
    let s = status(&base).await;
    assert!(
        s["recent_errors"][0]["error"]
            .as_str()
            .unwrap()
            .contains("rejected by ChurnZero"),
        "{s}"
    );

    let dead = format!("{base}/admin/dead");
    let r = client().get(&dead).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let body = r.text().await.unwrap();
    assert!(!body.contains("u-poison"), "{body}");
    let r = client()
        .get(&dead)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let list: serde_json::Value = r.json().await.unwrap();
    assert_eq!(list["dead"][0]["order_key"], json!("u-poison"));
    let id = list["dead"][0]["id"].as_i64().unwrap();
    let one = format!("{base}/admin/dead/{id}");
    assert_eq!(
        client().get(&one).send().await.unwrap().status().as_u16(),
        401
    );
    assert_eq!(
        client()
            .get(&one)
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    server.shutdown().await;
    mock.shutdown().await;
}
