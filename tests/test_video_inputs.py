"""``fastnst video`` on the clips people have: no audio, a late start, variable frame rate, a rotated
phone clip, odd sizes, awkward audio, damaged audio, hidden files; and the output never replaces
the input, nor a rerun another input's frames.  Each output is compared with its input as a player
reads them (tests/clips.py): frame count and times, duration, size and rotation, audio offset and
codec, colour tags."""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastnst import encoder, video
from fastnst.cli import main
from fastnst.clip import open_clip, upright_rgb
from fastnst.encoder import Shown, encode, plan_audio, write_audio_track

from .clips import make_clip, probe, sync_offset
from .conftest import EXAMPLES

av = pytest.importorskip("av")
pytest.importorskip("cv2")

STYLE = str(EXAMPLES / "starry_night.jpg")
FAST = ["--weights", "random", "--size", "32", "--iterations", "2", "--device", "cpu", "--quiet"]
FRAME = 1 / 12  # the clips' frame interval: the tolerance on every time


def _video(tmp_path: Path, source: Path, name: str, *extra: str) -> tuple[int, Path]:
    out = tmp_path / name
    return main(["video", str(source), STYLE, "-o", str(out), *FAST, *extra]), out


def test_a_clip_without_audio_comes_out_whole(tmp_path):
    """Silent screen recordings and scripted clips have no audio stream (was: every frame rendered,
    then 'internal error: KeyError: 0')."""
    source = make_clip(tmp_path / "silent.mp4", frames=4, audio=None)
    code, out = _video(tmp_path, source, "out.mp4")
    assert code == 0
    result = probe(out)
    assert len(result.times) == 4 and result.audio_codecs == [] and result.video_codec == "h264"


@pytest.mark.parametrize("kind", ["ts", "mkv cut from a stream", "audio first"])
def test_a_late_start_keeps_its_offset_to_the_audio(tmp_path, kind):
    """A .ts starts its streams well after 0, an mkv cut from a broadcast at 5 s; the video used to
    be rewritten from 0 while the copied audio kept its timestamps (5 s late)."""
    options = {"ts": dict(container="mpegts"), "mkv cut from a stream": dict(start=5.0, audio_start=5.05),
               "audio first": dict(start=5.0, audio_start=4.8)}[kind]
    source = make_clip(tmp_path / ("in.ts" if kind == "ts" else "in.mkv"), frames=4, **options)
    code, out = _video(tmp_path, source, "out.mp4")
    assert code == 0
    before, after = probe(source), probe(out)
    assert abs(after.audio_offset - before.audio_offset) <= FRAME, (before.audio_offset, after.audio_offset)
    assert np.allclose(np.diff(after.times), np.diff(before.times), atol=0.002)
    assert after.audio_codecs == ["aac"]


VFR_TIMES = [0.0, 0.05, 0.3, 0.35, 0.9, 1.5]  # a screen recorder: frames only when something changes


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_variable_frame_rate_keeps_every_frames_time(tmp_path, suffix):
    """Each output frame is shown at its input time (was: re-timed at the average rate, 1.0 s of
    video against 1.83 s of audio), and the duration is the input's."""
    source = make_clip(tmp_path / "vfr.mkv", times=VFR_TIMES)
    code, out = _video(tmp_path, source, f"out{suffix}")
    assert code == 0
    before, after = probe(source), probe(out)
    start = lambda p: np.array(p.times) - p.times[0]  # noqa: E731 (the audio may start first: offset below)
    assert np.allclose(start(after), start(before), atol=0.002), after.times
    assert abs(after.duration - before.duration) <= FRAME, (before.duration, after.duration)
    assert abs(after.audio_offset - before.audio_offset) <= FRAME
    manifest = [json.loads(line) for line in (video.work_folder(out) / "manifest.jsonl").read_text().splitlines()]
    times = [r["time"] for r in manifest]  # folder output keeps the times here
    assert np.allclose(np.array(times) - times[0], VFR_TIMES, atol=0.002), times


def test_fps_resamples_in_time_and_keeps_the_duration_and_sync(tmp_path):
    """--fps on a clip with audio: a frame every 1/FPS s, each the input frame shown then (was: the
    same frames re-timed, 0.2 s of video against 0.6 s of audio)."""
    source = make_clip(tmp_path / "vfr.mkv", times=VFR_TIMES)
    code, out = _video(tmp_path, source, "out.mp4", "--fps", "4")
    assert code == 0
    before, after = probe(source), probe(out)
    resampled = np.array(after.times) - after.times[0]
    assert np.allclose(resampled, [k / 4 for k in range(7)], atol=0.002), after.times  # 0 .. 1.5, end 1.58
    assert abs(after.duration - before.duration) <= 1 / 4
    assert abs(after.audio_offset - before.audio_offset) <= 1 / 4 and after.audio_codecs == ["aac"]


