"""corral: fine-tune, evaluate, ship and serve your own ChatGPT on LLaMA-family models.

Importing this package is cheap on purpose (no torch): `corral --help` must start instantly.
"""

__version__ = "0.1.0"
