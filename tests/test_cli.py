"""The command line end to end: outputs, exit statuses, one-line errors, nothing half-written."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fastnst.cli import build_parser, checkpoint_path, config_flag, config_from_args, main
from fastnst.config import BatchConfig, BenchConfig, StyleConfig, VideoConfig

from .conftest import random_image

FAST = ["--weights", "random", "--size", "64", "--iterations", "10", "--device", "cpu"]


def _run(*args, timeout=120):
    """``python -m fastnst`` in a subprocess, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "fastnst", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_stylize_writes_the_output(tmp_path, content_path, style_path):
    out = tmp_path / "out.png"
    done = _run("stylize", content_path, style_path, "-o", out, *FAST)
    assert done.returncode == 0, done.stderr
    with Image.open(out) as image:
        assert image.format == "PNG" and max(image.size) == 64 and image.size == (64, 48)
    assert "wrote" in done.stderr and "Traceback" not in done.stderr
    assert sorted(os.listdir(tmp_path)) == ["out.png"]


def test_quiet_save_every_and_two_styles(tmp_path, content_path, style_path, second_style_path, capsys):
    out = tmp_path / "blend.jpg"
    code = main(["stylize", str(content_path), str(style_path), str(second_style_path), "-o", str(out),
                 *FAST, "--style-blend-weights", "2", "1", "--save-every", "5", "--quiet",
                 "--optimizer", "adam"])
    assert code == 0
    assert capsys.readouterr().err == ""
    assert sorted(os.listdir(tmp_path)) == ["blend.jpg", "blend_05.jpg", "blend_10.jpg"]


def _bad_inputs(tmp_path: Path, content: Path, style: Path):
    text = tmp_path / "text.jpg"
    text.write_text("hello\n")
    good = random_image(tmp_path / "good.jpg", size=(120, 90))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:600])
    out = tmp_path / "out" / "result.png"
    (tmp_path / "out").mkdir()
    return {
        "missing file": ([str(tmp_path / "nope.jpg"), str(style), "-o", str(out)], "no such file"),
        "text named .jpg": ([str(text), str(style), "-o", str(out)], "not an image"),
        "truncated jpeg": ([str(content), str(truncated), "-o", str(out)], "truncated or corrupt"),
        "unknown extension": ([str(content), str(style), "-o", str(out.with_suffix(".xyz"))],
                              "unknown output extension"),
        "missing folder": ([str(content), str(style), "-o", str(tmp_path / "none" / "o.png")], "does not exist"),
        "size 0": ([str(content), str(style), "-o", str(out), "--size", "0"], "--size must be in [16, 65536]"),
        "negative weight": ([str(content), str(style), "-o", str(out), "--style-weight", "-1"],
                            "--style-weight must be in [0, 1e+30]"),
        "bad layer": ([str(content), str(style), "-o", str(out), "--style-layers", "conv9_9"],
                      "unknown style layer 'conv9_9'"),
        "blend count": ([str(content), str(style), "-o", str(out), "--style-blend-weights", "1", "2"],
                        "one value per style image"),
        "bad choice": ([str(content), str(style), "-o", str(out), "--optimizer", "sgd"], "invalid choice"),
        "not a number": ([str(content), str(style), "-o", str(out), "--lr", "fast"], "invalid float value"),
        "no output": ([str(content), str(style)], "required: -o/--output"),
        "no cuda": ([str(content), str(style), "-o", str(out), "--device", "cuda:7"], "--device cuda:7"),
        "bad weights": ([str(content), str(style), "-o", str(out), "--weights", str(text)], "not a PyTorch"),
        "too small": ([str(content), str(style), "-o", str(out), "--size", "16"], "at least 16 px"),
        "missing init": ([str(content), str(style), "-o", str(out), "--init", str(tmp_path / "no.png")],
                         "no such file"),
        "init not an image": ([str(content), str(style), "-o", str(out), "--init", str(text)], "not an image"),
        "decay 1": ([str(content), str(style), "-o", str(out), "--average-decay", "1"],
                    "--average-decay must be in [0, 0.9999]"),
        "meancov tiled": ([str(content), str(style), "-o", str(out), "--style-loss", "meancov", "--tile", "32"],
                          "--style-loss meancov cannot be combined with --tile"),
        "normalised tiled": ([str(content), str(style), "-o", str(out), "--normalize-gradients", "--tile", "32"],
                             "--normalize-gradients cannot be combined with --tile"),
        "bad format": ([str(content), str(style), "-o", str(out), "--weights-format", "onnx"], "invalid choice"),
        "output is the content": ([str(good), str(style), "-o", str(good)], "is one of the inputs"),
        "output is the style": ([str(content), str(good), "-o", str(good)], "is one of the inputs"),
    }


