-- One-at-a-time roles shared by the instances (the sync lane's window):
-- the holder renews its lease; when it stops, the next instance that asks
-- after expires_at takes the role over.
CREATE TABLE leaders (
    role text PRIMARY KEY,
    instance bigint NOT NULL,
    expires_at bigint NOT NULL
);
