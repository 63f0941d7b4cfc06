"""The fault suite: the pool under cancellation storms, killed backends, a restarted
server, expiry, leaks, a state-machine model and memory bounds.

The server tests use a throwaway PostgreSQL cluster (``scripts/faultdb``, port 5434)
that they may stop, kill and restart; never the servers the other suites use.
"""
