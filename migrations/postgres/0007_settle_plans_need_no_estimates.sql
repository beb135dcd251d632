-- The settle's statements keep plans that need no estimate, and no hot
-- path compiles its plan.
--
-- A session keeps the generic plan it settles on after a few calls, often
-- made while the tables were empty (a fresh install, or any time before a
-- table's first analysis). Two of the settle's pieces paid for that:
--   * `settle_delivered` joined its ids to `events` by a hash join over a
--     sequential scan: every settle read the whole table;
--   * `fence_leases` and `normalize_keys` were SQL-language functions,
--     parsed, analysed and planned again on every call (about a twentieth
--     of the server's CPU in a drain); kept as plans, they could hash
--     every lease.
-- They now run, as the claim does, with nested loops over index probes
-- only (no sequential, bitmap, hash or merge plan, nothing materialised),
-- the test of a key's lease is a scalar subquery with LIMIT 1, which
-- cannot become a hash, and each of the keys' events is found by its own
-- probe: the key's stray heads through the key's index, the new head by
-- its id (`OFFSET 0` keeps each probe a subquery of its own, which the
-- planner cannot fold into a join it might run the other way round: as a
-- kept plan, normalize_keys walked every active event's entry in
-- `events_key` to find one head by its id). Same results.
--
-- A trigger runs under the settings of the statement that fired it. The
-- counters trigger pairs an update's old and new rows by id; inside the
-- settle, with hash joins off, it paired the 256 rows of a settle by a
-- nested loop, 65,536 comparisons and about 5 ms. It turns hash joins back
-- on for itself.
--
-- JIT compilation is off for every function that turns plan types off.
-- A plan that cannot avoid a type turned off still runs, at an estimated
-- cost of ten billion, far past `jit_above_cost`: the server then compiles
-- it on every execution, about 90 ms each time (measured on the counters
-- trigger forced off nested loops). A plan of this project's hot paths
-- never gains from compilation either: each is a few index probes.

CREATE OR REPLACE FUNCTION fence_leases(p_owner bigint, p_ids bigint[], p_tokens bigint[])
RETURNS bigint[] LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off
SET enable_mergejoin = off SET enable_material = off SET jit = off AS $$
DECLARE
    held bigint[];
BEGIN
    WITH d AS (DELETE FROM leases l USING unnest(p_ids, p_tokens) AS t(id, tok)
               WHERE l.event_id = t.id AND l.token = t.tok AND l.owner = p_owner
               RETURNING l.event_id)
    SELECT COALESCE(array_agg(event_id), '{}') INTO held FROM d;
    RETURN held;
END $$;

CREATE OR REPLACE FUNCTION normalize_keys(p_keys text[]) RETURNS void LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off
SET enable_mergejoin = off SET enable_material = off SET jit = off AS $$
BEGIN
    WITH k AS (SELECT DISTINCT unnest(p_keys) AS key),
    h AS (SELECT k.key, (SELECT e.id FROM events e WHERE e.order_key = k.key
              AND e.state IN (0, 4, 5) ORDER BY e.id LIMIT 1) AS head
          FROM k WHERE (SELECT true FROM leases l WHERE l.order_key = k.key LIMIT 1) IS NULL),
    t AS (SELECT s.id, 5::int2 AS st FROM h CROSS JOIN LATERAL
              (SELECT e.id FROM events e WHERE e.order_key = h.key
               AND e.state IN (0, 4) AND e.id > h.head OFFSET 0) s
          UNION ALL SELECT q.id, 0::int2 FROM h CROSS JOIN LATERAL
              (SELECT e.id FROM events e WHERE e.id = h.head AND e.state = 5 OFFSET 0) q)
    UPDATE events e SET state = t.st FROM t WHERE e.id = t.id;
END $$;

-- Only their settings change: the bodies stay as 0004 and 0003 wrote them.
ALTER FUNCTION settle_delivered(bigint, bigint[], bigint[], bigint[], text[], bigint)
    SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off
    SET enable_mergejoin = off SET enable_material = off SET jit = off;
ALTER FUNCTION events_counted_update() SET enable_hashjoin = on SET jit = off;
ALTER FUNCTION claim_events(bigint, integer, bigint, bigint) SET jit = off;
