"""``fastnst video``: temporal consistency on a clip with known motion, video files in and out
(frame rate and audio kept), resuming, and bad input."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastnst import StyleConfig
from fastnst.cli import main
from fastnst.config import VideoConfig, default_temporal_weight
from fastnst.images import image_to_tensor, load_image, resized, save_image
from fastnst.clip import open_clip
from fastnst.encoder import Shown, audio_track_path, encode, plan_audio, write_audio_track
from fastnst.video import _pass_iterations, render_video, work_folder

from .conftest import EXAMPLES

pytest.importorskip("cv2")

STYLE = str(EXAMPLES / "starry_night.jpg")
FAST = ["--weights", "random", "--size", "64", "--iterations", "10", "--device", "cpu", "--quiet"]


def _translating_clip(folder: Path, frames: int = 6) -> Path:
    """Tübingen moving 3 px right and 2 px down per frame, 64 x 48 frames as PNG files."""
    folder.mkdir()
    photo = image_to_tensor(resized(load_image(EXAMPLES / "tubingen.jpg"), 120))
    for k in range(frames):
        save_image(photo[..., 20 - 2 * k:68 - 2 * k, 30 - 3 * k:94 - 3 * k], folder / f"f{k}.png")
    return folder


def _consistency(folder: Path) -> float:
    values = [json.loads(line).get("consistency") for line in (folder / "manifest.jsonl").read_text().splitlines()]
    values = [v for v in values if v is not None]
    return sum(values) / len(values)


def test_the_temporal_term_halves_the_flicker_of_independent_frames(tmp_path, capsys):
    """The issue's criterion, from the command line: the consistency error (mean absolute
    difference between each stylised frame and the previous one warped by the flow, over trusted
    pixels) with the temporal term on is at most half of independent per-frame renders'."""
    clip = _translating_clip(tmp_path / "clip")
    assert main(["video", str(clip), STYLE, "-o", str(tmp_path / "temporal"), *FAST]) == 0
    assert main(["video", str(clip), STYLE, "-o", str(tmp_path / "independent"), *FAST,
                 "--temporal-weight", "0"]) == 0
    temporal, independent = _consistency(tmp_path / "temporal"), _consistency(tmp_path / "independent")
    assert temporal <= 0.5 * independent, (temporal, independent)
    assert sorted(p.name for p in (tmp_path / "temporal").glob("*.png")) == [f"frame_{i:06d}.png" for i in
                                                                          range(1, 7)]


def _video_with_audio(path: Path, frames: int = 12, rate: int = 12) -> Path:
    """A 12-frame H.264 clip at 12 fps with one second of a 440 Hz AAC tone."""
    av = pytest.importorskip("av")
    photo = np.asarray(resized(load_image(EXAMPLES / "tubingen.jpg"), 96).crop((0, 0, 64, 48)))
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=rate)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = out.add_stream("aac", rate=44100)
        for k in range(frames):
            frame = av.VideoFrame.from_ndarray(np.roll(photo, 2 * k, axis=1).copy(), format="rgb24")
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(44100) / 44100)).astype(np.float32)
        for start in range(0, 44100, 1024):
            chunk = av.AudioFrame.from_ndarray(tone[None, start:start + 1024], format="fltp", layout="mono")
            chunk.sample_rate = 44100
            chunk.pts = start
            for packet in audio.encode(chunk):
                out.mux(packet)
        for packet in audio.encode():
            out.mux(packet)
    return path


