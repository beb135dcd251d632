-- The columns that name a key compare as bytes, whatever the database's
-- collation.
--
-- Every claim, settle and ingest descends the indexes on order keys, and
-- every ingest the index on message ids, comparing text at each step.
-- The columns took the database's collation: on a `C.UTF-8` database each
-- comparison went through strcoll and a locale look-up, and on an
-- `en_US.UTF-8` or ICU one (the default of most installations) through the
-- Unicode collation algorithm. These columns are compared for equality
-- only: their order is never shown and never decides which event goes
-- first (ids do). Under `COLLATE "C"` a comparison is a memcmp, and equal
-- means the same bytes, as it already did (the collations PostgreSQL 15
-- creates databases with are deterministic).
--
-- In a serial loop of claims of 256 distinct users and their delivered
-- settles, PostgreSQL's own instructions (callgrind) fell by 3.3% on a
-- `C.UTF-8` database and by 22% on an `en_US.UTF-8` one, to the same
-- count on both.
--
-- The tables are not rewritten: only the indexes on these columns are
-- rebuilt, once, under the upgrade's lock. On a large dedup window or
-- backlog that takes a while (about as long as building the indexes).
-- The audience lane's tables keep the database's collation: it pages
-- through users in their order, and a change under a running sync would
-- move its cursor.

ALTER TABLE events ALTER COLUMN order_key TYPE text COLLATE "C";
ALTER TABLE leases ALTER COLUMN order_key TYPE text COLLATE "C";
ALTER TABLE held_keys ALTER COLUMN order_key TYPE text COLLATE "C";
ALTER TABLE message_ids ALTER COLUMN source TYPE text COLLATE "C",
    ALTER COLUMN message_id TYPE text COLLATE "C";
ALTER TABLE identities ALTER COLUMN user_id TYPE text COLLATE "C";
ALTER TABLE aliases ALTER COLUMN previous_id TYPE text COLLATE "C",
    ALTER COLUMN user_id TYPE text COLLATE "C";
-- A change of a column's type forgets its statistics: a table analysed
-- when it held rows is analysed again. The others (a fresh install's) are
-- left never analysed: statistics of an empty table would tell the planner
-- that it stays empty, and the plans made on them, which sessions keep,
-- would read whole tables once they fill up.
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['events', 'leases', 'held_keys', 'message_ids', 'identities',
                             'aliases'] LOOP
        IF EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = t::regclass AND c.reltuples > 0) THEN
            EXECUTE format('ANALYZE %I', t);
        END IF;
    END LOOP;
END $$;
