"""Optional integrations with other libraries, each imported only when used.

* :mod:`attnkit.integrations.hf` -- ``attn_implementation="attnkit"`` in Hugging Face
  ``transformers`` models (``pip install -e ".[hf]"``).
"""
