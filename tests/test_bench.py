"""``fastnst bench``: the JSON it writes, the reference it times, its refusals and its report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from fastnst import StyleConfig, bench, bench_report
from fastnst import reference_gatys as textbook
from fastnst.cli import main
from fastnst.objective import StyleObjective, feature_layers
from fastnst.precision import native_bf16
from fastnst.run import initial_image
from fastnst.vgg import VGGFeatures, random_state_dict

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
    """The issue's own command: two small sizes, five iterations, JSON out (about 15 s here)."""
    out = tmp_path_factory.mktemp("bench") / "out.json"
    assert main(["bench", "--device", "cpu", "--sizes", "64", "96", "--iterations", "5", "--json", str(out),
                 "--quiet"]) == 0
    return json.loads(out.read_text())


def test_bench_json_has_every_field(bench_json):
    meta = bench_json["meta"]
    for key in ("device", "driver", "cuda", "cudnn", "torch", "triton", "python", "fastnst", "commit", "date"):
        assert key in meta, key
    assert meta["device"].startswith("cpu") and re.match(r"\d{4}-\d\d-\d\dT", meta["date"])
    assert bench_json["kind"] == "fastnst bench"
    assert bench_json["config"]["sizes"] == [64, 96] and bench_json["config"]["iterations"] == 5
    head = bench_json["headline"]
    assert head["size"] == 96 and head["optimizer"] == "lbfgs"
    assert head["megapixel_iterations_per_second"] == pytest.approx(96**2 / 1e6 / head["s_per_iter"])
    rows = bench_json["results"]
    assert {(r["size"], r["optimizer"], r["mode"]) for r in rows} == {
        (s, o, m) for s in (64, 96) for o in ("lbfgs", "adam") for m in ("fast", "reference")}
    for row in rows:
        assert row["status"] == "ok" and row["s_per_iter"] > 0
        low, high = row["spread"]
        assert low <= row["s_per_iter"] <= high
        assert row["model_tflops"] == pytest.approx(bench.model_flops(row["size"], row["size"]) /
                                                    row["s_per_iter"] / 1e12)
        assert row["peak_memory_bytes"] > 0 and row["speedup_vs_reference"] > 0
        fast_precision = "bf16" if native_bf16(torch.device("cpu")) else "fp32"  # auto on this CPU
        assert row["precision"] == ("fp32" if row["mode"] == "reference" else fast_precision)
        assert row["cuda_graph"] is False and row["backend"] == "torch"
    assert bench_json["published"] and bench_json["max_size"] is None
    by_row = {(r["size"], r["optimizer"], r["mode"]): r["s_per_iter"] for r in rows}
    costs = bench_json["lbfgs_cost"]  # one per (size, mode) timed with both optimisers
    assert {(c["size"], c["mode"]) for c in costs} == {(s, m) for s in (64, 96) for m in ("fast", "reference")}
    for c in costs:
        lbfgs, adam = by_row[(c["size"], "lbfgs", c["mode"])], by_row[(c["size"], "adam", c["mode"])]
        assert c["lbfgs_extra_s"] == pytest.approx(lbfgs - adam) and c["share"] == pytest.approx((lbfgs - adam) / lbfgs)
    assert bench_json["cost_model"]["flops_per_pixel"] == 2 * 722_304 + 2 * 34_816


def test_the_machine_is_asked_once_however_often_results_are_saved(monkeypatch):
    """A benchmark rewrites its JSON after every row; nvidia-smi and git ran for every rewrite
    (about 19 processes in stage 4 of the GPU check).  Now once per process; the date stays fresh."""
    import subprocess

    from fastnst import devices

    started = []
    real_run = subprocess.run

    def counted(*args, **kwargs):
        started.append(args[0][0])
        return real_run(*args, **kwargs)

    devices._machine_metadata.cache_clear()
    monkeypatch.setattr(subprocess, "run", counted)
    first = [devices.run_metadata() for _ in range(5)]
    assert started and len(started) <= 3  # git twice (HEAD, status) and nvidia-smi where there is CUDA
    assert all(meta["commit"] == first[0]["commit"] and meta["date"] for meta in first)
    devices._machine_metadata.cache_clear()


def test_published_baselines_and_speedups():
    titan = bench.published_for(512, "lbfgs")
    assert {p["gpu"] for p in titan} == {"Tesla K40", "GTX Titan X (Maxwell)", "GTX Titan X (Pascal)"}
    assert next(p for p in titan if p["gpu"] == "GTX Titan X (Maxwell)")["s_per_iter"] == pytest.approx(0.1097)
    row = bench.BenchRow(size=512, optimizer="lbfgs", mode="fast")
    bench._fill(row, bench.StepTiming(512, "bf16", True, "lbfgs", "triton", 0.01, (0.009, 0.011), 1.0, 1))
    maxwell = next(p for p in row.published if p["gpu"] == "GTX Titan X (Maxwell)")
    assert maxwell["speedup"] == pytest.approx(10.97)
    assert next(p for p in row.published if p["gpu"] == "Tesla K40")["speedup"] is None


def test_reference_computes_fastnst_objective_at_64px():
    config = StyleConfig(size=64)
    g = torch.Generator().manual_seed(6)
    content, style = torch.rand(1, 3, 48, 64, generator=g), torch.rand(1, 3, 48, 64, generator=g)
    weights = random_state_dict(4)
    network = VGGFeatures(feature_layers(config), weights, channels_last=False)
    objective = StyleObjective(network, content, [style], config)
    model, style_losses, content_losses = textbook.build_model(
        weights, content, style, config.content_layers, config.style_layers)
    image = initial_image("noise", content, style, seed=3)
    with torch.no_grad():
        ours = objective(image)
        theirs = textbook.total_loss(model, style_losses, content_losses, image)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)
    assert len(style_losses) == 5 and len(content_losses) == 1


