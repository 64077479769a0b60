"""infoscale-triton: fused Triton attention with InfoScale / CosScale logit temperatures."""

from . import reference
from .attention import AttentionEntropy, scaled_dot_product_attention
from .decode import decode_attention as decode_attention  # explicit re-export (PEP 484)
from .temperature import TEMPERATURE_CHOICES
from .varlen import varlen_attention

__all__ = ["scaled_dot_product_attention", "varlen_attention", "decode_attention", "reference", "AttentionEntropy",
           "TEMPERATURE_CHOICES"]
__version__ = "0.1.0"
