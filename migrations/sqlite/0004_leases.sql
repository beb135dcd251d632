-- Claims live in their own small table instead of flipping each claimed
-- event to state 1. A claim then writes a few rows of a tiny table rather
-- than rewriting every claimed event's row and index entries, which halves
-- the pages a delivered event dirties (the drain's bottleneck was the write
-- volume per commit). A leased event keeps its state (0 head, 5 follower);
-- `leases` says it is in flight and until when. State 1 is no longer used.
CREATE TABLE leases (
    id          INTEGER PRIMARY KEY,
    lease_until INTEGER NOT NULL
);

-- Events of an earlier version that were in flight go back to the queue.
UPDATE events SET
    state = CASE WHEN id = (SELECT MIN(e.id) FROM events e
                            WHERE e.order_key = events.order_key AND e.state IN (0, 1, 4, 5))
                 THEN 0 ELSE 5 END,
    lease_until = NULL
WHERE state = 1;

-- The in-flight count stays in state_counts (row 1), kept by the leases.
CREATE TRIGGER leases_count_insert AFTER INSERT ON leases BEGIN
    UPDATE state_counts SET n = n + 1 WHERE state = 1;
END;
CREATE TRIGGER leases_count_delete AFTER DELETE ON leases BEGIN
    UPDATE state_counts SET n = n - 1 WHERE state = 1;
END;
UPDATE state_counts SET n = 0 WHERE state = 1;

-- The full (state, id) index changed on every transition of every event,
-- at scattered places (a page per event). Only the rare states need an
-- ordered list: heads (for the oldest waiting event), dead letters and held
-- events. A head changes once per batch of a user's events, not per event.
DROP INDEX events_state;
CREATE INDEX events_heads ON events (id) WHERE state = 0;
CREATE INDEX events_dead ON events (id) WHERE state = 3;
CREATE INDEX events_held ON events (id) WHERE state = 4;
