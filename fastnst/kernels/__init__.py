"""The hot math of the objective, one op per file.

Today every op runs on its pure-PyTorch twin (``reference.py``); the Triton kernels and the
backend choice (auto | torch | triton) plug in here, so the objective never changes.
"""

from .reference import content_loss, gram, style_loss

__all__ = ["content_loss", "gram", "style_loss"]
