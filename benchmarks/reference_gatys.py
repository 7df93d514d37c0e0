"""Run the textbook baseline on its own: the PyTorch tutorial's way, on fastnst's objective.

The implementation lives in ``fastnst/reference_gatys.py`` so that ``fastnst bench`` can time it
from any installation; this script renders an image with it, for side-by-side comparisons:

    PYTHONPATH=. python benchmarks/reference_gatys.py CONTENT STYLE -o OUT [--size 256]
        [--iterations 100] [--optimizer lbfgs|adam] [--weights imagenet|random|PATH] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from fastnst import StyleConfig, load_image, save_image
from fastnst import reference_gatys as textbook
from fastnst.errors import FastNSTError
from fastnst.images import check_output_path, image_to_tensor, resized
from fastnst.vgg import load_weights


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("content")
    parser.add_argument("style")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--optimizer", choices=["lbfgs", "adam"], default="lbfgs")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    config = StyleConfig()
    try:
        output = check_output_path(args.output)
        content_image = resized(load_image(args.content), args.size)
        content = image_to_tensor(content_image).to(args.device)
        style = image_to_tensor(load_image(args.style).resize(content_image.size)).to(args.device)
        model, style_losses, content_losses = textbook.build_model(
            load_weights(args.weights), content, style, config.content_layers, config.style_layers)
        image = content.clone().requires_grad_(True)  # the tutorial starts from the content image
        step = textbook.make_step(model, style_losses, content_losses, image,
                                  textbook.make_optimizer(args.optimizer, image))
        start = time.perf_counter()
        for _ in range(args.iterations):
            loss = step()
        seconds = time.perf_counter() - start
        save_image(image.detach().clamp(0, 1), output)
    except FastNSTError as exc:
        print(f"reference_gatys: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"wrote {output}: loss {loss.item():.6g}, {seconds / args.iterations:.4f} s/iter", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
