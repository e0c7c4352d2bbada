"""The job engine: one state machine for both protocols (assignment, timers,
change feed, output), between the servicers above and the store below."""
