"""Training: the config, the trainer and what a run survives (checkpoints, preemption, distributed jobs)."""
