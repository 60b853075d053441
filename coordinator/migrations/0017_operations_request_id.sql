-- The request that recorded an operation (`x-request-id`), passed on to the agents its worker calls, also when
-- the worker resumes after a restart. Empty for operations no request recorded.
ALTER TABLE operations ADD COLUMN request_id TEXT NOT NULL DEFAULT '';
