-- The number (crlNumber) of the certificate revocation list each agent had in force at its last heartbeat (0:
-- none, or not reported yet), so that an operator sees a revocation reach every agent.
ALTER TABLE services ADD COLUMN crl_number INTEGER NOT NULL DEFAULT 0;
