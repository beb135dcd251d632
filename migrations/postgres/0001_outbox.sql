-- The PostgreSQL outbox, shared by any number of forwarder instances.
--
-- events.state: 0 head of its ordering key (due at next_attempt_at)
--               2 delivered
--               3 dead (reason says why; replayable)
--               4 held (head waiting for identity resolution)
--               5 queued (behind an earlier event with the same ordering key)
-- In flight is not a state: a claimed event keeps its state and carries a
-- lease (owner instance, token, expiry). Per ordering key at most one event
-- is in state 0 or 4, and it is the key's lowest active id. lease_token is
-- what the claim handed to its worker (the lease's expiry in ms, which
-- delivery reads as its deadline); a settle counts only where owner and
-- token still match.
CREATE TABLE events (
    id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source           TEXT     NOT NULL,
    message_id       TEXT     NOT NULL,
    kind             TEXT     NOT NULL,
    order_key        TEXT     NOT NULL,
    payload          TEXT     NOT NULL,
    state            SMALLINT NOT NULL,
    attempts         INTEGER  NOT NULL DEFAULT 0,
    accepted_at      BIGINT   NOT NULL,
    next_attempt_at  BIGINT   NOT NULL,
    first_attempt_at BIGINT,
    finished_at      BIGINT,
    last_error       TEXT,
    reason           TEXT,
    history          JSONB,
    actions          TEXT,
    lease_owner      BIGINT,
    lease_token      BIGINT,
    lease_until      BIGINT
);

-- Claimable heads, oldest due first; a leased head leaves the index.
CREATE INDEX events_due ON events (next_attempt_at, id) WHERE state = 0 AND lease_token IS NULL;
-- A key's active events in order (promotion, followers of a claimed head).
CREATE INDEX events_key ON events (order_key, id) WHERE state IN (0, 4, 5);
-- A key's heads (normally one): normalisation finds a stray head without
-- walking the key's whole queue.
CREATE INDEX events_key_heads ON events (order_key, id) WHERE state IN (0, 4);
-- Whether a key has an event in flight.
CREATE INDEX events_key_leased ON events (order_key) WHERE lease_token IS NOT NULL;
-- Lease recovery: by owner (dead instances) and by expiry.
CREATE INDEX events_lease_owner ON events (lease_owner) WHERE lease_token IS NOT NULL;
CREATE INDEX events_lease_until ON events (lease_until) WHERE lease_token IS NOT NULL;
CREATE INDEX events_heads ON events (id) WHERE state = 0;
CREATE INDEX events_dead ON events (id) WHERE state = 3;
CREATE INDEX events_held ON events (id) WHERE state = 4;
CREATE INDEX events_finished ON events (finished_at) WHERE state = 2;

-- One row per ordering key with active events: the lock that orders every
-- change to a key's queue (ingest, settle, recovery, replay) across instances.
CREATE TABLE order_keys (
    order_key TEXT PRIMARY KEY
);

-- Idempotency across instances: messageIds seen per source.
CREATE TABLE message_ids (
    source     TEXT   NOT NULL,
    message_id TEXT   NOT NULL,
    seen_at    BIGINT NOT NULL,
    PRIMARY KEY (source, message_id)
);
CREATE INDEX message_ids_seen ON message_ids (seen_at);

-- Forwarder processes sharing this database. Leases belong to an instance;
-- a heartbeat older than the instance expiry means the instance is dead and
-- its leases come back. Per-instance facts live here so that no settle
-- writes a row that every instance writes.
CREATE TABLE instances (
    id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_at       BIGINT NOT NULL,
    heartbeat_at     BIGINT NOT NULL,
    last_delivery_at BIGINT,
    last_error       TEXT,
    last_error_at    BIGINT,
    -- The instance's ring of recent errors (JSON), merged by status.
    recent_errors    TEXT
);

CREATE TABLE identities (
    user_id    TEXT PRIMARY KEY,
    account_id TEXT,
    contact_id TEXT,
    updated_at BIGINT NOT NULL
);

