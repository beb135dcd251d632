-- The ChurnZero actions an event resolved to on its first attempt (a JSON
-- array, without the app key), written with that attempt's outcome. Every
-- later attempt, and a replay of a dead letter, sends exactly these, so the
-- ids the identity map gave it and the mapping file it was mapped with never
-- change under it. NULL until an attempt that resolved the event fails or is
-- given back; a delivered event needs none.
ALTER TABLE events ADD COLUMN actions TEXT;
