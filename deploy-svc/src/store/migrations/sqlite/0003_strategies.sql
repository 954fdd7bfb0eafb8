-- deploy-svc schema v3 (SQLite): artifact sources, deployment strategies, orders to agents,
-- rollbacks.
ALTER TABLE artifacts ADD COLUMN source_uri TEXT NOT NULL DEFAULT '';

-- JSON of the strategy ({} for all-at-once); ContinueDeployment's flag for canaries; the
-- deployment a rollback undoes.
ALTER TABLE deployments ADD COLUMN strategy TEXT NOT NULL DEFAULT '{}';
ALTER TABLE deployments ADD COLUMN continued INTEGER NOT NULL DEFAULT 0;
ALTER TABLE deployments ADD COLUMN rollback_of INTEGER;

-- Whether the strategy has ordered the target to place yet (deployments made before
-- strategies ordered every target at once), and the target's position in the deployment.
ALTER TABLE placements ADD COLUMN ordered INTEGER NOT NULL DEFAULT 1;
ALTER TABLE placements ADD COLUMN ordinal INTEGER NOT NULL DEFAULT 0;
CREATE INDEX placements_orders ON placements (target, state) WHERE ordered = 1 AND state IN (1, 2);