def test_each_bad_input_is_one_line_exit_2_and_no_output(tmp_path, content_path, style_path, capsys):
    for name, (args, message) in _bad_inputs(tmp_path, content_path, style_path).items():
        # --weights random first: a case's own --weights comes later and wins.
        code = main(["stylize", "--weights", "random", "--iterations", "2", "--quiet", *args])
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        assert err.count("\n") == 1 and message in err and err.startswith("fastnst: error: "), (name, err)
        assert os.listdir(tmp_path / "out") == [], name
    assert random_image(tmp_path / "again.jpg", size=(120, 90)).read_bytes() == (tmp_path / "good.jpg").read_bytes()


def test_bad_input_in_a_subprocess_has_no_traceback(tmp_path, style_path):
    done = _run("stylize", tmp_path / "missing.png", style_path, "-o", tmp_path / "o.png", *FAST)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "no such file" in done.stderr
    assert not (tmp_path / "o.png").exists()


def test_info_lists_versions_devices_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for needle in ("fastnst 0.", "torch ", "torchvision ", "devices:", "cpu:", "backends:",
                   "torch (reference kernels): usable", "triton", "vgg19-dcbb9e9d.pth"):
        assert needle in out


def test_every_config_field_is_a_flag_with_its_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping inside "(default: 512)"
    parser = build_parser()
    args = parser.parse_args(["stylize", "c.png", "s.png", "-o", "o.png"])
    assert config_from_args(StyleConfig, args) == StyleConfig()
    given = parser.parse_args(["stylize", "c.png", "s.png", "-o", "o.png", "--size", "99", "--no-cuda-graph"])
    assert config_from_args(StyleConfig, given) == StyleConfig(size=99, cuda_graph=False)
    help_text = parser._subparsers._group_actions[0].choices["stylize"].format_help()
    for flag in ("--size", "--iterations", "--optimizer", "--lr", "--content-weight", "--style-weight",
                 "--tv-weight", "--style-blend-weights", "--style-scale", "--content-layers",
                 "--style-layers", "--pooling", "--init", "--seed", "--weights", "--device",
                 "--save-every", "--quiet", "(default: 512)"):
        assert flag in help_text


def test_checkpoint_names():
    assert checkpoint_path(Path("a/out.png"), 7, 500) == Path("a/out_007.png")
    assert checkpoint_path(Path("x.jpg"), 12, 12) == Path("x_12.jpg")


def test_console_script_entry_point_is_declared():
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert 'fastnst = "fastnst.cli:main"' in text


