"""The rollout controller: canary steps and blue/green promotion, judged by analysis of
Weir's own counts or Prometheus. Imports the data plane's statistics, the config and the base."""
