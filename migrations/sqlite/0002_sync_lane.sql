-- Sync lane bookkeeping. `sync_pending_contacts` in meta counts the users
-- that have at least one pending audience update. Triggers keep it in the
-- same transaction as the rows (ingest upserts, sync lane deletes), so
-- /status reads one value instead of counting the table. An upsert that
-- updates an existing row fires no INSERT trigger, so repeats do not count.
INSERT OR REPLACE INTO meta (name, value)
VALUES ('sync_pending_contacts',
        (SELECT CAST(COUNT(DISTINCT user_id) AS TEXT) FROM audience_pending));

CREATE TRIGGER audience_pending_user_added AFTER INSERT ON audience_pending
WHEN NOT EXISTS (SELECT 1 FROM audience_pending
                 WHERE user_id = NEW.user_id AND attribute <> NEW.attribute)
BEGIN
    UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT)
        WHERE name = 'sync_pending_contacts';
END;

CREATE TRIGGER audience_pending_user_removed AFTER DELETE ON audience_pending
WHEN NOT EXISTS (SELECT 1 FROM audience_pending WHERE user_id = OLD.user_id)
BEGIN
    UPDATE meta SET value = CAST(CAST(value AS INTEGER) - 1 AS TEXT)
        WHERE name = 'sync_pending_contacts';
END;