CREATE TABLE aliases (
    previous_id TEXT PRIMARY KEY,
    user_id     TEXT   NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX aliases_user ON aliases (user_id);

-- Sharded counters: a transaction adds its deltas to one shard row (chosen
-- by its transaction id), status sums the 16 rows. No row that every writer
-- fights over, and one counter row per transaction, so two transactions
-- never wait on each other's counters in a cycle.
-- s<N>: events in state N; leased: in flight; delivered and dead_total:
-- transitions (kept by pruning and purging); the rest are added by ingest
-- and settle.
CREATE TABLE counters (
    shard      SMALLINT PRIMARY KEY,
    s0         BIGINT NOT NULL DEFAULT 0,
    s2         BIGINT NOT NULL DEFAULT 0,
    s3         BIGINT NOT NULL DEFAULT 0,
    s4         BIGINT NOT NULL DEFAULT 0,
    s5         BIGINT NOT NULL DEFAULT 0,
    leased     BIGINT NOT NULL DEFAULT 0,
    delivered  BIGINT NOT NULL DEFAULT 0,
    dead_total BIGINT NOT NULL DEFAULT 0,
    accepted   BIGINT NOT NULL DEFAULT 0,
    duplicates BIGINT NOT NULL DEFAULT 0,
    filtered   BIGINT NOT NULL DEFAULT 0,
    retries    BIGINT NOT NULL DEFAULT 0,
    -- Users with at least one pending audience update (the sync lane's
    -- backlog), kept by the audience_pending triggers.
    sync_contacts BIGINT NOT NULL DEFAULT 0
);
INSERT INTO counters (shard) SELECT generate_series(0, 15);

CREATE TABLE minute_stats (
    minute    BIGINT   NOT NULL,
    shard     SMALLINT NOT NULL,
    accepted  BIGINT   NOT NULL DEFAULT 0,
    delivered BIGINT   NOT NULL DEFAULT 0,
    failed    BIGINT   NOT NULL DEFAULT 0,
    PRIMARY KEY (minute, shard)
);

CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value TEXT
);

CREATE TABLE audience_pending (
    user_id    TEXT   NOT NULL,
    attribute  TEXT   NOT NULL,
    value      TEXT   NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, attribute)
);

CREATE TABLE audience_delivered (
    account_id   TEXT   NOT NULL,
    contact_id   TEXT   NOT NULL,
    attribute    TEXT   NOT NULL,
    value        TEXT   NOT NULL,
    delivered_at BIGINT NOT NULL,
    PRIMARY KEY (account_id, contact_id, attribute)
);

-- Statement-level triggers with transition tables: one counter update per
-- statement, whatever the number of rows, and no code path can forget it.
CREATE FUNCTION events_counted_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE counters c SET s0 = c.s0 + d.s0, s2 = c.s2 + d.s2, s3 = c.s3 + d.s3,
        s4 = c.s4 + d.s4, s5 = c.s5 + d.s5, leased = c.leased + d.leased
    FROM (SELECT count(*) FILTER (WHERE state = 0) AS s0, count(*) FILTER (WHERE state = 2) AS s2,
                 count(*) FILTER (WHERE state = 3) AS s3, count(*) FILTER (WHERE state = 4) AS s4,
                 count(*) FILTER (WHERE state = 5) AS s5,
                 count(*) FILTER (WHERE lease_token IS NOT NULL) AS leased
          FROM new_rows) d
    WHERE c.shard = txid_current() % 16;
    RETURN NULL;
END $$;

