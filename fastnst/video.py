"""``fastnst video``: stylised video frames that do not flicker (Ruder, Dosovitskiy & Brox, GCPR 2016).

Frames are read one at a time (``clip.py``: upright, in RGB, each with its time), stylised in order
and written as numbered PNG frames into a work folder with a manifest, then, for a video output,
encoded at their own times with the input's audio (``encoder.py``; the audio is written into the
work folder before the first frame is rendered, so no audio problem surfaces after the render).
Frame i starts from frame i-1's result warped along the optical flow, and temporal terms hold it
to the warped results of frames i-j (``--temporal-frames``, default 1) where the flow can be
trusted; ``--temporal-weight 0`` renders independent frames.  Flow (OpenCV's DIS on the CPU, or
RAFT on the device) for the next frame is computed in a thread while the current one renders.
Each frame is one run of the run builder (``run.build_run``), so every stylize option that
applies to one image applies here (weights, presets, colour control, tiles); multi-scale
schedules do not.  The work folder belongs to one command (``command.json``, ``recipe.py``): a
rerun of it skips the frames the manifest lists, another command is refused; Ctrl-C keeps them.
``--mode multipass`` (``_render_multipass``) instead renders windows of frames as batches and then
passes over the clip that pull neighbours together.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from . import color, flow
from .clip import Clip, open_clip
from .config import INITS, StyleConfig, VideoConfig, default_temporal_weight
from .encoder import VIDEO_CODECS, Shown, audio_track_path, encode, plan_audio, write_audio_track
from .errors import ConfigError, FastNSTError
from .files import atomic_write
from .images import fitted_size, image_to_tensor, load_image, resized, resized_style, save_image
from .loop import Hooks
from .measure import auto_tile, free_bytes
from .objective import TemporalTarget, check_fits, feature_layers
from .recipe import first_difference, pixel_options, source_fingerprint
from .run import Inputs, Runtime, build_run, calibrate, initial_image, resolve_runtime

MANIFEST = "manifest.jsonl"
RECIPE = "command.json"  # what the work folder's frames are of (_recipe)
# Bytes per frame pixel the work folder holds at most, by mode (the disk check before any work):
# a PNG frame (at most 3); multipass adds the content frame (uint8, 3), the flows to both
# neighbours (fp16 flow and a byte mask, 2 x 5) and two passes' results (fp16, 2 x 6), the
# only passes kept (a pass's results go once the next pass is complete).
WORK_BYTES_PER_PIXEL = {"sequential": 3, "multipass": 3 + 3 + 10 + 12}


def is_video_path(output: str | Path) -> bool:
    return Path(output).suffix.lower() in VIDEO_CODECS


def work_folder(output: str | Path) -> Path:
    """Where the frames and the manifest go: OUTPUT itself for frames, OUTPUT.frames for a video."""
    output = Path(output)
    return output.with_name(output.name + ".frames") if is_video_path(output) else output


@dataclass
class VideoSummary:
    frames: int = 0  # frames in the clip seen so far
    rendered: int = 0  # units (below) rendered by this run
    skipped: int = 0  # units finished by an earlier run
    unit: str = "frames"  # what rendered and skipped count: frames, or with multipass frame passes
    interrupted: bool = False
    seconds: float = 0.0
    consistency: list[float] = field(default_factory=list)  # per frame after the first
    temporal_weight: float = 0.0  # the one used: --temporal-weight or the weights format's default

    @property
    def mean_consistency(self) -> float | None:
        return sum(self.consistency) / len(self.consistency) if self.consistency else None


def _frame_name(index: int) -> str:
    return f"frame_{index + 1:06d}.png"


def _done(folder: Path) -> dict[int, dict]:
    """Frames the manifest lists whose file exists (index -> record)."""
    done = {}
    manifest = folder / MANIFEST
    if manifest.exists():
        for line in manifest.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: that frame is rendered again
            if (folder / record.get("file", "")).exists():
                done[int(record["frame"])] = record
    return done


FlowFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _motion(between: FlowFunction, now: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flow from frame ``now`` to frame ``other``, (H, W) mask of the pixels of ``now`` that the
    warp from ``other`` gets right): what a temporal target and the consistency metric need."""
    forward, backward = between(other, now), between(now, other)
    return backward, flow.consistency_mask(forward, backward)


