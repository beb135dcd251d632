-- A claim locks up to 448 keys, not 256.
--
-- A claim and its settle each cost a statement, a commit and per-call
-- work (the function's plans, the key-space lock, the settle's fence and
-- normalisation) whatever their size. When every due event is a user of
-- its own, the 256-key cap made a claim 256 events, so a drain of 100,000
-- such events took about 390 claims and as many settles. At 448 it takes
-- about 224, and a real drain to the mock ChurnZero went from 36,966 /
-- 37,079 to 43,845 / 43,744 events/s (PostgreSQL's CPU per event 30.7 /
-- 31.1 µs to 28.5 / 28.1 µs).
--
-- 448 stays under the 512 keys past which a transaction (this claim's
-- settle, which locks the claim's keys) takes the whole key space instead
-- of a lock per key. The locks live in the server's shared lock table:
-- docs/operator.md gives the budget.
--
-- The body is 0020's with the cap changed, nothing else.

CREATE OR REPLACE FUNCTION claim_due(p_owner bigint, p_max integer, p_until bigint, p_now bigint,
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
    max_keys integer := least(p_max, 448);
    -- A few more than the keys it may lock: room for keys whose lock
    -- another session holds for a moment, without a second read. Never
    -- more than the `2 × max_keys` a claim reads in all.
    first_page integer := least(2 * least(p_max, 448), least(p_max, 448) + 16);
    n_read integer;
BEGIN
    IF NOT pg_try_advisory_xact_lock_shared(1667659521, 0) THEN
        RETURN;
    END IF;
    -- The first page of candidates, read once, numbered in due order,
    -- before any lock is tried; their keys are then tried in that order.
    WITH c AS MATERIALIZED (
            SELECT row_number() OVER (ORDER BY d.next_attempt_at, d.id) AS pos, d.*
            FROM (SELECT e.id, e.order_key, e.next_attempt_at FROM events e
                  WHERE e.state = 0 AND e.next_attempt_at >= p_floor
                  AND e.next_attempt_at <= p_now
                  AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.event_id = e.id)
                  ORDER BY e.next_attempt_at, e.id LIMIT first_page) d),
        k AS MATERIALIZED (
            SELECT c.pos, c.order_key FROM c JOIN events h ON h.id = c.id
            WHERE pg_try_advisory_xact_lock(1667659522, hashtext(c.order_key))
            LIMIT max_keys
            FOR UPDATE OF h SKIP LOCKED)
    SELECT ARRAY(SELECT k.order_key FROM k ORDER BY k.pos),
        ARRAY(SELECT c.id FROM c ORDER BY c.pos),
        ARRAY(SELECT c.next_attempt_at FROM c ORDER BY c.pos)
        INTO locked, candidates, dues;
    -- Too many of the first page's keys were taken, and there may be more
    -- candidates: the second page, from after the last one read, its keys
    -- tried in due order for what the claim still lacks.
    n_read := cardinality(candidates);
    IF cardinality(locked) < max_keys AND n_read = first_page
       AND first_page < 2 * max_keys THEN
        WITH c AS MATERIALIZED (
                SELECT n_read + row_number() OVER (ORDER BY d.next_attempt_at, d.id) AS pos, d.*
                FROM (SELECT e.id, e.order_key, e.next_attempt_at FROM events e
                      WHERE e.state = 0 AND e.next_attempt_at >= p_floor
                      AND e.next_attempt_at <= p_now
                      AND (e.next_attempt_at, e.id) > (dues[n_read], candidates[n_read])
                      AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.event_id = e.id)
                      ORDER BY e.next_attempt_at, e.id LIMIT 2 * max_keys - first_page) d),
            k AS MATERIALIZED (
                SELECT c.pos, c.order_key FROM c JOIN events h ON h.id = c.id
                WHERE pg_try_advisory_xact_lock(1667659522, hashtext(c.order_key))
                LIMIT max_keys - cardinality(locked)
                FOR UPDATE OF h SKIP LOCKED)
        SELECT locked || ARRAY(SELECT k.order_key FROM k ORDER BY k.pos),
            candidates || ARRAY(SELECT c.id FROM c ORDER BY c.pos),
            dues || ARRAY(SELECT c.next_attempt_at FROM c ORDER BY c.pos)
            INTO locked, candidates, dues;
    END IF;
    IF cardinality(locked) = 0 THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH heads AS (SELECT h.*,
                row_number() OVER (ORDER BY h.next_attempt_at, h.id) AS pos
            FROM unnest(locked) AS lk(key) CROSS JOIN LATERAL
                (SELECT e.id, e.order_key, e.next_attempt_at, e.kind, e.payload, e.attempts,
                        e.accepted_at, e.first_attempt_at, e.actions FROM events e
                 WHERE e.order_key = lk.key AND e.state = 0 AND e.next_attempt_at <= p_now
                 ORDER BY e.id LIMIT 1) h
            WHERE NOT EXISTS (SELECT 1 FROM leases l WHERE l.order_key = h.order_key)
            ORDER BY h.next_attempt_at, h.id LIMIT p_max),
        picked AS (SELECT h.id, h.order_key, h.kind, h.payload, h.attempts, h.accepted_at,
                h.first_attempt_at, h.actions, h.pos, 0::int8 AS sub FROM heads h
            UNION ALL
            SELECT f.id, h.order_key, f.kind, f.payload, f.attempts, f.accepted_at,
                f.first_attempt_at, f.actions, h.pos, f.id FROM heads h CROSS JOIN LATERAL
                (SELECT e.id, e.kind, e.payload, e.attempts, e.accepted_at, e.first_attempt_at,
                        e.actions FROM events e WHERE e.order_key = h.order_key AND e.state = 5
                 AND e.id > h.id ORDER BY e.id LIMIT (SELECT p_max - count(*) FROM heads)) f),
        chosen AS (SELECT p.* FROM picked p ORDER BY p.pos, p.sub LIMIT p_max),
        l AS (INSERT INTO leases (event_id, order_key, owner, token, until)
            SELECT c.id, c.order_key, p_owner, p_until, p_until FROM chosen c RETURNING event_id),
        -- The first candidate this claim does not lease: its key was
        -- skipped or not tried, or the claim filled up before its head. A
        -- hashed subplan: one pass over the candidates.
        s AS (SELECT (SELECT t.due FROM unnest(candidates, dues) WITH ORDINALITY AS t(id, due, pos)
                      WHERE t.id NOT IN (SELECT ch.id FROM chosen ch)
                      ORDER BY t.pos LIMIT 1) AS seen)
    SELECT c.id, c.order_key, c.kind, c.payload, c.attempts, c.accepted_at,
        c.first_attempt_at, c.actions, s.seen FROM chosen c CROSS JOIN s;
END $$;
