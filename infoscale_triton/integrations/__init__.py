"""Integrations with other libraries, each in its own submodule, imported on demand (each needs its
library installed; importing this package alone imports none of them).

* :mod:`infoscale_triton.integrations.transformers`: an attention implementation for Hugging Face
  transformers (``pip install "infoscale-triton[hf]"``).
"""
