-- The outbox: every accepted Segment event, from acceptance to a terminal state.
--
-- state: 0 pending (head of its ordering key, due at next_attempt_at)
--        1 in_flight (claimed by a worker until lease_until)
--        2 delivered
--        3 dead (reason says why; replayable)
--        4 held (waiting for identity resolution)
--        5 queued (behind an earlier event with the same ordering key)
-- Per ordering key at most one event group is in states 0, 1 or 4; the rest
-- wait in state 5 and are promoted in id order. That keeps claims O(batch).
CREATE TABLE events (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    source           TEXT    NOT NULL,
    message_id       TEXT    NOT NULL,
    kind             TEXT    NOT NULL,
    order_key        TEXT    NOT NULL,
    payload          TEXT    NOT NULL,
    state            INTEGER NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    accepted_at      INTEGER NOT NULL,
    next_attempt_at  INTEGER NOT NULL,
    first_attempt_at INTEGER,
    lease_until      INTEGER,
    finished_at      INTEGER,
    last_error       TEXT,
    reason           TEXT,
    history          TEXT
);

-- Hot queries name these indexes with INDEXED BY and repeat a partial index's
-- WHERE terms verbatim: SQLite uses a partial index only when the query's
-- WHERE contains them, and without statistics it may otherwise pick
-- events_state and scan the whole backlog.
CREATE INDEX events_due   ON events (next_attempt_at, id) WHERE state = 0;
CREATE INDEX events_key   ON events (order_key, id) WHERE state IN (0, 1, 4, 5);
CREATE INDEX events_state ON events (state, id);
-- Retention pruning walks delivered events by age without touching the rest.
CREATE INDEX events_finished ON events (finished_at) WHERE state = 2;

-- Idempotency: messageIds seen per source (a hash of the write key).
CREATE TABLE message_ids (
    source     TEXT    NOT NULL,
    message_id TEXT    NOT NULL,
    seen_at    INTEGER NOT NULL,
    PRIMARY KEY (source, message_id)
) WITHOUT ROWID;
CREATE INDEX message_ids_seen ON message_ids (seen_at);

-- Identity map built by identify, group and alias calls.
CREATE TABLE identities (
    user_id    TEXT PRIMARY KEY,
    account_id TEXT,
    contact_id TEXT,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;

-- Counters kept in the same transactions as the rows they count, so status
-- never scans the outbox.
CREATE TABLE state_counts (
    state INTEGER PRIMARY KEY,
    n     INTEGER NOT NULL
);
INSERT INTO state_counts (state, n) VALUES (0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (5, 0);

CREATE TABLE totals (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO totals (name, value) VALUES
    ('accepted', 0), ('delivered', 0), ('dead', 0), ('filtered', 0),
    ('duplicates', 0), ('rejected', 0), ('retries', 0);

-- Free-form operator facts: last delivery time, last error, sync schedule.
CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value TEXT
) WITHOUT ROWID;

-- Per-minute activity for the status page's last hour.
CREATE TABLE minute_stats (
    minute    INTEGER PRIMARY KEY,
    accepted  INTEGER NOT NULL DEFAULT 0,
    delivered INTEGER NOT NULL DEFAULT 0,
    failed    INTEGER NOT NULL DEFAULT 0
);

CREATE TRIGGER events_count_insert AFTER INSERT ON events BEGIN
    UPDATE state_counts SET n = n + 1 WHERE state = NEW.state;
END;
CREATE TRIGGER events_count_delete AFTER DELETE ON events BEGIN
    UPDATE state_counts SET n = n - 1 WHERE state = OLD.state;
END;
CREATE TRIGGER events_count_update AFTER UPDATE OF state ON events
WHEN OLD.state <> NEW.state BEGIN
    UPDATE state_counts SET n = n - 1 WHERE state = OLD.state;
    UPDATE state_counts SET n = n + 1 WHERE state = NEW.state;
    UPDATE totals SET value = value + 1
        WHERE (NEW.state = 2 AND name = 'delivered') OR (NEW.state = 3 AND name = 'dead');
END;

-- Sync lane: audience updates merged per (user, attribute) within a window,
-- last value wins; values are JSON text.
CREATE TABLE audience_pending (
    user_id    TEXT    NOT NULL,
    attribute  TEXT    NOT NULL,
    value      TEXT    NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (user_id, attribute)
) WITHOUT ROWID;

-- What the sync lane last delivered per contact and attribute, so an
-- unchanged value is not sent again.
CREATE TABLE audience_delivered (
    account_id   TEXT    NOT NULL,
    contact_id   TEXT    NOT NULL,
    attribute    TEXT    NOT NULL,
    value        TEXT    NOT NULL,
    delivered_at INTEGER NOT NULL,
    PRIMARY KEY (account_id, contact_id, attribute)
) WITHOUT ROWID;
