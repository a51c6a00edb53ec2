"""Reporting: `orchestrate refit` (fit.json, plots, the re-planned target) and the demo."""
