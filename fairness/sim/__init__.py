"""The continuous-batching engine simulator and the workloads it runs."""
