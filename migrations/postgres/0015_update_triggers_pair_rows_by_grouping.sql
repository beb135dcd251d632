-- The two statement triggers on updates of `events` pair each row's old
-- and new versions by grouping on the id, not by a join.
--
-- `events_counted_update` (0003, 0007) and `events_held_updated` (0009)
-- joined the old and new transition tables on `id`, with hash joins turned
-- on for themselves so that the pairing would be one pass. But a trigger's
-- query has no parameter: the session plans it once, on the transition
-- tables of the first update that fired it, and keeps that plan. When that
-- first update changed no row (a settle with nothing delivered runs its
-- delivered update with no ids, and maintenance's updates often find
-- nothing), both tables were empty at planning time, the planner chose a
-- nested loop, and the session kept comparing every old row with every new
-- one: 65,280 comparisons for a settle of 256, about 13 ms in each trigger.
-- A drain of 20,000 events of unknown users (each one held) cost
-- PostgreSQL 331 µs of CPU per event, against about 55 µs per delivered
-- event.
--
-- Now neither trigger joins. Each transition table is read once, and only
-- the rows whose pairing matters are paired, by grouping the union of the
-- two tables on the id (a sort or a hash, whatever the estimates):
--   * the counters: a state's count moves by its new rows less its old
--     rows, no pairing needed; only the transitions into delivered and dead
--     need to know a row's old state, and they are paired only when an old
--     row was delivered or dead already (a settle's rows never are);
--   * the held queue: only rows that are held or queued before or after
--     the update (a delivered settle has none).
-- The counters are then added to their shard's row by its key. Same counts,
-- same keys.

CREATE OR REPLACE FUNCTION events_counted_update() RETURNS trigger LANGUAGE plpgsql
SET jit = off AS $$
DECLARE
    o record;
    w record;
    v_delivered bigint;
    v_dead bigint;
BEGIN
    SELECT count(*) FILTER (WHERE r.state = 0) AS s0, count(*) FILTER (WHERE r.state = 2) AS s2,
           count(*) FILTER (WHERE r.state = 3) AS s3, count(*) FILTER (WHERE r.state = 4) AS s4,
           count(*) FILTER (WHERE r.state = 5) AS s5
        INTO o FROM old_rows r;
    SELECT count(*) FILTER (WHERE r.state = 0) AS s0, count(*) FILTER (WHERE r.state = 2) AS s2,
           count(*) FILTER (WHERE r.state = 3) AS s3, count(*) FILTER (WHERE r.state = 4) AS s4,
           count(*) FILTER (WHERE r.state = 5) AS s5
        INTO w FROM new_rows r;
    IF (w.s0 - o.s0, w.s2 - o.s2, w.s3 - o.s3, w.s4 - o.s4, w.s5 - o.s5) = (0, 0, 0, 0, 0) THEN
        RETURN NULL;
    END IF;
    IF o.s2 + o.s3 = 0 THEN
        v_delivered := w.s2;
        v_dead := w.s3;
    ELSE
        SELECT count(*) FILTER (WHERE p.n = 2 AND p.o IS DISTINCT FROM 2),
               count(*) FILTER (WHERE p.n = 3 AND p.o IS DISTINCT FROM 3)
            INTO v_delivered, v_dead
            FROM (SELECT min(u.o) AS o, min(u.n) AS n
                  FROM (SELECT r.id, r.state AS o, NULL::smallint AS n FROM old_rows r
                        WHERE r.state IN (2, 3)
                        UNION ALL
                        SELECT r.id, NULL::smallint, r.state FROM new_rows r
                        WHERE r.state IN (2, 3)) u
                  GROUP BY u.id) p;
    END IF;
    UPDATE counters c SET s0 = c.s0 + (w.s0 - o.s0), s2 = c.s2 + (w.s2 - o.s2),
        s3 = c.s3 + (w.s3 - o.s3), s4 = c.s4 + (w.s4 - o.s4), s5 = c.s5 + (w.s5 - o.s5),
        delivered = c.delivered + v_delivered, dead_total = c.dead_total + v_dead
        WHERE c.shard = txid_current() % 16;
    RETURN NULL;
END $$;

-- The keys whose held queue may have changed, as in 0009: a row entering
-- or leaving state 4, or, among keys held already, state 5. No update
-- changes a row's key.
CREATE OR REPLACE FUNCTION events_held_updated() RETURNS trigger LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off AS $$
DECLARE
    keys text[];
BEGIN
    keys := ARRAY(SELECT p.k FROM
                      (SELECT min(u.o) AS o, min(u.n) AS n, min(u.k) AS k
                       FROM (SELECT r.id, r.state AS o, NULL::smallint AS n, r.order_key AS k
                             FROM old_rows r WHERE r.state IN (4, 5)
                             UNION ALL
                             SELECT r.id, NULL::smallint, r.state, r.order_key
                             FROM new_rows r WHERE r.state IN (4, 5)) u
                       GROUP BY u.id) p
                  WHERE p.o IS DISTINCT FROM p.n
                    AND (p.o = 4 OR p.n = 4
                         OR ((p.o = 5 OR p.n = 5) AND (SELECT true FROM held_keys h
                                                       WHERE h.order_key = p.k))));
    IF cardinality(keys) > 0 THEN
        PERFORM held_keys_recount(keys);
    END IF;
    RETURN NULL;
END $$;
