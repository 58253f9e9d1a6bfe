"""The data plane: HTTP/1.1 to clients and upstreams, routing, upstream pools, health,
mirroring and per-version statistics. Imports only the config and the base."""