def test_a_video_file_round_trips_with_its_rate_and_audio(tmp_path):
    av = pytest.importorskip("av")
    source = _video_with_audio(tmp_path / "in.mp4")
    out = tmp_path / "out.mp4"
    assert main(["video", str(source), STYLE, "-o", str(out), *FAST, "--iterations", "3"]) == 0
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert Fraction(stream.average_rate) == 12
        assert sum(1 for _ in container.decode(video=0)) == 12
    with av.open(str(out)) as container:
        assert len(container.streams.audio) == 1
        assert sum(1 for packet in container.demux(audio=0) if packet.size) > 10
    assert (work_folder(out) / "manifest.jsonl").exists()
    # WebM cannot hold AAC: the same frames encoded as VP9 carry the audio re-encoded as Opus.
    webm, clip = tmp_path / "out.webm", open_clip(source, None)
    track = audio_track_path(tmp_path, webm)
    write_audio_track(clip, plan_audio(clip, webm), track, lambda message: None)
    frames = [Shown(work_folder(out) / f"frame_{i + 1:06d}.png", f.time, f.duration)
              for i, f in enumerate(clip.frames())]
    encode(frames, clip, webm, track)
    with av.open(str(webm)) as container:
        assert [s.codec_context.name for s in container.streams] == ["vp9", "opus"]
        assert sum(1 for _ in container.decode(video=0)) == 12
    with av.open(str(webm)) as container:
        seconds = sum(frame.samples for frame in container.decode(audio=0)) / container.streams.audio[0].rate
        assert abs(seconds - 1.0) < 0.05, seconds  # the one-second tone, resampled to 48 kHz


def test_an_interrupted_clip_resumes_without_rendering_finished_frames(tmp_path):
    clip = _translating_clip(tmp_path / "clip", frames=7)
    config = StyleConfig(weights="random", size=64, iterations=3, device="cpu", quiet=True)
    out = tmp_path / "out"
    rendered = []

    def stop_after_five() -> bool:
        rendered[:] = sorted(out.glob("frame_*.png"))
        return len(rendered) >= 5

    first = render_video(clip, [STYLE], out, config, VideoConfig(), should_stop=stop_after_five, progress=False)
    assert first.interrupted and first.rendered == 5
    assert first.temporal_weight == default_temporal_weight("gram", "torchvision")  # random weights' format
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("frame_*.png")}
    second = render_video(clip, [STYLE], out, config, VideoConfig(), progress=False)
    assert not second.interrupted and second.skipped == 5 and second.rendered == 2
    assert all(p.stat().st_mtime_ns == stamps[p.name] for p in out.glob("frame_*.png") if p.name in stamps)
    assert len(list(out.glob("frame_*.png"))) == 7


def test_a_work_folder_belongs_to_one_command(tmp_path, capsys):
    """Another command into the same work folder is refused, naming the difference, instead of
    mixing its frames with the old ones; --force starts afresh, and an interrupted forced run
    resumes onto its own frames only."""
    clip = _translating_clip(tmp_path / "clip", frames=3)
    out = tmp_path / "out"
    assert main(["video", str(clip), STYLE, "-o", str(out), *FAST, "--iterations", "1", "--size", "32"]) == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("frame_*.png")}
    for extra, difference in [(["--size", "48"], "--size 32 there, 48 here"),
                              (["--size", "32", "--temporal-weight", "5"], "--temporal-weight default there"),
                              (["--size", "32", "--style-scale", "2"], "--style-scale 1.0 there, 2.0 here")]:
        assert main(["video", str(clip), STYLE, "-o", str(out), *FAST, "--iterations", "1", *extra]) == 2
        err = capsys.readouterr().err
        assert difference in err and "--force" in err and err.count("\n") == 1, err
    other_style = str(EXAMPLES / "the_scream.jpg")
    assert main(["video", str(clip), other_style, "-o", str(out), *FAST, "--iterations", "1", "--size", "32"]) == 2
    assert "other style images" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("frame_*.png")} == stamps  # nothing touched
    # The same command on another precision resumes: every frame already done.
    config = StyleConfig(weights="random", size=32, iterations=1, device="cpu", quiet=True, precision="fp32")
    assert render_video(clip, [STYLE], out, config, VideoConfig(), progress=False).skipped == 3
    # --force at 48 px, stopped after one frame: a plain rerun renders the other two at 48 px.
    config = StyleConfig(weights="random", size=48, iterations=1, device="cpu", quiet=True)
    first = render_video(clip, [STYLE], out, config, VideoConfig(force=True), progress=False,
                         should_stop=lambda: len(list(out.glob("frame_*.png"))) >= 1)
    assert first.interrupted and first.rendered == 1 and len(list(out.glob("frame_*.png"))) == 1
    second = render_video(clip, [STYLE], out, config, VideoConfig(), progress=False)
    assert second.skipped == 1 and second.rendered == 2
    assert {Image.open(p).size for p in out.glob("frame_*.png")} == {(48, 36)}
    stray = tmp_path / "stray"
    stray.mkdir()
    save_image(torch.rand(1, 3, 24, 32), stray / "frame_000001.png")
    assert main(["video", str(clip), STYLE, "-o", str(stray), *FAST, "--iterations", "1", "--size", "32"]) == 2
    assert "no fastnst video command claims" in capsys.readouterr().err