def test_reference_step_lowers_the_loss():
    config = StyleConfig()
    content, style = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    model, sl, cl = textbook.build_model(random_state_dict(0), content, style, config.content_layers,
                                         config.style_layers)
    image = torch.rand(1, 3, 32, 32).requires_grad_(True)
    step = textbook.make_step(model, sl, cl, image, textbook.make_optimizer("lbfgs", image))
    losses = [step().item() for _ in range(10)]
    assert losses[-1] < losses[0]


def test_sizes_that_cannot_fit_are_refused(monkeypatch):
    monkeypatch.setattr(bench, "free_bytes", lambda device: 10 * 2**20)
    rows = bench.bench_rows([64], ["adam"], ["fast", "reference"], torch.device("cpu"), bench.Timing(1, 1, 0),
                            progress=lambda message: None)
    assert all(row.status.startswith("does not fit: needs about") and row.s_per_iter is None for row in rows)
    assert "does not fit" in bench.format_table(rows)


def test_max_size_bisection(monkeypatch):
    monkeypatch.setattr(bench, "fits", lambda mode, size, device, optimizer="lbfgs": size <= 3000)
    assert bench.max_size("fast", torch.device("cuda"), progress=lambda message: None) == 2944
    monkeypatch.setattr(bench, "fits", lambda mode, size, device, optimizer="lbfgs": size <= 700)
    assert bench.max_size("fast", torch.device("cuda"), progress=lambda message: None) == 640
    monkeypatch.setattr(bench, "fits", lambda mode, size, device, optimizer="lbfgs": False)
    assert bench.max_size("fast", torch.device("cuda"), progress=lambda message: None) is None


def test_bench_refusals_are_one_line(tmp_path, capsys):
    cases = {
        ("--max-size",): "--max-size needs a CUDA device",
        ("--sizes", "8"): "--sizes must be in [16, 65536]",
        ("--optimizers", "sgd"): "--optimizers must be among lbfgs, adam",
        ("--plot", str(tmp_path / "p.gif")): "--plot: use one of .png, .svg, .pdf",
        ("--json", str(tmp_path / "missing" / "b.json")): "does not exist",
    }
    for args, message in cases.items():
        assert main(["bench", "--device", "cpu", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (args, err)


def test_plot_is_drawn(tmp_path):
    out = tmp_path / "speed.png"
    assert main(["bench", "--device", "cpu", "--sizes", "32", "48", "--optimizers", "adam", "--iterations", "1",
                 "--repeats", "1", "--warmup", "0", "--plot", str(out), "--quiet"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_readme_table_is_generated_from_committed_results(capsys):
    runs = bench_report.load_results(ROOT / "benchmarks" / "results")
    assert runs, "commit at least one fastnst bench result"
    assert main(["bench", "--report", str(ROOT / "benchmarks" / "results")]) == 0
    table = capsys.readouterr().out.strip()
    readme = (ROOT / "README.md").read_text()
    section = readme.split("<!-- bench-table:start -->")[1].split("<!-- bench-table:end -->")[0].strip()
    assert section == table, "README's benchmark table is stale: paste `fastnst bench --report benchmarks/results`"


def test_modes_choose_and_order_the_rows(tmp_path):
    """--modes times exactly the modes given; plain (fp32, eager, PyTorch kernels) is timed even on
    the CPU, where it equals the fast path, because fast is not among them."""
    out = tmp_path / "modes.json"
    assert main(["bench", "--device", "cpu", "--sizes", "32", "--optimizers", "lbfgs", "--modes", "plain",
                 "reference", "--iterations", "1", "--repeats", "1", "--warmup", "0", "--json", str(out),
                 "--quiet"]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [row["mode"] for row in rows] == ["plain", "reference"]
    plain = rows[0]
    assert plain["s_per_iter"] > 0 and plain["precision"] == "fp32" and plain["backend"] == "torch"
    assert plain["cuda_graph"] is False and plain["speedup_vs_reference"] > 0


def test_an_interrupted_bench_keeps_the_rows_it_measured(tmp_path, monkeypatch, capsys):
    out = tmp_path / "partial.json"
    calls = []
    real = bench._time_mode

    def second_call_interrupted(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(bench, "_time_mode", second_call_interrupted)
    assert main(["bench", "--device", "cpu", "--sizes", "32", "--optimizers", "lbfgs", "--iterations", "1",
                 "--repeats", "1", "--warmup", "0", "--json", str(out)]) == 130
    rows = json.loads(out.read_text())["results"]  # the reference row was cut short: not kept
    assert [(row["mode"], row["status"]) for row in rows] == [("fast", "ok")] and rows[0]["s_per_iter"] > 0
    assert f"interrupted; 1 measured rows are in {out}" in capsys.readouterr().err


def test_modes_and_ablate_together_are_refused(capsys):
    assert main(["bench", "--device", "cpu", "--modes", "fast", "--ablate"]) == 2
    assert "give --modes or --ablate, not both" in capsys.readouterr().err


def test_report_reads_a_committed_gpu_check_folder(tmp_path, bench_json):
    """A GPU check's folder is committed whole: its timing.json (a fastnst bench result) is found
    in the subfolder and named by its path there; its other JSON files are not bench results."""
    run = tmp_path / "h100-20261201"
    run.mkdir()
    (run / "timing.json").write_text(json.dumps(bench_json))
    (run / "kernels.json").write_text(json.dumps({"kind": "fastnst gpu check: kernels", "results": []}))
    runs = bench_report.load_results(tmp_path)
    assert [r["file"] for r in runs] == ["h100-20261201/timing.json"]
    assert "`h100-20261201/timing.json`" in bench_report.markdown_table(runs)
