-- Normalisation first finds, in one statement, which of its keys still
-- have an active event, and normalises only those.
--
-- `normalize_keys` (0012) ran, for every key it was given, a lateral
-- subquery that looked for the key's first active event, a probe of the
-- key index each, inside the executor's machinery for a subplan per key.
-- Every settle normalises all of its keys, and a key whose events were all
-- delivered (every key, when each event has a user of its own, the common
-- shape of traffic) has nothing to normalise: in a serial loop of claims
-- of 256 distinct users and their delivered settles, normalisation was
-- 8.4% of PostgreSQL's instructions (callgrind), about 20,000 a key. The
-- keys that still have an active event are now read by one index scan of
-- `events_key` for all of them (`order_key = ANY`), and the rest of the
-- function runs for those keys only, as before. Same results: a key with
-- no active event had no head, and nothing was written for it.

CREATE OR REPLACE FUNCTION normalize_keys(p_keys text[], p_now bigint) RETURNS void
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off
SET enable_mergejoin = off SET enable_material = off SET jit = off AS $$
DECLARE
    active text[];
BEGIN
    active := ARRAY(SELECT DISTINCT e.order_key FROM events e
                    WHERE e.order_key = ANY (p_keys) AND e.state IN (0, 4, 5));
    IF cardinality(active) = 0 THEN
        RETURN;
    END IF;
    WITH k AS (SELECT unnest(active) AS key),
    h AS (SELECT k.key, f.head FROM k CROSS JOIN LATERAL
              (SELECT (SELECT e.id FROM events e WHERE e.order_key = k.key
                       AND e.state IN (0, 4, 5) ORDER BY e.id LIMIT 1) AS head OFFSET 0) f
          WHERE CASE WHEN f.head IS NULL THEN false
                     ELSE (SELECT true FROM leases l WHERE l.order_key = k.key LIMIT 1) IS NULL END),
    t AS (SELECT s.id, 5::int2 AS st FROM h CROSS JOIN LATERAL
              (SELECT e.id FROM events e WHERE e.order_key = h.key
               AND e.state IN (0, 4) AND e.id > h.head OFFSET 0) s
          UNION ALL SELECT q.id, 0::int2 FROM h CROSS JOIN LATERAL
              (SELECT e.id FROM events e WHERE e.id = h.head
               AND (e.state = 5 OR (e.state = 0 AND e.next_attempt_at < p_now)) OFFSET 0) q)
    UPDATE events e SET state = t.st,
        next_attempt_at = CASE WHEN t.st = 0 THEN greatest(e.next_attempt_at, p_now)
                               ELSE e.next_attempt_at END
        FROM t WHERE e.id = t.id;
END $$;
