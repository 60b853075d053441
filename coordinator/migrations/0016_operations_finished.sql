-- Finished operations are purged once older than the retention (`operations_retention_days`); this index finds
-- them without reading the whole history.
CREATE INDEX operations_finished ON operations (updated_at) WHERE state != 'running';
