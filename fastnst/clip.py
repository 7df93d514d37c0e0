"""A clip's frames in, for ``fastnst video``: a video file's first video stream (PyAV) or a folder of
images, one frame at a time, each upright, in RGB and with the time it is shown.

What a phone, a camera or a screen recorder writes is taken as a player shows it:

- **Time.** Every frame keeps its own presentation time (variable frame rate stays variable), on
  the clip's timeline: 0 is the earliest start of the clip's video and audio streams, so a stream
  that starts late (a `.ts` file, an mkv cut from a broadcast) keeps its offset to the audio.
  ``--fps`` on a video file resamples in time: the output has a frame every 1/FPS seconds, each
  the input frame shown at that moment, so the duration and the sync with the audio stay.
- **Rotation.** A display matrix (phones record portrait video as landscape frames plus a
  rotation) is applied, so frames are stylised upright, as EXIF-rotated photos are.
- **Colour.** YUV is converted to RGB with the frame's own matrix and range; an untagged frame
  with the matrix players assume for it (BT.709 for HD, BT.601 below).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from PIL import Image

from .errors import ConfigError, ImageError
from .images import displayed_size, load_image
from .recipe import file_fingerprint, files_fingerprint

FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
FOLDER_RATE = Fraction(25)  # frames per second of a folder of frames unless --fps says otherwise
# FFmpeg's colour tags (AVColorSpace) -> the swscale matrix that converts them; any other tag
# (2: unspecified, the file does not say) gets the one players assume (is_hd).
MATRICES = {1: "itu709", 4: "fcc", 5: "itu601", 6: "smpte170m", 7: "smpte240m", 9: "bt2020", 10: "bt2020"}
COLOR_RANGES = {1: "MPEG", 2: "JPEG"}  # FFmpeg's AVColorRange: limited (16-235), full


def av_module():
    """PyAV, or a one-line error saying how to install it."""
    try:
        import av
    except ImportError:
        raise ConfigError("video files need PyAV: pip install av (or pip install 'fastnst[video]'), "
                          "or give a folder of frames") from None
    return av


def is_hd(width: int, height: int) -> bool:
    """Where players assume BT.709 rather than BT.601 for untagged video (either orientation)."""
    return max(width, height) >= 1280 or min(width, height) >= 720


@dataclass
class Frame:
    image: Image.Image  # upright RGB
    time: Fraction  # seconds on the clip's timeline
    duration: Fraction  # seconds until the next frame (the last frame: its own duration)


@dataclass
class Clip:
    """What ``frames()`` reads, and what the output needs to know of it before the first frame."""

    path: Path
    rate: Fraction  # nominal frames per second of the output: the input's average, --fps, or a folder's
    size: tuple[int, int]  # (width, height) of the frames, upright
    time_base: Fraction  # of the output's video timestamps: the input stream's, or 1 / rate
    fingerprint: str  # the input by content (recipe.py)
    files: list[Path] | None = None  # a folder's frames, in order
    origin: Fraction = Fraction(0)  # input time at the timeline's 0 (the earliest stream start)
    resample: bool = False  # --fps on a video file: a frame every 1 / rate seconds
    estimated_count: int | None = None  # frames to expect (from the header: may be off for some files)
    audio_streams: int = 0

    def frames(self) -> Iterator[Frame]:
        if self.files is not None:
            step = 1 / self.rate
            for k, path in enumerate(self.files):
                yield Frame(load_image(path), k * step, step)
            return
        decoded = self._decoded()
        yield from (_resampled(decoded, self.rate) if self.resample else decoded)

    def _decoded(self) -> Iterator[Frame]:
        """The stream's frames with their times; a frame's duration is known once the next arrives."""
        av = av_module()
        with av.open(str(self.path)) as container:
            stream = container.streams.video[0]
            nominal = 1 / nominal_rate(stream)
            decoded, number, previous, last = container.decode(stream), 0, None, None
            while True:
                number += 1
                try:
                    frame = next(decoded, None)
                except av.error.FFmpegError as exc:  # damaged data mid-stream: the user's input, one line
                    raise ImageError(f"frame {number} of '{self.path}' cannot be decoded "
                                     f"({exc.strerror or exc})") from None
                if frame is None:
                    break
                image = upright_rgb(frame)
                if image.size != self.size:
                    raise ImageError(f"frame {number} of '{self.path}' is {image.size[0]}x{image.size[1]} px, the "
                                     f"first {self.size[0]}x{self.size[1]} (the resolution changes mid-stream)")
                last = input_time(frame, last, nominal)
                time = last - self.origin
                if previous is not None:
                    yield Frame(previous.image, previous.time, time - previous.time)
                ticks = getattr(frame, "duration", None)  # PyAV 15 and later
                own = Fraction(ticks) * frame.time_base if ticks and frame.time_base else nominal
                previous = Frame(image, time, own)
        if previous is not None:
            yield previous


def nominal_rate(stream) -> Fraction:
    """The stream's frame rate as its header states it (MP4's average over frame durations is
    76800/6401 for a 12 fps clip; the guessed rate is 12), or the average where they differ by
    more than 1% (variable frame rate)."""
    average, guessed = (Fraction(r) if r else None for r in (stream.average_rate, stream.guessed_rate))
    if average and guessed and abs(guessed / average - 1) <= Fraction(1, 100):
        return guessed
    return average or guessed or FOLDER_RATE


def input_time(frame, last: Fraction | None, nominal: Fraction) -> Fraction:
    """A decoded frame's time in the input: its timestamp, or one nominal frame after the last
    frame's where it has none or it is not after the last one's (a broken file)."""
    if frame.pts is None or frame.time_base is None:
        return Fraction(0) if last is None else last + nominal
    time = Fraction(frame.pts) * frame.time_base
    return time if last is None or time > last else last + nominal


def _resampled(frames: Iterator[Frame], rate: Fraction) -> Iterator[Frame]:
    """A frame every 1 / rate seconds from the first frame's time to the clip's end, each the input
    frame shown at that moment (the latest that starts at or before it)."""
    step, slot, previous = 1 / rate, None, None
    for frame in frames:
        slot = frame.time if slot is None else slot
        while previous is not None and slot < frame.time:
            yield Frame(previous.image, slot, step)
            slot += step
        previous = frame
    if previous is None:
        return
    end = max(previous.time + previous.duration, slot + step / 2)  # at least one frame
    while slot < end:
        yield Frame(previous.image, slot, step)
        slot += step


def upright_rgb(frame) -> Image.Image:
    """A decoded frame as a player shows it: RGB by its own colour matrix and range (untagged: the
    one players assume), turned by its display matrix."""
    options = {}
    name = frame.format.name
    if "yuv" in name or name.startswith(("nv", "p0", "p2", "p4")):
        # Named explicitly: PyAV before 18 converts with BT.601 whatever the frame's tag says.
        default = "itu709" if is_hd(frame.width, frame.height) else "itu601"
        options["src_colorspace"] = MATRICES.get(int(frame.colorspace), default)
        if int(frame.color_range) in COLOR_RANGES:  # else the format's own (yuvj: full)
            options["src_color_range"] = COLOR_RANGES[int(frame.color_range)]
    image = frame.to_image(**options)
    quarter_turns = round((getattr(frame, "rotation", 0) or 0) / 90) % 4  # counter-clockwise, as FFmpeg's
    if quarter_turns:
        image = image.transpose([None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
                                 Image.Transpose.ROTATE_270][quarter_turns])
    return image


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def frame_files(folder: Path) -> list[Path]:
    """A folder's frames in natural order (frame2 before frame10); hidden files (macOS's ``._*``
    resource forks, editors' ``.*`` files) are not frames."""
    files = [p for p in folder.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS and not p.name.startswith(".")]
    return sorted(files, key=_natural_key)


