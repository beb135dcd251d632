-- A claim starts its walk of the due index at a floor instead of at its
-- beginning.
--
-- Every delivered event leaves a dead entry at the front of `events_due`
-- (its key, `next_attempt_at`, was due, so it sorts before everything due
-- later), and only a vacuum takes the entry out. A claim walks the index
-- from its first entry, so it stepped over every event delivered since the
-- last vacuum: 188,000 dead entries (931 index pages, all of them already
-- marked dead) cost 5.5 to 6 ms of a claim of 256 distinct users, about
-- half of the claim, where a freshly vacuumed index cost 0.06 ms. With
-- autovacuum at its defaults a table of 5M rows is vacuumed every 1M dead
-- rows, so the cost grows with the table and the drain of a backlog slowed
-- down as it went.
--
-- `claim_due` takes `p_floor` and reads only entries due at or after it.
-- The forwarder passes the earliest due time the previous claim saw, less
-- a margin, and starts from the beginning again at least once a second
-- (`PgConfig::claim_full_scan_every`). What lies before the floor is then
-- dead, or leased (in flight). An event becomes claimable through a write
-- that gives it a due time of now or later:
--   * a failed attempt: `next_attempt_at` is the retry's time;
--   * a released hold, a replay: they set `next_attempt_at` to now;
--   * the promotion of a queued event to head (`normalize_keys`): from this
--     version on it sets `next_attempt_at` to at least now.
-- What the floor can pass over is claimed by the next full read, at most a
-- second later: a lease that expired or was given back (its event keeps
-- its due time; such leases come back after seconds anyway), an ingest that
-- committed later than the margin after its clock read, a clock of another
-- instance behind by more than the margin, an older forwarder's promotion.
-- The floor never makes an event wait longer than that, and it never
-- changes which events are claimed together or in which order a key's
-- events go.
--
-- `claim_events` and the one-argument `normalize_keys` stay for forwarders
-- of the previous version that share the database during an upgrade.

-- The claim of 0005, reading the due index from `p_floor`, and returning
-- with every row the earliest due time among the candidates it read but
-- did not take (`scan_floor`; NULL when it took every one it read and read
-- fewer than it could): where the next claim may start. What comes before
-- that candidate was delivered, or is leased now.
CREATE FUNCTION claim_due(p_owner bigint, p_max integer, p_until bigint, p_now bigint,
                          p_floor bigint)
RETURNS TABLE (id bigint, order_key text, kind text, payload text, attempts integer,
               accepted_at bigint, first_attempt_at bigint, actions text, scan_floor bigint)
LANGUAGE plpgsql
SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
SET enable_material = off AS $$
#variable_conflict use_column
DECLARE
    locked text[];
    candidates bigint[];
    dues bigint[];
    max_keys integer := least(p_max, 256);
BEGIN
    IF NOT pg_try_advisory_xact_lock_shared(1667659521, 0) THEN
        RETURN;
    END IF;
    -- The candidates are read once, numbered in due order, before any lock
    -- is tried; their keys are then tried in that order.
    WITH c AS MATERIALIZED (
            SELECT row_number() OVER (ORDER BY d.next_attempt_at, d.id) AS pos, d.*
            FROM (SELECT e.id, e.order_key, e.next_attempt_at FROM events e
                  WHERE e.state = 0 AND e.next_attempt_at >= p_floor
                  AND e.next_attempt_at <= p_now
                  AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.event_id = e.id)
                  ORDER BY e.next_attempt_at, e.id LIMIT 2 * max_keys) d),
        k AS MATERIALIZED (
            SELECT c.pos, c.order_key FROM c JOIN events h ON h.id = c.id
            WHERE pg_try_advisory_xact_lock(1667659522, hashtext(c.order_key))
            LIMIT max_keys
            FOR UPDATE OF h SKIP LOCKED)
    SELECT ARRAY(SELECT k.order_key FROM k ORDER BY k.pos),
        ARRAY(SELECT c.id FROM c ORDER BY c.pos),
        ARRAY(SELECT c.next_attempt_at FROM c ORDER BY c.pos)
        INTO locked, candidates, dues;
    IF cardinality(locked) = 0 THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH heads AS (SELECT h.id, h.order_key,
                row_number() OVER (ORDER BY h.next_attempt_at, h.id) AS pos
            FROM unnest(locked) AS lk(key) CROSS JOIN LATERAL
                (SELECT e.id, e.order_key, e.next_attempt_at FROM events e
                 WHERE e.order_key = lk.key AND e.state = 0 AND e.next_attempt_at <= p_now
                 ORDER BY e.id LIMIT 1) h
            WHERE NOT EXISTS (SELECT 1 FROM leases l WHERE l.order_key = h.order_key)
            ORDER BY h.next_attempt_at, h.id LIMIT p_max),
        picked AS (SELECT h.id, h.order_key, h.pos, 0::int8 AS sub FROM heads h
            UNION ALL
            SELECT f.id, h.order_key, h.pos, f.id FROM heads h CROSS JOIN LATERAL
                (SELECT e.id FROM events e WHERE e.order_key = h.order_key AND e.state = 5
                 AND e.id > h.id ORDER BY e.id LIMIT (SELECT p_max - count(*) FROM heads)) f),
        chosen AS (SELECT p.id, p.order_key FROM picked p ORDER BY p.pos, p.sub LIMIT p_max),
        l AS (INSERT INTO leases (event_id, order_key, owner, token, until)
            SELECT c.id, c.order_key, p_owner, p_until, p_until FROM chosen c RETURNING event_id),
        -- The first candidate this claim does not lease: its key was
        -- skipped or not tried, or the claim filled up before its head. A
        -- hashed subplan: one pass over the candidates.
        s AS (SELECT (SELECT t.due FROM unnest(candidates, dues) WITH ORDINALITY AS t(id, due, pos)
                      WHERE t.id NOT IN (SELECT ch.id FROM chosen ch)
                      ORDER BY t.pos LIMIT 1) AS seen)
    SELECT e.id, e.order_key, e.kind, e.payload, e.attempts, e.accepted_at,
        e.first_attempt_at, e.actions, s.seen FROM events e JOIN l ON l.event_id = e.id
        CROSS JOIN s;
