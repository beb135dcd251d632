-- Alias links (previousId -> userId), kept so that an alias that arrives
-- before either side's ids are known still teaches the earlier id once an
-- identify or group for the user arrives (Segment's usual signup order:
-- anonymous events, alias, then identify).
CREATE TABLE aliases (
    previous_id TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL,
    created_at  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX aliases_user ON aliases (user_id);
