"""Video files out, for ``fastnst video``: the clip's audio as the output will carry it, written
before the first frame is rendered, and the finished frames encoded with it at the end.

The audio is decided and written first (``write_audio_track``, into the work folder, in the
output's own container format), so that no audio question can end a render after hours of work:
each audio stream is copied where the container takes its codec and common players play it there,
and otherwise re-encoded (Opus for WebM, MP3 for AVI, AAC elsewhere), with a channel layout the
encoder accepts (the same channels under the encoder's standard name, else a stereo downmix);
each choice is tried on a scrap container first.  Damaged audio packets are skipped with one
warning: the video is what was paid for.  Timestamps move to the clip's timeline (``clip.py``),
so the audio keeps its offset to the video.

``encode`` writes every frame at its own time (variable frame rate stays variable), converted to
YUV with the matrix it is tagged with (BT.709 for HD, BT.601 below), a frame of odd width or
height padded by repeating its last column or row (4:2:0 needs even sides), and interleaves the
audio track's packets; the file is written next to the output and renamed into place.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .clip import Clip, av_module, is_hd
from .errors import ConfigError, FastNSTError
from .files import atomic_write

# Output extensions written as video files, the encoder each uses (all in PyAV's wheels) and the
# container format.
VIDEO_CODECS = {".mp4": "libx264", ".m4v": "libx264", ".mov": "libx264", ".mkv": "libx264",
                ".webm": "libvpx-vp9", ".avi": "mpeg4"}
CONTAINER_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm", ".avi": "avi"}
# Audio codecs copied as they are into each container: those the container holds and common
# players play there (Vorbis or PCM in MP4 is written by FFmpeg but plays almost nowhere).  None:
# any codec (Matroska).  Every other codec is re-encoded into AUDIO_CODECS' (AAC by default),
# continuous from the timeline's start: silence fills the time before the audio starts (AVI,
# whose audio has no timestamps, keeps the offset to the video that way) and any gap a damaged
# packet leaves.
COPYABLE_AUDIO = {
    ".mp4": {"aac", "mp3", "ac3", "eac3", "alac"},
    ".m4v": {"aac", "mp3", "ac3", "eac3", "alac"},
    ".mov": {"aac", "mp3", "ac3", "eac3", "alac", "pcm_s16le", "pcm_s24le", "pcm_s16be", "pcm_s24be"},
    ".mkv": None,
    ".webm": {"opus", "vorbis"},
    ".avi": set(),  # AVI has no audio timestamps: re-encoded, the audio can start with silence (below)
}
AUDIO_CODECS = {".webm": "libopus", ".avi": "libmp3lame"}
STANDARD_LAYOUTS = {1: "mono", 2: "stereo", 3: "3.0", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}
AUDIO_AHEAD = Fraction(1, 2)  # seconds of audio muxed ahead of each video frame (interleaving)
# FFmpeg's colour tags (AVColorSpace, AVColorPrimaries and AVColorTransferCharacteristic share
# these numbers): 1 = BT.709, 6 = SMPTE 170M (BT.601 525-line); AVColorRange 1 = MPEG (limited).
BT709, SMPTE170M, LIMITED_RANGE = 1, 6, 1


def audio_track_path(folder: Path, output: Path) -> Path:
    """Where the audio goes before the frames are rendered: the work folder, the output's format."""
    return folder / f"audio{output.suffix.lower()}"


@dataclass
class AudioPlan:
    """What becomes of one audio stream of the input."""

    index: int  # the stream's index in the input
    copy: bool
    codec: str | None = None  # the encoder when not copied
    rate: int | None = None
    layout: str | None = None

    def describe(self, source) -> str:
        if self.copy:
            return f"audio stream #{self.index} ({source.codec_context.name}) copied"
        return (f"audio stream #{self.index} ({source.codec_context.name}, {source.layout.name}) re-encoded as "
                f"{self.codec}, {self.layout}, {self.rate} Hz")


def _candidates(source, suffix: str) -> list[AudioPlan]:
    """Plans for one input stream, best first: a copy where the container takes the codec, then
    re-encodings with the stream's layout, the encoder's standard one of that many channels, and
    a stereo downmix."""
    index, name = source.index, source.codec_context.name
    plans = []
    copyable = COPYABLE_AUDIO[suffix]
    if copyable is None or name in copyable:
        plans.append(AudioPlan(index, True))
    codec = AUDIO_CODECS.get(suffix, "aac")
    rates = av_module().Codec(codec, "w").audio_rates
    rate = source.rate if not rates or source.rate in rates else min(rates, key=lambda r: (r < source.rate,
                                                                                          abs(r - source.rate)))
    channels = source.codec_context.channels
    for layout in dict.fromkeys([source.layout.name, STANDARD_LAYOUTS.get(channels), "stereo" if channels > 1
                                 else "mono"]):
        if layout:
            plans.append(AudioPlan(index, False, codec, rate, layout))
    return plans


def _add_stream(out, plan: AudioPlan, source):
    if plan.copy:
        return out.add_stream_from_template(source)
    return out.add_stream(plan.codec, rate=plan.rate, layout=plan.layout)


