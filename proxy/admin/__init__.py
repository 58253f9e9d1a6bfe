"""The admin API, the dashboard and its history: HTTP over the control plane."""