CREATE FUNCTION events_counted_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE counters c SET s0 = c.s0 - d.s0, s2 = c.s2 - d.s2, s3 = c.s3 - d.s3,
        s4 = c.s4 - d.s4, s5 = c.s5 - d.s5, leased = c.leased - d.leased
    FROM (SELECT count(*) FILTER (WHERE state = 0) AS s0, count(*) FILTER (WHERE state = 2) AS s2,
                 count(*) FILTER (WHERE state = 3) AS s3, count(*) FILTER (WHERE state = 4) AS s4,
                 count(*) FILTER (WHERE state = 5) AS s5,
                 count(*) FILTER (WHERE lease_token IS NOT NULL) AS leased
          FROM old_rows) d
    WHERE c.shard = txid_current() % 16 AND d.s0 + d.s2 + d.s3 + d.s4 + d.s5 > 0;
    RETURN NULL;
END $$;

CREATE FUNCTION events_counted_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE counters c SET s0 = c.s0 + d.s0, s2 = c.s2 + d.s2, s3 = c.s3 + d.s3,
        s4 = c.s4 + d.s4, s5 = c.s5 + d.s5, leased = c.leased + d.leased,
        delivered = c.delivered + d.delivered, dead_total = c.dead_total + d.dead_total
    FROM (SELECT
            count(*) FILTER (WHERE w.state = 0) - count(*) FILTER (WHERE o.state = 0) AS s0,
            count(*) FILTER (WHERE w.state = 2) - count(*) FILTER (WHERE o.state = 2) AS s2,
            count(*) FILTER (WHERE w.state = 3) - count(*) FILTER (WHERE o.state = 3) AS s3,
            count(*) FILTER (WHERE w.state = 4) - count(*) FILTER (WHERE o.state = 4) AS s4,
            count(*) FILTER (WHERE w.state = 5) - count(*) FILTER (WHERE o.state = 5) AS s5,
            count(*) FILTER (WHERE w.lease_token IS NOT NULL)
              - count(*) FILTER (WHERE o.lease_token IS NOT NULL) AS leased,
            count(*) FILTER (WHERE w.state = 2 AND o.state <> 2) AS delivered,
            count(*) FILTER (WHERE w.state = 3 AND o.state <> 3) AS dead_total
          FROM old_rows o JOIN new_rows w ON w.id = o.id) d
    WHERE c.shard = txid_current() % 16
      AND (d.s0, d.s2, d.s3, d.s4, d.s5, d.leased) <> (0, 0, 0, 0, 0, 0);
    RETURN NULL;
END $$;

CREATE TRIGGER events_count_insert AFTER INSERT ON events
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION events_counted_insert();
CREATE TRIGGER events_count_delete AFTER DELETE ON events
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION events_counted_delete();
CREATE TRIGGER events_count_update AFTER UPDATE ON events
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION events_counted_update();

-- Pending audience attributes per user, so that the number of users with
-- pending updates is kept exactly without counting the table. Row-level:
-- the per-user row's lock orders concurrent changes of one user.
CREATE TABLE audience_users (
    user_id TEXT PRIMARY KEY,
    n       INTEGER NOT NULL
);

CREATE FUNCTION audience_pending_added() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    now_pending INTEGER;
BEGIN
    INSERT INTO audience_users (user_id, n) VALUES (NEW.user_id, 1)
    ON CONFLICT (user_id) DO UPDATE SET n = audience_users.n + 1
    RETURNING n INTO now_pending;
    IF now_pending = 1 THEN
        UPDATE counters SET sync_contacts = sync_contacts + 1 WHERE shard = txid_current() % 16;
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION audience_pending_removed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    left_pending INTEGER;
BEGIN
    UPDATE audience_users SET n = n - 1 WHERE user_id = OLD.user_id RETURNING n INTO left_pending;
    IF left_pending = 0 THEN
        DELETE FROM audience_users WHERE user_id = OLD.user_id;
        UPDATE counters SET sync_contacts = sync_contacts - 1 WHERE shard = txid_current() % 16;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER audience_pending_count_insert AFTER INSERT ON audience_pending
    FOR EACH ROW EXECUTE FUNCTION audience_pending_added();
CREATE TRIGGER audience_pending_count_delete AFTER DELETE ON audience_pending
    FOR EACH ROW EXECUTE FUNCTION audience_pending_removed();
