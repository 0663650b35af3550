"""Backends: *where* engines run. Each provisions hosts, runs commands, terminates them."""
