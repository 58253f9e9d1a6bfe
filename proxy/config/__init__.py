"""Configuration: the pydantic model of the YAML file, its loader and the TLS
contexts built from it. Imports nothing else of Weir but the base (proxy.errors, proxy.tasks)."""
