"""Checkpoint reading (Orbax, T5X legacy, HF T5 v1.1), writing (our Orbax layout) and GQA conversion."""
from gqa_flax.checkpoints.reader import (CheckpointSource, LoadedCheckpoint, load, load_checkpoint,
                                         open_checkpoint)

__all__ = ["CheckpointSource", "LoadedCheckpoint", "load", "load_checkpoint", "open_checkpoint"]
