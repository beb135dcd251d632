//! The `mock-churnzero` subcommand as a user runs it: the real binary, its
//! fault flags, and the HTTP control endpoints docs/mock-churnzero.md
//! describes.

mod common;

use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The mock as a child process on a port of its own choosing.
struct MockProcess {
    child: Child,
    url: String,
}

impl MockProcess {
    async fn start(flags: &[&str], env: &[(&str, &str)]) -> MockProcess {
        let mut child = Command::new(common::binary_path())
            .args(["mock-churnzero", "--listen", "127.0.0.1:0", "--quiet"])
            .args(flags)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the mock starts");
        let started = Instant::now();
        let port = loop {
            if let Some(port) = common::listening_port(child.id()) {
                break port;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                use std::io::Read;
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("mock-churnzero exited with {status}: {err}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the mock never listened"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        MockProcess {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    async fn send(&self, actions: &Value) -> (u16, String) {
        let r = common::client()
            .post(format!("{}/i", self.url))
            .json(actions)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    }

    async fn get(&self, path: &str) -> Value {
        common::client()
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

impl Drop for MockProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn action(name: &str) -> Value {
    json!({"appKey": "k", "action": "trackEvent", "accountExternalId": "a",
           "contactExternalId": "c", "eventName": name})
}

#[tokio::test]
async fn poison_flags_reject_requests_holding_the_named_event() {
    let mock = MockProcess::start(
        &["--poison-event", "Poison Pill", "--poison-status", "422"],
        &[],
    )
    .await;
    assert_eq!(
        mock.get("/faults").await,
        json!({"fail_rate": 0.0, "fail_status": 503, "latency_ms": 0,
               "poison_event_name": "Poison Pill", "poison_status": 422})
    );
    // The whole request holding the poison event is refused, a good one
    // taken, as an endpoint that validates batches would do.
    let (status, body) = mock
        .send(&json!([action("Fine"), action("Poison Pill")]))
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("Poison Pill"), "{body}");
    assert_eq!(mock.send(&json!([action("Fine")])).await.0, 200);

    let received = mock.get("/received").await;
    assert_eq!(received["requests"], 2);
    assert_eq!(received["actions"], json!([action("Fine")]));
    let requests = mock.get("/requests").await;
    let outcomes: Vec<(&Value, &Value)> = requests
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (&r["status"], &r["outcome"]))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            (&json!(422), &json!("poison event \"Poison Pill\"")),
            (&json!(200), &json!("ok")),
        ]
    );
    let reset = common::client()
        .post(format!("{}/reset", mock.url))
        .send()
        .await
        .unwrap();
    assert_eq!(reset.status().as_u16(), 204);
    assert_eq!(mock.get("/received").await["requests"], 0);
    // Poison mode is configuration: a reset keeps it.
    assert_eq!(mock.send(&json!([action("Poison Pill")])).await.0, 422);
}

#[tokio::test]
async fn poison_mode_from_the_environment_with_the_default_status() {
    let mock = MockProcess::start(&[], &[("MOCK_CHURNZERO_POISON_EVENT", "Bad")]).await;
    assert_eq!(mock.send(&json!([action("Bad")])).await.0, 400);
    assert_eq!(mock.send(&json!([action("Good")])).await.0, 200);
}

#[tokio::test]
async fn without_poison_flags_every_event_is_taken() {
    let mock = MockProcess::start(&[], &[]).await;
    assert_eq!(mock.get("/faults").await["poison_event_name"], Value::Null);
    assert_eq!(mock.send(&json!([action("Poison Pill")])).await.0, 200);
}
