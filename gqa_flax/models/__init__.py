"""T5.1.1 with grouped-query attention in the decoder."""
from gqa_flax.models.attention import MultiHeadDotProductAttention, grouped_dot_product_attention
from gqa_flax.models.config import (PRESETS, T5Config, config_from_dict, config_to_dict,
                                     t5_1_1_config)
from gqa_flax.models.t5 import Transformer

__all__ = ["MultiHeadDotProductAttention", "PRESETS", "T5Config", "Transformer", "config_from_dict",
           "config_to_dict",
           "grouped_dot_product_attention", "t5_1_1_config"]
