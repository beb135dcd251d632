//! The PostgreSQL outbox against a real server, several instances on one
//! database. Each test makes its own database, so they run in parallel.
//! Without a reachable server the tests are skipped with one line; under
//! `CI=true` they fail instead.

use churnzero_forwarder::outbox::postgres::{MAINTENANCE_LOCK, PgConfig, PgOutbox};
use churnzero_forwarder::outbox::{
    AudienceOp, AudienceSettlement, ClaimedEvent, DeadListFilter, DeliveredValue, IdentityUpdate,
    IngestReceipt, MaintenanceReport, NewEvent, SettleOutcome, Settlement, StoreError, now_ms,
};
use sqlx::{Connection, PgConnection};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;

/// Each test's own database (see `common::PgDb`: skipped with one line
/// without a server, failing under `CI=true`).
use common::PgDb as TestDb;

macro_rules! test_db {
    () => {
        match TestDb::create().await {
            Some(db) => db,
            None => return,
        }
    };
}

fn config() -> PgConfig {
    PgConfig {
        heartbeat: Duration::from_millis(100),
        instance_expiry: Duration::from_secs(1),
        max_connections: 8,
        ..PgConfig::default()
    }
}

/// `config()` without background work during a test: no heartbeat, and so
/// no lease recovery, after the start, and no instance taken for dead.
fn quiet_config() -> PgConfig {
    PgConfig {
        heartbeat: Duration::from_secs(3600),
        instance_expiry: Duration::from_secs(3600),
        ..config()
    }
}

async fn instance(db: &TestDb) -> PgOutbox {
    PgOutbox::connect(&db.url(), config())
        .await
        .expect("connect outbox")
}

fn ev(key: &str, msg: &str) -> NewEvent {
    NewEvent {
        source: "src".into(),
        message_id: msg.into(),
        kind: "track",
        order_key: key.into(),
        payload: format!(r#"{{"messageId":"{msg}"}}"#),
        forward: true,
        identity: None,
        audience: Vec::new(),
    }
}

fn msg_of(c: &ClaimedEvent) -> String {
    let v: serde_json::Value = serde_json::from_str(&c.payload).expect("payload");
    v["messageId"].as_str().expect("messageId").to_string()
}

use common::settlement as outcome;

fn delivered(c: &ClaimedEvent) -> Settlement {
    outcome(c, SettleOutcome::Delivered)
}

async fn scalar(conn: &mut PgConnection, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(conn).await.expect(sql)
}

/// Ingests on a task of its own, so that the test can watch it wait.
fn spawn_ingest(
    outbox: &PgOutbox,
    events: Vec<NewEvent>,
) -> tokio::task::JoinHandle<Result<IngestReceipt, StoreError>> {
    let outbox = outbox.clone();
    tokio::spawn(async move { outbox.ingest(events).await })
}

/// Polls until `f` is true (observable state, not a fixed sleep).
async fn wait_for<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ingest_is_acked_after_commit_and_deduplicated_across_instances() {
    let db = test_db!();
    let a = instance(&db).await;
    let b = instance(&db).await;
    // A third party holds the messageId's row, so that both instances reach
    // the dedup insert of the same id before either can commit.
    let mut blocker = db.conn().await;
    sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
    sqlx::query("INSERT INTO message_ids (source, message_id, seen_at) VALUES ('src', 'm-1', 0)")
        .execute(&mut blocker)
        .await
        .unwrap();
    let ta = spawn_ingest(&a, vec![ev("u1", "m-1")]);
    let tb = spawn_ingest(&b, vec![ev("u1", "m-1")]);
    let mut watch = db.conn().await;
    wait_for_lock_waiters(&mut watch, 2).await;
    assert!(
        !ta.is_finished() && !tb.is_finished(),
        "an ingest answered before its commit"
    );
    assert_eq!(scalar(&mut watch, "SELECT count(*) FROM events").await, 0);
    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    let ra = ta.await.unwrap().expect("ingest a");
    let rb = tb.await.unwrap().expect("ingest b");
    assert_eq!(ra.stored + rb.stored, 1, "{ra:?} {rb:?}");
    assert_eq!(ra.duplicates + rb.duplicates, 1, "{ra:?} {rb:?}");
    assert_eq!(
        scalar(
            &mut watch,
            "SELECT count(*) FROM events WHERE message_id = 'm-1'"
        )
        .await,
        1
    );
    for o in [&a, &b] {
        let s = o.status().await.unwrap();
        assert_eq!((s.accepted, s.duplicates, s.pending), (1, 1, 1));
    }
    // An acknowledged ingest is visible to any other session.
    a.ingest(vec![ev("u2", "m-2")]).await.unwrap();
    assert_eq!(
        scalar(
            &mut watch,
            "SELECT count(*) FROM events WHERE message_id = 'm-2'"
        )
        .await,
        1
    );
}

/// Waits until `n` sessions of the test database wait on a lock.
async fn wait_for_lock_waiters(conn: &mut PgConnection, n: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while scalar(
        conn,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND wait_event_type = 'Lock'",
    )
    .await
        != n
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never {n} sessions waiting on a lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_key_ingested_by_two_instances_at_once_has_one_head() {
    let db = test_db!();
    let a = instance(&db).await;
    let b = instance(&db).await;
    // Hold back every insert into events, so that both ingests have looked
    // at the key's queue before either has stored anything.
    let mut blocker = db.conn().await;
    sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
    sqlx::query("LOCK TABLE events IN SHARE MODE")
        .execute(&mut blocker)
        .await
        .unwrap();
    let ta = spawn_ingest(&a, vec![ev("u1", "m-a")]);
    let tb = spawn_ingest(&b, vec![ev("u1", "m-b")]);
    let mut watch = db.conn().await;
    wait_for_lock_waiters(&mut watch, 2).await;
    sqlx::query("COMMIT").execute(&mut blocker).await.unwrap();
    ta.await.unwrap().unwrap();
    tb.await.unwrap().unwrap();
    let states: Vec<i16> = sqlx::query_scalar("SELECT state FROM events ORDER BY id")
        .fetch_all(&mut watch)
        .await
        .unwrap();
    assert_eq!(
        states,
        vec![0, 5],
        "one head, the later event queued behind it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_share_commits() {
    let db = test_db!();
    let a = instance(&db).await;
    let mut watch = db.conn().await;
    let before = scalar(
        &mut watch,
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .await;
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let a = a.clone();
            tokio::spawn(async move {
                a.ingest(vec![ev(&format!("u{}", i % 7), &format!("m-{i}"))])
                    .await
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().stored, 1);
    }
    // pg_stat_database is updated when a backend reports, not at once.
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut watch)
        .await
        .unwrap();
    let after = scalar(
        &mut watch,
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .await;
    assert_eq!(scalar(&mut watch, "SELECT count(*) FROM events").await, 200);
    assert!(
        after - before < 150,
        "{} commits for 200 requests",
        after - before
    );
    // Per key, one head and the rest queued.
    assert_eq!(
        scalar(&mut watch, "SELECT count(*) FROM events WHERE state = 0").await,
        7
    );
}

/// A TCP proxy in front of the PostgreSQL server that counts the round
/// trips clients make: each Sync message ends one (a prepared statement's
/// Bind/Execute/Sync, or sqlx's ping, which is a lone Sync), and so does
/// each simple Query (`BEGIN`, `COMMIT`).
struct SyncCounter {
    addr: std::net::SocketAddr,
    syncs: Arc<std::sync::atomic::AtomicU64>,
}

impl SyncCounter {
    async fn start() -> SyncCounter {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let syncs = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let upstream = server_host_port();
        let counted = syncs.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(&upstream).await.unwrap();
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                });
                let counted = counted.clone();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut parser = SyncParser::default();
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let syncs = parser.feed(&buf[..n]);
                        counted.fetch_add(syncs, std::sync::atomic::Ordering::SeqCst);
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        SyncCounter { addr, syncs }
    }

    /// The test database's URL through the proxy, in plain text so that
    /// the proxy can read the messages.
    fn url(&self, db: &TestDb) -> String {
        let url = db.url();
        let hp = server_host_port();
        format!(
            "{}?sslmode=disable",
            url.replacen(&hp, &self.addr.to_string(), 1)
        )
    }

    fn round_trips(&self) -> u64 {
        self.syncs.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// `host:port` of the test server's URL.
fn server_host_port() -> String {
    let server = common::pg_server();
    let rest = server.split_once("://").map_or(server.as_str(), |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split('/').next().unwrap().to_string()
}

/// Splits a client's byte stream into protocol messages: untyped ones
/// first (an SSL request, then the startup message), then a type byte and
/// a length each.
#[derive(Default)]
struct SyncParser {
    started: bool,
    pending: Vec<u8>,
}

impl SyncParser {
    fn feed(&mut self, bytes: &[u8]) -> u64 {
        self.pending.extend_from_slice(bytes);
        let mut syncs = 0;
        loop {
            let head = if self.started { 1 } else { 0 };
            if self.pending.len() < head + 4 {
                return syncs;
            }
            let len_at = &self.pending[head..head + 4];
            let len = u32::from_be_bytes(len_at.try_into().unwrap()) as usize;
            if self.pending.len() < head + len {
                return syncs;
            }
            if self.started {
                if matches!(self.pending[0], b'S' | b'Q') {
                    syncs += 1;
                }
            } else {
                // 80877103: SSLRequest, 80877104: GSSENCRequest; anything
                // else is the startup message.
                let code = u32::from_be_bytes(self.pending[4..8].try_into().unwrap());
                self.started = code != 80877103 && code != 80877104;
            }
            self.pending.drain(..head + len);
        }
    }
}

/// An instance with no heartbeat or vacuum of its own for an hour, after
/// eight single-track groups, one request at a time: the committers take
/// turns, so every committer has opened its connection and prepared its
/// statement.
async fn quiet_instance_warmed_up(url: &str) -> PgOutbox {
    let a = PgOutbox::connect(
        url,
        PgConfig {
            heartbeat: Duration::from_secs(3600),
            instance_expiry: Duration::from_secs(7200),
            own_vacuum_every: Duration::from_secs(3600),
            ..config()
        },
    )
    .await
    .expect("connect outbox");
    for i in 0..8 {
        let r = a.ingest(vec![ev(&format!("warm-{i}"), &format!("warm-{i}"))]);
        assert_eq!(r.await.unwrap().stored, 1);
    }
    a
}

/// A group commit is one round trip to the server. sqlx pings a pooled
/// connection before handing it out and again when it comes back, which
/// made three of every group's round trips; the committers keep their own
/// connections instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_commit_is_one_round_trip() {
    let db = test_db!();
    let proxy = SyncCounter::start().await;
    // Nothing of the instance's own in the measured window.
    let a = quiet_instance_warmed_up(&proxy.url(&db)).await;
    let before = proxy.round_trips();
    for i in 0..20 {
        let r = a.ingest(vec![ev(&format!("u-{i}"), &format!("m-{i}"))]);
        assert_eq!(r.await.unwrap().stored, 1);
    }
    let round_trips = proxy.round_trips() - before;
    let mut watch = db.conn().await;
    assert_eq!(scalar(&mut watch, "SELECT count(*) FROM events").await, 28);
    assert_eq!(round_trips, 20, "round trips to the server for 20 groups");
}

/// A committer keeps its connection between groups; a session the server
/// ended while it sat idle (a restart, `idle_session_timeout`) is found by
/// a ping before the next group, which goes out on a new connection
/// instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_ended_while_idle_costs_no_failed_group() {
    let db = test_db!();
    // No heartbeat to come across the ended sessions first.
    let a = quiet_instance_warmed_up(&db.url()).await;
    let mut watch = db.conn().await;
    let committers = scalar(
        &mut watch,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND query LIKE '%ingest_group%' AND pid <> pg_backend_pid()",
    )
    .await;
    assert_eq!(committers, 4, "one session per committer");
    // Every session of the instance: the committers' and the pool's.
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_all(&mut watch)
    .await
    .unwrap();
    assert!(ended.len() > 4 && ended.iter().all(|e| *e), "{ended:?}");
    // Past the idle spell after which a connection is pinged first.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for i in 0..8 {
        let r = a.ingest(vec![ev(&format!("u-{i}"), &format!("m-{i}"))]);
        assert_eq!(r.await.expect("ingest after the sessions ended").stored, 1);
    }
    // The pool's connections too: a status read and a claim.
    assert_eq!(a.status().await.expect("status").pending, 16);
    let claimed = a.claim(100, Duration::from_secs(30)).await;
    assert_eq!(claimed.expect("claim after the sessions ended").len(), 16);
    assert_eq!(scalar(&mut watch, "SELECT count(*) FROM events").await, 16);
}

/// Waits until every session's statistics up to now have reached the
/// server's view: `inserted` is how many events the test has stored, and a
/// session reports its inserts in the same flush as its transaction's
/// reads. Each poll is a new session, so it sees no cached snapshot.
async fn reported(db: &TestDb, inserted: i64) {
    inserts_reported(db, "events", inserted).await;
}

/// `reported`, for the rows inserted into `table`.
async fn inserts_reported(db: &TestDb, table: &str, inserted: i64) {
    let sql = format!("SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = '{table}'");
    wait_for("the sessions' statistics", || {
        let (url, sql) = (db.url(), sql.clone());
        async move {
            let mut c = PgConnection::connect(&url).await.unwrap();
            scalar(&mut c, &sql).await >= inserted
        }
    })
    .await;
}

/// One column of `pg_stat_user_indexes` for `index`, read afresh (the
/// session's cached statistics snapshot dropped first).
async fn index_stat(watch: &mut PgConnection, index: &str, column: &str) -> i64 {
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut *watch)
        .await
        .unwrap();
    let sql = format!("SELECT {column} FROM pg_stat_user_indexes WHERE indexrelname = '{index}'");
    scalar(watch, &sql).await
}

/// The index entries of `events_key` read so far, once reported.
async fn key_index_reads_after(db: &TestDb, watch: &mut PgConnection, inserted: i64) -> i64 {
    reported(db, inserted).await;
    index_stat(watch, "events_key", "idx_tup_read").await
}

/// Whether a new event is its key's head is one probe of the key's index
/// per event, whatever the backlog, and whatever the outbox looked like when
/// a session first planned its groups. A plan made while `events` was empty
/// (a fresh install, before the first analysis) read every active event
/// into a hash table instead, once per group: a group of tracks took 15 ms
/// at 50,000 pending events, and ingest slowed with the backlog it built.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_probes_its_own_keys_not_the_whole_backlog() {
    let db = test_db!();
    let mut watch = db.conn().await;
    let a = outbox_planning_on_empty_tables(&db, &mut watch).await;
    // Enough small groups on the empty outbox for each session to settle
    // on the plan it keeps (a cached generic plan after five executions).
    let mut inserted = 0;
    for i in 0..30 {
        a.ingest(vec![ev(&format!("first-{i}"), &format!("first-{i}"))])
            .await
            .unwrap();
        inserted += 1;
    }
    // A backlog of 20,000 pending events, each its own key.
    for chunk in 0..20 {
        let group = (0..1000)
            .map(|i| {
                let n = chunk * 1000 + i;
                ev(&format!("backlog-{n}"), &format!("backlog-{n}"))
            })
            .collect();
        assert_eq!(a.ingest(group).await.unwrap().stored, 1000);
        inserted += 1000;
    }
    let before = key_index_reads_after(&db, &mut watch, inserted).await;
    for g in 0..4 {
        let group = (0..20)
            .map(|i| ev(&format!("new-{g}-{i}"), &format!("new-{g}-{i}")))
            .collect();
        assert_eq!(a.ingest(group).await.unwrap().stored, 20);
        inserted += 20;
    }
    let read = key_index_reads_after(&db, &mut watch, inserted).await - before;
    assert!(
        read < 1000,
        "four groups of 20 new keys read {read} entries of the key index at a backlog of 20,000"
    );
    assert_eq!(
        scalar(&mut watch, "SELECT count(*) FROM events WHERE state = 0").await,
        inserted
    );
}

