"""Processes: one start/stop sequence for the single process, the supervisor and its
workers (signals, listeners, the order things start and stop)."""
