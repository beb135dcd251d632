-- Leases move out of the events table into a small table of their own.
--
-- A lease held in events' columns rewrote the event's whole row twice per
-- delivery (claim, then the settle giving the lease back), each time a new
-- row version with its payload and an entry in every index whose predicate
-- names the lease. A row in `leases` is a small insert at claim and a delete
-- at settle; the event's row is written once, with its outcome.
--
-- Upgrading: stop every instance of the older version first. Leases the
-- older version held are given back here, as a restart would; its columns
-- are dropped, so an older instance still running fails loudly instead of
-- claiming beside the new ones.

CREATE TABLE leases (
    event_id  BIGINT PRIMARY KEY,
    order_key TEXT   NOT NULL,
    -- The instance that holds the lease (`instances.id`).
    owner     BIGINT NOT NULL,
    -- What the claim handed to its worker; a settle counts only where owner
    -- and token still match.
    token     BIGINT NOT NULL,
    until     BIGINT NOT NULL
);
-- Whether a key has an event in flight (claims, normalisation).
CREATE INDEX leases_key ON leases (order_key);
-- Lease recovery of dead instances, and the pruning of old instances.
CREATE INDEX leases_owner ON leases (owner);

-- A lease is counted in `counters.leased` by statement-level triggers, as
-- events' states are, so status reads 16 rows whatever is in flight.
CREATE FUNCTION leases_counted_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE counters c SET leased = c.leased + d.n
    FROM (SELECT count(*) AS n FROM new_rows) d
    WHERE c.shard = txid_current() % 16 AND d.n > 0;
    RETURN NULL;
END $$;

CREATE FUNCTION leases_counted_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE counters c SET leased = c.leased - d.n
    FROM (SELECT count(*) AS n FROM old_rows) d
    WHERE c.shard = txid_current() % 16 AND d.n > 0;
    RETURN NULL;
END $$;

CREATE TRIGGER leases_count_insert AFTER INSERT ON leases
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION leases_counted_insert();
CREATE TRIGGER leases_count_delete AFTER DELETE ON leases
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION leases_counted_delete();

-- The events' triggers no longer count leases.
CREATE OR REPLACE FUNCTION events_counted_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE counters c SET s0 = c.s0 + d.s0, s2 = c.s2 + d.s2, s3 = c.s3 + d.s3,
        s4 = c.s4 + d.s4, s5 = c.s5 + d.s5
    FROM (SELECT count(*) FILTER (WHERE state = 0) AS s0, count(*) FILTER (WHERE state = 2) AS s2,
                 count(*) FILTER (WHERE state = 3) AS s3, count(*) FILTER (WHERE state = 4) AS s4,
                 count(*) FILTER (WHERE state = 5) AS s5
          FROM new_rows) d
    WHERE c.shard = txid_current() % 16;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION events_counted_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE counters c SET s0 = c.s0 - d.s0, s2 = c.s2 - d.s2, s3 = c.s3 - d.s3,
        s4 = c.s4 - d.s4, s5 = c.s5 - d.s5
    FROM (SELECT count(*) FILTER (WHERE state = 0) AS s0, count(*) FILTER (WHERE state = 2) AS s2,
                 count(*) FILTER (WHERE state = 3) AS s3, count(*) FILTER (WHERE state = 4) AS s4,
                 count(*) FILTER (WHERE state = 5) AS s5
          FROM old_rows) d
    WHERE c.shard = txid_current() % 16 AND d.s0 + d.s2 + d.s3 + d.s4 + d.s5 > 0;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION events_counted_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE counters c SET s0 = c.s0 + d.s0, s2 = c.s2 + d.s2, s3 = c.s3 + d.s3,
        s4 = c.s4 + d.s4, s5 = c.s5 + d.s5,
        delivered = c.delivered + d.delivered, dead_total = c.dead_total + d.dead_total
    FROM (SELECT
            count(*) FILTER (WHERE w.state = 0) - count(*) FILTER (WHERE o.state = 0) AS s0,
            count(*) FILTER (WHERE w.state = 2) - count(*) FILTER (WHERE o.state = 2) AS s2,
            count(*) FILTER (WHERE w.state = 3) - count(*) FILTER (WHERE o.state = 3) AS s3,
            count(*) FILTER (WHERE w.state = 4) - count(*) FILTER (WHERE o.state = 4) AS s4,
            count(*) FILTER (WHERE w.state = 5) - count(*) FILTER (WHERE o.state = 5) AS s5,
            count(*) FILTER (WHERE w.state = 2 AND o.state <> 2) AS delivered,
            count(*) FILTER (WHERE w.state = 3 AND o.state <> 3) AS dead_total
          FROM old_rows o JOIN new_rows w ON w.id = o.id) d
    WHERE c.shard = txid_current() % 16
      AND (d.s0, d.s2, d.s3, d.s4, d.s5) <> (0, 0, 0, 0, 0);
    RETURN NULL;
END $$;

-- Give back what the older version held, then drop its columns and the
-- indexes that named them (dropping a column drops its indexes).
UPDATE counters SET leased = 0;
DROP INDEX events_due;
ALTER TABLE events DROP COLUMN lease_owner, DROP COLUMN lease_token, DROP COLUMN lease_until;
-- Claimable heads, oldest due first. A leased head stays in the index; the
-- claim skips it by its row in `leases`.
CREATE INDEX events_due ON events (next_attempt_at, id) WHERE state = 0;