def _works(plan: AudioPlan, source, container, fmt: str) -> bool:
    """Whether ``plan`` writes: its stream, and a first packet (copied) or a second of silence
    (encoded), muxed into a scrap container of the output's format."""
    av = av_module()
    try:
        with av.open(io.BytesIO(), "w", format=fmt) as out:
            stream = _add_stream(out, plan, source)
            if plan.copy:
                container.seek(0)
                packet = next((p for p in container.demux(source) if p.dts is not None), None)
                if packet is not None:
                    packet.stream = stream
                    out.mux(packet)
            else:
                second = silence("fltp", source.layout.name, source.rate, source.rate)
                second.pts = 0
                out.mux(stream.encode(second))
                out.mux(stream.encode(None))
        return True
    except (av.error.FFmpegError, ValueError, TypeError, NotImplementedError):
        return False


def plan_audio(clip: Clip, output: Path) -> list[AudioPlan]:
    """A working plan for each audio stream of the clip, or a one-line ConfigError naming the
    stream that cannot go into OUTPUT's container (before any frame is rendered)."""
    if clip.files is not None or not clip.audio_streams:
        return []
    av, suffix = av_module(), output.suffix.lower()
    plans = []
    with av.open(str(clip.path)) as container:
        for source in container.streams.audio:
            plan = next((p for p in _candidates(source, suffix) if _works(p, source, container,
                                                                          CONTAINER_FORMATS[suffix])), None)
            if plan is None:
                raise ConfigError(f"audio stream #{source.index} of '{clip.path}' ({source.codec_context.name}, "
                                  f"{source.layout.name}) cannot be written to a {suffix} file; "
                                  f"try -o with .mkv")
            plans.append(plan)
    return plans


def write_audio_track(clip: Clip, plans: list[AudioPlan], destination: Path, warn: Callable[[str], None]) -> None:
    """The clip's audio streams, as ``plans`` say, on the clip's timeline, into ``destination`` (a
    file of the output's container format); damaged packets are skipped with one warning each stream."""
    av = av_module()
    fmt = CONTAINER_FORMATS[destination.suffix.lower()]

    def write(stream) -> None:
        with av.open(str(clip.path)) as container, av.open(stream, "w", format=fmt) as out:
            sources = {p.index: container.streams[p.index] for p in plans}
            targets = {p.index: _add_stream(out, p, sources[p.index]) for p in plans}
            skipped = dict.fromkeys(sources, 0)
            encoders = {p.index: _Reencoded(targets[p.index], clip.origin) for p in plans if not p.copy}
            for packet in container.demux(*sources.values()):
                index = packet.stream.index
                if packet.dts is None:  # a stream's flush marker: encoders are flushed below
                    continue
                try:
                    if index in encoders:
                        for samples in packet.decode():
                            out.mux(encoders[index].encode(samples))
                    else:
                        _shift(packet, clip.origin)
                        packet.stream = targets[index]
                        out.mux(packet)
                except av.error.FFmpegError:
                    skipped[index] += 1  # a damaged packet: its moment of sound is lost, the rest plays
            for encoder in encoders.values():
                out.mux(encoder.flush())
            for index, count in skipped.items():
                if count:
                    warn(f"skipped {count} damaged packet{'s' * (count > 1)} of audio stream #{index} of "
                         f"'{clip.path}'")

    atomic_write(destination, write, error=FastNSTError)


class _Reencoded:
    """One re-encoded stream: decoded samples to its encoder, continuous from the timeline's 0,
    with silence where the input starts late or a damaged packet left a gap."""

    def __init__(self, target, origin: Fraction):
        self.target, self.origin, self.position = target, origin, 0  # position: next sample, input rate

    def encode(self, samples) -> list:
        packets = []
        if samples.pts is not None and samples.time_base is not None:
            start = round((Fraction(samples.pts) * samples.time_base - self.origin) * samples.sample_rate)
            if start - self.position > samples.samples // 2:
                packets += self._encode(silence(samples.format.name, samples.layout.name, samples.sample_rate,
                                                start - self.position))
        return packets + self._encode(samples)

    def _encode(self, samples) -> list:
        samples.pts, samples.time_base = self.position, Fraction(1, samples.sample_rate)
        self.position += samples.samples
        return self.target.encode(samples)

    def flush(self) -> list:
        return self.target.encode(None)


def silence(format: str, layout: str, rate: int, samples: int):
    """An audio frame of ``samples`` zeros."""
    frame = av_module().AudioFrame(format=format, layout=layout, samples=samples)
    for plane in frame.planes:
        plane.update(bytes(plane.buffer_size))
    frame.sample_rate = rate
    return frame


def _shift(packet, origin: Fraction) -> None:
    """Move a copied packet onto the clip's timeline (origin at 0)."""
    offset = round(origin / packet.time_base)
    if packet.pts is not None:
        packet.pts -= offset
    if packet.dts is not None:
        packet.dts -= offset


