"""The host layer: processes, locks and file primitives.  The only place that spawns processes."""
