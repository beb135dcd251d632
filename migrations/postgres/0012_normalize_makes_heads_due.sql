-- Normalising a key makes its head due "now" at the earliest, whether the
-- head was promoted or was already the head.
--
-- 0010 gave that rule to promotions only. A head that stayed the head while
-- its lease went away (a lease that expired or was given back, a claim
-- released at shutdown) kept the due time it had when it was claimed, which
-- the claim floors had passed by then, so it waited for the next full read
-- of the due index; the forwarder made such heads due now with a statement
-- of its own before normalising. The rule belongs to normalisation, which
-- runs after every change to a key: an unleased head that is due in the
-- past becomes due at `p_now`. A head due later (a retry) keeps its time,
-- a held head (state 4) is not touched, and a key with a lease is left
-- alone as before. With a NULL `p_now` (the previous version's
-- one-argument call, 0011) nothing changes but promotions, as then.
CREATE OR REPLACE FUNCTION normalize_keys(p_keys text[], p_now bigint) RETURNS void
LANGUAGE plpgsql
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
              (SELECT e.id FROM events e WHERE e.id = h.head
               AND (e.state = 5 OR (e.state = 0 AND e.next_attempt_at < p_now)) OFFSET 0) q)
    UPDATE events e SET state = t.st,
        next_attempt_at = CASE WHEN t.st = 0 THEN greatest(e.next_attempt_at, p_now)
                               ELSE e.next_attempt_at END
        FROM t WHERE e.id = t.id;
END $$;
