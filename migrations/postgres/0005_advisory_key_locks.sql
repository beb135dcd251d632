-- Per-key locks become advisory locks instead of row locks on `order_keys`.
--
-- A row lock is written into the row: every key a transaction changed cost
-- a tuple lock and its WAL record (about 4 us a key), and a key seen for
-- the first time a row insertion, an index insertion and their WAL (about
-- 24 us), later deleted again by maintenance. Traffic where most events
-- carry a user of their own paid that for nearly every event. An advisory
-- lock lives in the server's lock table only: about half a microsecond,
-- nothing written, nothing to prune.
--
-- The lock table is bounded (`max_locks_per_transaction` times the
-- connections), so a transaction must not take a lock per key for
-- thousands of keys. Two levels:
--   * the key space, (1667659521, 0): every transaction that changes keys
--     holds it shared, or exclusive when it changes more than 512 keys at
--     once (then it takes no lock per key: holding the key space alone
--     excludes everyone else's change to any key), unless it holds it
--     shared already: then it goes on with a lock per key;
--   * one key, (1667659522, hashtext(key)): exclusive, taken under the
--     shared key space lock, in ascending hash order.
-- Two keys with the same 32-bit hash share a lock: that only makes them
-- wait for each other now and then, never breaks an order. Locks are
-- always taken in one global order (the key space, then hashes ascending),
-- so two transactions never wait on each other in a cycle, and the
-- deadlock detector breaks the rare remaining one (a second call in a
-- transaction, for the keys an alias teaches). Claims never wait: they try
-- the locks and pass over a key they cannot have.
CREATE OR REPLACE FUNCTION lock_order_keys(p_keys text[]) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    hashes integer[];
    held text;
BEGIN
    hashes := ARRAY(SELECT DISTINCT hashtext(k) FROM unnest(p_keys) AS t(k) ORDER BY 1);
    IF cardinality(hashes) = 0 THEN
        RETURN;
    END IF;
    IF cardinality(hashes) > 512 THEN
        -- What this transaction holds of the key space already, if anything:
        -- a second call (the users an alias teaches, after the group's own)
        -- must not ask for the key space exclusively while it holds it
        -- shared, which would wait for every other holder, some of them
        -- waiting for its keys. Reading pg_locks is slow, but only calls
        -- with this many keys pay it.
        SELECT l.mode INTO held FROM pg_locks l
            WHERE l.locktype = 'advisory' AND l.pid = pg_backend_pid() AND l.granted
            AND l.classid = 1667659521 AND l.objid = 0 AND l.objsubid = 2
            ORDER BY l.mode LIMIT 1;
        IF held = 'ExclusiveLock' THEN
            RETURN;
        ELSIF held IS NULL THEN
            PERFORM pg_advisory_xact_lock(1667659521, 0);
            RETURN;
        END IF;
    END IF;
    PERFORM pg_advisory_xact_lock_shared(1667659521, 0);
    PERFORM count(pg_advisory_xact_lock(1667659522, h)) FROM unnest(hashes) AS t(h);
END $$;

-- The claim, as in 0004, with the keys' locks tried as advisory locks: the
-- key space shared (a claim finds nothing while a change of more than 512
-- keys runs), then each candidate's key in due order until `p_max` are
-- held (256 at most). The volatile lock call stays above the candidates'
-- own LIMIT (it is never pushed into it), so candidates are tried in due
-- order and the outer LIMIT stops at that many keys held. Each head it takes is also
-- locked `FOR UPDATE SKIP LOCKED`, the queue's usual claim, where 0004
-- locked the key's row: a head that another session is writing right now
-- is passed over for this round like a key another claim holds.
CREATE OR REPLACE FUNCTION claim_events(p_owner bigint, p_max integer, p_until bigint, p_now bigint)
RETURNS TABLE (id bigint, order_key text, kind text, payload text, attempts integer,
               accepted_at bigint, first_attempt_at bigint, actions text)
LANGUAGE plpgsql
SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
SET enable_material = off AS $$
#variable_conflict use_column
DECLARE
    locked text[];
    -- Keys one claim locks at most: its locks must stay few in the bounded
    -- lock table however large `--batch-size` is (a claim is four
    -- requests' worth); a claim that comes back short is topped up by the
    -- next one.
    max_keys integer := least(p_max, 256);
BEGIN
    IF NOT pg_try_advisory_xact_lock_shared(1667659521, 0) THEN
        RETURN;
    END IF;
    locked := ARRAY(SELECT c.order_key FROM (
                      SELECT e.id, e.order_key, e.next_attempt_at FROM events e
                      WHERE e.state = 0 AND e.next_attempt_at <= p_now
                      AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.event_id = e.id)
                      ORDER BY e.next_attempt_at, e.id LIMIT 2 * max_keys) c
                  JOIN events h ON h.id = c.id
                  WHERE pg_try_advisory_xact_lock(1667659522, hashtext(c.order_key))
                  LIMIT max_keys
                  FOR UPDATE OF h SKIP LOCKED);
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
            SELECT c.id, c.order_key, p_owner, p_until, p_until FROM chosen c RETURNING event_id)
    SELECT e.id, e.order_key, e.kind, e.payload, e.attempts, e.accepted_at,
        e.first_attempt_at, e.actions FROM events e JOIN l ON l.event_id = e.id;
END $$;

-- Nothing locks or reads the key rows any more.
DROP TABLE order_keys;
