"""fastnst: fast optimisation-based neural style transfer (Gatys et al., CVPR 2016).

    import fastnst
    picture = fastnst.stylize("photo.jpg", "starry_night.jpg", size=512)
    picture.save("out.png")
"""

from .api import render, stylize
from .config import StyleConfig
from .errors import FastNSTError
from .images import load_image, save_image
from .version import __version__

__all__ = ["FastNSTError", "StyleConfig", "__version__", "load_image", "render", "save_image", "stylize"]