def test_bad_inputs_are_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    odd = _translating_clip(tmp_path / "odd", frames=2)
    save_image(torch.rand(1, 3, 30, 30), odd / "f9.png")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n")
    av = pytest.importorskip("av")
    sound = tmp_path / "sound.m4a"
    with av.open(str(sound), "w") as out:
        audio = out.add_stream("aac", rate=44100)
        chunk = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        chunk.sample_rate, chunk.pts = 44100, 0
        for packet in [*audio.encode(chunk), *audio.encode()]:
            out.mux(packet)
    damaged = tmp_path / "damaged.mp4"
    data = bytearray(_video_with_audio(tmp_path / "whole.mp4", frames=24).read_bytes())
    data[len(data) // 3:len(data) // 3 + 2000] = b"\xff" * 2000  # garbage in the middle of the stream
    damaged.write_bytes(bytes(data))
    cases = {
        "no video stream": ([str(sound)], "has no video stream"),
        "empty folder": ([str(empty)], "holds no frames"),
        "missing": ([str(tmp_path / "nope.mp4")], "no such file"),
        "not a video": ([str(text)], "not a video file"),
        "odd sizes": ([str(odd)], "every frame must have the first's size"),
    }
    for name, (args, message) in cases.items():
        code = main(["video", *args, STYLE, "-o", str(tmp_path / f"out-{name}"), *FAST])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and message in err, (name, err)
    code = main(["video", str(damaged), STYLE, "-o", str(tmp_path / "damaged-out.mp4"), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cannot be decoded" in err, err
    assert not (tmp_path / "damaged-out.mp4").exists()  # no half-written video (the frames before stay)
    with pytest.raises(Exception, match="no such file"):
        open_clip(tmp_path / "absent", None)


def test_tiled_frames_and_luminance_control(tmp_path):
    """Stylize options reach every frame: tiles (the temporal term is added on the whole image, as
    TV is) and --preserve-color luminance (temporal targets in the luminance the run works on)."""
    clip = _translating_clip(tmp_path / "clip", frames=3)
    for name, extra in (("tiled", ["--tile", "32"]), ("luminance", ["--preserve-color", "luminance"])):
        out = tmp_path / name
        assert main(["video", str(clip), STYLE, "-o", str(out), *FAST, "--iterations", "3", *extra]) == 0, name
        assert len(list(out.glob("frame_*.png"))) == 3


@pytest.mark.parametrize("iterations, passes", [(500, 15), (60, 4), (20, 15), (10, 15), (2, 15), (1, 15), (7, 0)])
def test_multipass_iterations_add_up_to_the_frame_total(iterations, passes):
    """--iterations is each frame's total: half in the first pass, the rest spread (differing by at
    most one) over at most --passes later passes, each at least one iteration."""
    split = _pass_iterations(StyleConfig(iterations=iterations), passes)
    assert sum(split) == iterations and split[0] == (max(1, iterations // 2) if passes else iterations)
    later = split[1:]
    assert len(later) == min(passes, iterations - split[0]) and all(n >= 1 for n in later)
    assert not later or max(later) - min(later) <= 1


def test_multipass_batches_windows_and_pulls_neighbours_together(tmp_path):
    """--mode multipass: the first pass renders windows of frames as batches (independent frames),
    later passes pull each frame towards its warped neighbour; the result is more consistent than
    independent frames, and an interrupted run resumes at its first unfinished window."""
    clip = _translating_clip(tmp_path / "clip")
    config = StyleConfig(weights="random", size=64, iterations=20, device="cpu", quiet=True)
    settings = VideoConfig(mode="multipass", window=3, passes=2)
    out = tmp_path / "multi"
    calls = []

    def stop_in_the_second_pass() -> bool:
        calls.append(1)
        return len(calls) > 3  # pass 0: two windows; pass 1: one window, then stop

    first = render_video(clip, [STYLE], out, config, settings, should_stop=stop_in_the_second_pass, progress=False)
    assert first.interrupted and first.rendered == 9  # frame passes: 6 in pass 0, 3 in pass 1
    assert len(list((out / "pass0").glob("*.pt"))) == 6 and len(list((out / "pass1").glob("*.pt"))) == 3
    second = render_video(clip, [STYLE], out, config, settings, progress=False)
    assert not second.interrupted and second.frames == 6
    assert (second.skipped, second.rendered) == (9, 9)  # 3 passes (10 + 5 + 5 iterations) x 6 frames
    assert len(list(out.glob("frame_*.png"))) == 6
    independent = tmp_path / "independent"
    render_video(clip, [STYLE], independent, config, VideoConfig(temporal_weight=0), progress=False)
    assert _consistency(out) < 0.8 * _consistency(independent), (_consistency(out), _consistency(independent))


def test_raft_flow_through_the_command(tmp_path, monkeypatch):
    """--flow raft reaches every flow the video needs (seeded random RAFT weights stand in for the
    real ones, which cannot be downloaded here)."""
    from torchvision.models.optical_flow import Raft_Large_Weights, raft_large

    from fastnst import flow

    torch.manual_seed(0)
    state = raft_large(weights=None).state_dict()
    used = []

    def weights(*args, **kwargs):
        used.append(1)
        return state

    monkeypatch.setattr(Raft_Large_Weights, "get_state_dict", weights)
    monkeypatch.setattr(flow, "_raft_models", {})
    monkeypatch.setattr(flow, "RAFT_UPDATES", 2)
    clip = _translating_clip(tmp_path / "clip", frames=3)
    assert main(["video", str(clip), STYLE, "-o", str(tmp_path / "out"), *FAST, "--iterations", "2",
                 "--flow", "raft"]) == 0
    assert used == [1] and len(list((tmp_path / "out").glob("frame_*.png"))) == 3


def test_long_term_targets_share_out_the_pixels(tmp_path):
    """--temporal-frames 1,2: each pixel is held to the nearest earlier frame that sees it (Ruder
    et al.'s long-term masks), so the masks of one frame's targets never overlap, and they cover
    what the short-term mask covers and more; from the command line it runs."""
    from fastnst.flow import consistency_mask
    from fastnst.video import _temporal_targets

    g = torch.Generator().manual_seed(2)
    flows = {}
    for j, moved in ((1, slice(0, 8)), (2, slice(16, 24))):
        forward = torch.zeros(20, 24, 2)
        forward[:, moved, 0] = 5.0  # disagrees with the zero backward flow: occluded there
        flows[j] = (forward, torch.zeros(20, 24, 2))
    outputs = {0: torch.rand(1, 3, 20, 24, generator=g), 1: torch.rand(1, 3, 20, 24, generator=g)}
    masks = {j: consistency_mask(*flows[j]) for j in flows}
    motions = {j: (flows[j][1], masks[j]) for j in flows}
    targets = _temporal_targets(motions, outputs, 2, 10.0, torch.device("cpu"), "none")
    near, far = (t.mask[0, 0] for t in targets)
    assert torch.equal(near, masks[1]) and (near * far).sum() == 0
    assert torch.equal(far, (masks[2] - masks[1]).clamp(min=0))
    assert far[:, :6].min() == 1 and near[:, :6].max() == 0  # what frame i-1 misses, frame i-2 gives
    clip = _translating_clip(tmp_path / "clip", frames=4)
    assert main(["video", str(clip), STYLE, "-o", str(tmp_path / "out"), *FAST, "--iterations", "2",
                 "--temporal-frames", "1,2"]) == 0
