-- The writer counts claims in flight (state_counts row 1) itself, once per
-- claim and once per settle, instead of through a trigger per lease row.
--
-- Each lease inserted by a claim and each one deleted by a settle ran the
-- trigger's UPDATE of the same state_counts row: two row updates for every
-- delivered event. In a drain where every event has a user of its own (a
-- claim of 400 heads, then a settle of 400), that was a tenth of the
-- writer's time, and the writer is that drain's bound.
--
-- Leases are written in three places, all in the writer: a claim inserts
-- them (and adds how many), a settle's fence deletes them (and subtracts
-- how many it deleted), and the release of expired leases (maintenance, and
-- every lease at start) deletes them and counts the table again.
--
-- The count already stored stays right: the triggers kept it up to this
-- migration, which runs in one transaction with nothing else writing.
DROP TRIGGER leases_count_insert;
DROP TRIGGER leases_count_delete;
