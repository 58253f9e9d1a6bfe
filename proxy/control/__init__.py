"""The control plane: the one owner of what changes at run time (reloads, weights,
drains, the runtime state and its stores, controller leadership) and the metrics."""
