"""T5X-style training: Adafactor, schedules, losses, partitioning, checkpoints and the loop."""