/// Entries of the `events` indexes read so far.
const EVENTS_INDEX_READS: &str =
    "SELECT sum(idx_tup_read)::int8 FROM pg_stat_user_indexes WHERE relname = 'events'";

/// The tables that grow with the traffic: a statement must never read one
/// whole to do its work.
const GROWING_TABLES: [&str; 7] = [
    "events",
    "message_ids",
    "identities",
    "aliases",
    "audience_pending",
    "audience_users",
    "audience_delivered",
];

/// Rows a test's calls may read sequentially from one of `GROWING_TABLES`
/// loaded with 20,000 rows: one read of the whole table exceeds it
/// fourfold, while the reads of the rounds on the empty tables, which a
/// session may report late (a few hundred rows), stay well under it.
const SEQ_READ_BOUND: i64 = 5000;

/// Rows of each of `GROWING_TABLES` read by sequential scans so far.
async fn seq_reads(watch: &mut PgConnection) -> HashMap<String, i64> {
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut *watch)
        .await
        .unwrap();
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT relname::text, seq_tup_read FROM pg_stat_user_tables WHERE relname = ANY($1)",
    )
    .bind(&GROWING_TABLES[..])
    .fetch_all(&mut *watch)
    .await
    .unwrap();
    assert_eq!(rows.len(), GROWING_TABLES.len(), "{rows:?}");
    rows.into_iter().collect()
}

/// What `seq_reads` grew by since `before`, table by table.
fn grown(before: &HashMap<String, i64>, after: &HashMap<String, i64>) -> Vec<(String, i64)> {
    let mut d: Vec<(String, i64)> = after
        .iter()
        .map(|(t, n)| (t.clone(), n - before[t]))
        .collect();
    d.sort();
    d
}

/// `seq_reads` once the outbox has closed and every session of it has
/// ended: a session reports what it read when it ends, at the latest.
/// `inserted` is how many events the test stored, to check that the
/// report arrived.
async fn seq_reads_after_close(
    a: PgOutbox,
    db: &TestDb,
    watch: &mut PgConnection,
    inserted: i64,
) -> HashMap<String, i64> {
    a.close().await;
    let watcher: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *watch)
        .await
        .unwrap();
    wait_for("the outbox's sessions to end", || {
        let url = db.url();
        async move {
            let mut c = PgConnection::connect(&url).await.unwrap();
            let others: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND pid <> pg_backend_pid() AND pid <> $1",
            )
            .bind(watcher)
            .fetch_one(&mut c)
            .await
            .unwrap();
            others == 0
        }
    })
    .await;
    reported(db, inserted).await;
    seq_reads(watch).await
}

/// An outbox whose sessions keep the plans they make on empty tables: no
/// analysis runs during the test, as none runs before a table's first.
async fn outbox_planning_on_empty_tables(db: &TestDb, watch: &mut PgConnection) -> PgOutbox {
    outbox_planning_on_empty_tables_with(db, watch, config()).await
}

/// `outbox_planning_on_empty_tables` from a configuration of the test's own.
async fn outbox_planning_on_empty_tables_with(
    db: &TestDb,
    watch: &mut PgConnection,
    config: PgConfig,
) -> PgOutbox {
    let a = PgOutbox::connect(
        &db.url(),
        PgConfig {
            max_connections: 2,
            own_vacuum_every: Duration::from_secs(3600),
            ..config
        },
    )
    .await
    .expect("connect outbox");
    for table in [
        "events",
        "message_ids",
        "identities",
        "aliases",
        "leases",
        "audience_pending",
    ] {
        sqlx::query(&format!(
            "ALTER TABLE {table} SET (autovacuum_enabled = false)"
        ))
        .execute(&mut *watch)
        .await
        .unwrap();
    }
    a
}

/// One round of what the service asks of the outbox, on users of its own
/// (`tag`): tracks, an identify with ids and an alias, an audience update,
/// a claim settled all delivered and one settled with every other outcome,
/// maintenance (held heads past their budget included), status, the dead
/// letters (list, filtered list, show, replay, purge), the identity map,
/// lease recovery, and the sync lane (leader, reads, a settled step).
/// Returns how many events it stored.
async fn every_call_once(a: &PgOutbox, tag: &str) -> i64 {
    let u = |n: u32| format!("{tag}-u{n}");
    let m = |n: u32| format!("{tag}-m{n}");
    let mut audience = identify(&u(4), &m(5), Some("acct"), None);
    audience.forward = false;
    audience.audience = vec![("attr_Trial".into(), "true".into())];
    let stored = a
        .ingest(vec![
            ev(&u(1), &m(1)),
            ev(&u(1), &m(2)),
            ev(&u(2), &m(3)),
            identify(&u(3), &m(4), Some("acct"), Some(&u(9))),
            audience,
        ])
        .await
        .unwrap()
        .stored as i64;
    let claimed = a.claim(4, Duration::from_secs(30)).await.unwrap();
    a.settle(claimed.iter().map(delivered).collect())
        .await
        .unwrap();
    let claimed = a.claim(4, Duration::from_secs(30)).await.unwrap();
    let now = now_ms();
    let outcomes = [
        SettleOutcome::Retry {
            at: now,
            error: "503".into(),
        },
        SettleOutcome::Dead {
            reason: "400".into(),
        },
        SettleOutcome::Held {
            error: "ids unknown".into(),
            map_as_of: now,
        },
        SettleOutcome::Delivered,
    ];
    a.settle(
        claimed
            .iter()
            .zip(outcomes.into_iter().cycle())
            .map(|(c, o)| outcome(c, o))
            .collect(),
    )
    .await
    .unwrap();
    a.maintain(Duration::from_secs(3600), Duration::from_secs(3600))
        .await
        .unwrap();
    a.status().await.unwrap();
    let dead = a
        .dead_list(&DeadListFilter {
            limit: 50,
            ..DeadListFilter::default()
        })
        .await
        .unwrap();
    if let Some(d) = dead.first() {
        a.dead_show(d.id).await.unwrap();
        a.replay(Some(vec![d.id])).await.unwrap();
    }
    if let Some(d) = dead.get(1) {
        a.purge(Some(vec![d.id])).await.unwrap();
    }
    a.identities(&[&u(1), &u(3), &u(9)]).await.unwrap();
    // A claim whose lease has run out, given back by lease recovery.
    a.claim(2, Duration::ZERO).await.unwrap();
    a.recover_leases().await.unwrap();
    // Held heads past their budget die; the dead letters by their reason.
    a.maintain(Duration::from_secs(3600), Duration::ZERO)
        .await
        .unwrap();
    a.dead_list(&DeadListFilter {
        reason_contains: Some("identity".into()),
        since_ms: Some(now - 60_000),
        limit: 50,
        ..DeadListFilter::default()
    })
    .await
    .unwrap();
    // The sync lane: its leader, its reads, a step of a window.
    a.lead("sync", Duration::from_secs(30)).await.unwrap();
    a.audience_users_after("", 10).await.unwrap();
    let pending = a.audience_pending_for(&[u(4)], now_ms()).await.unwrap();
    let key = (
        "acct".to_string(),
        "acct-contact".to_string(),
        "attr_Trial".to_string(),
    );
    a.audience_delivered_values(std::slice::from_ref(&key))
        .await
        .unwrap();
    a.audience(AudienceOp::Settle(AudienceSettlement {
        run_started_at: Some(now_ms()),
        consumed: pending,
        delivered: vec![DeliveredValue {
            account: key.0,
            contact: key.1,
            attribute: key.2,
            value: "true".into(),
        }],
        sent: 1,
        ..Default::default()
    }))
    .await
    .unwrap();
    a.sync_next_run_at().await.unwrap();
    stored
}

/// No call of the service reads the backlog to do its work, whatever the
/// tables looked like when a session first planned its statements: after a
/// dozen rounds of every call on empty tables (each session settles on the
/// plans it keeps), 20,000 pending events, identities and message ids, and
/// three more rounds, the tables were read by their indexes only, a few
/// entries at a time. The ingest's head test, the settle, the maintenance
/// prunes and the normalisation of keys each read a whole table or a whole
/// index this way before they were changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_call_reads_a_whole_table_whatever_the_plans_were_made_on() {
    let db = test_db!();
    let mut watch = db.conn().await;
    let a = outbox_planning_on_empty_tables(&db, &mut watch).await;
    let mut inserted = 0;
    for round in 0..12 {
        inserted += every_call_once(&a, &format!("empty{round}")).await;
    }
    for chunk in 0..20 {
        let group = (0..1000)
            .map(|i| {
                let n = chunk * 1000 + i;
                let mut e = identify(&format!("b-{n}"), &format!("b-{n}"), Some("acct-b"), None);
                e.audience = vec![("attr_Bulk".into(), "true".into())];
                e
            })
            .collect();
        inserted += a.ingest(group).await.unwrap().stored as i64;
    }
    let index_before = scalar(&mut watch, EVENTS_INDEX_READS).await;
    let before = seq_reads(&mut watch).await;
    for round in 0..3 {
        inserted += every_call_once(&a, &format!("full{round}")).await;
    }
    let after = seq_reads_after_close(a, &db, &mut watch, inserted).await;
    let index_entries = scalar(&mut watch, EVENTS_INDEX_READS).await - index_before;
    let read = grown(&before, &after);
    assert!(
        read.iter().all(|(_, n)| *n < SEQ_READ_BOUND),
        "three rounds read these rows sequentially, at about 20,000 rows a table: {read:?}"
    );
    // Each call probes a few entries of a few indexes (about 600 in all);
    // one statement walking a whole index of the backlog reads 20,000.
    assert!(
        index_entries < 5000,
        "three rounds read {index_entries} entries of the events indexes"
    );
}

/// Stores `n` events (a multiple of 1,000), each of a user of its own
/// (`u-<i>`, message `m-<i>`), 1,000 a group; returns how many.
async fn ingest_distinct_users(a: &PgOutbox, n: i64) -> i64 {
    for chunk in 0..n / 1000 {
        let group = (0..1000)
            .map(|i| {
                let n = chunk * 1000 + i;
                ev(&format!("u-{n}"), &format!("m-{n}"))
            })
            .collect();
        assert_eq!(a.ingest(group).await.unwrap().stored, 1000);
    }
    n
}

/// A maintenance pass finds what it prunes through the indexes, whatever
/// the tables looked like when the session first planned its statements.
/// Planned on empty tables, the pass read all of `events` and all of
/// `message_ids` every time (every 5 s, and every 200 ms while pruning a
/// backlog of delivered events), even with nothing to prune.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_reads_what_it_prunes_not_the_whole_tables() {
    let db = test_db!();
    let mut watch = db.conn().await;
    let a = outbox_planning_on_empty_tables(&db, &mut watch).await;
    for _ in 0..12 {
        a.maintain(Duration::from_secs(3600), Duration::from_secs(3600))
            .await
            .unwrap();
    }
    let inserted = ingest_distinct_users(&a, 20_000).await;
    let before = seq_reads(&mut watch).await;
    for _ in 0..3 {
        let report = a
            .maintain(Duration::from_secs(3600), Duration::from_secs(3600))
            .await
            .unwrap()
            .expect("the only maintaining instance holds the lock");
        assert_eq!((report.pruned_events, report.pruned_message_ids), (0, 0));
    }
    let after = seq_reads_after_close(a, &db, &mut watch, inserted).await;
    let read = grown(&before, &after);
    assert!(
        read.iter().all(|(_, n)| *n < SEQ_READ_BOUND),
        "three passes with nothing to prune read these rows sequentially, with 20,000 rows \
         in events and message_ids: {read:?}"
    );
}

/// Entries read so far of the leases' primary key (by event id) and of
/// their index by ordering key.
const LEASE_READS: &str = "SELECT (SELECT idx_tup_read FROM pg_stat_user_indexes \
     WHERE indexrelname = 'leases_pkey') * 1000000 + (SELECT idx_tup_read \
     FROM pg_stat_user_indexes WHERE indexrelname = 'leases_key')";

