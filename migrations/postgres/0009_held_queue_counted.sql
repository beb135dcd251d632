-- The events queued behind held heads are counted as they change, as on
-- SQLite, so that /status reads a counter instead of every held key.
--
-- Status counted them per held key, through the key index: one probe of
-- every held user's queue on every read. A fresh install whose tracks
-- arrive before their users' identifies holds every user: at 118,800 held
-- users a status read took 1.0 to 1.3 s (and a whole sequential scan of
-- `events` to find the held keys), against a goal of 10 ms at 1M rows.
--
-- `held_keys` has a row for each key whose head is held, with the number
-- of events queued behind it; `counters.held_queued` (sharded like the
-- other counters) moves by the same amounts. Statement triggers find the
-- keys a statement may have changed: those with an event entering or
-- leaving state 4, and, among those already held, those with an event
-- entering or leaving state 5. Each such key is counted again from the
-- table after the statement (two probes of the key's indexes), and the
-- difference with its row goes to the counter. Every change to a key's
-- events happens under the key's lock (ingest, settle, recovery, replay,
-- maintenance's expiry and release of held heads), so two statements never
-- count one key at once.
--
-- Each lookup is a probe (a scalar subquery, or `= ANY` on an array
-- built first), so no plan made while the table was empty can turn one
-- into a read of every held key.

-- No other instance changes events while the count starts.
LOCK TABLE events IN SHARE ROW EXCLUSIVE MODE;

CREATE TABLE held_keys (
    order_key TEXT PRIMARY KEY,
    queued    BIGINT NOT NULL
);
ALTER TABLE counters ADD COLUMN held_queued BIGINT NOT NULL DEFAULT 0;

CREATE FUNCTION held_keys_recount(p_keys text[]) RETURNS void LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off
SET enable_mergejoin = off SET enable_material = off SET jit = off AS $$
DECLARE
    delta bigint;
BEGIN
    WITH k AS (SELECT DISTINCT unnest(p_keys) AS key),
    n AS (SELECT k.key,
              CASE WHEN (SELECT true FROM events e WHERE e.order_key = k.key
                         AND e.state IN (0, 4) AND e.state = 4 LIMIT 1)
                   THEN (SELECT count(*) FROM events e WHERE e.order_key = k.key
                         AND e.state IN (0, 4, 5) AND e.state = 5) END AS q,
              (SELECT h.queued FROM held_keys h WHERE h.order_key = k.key) AS old
          FROM k),
    gone AS (DELETE FROM held_keys h
             WHERE h.order_key = ANY (ARRAY(SELECT n.key FROM n
                                            WHERE n.q IS NULL AND n.old IS NOT NULL))),
    kept AS (INSERT INTO held_keys (order_key, queued)
             SELECT n.key, n.q FROM n WHERE n.q IS NOT NULL AND n.q IS DISTINCT FROM n.old
             ON CONFLICT (order_key) DO UPDATE SET queued = excluded.queued)
    SELECT COALESCE(sum(COALESCE(n.q, 0) - COALESCE(n.old, 0)), 0) INTO delta FROM n;
    IF delta <> 0 THEN
        UPDATE counters SET held_queued = held_queued + delta WHERE shard = txid_current() % 16;
    END IF;
END $$;

-- Rows inserted or deleted: the triggers name either transition table
-- `changed_rows`.
CREATE FUNCTION events_held_changed() RETURNS trigger LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off AS $$
DECLARE
    keys text[];
BEGIN
    keys := ARRAY(SELECT c.order_key FROM changed_rows c
                  WHERE c.state = 4 OR (c.state = 5 AND (SELECT true FROM held_keys h
                                        WHERE h.order_key = c.order_key)));
    IF cardinality(keys) > 0 THEN
        PERFORM held_keys_recount(keys);
    END IF;
    RETURN NULL;
END $$;

-- Old and new rows are paired by a hash join, as the counters trigger
-- pairs them (a nested loop over a settle's 256 rows costs milliseconds).
CREATE FUNCTION events_held_updated() RETURNS trigger LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = on SET jit = off AS $$
DECLARE
    keys text[];
BEGIN
    keys := ARRAY(SELECT w.order_key FROM old_rows o JOIN new_rows w ON w.id = o.id
                  WHERE o.state <> w.state
                    AND (o.state = 4 OR w.state = 4
                         OR ((o.state = 5 OR w.state = 5) AND (SELECT true FROM held_keys h
                                                               WHERE h.order_key = w.order_key))));
    IF cardinality(keys) > 0 THEN
        PERFORM held_keys_recount(keys);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER events_held_insert AFTER INSERT ON events
    REFERENCING NEW TABLE AS changed_rows FOR EACH STATEMENT EXECUTE FUNCTION events_held_changed();
CREATE TRIGGER events_held_delete AFTER DELETE ON events
    REFERENCING OLD TABLE AS changed_rows FOR EACH STATEMENT EXECUTE FUNCTION events_held_changed();
CREATE TRIGGER events_held_update AFTER UPDATE ON events
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION events_held_updated();

-- What is held already.
INSERT INTO held_keys (order_key, queued)
SELECT h.order_key, (SELECT count(*) FROM events e WHERE e.order_key = h.order_key
                     AND e.state IN (0, 4, 5) AND e.state = 5)
FROM (SELECT DISTINCT order_key FROM events WHERE state = 4) h;
UPDATE counters SET held_queued = (SELECT COALESCE(sum(queued), 0) FROM held_keys) WHERE shard = 0;
