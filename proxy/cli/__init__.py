"""The `weir` command line: a thin client of the admin API, and `weir run`."""