/// A settle finds the leases it gives back by one probe each, however many
/// leases are held and whatever the statistics said when it was planned.
/// Planned while `leases` held a handful of rows (the forwarder's own
/// vacuum analyses it whenever it runs, often at a quiet moment), the fence
/// walked every lease of its instance and compared each with every id it
/// settled: 260,000 comparisons and 40 to 70 ms for a settle of 256 with
/// 1,024 leases held, measured in a drain of 100,000 events. Nor does it
/// ask whether a key is leased once the key has no event left to order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settle_probes_its_own_leases_not_every_lease_held() {
    let db = test_db!();
    let mut watch = db.conn().await;
    // Lease recovery, which reads every lease held, runs once at the start
    // and not again during the test: only the settles' reads are counted.
    let quiet = quiet_config();
    let a = outbox_planning_on_empty_tables_with(&db, &mut watch, quiet).await;
    // A few leases taken and given back, then statistics taken while none
    // is held: the table has a page and no rows, which tells the planner
    // that it holds none however large it grows.
    let few: Vec<NewEvent> = (0..10)
        .map(|i| ev(&format!("few-{i}"), &format!("few-{i}")))
        .collect();
    a.ingest(few).await.unwrap();
    let first = a.claim(10, Duration::from_secs(300)).await.unwrap();
    assert_eq!(first.len(), 10);
    a.settle(first.iter().map(delivered).collect())
        .await
        .unwrap();
    sqlx::query("ANALYZE leases")
        .execute(&mut watch)
        .await
        .unwrap();
    // Then 2,000 leases held at once, given back 200 at a time.
    let inserted = 10 + ingest_distinct_users(&a, 2000).await;
    let mut held = Vec::new();
    while held.len() < 2000 {
        let batch = a.claim(256, Duration::from_secs(300)).await.unwrap();
        assert!(!batch.is_empty(), "claimed {} of 2,000", held.len());
        held.extend(batch);
    }
    // The claims' reads are reported with their lease rows.
    inserts_reported(&db, "leases", 2010).await;
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut watch)
        .await
        .unwrap();
    let before = scalar(&mut watch, LEASE_READS).await;
    for batch in held.chunks(200) {
        a.settle(batch.iter().map(delivered).collect())
            .await
            .unwrap();
    }
    seq_reads_after_close(a, &db, &mut watch, inserted).await;
    let read = scalar(&mut watch, LEASE_READS).await - before;
    let (by_id, by_key) = (read / 1_000_000, read % 1_000_000);
    // A probe and a delete per lease: 4,000. Walking the instance's leases
    // on every settle reads 11,000 more.
    assert!(
        by_id < 6000,
        "ten settles of 200 read {by_id} entries of the leases' primary key with 2,000 \
         leases held"
    );
    // Every key is left without events: none needs its lease looked up.
    assert!(
        by_key < 200,
        "ten settles of 200 keys left empty read {by_key} entries of the leases' key index"
    );
    assert_eq!(
        scalar(&mut watch, "SELECT count(*) FROM events WHERE state = 2").await,
        2010
    );
}

/// Probes of the events' primary key, once every session has reported its
/// statements up to `events` stored and `leases` lease rows inserted (a
/// claim reports its reads with its lease rows).
async fn primary_key_probes_after(
    db: &TestDb,
    watch: &mut PgConnection,
    events: i64,
    leases: i64,
) -> i64 {
    reported(db, events).await;
    inserts_reported(db, "leases", leases).await;
    index_stat(watch, "events_pkey", "idx_scan").await
}

/// A claim reads each event it leases once: through the key index that
/// finds it, where its payload is returned from, plus the probe that locks
/// a head's row. It read every leased row a second time by its primary key
/// to return the payload, a few percent of the claim's time when every
/// event is a user of its own. The claimed payloads are the ones stored, heads
/// and the events queued behind them alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_reads_each_event_it_leases_once() {
    let db = test_db!();
    let mut watch = db.conn().await;
    let quiet = quiet_config();
    let a = outbox_planning_on_empty_tables_with(&db, &mut watch, quiet).await;
    // Warm-up: a claim and its settle, so that the sessions have planned.
    a.ingest(vec![ev("warm", "warm")]).await.unwrap();
    let warm = a.claim(10, Duration::from_secs(300)).await.unwrap();
    a.settle(warm.iter().map(delivered).collect())
        .await
        .unwrap();
    // 1,000 users of their own, and one user with three events queued.
    ingest_distinct_users(&a, 1000).await;
    let queue: Vec<NewEvent> = (0..3).map(|i| ev("queue", &format!("q-{i}"))).collect();
    assert_eq!(a.ingest(queue).await.unwrap().stored, 3);
    let before = primary_key_probes_after(&db, &mut watch, 1004, 1).await;
    let claimed = a.claim(256, Duration::from_secs(300)).await.unwrap();
    assert_eq!(claimed.len(), 256);
    let probes = primary_key_probes_after(&db, &mut watch, 1004, 257).await - before;
    // One probe per head locked: 256. Reading every leased row again: 512.
    assert!(
        probes < 256 + 64,
        "a claim of 256 heads probed the events' primary key {probes} times"
    );
    for c in &claimed {
        let n = c.order_key.strip_prefix("u-").expect("a user of its own");
        assert_eq!(msg_of(c), format!("m-{n}"));
    }
    // The queued user's events come with its head, in order, with their
    // own payloads.
    a.settle(claimed.iter().map(delivered).collect())
        .await
        .unwrap();
    let mut queued = Vec::new();
    while queued.is_empty() {
        let batch = a.claim(400, Duration::from_secs(300)).await.unwrap();
        assert!(!batch.is_empty(), "the queued user was never claimed");
        queued.extend(batch.iter().filter(|c| c.order_key == "queue").map(msg_of));
        a.settle(batch.iter().map(delivered).collect())
            .await
            .unwrap();
    }
    assert_eq!(queued, ["q-0", "q-1", "q-2"]);
}

/// Sessions of the test database other than the test's own `mine`.
async fn sessions_besides(watch: &mut PgConnection, mine: &[i32]) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> ALL($1)",
    )
    .bind(mine)
    .fetch_one(&mut *watch)
    .await
    .expect("sessions")
}

/// An instance opens at most `max_connections` sessions, however many calls
/// wait: its committers' own connections and the pool's rest, so that N
/// instances can be sized against the server's `max_connections`. Here the
/// pool's calls are kept waiting (settles, behind the key space held
/// exclusively by another session) until the pool has opened all it may.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_opens_at_most_its_max_connections() {
    let db = test_db!();
    let mut watch = db.conn().await;
    let mut blocker = db.conn().await;
    let mine: Vec<i32> = vec![
        scalar(&mut watch, "SELECT pg_backend_pid()::int8").await as i32,
        scalar(&mut blocker, "SELECT pg_backend_pid()::int8").await as i32,
    ];
    let a = Arc::new(
        PgOutbox::connect(
            &db.url(),
            PgConfig {
                max_connections: 8,
                acquire_timeout: Duration::from_secs(30),
                ..quiet_config()
            },
        )
        .await
        .expect("connect outbox"),
    );
    // Ingest from several tasks at once, so that committers open their
    // connections, then 16 events to settle one at a time.
    let ingests: Vec<_> = (0..8)
        .map(|t| {
            let a = a.clone();
            tokio::spawn(async move {
                let group = (0..2)
                    .map(|i| ev(&format!("u-{t}-{i}"), &format!("m-{t}-{i}")))
                    .collect();
                a.ingest(group).await.unwrap();
            })
        })
        .collect();
    for i in ingests {
        i.await.unwrap();
    }
    let claimed = a.claim(16, Duration::from_secs(300)).await.unwrap();
    assert_eq!(claimed.len(), 16);
    sqlx::raw_sql("BEGIN; SELECT pg_advisory_xact_lock(1667659521, 0)")
        .execute(&mut blocker)
        .await
        .unwrap();
    let settles: Vec<_> = claimed
        .iter()
        .map(|c| {
            let (a, s) = (a.clone(), delivered(c));
            tokio::spawn(async move { a.settle(vec![s]).await })
        })
        .collect();
    // The pool's share (8 - 4 committers) waits on the lock; the rest of
    // the settles wait for a pooled connection.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while scalar(
        &mut watch,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND wait_event_type = 'Lock' AND query LIKE '%settle_delivered%'",
    )
    .await
        < 4
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for four settles waiting on the key space"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut most = 0;
    for _ in 0..20 {
        most = most.max(sessions_besides(&mut watch, &mine).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut blocker)
        .await
        .unwrap();
    for s in settles {
        s.await.unwrap().unwrap();
    }
    assert!(
        most <= 8,
        "an instance given 8 connections opened {most} sessions with 16 settles waiting"
    );
    assert_eq!(
        scalar(&mut watch, "SELECT count(*) FROM events WHERE state = 2").await,
        16
    );
}

/// Everything sqlx reports of a session's notices (PostgreSQL's `LOG`
/// messages among them), while the guard lives, on this thread.
struct Notices(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Notices {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The two statement triggers on updates of `events` pair each row's old and
/// new versions in one pass, whatever the session planned them on. A
/// trigger's query is planned once per session, on the transition tables of
/// the first update that fired it. They joined the old and new rows, and
/// when that first update changed nothing (a settle with nothing delivered
/// runs its delivered update with no ids) the session kept a nested loop
/// comparing every old row with every new one: 13 ms in each trigger for a
/// settle of 256, and a drain of unknown users' events, each one held, cost
/// the server six times what a delivery does. The plans are read from
/// `auto_explain`, which the session sends as notices: each transition
/// table must be read once per firing.
#[tokio::test]
async fn the_update_triggers_pair_rows_in_one_pass_however_first_planned() {
    let db = test_db!();
    let a = instance(&db).await;
    ingest_distinct_users(&a, 1000).await;
    let mut conn = db.conn().await;
    let captured = Arc::new(Mutex::new(Vec::new()));
    let sink = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || Notices(sink.clone()))
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    sqlx::raw_sql(
        "LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0; \
         SET auto_explain.log_analyze = on; SET auto_explain.log_nested_statements = on; \
         SET client_min_messages = log",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    // The session's first update of `events` changes no row: its triggers
    // are planned on empty transition tables.
    sqlx::query("UPDATE events SET attempts = attempts WHERE id < 0")
        .execute(&mut conn)
        .await
        .unwrap();
    captured.lock().unwrap().clear();
    // Then an update of 1,000 rows, half of them held.
    sqlx::query("UPDATE events SET state = CASE WHEN id % 2 = 0 THEN 4 ELSE state END")
        .execute(&mut conn)
        .await
        .unwrap();
    let log = String::from_utf8(captured.lock().unwrap().clone()).unwrap();
    let scans: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Named Tuplestore Scan"))
        .collect();
    // Both triggers' plans: the old and the new rows, each read.
    assert!(scans.len() >= 4, "no trigger plans captured:\n{log}");
    for scan in scans {
        assert!(
            scan.contains("loops=1)"),
            "a transition table was read more than once in one firing: {scan}"
        );
    }
    // The counts stay exact: 500 heads held.
    let s = a.status().await.unwrap();
    assert_eq!((s.pending, s.held), (500, 500), "{s:?}");
}

/// The delivered total counts an event once, when it enters delivered, and
/// so does the dead total: an update that touches rows already delivered or
/// dead without moving them (an operator's hand fix, say), beside rows that
/// do move, adds only the movers. The triggers pair an update's old and new
/// rows only in that case (0015), which no settle reaches; it is checked
/// here with updates of its own.
#[tokio::test]
async fn an_update_counts_only_rows_entering_delivered_or_dead() {
    let db = test_db!();
    let a = instance(&db).await;
    ingest_distinct_users(&a, 1000).await;
    let mut conn = db.conn().await;
    let totals = "SELECT (sum(delivered) * 100000 + sum(dead_total))::bigint FROM counters";
    for sql in [
        "UPDATE events SET state = 2, finished_at = 0 WHERE id IN \
         (SELECT id FROM events ORDER BY id LIMIT 100)",
        "UPDATE events SET state = 3, finished_at = 0 WHERE id IN \
         (SELECT id FROM events WHERE state = 0 ORDER BY id LIMIT 100)",
    ] {
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    }
    assert_eq!(scalar(&mut conn, totals).await, 100 * 100000 + 100);
    // One statement touches all 1,000 rows: the delivered and the dead stay
    // as they are, and of the pending, those with an even id are delivered
    // and the others die.
    let even = scalar(
        &mut conn,
        "SELECT count(*) FROM events WHERE state = 0 AND id % 2 = 0",
    )
    .await;
    sqlx::query(
        "UPDATE events SET attempts = attempts + 1, state = CASE \
         WHEN state <> 0 THEN state WHEN id % 2 = 0 THEN 2 ELSE 3 END",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let odd = 800 - even;
    assert_eq!(
        scalar(&mut conn, totals).await,
        (100 + even) * 100000 + 100 + odd
    );
    // A dead event marked delivered and a delivered one marked dead, in one
    // statement: each enters its new state once.
    sqlx::query(
        "UPDATE events SET state = 5 - state WHERE id IN \
         ((SELECT min(id) FROM events WHERE state = 2), (SELECT min(id) FROM events WHERE state = 3))",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        scalar(&mut conn, totals).await,
        (101 + even) * 100000 + 101 + odd
    );
    let s = a.status().await.unwrap();
    assert_eq!(
        (s.delivered, s.dead, s.pending),
        (101 + even, 100 + odd, 0),
        "{s:?}"
    );
}

/// A held head is written once. A settle queued every held event, then
/// normalised its keys, which made each held head due again, then held it:
/// three row versions, each with every index entry and both update
/// triggers, and a drain of unknown users cost PostgreSQL about three times
/// a delivery per event. Now it holds them first and the normalisation
/// only queues what is behind a head (here two events, written twice). The
/// final state is the same: held heads, and what was claimed behind them
/// queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_settle_writes_each_held_head_once() {
    let db = test_db!();
    let mut watch = db.conn().await;
    let a = outbox_planning_on_empty_tables_with(&db, &mut watch, quiet_config()).await;
    // 256 users, two of them with a second event queued behind the first.
    let mut group: Vec<NewEvent> = (0..256)
        .map(|i| ev(&format!("u-{i}"), &format!("m-{i}")))
        .collect();
    group.push(ev("u-0", "m-0-b"));
    group.push(ev("u-1", "m-1-b"));
    assert_eq!(a.ingest(group).await.unwrap().stored, 258);
    let claimed = a.claim(512, Duration::from_secs(300)).await.unwrap();
    assert_eq!(claimed.len(), 258);
    let now = now_ms();
    let settlements = claimed
        .iter()
        .map(|c| {
            outcome(
                c,
                SettleOutcome::Held {
                    error: "ids unknown".into(),
                    map_as_of: now,
                },
            )
        })
        .collect::<Vec<_>>();
    inserts_reported(&db, "leases", 256).await;
    let before = table_stat(&mut watch, "n_tup_upd").await;
    a.settle(settlements).await.unwrap();
    // The settle's updates are reported with its held keys.
    inserts_reported(&db, "held_keys", 256).await;
    let updates = table_stat(&mut watch, "n_tup_upd").await - before;
    assert!(
        updates <= 258 + 2,
        "a settle of 256 held heads and 2 events behind them wrote {updates} row versions of events"
    );
    let s = a.status().await.unwrap();
    assert_eq!(
        (s.pending, s.held, s.held_queued, s.in_flight),
        (0, 258, 2, 0),
        "{s:?}"
    );
    let queued = scalar(&mut watch, "SELECT count(*) FROM events WHERE state = 5").await;
    assert_eq!(queued, 2);
}

/// One column of `pg_stat_user_tables` for `events`, read afresh.
async fn table_stat(watch: &mut PgConnection, column: &str) -> i64 {
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut *watch)
        .await
        .unwrap();
    let sql = format!("SELECT {column} FROM pg_stat_user_tables WHERE relname = 'events'");
    scalar(watch, &sql).await
}

/// Status counts the events queued behind held heads from a counter, not by
/// walking every held user's queue. A fresh install whose tracks arrive
/// before their users' identifies holds every user: at 118,800 held users a
/// status read took 1.0 to 1.3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reads_no_held_users_queue() {
    let db = test_db!();
    let mut watch = db.conn().await;
    let a = outbox_planning_on_empty_tables(&db, &mut watch).await;
    // 1,000 users, each with a head and one event queued behind it.
    let group = (0..1000)
        .flat_map(|i| {
            [
                ev(&format!("u-{i}"), &format!("m-{i}-a")),
                ev(&format!("u-{i}"), &format!("m-{i}-b")),
            ]
        })
        .collect();
    assert_eq!(a.ingest(group).await.unwrap().stored, 2000);
    let mut claimed = Vec::new();
    while claimed.len() < 2000 {
        let batch = a.claim(512, Duration::from_secs(300)).await.unwrap();
        assert!(!batch.is_empty(), "claimed {} of 2,000", claimed.len());
        claimed.extend(batch);
    }
    // Every head is held (its user's ids are unknown); what was claimed
    // behind it is given back and queues behind it.
    let now = now_ms();
    let mut heads = HashSet::new();
    let settlements = claimed
        .iter()
        .map(|c| {
            if heads.insert(c.order_key.clone()) {
                outcome(
                    c,
                    SettleOutcome::Held {
                        error: "ids unknown".into(),
                        map_as_of: now,
                    },
                )
            } else {
                outcome(c, SettleOutcome::Release)
            }
        })
        .collect::<Vec<_>>();
    for chunk in settlements.chunks(256) {
        a.settle(chunk.to_vec()).await.unwrap();
    }
    let s = a.status().await.unwrap();
    assert_eq!(
        (s.pending, s.held, s.held_queued, s.in_flight),
        (0, 2000, 1000, 0),
        "{s:?}"
    );
    // Everything before the status reads is reported once its sessions end;
    // the reads then come from an instance of their own.
    let seq_before = seq_reads_after_close(a, &db, &mut watch, 2000).await;
    // The claims left 2,000 dead entries in the index of pending heads. A
    // probe walks those not yet marked dead by an earlier scan, as many as
    // the other sessions' snapshots kept alive then (211 in one run), which
    // the next vacuum removes: vacuumed, the count is the probes' own.
    sqlx::query("VACUUM events")
        .execute(&mut watch)
        .await
        .unwrap();
    let before = scalar(&mut watch, EVENTS_INDEX_READS).await;
    let b = instance(&db).await;
    for _ in 0..3 {
        let s = b.status().await.unwrap();
        assert_eq!((s.held, s.held_queued), (2000, 1000));
    }
    let after = seq_reads_after_close(b, &db, &mut watch, 2000).await;
    let read = scalar(&mut watch, EVENTS_INDEX_READS).await - before;
    let seq = grown(&seq_before, &after);
    // The oldest pending and oldest held heads are a probe each.
    assert!(
        read < 100,
        "three status reads with 1,000 held users read {read} entries of the events indexes"
    );
    assert!(
        seq.iter().all(|(_, n)| *n == 0),
        "three status reads with 1,000 held users read these rows sequentially: {seq:?}"
    );
}

