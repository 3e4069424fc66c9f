"""Transports between roles: trajectory streams and the embedded Redis."""
