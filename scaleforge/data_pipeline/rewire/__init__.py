"""REWIRE (Nguyen et al. 2025): recycle a data-constrained pool by rewriting it with an instruct model.

Stages: classify (fastText quality scores), rewrite (sharded, resumable, local transformers or an
OpenAI-compatible server), filter (drop reasons, rewrite classifier), mix (a new token store with
provenance), report. `orchestrate rewire CONFIG.yaml --out DIR` runs them; see docs/rewire.md.
"""