/// Keys whose events are in flight, and under which lease: a claim that
/// returns an event of a key held under another lease is a violation.
#[derive(Default)]
struct InFlight {
    held: Mutex<HashMap<String, i64>>,
    violations: Mutex<Vec<String>>,
}

impl InFlight {
    fn take(&self, who: &str, batch: &[ClaimedEvent]) {
        let mut held = self.held.lock().unwrap();
        for c in batch {
            match held.get(&c.order_key) {
                Some(l) if *l != c.lease => self.violations.lock().unwrap().push(format!(
                    "{who} claimed {} of {} while lease {l} holds it",
                    c.id, c.order_key
                )),
                _ => {
                    held.insert(c.order_key.clone(), c.lease);
                }
            }
        }
    }
    fn give_back(&self, batch: &[ClaimedEvent]) {
        let mut held = self.held.lock().unwrap();
        for c in batch {
            held.remove(&c.order_key);
        }
    }
}

/// What a delivery worker would do: the first attempt of `k0-0` is held
/// (ids unknown), the first attempt of each key's event 5 is retried, the
/// rest is delivered; after a failure, the key's later events in the batch
/// are given back.
fn decide(batch: &[ClaimedEvent], log: &Mutex<HashMap<String, Vec<String>>>) -> Vec<Settlement> {
    let mut failed: HashSet<String> = HashSet::new();
    let mut out = Vec::new();
    for c in batch {
        let msg = msg_of(c);
        if failed.contains(&c.order_key) {
            out.push(outcome(c, SettleOutcome::Release));
        } else if msg == "k0-0" && c.attempts == 1 {
            failed.insert(c.order_key.clone());
            out.push(outcome(
                c,
                SettleOutcome::Held {
                    error: "ids unknown".into(),
                    map_as_of: c.claimed_at,
                },
            ));
        } else if msg.ends_with("-5") && c.attempts == 1 {
            failed.insert(c.order_key.clone());
            out.push(outcome(
                c,
                SettleOutcome::Retry {
                    at: now_ms() + 30,
                    error: "HTTP 503".into(),
                },
            ));
        } else {
            log.lock()
                .unwrap()
                .entry(c.order_key.clone())
                .or_default()
                .push(msg);
            out.push(delivered(c));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_key_order_holds_across_instances_through_retries_and_holds() {
    let db = test_db!();
    let a = instance(&db).await;
    let b = instance(&db).await;
    const KEYS: usize = 4;
    const PER_KEY: usize = 12;
    // One user's events accepted by the two instances in turn.
    for i in 0..PER_KEY {
        for k in 0..KEYS {
            let via = if (i + k) % 2 == 0 { &a } else { &b };
            via.ingest(vec![ev(&format!("k{k}"), &format!("k{k}-{i}"))])
                .await
                .unwrap();
        }
    }
    let log: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
    let flight = Arc::new(InFlight::default());
    let lease = Duration::from_secs(30);

    // Both instances in flight at once, for certain: a holds its batch
    // while b claims.
    let ca = a.claim(3, lease).await.unwrap();
    flight.take("a", &ca);
    let cb = b.claim(3, lease).await.unwrap();
    flight.take("b", &cb);
    assert!(!ca.is_empty() && !cb.is_empty(), "a {ca:?} b {cb:?}");
    let keys_a: HashSet<&str> = ca.iter().map(|c| c.order_key.as_str()).collect();
    assert!(cb.iter().all(|c| !keys_a.contains(c.order_key.as_str())));
    flight.give_back(&ca);
    a.settle(decide(&ca, &log)).await.unwrap();
    flight.give_back(&cb);
    b.settle(decide(&cb, &log)).await.unwrap();

    let total = KEYS * PER_KEY + 1; // and the identify of k0
    let worker = |o: PgOutbox, who: &'static str| {
        let (log, flight) = (log.clone(), flight.clone());
        tokio::spawn(async move {
            let mut claims = 0;
            loop {
                let n: usize = log.lock().unwrap().values().map(Vec::len).sum();
                if n >= total {
                    return claims;
                }
                let batch = o.claim(3, lease).await.unwrap();
                if batch.is_empty() {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                }
                claims += 1;
                flight.take(who, &batch);
                // The "network call": the other instance claims meanwhile.
                tokio::time::sleep(Duration::from_millis(1)).await;
                let settle = decide(&batch, &log);
                flight.give_back(&batch);
                o.settle(settle).await.unwrap();
            }
        })
    };
    let wa = worker(a.clone(), "a");
    let wb = worker(b.clone(), "b");
    // The held head waits for its identify, which b accepts.
    wait_for("k0-0 to be held", || {
        let a = a.clone();
        // One held head; the events queued behind it count as held too.
        async move {
            let s = a.status().await.unwrap();
            s.held - s.held_queued == 1
        }
    })
    .await;
    let mut identify = ev("k0", "k0-identify");
    identify.kind = "identify";
    identify.identity = Some(IdentityUpdate {
        user_id: "k0".into(),
        account: Some("acct".into()),
        contact: Some("contact".into()),
        previous_id: None,
    });
    b.ingest(vec![identify]).await.unwrap();
    let both = tokio::time::timeout(Duration::from_secs(30), async {
        (wa.await.unwrap(), wb.await.unwrap())
    })
    .await
    .expect("delivery finished");
    assert!(both.0 > 0 && both.1 > 0, "claims per instance: {both:?}");
    assert!(
        flight.violations.lock().unwrap().is_empty(),
        "{:?}",
        flight.violations.lock().unwrap()
    );
    let log = log.lock().unwrap().clone();
    for k in 0..KEYS {
        let mut want: Vec<String> = (0..PER_KEY).map(|i| format!("k{k}-{i}")).collect();
        if k == 0 {
            want.push("k0-identify".into());
        }
        assert_eq!(log[&format!("k{k}")], want, "order of k{k}");
    }
    let s = a.status().await.unwrap();
    assert_eq!(
        (s.delivered, s.pending, s.in_flight, s.held, s.retries),
        (total as i64, 0, 0, 0, KEYS as i64)
    );
}

/// A TCP proxy in front of the test server that, once armed, lets a claim
/// run and commit on the server and then breaks the connection instead of
/// passing on the server's ReadyForQuery: the forwarder never learns that
/// its claim committed, as when the server or the network goes away at
/// that moment.
struct LosingProxy {
    addr: std::net::SocketAddr,
    armed: Arc<std::sync::atomic::AtomicBool>,
    lost: Arc<std::sync::atomic::AtomicUsize>,
    /// Signalled when a claim's answer is withheld: the claim has
    /// committed and the forwarder is still waiting for its answer.
    withheld: Arc<tokio::sync::Notify>,
    /// The test's go-ahead to break the connection.
    go_on: Arc<tokio::sync::Notify>,
}

impl LosingProxy {
    async fn start() -> LosingProxy {
        use std::sync::atomic::{AtomicBool, AtomicUsize};
        let server = common::pg_server();
        let upstream = server
            .rsplit('@')
            .next()
            .unwrap()
            .trim_start_matches("postgres://")
            .to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let armed = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicUsize::new(0));
        let withheld = Arc::new(tokio::sync::Notify::new());
        let go_on = Arc::new(tokio::sync::Notify::new());
        let (a, l, w, g) = (armed.clone(), lost.clone(), withheld.clone(), go_on.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let (armed, lost, withheld, go_on) = (a.clone(), l.clone(), w.clone(), g.clone());
                tokio::spawn(async move {
                    let server = tokio::net::TcpStream::connect(&upstream).await.unwrap();
                    proxy_one(client, server, armed, lost, withheld, go_on).await;
                });
            }
        });
        LosingProxy {
            addr,
            armed,
            lost,
            withheld,
            go_on,
        }
    }

    /// The URL of `db` through this proxy (plain text, so that the proxy
    /// can read the server's messages).
    fn url(&self, db: &TestDb) -> String {
        let direct = db.url();
        let name = direct.rsplit('/').next().unwrap();
        let user = common::pg_server()
            .trim_start_matches("postgres://")
            .split('@')
            .next()
            .unwrap()
            .to_string();
        format!("postgres://{user}@{}/{name}?sslmode=disable", self.addr)
    }
}

/// Copies both ways. On a connection whose client has sent a claim while
/// the proxy is armed, the server's answer is passed on up to its
/// CommandComplete; at the ReadyForQuery after it (the claim has committed
/// by then) the proxy signals `withheld`, waits for `go_on`, and closes both
/// sides instead of passing it on.
async fn proxy_one(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    armed: Arc<std::sync::atomic::AtomicBool>,
    lost: Arc<std::sync::atomic::AtomicUsize>,
    withheld: Arc<tokio::sync::Notify>,
    go_on: Arc<tokio::sync::Notify>,
) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let claiming = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = claiming.clone();
    let up = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = cr.read(&mut buf).await {
            if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                break;
            }
            if armed.load(Ordering::SeqCst) && buf[..n].windows(9).any(|w| w == b"claim_due") {
                armed.store(false, Ordering::SeqCst);
                seen.store(true, Ordering::SeqCst);
            }
        }
    });
    // Server messages are framed: a type byte and a length that counts
    // itself (the connection has no TLS, so none is unframed).
    let mut pending: Vec<u8> = Vec::new();
    let mut completed = false;
    let mut buf = vec![0u8; 65536];
    'read: while let Ok(n) = sr.read(&mut buf).await {
        if n == 0 {
            break;
        }
        pending.extend_from_slice(&buf[..n]);
        let mut at = 0;
        while pending.len() >= at + 5 {
            let kind = pending[at];
            let len = u32::from_be_bytes(pending[at + 1..at + 5].try_into().unwrap()) as usize;
            if pending.len() < at + 1 + len {
                break;
            }
            if claiming.load(Ordering::SeqCst) {
                if kind == b'C' {
                    completed = true;
                } else if kind == b'Z' && completed {
                    let _ = cw.write_all(&pending[..at]).await;
                    lost.fetch_add(1, Ordering::SeqCst);
                    withheld.notify_one();
                    go_on.notified().await;
                    break 'read;
                }
            }
            at += 1 + len;
        }
        if cw.write_all(&pending[..at]).await.is_err() {
            break;
        }
        pending.drain(..at);
    }
    up.abort();
}

/// A claim that committed on the server while its answer was lost (the
/// connection broke before the server's ReadyForQuery reached the
/// forwarder) holds leases no worker knows of: they come back within a
/// heartbeat or two once the database answers, not when the lease runs
/// out, and due at once, so that a claim from the floor takes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_whose_answer_was_lost_gives_its_leases_back() {
    let db = test_db!();
    let proxy = LosingProxy::start().await;
    // No full read after the first two claims: the last claim below reads
    // from the floor.
    let a = PgOutbox::connect(
        &proxy.url(&db),
        PgConfig {
            claim_full_scan_every: Duration::from_secs(3600),
            ..config()
        },
    )
    .await
    .expect("connect through the proxy");
    a.ingest(vec![ev("u1", "m-1"), ev("u2", "m-2")])
        .await
        .unwrap();
    // Older than the margin the floor keeps.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut conn = db.conn().await;
    proxy.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let claim = tokio::spawn({
        let a = a.clone();
        async move { a.claim(10, Duration::from_secs(600)).await }
    });
    // The claim committed, and its answer is held back: both events are
    // leased, to nobody's worker. Counted before the connection breaks, as
    // the heartbeat gives such leases back once the claim has failed.
    proxy.withheld.notified().await;
    assert_eq!(scalar(&mut conn, "SELECT count(*) FROM leases").await, 2);
    // Meanwhile a claim takes a newer event and leaves the floor past the
    // two leased ones.
    a.ingest(vec![ev("u3", "m-3")]).await.unwrap();
    let newer = a.claim(10, Duration::from_secs(600)).await.unwrap();
    assert_eq!(newer.iter().map(msg_of).collect::<Vec<_>>(), ["m-3"]);
    a.settle(newer.iter().map(delivered).collect())
        .await
        .unwrap();
    proxy.go_on.notify_one();
    let lost = claim.await.unwrap();
    assert!(
        matches!(&lost, Err(e) if e.is_transient()),
        "the claim's answer never arrived: {lost:?}"
    );
    assert_eq!(proxy.lost.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Given back long before the ten-minute lease, and claimable again.
    wait_for("the lost claim's leases to come back", || {
        let url = db.url();
        async move {
            let mut c = PgConnection::connect(&url).await.unwrap();
            scalar(&mut c, "SELECT count(*) FROM leases").await == 0
        }
    })
    .await;
    let again = a.claim(10, Duration::from_secs(60)).await.unwrap();
    assert_eq!(again.len(), 2);
}

