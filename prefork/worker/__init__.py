"""A worker process: its event loop, connections, and what answers requests."""
