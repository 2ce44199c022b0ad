"""Benchmarks: workloads, their runners, the physical limits measured beside them, reports."""