class _Flows:
    """The motion (``_motion``) between the current content frame and the earlier ones, computed
    one frame ahead in a thread (DIS runs on the CPU while the device renders; RAFT queues behind
    the step on the GPU)."""

    def __init__(self, offsets: tuple[int, ...], between: FlowFunction):
        self.offsets, self.between = offsets, between
        self.pool = ThreadPoolExecutor(max_workers=1)

    def submit(self, history: dict[int, torch.Tensor], index: int, content: torch.Tensor):
        pairs = {j: history[index - j] for j in self.offsets if index - j in history}
        return self.pool.submit(lambda: {j: _motion(self.between, content, earlier) for j, earlier in pairs.items()})

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _temporal_targets(motions: dict, outputs: dict[int, torch.Tensor], index: int, weight: float,
                      device: torch.device, preserve_color: str) -> tuple[TemporalTarget, ...]:
    """The temporal targets of frame ``index`` from its motion to each earlier frame (offset ->
    ``_motion``), long-term masks made disjoint (Ruder et al. eq. 6: a pixel counts for the
    nearest earlier frame that sees it)."""
    targets, covered = [], None
    for j in sorted(motions):
        backward, mask = motions[j]
        own = mask if covered is None else (mask - covered).clamp(min=0)
        covered = mask if covered is None else (covered + mask).clamp(max=1)
        warped = flow.warp(outputs[index - j].to(device), backward.to(device))
        if preserve_color == "luminance":
            warped = color.luminance_image(warped)
        targets.append(TemporalTarget(warped, own.to(device)[None, None], weight))
    return tuple(targets)


def render_video(source: str | Path, styles: list, output: str | Path, config: StyleConfig,
                 settings: VideoConfig, *, should_stop: Callable[[], bool] = lambda: False,
                 progress: bool = True, runtime: Runtime | None = None,
                 flow_function: FlowFunction | None = None,
                 notify: Callable[[str], None] | None = None) -> VideoSummary:
    """Stylise every frame of ``source`` into ``output`` (module docstring).  Everything that can
    be checked is checked before the first frame renders (``_prepare``).  ``flow_function``
    replaces --flow (benchmarks with a known motion, where neither OpenCV nor RAFT is at hand);
    ``notify`` receives one-line warnings (by default the ``fastnst`` logger's)."""
    notify = notify or logging.getLogger("fastnst").warning
    output = Path(output)
    clip, style_images, folder, audio = _prepare(source, styles, output, config, settings, notify)
    runtime = runtime or resolve_runtime(config)
    settings = _with_temporal_weight(settings, config, runtime)
    between = flow_function or functools.partial(flow.optical_flow, method=settings.flow, device=runtime.device)
    render = _render_multipass if settings.mode == "multipass" else _render_sequential
    summary, shown = render(clip, style_images, folder, config, settings, should_stop, progress, runtime, between)
    if not summary.interrupted and is_video_path(output):
        encode(shown, clip, output, audio, progress=progress)
    return summary


def _prepare(source, styles: list, output: Path, config: StyleConfig, settings: VideoConfig,
             notify: Callable[[str], None]) -> tuple[Clip, list[Image.Image], Path, Path | None]:
    """Open and check everything before any work: the clip (every frame's size, for a folder),
    the styles and the frame size against the layers, that OUTPUT is not the input, how each audio
    stream goes into OUTPUT, the free disk; then claim the work folder for this command and write
    the audio track into it.  (clip, style images at the frames' scale, work folder, audio track or
    None)."""
    clip = open_clip(source, settings.fps)
    folder = work_folder(output)
    _check_not_input(clip.path, output, folder)
    layers = feature_layers(config)
    check_fits(fitted_size(clip.size, config.size), layers, "video frame")
    style_images = [resized_style(load_image(s), config.size, config.style_scale, config.resample)
                    for s in styles]
    for image in style_images:
        check_fits(image, layers, "style image")
    plans = plan_audio(clip, output) if is_video_path(output) else []
    _check_disk(folder, clip, config, settings)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the work folder '{folder}' ({exc.strerror or exc})") from None
    _claim(folder, _recipe(clip, styles, config, settings), settings.force)
    if not plans:
        return clip, style_images, folder, None
    track = audio_track_path(folder, output)
    if not track.exists():
        write_audio_track(clip, plans, track, notify)
    return clip, style_images, folder, track