END $$;

-- `normalize_keys` of 0008; a queued event promoted to head is due at
-- `p_now` at the earliest, so that it sorts after any floor a claim keeps.
CREATE FUNCTION normalize_keys(p_keys text[], p_now bigint) RETURNS void LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off
SET enable_mergejoin = off SET enable_material = off SET jit = off AS $$
BEGIN
    WITH k AS (SELECT DISTINCT unnest(p_keys) AS key),
    h AS (SELECT k.key, f.head FROM k CROSS JOIN LATERAL
              (SELECT (SELECT e.id FROM events e WHERE e.order_key = k.key
                       AND e.state IN (0, 4, 5) ORDER BY e.id LIMIT 1) AS head OFFSET 0) f
          WHERE CASE WHEN f.head IS NULL THEN false
                     ELSE (SELECT true FROM leases l WHERE l.order_key = k.key LIMIT 1) IS NULL END),
    t AS (SELECT s.id, 5::int2 AS st FROM h CROSS JOIN LATERAL
              (SELECT e.id FROM events e WHERE e.order_key = h.key
               AND e.state IN (0, 4) AND e.id > h.head OFFSET 0) s
          UNION ALL SELECT q.id, 0::int2 FROM h CROSS JOIN LATERAL
              (SELECT e.id FROM events e WHERE e.id = h.head AND e.state = 5 OFFSET 0) q)
    UPDATE events e SET state = t.st,
        next_attempt_at = CASE WHEN t.st = 0 THEN greatest(e.next_attempt_at, p_now)
                               ELSE e.next_attempt_at END
        FROM t WHERE e.id = t.id;
END $$;

-- `settle_delivered` of 0008, promoting through the new `normalize_keys`.
CREATE OR REPLACE FUNCTION settle_delivered(p_owner bigint, p_ids bigint[], p_tokens bigint[],
                                            p_firsts bigint[], p_keys text[], p_now bigint)
RETURNS integer LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off
SET enable_mergejoin = off SET enable_material = off SET jit = off AS $$
DECLARE
    held bigint[];
    n integer;
BEGIN
    PERFORM lock_order_keys(p_keys);
    held := fence_leases(p_owner, p_ids, p_tokens);
    n := cardinality(held);
    IF n = cardinality(p_ids) THEN
        UPDATE events e SET state = 2, finished_at = p_now, attempts = e.attempts + 1,
            first_attempt_at = t.first
            FROM unnest(p_ids, p_firsts) AS t(id, first)
            WHERE e.id = t.id;
    ELSIF n > 0 THEN
        UPDATE events e SET state = 2, finished_at = p_now, attempts = e.attempts + 1,
            first_attempt_at = t.first
            FROM unnest(p_ids, p_firsts) AS t(id, first)
            WHERE e.id = t.id AND t.id = ANY(held);
    END IF;
    IF n > 0 THEN
        UPDATE instances SET last_delivery_at = p_now WHERE id = p_owner;
        INSERT INTO minute_stats (minute, shard, accepted, delivered, failed)
            VALUES (p_now / 60000, (txid_current() % 16)::smallint, 0, n, 0)
            ON CONFLICT (minute, shard) DO UPDATE SET
                delivered = minute_stats.delivered + excluded.delivered;
    END IF;
    PERFORM normalize_keys(p_keys, p_now);
    RETURN n;
END $$;