/// A claim passes over keys another claim (of this instance or another)
/// holds at that moment and goes on to the next due heads, so claims that
/// run at once each come back full instead of racing for the same oldest
/// keys, where all but one came back nearly empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_passes_over_keys_another_claim_holds() {
    let db = test_db!();
    let a = instance(&db).await;
    // b's second claim starts from the floor its first one left, never
    // from the front: the keys it passed over must still be above it.
    let b = PgOutbox::connect(&db.url(), from_the_floor_only())
        .await
        .unwrap();
    // One group per event, a few ms apart: the passed-over keys are due
    // strictly before the ones b takes, and all of them before the margin
    // the floor keeps, so a floor past the first key b skipped loses them.
    for i in 0..10 {
        a.ingest(vec![ev(&format!("u{i}"), &format!("m-{i}"))])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Another claim under way holds the four oldest keys' locks.
    let mut other = db.conn().await;
    sqlx::query("BEGIN").execute(&mut other).await.unwrap();
    sqlx::query("SELECT lock_order_keys(ARRAY['u0', 'u1', 'u2', 'u3'])")
        .execute(&mut other)
        .await
        .unwrap();
    let claimed = b.claim(4, Duration::from_secs(30)).await.unwrap();
    let keys: Vec<&str> = claimed.iter().map(|c| c.order_key.as_str()).collect();
    assert_eq!(
        keys,
        ["u4", "u5", "u6", "u7"],
        "the next due heads, none held elsewhere"
    );
    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    // Once let go, the passed-over keys are the oldest due again.
    let rest = b.claim(10, Duration::from_secs(30)).await.unwrap();
    let keys: Vec<&str> = rest.iter().map(|c| c.order_key.as_str()).collect();
    assert_eq!(keys, ["u0", "u1", "u2", "u3", "u8", "u9"]);
    drop(a);
}

/// An outbox whose claims read the due index from its front only once (the
/// first claim), then always from the floor the last claim left.
fn from_the_floor_only() -> PgConfig {
    PgConfig {
        claim_full_scan_every: Duration::from_secs(3600),
        heartbeat: Duration::from_secs(3600),
        instance_expiry: Duration::from_secs(3600),
        own_vacuum_every: Duration::from_secs(3600),
        ..config()
    }
}

/// Pages of `events_due` read so far, once the claims' statistics (sent
/// with their lease rows, `leased` so far) are reported.
async fn due_index_pages(db: &TestDb, watch: &mut PgConnection, leased: i64) -> i64 {
    inserts_reported(db, "leases", leased).await;
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut *watch)
        .await
        .unwrap();
    scalar(
        watch,
        "SELECT (idx_blks_hit + idx_blks_read)::int8 FROM pg_statio_user_indexes \
         WHERE indexrelname = 'events_due'",
    )
    .await
}

/// Every delivered event leaves a dead entry at the front of the due index
/// until a vacuum, and a claim that read the index from its front stepped
/// over all of them: 188,000 of them cost 6 ms of every claim, and with
/// autovacuum's defaults a table of 5M rows keeps up to 1M. A claim starts
/// at the floor the previous one left instead; a claim from the front (a
/// new instance's first) is the comparison.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_starts_past_what_was_delivered() {
    let db = test_db!();
    let mut watch = db.conn().await;
    let a = PgOutbox::connect(&db.url(), from_the_floor_only())
        .await
        .unwrap();
    let mut leased = ingest_distinct_users(&a, 20_000).await;
    // The floor keeps a margin before the claim's clock reading; these
    // events are all older than it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    loop {
        let batch = a.claim(256, Duration::from_secs(300)).await.unwrap();
        if batch.is_empty() {
            break;
        }
        a.settle(batch.iter().map(delivered).collect())
            .await
            .unwrap();
    }
    assert_eq!(
        scalar(&mut watch, "SELECT count(*) FROM events WHERE state = 2").await,
        20_000
    );
    let due = |i: i64| ev(&format!("late-{i}"), &format!("late-{i}"));
    a.ingest((0..10).map(due).collect()).await.unwrap();
    // Their insertions touch the index too: counted before, not after.
    reported(&db, 20_010).await;
    leased += 10;
    let before = due_index_pages(&db, &mut watch, 20_000).await;
    let claimed = a.claim(256, Duration::from_secs(300)).await.unwrap();
    assert_eq!(claimed.len(), 10);
    let from_floor = due_index_pages(&db, &mut watch, leased).await - before;

    // The same claim from the front, by an instance that has not claimed.
    let b = PgOutbox::connect(&db.url(), from_the_floor_only())
        .await
        .unwrap();
    a.ingest((10..20).map(due).collect()).await.unwrap();
    reported(&db, 20_020).await;
    leased += 10;
    let before = due_index_pages(&db, &mut watch, leased - 10).await;
    let claimed = b.claim(256, Duration::from_secs(300)).await.unwrap();
    assert_eq!(claimed.len(), 10);
    let from_front = due_index_pages(&db, &mut watch, leased).await - before;
    eprintln!(
        "pages of the due index read: from the floor {from_floor}, from the front {from_front}"
    );
    // 20,000 dead entries fill about 80 pages.
    assert!(
        from_front >= 30,
        "a claim from the front read {from_front} pages of the due index"
    );
    assert!(
        from_floor * 5 <= from_front,
        "a claim from its floor read {from_floor} pages of the due index, from the front \
         {from_front}"
    );
}

/// A queued event promoted to head after its key's head is delivered is due
/// now, so the next claim, which starts from its floor, finds it. Keeping
/// its accepted time as its due time put it before the floor, and only a
/// claim from the front found it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_head_is_claimed_from_the_floor() {
    let db = test_db!();
    let a = PgOutbox::connect(&db.url(), from_the_floor_only())
        .await
        .unwrap();
    a.ingest(vec![ev("u1", "m-1"), ev("u1", "m-2")])
        .await
        .unwrap();
    // Both are older than the margin the floor keeps.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let first = a.claim(1, Duration::from_secs(300)).await.unwrap();
    assert_eq!(first.iter().map(msg_of).collect::<Vec<_>>(), ["m-1"]);
    a.settle(first.iter().map(delivered).collect())
        .await
        .unwrap();
    let next = a.claim(10, Duration::from_secs(300)).await.unwrap();
    assert_eq!(next.iter().map(msg_of).collect::<Vec<_>>(), ["m-2"]);
}

/// A lease that expired comes back due "now": its event had kept the due
/// time it was claimed at, which the floor has passed since, and would have
/// waited for the next full read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_came_back_is_claimed_from_the_floor() {
    let db = test_db!();
    let a = PgOutbox::connect(&db.url(), from_the_floor_only())
        .await
        .unwrap();
    a.ingest(vec![ev("u1", "m-1")]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Takes it, and leaves the floor 250 ms before now: past its due time.
    let lapsed = a.claim(10, Duration::from_millis(1)).await.unwrap();
    assert_eq!(lapsed.len(), 1);
    wait_for("the lease to come back", || async {
        a.recover_leases().await.unwrap() == 1
    })
    .await;
    let again = common::claim_n(1, |n| a.claim(n, Duration::from_secs(300))).await;
    assert_eq!(again.iter().map(msg_of).collect::<Vec<_>>(), ["m-1"]);
}