@dataclass
class Shown:
    """One output frame: its file and when it is shown (seconds on the clip's timeline)."""

    path: Path
    time: Fraction
    duration: Fraction


def output_colours(width: int, height: int) -> tuple[str, int]:
    """(swscale matrix, FFmpeg tag) the frames are converted with and tagged as."""
    return ("itu709", BT709) if is_hd(width, height) else ("smpte170m", SMPTE170M)


def _timestamps(frames: list[Shown], time_base: Fraction) -> list[tuple[int, int]]:
    """(pts, duration) of each frame in ``time_base`` units, strictly increasing (two frames
    closer than one tick of a coarse time base are moved apart rather than sent out of order)."""
    stamps, last = [], None
    for frame in frames:
        pts = round(frame.time / time_base)
        pts = pts if last is None or pts > last else last + 1
        stamps.append(pts)
        last = pts
    durations = [b - a for a, b in zip(stamps, stamps[1:])] + [max(1, round(frames[-1].duration / time_base))]
    return list(zip(stamps, durations))


def encode(frames: list[Shown], clip: Clip, output: Path, audio_track: Path | None, progress: bool = False) -> None:
    """``frames`` as the video OUTPUT (its extension's codec), each at its time, with the audio
    track's streams (``write_audio_track``) copied and interleaved."""
    av = av_module()
    suffix = output.suffix.lower()
    codec = VIDEO_CODECS[suffix]
    # MPEG-4 part 2 (AVI) takes time bases of at most 16 bits, so its frames sit on the rate's grid.
    time_base = 1 / clip.rate.limit_denominator(1001) if codec == "mpeg4" else clip.time_base
    stamps = _timestamps(frames, time_base)
    # x264's B-frame reordering with irregular frame times gives MP4/MOV a track duration short by
    # the reordering delay: variable-rate clips (intervals differing by more than a tick's
    # rounding) are written without B-frames.
    intervals = [d for _, d in stamps[:-1]] or [1]
    options = {"bf": "0"} if codec == "libx264" and max(intervals) - min(intervals) > 1 else {}
    with Image.open(frames[0].path) as first:
        width, height = first.size
    matrix, tag = output_colours(width, height)

    def write(stream) -> None:
        with av.open(stream, "w", format=CONTAINER_FORMATS[suffix]) as out:
            video = out.add_stream(codec, rate=clip.rate, options=options)
            video.width, video.height, video.pix_fmt = width + width % 2, height + height % 2, "yuv420p"
            video.codec_context.time_base = video.time_base = time_base
            for name in ("colorspace", "color_primaries", "color_trc"):
                setattr(video.codec_context, name, tag)
            video.codec_context.color_range = LIMITED_RANGE
            audio = _AudioPackets(audio_track, out)
            durations = dict(stamps)
            bar = tqdm(total=len(frames), unit="frame", desc="encode", disable=not progress, dynamic_ncols=True)
            try:
                for frame, (pts, _) in zip(frames, stamps):
                    audio.mux_until(frame.time + AUDIO_AHEAD)
                    picture = _yuv(frame.path, video.width, video.height, matrix)
                    picture.pts, picture.time_base = pts, time_base
                    _mux_video(out, video.encode(picture), durations)
                    bar.update(1)
                _mux_video(out, video.encode(None), durations)
                audio.mux_until(None)
            finally:
                bar.close()
                audio.close()

    atomic_write(output, write, error=FastNSTError)


def _mux_video(out, packets, durations: dict[int, int]) -> None:
    for packet in packets:
        packet.duration = durations.get(packet.pts, packet.duration)  # the frame's own: the file's duration
        out.mux(packet)


def _yuv(path: Path, width: int, height: int, matrix: str):
    """A frame file as a YUV 4:2:0 frame converted with ``matrix``, padded to even sides."""
    av = av_module()
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    pad = ((0, height - pixels.shape[0]), (0, width - pixels.shape[1]), (0, 0))
    if pad[0][1] or pad[1][1]:
        pixels = np.pad(pixels, pad, mode="edge")
    rgb = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
    return rgb.reformat(format="yuv420p", dst_colorspace=matrix, dst_color_range="MPEG")


class _AudioPackets:
    """The audio track's packets, muxed into ``out`` in time order as the video reaches them."""

    def __init__(self, track: Path | None, out):
        self.container = av_module().open(str(track)) if track is not None else None
        self.targets, self.pending = {}, None
        if self.container is not None:
            self.targets = {s.index: out.add_stream_from_template(s) for s in self.container.streams.audio}
            self.packets = (p for p in self.container.demux(*self.container.streams.audio) if p.dts is not None)
            self.pending = next(self.packets, None)
        self.out = out

    def mux_until(self, time: Fraction | None) -> None:
        """Mux every packet that starts before ``time`` (None: all that are left)."""
        while self.pending is not None and (time is None or self.pending.dts * self.pending.time_base < time):
            self.pending.stream = self.targets[self.pending.stream.index]
            self.out.mux(self.pending)
            self.pending = next(self.packets, None)

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
