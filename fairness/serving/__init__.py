"""Serving: a fairness policy as transformers' continuous-batching scheduler, and its HTTP front."""