@pytest.mark.parametrize("rotation", [-90, 90, 180])
def test_a_rotated_phone_clip_is_stylised_upright(tmp_path, rotation):
    """A phone stores portrait video as landscape frames with a display rotation; the frames must
    be stylised as they are shown.  Started from the content with a vanishing step, the output
    frame is the content frame, so it shows which way up the frames were taken."""
    source = make_clip(tmp_path / "phone.mp4", frames=2, rotation=rotation)
    code, out = _video(tmp_path, source, "out.mp4", "--init", "content", "--lr", "1e-6", "--iterations", "1",
                       "--size", "64")
    assert code == 0
    after = probe(out)
    assert after.rotation == 0 and after.size == ((48, 64) if rotation % 180 else (64, 48))
    with av.open(str(source)) as container:
        coded = next(container.decode(video=0)).to_ndarray(format="rgb24").astype(float)
    shown = np.rot90(coded, k=rotation // 90)  # counter-clockwise, FFmpeg's convention
    frame = np.asarray(Image.open(video.work_folder(out) / "frame_000001.png"), dtype=float)
    assert frame.shape == shown.shape and np.abs(frame - shown).mean() < 8, np.abs(frame - shown).mean()


def test_the_output_never_replaces_the_input(tmp_path, capsys):
    """-o naming the input file, or the input folder for frames: refused in one line before any
    work (was: the original replaced, or outputs mixed with the input frames)."""
    source = make_clip(tmp_path / "clip.mp4", frames=2)
    original = source.read_bytes()
    shots = tmp_path / "shots"
    shots.mkdir()
    for k in range(2):
        Image.new("RGB", (48, 36), (40 * k, 80, 120)).save(shots / f"f{k}.png")
    for args in ([str(source), "-o", str(source)], [str(shots), "-o", str(shots)],
                 [str(shots), "-o", str(tmp_path / "shots" / "..") + "/shots"]):
        assert main(["video", args[0], STYLE, *args[1:], *FAST]) == 2
        err = capsys.readouterr().err
        assert "would write into the input" in err and err.count("\n") == 1, err
    assert source.read_bytes() == original
    assert sorted(p.name for p in shots.iterdir()) == ["f0.png", "f1.png"]


def test_audio_that_cannot_go_in_as_it_is_is_remapped_and_decided_before_any_frame(tmp_path, capsys, monkeypatch):
    """AC-3 5.1(side) into WebM: Opus takes 5.1 under its standard name (was: 'avcodec_open2(libopus)
    returned 22' after every frame was rendered).  Audio no plan can write is refused before the
    first frame, in one line."""
    source = make_clip(tmp_path / "film.mkv", frames=2, audio="ac3", layout="5.1(side)", audio_rate=48000)
    code, out = _video(tmp_path, source, "out.webm")
    assert code == 0
    result = probe(out)
    assert result.audio_codecs == ["opus"] and result.audio_layouts == ["5.1"]
    monkeypatch.setattr(encoder, "_works", lambda *args: False)
    rendered = []
    monkeypatch.setattr(video, "_render_frame", lambda *args: rendered.append(1))
    code, out = _video(tmp_path, source, "refused.webm")
    err = capsys.readouterr().err
    assert code == 2 and "cannot be written to a .webm file" in err and err.count("\n") == 1, err
    assert not rendered and not video.work_folder(out).exists() and not out.exists()


def _damage_audio(source: Path, target: Path) -> Path:
    """Garbage inside three audio packets in the middle of the file (and nothing else)."""
    data = bytearray(source.read_bytes())
    with av.open(str(source)) as container:
        places = [(p.pos, p.size) for p in container.demux(audio=0) if p.pos and p.size > 20]
    for k in range(3):
        place, size = places[len(places) // 2 + 4 * k]
        data[place + 2:place + size] = b"\xff" * (size - 2)
    target.write_bytes(bytes(data))
    return target


def test_damaged_audio_packets_are_skipped_with_one_warning(tmp_path, capsys):
    """The video is what was paid for (was: 'internal error: InvalidDataError' after rendering, on
    every rerun)."""
    source = _damage_audio(make_clip(tmp_path / "whole.mp4", frames=24, audio_rate=48000), tmp_path / "hurt.mp4")
    code, out = _video(tmp_path, source, "out.webm", "--iterations", "1")
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count("\n") == 1 and "warning: skipped" in err and "damaged packet" in err, err
    assert probe(out).audio_codecs == ["opus"] and len(probe(out).times) == 24


def test_an_input_replaced_under_the_same_name_is_refused(tmp_path, capsys):
    """The work folder knows its input by content (was: '2 frames, 0 rendered, 2 already done',
    the old clip's frames)."""
    source = make_clip(tmp_path / "take.mp4", frames=2)
    code, out = _video(tmp_path, source, "out")
    assert code == 0
    make_clip(tmp_path / "take.mp4", frames=2, start=0.5)  # another take, the same name
    code, _ = _video(tmp_path, source, "out")
    err = capsys.readouterr().err
    assert code == 2 and "another input" in err and "--force" in err, err


def _solid_frames(folder: Path, size: tuple[int, int], colour: tuple[int, int, int], count: int = 2) -> list[Shown]:
    folder.mkdir(exist_ok=True)
    shown = []
    for k in range(count):
        Image.new("RGB", size, colour).save(folder / f"{k}.png")
        shown.append(Shown(folder / f"{k}.png", Fraction(k, 12), Fraction(1, 12)))
    return shown


@pytest.mark.parametrize("size, tags", [((1280, 720), (1, 1, 1, 1)), ((64, 48), (6, 6, 6, 1))])
def test_colours_are_converted_with_the_matrix_they_are_tagged_with(tmp_path, size, tags):
    """HD output is BT.709 (tagged so), smaller output BT.601 (SMPTE 170M); a player that honours
    the tags shows the rendered colour (was: BT.601 untagged, pure red 191,0,0 shown as 207,18,0).
    Reading back, an untagged HD frame is decoded with BT.709, as players assume."""
    clip = open_clip(make_clip(tmp_path / "any.mp4", frames=1, audio=None), None)
    out = tmp_path / "red.mp4"
    encode(_solid_frames(tmp_path / "frames", size, (191, 0, 0)), clip, out, None)
    assert probe(out).colour_tags == tags
    with av.open(str(out)) as container:  # as a player does: with the matrix the tags name
        frame = next(container.decode(video=0))
        matrix = "itu709" if tags[0] == 1 else "smpte170m"
        shown = frame.to_ndarray(format="rgb24", src_colorspace=matrix, src_color_range="MPEG")[size[1] // 2,
                                                                                              size[0] // 2]
    assert np.abs(shown.astype(int) - [191, 0, 0]).max() <= 3, shown
    untagged = av.VideoFrame.from_ndarray(np.full((720, 1280, 3), (191, 0, 0), np.uint8), format="rgb24")
    untagged = untagged.reformat(format="yuv420p", dst_colorspace="itu709", dst_color_range="MPEG")
    untagged.colorspace = 2  # unspecified, as many cameras write it
    assert np.abs(np.asarray(upright_rgb(untagged))[360, 640].astype(int) - [191, 0, 0]).max() <= 3


@pytest.mark.parametrize("name, codec, options", [("vorbis.mkv", "vorbis", {"strict": "experimental"}),
                                                  ("pcm.mov", "pcm_s16le", {})])
def test_audio_common_players_cannot_play_in_mp4_is_re_encoded_as_aac(tmp_path, name, codec, options):
    """FFmpeg copies Vorbis or PCM into MP4, which plays almost nowhere; AAC does."""
    source = make_clip(tmp_path / name, frames=2, audio=codec, layout="stereo", audio_options=options, flash=1)
    clip, out = open_clip(source, None), tmp_path / "out.mp4"
    plans = plan_audio(clip, out)
    assert [(p.copy, p.codec) for p in plans] == [(False, "aac")]
    track = tmp_path / "audio.mp4"
    write_audio_track(clip, plans, track, lambda message: None)
    frames = [(tmp_path / f"{k}.png", f) for k, f in enumerate(clip.frames())]
    for path, frame in frames:
        frame.image.save(path)
    encode([Shown(path, f.time, f.duration) for path, f in frames], clip, out, track)
    assert probe(out).audio_codecs == ["aac"]
    assert abs(sync_offset(out) - sync_offset(source)) <= FRAME / 2


@pytest.mark.parametrize("source_kind", ["mp4", "ts", "mkv, late video"])
@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".webm", ".mov", ".avi"])
def test_the_encoder_keeps_the_sound_on_its_frame(tmp_path, source_kind, suffix):
    """A white frame and a tone starting with it: in every container the tone still starts with
    the white frame, within half a frame (AVI within one: its video sits on a fixed frame grid and
    its audio cannot signal MP3's 25 ms encoder delay)."""
    options = {"mp4": {}, "ts": dict(container="mpegts"), "mkv, late video": dict(start=2.0, audio_start=1.9)}
    source = make_clip(tmp_path / f"in.{'ts' if source_kind == 'ts' else 'mkv' if 'mkv' in source_kind else 'mp4'}",
                       frames=8, flash=4, **options[source_kind])
    clip, out = open_clip(source, None), tmp_path / f"out{suffix}"
    track = tmp_path / f"audio{suffix}"
    write_audio_track(clip, plan_audio(clip, out), track, lambda message: None)
    frames = []
    for k, frame in enumerate(clip.frames()):
        frame.image.save(tmp_path / f"{k}.png")
        frames.append(Shown(tmp_path / f"{k}.png", frame.time, frame.duration))
    encode(frames, clip, out, track)
    tolerance = FRAME if suffix == ".avi" else FRAME / 2
    assert abs(sync_offset(out) - sync_offset(source)) <= tolerance, (sync_offset(source), sync_offset(out))


def test_hidden_files_odd_sizes_and_a_double_ctrl_c(tmp_path, capsys, monkeypatch):
    """macOS's ._* files in a frame folder are no frames (was: the run stopped on them); a 63 x 47
    frame is padded to 64 x 48 for 4:2:0 video (was: cropped to 62 x 46), the frames folder keeps
    63 x 47; a second Ctrl-C says the finished frames are kept (was: 'nothing was written')."""
    folder = tmp_path / "shots"
    folder.mkdir()
    for k in range(2):
        Image.new("RGB", (63, 47), (90, 40 * k, 30)).save(folder / f"f{k}.png")
    (folder / "._f0.png").write_bytes(b"\0\5\26\7 resource fork")
    code, out = _video(tmp_path, folder, "odd.mp4", "--size", "63")
    assert code == 0
    assert probe(out).size == (64, 48) and len(probe(out).times) == 2
    assert Image.open(video.work_folder(out) / "frame_000001.png").size == (63, 47)

    def second_ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(video, "render_video", second_ctrl_c)
    code, _ = _video(tmp_path, folder, "stopped.mp4")
    err = capsys.readouterr().err
    assert code == 130 and "kept in" in err and "nothing" not in err, err


def test_multipass_keeps_only_what_resume_needs_and_reports_its_progress(tmp_path):
    """At most two passes' results on disk while it runs, nothing but the frames once done; a
    resumed run counts the frame passes finished before (was: '0 already done', and every pass
    kept: ~34 GB per minute of 512 px video)."""
    folder = tmp_path / "shots"
    folder.mkdir()
    for k in range(4):
        Image.new("RGB", (32, 24), (60 * k, 80, 100)).save(folder / f"f{k}.png")
    from fastnst import StyleConfig
    from fastnst.config import VideoConfig

    config = StyleConfig(weights="random", size=32, iterations=6, device="cpu", quiet=True)
    settings = VideoConfig(mode="multipass", window=2, passes=4)
    out, seen = tmp_path / "out", []

    def watch_then_stop() -> bool:
        seen.append(len([p for p in out.glob("pass*") if any(p.glob("*.pt"))]))
        return len(seen) > 5  # pass 0: 2 windows, pass 1: 2, pass 2: 1 window, then stop

    first = video.render_video(folder, [STYLE], out, config, settings, should_stop=watch_then_stop, progress=False)
    assert first.interrupted and first.unit == "frame passes" and first.rendered == 10 and max(seen) <= 2
    second = video.render_video(folder, [STYLE], out, config, settings, progress=False)
    assert (second.skipped, second.rendered, second.frames) == (10, 6, 4)  # 4 passes (3 + 1 + 1 + 1 its.) x 4
    assert sorted(p.name for p in out.iterdir()) == ["command.json", *[f"frame_{i:06d}.png" for i in range(1, 5)],
                                                     "manifest.jsonl"]
    third = video.render_video(folder, [STYLE], out, config, settings, progress=False)
    assert (third.skipped, third.rendered) == (16, 0)


def test_too_little_disk_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    source = make_clip(tmp_path / "clip.mp4", frames=3)
    monkeypatch.setattr(video, "disk_free", lambda folder: 10_000)
    code, out = _video(tmp_path, source, "out.mp4", "--mode", "multipass")
    err = capsys.readouterr().err
    assert code == 2 and "GB are free" in err and err.count("\n") == 1, err
    assert not video.work_folder(out).exists()


def test_a_frame_of_another_size_in_a_folder_is_refused_before_any_work(tmp_path, capsys):
    folder = tmp_path / "shots"
    folder.mkdir()
    for k, size in enumerate([(48, 36), (48, 36), (40, 30)]):
        Image.new("RGB", size).save(folder / f"f{k}.png")
    code, out = _video(tmp_path, folder, "out")
    err = capsys.readouterr().err
    assert code == 2 and "frame 3" in err and "f2.png" in err and err.count("\n") == 1, err
    assert not out.exists()
    shutil.rmtree(folder)
