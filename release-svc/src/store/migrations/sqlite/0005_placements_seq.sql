-- Replicas that do not apply placement events read the placements committed since their
-- last read (by sequence) instead of reloading everything.
CREATE INDEX placements_seq ON placements (seq);
