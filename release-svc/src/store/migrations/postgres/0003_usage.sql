-- Evaluation usage, flushed from memory: counts per feature, environment, variant and hour
-- (kept 8 days), and when each feature was last evaluated per environment (kept).
CREATE TABLE evaluation_usage (
    feature TEXT NOT NULL,
    environment TEXT NOT NULL,
    variant TEXT NOT NULL,
    hour_ms BIGINT NOT NULL,
    count BIGINT NOT NULL,
    PRIMARY KEY (feature, environment, variant, hour_ms)
);
CREATE INDEX evaluation_usage_by_hour ON evaluation_usage (hour_ms);
CREATE TABLE evaluation_seen (
    feature TEXT NOT NULL,
    environment TEXT NOT NULL,
    last_ms BIGINT NOT NULL,
    PRIMARY KEY (feature, environment)
);
