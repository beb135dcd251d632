-- The previous version's claim and promotion become thin wrappers over the
-- functions that replaced them in 0010, so that each piece of logic has one
-- live copy.
--
-- A forwarder of the version before 0010 that shares the database during a
-- rolling upgrade still calls `claim_events(owner, max, until, now)` and
-- `normalize_keys(keys)`. 0010 kept both with their full bodies, restated
-- beside the new `claim_due` and two-argument `normalize_keys`; a change to
-- one copy could silently miss the other. The wrappers keep the calls'
-- meaning exactly:
--   * `claim_events` is `claim_due` reading the due index from its
--     beginning (the lowest floor), without the `scan_floor` column;
--   * the one-argument `normalize_keys` is the two-argument one with a NULL
--     `now`: `greatest` ignores a NULL, so a promoted event keeps its due
--     time, as it did in that version. A full read of a newer instance
--     claims it (see 0010).
--
-- Also from this version on (in the forwarder, not here): a lease that
-- expired or was given back makes its key's head due "now" at the earliest,
-- so a claim from the floor takes it at once instead of the next full read.

CREATE OR REPLACE FUNCTION claim_events(p_owner bigint, p_max integer, p_until bigint, p_now bigint)
RETURNS TABLE (id bigint, order_key text, kind text, payload text, attempts integer,
               accepted_at bigint, first_attempt_at bigint, actions text)
LANGUAGE sql AS $$
    SELECT c.id, c.order_key, c.kind, c.payload, c.attempts, c.accepted_at,
        c.first_attempt_at, c.actions
    FROM claim_due(p_owner, p_max, p_until, p_now, (-9223372036854775808)::bigint) c
$$;

CREATE OR REPLACE FUNCTION normalize_keys(p_keys text[]) RETURNS void LANGUAGE sql AS $$
    SELECT normalize_keys(p_keys, NULL::bigint)
$$;
