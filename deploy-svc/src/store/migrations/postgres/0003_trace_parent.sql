-- The W3C traceparent of the call that caused a placement event (NULL while traces are not
-- exported, for automatic changes and older events).
ALTER TABLE placement_events ADD COLUMN trace_parent TEXT;
