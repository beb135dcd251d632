-- An update that leaves every state's count as it was can still move
-- events into delivered or dead: a dead event marked delivered and a
-- delivered one marked dead in one statement (a hand fix) change no count
-- of a state, but each enters its new state. `events_counted_update` (0003
-- to 0015) returned early when the counts did not change, so the delivered
-- and dead totals missed both. It now returns early only when nothing at
-- all moved, totals included. No settle, replay or maintenance statement
-- of the forwarder reaches the case; a test does, with updates of its own
-- (`an_update_counts_only_rows_entering_delivered_or_dead`).

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
    IF (w.s0 - o.s0, w.s2 - o.s2, w.s3 - o.s3, w.s4 - o.s4, w.s5 - o.s5, v_delivered, v_dead)
        = (0, 0, 0, 0, 0, 0, 0) THEN
        RETURN NULL;
    END IF;
    UPDATE counters c SET s0 = c.s0 + (w.s0 - o.s0), s2 = c.s2 + (w.s2 - o.s2),
        s3 = c.s3 + (w.s3 - o.s3), s4 = c.s4 + (w.s4 - o.s4), s5 = c.s5 + (w.s5 - o.s5),
        delivered = c.delivered + v_delivered, dead_total = c.dead_total + v_dead
        WHERE c.shard = txid_current() % 16;
    RETURN NULL;
END $$;
