"""Weir: a traffic-splitting HTTP/1.1 reverse proxy for zero-downtime deployments."""

__version__ = "0.1.0"
