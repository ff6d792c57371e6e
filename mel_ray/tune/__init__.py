"""Ray Tune sweeps of distributed training runs (the paper's k x n_s ablation)."""
