"""Checkpoint reading (Orbax, T5X legacy, HF T5 v1.1), writing (our Orbax layout) and GQA conversion.

Paths may be local or gs:// URLs; `load_sharded` restores any format straight onto a mesh."""
from gqa_flax.checkpoints.convert import convert_checkpoint
from gqa_flax.checkpoints.orbax_format import (CONFIG_ITEM, METADATA_ITEM, PARAMS_KEY, STATE_ITEM,
                                               STEP_PREFIX, save)
from gqa_flax.checkpoints.reader import (CheckpointSource, LoadedCheckpoint, load, load_checkpoint,
                                         open_checkpoint, resolve)
from gqa_flax.checkpoints.sharded import load_sharded, read_sharded

__all__ = ["CONFIG_ITEM", "CheckpointSource", "LoadedCheckpoint", "METADATA_ITEM", "PARAMS_KEY",
           "STATE_ITEM", "STEP_PREFIX", "convert_checkpoint", "load", "load_checkpoint",
           "load_sharded", "open_checkpoint", "read_sharded", "resolve", "save"]
