-- The orphan sweeper removes a file only when an operation names its id (this coordinator made it); this
-- index answers that for each file a backend holds unplaced.
CREATE INDEX operations_resource ON operations (resource_id);
