-- The hot paths as server-side functions: one round trip each.
--
-- A group commit of tracks, a claim and an all-delivered settle were each a
-- transaction of three to five statements, so a round trip per statement
-- plus BEGIN and COMMIT. On a busy machine every round trip waits for the
-- forwarder and the server to be scheduled in turn, and the claim, which
-- runs one at a time per instance, set the pace of the whole drain. As one
-- function called outside an explicit transaction, each is one statement:
-- one round trip, committed when it returns. The statements inside are the
-- ones the forwarder sent before, in the same order, and each still reads
-- with a snapshot of its own (READ COMMITTED), so what a statement sees
-- after taking the key locks is what it saw when the statements came one by
-- one. See the module doc of `src/outbox/postgres` for the ordering design.

-- Lease recovery filters by expiry as well as by owner, so it scans the
-- (small) leases table anyway; the owner index only cost every claim an
-- index insertion and led the settle's fence to a worse plan than the key.
DROP INDEX leases_owner;

-- Locks the rows of these ordering keys (creating missing ones) until the
-- transaction ends, without writing them (ON CONFLICT ... WHERE false), in
-- sorted order, so that two transactions never wait on each other in a
-- cycle. The one way every change to a key's queue is ordered: ingest,
-- settles, lease recovery, replay, the end of a hold.
CREATE FUNCTION lock_order_keys(p_keys text[]) RETURNS void LANGUAGE sql AS $$
    INSERT INTO order_keys (order_key) SELECT k FROM unnest(p_keys) AS t(k) ORDER BY k
    ON CONFLICT (order_key) DO UPDATE SET order_key = excluded.order_key WHERE false;
$$;

-- The fence of a settle: gives back the leases that still carry this owner
-- and the token its worker was handed, and returns their events, the only
-- outcomes that count. A lease row is only ever removed under its row
-- lock, so the fence needs no key lock of its own.
CREATE FUNCTION fence_leases(p_owner bigint, p_ids bigint[], p_tokens bigint[])
RETURNS bigint[] LANGUAGE sql AS $$
    WITH d AS (DELETE FROM leases l USING unnest(p_ids, p_tokens) AS t(id, tok)
               WHERE l.event_id = t.id AND l.token = t.tok AND l.owner = p_owner
               RETURNING l.event_id)
    SELECT COALESCE(array_agg(event_id), '{}') FROM d;
$$;

-- Restores the per-key invariant for keys the caller has locked: the lowest
-- active id is the head (state 0, or 4 if it was held), every other active
-- event is queued. Keys with an event in flight are left alone: their settle
-- normalises them. Each move is found through its own index (a key's heads;
-- the id), never by walking the key's whole queue.
CREATE FUNCTION normalize_keys(p_keys text[]) RETURNS void LANGUAGE sql AS $$
    WITH k AS (SELECT DISTINCT unnest(p_keys) AS key),
    h AS (SELECT k.key, (SELECT e.id FROM events e WHERE e.order_key = k.key
              AND e.state IN (0, 4, 5) ORDER BY e.id LIMIT 1) AS head
          FROM k WHERE NOT EXISTS (SELECT 1 FROM leases l WHERE l.order_key = k.key)),
    t AS (SELECT e.id, 5::int2 AS st FROM h JOIN events e ON e.order_key = h.key
              AND e.state IN (0, 4) AND e.id > h.head
          UNION ALL SELECT e.id, 0::int2 FROM h JOIN events e ON e.id = h.head AND e.state = 5)
    UPDATE events e SET state = t.st FROM t WHERE e.id = t.id;
$$;

-- A claim: the keys of the oldest due, unleased heads, locked without
-- waiting. Of the twice `p_max` oldest due heads, the keys are locked in
-- due order until `p_max` are held (the row locks sit below the LIMIT), so
-- a key another claim or another instance holds right now is passed over
-- for the next: two claims running at once take disjoint keys instead of
-- both reaching for the same oldest ones, where the second came back
-- nearly empty. The candidates are read by their own LIMIT first: a scan
-- that locked as it went through the whole due index was planned, on a
-- table without statistics yet, as a sort of every due head. A claim never
-- waits for a lock, so the order it locks in cannot deadlock. Then,
-- under the locks and with a new snapshot, the heads read again, each
-- followed by the events queued behind it in id order, the first `p_max`
-- of those leased to `p_owner` with `p_until` as token and expiry, and
-- their rows returned.
--
-- Its plans must not depend on statistics: with autovacuum off, or before
-- it has run, the planner took the due heads for a few dozen rows and read
-- and sorted every due head instead of walking the due index, about 20 ms
-- a claim at 50,000 due heads, and the drain of a backlog of many users
-- was paced by it. The claim's statements are small walks of an index and
-- probes of others, so it plans with nested loops only and without bitmap
-- scans (which lose the index's order) or materialised inner sides: the due
-- index is walked in order and stops at the LIMIT, and each candidate's
-- lease and each locked key's head is one index probe.
CREATE FUNCTION claim_events(p_owner bigint, p_max integer, p_until bigint, p_now bigint)
RETURNS TABLE (id bigint, order_key text, kind text, payload text, attempts integer,
               accepted_at bigint, first_attempt_at bigint, actions text)
LANGUAGE plpgsql
SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
SET enable_material = off AS $$
#variable_conflict use_column
DECLARE
    locked text[];
BEGIN
    locked := ARRAY(SELECT k.order_key FROM (
                      SELECT e.id, e.order_key, e.next_attempt_at FROM events e
                      WHERE e.state = 0 AND e.next_attempt_at <= p_now
                      AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.event_id = e.id)
                      ORDER BY e.next_attempt_at, e.id LIMIT 2 * p_max) c
                  JOIN order_keys k ON k.order_key = c.order_key
                  ORDER BY c.next_attempt_at, c.id LIMIT p_max
                  FOR UPDATE OF k SKIP LOCKED);
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

