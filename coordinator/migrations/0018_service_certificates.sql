-- When the certificate each agent registered with expires (ms since the epoch; 0 when not known: registered
-- before this was recorded). Shown by ListServices and the metrics, so that an expiry is seen coming.
ALTER TABLE services ADD COLUMN certificate_expires_at INTEGER NOT NULL DEFAULT 0;