/// What the floor passes over (here an event written by an instance whose
/// clock runs a minute behind: due before the floor) is claimed by the next
/// claim that reads from the front, at most `claim_full_scan_every` later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_floor_passes_over_the_next_full_read_claims() {
    let db = test_db!();
    let a = PgOutbox::connect(
        &db.url(),
        PgConfig {
            claim_full_scan_every: Duration::from_millis(300),
            ..from_the_floor_only()
        },
    )
    .await
    .unwrap();
    a.ingest(vec![ev("u1", "m-1")]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let first = a.claim(10, Duration::from_secs(300)).await.unwrap();
    assert_eq!(first.len(), 1);
    a.settle(first.iter().map(delivered).collect())
        .await
        .unwrap();
    a.ingest(vec![ev("u2", "m-2")]).await.unwrap();
    let mut conn = db.conn().await;
    sqlx::query(
        "UPDATE events SET accepted_at = accepted_at - 60000, \
         next_attempt_at = next_attempt_at - 60000 WHERE message_id = 'm-2'",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    wait_for("a claim of the event behind the floor", || async {
        !a.claim(10, Duration::from_secs(300))
            .await
            .unwrap()
            .is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outcome_without_the_lease_is_ignored() {
    let db = test_db!();
    let a = instance(&db).await;
    let b = instance(&db).await;
    a.ingest(vec![ev("u1", "m-1")]).await.unwrap();
    let ca = a.claim(10, Duration::from_millis(300)).await.unwrap();
    assert_eq!(ca.len(), 1);
    // Delivery reads the lease as the time its requests must end by.
    assert_eq!(ca[0].lease, ca[0].claimed_at + 300);
    // a's lease runs out; b brings it back and claims it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let cb = loop {
        // Either instance's recovery may be the one that brings it back.
        b.recover_leases().await.unwrap();
        let cb = b.claim(10, Duration::from_secs(30)).await.unwrap();
        if !cb.is_empty() {
            break cb;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lease never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(cb.len(), 1);
    assert_eq!(cb[0].id, ca[0].id);
    assert_ne!(cb[0].lease, ca[0].lease);
    // a wakes up and reports: ignored, b still holds the event.
    a.settle(vec![outcome(
        &ca[0],
        SettleOutcome::Dead {
            reason: "late".into(),
        },
    )])
    .await
    .unwrap();
    let s = a.status().await.unwrap();
    assert_eq!((s.delivered, s.dead, s.in_flight), (0, 0, 1));
    let mut conn = db.conn().await;
    let owner = scalar(&mut conn, "SELECT owner FROM leases").await;
    assert_eq!(owner, b.instance_id());
    b.settle(vec![delivered(&cb[0])]).await.unwrap();
    let s = b.status().await.unwrap();
    assert_eq!((s.delivered, s.dead, s.in_flight, s.pending), (1, 0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_instances_leases_come_back_after_the_instance_expiry() {
    let db = test_db!();
    let a = instance(&db).await;
    let b = instance(&db).await;
    a.ingest(vec![ev("u1", "m-1"), ev("u1", "m-2")])
        .await
        .unwrap();
    // A long lease: only the instance's death can bring it back early.
    let ca = a.claim(10, Duration::from_secs(600)).await.unwrap();
    assert_eq!(ca.len(), 2);
    // a is alive: nobody takes what it holds, not even a new instance.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(b.recover_leases().await.unwrap(), 0);
    assert!(
        b.claim(10, Duration::from_secs(30))
            .await
            .unwrap()
            .is_empty()
    );
    let c = instance(&db).await;
    assert!(
        c.claim(10, Duration::from_secs(30))
            .await
            .unwrap()
            .is_empty()
    );
    drop(a); // its heartbeat stops
    // Any live instance's heartbeat may be the one that brings them back;
    // a claim skips keys that a recovery holds at that moment, so poll.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let cb = loop {
        let cb = b.claim(10, Duration::from_secs(30)).await.unwrap();
        if !cb.is_empty() {
            break cb;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a's leases never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(cb.iter().map(msg_of).collect::<Vec<_>>(), ["m-1", "m-2"]);
    b.settle(cb.iter().map(delivered).collect()).await.unwrap();
    let s = b.status().await.unwrap();
    assert_eq!((s.delivered, s.pending, s.in_flight), (2, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_counts_are_exact_and_dead_letters_replay_and_purge() {
    let db = test_db!();
    let a = instance(&db).await;
    let mut filtered = ev("u9", "m-f");
    filtered.forward = false;
    let r = a
        .ingest(vec![
            ev("u1", "u1-0"),
            ev("u1", "u1-1"),
            ev("u2", "u2-0"),
            ev("u1", "u1-2"),
            ev("u2", "u2-1"),
            ev("u3", "u3-0"),
            filtered,
        ])
        .await
        .unwrap();
    assert_eq!((r.stored, r.filtered, r.duplicates), (6, 1, 0));
    let r = a.ingest(vec![ev("u1", "u1-0")]).await.unwrap();
    assert_eq!(r.duplicates, 1);
    let s = a.status().await.unwrap();
    assert_eq!(
        (s.pending, s.in_flight, s.accepted, s.duplicates, s.filtered),
        (6, 0, 6, 1, 1)
    );
    assert!(s.oldest_pending_age_seconds >= 0.0);
    let batch = a.claim(10, Duration::from_secs(30)).await.unwrap();
    assert_eq!(batch.len(), 6);
    let s = a.status().await.unwrap();
    assert_eq!((s.pending, s.in_flight), (0, 6));
    let by: HashMap<String, &ClaimedEvent> = batch.iter().map(|c| (msg_of(c), c)).collect();
    a.settle(vec![
        delivered(by["u1-0"]),
        delivered(by["u1-1"]),
        delivered(by["u1-2"]),
        outcome(
            by["u2-0"],
            SettleOutcome::Dead {
                reason: "HTTP 400 bad event".into(),
            },
        ),
        outcome(by["u2-1"], SettleOutcome::Release),
        outcome(
            by["u3-0"],
            SettleOutcome::Retry {
                at: now_ms() + 600_000,
                error: "HTTP 500".into(),
            },
        ),
    ])
    .await
    .unwrap();
    let s = a.status().await.unwrap();
    assert_eq!(
        (
            s.delivered,
            s.dead,
            s.pending,
            s.in_flight,
            s.retries,
            s.held
        ),
        (3, 1, 2, 0, 1, 0)
    );
    // The last failure of the batch, in its order.
    assert_eq!(s.last_error.as_deref(), Some("HTTP 500"));
    let ring: Vec<(&str, &str, i64)> = s
        .recent_errors
        .iter()
        .map(|e| (e.error.as_str(), e.outcome.as_str(), e.events))
        .collect();
    assert_eq!(
        ring,
        [("HTTP 500", "retry", 1), ("HTTP 400 bad event", "dead", 1)]
    );
    assert!(s.last_delivery_at.is_some());
    assert_eq!(s.per_minute.iter().map(|m| m.delivered).sum::<i64>(), 3);

    let dead = a.dead_list(&DeadListFilter::default()).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "HTTP 400 bad event");
    assert_eq!(dead[0].history.as_array().map(Vec::len), Some(1));
    assert_eq!(dead[0].event["messageId"], "u2-0");
    let id = dead[0].id;
    assert!(a.dead_show(id).await.unwrap().is_some());
    assert!(a.dead_selection(&[id, 999_999]).await.unwrap().is_err());
    let f = DeadListFilter {
        reason_contains: Some("400".into()),
        ..Default::default()
    };
    assert_eq!(a.dead_ids(&f).await.unwrap(), vec![id]);

    // u2's queue moved on (u3-0 is not due yet).
    let next = a.claim(10, Duration::from_secs(30)).await.unwrap();
    assert_eq!(next.iter().map(msg_of).collect::<Vec<_>>(), ["u2-1"]);
    a.settle(next.iter().map(delivered).collect())
        .await
        .unwrap();
    assert_eq!(a.replay(Some(vec![id])).await.unwrap(), 1);
    let s = a.status().await.unwrap();
    assert_eq!((s.dead, s.pending, s.delivered), (0, 2, 4));
    let again = a.claim(10, Duration::from_secs(30)).await.unwrap();
    assert_eq!(again.iter().map(msg_of).collect::<Vec<_>>(), ["u2-0"]);
    a.settle(vec![outcome(
        &again[0],
        SettleOutcome::Dead {
            reason: "still bad".into(),
        },
    )])
    .await
    .unwrap();
    assert_eq!(a.purge(None).await.unwrap(), 1);

    // Pruning keeps the delivered total; the counters match the rows.
    let report = a
        .maintain(Duration::ZERO, Duration::from_secs(3600))
        .await
        .unwrap()
        .expect("no other instance maintains");
    assert_eq!(report.pruned_events, 4);
    let s = a.status().await.unwrap();
    assert_eq!(
        (s.delivered, s.dead, s.pending, s.in_flight, s.accepted),
        (4, 0, 1, 0, 6)
    );
    let mut conn = db.conn().await;
    let rows: Vec<(i16, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM events GROUP BY state ORDER BY state")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(rows, vec![(0, 1)]);
    let counted: (i64, i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT sum(s0)::bigint, sum(s2)::bigint, sum(s3)::bigint, sum(s4)::bigint, \
         sum(s5)::bigint, sum(leased)::bigint FROM counters",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(counted, (1, 0, 0, 0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_commit_off_is_refused() {
    let db = test_db!();
    // Off for the session (connection options) ...
    let url = format!("{}?options=-c%20synchronous_commit%3Doff", db.url());
    let err = PgOutbox::connect(&url, config())
        .await
        .err()
        .expect("refused");
    assert!(
        err.to_string().contains("synchronous_commit is off"),
        "{err}"
    );
    // ... and off for the database.
    let mut conn = db.conn().await;
    sqlx::query(&format!(
        "ALTER DATABASE {} SET synchronous_commit = off",
        db.name
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    let err = PgOutbox::connect(&db.url(), config())
        .await
        .err()
        .expect("refused");
    assert!(
        err.to_string().contains("synchronous_commit is off"),
        "{err}"
    );
    sqlx::query(&format!(
        "ALTER DATABASE {} SET synchronous_commit = on",
        db.name
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    PgOutbox::connect(&db.url(), config())
        .await
        .expect("on is accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_runs_on_one_instance_at_a_time() {
    let db = test_db!();
    let a = instance(&db).await;
    a.ingest(vec![ev("u1", "m-1")]).await.unwrap();
    let c = a.claim(10, Duration::from_secs(30)).await.unwrap();
    a.settle(c.iter().map(delivered).collect()).await.unwrap();
    // Another instance is maintaining: this one skips its pass.
    let mut other = db.conn().await;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MAINTENANCE_LOCK)
        .execute(&mut other)
        .await
        .unwrap();
    assert!(
        a.maintain(Duration::ZERO, Duration::from_secs(60))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(scalar(&mut other, "SELECT count(*) FROM events").await, 1);
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MAINTENANCE_LOCK)
        .execute(&mut other)
        .await
        .unwrap();
    let report = a
        .maintain(Duration::ZERO, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(report.map(|r| r.pruned_events), Some(1));
    assert_eq!(scalar(&mut other, "SELECT count(*) FROM events").await, 0);
}

/// A key's lock is one advisory lock: another transaction changing the same
/// key waits for it, one changing another key does not, and a claim passes
/// the key over. A transaction changing more than 512 keys holds the whole
/// key space instead of a lock per key (the server's lock table is
/// bounded): every other change waits for it, and claims find nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_locks_exclude_one_key_or_the_whole_key_space() {
    let db = test_db!();
    let a = instance(&db).await;
    a.ingest(vec![ev("u1", "m-1"), ev("u2", "m-2")])
        .await
        .unwrap();
    let mut watch = db.conn().await;
    let advisory_locks = "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity s ON s.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND s.datname = current_database()";

    let mut other = db.conn().await;
    sqlx::query("BEGIN").execute(&mut other).await.unwrap();
    sqlx::query("SELECT lock_order_keys(ARRAY['u1', 'u1'])")
        .execute(&mut other)
        .await
        .unwrap();
    assert_eq!(
        scalar(&mut watch, advisory_locks).await,
        2,
        "the key space (shared) and one key"
    );
    a.ingest(vec![ev("u2", "m-3")])
        .await
        .expect("another key does not wait");
    let claimed = a.claim(10, Duration::from_secs(30)).await.unwrap();
    let keys: HashSet<&str> = claimed.iter().map(|c| c.order_key.as_str()).collect();
    assert_eq!(keys, HashSet::from(["u2"]), "u1 is passed over");
    let waiting = spawn_ingest(&a, vec![ev("u1", "m-4")]);
    wait_for_lock_waiters(&mut watch, 1).await;
    assert!(!waiting.is_finished());
    sqlx::query("COMMIT").execute(&mut other).await.unwrap();
    waiting.await.unwrap().expect("stored once the key is free");

    let many: Vec<String> = (0..513).map(|i| format!("k{i}")).collect();
    sqlx::query("BEGIN").execute(&mut other).await.unwrap();
    sqlx::query("SELECT lock_order_keys($1)")
        .bind(&many)
        .execute(&mut other)
        .await
        .unwrap();
    assert_eq!(
        scalar(&mut watch, advisory_locks).await,
        1,
        "513 keys take one lock, of the whole key space"
    );
    assert!(
        a.claim(10, Duration::from_secs(30))
            .await
            .unwrap()
            .is_empty(),
        "a claim finds nothing while the key space is held"
    );
    let waiting = spawn_ingest(&a, vec![ev("u9", "m-5")]);
    wait_for_lock_waiters(&mut watch, 1).await;
    sqlx::query("COMMIT").execute(&mut other).await.unwrap();
    waiting
        .await
        .unwrap()
        .expect("stored once the key space is free");
    let claimed = a.claim(10, Duration::from_secs(30)).await.unwrap();
    let msgs: HashSet<String> = claimed.iter().map(msg_of).collect();
    assert_eq!(
        msgs,
        HashSet::from(["m-1".into(), "m-4".into(), "m-5".into()])
    );
}

/// A claim locks 448 keys at most, however many events it may take: its
/// advisory locks must stay few in the server's bounded lock table even
/// with a large `--batch-size`, and under the 512 past which its settle
/// would lock the whole key space. The next claim takes the rest. (256
/// before migration 0021: a drain where every event is a user of its own
/// then needed 390 claims and settles for 100,000 events instead of 224.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_locks_at_most_448_keys() {
    let db = test_db!();
    let a = instance(&db).await;
    let events: Vec<NewEvent> = (0..500)
        .map(|i| ev(&format!("u{i}"), &format!("m-{i}")))
        .chain((0..5).map(|i| ev("u0", &format!("m-u0-{i}"))))
        .collect();
    a.ingest(events).await.unwrap();
    let first = a.claim(2_000, Duration::from_secs(30)).await.unwrap();
    let keys: HashSet<&str> = first.iter().map(|c| c.order_key.as_str()).collect();
    assert_eq!(keys.len(), 448);
    assert_eq!(
        first.len(),
        448 + 5,
        "u0's queued events come with its head"
    );
    let rest = a.claim(2_000, Duration::from_secs(30)).await.unwrap();
    assert_eq!(rest.len(), 500 - 448);
}

/// A claim does not wait for a key another transaction has locked (an
/// ingest appending to it, a settle, another instance's lease recovery): it
/// steps over it, and the next claim takes it. This is why a claim right
/// after a lease recovery may come back short while a heartbeat's recovery
/// of the same key is still committing (`common::claim_n`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_steps_over_a_key_another_transaction_holds() {
    let db = test_db!();
    let a = instance(&db).await;
    a.ingest(vec![ev("u1", "m-1"), ev("u2", "m-2")])
        .await
        .unwrap();
    let mut other = db.conn().await;
    sqlx::query("BEGIN").execute(&mut other).await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(1667659522, hashtext('u1'))")
        .execute(&mut other)
        .await
        .unwrap();
    // A claim that waited for u1's lock would wait here for good.
    let first = tokio::time::timeout(
        Duration::from_secs(10),
        a.claim(10, Duration::from_secs(30)),
    )
    .await
    .expect("the claim does not wait for a key another transaction holds")
    .unwrap();
    assert_eq!(first.iter().map(msg_of).collect::<Vec<_>>(), ["m-2"]);
    sqlx::query("COMMIT").execute(&mut other).await.unwrap();
    let next = a.claim(10, Duration::from_secs(30)).await.unwrap();
    assert_eq!(next.iter().map(msg_of).collect::<Vec<_>>(), ["m-1"]);
}

/// A second key lock call in one transaction (the users an alias teaches,
/// after the group's own) with more than 512 keys keeps a lock per key:
/// asking for the key space exclusively while holding it shared would wait
/// for every other holder, some of whom may wait for this transaction's
/// keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_large_key_lock_call_does_not_take_the_key_space() {
    let db = test_db!();
    let _a = instance(&db).await;
    let mut other = db.conn().await;
    sqlx::query("BEGIN").execute(&mut other).await.unwrap();
    sqlx::query("SELECT lock_order_keys(ARRAY['elsewhere'])")
        .execute(&mut other)
        .await
        .unwrap();
    let mut conn = db.conn().await;
    sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
    // Fails instead of waiting for `other` if it asks for the key space.
    sqlx::query("SET LOCAL lock_timeout = '5s'")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("SELECT lock_order_keys(ARRAY['u1'])")
        .execute(&mut conn)
        .await
        .unwrap();
    let many: Vec<String> = (0..600).map(|i| format!("k{i}")).collect();
    sqlx::query("SELECT lock_order_keys($1)")
        .bind(&many)
        .execute(&mut conn)
        .await
        .expect("a lock per key, beside the other holder of the key space");
    let modes: Vec<(String, i64)> = sqlx::query_as(
        "SELECT mode, count(*) FROM pg_locks WHERE locktype = 'advisory' \
         AND pid = pg_backend_pid() GROUP BY mode ORDER BY mode",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        modes,
        [
            ("ExclusiveLock".to_string(), 601),
            ("ShareLock".to_string(), 1)
        ],
        "the key space shared, u1 and the 600 keys each exclusive"
    );
    sqlx::query("ROLLBACK").execute(&mut conn).await.unwrap();
    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
}

fn identify(user: &str, msg: &str, account: Option<&str>, previous: Option<&str>) -> NewEvent {
    let mut e = ev(user, msg);
    e.kind = "identify";
    e.identity = Some(IdentityUpdate {
        user_id: user.into(),
        account: account.map(Into::into),
        contact: account.map(|a| format!("{a}-contact")),
        previous_id: previous.map(Into::into),
    });
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_after_the_identify_committed_is_due_at_once() {
    let db = test_db!();
    let a = instance(&db).await;
    let b = instance(&db).await;
    a.ingest(vec![ev("u1", "m-1")]).await.unwrap();
    let c = a.claim(10, Duration::from_secs(30)).await.unwrap();
    // The worker read the map (empty) at claim time; the identify commits
    // on another instance before the worker reports the hold.
    b.ingest(vec![identify("u1", "m-id", Some("acct"), None)])
        .await
        .unwrap();
    a.settle(vec![outcome(
        &c[0],
        SettleOutcome::Held {
            error: "ids unknown".into(),
            map_as_of: c[0].claimed_at,
        },
    )])
    .await
    .unwrap();
    let s = a.status().await.unwrap();
    assert_eq!((s.held, s.pending), (0, 2));
    let again = b.claim(10, Duration::from_secs(30)).await.unwrap();
    assert_eq!(
        again.iter().map(msg_of).collect::<Vec<_>>(),
        ["m-1", "m-id"]
    );
    assert_eq!(
        b.identities(&["u1"]).await.unwrap()["u1"],
        (Some("acct".into()), Some("acct-contact".into()))
    );
}

/// Maintenance's safety net (a held head whose user has both ids now is
/// due again) changes a key's queue like every other writer: under the
/// key's lock. Without it, an ingest behind that head could count its
/// event as held while the head was being released, and the count of
/// events queued behind held heads (`held_queued`) would drift for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn maintenance_releases_a_held_head_under_its_keys_lock() {
    let db = test_db!();
    let a = instance(&db).await;
    a.ingest(vec![ev("u1", "m-1"), ev("u1", "m-2")])
        .await
        .unwrap();
    let c = a.claim(10, Duration::from_secs(30)).await.unwrap();
    assert_eq!(c.len(), 2);
    hold_first(&a, &c.iter().collect::<Vec<_>>()).await;
    let s = a.status().await.unwrap();
    assert_eq!((s.pending, s.held, s.held_queued), (0, 2, 1), "{s:?}");
    let mut watch = db.conn().await;
    ids_known_without_release(&mut watch, "u1").await;

    let mut other = db.conn().await;
    let pass = maintain_behind_lock(&a, &mut other, &mut watch, "u1").await;
    assert_eq!(
        scalar(&mut watch, "SELECT count(*) FROM events WHERE state = 4").await,
        1,
        "the head stays held while another transaction holds its key"
    );
    sqlx::query("COMMIT").execute(&mut other).await.unwrap();
    let report = pass
        .await
        .unwrap()
        .unwrap()
        .expect("the only maintaining instance holds the lock");
    assert_eq!(report.held_released, 1);
    let s = a.status().await.unwrap();
    assert_eq!((s.pending, s.held, s.held_queued), (2, 0, 0), "{s:?}");
}

/// Holds the first of a user's claimed events (its ids unknown) and gives
/// the rest back, to queue behind it.
async fn hold_first(a: &PgOutbox, claimed: &[&ClaimedEvent]) {
    let mut settlements = vec![outcome(
        claimed[0],
        SettleOutcome::Held {
            error: "ids unknown".into(),
            map_as_of: claimed[0].claimed_at,
        },
    )];
    settlements.extend(
        claimed[1..]
            .iter()
            .map(|c| outcome(c, SettleOutcome::Release)),
    );
    a.settle(settlements).await.unwrap();
}

/// The user's ids reach the map without the identify's own release, which
/// leaves its held head to maintenance's safety net.
async fn ids_known_without_release(watch: &mut PgConnection, user: &str) {
    sqlx::query("INSERT INTO identities VALUES ($1, 'acct', 'contact', 1)")
        .bind(user)
        .execute(&mut *watch)
        .await
        .unwrap();
}

/// Starts a maintenance pass while `other` holds `key`'s lock in a
/// transaction it leaves open, and returns once the pass waits for it.
async fn maintain_behind_lock(
    a: &PgOutbox,
    other: &mut PgConnection,
    watch: &mut PgConnection,
    key: &str,
) -> tokio::task::JoinHandle<Result<Option<MaintenanceReport>, StoreError>> {
    sqlx::query("BEGIN").execute(&mut *other).await.unwrap();
    sqlx::query("SELECT lock_order_keys(ARRAY[$1])")
        .bind(key)
        .execute(&mut *other)
        .await
        .unwrap();
    let pass = tokio::spawn({
        let a = a.clone();
        async move {
            a.maintain(Duration::from_secs(3600), Duration::from_secs(3600))
                .await
        }
    });
    wait_for_lock_waiters(watch, 1).await;
    pass
}

/// Maintenance commits each step's keys before it asks for the next
/// step's. As one transaction, a pass held the key of a lease it had
/// recovered while it waited for a held head's key; an ingest group that
/// held the head's key and then asked for the lease's closed a cycle, which
/// the server broke a second later by aborting the pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_keeps_no_key_while_it_waits_for_the_next() {
    let db = test_db!();
    // Only the pass recovers leases: the heartbeat's recovery runs once, at
    // the start.
    let a = PgOutbox::connect(&db.url(), quiet_config())
        .await
        .expect("connect outbox");
    a.ingest(vec![ev("lapsed", "m-l"), ev("u1", "m-1"), ev("u1", "m-2")])
        .await
        .unwrap();
    let c = a.claim(10, Duration::from_secs(30)).await.unwrap();
    assert_eq!(c.len(), 3);
    hold_first(
        &a,
        &c.iter().filter(|e| e.order_key == "u1").collect::<Vec<_>>(),
    )
    .await;
    // The other key's lease has run out (its holder stopped answering).
    let mut watch = db.conn().await;
    sqlx::query("UPDATE leases SET until = 1 WHERE order_key = 'lapsed'")
        .execute(&mut watch)
        .await
        .unwrap();
    ids_known_without_release(&mut watch, "u1").await;

    // An ingest group holds u1 and will ask for the lapsed key next.
    let mut group = db.conn().await;
    let pass = maintain_behind_lock(&a, &mut group, &mut watch, "u1").await;
    sqlx::query("SELECT lock_order_keys(ARRAY['lapsed'])")
        .execute(&mut group)
        .await
        .unwrap();
    // The group got the key because the pass had committed the lease's
    // recovery, not because the server aborted the pass to break a cycle.
    assert_eq!(
        scalar(
            &mut watch,
            "SELECT count(*) FROM leases WHERE order_key = 'lapsed'"
        )
        .await,
        0,
        "the lapsed key was free only once the pass that held it was aborted"
    );
    sqlx::query("COMMIT").execute(&mut group).await.unwrap();
    let report = pass
        .await
        .unwrap()
        .unwrap()
        .expect("the only maintaining instance holds the lock");
    assert_eq!((report.leases_released, report.held_released), (1, 1));
    let s = a.status().await.unwrap();
    assert_eq!(
        (s.pending, s.held, s.held_queued, s.in_flight),
        (3, 0, 0, 0),
        "{s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alias_then_identify_releases_the_anonymous_users_held_events() {
    let db = test_db!();
    let a = instance(&db).await;
    a.ingest(vec![ev("anon-1", "m-1")]).await.unwrap();
    // The alias links the ids but teaches nothing: ids still unknown.
    let mut alias = identify("user-1", "m-alias", None, Some("anon-1"));
    alias.kind = "alias";
    alias.forward = false;
    a.ingest(vec![alias]).await.unwrap();
    let c = a.claim(10, Duration::from_secs(30)).await.unwrap();
    a.settle(vec![outcome(
        &c[0],
        SettleOutcome::Held {
            error: "ids unknown".into(),
            map_as_of: c[0].claimed_at,
        },
    )])
    .await
    .unwrap();
    assert_eq!(a.status().await.unwrap().held, 1);
    // The identify of the user teaches the aliased id and releases it.
    let mut learn = identify("user-1", "m-id", Some("acct"), None);
    learn.forward = false;
    a.ingest(vec![learn]).await.unwrap();
    let s = a.status().await.unwrap();
    assert_eq!((s.held, s.pending), (0, 1));
    assert_eq!(
        a.identities(&["anon-1"]).await.unwrap()["anon-1"]
            .0
            .as_deref(),
        Some("acct")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_past_the_backlog_limit_is_refused_and_stores_nothing() {
    let db = test_db!();
    let cfg = PgConfig {
        max_backlog: 3,
        ..config()
    };
    let a = PgOutbox::connect(&db.url(), cfg).await.unwrap();
    a.ingest(vec![ev("u1", "m-1"), ev("u2", "m-2")])
        .await
        .unwrap();
    let err = a
        .ingest(vec![ev("u1", "m-3"), ev("u3", "m-4")])
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
    let s = a.status().await.unwrap();
    assert_eq!((s.pending, s.accepted), (2, 2));
    // The refused messageIds were not remembered: a retry is stored.
    a.ingest(vec![ev("u1", "m-3")]).await.unwrap();
    assert_eq!(a.status().await.unwrap().pending, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partly_settled_batch_keeps_its_key_from_other_instances() {
    let db = test_db!();
    let a = instance(&db).await;
    let b = instance(&db).await;
    a.ingest(vec![ev("u1", "m-1"), ev("u1", "m-2"), ev("u1", "m-3")])
        .await
        .unwrap();
    let c = a.claim(10, Duration::from_secs(30)).await.unwrap();
    assert_eq!(c.len(), 3);
    // The first event is settled alone (a split batch); the rest is still
    // in flight, so nobody may start the key's later events.
    a.settle(vec![delivered(&c[0])]).await.unwrap();
    assert!(
        b.claim(10, Duration::from_secs(30))
            .await
            .unwrap()
            .is_empty()
    );
    a.settle(vec![
        outcome(
            &c[1],
            SettleOutcome::Retry {
                at: now_ms() - 1,
                error: "HTTP 503".into(),
            },
        ),
        outcome(&c[2], SettleOutcome::Release),
    ])
    .await
    .unwrap();
    let next = b.claim(10, Duration::from_secs(30)).await.unwrap();
    assert_eq!(next.iter().map(msg_of).collect::<Vec<_>>(), ["m-2", "m-3"]);
    assert_eq!(next[0].attempts, 2);
    let s = b.status().await.unwrap();
    assert_eq!(
        (s.delivered, s.in_flight, s.pending, s.retries),
        (1, 2, 0, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audience_updates_are_stored_read_and_settled() {
    let db = test_db!();
    let a = instance(&db).await;
    let mut e = identify("u1", "m-1", Some("acct"), None);
    e.forward = false;
    e.audience = vec![("attr_Plan".into(), "\"pro\"".into())];
    a.ingest(vec![e]).await.unwrap();
    assert_eq!(a.audience_users_after("", 10).await.unwrap(), ["u1"]);
    let mut more = ev("u2", "m-2");
    more.forward = false;
    more.audience = vec![
        ("attr_Plan".into(), "\"free\"".into()),
        ("attr_Seats".into(), "3".into()),
    ];
    a.ingest(vec![more]).await.unwrap();
    assert_eq!(a.status().await.unwrap().sync.pending_contacts, 2);
    let pending = a
        .audience_pending_for(&["u1".into()], now_ms())
        .await
        .unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].value, "\"pro\"");
    a.audience(AudienceOp::Settle(AudienceSettlement {
        run_started_at: Some(now_ms()),
        consumed: pending,
        delivered: vec![DeliveredValue {
            account: "acct".into(),
            contact: "acct-contact".into(),
            attribute: "attr_Plan".into(),
            value: "\"pro\"".into(),
        }],
        sent: 1,
        ..Default::default()
    }))
    .await
    .unwrap();
    a.audience(AudienceOp::Schedule { next_run_at: 42 })
        .await
        .unwrap();
    assert_eq!(a.audience_users_after("", 10).await.unwrap(), ["u2"]);
    assert_eq!(a.status().await.unwrap().sync.pending_contacts, 1);
    let key = (
        "acct".to_string(),
        "acct-contact".to_string(),
        "attr_Plan".to_string(),
    );
    let values = a
        .audience_delivered_values(std::slice::from_ref(&key))
        .await
        .unwrap();
    assert_eq!(values[&key], "\"pro\"");
    assert_eq!(a.sync_next_run_at().await.unwrap(), Some(42));
    assert_eq!(a.status().await.unwrap().sync.last_run_sent, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_a_transient_error() {
    // Nothing listens on port 1: the answer is quick and says "try again",
    // so ingest can answer 503 rather than 500.
    let err = PgOutbox::connect("postgres://root@127.0.0.1:1/test", config())
        .await
        .err()
        .expect("no server");
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains("unreachable"), "{err}");
}

/// Without autovacuum every delivered, pruned or counted row leaves a dead
/// version behind for good: maintenance then vacuums the outbox's tables
/// itself, one interval after the start and every interval after. Not at
/// the first pass: analysed while still empty, a new outbox's `events` was
/// planned as empty until the next analysis, and an admin replay of 30,000
/// dead letters right after a start took over 30 s (half the runs of
/// `dead_chunks`) instead of about 2. With autovacuum on it leaves all of
/// that to the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn maintenance_vacuums_the_tables_when_the_server_does_not() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let mut conn = db.conn().await;
    let autovacuum: String = sqlx::query_scalar("SHOW autovacuum")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    // Its first own vacuum is an hour away: its first pass must not vacuum.
    let late = PgOutbox::connect(
        &db.url(),
        PgConfig {
            own_vacuum_every: Duration::from_secs(3600),
            ..config()
        },
    )
    .await
    .expect("connect outbox");
    late.ingest(vec![ev("u1", "m-1")]).await.unwrap();
    let claimed = late.claim(10, Duration::from_secs(30)).await.unwrap();
    late.settle(claimed.iter().map(delivered).collect())
        .await
        .unwrap();
    late.maintain(Duration::from_secs(3600), Duration::from_secs(3600))
        .await
        .unwrap()
        .expect("the only maintaining instance holds the lock");
    let vacuumed = || {
        let url = db.url();
        async move {
            let mut c = PgConnection::connect(&url).await.unwrap();
            let n: i64 = sqlx::query_scalar(
                "SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'events'",
            )
            .fetch_one(&mut c)
            .await
            .unwrap();
            n
        }
    };
    // Statistics reach the view within a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(vacuumed().await, 0, "no vacuum at the first pass");

    // Another instance, its interval short, vacuums once it has passed.
    let soon = PgOutbox::connect(
        &db.url(),
        PgConfig {
            own_vacuum_every: Duration::from_millis(300),
            ..config()
        },
    )
    .await
    .expect("connect outbox");
    if autovacuum.eq_ignore_ascii_case("off") {
        wait_for("the events table vacuumed by maintenance", || async {
            soon.maintain(Duration::from_secs(3600), Duration::from_secs(3600))
                .await
                .unwrap()
                .expect("the only maintaining instance holds the lock");
            vacuumed().await > 0
        })
        .await;
    } else {
        // Past its interval, then statistics' second: no VACUUM of ours.
        tokio::time::sleep(Duration::from_millis(400)).await;
        soon.maintain(Duration::from_secs(3600), Duration::from_secs(3600))
            .await
            .unwrap()
            .expect("the only maintaining instance holds the lock");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            vacuumed().await,
            0,
            "autovacuum is on: maintenance must not vacuum"
        );
    }
}

/// A connection to `db` migrated as an older version left it: every
/// migration whose name sorts before `version` (such as `"0009"`).
async fn schema_before(db: &TestDb, version: &str) -> PgConnection {
    let old = tempfile::tempdir().expect("tempdir");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/postgres");
    for entry in std::fs::read_dir(&dir).expect("migrations") {
        let name = entry.expect("migration").file_name();
        if name.to_string_lossy().as_ref() < version {
            std::fs::copy(dir.join(&name), old.path().join(&name)).expect("copy migration");
        }
    }
    let mut conn = db.conn().await;
    sqlx::migrate::Migrator::new(old.path())
        .await
        .expect("older migrations")
        .run(&mut conn)
        .await
        .expect("older schema");
    conn
}

/// A database of the schema before leases had a table of their own (their
/// owner, token and expiry were columns of `events`), with an event in
/// flight as that version left it: the upgrade gives the lease back, as a
/// restart would, so the event is pending, counted so, and delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_gives_back_the_leases_the_older_schema_held() {
    let db = test_db!();
    let mut conn = schema_before(&db, "0003").await;
    sqlx::raw_sql(
        "INSERT INTO instances (started_at, heartbeat_at) VALUES (1, 1); \
         INSERT INTO order_keys VALUES ('u1'); \
         INSERT INTO events (source, message_id, kind, order_key, payload, state, accepted_at, \
             next_attempt_at, lease_owner, lease_token, lease_until) \
         VALUES ('src', 'm1', 'track', 'u1', '{\"messageId\":\"m1\"}', 0, 1, 1, 1, 99, 99)",
    )
    .execute(&mut conn)
    .await
    .expect("an event in flight, as the older version wrote it");
    assert_eq!(
        scalar(&mut conn, "SELECT sum(leased)::int8 FROM counters").await,
        1
    );

    let a = instance(&db).await;
    let s = a.status().await.unwrap();
    assert_eq!((s.pending, s.in_flight), (1, 0), "{s:?}");
    let claimed = a.claim(10, Duration::from_secs(30)).await.unwrap();
    assert_eq!(claimed.iter().map(msg_of).collect::<Vec<_>>(), ["m1"]);
    assert_eq!(a.status().await.unwrap().in_flight, 1);
    a.settle(vec![delivered(&claimed[0])]).await.unwrap();
    let s = a.status().await.unwrap();
    assert_eq!((s.pending, s.in_flight, s.delivered), (0, 0, 1), "{s:?}");
}

/// A forwarder of the version before the claim floor (migration 0010)
/// shares the database during a rolling upgrade. Its two calls that 0010
/// replaced are wrappers now (0011): its claim reads from the front and
/// takes a key's queue under one lease, its promotion keeps the promoted
/// event's due time, as they did; a newer instance then claims what it
/// left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_forwarder_s_claim_and_promotion_work_after_the_upgrade() {
    let db = test_db!();
    let a = instance(&db).await;
    a.ingest(vec![ev("u1", "m-1"), ev("u1", "m-2"), ev("u2", "m-3")])
        .await
        .unwrap();
    let mut conn = db.conn().await;
    let now = scalar(&mut conn, "SELECT max(accepted_at) + 10 FROM events").await;
    let claimed: Vec<String> = sqlx::query_scalar(
        "SELECT e.message_id FROM claim_events($1, 10, $2, $3) c \
         JOIN events e ON e.id = c.id ORDER BY c.id",
    )
    .bind(a.instance_id())
    .bind(now + 60_000)
    .bind(now)
    .fetch_all(&mut conn)
    .await
    .expect("the older claim");
    assert_eq!(claimed, ["m-1", "m-2", "m-3"]);
    assert_eq!(scalar(&mut conn, "SELECT count(*) FROM leases").await, 3);

    // The older version gives its leases back and, with m-1 delivered,
    // promotes u1's next event.
    sqlx::raw_sql(
        "DELETE FROM leases; UPDATE events SET state = 2 WHERE message_id = 'm-1'; \
         SELECT normalize_keys(ARRAY['u1'])",
    )
    .execute(&mut conn)
    .await
    .expect("the older promotion");
    let (state, due, accepted): (i16, i64, i64) = sqlx::query_as(
        "SELECT state, next_attempt_at, accepted_at FROM events WHERE message_id = 'm-2'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!((state, due), (0, accepted), "promoted, its due time kept");

    let rest = a.claim(10, Duration::from_secs(30)).await.unwrap();
    assert_eq!(rest.iter().map(msg_of).collect::<Vec<_>>(), ["m-2", "m-3"]);
}

/// Users held before the upgrade that counts the held queues (migration
/// 0009) are counted by it: their queued events stay with the held, not
/// with the pending, and leave the count when their users are released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_counts_the_queues_the_older_schema_held() {
    let db = test_db!();
    let mut conn = schema_before(&db, "0009").await;
    // u1 held with two events queued behind it, u2 held alone, u3 pending.
    sqlx::raw_sql(
        "INSERT INTO events (source, message_id, kind, order_key, payload, state, accepted_at, \
             next_attempt_at) VALUES \
         ('src', 'm1', 'track', 'u1', '{\"messageId\":\"m1\"}', 4, 1, 1), \
         ('src', 'm2', 'track', 'u1', '{\"messageId\":\"m2\"}', 5, 1, 1), \
         ('src', 'm3', 'track', 'u1', '{\"messageId\":\"m3\"}', 5, 1, 1), \
         ('src', 'm4', 'track', 'u2', '{\"messageId\":\"m4\"}', 4, 1, 1), \
         ('src', 'm5', 'track', 'u3', '{\"messageId\":\"m5\"}', 0, 1, 1)",
    )
    .execute(&mut conn)
    .await
    .expect("held events, as the older version wrote them");

    let a = instance(&db).await;
    let s = a.status().await.unwrap();
    assert_eq!(
        (s.pending, s.held, s.held_queued),
        (1, 4, 2),
        "after the upgrade: {s:?}"
    );
    // u1's ids arrive: its head and its queue are pending again, the
    // identify queued behind them.
    a.ingest(vec![identify("u1", "id-u1", Some("acct-1"), None)])
        .await
        .unwrap();
    let s = a.status().await.unwrap();
    assert_eq!(
        (s.pending, s.held, s.held_queued),
        (5, 1, 0),
        "after u1's identify: {s:?}"
    );
}

/// The read-only queries that docs/operator.md gives for PostgreSQL name
/// the schema's tables and columns: each runs on an outbox with events in
/// every state but dead, and one in flight, so a schema change that
/// would leave an operator's query failing at 3 a.m. fails here first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_guides_queries_run_on_the_schema() {
    let db = test_db!();
    let a = instance(&db).await;
    a.ingest(vec![ev("u1", "m1"), ev("u1", "m2"), ev("u2", "m3")])
        .await
        .unwrap();
    let claimed = a.claim(1, Duration::from_secs(30)).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let guide = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operator.md"))
        .expect("docs/operator.md");
    let section = guide
        .split("\n## PostgreSQL")
        .nth(1)
        .expect("docs/operator.md has a PostgreSQL section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut ran = 0;
    for block in section.split("```sql\n").skip(1) {
        let sql = block.split("```").next().unwrap_or_default().trim();
        // The guide's settings changes are advice, not reads.
        if sql.starts_with("ALTER") {
            continue;
        }
        let mut conn = db.conn().await;
        sqlx::raw_sql(sql)
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("the guide's query fails: {e}\n{sql}"));
        ran += 1;
    }
    assert!(ran >= 10, "only {ran} queries found in the guide");
    let mut conn = db.conn().await;
    let in_flight: i64 = sqlx::query_scalar(
        "SELECT count(l.event_id) FROM events e LEFT JOIN leases l ON l.event_id = e.id",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(in_flight, 1);
}

/// A small claim (a top-up of a partial batch, a rate-capped instance)
/// whose first candidates' keys are held elsewhere passes over them as a
/// large one does. Its first page of candidates was `max + 16`, more than
/// the `2 × max` it may read in all, and its second page asked for a
/// negative number of rows: the claim failed with an error every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_claim_passes_over_keys_held_elsewhere() {
    let db = test_db!();
    let a = instance(&db).await;
    ingest_distinct_users(&a, 1000).await;
    // Another session holds the keys of the 18 oldest due events.
    let mut other = db.conn().await;
    sqlx::query("BEGIN").execute(&mut other).await.unwrap();
    let taken: Vec<String> = sqlx::query_scalar(
        "SELECT order_key FROM events WHERE state = 0 ORDER BY next_attempt_at, id LIMIT 18",
    )
    .fetch_all(&mut other)
    .await
    .unwrap();
    sqlx::query(
        "SELECT count(pg_advisory_xact_lock(1667659522, hashtext(k))) FROM unnest($1::text[]) AS t(k)",
    )
    .bind(&taken)
    .execute(&mut other)
    .await
    .unwrap();
    for max in [1, 4, 12] {
        let claimed = a
            .claim(max, Duration::from_secs(300))
            .await
            .unwrap_or_else(|e| panic!("a claim of {max} with 18 keys held: {e}"));
        assert!(claimed.len() <= max);
        let held: Vec<_> = claimed
            .iter()
            .filter(|c| taken.contains(&c.order_key))
            .collect();
        assert!(
            held.is_empty(),
            "claimed keys another session held: {held:?}"
        );
        a.settle(claimed.iter().map(delivered).collect())
            .await
            .unwrap();
    }
    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    // Let go, the held keys are claimed.
    let rest = a.claim(18, Duration::from_secs(300)).await.unwrap();
    let rest: HashSet<&str> = rest.iter().map(|c| c.order_key.as_str()).collect();
    let taken: HashSet<&str> = taken.iter().map(String::as_str).collect();
    assert_eq!(rest, taken);
}

/// The indexed columns that name a key (order keys, message ids, users' ids) and
/// their indexes compare bytes, on a database whose own collation is a
/// Unicode one (ICU `en-US`, like most installations' `en_US.UTF-8`): a
/// comparison there runs the Unicode collation algorithm, and claims,
/// settles and ingest compare keys at every step of their index descents.
/// Every call of the service still works on such a database.
#[tokio::test]
async fn key_columns_compare_as_bytes_whatever_the_database_collation() {
    let db = match TestDb::create_with(
        "TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'",
    )
    .await
    {
        Some(db) => db,
        None => return,
    };
    let a = PgOutbox::connect(&db.url(), quiet_config())
        .await
        .expect("connect outbox");
    let mut conn = db.conn().await;
    let provider: String = sqlx::query_scalar(
        "SELECT datlocprovider::text FROM pg_database WHERE datname = current_database()",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(provider, "i", "the database's collation is ICU's");
    let keyed = "('events', 'leases', 'held_keys', 'message_ids', 'identities', 'aliases')";
    let columns: Vec<(String, String, String)> = sqlx::query_as(&format!(
        "SELECT c.relname::text, a.attname::text, co.collname::text FROM pg_attribute a \
         JOIN pg_class c ON c.oid = a.attrelid JOIN pg_collation co ON co.oid = a.attcollation \
         WHERE c.relname IN {keyed} AND a.attnum > 0 AND NOT a.attisdropped \
         AND a.attname IN ('order_key', 'source', 'message_id', 'user_id', 'previous_id') \
         AND (c.relname <> 'events' OR a.attname = 'order_key') ORDER BY 1, 2"
    ))
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(columns.len(), 8, "{columns:?}");
    let not_bytes: Vec<_> = columns.iter().filter(|(_, _, co)| co != "C").collect();
    assert!(
        not_bytes.is_empty(),
        "key columns with the database's collation: {not_bytes:?}"
    );
    let indexes: Vec<(String, String)> = sqlx::query_as(&format!(
        "SELECT i.indexrelid::regclass::text, co.collname::text FROM pg_index i \
         JOIN pg_class c ON c.oid = i.indrelid \
         CROSS JOIN LATERAL unnest(i.indcollation::oid[]) AS k(coll) \
         JOIN pg_collation co ON co.oid = k.coll \
         WHERE c.relname IN {keyed} ORDER BY 1"
    ))
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert!(indexes.len() >= 7, "{indexes:?}");
    let not_bytes: Vec<_> = indexes.iter().filter(|(_, co)| co != "C").collect();
    assert!(
        not_bytes.is_empty(),
        "indexes that compare keys by the database's collation: {not_bytes:?}"
    );
    // Keys that sort differently by bytes and by en-US ("B" < "a" < "b"
    // against "a" < "b" < "B"), each with two events, delivered in order.
    let keys = ["a", "B", "b", "é", "e"];
    let group: Vec<NewEvent> = keys
        .iter()
        .flat_map(|k| [ev(k, &format!("{k}-1")), ev(k, &format!("{k}-2"))])
        .collect();
    assert_eq!(a.ingest(group.clone()).await.unwrap().stored, 10);
    assert_eq!(a.ingest(group).await.unwrap().stored, 0, "duplicates");
    let mut sent = Vec::new();
    while sent.len() < 10 {
        let claimed = a.claim(100, Duration::from_secs(60)).await.unwrap();
        assert!(!claimed.is_empty(), "claimed nothing after {sent:?}");
        sent.extend(claimed.iter().map(msg_of));
        a.settle(claimed.iter().map(delivered).collect())
            .await
            .unwrap();
    }
    for k in keys {
        let first = sent.iter().position(|m| *m == format!("{k}-1")).unwrap();
        let second = sent.iter().position(|m| *m == format!("{k}-2")).unwrap();
        assert!(first < second, "{k}: {sent:?}");
    }
    assert_eq!(a.status().await.unwrap().delivered, 10);
    assert!(every_call_once(&a, "icu").await > 0);
}

/// A claim reads the due index for about the heads it leases, not twice as
/// many: it read `2 × 256` candidates for a claim of 256 keys, so that it
/// could pass over keys another session holds, and every candidate read
/// is an index entry, a heap fetch and a lease probe. It reads a page of a
/// few more than it needs, and a second page only when other sessions hold
/// too many of the first page's keys; then it still leases a full claim,
/// of keys nobody else holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_reads_a_second_page_of_candidates_only_when_keys_are_taken() {
    let db = test_db!();
    let mut watch = db.conn().await;
    let a = outbox_planning_on_empty_tables_with(&db, &mut watch, quiet_config()).await;
    a.ingest(vec![ev("warm", "warm")]).await.unwrap();
    let warm = a.claim(10, Duration::from_secs(300)).await.unwrap();
    a.settle(warm.iter().map(delivered).collect())
        .await
        .unwrap();
    ingest_distinct_users(&a, 1000).await;
    reported(&db, 1001).await;
    let before = index_stat(&mut watch, "events_due", "idx_tup_read").await;
    let claimed = a.claim(256, Duration::from_secs(300)).await.unwrap();
    assert_eq!(claimed.len(), 256);
    inserts_reported(&db, "leases", 257).await;
    let read = index_stat(&mut watch, "events_due", "idx_tup_read").await - before;
    assert!(
        read <= 256 + 32,
        "an uncontended claim of 256 keys read {read} entries of the due index"
    );
    // Another session holds the keys of the next 100 due events, as a
    // claim, a settle or an ingest of those users does while it runs.
    let mut other = db.conn().await;
    sqlx::query("BEGIN").execute(&mut other).await.unwrap();
    let taken: Vec<String> = sqlx::query_scalar(
        "SELECT order_key FROM events e WHERE state = 0 \
         AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.event_id = e.id) \
         ORDER BY next_attempt_at, id LIMIT 100",
    )
    .fetch_all(&mut other)
    .await
    .unwrap();
    assert_eq!(taken.len(), 100);
    sqlx::query("SELECT count(pg_advisory_xact_lock(1667659522, hashtext(k))) FROM unnest($1::text[]) AS t(k)")
        .bind(&taken)
        .execute(&mut other)
        .await
        .unwrap();
    let second = a.claim(256, Duration::from_secs(300)).await.unwrap();
    assert_eq!(second.len(), 256, "a claim past 100 taken keys");
    let taken: HashSet<&str> = taken.iter().map(String::as_str).collect();
    let overlap: Vec<_> = second
        .iter()
        .filter(|c| taken.contains(c.order_key.as_str()))
        .map(|c| c.order_key.clone())
        .collect();
    assert!(
        overlap.is_empty(),
        "claimed keys another session held: {overlap:?}"
    );
    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    // The passed-over keys are claimed next, first.
    let third = a.claim(100, Duration::from_secs(300)).await.unwrap();
    let third: HashSet<&str> = third.iter().map(|c| c.order_key.as_str()).collect();
    assert_eq!(third, taken);
}
