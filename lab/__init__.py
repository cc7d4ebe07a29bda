"""The laboratory: benches, paper reproductions, plots, reports and dev tools (not installed with the package)."""
