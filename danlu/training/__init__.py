"""Training: tasks (loss + metrics), optimizers and schedules, checkpoints, and the one training loop."""