def _open_folder(path: Path, fps: float | None) -> Clip:
    """Every frame's header is read now: a frame of another size is refused before any work."""
    files = frame_files(path)
    if not files:
        raise ImageError(f"'{path}' holds no frames ({', '.join(FRAME_EXTENSIONS)})")
    size = displayed_size(files[0])
    for number, file in enumerate(files[1:], start=2):
        other = displayed_size(file)
        if other != size:
            raise ImageError(f"frame {number} of '{path}' ({file.name}) is {other[0]}x{other[1]} px, the first "
                             f"{size[0]}x{size[1]} (every frame must have the first's size)")
    rate = Fraction(fps).limit_denominator(1001) if fps else FOLDER_RATE
    return Clip(path, rate, size, 1 / rate, files_fingerprint(files), files=files, estimated_count=len(files))


def open_clip(path: str | Path, fps: float | None) -> Clip:
    """The clip at ``path`` (a video file or a folder of frames); ImageError in one line for what
    cannot be read.  ``fps``: a folder's frame rate, or a video file's resampling rate."""
    path = Path(path)
    if path.is_dir():
        return _open_folder(path, fps)
    if not path.exists():
        raise ImageError(f"'{path}': no such file or folder")
    av = av_module()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ImageError(f"'{path}' has no video stream")
            stream = container.streams.video[0]
            try:
                first = next(container.decode(stream), None)
            except av.error.FFmpegError as exc:
                raise ImageError(f"frame 1 of '{path}' cannot be decoded ({exc.strerror or exc})") from None
            if first is None:
                raise ImageError(f"'{path}' has a video stream without frames")
            size = upright_rgb(first).size
            average = nominal_rate(stream)
            starts = [Fraction(s.start_time) * s.time_base for s in (stream, *container.streams.audio)
                      if s.start_time is not None and s.time_base]
            first_time = input_time(first, None, 1 / average)
            origin = min(starts + [first_time])
            seconds = (Fraction(stream.duration) * stream.time_base if stream.duration and stream.time_base
                       else Fraction(container.duration or 0, 1_000_000))
            audio_streams = len(container.streams.audio)
            frames = stream.frames
            time_base = stream.time_base or 1 / average
    except av.error.FFmpegError as exc:
        raise ImageError(f"'{path}' is not a video file FFmpeg can read ({exc.strerror or exc})") from None
    rate = Fraction(fps).limit_denominator(1001) if fps else average
    count = math.ceil(seconds * rate) if (fps or not frames) and seconds else frames or None
    return Clip(path, rate, size, 1 / rate if fps else Fraction(time_base), file_fingerprint(path), origin=origin,
                resample=bool(fps), estimated_count=count, audio_streams=audio_streams)
