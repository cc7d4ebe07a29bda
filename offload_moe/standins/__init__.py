"""Stand-ins for missed experts: the policies, their device bank, low-bit and low-rank weights."""
