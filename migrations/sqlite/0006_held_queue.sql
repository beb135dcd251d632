-- Events queued behind a held head wait for the same identity as the head:
-- none of them can be sent before it, so /status counts them with the held
-- (and shows how many of those are queued, `held_queued`), not with the
-- pending whose age an operator alerts on. The count is a counter like the
-- others (state_counts row 6), kept through a small table of the keys whose
-- head is held and the triggers below, so status still reads counters only.
CREATE TABLE held_keys (
    order_key TEXT PRIMARY KEY,
    -- Events of this key in state 5 (queued) behind its held head.
    queued    INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO state_counts (state, n) VALUES (6, 0);

CREATE TRIGGER held_keys_count_insert AFTER INSERT ON held_keys BEGIN
    UPDATE state_counts SET n = n + NEW.queued WHERE state = 6;
END;
CREATE TRIGGER held_keys_count_update AFTER UPDATE OF queued ON held_keys BEGIN
    UPDATE state_counts SET n = n + NEW.queued - OLD.queued WHERE state = 6;
END;
CREATE TRIGGER held_keys_count_delete AFTER DELETE ON held_keys BEGIN
    UPDATE state_counts SET n = n - OLD.queued WHERE state = 6;
END;

-- A head becomes held: the events queued behind it count as held from now
-- on (one walk of that key's queue, once per hold).
CREATE TRIGGER events_hold AFTER UPDATE OF state ON events
WHEN NEW.state = 4 AND OLD.state <> 4 BEGIN
    INSERT INTO held_keys (order_key, queued)
    SELECT NEW.order_key, (SELECT COUNT(*) FROM events e INDEXED BY events_key
        WHERE e.order_key = NEW.order_key AND e.state IN (0, 1, 4, 5) AND e.state = 5)
    WHERE true
    ON CONFLICT (order_key) DO NOTHING;
END;
CREATE TRIGGER events_hold_insert AFTER INSERT ON events WHEN NEW.state = 4 BEGIN
    INSERT INTO held_keys (order_key, queued)
    SELECT NEW.order_key, (SELECT COUNT(*) FROM events e INDEXED BY events_key
        WHERE e.order_key = NEW.order_key AND e.state IN (0, 1, 4, 5) AND e.state = 5)
    WHERE true
    ON CONFLICT (order_key) DO NOTHING;
END;

-- The key's last held event is released, dies or goes: its queue is
-- pending again.
CREATE TRIGGER events_unhold AFTER UPDATE OF state ON events
WHEN OLD.state = 4 AND NEW.state <> 4 BEGIN
    DELETE FROM held_keys WHERE order_key = OLD.order_key
        AND NOT EXISTS (SELECT 1 FROM events e INDEXED BY events_key
            WHERE e.order_key = OLD.order_key AND e.state IN (0, 1, 4, 5) AND e.state = 4);
END;
CREATE TRIGGER events_unhold_delete AFTER DELETE ON events WHEN OLD.state = 4 BEGIN
    DELETE FROM held_keys WHERE order_key = OLD.order_key
        AND NOT EXISTS (SELECT 1 FROM events e INDEXED BY events_key
            WHERE e.order_key = OLD.order_key AND e.state IN (0, 1, 4, 5) AND e.state = 4);
END;

-- Events joining or leaving a queue. For a key whose head is not held
-- there is no row and these change nothing: one probe of a table that
-- holds only the held keys.
CREATE TRIGGER events_queue_insert AFTER INSERT ON events WHEN NEW.state = 5 BEGIN
    UPDATE held_keys SET queued = queued + 1 WHERE order_key = NEW.order_key;
END;
CREATE TRIGGER events_queue_enter AFTER UPDATE OF state ON events
WHEN NEW.state = 5 AND OLD.state <> 5 BEGIN
    UPDATE held_keys SET queued = queued + 1 WHERE order_key = NEW.order_key;
END;
CREATE TRIGGER events_queue_leave AFTER UPDATE OF state ON events
WHEN OLD.state = 5 AND NEW.state <> 5 BEGIN
    UPDATE held_keys SET queued = queued - 1 WHERE order_key = OLD.order_key;
END;
CREATE TRIGGER events_queue_delete AFTER DELETE ON events WHEN OLD.state = 5 BEGIN
    UPDATE held_keys SET queued = queued - 1 WHERE order_key = OLD.order_key;
END;

-- What an earlier version left held.
INSERT INTO held_keys (order_key, queued)
SELECT h.order_key, (SELECT COUNT(*) FROM events e INDEXED BY events_key
    WHERE e.order_key = h.order_key AND e.state IN (0, 1, 4, 5) AND e.state = 5)
FROM (SELECT DISTINCT order_key FROM events INDEXED BY events_held WHERE state = 4) h
WHERE true
ON CONFLICT (order_key) DO NOTHING;
