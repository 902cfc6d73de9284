-- Old heartbeats and event ids are trimmed by age (`Db::trim_history`).
CREATE INDEX heartbeats_received ON heartbeats (received_ms);
CREATE INDEX events_received ON events (received_ms);
-- What each agent said it can do in its last hello, comma-separated.
ALTER TABLE agents ADD COLUMN capabilities TEXT;
