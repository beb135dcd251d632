-- The settle's two helpers keep their plans for the session.
--
-- `fence_leases` and `normalize_keys` were SQL-language functions. Called
-- from PL/pgSQL (`settle_delivered`) or as a statement of their own, such a
-- function is parsed, analysed and planned again on every call: about a
-- twentieth of the server's CPU while a backlog drains, for two statements
-- whose shape never changes. As PL/pgSQL functions their statements are
-- prepared once per session like every other hot path's.
--
-- A kept plan is a generic one, chosen once, maybe while the tables were
-- empty, so neither statement may depend on an estimate: both run with
-- nested loops over index probes only, as the claim does, and the test of
-- a key's lease is a scalar subquery with LIMIT 1, which the planner cannot
-- turn into a hash of every lease. Same statements, same results.

CREATE OR REPLACE FUNCTION fence_leases(p_owner bigint, p_ids bigint[], p_tokens bigint[])
RETURNS bigint[] LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off
SET enable_mergejoin = off SET enable_material = off AS $$
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
SET enable_mergejoin = off SET enable_material = off AS $$
BEGIN
    WITH k AS (SELECT DISTINCT unnest(p_keys) AS key),
    h AS (SELECT k.key, (SELECT e.id FROM events e WHERE e.order_key = k.key
              AND e.state IN (0, 4, 5) ORDER BY e.id LIMIT 1) AS head
          FROM k WHERE (SELECT true FROM leases l WHERE l.order_key = k.key LIMIT 1) IS NULL),
    t AS (SELECT e.id, 5::int2 AS st FROM h JOIN events e ON e.order_key = h.key
              AND e.state IN (0, 4) AND e.id > h.head
          UNION ALL SELECT e.id, 0::int2 FROM h JOIN events e ON e.id = h.head AND e.state = 5)
    UPDATE events e SET state = t.st FROM t WHERE e.id = t.id;
END $$;
