"""Clips as phones, cameras and screen recorders write them, made with PyAV for the tests, and what a
player would read back from a file (frame times, size, audio start, codecs, colour tags)."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from fastnst.images import load_image, resized

from .conftest import EXAMPLES

MILLISECOND = Fraction(1, 1000)


def _picture(size: tuple[int, int], k: int) -> np.ndarray:
    """Frame k: Tübingen moving 2 px a frame to the right (the flow has something to follow)."""
    width, height = size
    photo = np.asarray(resized(load_image(EXAMPLES / "tubingen.jpg"), 2 * max(width, height)))
    return np.ascontiguousarray(np.roll(photo, 2 * k, axis=1)[:height, :width])


def make_clip(path: Path, *, frames: int = 4, size: tuple[int, int] = (64, 48), rate: int = 12,
              times: list[float] | None = None, start: float = 0.0, audio: str | None = "aac",
              audio_start: float | None = None, layout: str = "mono", audio_rate: int = 44100,
              rotation: int | None = None, container: str | None = None, audio_options: dict | None = None,
              flash: int | None = None) -> Path:
    """A clip of ``frames`` frames of ``size`` at ``rate`` fps, or at ``times`` (seconds: variable
    frame rate), the first at ``start``; an audio stream of codec ``audio`` (None: no audio) from
    ``audio_start`` (default: ``start``) to the video's end, a 440 Hz tone (from frame ``flash``'s
    time on, where ``flash`` is given, and that frame white: a sync mark); a display rotation."""
    av = pytest.importorskip("av")
    times = times if times is not None else [k / rate for k in range(frames)]
    end = times[-1] + 1 / rate
    with av.open(str(path), "w", format=container) as out:
        video = out.add_stream("libx264", rate=rate)
        video.width, video.height, video.pix_fmt = size[0], size[1], "yuv420p"
        video.codec_context.time_base = video.time_base = MILLISECOND
        if rotation is not None:
            if not hasattr(video, "set_display_rotation"):
                pytest.skip(f"PyAV {av.__version__} cannot write a display rotation (PyAV 18 can)")
            video.set_display_rotation(rotation)
        sound = out.add_stream(audio, rate=audio_rate, layout=layout, options=audio_options or {}) if audio else None
        for k, t in enumerate(times):
            picture = np.full((size[1], size[0], 3), 255, np.uint8) if k == flash else _picture(size, k)
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts, frame.time_base = round(Fraction(start + t) / MILLISECOND), MILLISECOND
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        if sound is not None:
            first = start if audio_start is None else audio_start
            _write_tone(av, sound, first, start + end, None if flash is None else start + times[flash], layout,
                        audio_rate)
    return path


def _write_tone(av, stream, first: float, end: float, onset: float | None, layout: str, rate: int) -> None:
    samples = max(int((end - first) * rate), rate // 10)
    clock = np.arange(samples) / rate
    tone = (0.4 * np.sin(2 * np.pi * 440 * clock)).astype(np.float32)
    if onset is not None:
        tone[clock < onset - first] = 0
    channels = len(av.AudioLayout(layout).channels)
    size = stream.codec_context.frame_size or 1024
    for begin in range(0, samples, size):
        chunk = av.AudioFrame.from_ndarray(np.repeat(tone[None, begin:begin + size], channels, 0),
                                           format="fltp", layout=layout)
        chunk.sample_rate, chunk.time_base = rate, Fraction(1, rate)
        chunk.pts = round(first * rate) + begin
        stream.container.mux(stream.encode(chunk))
    stream.container.mux(stream.encode(None))


@dataclass
class Probe:
    """What a player reads from a video file."""

    times: list[float]  # every video frame's presentation time, in order
    size: tuple[int, int]  # (width, height) as displayed: the display rotation applied
    rotation: int
    duration: float  # of the video: last frame's time + its duration, minus the first's time
    video_codec: str
    audio_codecs: list[str]
    audio_layouts: list[str]
    audio_start: float | None  # first decoded audio sample's time
    colour_tags: tuple[int, int, int, int]  # colorspace, primaries, transfer, range (FFmpeg's numbers)

    @property
    def audio_offset(self) -> float | None:
        """Audio start minus video start: what sync is."""
        return None if self.audio_start is None else self.audio_start - self.times[0]


def probe(path: Path) -> Probe:
    av = pytest.importorskip("av")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        context = stream.codec_context
        tags = (int(context.colorspace), int(context.color_primaries), int(context.color_trc),
                int(context.color_range))
        codec, audio = context.name, [(s.codec_context.name, s.layout.name) for s in container.streams.audio]
    last = frames[-1]
    times = [float(f.time) for f in frames]
    ticks = getattr(last, "duration", None)  # PyAV 15 and later
    own = float(ticks * last.time_base) if ticks else times[-1] - times[-2]
    rotation = int(frames[0].rotation or 0)
    width, height = frames[0].width, frames[0].height
    audio_start = None
    if audio:
        with av.open(str(path)) as container:
            audio_start = float(next(container.decode(audio=0)).time)
    return Probe(times, (height, width) if rotation % 180 else (width, height), rotation, times[-1] + own - times[0],
                 codec, [name for name, _ in audio], [layout for _, layout in audio], audio_start, tags)


def sync_offset(path: Path) -> float:
    """The tone's onset minus the white frame's time (the sync mark ``make_clip(flash=...)`` sets)."""
    av = pytest.importorskip("av")
    with av.open(str(path)) as container:
        flash = next(float(f.time) for f in container.decode(video=0) if f.to_ndarray(format="gray").mean() > 200)
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            loud = np.nonzero(np.abs(frame.to_ndarray()).max(0) > 0.2)[0]
            if loud.size:
                return float(frame.time) + loud[0] / frame.sample_rate - flash
    raise AssertionError("no tone")