def _check_not_input(source: Path, output: Path, folder: Path) -> None:
    """OUTPUT (or its work folder) must not be the input: the original would be replaced, or the
    frames written would mix with the input's and be read as frames by the next run."""
    for target in (output, folder):
        if target.exists() and source.exists() and target.resolve() == source.resolve():
            raise ConfigError(f"-o '{output}' would write into the input '{source}' itself; give another output")


def disk_free(folder: Path) -> int:
    """Free bytes on the file system ``folder`` is (or will be) on."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def _check_disk(folder: Path, clip: Clip, config: StyleConfig, settings: VideoConfig) -> None:
    """Refuse before any work when the frames left to render cannot fit the free disk (the work
    folder's bytes per pixel by mode, WORK_BYTES_PER_PIXEL, an upper bound)."""
    if not clip.estimated_count:
        return
    width, height = fitted_size(clip.size, config.size)
    left = max(clip.estimated_count - (0 if settings.force else len(_done(folder))), 0)
    need = left * width * height * WORK_BYTES_PER_PIXEL[settings.mode]
    free = disk_free(folder)
    if need > free:
        raise ConfigError(f"the work folder '{folder}' needs about {need / 1e9:.1f} GB for {left} frames of "
                          f"{width}x{height} px (--mode {settings.mode}); {free / 1e9:.1f} GB are free there")


def _render_sequential(clip: Clip, style_images: list, folder: Path, config: StyleConfig, settings: VideoConfig,
                       should_stop: Callable[[], bool], progress: bool, runtime: Runtime,
                       between: FlowFunction) -> tuple[VideoSummary, list[Shown]]:
    """Frame after frame, each held to the earlier results warped onto it; (summary, the frames as
    the video shows them)."""
    done = _done(folder)
    # Flow to the previous frame is always computed: the consistency metric needs it, also for
    # independent frames (--temporal-weight 0), against which the temporal term is judged.
    offsets = tuple(sorted(set(settings.temporal_frames) | {1})) if settings.temporal_weight else (1,)
    flows = _Flows(offsets, between)
    contents: dict[int, torch.Tensor] = {}  # original content frames kept for the flows
    outputs: dict[int, torch.Tensor] = {}  # stylised frames kept for the warps
    summary, started = VideoSummary(temporal_weight=settings.temporal_weight), time.perf_counter()
    shown: list[Shown] = []
    keep = max(offsets, default=1)
    tile = _tile(runtime, config, fitted_size(clip.size, config.size))
    frames = clip.frames()
    bar = tqdm(total=clip.estimated_count, unit="frame", desc="video", disable=not progress, dynamic_ncols=True)
    try:
        current = next(frames, None)
        index, pending = 0, None
        while current is not None:
            if should_stop():
                summary.interrupted = True
                break
            content = image_to_tensor(resized(current.image, config.size, config.resample))
            contents[index] = content
            if pending is None:
                pending = flows.submit(contents, index, content)
            upcoming = next(frames, None)
            next_pending = None
            if upcoming is not None:
                ahead = image_to_tensor(resized(upcoming.image, config.size, config.resample))
                next_pending = flows.submit({**contents, index + 1: ahead}, index + 1, ahead)
            frame_flows = pending.result()
            if index in done:
                outputs[index] = image_to_tensor(Image.open(folder / done[index]["file"]).convert("RGB"))
                summary.skipped += 1
            else:
                outputs[index] = _render_frame(runtime, config, content, style_images,
                                               frame_flows if settings.temporal_weight else {}, outputs,
                                               index, settings.temporal_weight, tile)
                _write_frame(folder, index, current.time, outputs, frame_flows.get(1), summary)
            shown.append(Shown(folder / _frame_name(index), current.time, current.duration))
            summary.frames += 1
            bar.update(1)
            for old in [k for k in contents if k <= index - keep]:
                contents.pop(old, None)
                outputs.pop(old, None)
            current, pending, index = upcoming, next_pending, index + 1
    finally:
        bar.close()
        flows.close()
    summary.seconds = time.perf_counter() - started
    return summary, shown


def _recipe(clip: Clip, styles: list, config: StyleConfig, settings: VideoConfig) -> dict:
    """What the frames in a work folder are of (recipe.py): the input and the style images by
    content, and every option that changes a frame (not the device, precision or kernels, which
    may change between a run and its resumption, nor --force; --fps for a folder of frames only
    sets the video's rate, for a video file it chooses the frames)."""
    own = {k: v for k, v in dataclasses.asdict(settings).items()
           if k != "force" and not (k == "fps" and clip.files is not None)}
    recipe = {"input": clip.fingerprint, "styles": [source_fingerprint(s) for s in styles],
              "options": pixel_options(config, own)}
    if config.init not in INITS:
        recipe["init"] = source_fingerprint(config.init)
    return recipe


def _claim(folder: Path, recipe: dict, force: bool) -> None:
    """Make the work folder this command's: a rerun of the same command resumes, another command
    (other input, styles or options) is refused rather than mixing its frames with the old ones,
    and --force takes the folder over: what earlier commands left in it is removed first, so an
    interrupted forced run cannot resume onto older frames."""
    if force:
        _clear(folder)
    path = folder / RECIPE
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None  # unreadable: written by nothing we know; the frames cannot be trusted
        difference = first_difference(old, recipe)
        if difference is not None:
            raise ConfigError(f"'{folder}' holds the frames of another command ({difference}); "
                              f"rerun with --force to render them again, or give another -o")
    elif any(folder.glob("frame_*.png")):
        raise ConfigError(f"'{folder}' already holds frames that no fastnst video command claims; "
                          f"rerun with --force to replace them, or give another -o")
    atomic_write(path, lambda stream: stream.write(json.dumps(recipe, indent=1).encode()), error=FastNSTError)


def _clear(folder: Path) -> None:
    """Remove what fastnst video writes into a work folder (and nothing else)."""
    tracks = [audio_track_path(folder, Path(f"output{suffix}")) for suffix in VIDEO_CODECS]
    for path in [folder / MANIFEST, folder / RECIPE, *folder.glob("frame_*.png"), *tracks]:
        path.unlink(missing_ok=True)
    _remove_pass_files(folder)


def _remove_pass_files(folder: Path) -> None:
    """The multipass mode's content frames, flows and pass results (what only its resume needs)."""
    for sub in [folder / "content", folder / "flows", *folder.glob("pass[0-9]*")]:
        _remove_folder_files(sub)


def _remove_folder_files(sub: Path) -> None:
    """A multipass folder's files (tensors and the completion mark), then the folder if empty."""
    if not sub.is_dir():
        return
    for item in [*sub.glob("*.pt"), sub / PASS_COMPLETE]:
        item.unlink(missing_ok=True)
    try:
        sub.rmdir()
    except OSError:
        pass  # something of the user's in it: left as it is


def _with_temporal_weight(settings: VideoConfig, config: StyleConfig, runtime: Runtime) -> VideoConfig:
    """``settings`` with --temporal-weight resolved: when not given, the default for the network's
    weights format and the style loss (config.default_temporal_weight)."""
    if settings.temporal_weight is not None:
        return settings
    return dataclasses.replace(settings,
                               temporal_weight=default_temporal_weight(config.style_loss, runtime.weights_format))


def _write_frame(folder: Path, index: int, time_shown, outputs: dict[int, torch.Tensor], to_previous: tuple | None,
                 summary: VideoSummary) -> None:
    """Save a finished frame (atomically), then append its manifest line with the time it is shown
    (seconds on the clip's timeline) and its consistency error against the previous frame
    (``to_previous``: their ``_motion``): the line is the record that the frame is done."""
    record = {"frame": index, "file": _frame_name(index), "time": float(time_shown)}
    if to_previous is not None:
        backward, mask = to_previous
        error = flow.consistency_error(outputs[index], outputs[index - 1], backward, mask)
        record["consistency"] = round(error, 6)
        summary.consistency.append(error)
    save_image(outputs[index], folder / _frame_name(index))
    with open(folder / MANIFEST, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    summary.rendered += 1


def _tile(runtime: Runtime, config: StyleConfig, size: tuple[int, int]) -> int | None:
    """The frames' tile size: --tile N, or for auto the planner's choice for this frame size (None:
    untiled), decided once for the clip."""
    if config.tile is None:
        return None
    if config.tile != "auto":
        return int(config.tile)
    free = free_bytes(runtime.device)
    width, height = size
    return None if free is None else auto_tile(calibrate(config, runtime.device), height, width, free)


def _render_frame(runtime: Runtime, config: StyleConfig, content: torch.Tensor, styles: list[Image.Image],
                  frame_flows: dict, outputs: dict[int, torch.Tensor], index: int, weight: float,
                  tile: int | None) -> torch.Tensor:
    """One frame: start from the previous result warped (if temporal), temporal targets, optimise
    (a window of one frame)."""
    temporal, start = (), None
    if frame_flows:
        temporal = _temporal_targets(frame_flows, outputs, index, weight, runtime.device, config.preserve_color)
        start = temporal[0].target if 1 in frame_flows else None
    return _render_window(runtime, config, [content], styles, start, temporal, config.iterations, tile)[0]


# --------------------------------------------------------------------------------------------
# Multi-pass: windows of frames optimised as one batch, passes alternating direction


def _pass_iterations(config: StyleConfig, passes: int) -> list[int]:
    """--iterations split over 1 + passes passes, adding up to --iterations: half in the first
    (independent) pass, the rest as evenly as can be over the others, which are at most as many as
    the iterations left (each runs at least one); all in the first when there are no others."""
    first = max(1, config.iterations // 2) if passes else config.iterations
    left = config.iterations - first
    passes = min(passes, left)
    return [first] + [left // passes + (k < left % passes) for k in range(passes)]


PASS_COMPLETE = "complete"  # in a pass folder: every frame of the pass is done


def _save_tensor(image: torch.Tensor, path: Path) -> None:
    """A pass result, in fp16 (the next pass starts from it; 8-bit rounding would show)."""
    atomic_write(path, lambda stream: torch.save(image.detach().cpu().to(torch.float16).clone(), stream),
                 error=FastNSTError)


def _save_content(image: torch.Tensor, path: Path) -> None:
    """A content frame: 8-bit pixels, which is all it holds (image_to_tensor of an 8-bit image)."""
    pixels = image.detach().cpu().mul(255).round().to(torch.uint8).clone()
    atomic_write(path, lambda stream: torch.save(pixels, stream), error=FastNSTError)


def _load_tensor(path: Path) -> torch.Tensor:
    tensor = torch.load(path, map_location="cpu", weights_only=True)
    return tensor.float() / 255 if tensor.dtype == torch.uint8 else tensor.float()


def _content_frames(clip: Clip, folder: Path, config: StyleConfig, save: bool) -> list[Shown]:
    """Read the clip once: the frames as the video shows them, and (``save``) each content frame,
    resized, into the work folder, where every pass reads it."""
    contents_folder, shown = folder / "content", []
    if save:
        contents_folder.mkdir(exist_ok=True)
    for index, frame in enumerate(clip.frames()):
        shown.append(Shown(folder / _frame_name(index), frame.time, frame.duration))
        path = contents_folder / f"{index:06d}.pt"
        if save and not path.exists():
            _save_content(image_to_tensor(resized(frame.image, config.size, config.resample)), path)
    return shown


def _render_multipass(clip: Clip, style_images: list, folder: Path, config: StyleConfig, settings: VideoConfig,
                      should_stop: Callable[[], bool], progress: bool, runtime: Runtime,
                      between: FlowFunction) -> tuple[VideoSummary, list[Shown]]:
    """Ruder et al.'s multi-pass scheme, batched: the first pass renders every frame independently,
    a window of ``--window`` frames per batch; each later pass, alternating forward and backward,
    starts every frame from a blend of its own last result and its pass-direction neighbour's last
    result warped onto it (where the flow is trusted) and holds it to that warped neighbour.  Within
    a pass the frames of a window use the previous pass's neighbours, so they are independent and
    run as one batch (Jacobi-style; Ruder et al. go frame by frame).  The work folder keeps what a
    rerun resumes from: the content frames, the flows, and the results (fp16) of the last complete
    pass and of the one under way; a rerun resumes at the first unfinished (pass, window), and once
    the frames are written all of that is removed.  ``rendered`` and ``skipped`` count frame passes."""
    summary = VideoSummary(temporal_weight=settings.temporal_weight, unit="frame passes")
    started = time.perf_counter()
    iterations = _pass_iterations(config, settings.passes if settings.temporal_weight else 0)  # 0: independent
    complete = (folder / MANIFEST).exists()  # written once, when every frame is done
    shown = _content_frames(clip, folder, config, save=not complete)
    count = summary.frames = len(shown)
    if complete and len(_done(folder)) == count:
        summary.skipped = count * len(iterations)
        return summary, shown
    if complete:  # frames removed since: render again
        (folder / MANIFEST).unlink()
        shown = _content_frames(clip, folder, config, save=True)
    tile = _tile(runtime, config, fitted_size(clip.size, config.size))
    content = lambda i: _load_tensor(folder / "content" / f"{i:06d}.pt")  # noqa: E731
    motion = _motion_cache(folder / "flows", between, content)
    result_path = lambda p, i: folder / f"pass{p}" / f"{i:06d}.pt"  # noqa: E731
    windows = [list(range(start, min(start + settings.window, count))) for start in range(0, count, settings.window)]
    # The last complete pass is the one a rerun continues from (the ones before it are removed).
    first = 1 + max((p for p in range(len(iterations)) if (folder / f"pass{p}" / PASS_COMPLETE).exists()),
                    default=-1)
    summary.skipped = first * count
    bar = tqdm(total=len(iterations) * count, initial=first * count, unit="frame", desc="video (passes)",
               disable=not progress, dynamic_ncols=True)
    try:
        for p in range(first, len(iterations)):
            (folder / f"pass{p}").mkdir(exist_ok=True)
            direction = 1 if p % 2 else -1  # pass 1 forward (neighbour i - 1), pass 2 backward, ...
            for window in windows:
                if should_stop():
                    summary.interrupted = True
                    return summary, shown
                if all(result_path(p, i).exists() for i in window):
                    summary.skipped += len(window)
                    bar.update(len(window))
                    continue
                starts, temporal = None, ()
                if p > 0:
                    starts, temporal = _pass_inputs(window, direction, count,
                                                    lambda i: _load_tensor(result_path(p - 1, i)), settings,
                                                    config.preserve_color, motion)
                results = _render_window(runtime, config, [content(i) for i in window], style_images,
                                         starts, temporal, iterations[p], tile)
                for i, image in zip(window, results):
                    _save_tensor(image, result_path(p, i))
                summary.rendered += len(window)
                bar.update(len(window))
            atomic_write(folder / f"pass{p}" / PASS_COMPLETE, lambda stream: None, error=FastNSTError)
            if p > 0:  # pass p no longer needs the one before it
                _remove_folder_files(folder / f"pass{p - 1}")
    finally:
        bar.close()
    _write_final_frames(folder, len(iterations) - 1, count, motion, summary)
    _remove_pass_files(folder)
    summary.seconds = time.perf_counter() - started
    return summary, shown


def _write_final_frames(folder: Path, last: int, count: int, motion, summary: VideoSummary) -> None:
    """The last pass's results as the frames, their consistency, and the manifest (written once, so
    its presence says the render is complete)."""
    records, previous = [], None
    for i in range(count):
        image = _load_tensor(folder / f"pass{last}" / f"{i:06d}.pt")
        save_image(image, folder / _frame_name(i))
        record = {"frame": i, "file": _frame_name(i), "pass": last}
        if previous is not None:
            backward, mask = motion(i, i - 1)
            error = flow.consistency_error(image, previous, backward, mask)
            record["consistency"] = round(error, 6)
            summary.consistency.append(error)
        records.append(json.dumps(record))
        previous = image
    text = ("\n".join(records) + "\n").encode()
    atomic_write(folder / MANIFEST, lambda stream: stream.write(text), error=FastNSTError)


def _motion_cache(folder: Path, between: FlowFunction,
                  content: Callable[[int], torch.Tensor]) -> Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """``motion(i, n)``: the ``_motion`` from frame i to frame n, computed once for the clip and kept
    in ``folder`` (every pass, and the final consistency, needs the same pairs again): the flow in
    fp16 (1/16 px or finer below 128 px of motion), the 0/1 mask as bytes."""
    folder.mkdir(exist_ok=True)

    def motion(i: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = folder / f"{i:06d}-{n:06d}.pt"
        if not path.exists():
            backward, mask = _motion(between, content(i), content(n))
            kept = (backward.to(torch.float16), mask.to(torch.uint8))
            atomic_write(path, lambda stream: torch.save(kept, stream), error=FastNSTError)
        backward, mask = torch.load(path, map_location="cpu", weights_only=True)
        return backward.float(), mask.float()

    return motion


def _pass_inputs(window: list[int], direction: int, count: int,
                 previous: Callable[[int], torch.Tensor], settings: VideoConfig, preserve_color: str,
                 motion: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]):
    """Starts (B, 3, H, W) and one batched temporal target for a later pass: each frame's last
    result blended half and half with its neighbour's warped onto it where the flow is trusted, and
    the warped neighbour as the target (mask 0 for a frame without a neighbour in this direction)."""
    starts, targets, masks = [], [], []
    for i in window:
        own = previous(i)
        n = i - direction
        if 0 <= n < count:
            backward, mask = motion(i, n)
            mask = mask[None, None]
            warped = flow.warp(previous(n), backward)
        else:
            mask, warped = torch.zeros(1, 1, *own.shape[-2:]), own
        starts.append(mask * (0.5 * own + 0.5 * warped) + (1 - mask) * own)
        targets.append(warped)
        masks.append(mask)
    starts, targets = torch.cat(starts), torch.cat(targets)
    if preserve_color == "luminance":
        starts, targets = color.luminance_image(starts), color.luminance_image(targets)
    return starts, (TemporalTarget(targets, torch.cat(masks), settings.temporal_weight),)


def _render_window(runtime: Runtime, config: StyleConfig, contents: list[torch.Tensor], styles: list[Image.Image],
                   starts: torch.Tensor | None, temporal: tuple, iterations: int,
                   tile: int | None) -> list[torch.Tensor]:
    """A window of frames as one batch (shared styles), each its own sample, from ``starts`` (in the
    space the transfer runs in) or the configured --init; results in output space."""
    device = runtime.device
    originals = torch.cat(contents)
    prepared, style_tensors = color.prepare_inputs(config.preserve_color, originals.to(device),
                                                   [image_to_tensor(s).to(device) for s in styles])
    if starts is None:  # the first pass: each frame from the configured start, as a single render would
        starts = torch.cat([initial_image(config.init, prepared[b:b + 1], style_tensors[0], config.seed,
                                          config.preserve_color) for b in range(len(contents))])
    temporal = tuple(TemporalTarget(t.target.to(device), t.mask.to(device), t.weight) for t in temporal)
    run = build_run(runtime, config, Inputs(content=prepared, styles=style_tensors, start=starts.to(device),
                                             temporal=temporal), tile=tile)
    result = run.optimise(iterations, Hooks(progress=False, report_every=config.report_every))
    finished = color.finish(config.preserve_color, result.image, originals)
    return [finished[b:b + 1] for b in range(len(contents))]
