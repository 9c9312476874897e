"""The shared training loop: budget in steps, schedule, hooks, logging, checkpoint/resume, DDP."""
