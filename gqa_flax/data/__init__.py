"""Data: the T5 vocabulary, the paper's seqio tasks and their sources."""
from gqa_flax.data import mini
from gqa_flax.data import tasks
from gqa_flax.data import vocab