-- A settle whose outcomes are all "delivered": the keys locked, the fence
-- (only leases that still carry this owner and token count), the delivered
-- events and the bookkeeping, then the keys normalised. Returns how many
-- outcomes counted.
CREATE FUNCTION settle_delivered(p_owner bigint, p_ids bigint[], p_tokens bigint[],
                                 p_firsts bigint[], p_keys text[], p_now bigint)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    held bigint[];
    n integer;
BEGIN
    PERFORM lock_order_keys(p_keys);
    held := fence_leases(p_owner, p_ids, p_tokens);
    n := cardinality(held);
    IF n > 0 THEN
        UPDATE events e SET state = 2, finished_at = p_now, attempts = e.attempts + 1,
            first_attempt_at = t.first
            FROM unnest(p_ids, p_firsts) AS t(id, first)
            WHERE e.id = t.id AND t.id = ANY(held);
        UPDATE instances SET last_delivery_at = p_now WHERE id = p_owner;
        INSERT INTO minute_stats (minute, shard, accepted, delivered, failed)
            VALUES (p_now / 60000, (txid_current() % 16)::smallint, 0, n, 0)
            ON CONFLICT (minute, shard) DO UPDATE SET
                delivered = minute_stats.delivered + excluded.delivered;
    END IF;
    PERFORM normalize_keys(p_keys);
    RETURN n;
END $$;

-- Ingest, first half: the keys' locks (`p_lock_keys`: every key the group
-- may change, sorted and distinct, so that concurrent groups of this
-- instance or another order themselves as the module doc says), the
-- backlog limit, and the message ids. Each (source, message id) comes once,
-- in the group's order. Returns, for each, whether it is fresh; NULL when
-- the backlog is full (nothing is written then but the key locks, which the
-- end of the transaction releases).
CREATE FUNCTION ingest_begin(p_lock_keys text[], p_forward_total bigint, p_max_backlog bigint,
                             p_sources text[], p_ids text[], p_now bigint, p_cutoff bigint)
RETURNS boolean[] LANGUAGE plpgsql AS $$
DECLARE
    backlog bigint;
    fresh boolean[];
BEGIN
    PERFORM lock_order_keys(p_lock_keys);
    -- The backlog: a limit across instances that are all adding to it,
    -- never exact.
    SELECT COALESCE(sum(s0 + s4 + s5), 0)::bigint INTO backlog FROM counters;
    IF p_forward_total > 0 AND backlog + p_forward_total > p_max_backlog THEN
        RETURN NULL;
    END IF;
    -- New ids, and ids older than the window, are fresh. A concurrent
    -- insert of one id waits on the unique index for the other's commit.
    WITH f AS (INSERT INTO message_ids (source, message_id, seen_at)
            SELECT s, m, p_now FROM unnest(p_sources, p_ids) AS t(s, m) ORDER BY s, m
            ON CONFLICT (source, message_id) DO UPDATE SET seen_at = excluded.seen_at
            WHERE message_ids.seen_at < p_cutoff RETURNING source, message_id)
    SELECT array_agg(f.source IS NOT NULL ORDER BY t.n) INTO fresh
        FROM unnest(p_sources, p_ids) WITH ORDINALITY AS t(s, m, n)
        LEFT JOIN f ON f.source = t.s AND f.message_id = t.m;
    RETURN COALESCE(fresh, '{}');
END $$;

-- Ingest, second half, under the locks the first half took: the fresh
-- events whose `p_forward` is true are stored (the other fresh ones are
-- filtered), and the group's counters and minute of activity are added.
-- `p_total` counts the group's events, duplicates within it included.
-- Every array runs alongside the others (no search of one array per row of
-- another, which a group of thousands of events would pay quadratically).
CREATE FUNCTION ingest_store(p_fresh boolean[], p_sources text[], p_ids text[],
                             p_forward boolean[], p_kinds text[], p_keys text[],
                             p_payloads text[], p_total bigint, p_now bigint)
RETURNS void LANGUAGE plpgsql AS $$
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
                     WHEN EXISTS (SELECT 1 FROM events e WHERE e.order_key = o
                                  AND e.state IN (0, 4, 5)) THEN 5
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

-- A group that touches neither the identity map nor the audience store
-- (tracks, pages, screens: most traffic) in one call: both halves. The
-- others run the halves as two statements of one transaction with their
-- own statements between them, in the order the first half's locks were
-- designed for (no key is locked after a counter row).
CREATE FUNCTION ingest_group(p_lock_keys text[], p_forward_total bigint, p_max_backlog bigint,
                             p_sources text[], p_ids text[], p_forward boolean[],
                             p_kinds text[], p_keys text[], p_payloads text[], p_total bigint,
                             p_now bigint, p_cutoff bigint)
RETURNS boolean[] LANGUAGE plpgsql AS $$
DECLARE
    fresh boolean[];
BEGIN
    fresh := ingest_begin(p_lock_keys, p_forward_total, p_max_backlog, p_sources, p_ids,
                          p_now, p_cutoff);
    IF fresh IS NOT NULL THEN
        PERFORM ingest_store(fresh, p_sources, p_ids, p_forward, p_kinds, p_keys, p_payloads,
                             p_total, p_now);
    END IF;
    RETURN fresh;
END $$;
