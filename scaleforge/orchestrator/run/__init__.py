"""Running: a plan's runs as entries, launched on an executor (local or Slurm), and their states."""
