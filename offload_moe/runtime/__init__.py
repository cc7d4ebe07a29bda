"""What runs on every forward: the experts hook, residency cache, transfers, prefetch, host compute."""
