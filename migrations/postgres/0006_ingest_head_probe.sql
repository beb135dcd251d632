-- Ingest's head test probes the key's index once per new event, whatever
-- the plan cache made of it.
--
-- `ingest_store` asked whether a key already has an active event with
-- `EXISTS (SELECT 1 FROM events WHERE order_key = o AND state IN (0, 4, 5))`.
-- The planner may run such a correlated EXISTS as a hashed subplan: read
-- every active event once per statement into a hash table, then look each
-- new event up in it. A session keeps the generic plan it settles on after
-- five calls; made while `events` was empty (a fresh install, or any time
-- before the table's first analysis, and always with autovacuum off until
-- maintenance analyses), the hash looked cheaper than one probe a row, and
-- stayed. Every group of tracks then read the whole backlog: about 15 ms a
-- group at 50,000 pending events, tracks at 64 connections fell from about
-- 20,000 a second to 8,000, and ingest was slowest when a backlog had built
-- up, when it matters most.
--
-- A scalar subquery with LIMIT 1 cannot be hashed: it runs once per new
-- event, as one walk of `events_key` that stops at the first entry. Within
-- it, sequential and bitmap scans are ruled out for the function, as the
-- claim does, so that no estimate of an empty table turns the probe into a
-- read of the table. The other statements here read by primary key or from
-- the arguments, which those settings do not change. JIT compilation is off
-- for the function (migration 0007 says why).

CREATE OR REPLACE FUNCTION ingest_store(p_fresh boolean[], p_sources text[], p_ids text[],
                             p_forward boolean[], p_kinds text[], p_keys text[],
                             p_payloads text[], p_total bigint, p_now bigint)
RETURNS void LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off AS $$
DECLARE
    fresh_n bigint;
    stored bigint;
BEGIN
    -- Ids are assigned in the order of the rows (the group's order). The
    -- first new event of a key is its head unless the key already has an
    -- active event, read in this statement's snapshot, taken under the
    -- locks.
    WITH ins AS (INSERT INTO events
            (source, message_id, kind, order_key, payload, state, accepted_at, next_attempt_at)
            SELECT s, m, k, o, p,
                CASE WHEN row_number() OVER (PARTITION BY o ORDER BY n) > 1 THEN 5
                     WHEN (SELECT true FROM events e WHERE e.order_key = o
                                  AND e.state IN (0, 4, 5) LIMIT 1) THEN 5
                     ELSE 0 END::int2,
                p_now, p_now
            FROM unnest(p_sources, p_ids, p_kinds, p_keys, p_payloads, p_forward, p_fresh)
                 WITH ORDINALITY AS t(s, m, k, o, p, fw, fr, n)
            WHERE fw AND fr
            ORDER BY n
            RETURNING 1)
    SELECT count(*) INTO stored FROM ins;
    SELECT count(*) INTO fresh_n FROM unnest(p_fresh) AS t(fr) WHERE fr;
    IF p_total > 0 THEN
        UPDATE counters SET accepted = accepted + stored,
            duplicates = duplicates + (p_total - fresh_n),
            filtered = filtered + (fresh_n - stored)
            WHERE shard = txid_current() % 16;
    END IF;
    IF stored > 0 THEN
        INSERT INTO minute_stats (minute, shard, accepted, delivered, failed)
            VALUES (p_now / 60000, (txid_current() % 16)::smallint, stored, 0, 0)
            ON CONFLICT (minute, shard) DO UPDATE SET
                accepted = minute_stats.accepted + excluded.accepted;
    END IF;
END $$;

