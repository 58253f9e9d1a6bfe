"""`weir demo`: built-in app versions, a load generator and a scripted canary rollout."""