@pytest.mark.parametrize("argv", [["--version"], ["stylize", "--help"]])
def test_version_and_help_exit_zero(argv, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0


def test_the_manual_documents_every_option_s_flag():
    """Every config field's flag, in a table row or in backticks somewhere in docs/ (test_docs.py
    checks each command's --help against its own page)."""
    root = Path(__file__).resolve().parent.parent
    manual = "\n".join(page.read_text() for page in (root / "docs").glob("*.md"))
    for f in (*dataclasses.fields(StyleConfig), *dataclasses.fields(BatchConfig), *dataclasses.fields(BenchConfig),
              *dataclasses.fields(VideoConfig)):
        assert f"`{config_flag(f)}" in manual, config_flag(f)
    assert 'pip install -e ".[test]" && pytest' in (root / "README.md").read_text()


def test_backend_flag_runs_the_triton_kernels(tmp_path, content_path, style_path):
    import torch

    out = tmp_path / "triton.png"
    env = {} if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "fastnst", "stylize", str(content_path), str(style_path),
                           "-o", str(out), "--weights", "random", "--size", "32", "--iterations", "2",
                           "--backend", "triton"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    assert out.exists()
    refused = _run("stylize", content_path, style_path, "-o", tmp_path / "x.png", "--weights", "random",
                   "--backend", "gpu")
    assert refused.returncode == 2 and "--backend" in refused.stderr


def test_precision_graph_and_verbose_flags(tmp_path, content_path, style_path, capsys):
    out = tmp_path / "bf16.png"
    code = main(["stylize", str(content_path), str(style_path), "-o", str(out), *FAST, "--precision", "bf16",
                 "--no-cuda-graph", "--verbose"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "precision bf16" in err and "CUDA graph off" in err and "peak memory" in err
    assert "process peak resident set" in err and out.exists()


def test_quality_options_from_the_command_line(tmp_path, content_path, style_path, second_style_path, capsys):
    """--init PATH, --average-decay, --normalize-gradients, --style-loss meancov and the presets run
    end to end; each one's arithmetic is tested in test_meancov, test_objective and test_optim."""
    runs = {
        "init": ["--init", second_style_path],
        "average": ["--average-decay", "0.99", "--save-every", "4"],
        "normalized": ["--normalize-gradients"],
        "meancov": ["--style-loss", "meancov"],
        "meancov-adam": ["--preset", "meancov-adam", "--start-size", "32"],
        "gatys2016": ["--preset", "gatys2016"],
    }
    for name, extra in runs.items():
        out = tmp_path / f"{name}.png"
        code = main(["stylize", str(content_path), str(style_path), "-o", str(out), *FAST, "--iterations", "4",
                     *map(str, extra)])
        err = capsys.readouterr().err
        assert code == 0 and out.exists(), (name, err)
    assert (tmp_path / "average_4.png").exists()
    assert "--preset gatys2016 on torchvision weights" in err  # the last run's note


def _help(command: str) -> str:
    return build_parser()._subparsers._group_actions[0].choices[command].format_help()


def test_each_command_offers_only_the_options_that_act_there(tmp_path, capsys):
    """video renders at one size, without masks, checkpoints, a loss log or 16-bit frames; plan
    writes nothing; batch renders untiled at one size without masks, checkpoints, a log or
    --verbose (each was listed and then refused or ignored)."""
    absent = {"video": ["--scales", "--start-size", "--scale-iterations", "--save-every", "--log", "--output-16bit",
                        "--content-mask", "--style-mask"],
              "plan": ["--save-every", "--log", "--output-16bit", "--quiet", "--verbose"],
              "batch": ["--save-every", "--log", "--tile", "--tile-halo", "--content-mask", "--style-mask",
                        "--scales", "--verbose"]}
    present = {"video": ["--size", "--tile", "--preserve-color", "--verbose"], "plan": ["--size", "--tile"],
               "batch": ["--size", "--output-16bit", "--quiet"]}
    for command, flags in absent.items():
        text = _help(command)
        assert all(flag + " " not in text and flag + "\n" not in text for flag in flags), command
        assert all(flag in text for flag in present[command]), command
    assert main(["plan", "--size", "64", "--log", str(tmp_path / "log.jsonl")]) == 2
    assert "unrecognized arguments: --log" in capsys.readouterr().err


def test_a_multi_scale_preset_in_video_or_batch_renders_at_one_size_and_says_so():
    from fastnst.config import single_scale

    config, note = single_scale(StyleConfig(preset="meancov-adam", size=256))
    assert config.start_size is None and config.scale_sizes() == (256,) and config.optimizer == "adam"
    assert note == "each image is rendered at --size 256; the multi-scale schedule (--start-size 128) is not used"
    assert single_scale(StyleConfig()) == (StyleConfig(), None)


def test_save_every_images_of_an_earlier_run_are_removed(tmp_path, content_path, style_path, capsys):
    """A rerun with another --save-every would leave the earlier run's OUT_<iteration> images
    among its own, passing for them."""
    out = tmp_path / "out.png"
    common = [str(content_path), str(style_path), "-o", str(out), *FAST, "--size", "32", "--optimizer", "adam"]
    assert main(["stylize", *common, "--iterations", "4", "--save-every", "2", "--quiet"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["out.png", "out_2.png", "out_4.png"]
    (tmp_path / "out_notes.png").write_bytes(b"not ours")
    assert main(["stylize", *common, "--iterations", "3", "--save-every", "3"]) == 0
    assert "removed 2 --save-every images of an earlier run" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["out.png", "out_3.png", "out_notes.png"]
    # Continuing from an earlier checkpoint: the --init image is an input, not a leftover.
    assert main(["stylize", *common, "--iterations", "2", "--save-every", "1", "--init", str(tmp_path / "out_3.png"),
                 "--quiet"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["out.png", "out_1.png", "out_2.png", "out_3.png", "out_notes.png"]


def _help_of(command: str, flag: str) -> str:
    """The --help text of one flag of a command, as argparse holds it."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return " ".join(next(a.help for a in sub._actions if flag in a.option_strings).split())


def test_a_no_flag_s_help_says_what_the_flag_does():
    """--no-cuda-graph and --no-reference were described by what the default does (replaying a
    graph, timing the reference): the opposite of the flag the line stands beside."""
    assert _help_of("stylize", "--no-cuda-graph").startswith("run each iteration eagerly")
    assert _help_of("bench", "--no-reference").startswith("do not time the textbook reference")
    for command in ("stylize", "batch", "video", "bench"):
        parser = build_parser()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
        for action in sub._actions:
            if any(o.startswith("--no-") for o in action.option_strings):
                text = action.help.lower()
                assert not text.startswith(("replay", "time ", "use ", "keep")), (command, action.option_strings)


def test_batch_usage_shows_out_as_required(capsys, tmp_path, style_path):
    """--out DIR is required; the usage line used to show it in brackets, as if optional."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["batch"]
    usage = " ".join(sub.format_usage().split())
    assert " --out DIR " in usage and "[--out DIR]" not in usage
    assert main(["batch", "--content", str(style_path), "--style", str(style_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "required: --out" in err


def test_stylise_is_stylize(tmp_path, content_path, style_path):
    """The British spelling runs the same command (the README used it; so do users)."""
    out = tmp_path / "out.png"
    assert main(["stylise", str(content_path), str(style_path), "-o", str(out), "--weights", "random",
                 "--size", "32", "--iterations", "2", "--device", "cpu", "--quiet"]) == 0
    assert Image.open(out).size[0] == 32 or Image.open(out).size[1] == 32
