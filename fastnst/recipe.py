"""What a piece of work is of, so that a rerun resumes the same work or renders again.

A recipe is the inputs by content (fingerprints of the files, or of the pixels for images given
in memory) and every option that changes the pixels of the result.  ``fastnst video`` keeps one
per work folder (``command.json``) and refuses another command into it; ``fastnst batch`` keeps
one per finished job in its manifest and renders a job again when its recipe changed.  Options
that do not change the result (device, precision, kernels, messages) are not part of it: a run
resumed on another machine or precision is the same work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from .config import ObjectiveOptions, ScheduleOptions, StyleConfig, flag_name

# A file is fingerprinted by its size and its first and last bytes: a copy or a re-export under the
# same name has another size or other bytes there (a video's first frames sit in its head, MP4's
# index in its head or tail), and reading whole multi-gigabyte clips would cost minutes.
FINGERPRINT_EDGE = 1 << 20


def file_fingerprint(path: str | os.PathLike, edge: int = FINGERPRINT_EDGE) -> str:
    """A short hash of the file's size and its first and last ``edge`` bytes (all of a small file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        digest.update(str(size).encode())
        digest.update(handle.read(edge))
        if size > 2 * edge:
            handle.seek(size - edge)
        digest.update(handle.read(edge))
    return digest.hexdigest()[:20]


def files_fingerprint(paths: list[Path], edge: int = 64 << 10) -> str:
    """One hash for a folder's frames: their names, in order, and each file's fingerprint (64 KiB
    each end: a folder of thousands of 4K frames is hashed in seconds)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + file_fingerprint(path, edge).encode())
    return digest.hexdigest()[:20]


def source_fingerprint(source) -> str:
    """A file by its fingerprint; an image given in memory (PIL image or tensor) by its pixels."""
    if isinstance(source, (str, os.PathLike)):
        return file_fingerprint(source)
    from .images import load_image  # late: images pulls in torch and Pillow, a file hash needs neither

    image = load_image(source)
    return hashlib.sha256(image.tobytes() + repr(image.size).encode()).hexdigest()[:20]


def pixel_options(config: StyleConfig, extra: dict | None = None) -> dict:
    """Every option of ``config`` that changes the result's pixels (the schedule and the objective,
    and the output's bit depth), as JSON values, with ``extra`` (a front end's own options)."""
    options = {**dataclasses.asdict(config.part(ScheduleOptions)), **dataclasses.asdict(config.part(ObjectiveOptions)),
               "output_16bit": config.output_16bit, **(extra or {})}
    return json.loads(json.dumps(options, default=str))


def first_difference(old: dict | None, new: dict) -> str | None:
    """The first thing that differs between two recipes, in words for a one-line message (None: the
    same).  A recipe is {"input": ..., "styles": [...], "init": ..., "options": {...}}, any key
    optional.  An option the old recipe lacks counts as at its default, which is what a recipe
    written before the option existed was rendered with (--resample came after recipes)."""
    if not isinstance(old, dict):
        return "an unreadable record"
    if old.get("input") != new.get("input"):
        return "another input (its content differs)"
    if old.get("styles") != new.get("styles"):
        return "other style images"
    if old.get("init") != new.get("init"):
        return "another --init image"
    defaults = pixel_options(StyleConfig())
    before = {**{name: value for name, value in defaults.items() if name in new.get("options", {})},
              **old.get("options", {})}
    after = new.get("options", {})
    for name in [*after, *(n for n in before if n not in after)]:
        if before.get(name, "absent") != after.get(name, "absent"):
            shown = ["default" if v is None else v for v in (before.get(name, "absent"), after.get(name, "absent"))]
            return f"{flag_name(name)} {shown[0]} there, {shown[1]} here"
    if {**old, "options": before} != {**new, "options": after}:
        return "another recipe"
    return None
