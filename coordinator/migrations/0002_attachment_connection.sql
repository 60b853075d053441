-- The connection facts of an attachment (portal, IQN, LUN or share and path; never the CHAP secret), kept so
-- that a detach, or the undo of a failed attach, can tell the compute agent what to disconnect.
ALTER TABLE attachments ADD COLUMN connection TEXT NOT NULL DEFAULT '{}';
