-- The active-events index says "active" as `state NOT IN (2, 3)` instead of
-- `state IN (0, 1, 4, 5)` (the same rows: states run from 0 to 5). SQLite
-- evaluates an IN list of more than two constants through a temporary
-- b-tree that it builds and drops each time, and it evaluates a partial
-- index's WHERE on every insert into the table: every ingested event paid
-- for building one. Two values are compared directly.
--
-- Queries name this index with INDEXED BY and repeat its WHERE verbatim,
-- so the triggers of 0006 that do are recreated with the new text.
DROP INDEX events_key;
CREATE INDEX events_key ON events (order_key, id) WHERE state NOT IN (2, 3);

DROP TRIGGER events_hold;
CREATE TRIGGER events_hold AFTER UPDATE OF state ON events
WHEN NEW.state = 4 AND OLD.state <> 4 BEGIN
    INSERT INTO held_keys (order_key, queued)
    SELECT NEW.order_key, (SELECT COUNT(*) FROM events e INDEXED BY events_key
        WHERE e.order_key = NEW.order_key AND e.state NOT IN (2, 3) AND e.state = 5)
    WHERE true
    ON CONFLICT (order_key) DO NOTHING;
END;

DROP TRIGGER events_unhold;
CREATE TRIGGER events_unhold AFTER UPDATE OF state ON events
WHEN OLD.state = 4 AND NEW.state <> 4 BEGIN
    DELETE FROM held_keys WHERE order_key = OLD.order_key
        AND NOT EXISTS (SELECT 1 FROM events e INDEXED BY events_key
            WHERE e.order_key = OLD.order_key AND e.state NOT IN (2, 3) AND e.state = 4);
END;

DROP TRIGGER events_unhold_delete;
CREATE TRIGGER events_unhold_delete AFTER DELETE ON events WHEN OLD.state = 4 BEGIN
    DELETE FROM held_keys WHERE order_key = OLD.order_key
        AND NOT EXISTS (SELECT 1 FROM events e INDEXED BY events_key
            WHERE e.order_key = OLD.order_key AND e.state NOT IN (2, 3) AND e.state = 4);
END;
