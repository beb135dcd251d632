-- The PostgreSQL outbox, shared by any number of forwarder instances.
--
-- events.state: 0 head of its ordering key (due at next_attempt_at)
--               2 delivered
--               3 dead (reason says why; replayable)
--               4 held (head waiting for identity resolution)
--               5 queued (behind an earlier event with the same ordering key)
-- In flight is not a state: a claimed event keeps its state and carries a
-- lease (owner instance, token, expiry). Per ordering key at most one event
-- is in state 0 or 4, and it is the key's lowest active id.
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
-- Whether a key has an event in flight.
CREATE INDEX events_key_leased ON events (order_key) WHERE lease_token IS NOT NULL;
-- Lease recovery: by owner (dead instances) and by expiry.
CREATE INDEX events_lease_owner ON events (lease_owner) WHERE lease_token IS NOT NULL;
CREATE INDEX events_lease_until ON events (lease_until) WHERE lease_token IS NOT NULL;
CREATE INDEX events_heads ON events (id) WHERE state = 0;
CREATE INDEX events_dead ON events (id) WHERE state = 3;
CREATE INDEX events_held ON events (id) WHERE state = 4;
CREATE INDEX events_finished ON events (finished_at) WHERE state = 2;

CREATE SEQUENCE lease_tokens;

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
    last_error_at    BIGINT
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

-- Sharded counters: a transaction adds its deltas to one shard (chosen by
-- its transaction id), status sums the shards. No row that every writer
-- fights over.
CREATE TABLE counters (
    shard SMALLINT NOT NULL,
    name  TEXT     NOT NULL,
    n     BIGINT   NOT NULL,
    PRIMARY KEY (shard, name)
);

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

-- Counter names: s<state> events per state, leased (in flight), delivered
-- and dead (totals, kept by pruning and purging); ingest adds accepted,
-- duplicates, filtered, and settle adds retries.
CREATE FUNCTION counters_add(deltas JSONB) RETURNS void LANGUAGE sql AS $$
    INSERT INTO counters (shard, name, n)
    SELECT (txid_current() % 16)::smallint, d.key, d.value::bigint
    FROM jsonb_each_text(deltas) d WHERE d.value::bigint <> 0
    ON CONFLICT (shard, name) DO UPDATE SET n = counters.n + excluded.n
$$;

-- Statement-level triggers with transition tables: one counter update per
-- statement, whatever the number of rows, and no code path can forget it.
CREATE FUNCTION events_counted_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO counters (shard, name, n)
    SELECT (txid_current() % 16)::smallint, c.name, c.n FROM (
        SELECT 's' || state AS name, count(*) AS n FROM new_rows GROUP BY state
        UNION ALL
        SELECT 'leased', count(*) FROM new_rows WHERE lease_token IS NOT NULL
    ) c WHERE c.n <> 0
    ON CONFLICT (shard, name) DO UPDATE SET n = counters.n + excluded.n;
    RETURN NULL;
END $$;

CREATE FUNCTION events_counted_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO counters (shard, name, n)
    SELECT (txid_current() % 16)::smallint, c.name, -c.n FROM (
        SELECT 's' || state AS name, count(*) AS n FROM old_rows GROUP BY state
        UNION ALL
        SELECT 'leased', count(*) FROM old_rows WHERE lease_token IS NOT NULL
    ) c WHERE c.n <> 0
    ON CONFLICT (shard, name) DO UPDATE SET n = counters.n + excluded.n;
    RETURN NULL;
END $$;

CREATE FUNCTION events_counted_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO counters (shard, name, n)
    SELECT (txid_current() % 16)::smallint, c.name, sum(c.n) FROM (
        SELECT 's' || o.state AS name, -1 AS n FROM old_rows o JOIN new_rows w ON w.id = o.id
            WHERE o.state <> w.state
        UNION ALL
        SELECT 's' || w.state, 1 FROM old_rows o JOIN new_rows w ON w.id = o.id
            WHERE o.state <> w.state
        UNION ALL
        SELECT 'delivered', 1 FROM old_rows o JOIN new_rows w ON w.id = o.id
            WHERE o.state <> 2 AND w.state = 2
        UNION ALL
        SELECT 'dead_total', 1 FROM old_rows o JOIN new_rows w ON w.id = o.id
            WHERE o.state <> 3 AND w.state = 3
        UNION ALL
        SELECT 'leased', CASE WHEN w.lease_token IS NULL THEN -1 ELSE 1 END
            FROM old_rows o JOIN new_rows w ON w.id = o.id
            WHERE (o.lease_token IS NULL) <> (w.lease_token IS NULL)
    ) c GROUP BY c.name HAVING sum(c.n) <> 0
    ON CONFLICT (shard, name) DO UPDATE SET n = counters.n + excluded.n;
    RETURN NULL;
END $$;

CREATE TRIGGER events_count_insert AFTER INSERT ON events
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION events_counted_insert();
CREATE TRIGGER events_count_delete AFTER DELETE ON events
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION events_counted_delete();
CREATE TRIGGER events_count_update AFTER UPDATE ON events
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION events_counted_update();
