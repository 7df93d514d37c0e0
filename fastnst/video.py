"""``fastnst video``: stylised video frames that do not flicker (Ruder, Dosovitskiy & Brox, GCPR 2016).

Frames are read one at a time (PyAV for video files, or a folder of images), stylised in order and
written as numbered PNG frames into a work folder with a manifest, then, for a video output,
encoded with the input's frame rate and its audio copied.  Frame i starts from frame i-1's result
warped along the optical flow, and temporal terms hold it to the warped results of frames i-j
(``--temporal-frames``, default 1) where the flow can be trusted; ``--temporal-weight 0`` renders
independent frames.  Flow (OpenCV's DIS on the CPU, or RAFT on the device) for the next frame is
computed in a thread while the current one renders.  Each frame is one run of the run builder
(``run.build_run``), so every stylize option that applies to one image applies here (weights,
presets, colour control, tiles); multi-scale schedules do not.  A rerun skips the frames the
manifest lists; Ctrl-C keeps them.  ``--mode multipass`` (``_render_multipass``) instead renders
windows of frames as batches and then passes over the clip that pull neighbours together.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from . import color, flow
from .config import ObjectiveOptions, ScheduleOptions, StyleConfig, VideoConfig, default_temporal_weight
from .errors import ConfigError, FastNSTError, ImageError
from .files import atomic_write
from .images import image_to_tensor, load_image, resized, save_image
from .loop import Hooks
from .measure import auto_tile, free_bytes
from .objective import TemporalTarget, check_fits, feature_layers
from .run import Inputs, Runtime, build_run, calibrate, initial_image, resolve_runtime

# Output extensions written as video files, and the encoder each uses (all in PyAV's wheels).
VIDEO_CODECS = {".mp4": "libx264", ".m4v": "libx264", ".mov": "libx264", ".mkv": "libx264",
                ".webm": "libvpx-vp9", ".avi": "mpeg4"}
# Audio codec for a container that cannot hold the input's audio as it is (WebM: Opus or Vorbis;
# AAC for the others).
AUDIO_CODECS = {".webm": "libopus"}
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
FOLDER_RATE = Fraction(25)  # frames per second of a folder of frames unless --fps says otherwise
MANIFEST = "manifest.jsonl"
RECIPE = "command.json"  # what the work folder's frames are of (_recipe)


def _av():
    try:
        import av
    except ImportError:
        raise ConfigError("video files need PyAV: pip install av (or pip install 'fastnst[video]'), "
                          "or give a folder of frames") from None
    return av


@dataclass
class Clip:
    """The frames of INPUT, read lazily: a video file's first video stream, or a folder's images."""

    path: Path
    rate: Fraction
    files: list[Path] | None = None  # a folder's frames, in order

    @property
    def count(self) -> int | None:
        if self.files is not None:
            return len(self.files)
        with _av().open(str(self.path)) as container:
            frames = container.streams.video[0].frames
        return frames or None

    def frames(self) -> Iterator[Image.Image]:
        if self.files is not None:
            for path in self.files:
                yield load_image(path)
            return
        av = _av()
        with av.open(str(self.path)) as container:
            decoded, number = container.decode(video=0), 0
            while True:
                number += 1
                try:
                    frame = next(decoded, None)
                except av.error.FFmpegError as exc:  # damaged data mid-stream: the user's input, one line
                    raise ImageError(f"frame {number} of '{self.path}' cannot be decoded "
                                     f"({exc.strerror or exc})") from None
                if frame is None:
                    return
                yield frame.to_image().convert("RGB")


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def open_clip(path: str | Path, fps: float | None) -> Clip:
    """The clip at ``path``; InputError-like ImageError for what cannot be read, in one line."""
    path = Path(path)
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS), key=_natural_key)
        if not files:
            raise ImageError(f"'{path}' holds no frames ({', '.join(FRAME_EXTENSIONS)})")
        return Clip(path, Fraction(fps).limit_denominator(1001) if fps else FOLDER_RATE, files)
    if not path.exists():
        raise ImageError(f"'{path}': no such file or folder")
    av = _av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ImageError(f"'{path}' has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or FOLDER_RATE
    except av.error.FFmpegError as exc:
        raise ImageError(f"'{path}' is not a video file FFmpeg can read ({exc.strerror or exc})") from None
    return Clip(path, Fraction(fps).limit_denominator(1001) if fps else Fraction(rate))


def is_video_path(output: str | Path) -> bool:
    return Path(output).suffix.lower() in VIDEO_CODECS


def work_folder(output: str | Path) -> Path:
    """Where the frames and the manifest go: OUTPUT itself for frames, OUTPUT.frames for a video."""
    output = Path(output)
    return output.with_name(output.name + ".frames") if is_video_path(output) else output


@dataclass
class VideoSummary:
    frames: int = 0  # frames in the clip seen so far
    rendered: int = 0
    skipped: int = 0  # already in the manifest
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
                 flow_function: FlowFunction | None = None) -> VideoSummary:
    """Stylise every frame of ``source`` into ``output`` (module docstring).  ``flow_function``
    replaces --flow (benchmarks with a known motion, where neither OpenCV nor RAFT is at hand)."""
    clip = open_clip(source, settings.fps)
    style_images = [load_image(s) for s in styles]
    folder = work_folder(output)
    folder.mkdir(parents=True, exist_ok=True)
    _claim(folder, _recipe(clip, style_images, config, settings), settings.force)
    runtime = runtime or resolve_runtime(config)
    settings = _with_temporal_weight(settings, config, runtime)
    between = flow_function or functools.partial(flow.optical_flow, method=settings.flow, device=runtime.device)
    if settings.mode == "multipass":
        return _render_multipass(clip, source, style_images, Path(output), folder, config, settings, should_stop,
                                 progress, runtime, between)
    done = _done(folder)
    layers = feature_layers(config)
    # Flow to the previous frame is always computed: the consistency metric needs it, also for
    # independent frames (--temporal-weight 0), against which the temporal term is judged.
    offsets = tuple(sorted(set(settings.temporal_frames) | {1})) if settings.temporal_weight else (1,)
    flows = _Flows(offsets, between)
    contents: dict[int, torch.Tensor] = {}  # original content frames kept for the flows
    outputs: dict[int, torch.Tensor] = {}  # stylised frames kept for the warps
    summary, size, started = VideoSummary(temporal_weight=settings.temporal_weight), None, time.perf_counter()
    keep = max(offsets, default=1)
    frames = clip.frames()
    bar = tqdm(total=clip.count, unit="frame", desc="video", disable=not progress, dynamic_ncols=True)
    try:
        current = next(frames, None)
        index, pending = 0, None
        while current is not None:
            if should_stop():
                summary.interrupted = True
                break
            frame = resized(current, config.size)
            if size is None:
                size = frame.size
                check_fits(frame, layers, "video frame")
                scaled_styles = [resized(s, max(1, round(config.size * config.style_scale))) for s in style_images]
                for image in scaled_styles:
                    check_fits(image, layers, "style image")
                tile = _tile(runtime, config, size)
            elif frame.size != size:
                raise ImageError(f"frame {index + 1} of '{source}' is {current.size[0]}x{current.size[1]} px; "
                                 f"the first was another size (every frame must have the first's size)")
            content = image_to_tensor(frame)
            contents[index] = content
            if pending is None:
                pending = flows.submit(contents, index, content)
            upcoming = next(frames, None)
            next_pending = None
            if upcoming is not None and upcoming.size == current.size:  # same size in, same size out
                ahead = image_to_tensor(resized(upcoming, config.size))
                next_pending = flows.submit({**contents, index + 1: ahead}, index + 1, ahead)
            frame_flows = pending.result()
            if index in done:
                outputs[index] = image_to_tensor(Image.open(folder / done[index]["file"]).convert("RGB"))
                summary.skipped += 1
            else:
                outputs[index] = _render_frame(runtime, config, content, scaled_styles,
                                               frame_flows if settings.temporal_weight else {}, outputs,
                                               index, settings.temporal_weight, tile)
                _write_frame(folder, index, outputs, frame_flows.get(1), summary)
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
    if not summary.interrupted and is_video_path(output):
        encode(folder, summary.frames, clip, Path(output))
    return summary


def _recipe(clip: Clip, style_images: list[Image.Image], config: StyleConfig, settings: VideoConfig) -> dict:
    """What the frames in a work folder are of: the input, the style images' pixels, and every
    option that changes a frame (not the device, precision or kernels, which may change between
    a run and its resumption, nor --fps or --force)."""
    options = {**dataclasses.asdict(config.part(ScheduleOptions)), **dataclasses.asdict(config.part(ObjectiveOptions)),
               **{k: v for k, v in dataclasses.asdict(settings).items() if k not in ("fps", "force")}}
    styles = [hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()[:16] for image in style_images]
    return {"input": str(clip.path.resolve()), "styles": styles,
            "options": json.loads(json.dumps(options, default=str))}


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
        if old != recipe:
            raise ConfigError(f"'{folder}' holds the frames of another command ({_difference(old, recipe)}); "
                              f"rerun with --force to render them again, or give another -o")
    elif any(folder.glob("frame_*.png")):
        raise ConfigError(f"'{folder}' already holds frames that no fastnst video command claims; "
                          f"rerun with --force to replace them, or give another -o")
    atomic_write(path, lambda stream: stream.write(json.dumps(recipe, indent=1).encode()), error=FastNSTError)


def _clear(folder: Path) -> None:
    """Remove what fastnst video writes into a work folder (and nothing else)."""
    for path in [folder / MANIFEST, folder / RECIPE, *folder.glob("frame_*.png")]:
        path.unlink(missing_ok=True)
    for sub in [folder / "content", folder / "flows", *folder.glob("pass[0-9]*")]:
        if sub.is_dir():
            for item in sub.glob("*.pt"):
                item.unlink()


def _difference(old: dict | None, new: dict) -> str:
    """The first thing that differs between two recipes, for the error message."""
    if not isinstance(old, dict):
        return f"its {RECIPE} cannot be read"
    if old.get("input") != new["input"]:
        return f"input {old.get('input')}"
    if old.get("styles") != new["styles"]:
        return "other style images"
    before = old.get("options", {})
    for name, value in new["options"].items():
        if before.get(name) != value:
            shown = ["default" if v is None else v for v in (before.get(name), value)]
            return f"--{name.replace('_', '-')} {shown[0]} there, {shown[1]} here"
    return "other options"


def _with_temporal_weight(settings: VideoConfig, config: StyleConfig, runtime: Runtime) -> VideoConfig:
    """``settings`` with --temporal-weight resolved: when not given, the default for the network's
    weights format and the style loss (config.default_temporal_weight)."""
    if settings.temporal_weight is not None:
        return settings
    return dataclasses.replace(settings,
                               temporal_weight=default_temporal_weight(config.style_loss, runtime.weights_format))


def _write_frame(folder: Path, index: int, outputs: dict[int, torch.Tensor], to_previous: tuple | None,
                 summary: VideoSummary) -> None:
    """Save a finished frame (atomically), then append its manifest line with its consistency
    error against the previous frame (``to_previous``: their ``_motion``): the line is the record
    that the frame is done."""
    record = {"frame": index, "file": _frame_name(index)}
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


def encode(folder: Path, count: int, clip: Clip, output: Path) -> None:
    """The frames of ``folder`` as ``output`` (its extension's codec, the clip's frame rate), with
    the clip's audio streams copied (``_audio_stream``); written next to ``output`` and renamed
    into place."""
    av = _av()

    def write(stream) -> None:
        with av.open(stream, "w", format=_container_format(output)) as out:
            video = out.add_stream(VIDEO_CODECS[output.suffix.lower()], rate=clip.rate)
            with Image.open(folder / _frame_name(0)) as first:  # yuv420p needs even sides
                video.width, video.height = first.size[0] // 2 * 2, first.size[1] // 2 * 2
            video.pix_fmt = "yuv420p"
            audio_in = None
            if clip.files is None:
                audio_in = av.open(str(clip.path))
                audio = {s.index: _audio_stream(out, s, output) for s in audio_in.streams.audio}
            for index in range(count):
                with Image.open(folder / _frame_name(index)) as image:
                    picture = image.convert("RGB").crop((0, 0, video.width, video.height))
                for packet in video.encode(av.VideoFrame.from_image(picture)):
                    out.mux(packet)
            for packet in video.encode():
                out.mux(packet)
            if audio_in is not None:
                for packet in audio_in.demux(*audio_in.streams.audio):
                    if packet.dts is None:  # a stream's flush marker: encoders are flushed below
                        continue
                    target, copied = audio[packet.stream.index]
                    if copied:
                        packet.stream = target
                        out.mux(packet)
                        continue
                    for samples in packet.decode():
                        samples.pts = None  # the encoder counts its own (resampled) samples
                        out.mux(target.encode(samples))
                for target, copied in audio.values():
                    if not copied:
                        out.mux(target.encode(None))
                audio_in.close()

    atomic_write(output, write, error=FastNSTError)


def _audio_stream(out, source, output: Path) -> tuple[object, bool]:
    """``source``'s audio stream in ``out``: (stream, True) a copy of its packets where the
    container takes the codec, else (stream, False) to re-encode into (Opus for WebM, AAC
    elsewhere; Opus runs at 48 kHz, the encoder resamples)."""
    try:
        return out.add_stream_from_template(source), True
    except ValueError:  # PyAV: "'webm' format does not support 'aac' codec"
        codec = AUDIO_CODECS.get(output.suffix.lower(), "aac")
        rate = 48000 if codec == "libopus" else source.rate
        return out.add_stream(codec, rate=rate, layout=source.layout.name), False


def _container_format(output: Path) -> str:
    return {".mkv": "matroska", ".m4v": "mp4", ".mov": "mov", ".webm": "webm", ".avi": "avi"}.get(
        output.suffix.lower(), "mp4")


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


def _save_tensor(image: torch.Tensor, path: Path) -> None:
    atomic_write(path, lambda stream: torch.save(image.detach().cpu().to(torch.float16).clone(), stream),
                 error=FastNSTError)


def _load_tensor(path: Path) -> torch.Tensor:
    return torch.load(path, map_location="cpu", weights_only=True).float()


def _render_multipass(clip: Clip, source, style_images: list, output: Path, folder: Path, config: StyleConfig,
                      settings: VideoConfig, should_stop: Callable[[], bool], progress: bool,
                      runtime: Runtime, between: FlowFunction) -> VideoSummary:
    """Ruder et al.'s multi-pass scheme, batched: the first pass renders every frame independently,
    a window of ``--window`` frames per batch; each later pass, alternating forward and backward,
    starts every frame from a blend of its own last result and its pass-direction neighbour's last
    result warped onto it (where the flow is trusted) and holds it to that warped neighbour.  Within
    a pass the frames of a window use the previous pass's neighbours, so they are independent and
    run as one batch (Jacobi-style; Ruder et al. go frame by frame).  Results of every pass are kept
    as fp16 tensors in the work folder, so a rerun resumes at the first unfinished (pass, window)."""
    layers = feature_layers(config)
    summary, started = VideoSummary(temporal_weight=settings.temporal_weight), time.perf_counter()
    contents_folder = folder / "content"
    contents_folder.mkdir(exist_ok=True)
    size = None
    for index, image in enumerate(clip.frames()):  # the content frames, resized, once
        frame = resized(image, config.size)
        if size is None:
            size = frame.size
            check_fits(frame, layers, "video frame")
        elif frame.size != size:
            raise ImageError(f"frame {index + 1} of '{source}' is {image.size[0]}x{image.size[1]} px; the first "
                             f"was another size (every frame must have the first's size)")
        path = contents_folder / f"{index:06d}.pt"
        if not path.exists():
            _save_tensor(image_to_tensor(frame), path)
        summary.frames = index + 1
    count = summary.frames
    scaled_styles = [resized(s, max(1, round(config.size * config.style_scale))) for s in style_images]
    for image in scaled_styles:
        check_fits(image, layers, "style image")
    tile = _tile(runtime, config, size)
    iterations = _pass_iterations(config, settings.passes if settings.temporal_weight else 0)  # 0: independent
    content = lambda i: _load_tensor(contents_folder / f"{i:06d}.pt")  # noqa: E731
    motion = _motion_cache(folder / "flows", between, content)
    result_path = lambda p, i: folder / f"pass{p}" / f"{i:06d}.pt"  # noqa: E731
    windows = [list(range(start, min(start + settings.window, count))) for start in range(0, count, settings.window)]
    bar = tqdm(total=len(iterations) * count, unit="frame", desc="video (passes)", disable=not progress,
               dynamic_ncols=True)
    try:
        for p, steps in enumerate(iterations):
            (folder / f"pass{p}").mkdir(exist_ok=True)
            direction = 1 if p % 2 else -1  # pass 1 forward (neighbour i - 1), pass 2 backward, ...
            for window in windows:
                if should_stop():
                    summary.interrupted = True
                    return summary
                if all(result_path(p, i).exists() for i in window):
                    summary.skipped += len(window) if p == len(iterations) - 1 else 0
                    bar.update(len(window))
                    continue
                starts, temporal = None, ()
                if p > 0:
                    starts, temporal = _pass_inputs(window, direction, count,
                                                    lambda i: _load_tensor(result_path(p - 1, i)), settings,
                                                    config.preserve_color, motion)
                results = _render_window(runtime, config, [content(i) for i in window], scaled_styles,
                                         starts, temporal, steps, tile)
                for i, image in zip(window, results):
                    _save_tensor(image, result_path(p, i))
                summary.rendered += len(window) if p == len(iterations) - 1 else 0
                bar.update(len(window))
    finally:
        bar.close()
    last = len(iterations) - 1
    records, previous = [], None
    for i in range(count):  # the final frames, their consistency, the manifest
        image = _load_tensor(result_path(last, i))
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
    summary.seconds = time.perf_counter() - started
    if is_video_path(output):
        encode(folder, count, clip, output)
    return summary


def _motion_cache(folder: Path, between: FlowFunction,
                  content: Callable[[int], torch.Tensor]) -> Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """``motion(i, n)``: the ``_motion`` from frame i to frame n, computed once for the clip and kept
    in ``folder`` (every pass, and the final consistency, needs the same pairs again)."""
    folder.mkdir(exist_ok=True)

    def motion(i: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = folder / f"{i:06d}-{n:06d}.pt"
        if path.exists():
            return tuple(torch.load(path, map_location="cpu", weights_only=True))  # type: ignore[return-value]
        result = _motion(between, content(i), content(n))
        atomic_write(path, lambda stream: torch.save(result, stream), error=FastNSTError)
        return result

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
