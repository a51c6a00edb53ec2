"""Planning: a compute budget -> plan.yaml (a ladder of small runs and the target), from a law."""
