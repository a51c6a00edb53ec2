"""The orchestrator, torch-free: four jobs, one sub-package each, imports running one way
(report > fit | run > plan; docs/architecture.md): `plan` (budget -> plan.yaml), `run` (the plan's
runs on an executor, their states), `fit` (the laws fitted to finished runs), `report` (refit's
verb and plots, the demo)."""
