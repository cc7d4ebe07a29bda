"""Policies and the state they keep: requests, the plug-in API and its driver, ledgers, VTC and Equinox."""
