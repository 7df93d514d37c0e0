"""The ``fastnst`` command: a thin argparse front end over the library.

Flags of ``stylize`` are built from ``StyleConfig``'s fields, so defaults and help never drift
from the library.  This is the only place that prints errors or picks exit statuses:
0 success, 1 failure during the run, 2 bad arguments or inputs, 130 SIGINT, 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import signal
import sys
from pathlib import Path

from .version import __version__
from .config import NOT_IN_COMMAND, BatchConfig, BenchConfig, StyleConfig, VideoConfig, flag_name, single_scale
from .errors import CLI_CALLER, ConfigError, FastNSTError, NonFiniteLossError, RunError, UsageError

EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr and exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _type_of(f: dataclasses.Field):
    """The element type of a field from its annotation: int, float (also inside tuple[...]) or str."""
    text = str(f.type).replace(" ", "")
    if "float" in text:
        return float
    if text.startswith(("int", "tuple[int")):
        return int
    return str


def _help(f: dataclasses.Field, default) -> str:
    text = f.metadata["help"]
    if default is None or isinstance(default, bool):
        return text
    shown = " ".join(str(v) for v in default) if isinstance(default, tuple) else f"{default:g}" if \
        isinstance(default, float) else str(default)
    return f"{text} (default: {shown})"


def config_flag(f: dataclasses.Field) -> str:
    """The flag of a StyleConfig field; a switch that is on by default is offered as --no-<name>."""
    flag = flag_name(f.name)
    return "--no-" + flag[2:] if f.default is True else flag


def _list_action(element):
    """An argparse action for tuple options: values may be space- or comma-separated
    (``--scales 512 1024`` or ``--scales 512,1024``)."""

    class ListAction(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            items = [piece for value in values for piece in value.split(",") if piece]
            try:
                setattr(namespace, self.dest, tuple(element(item) for item in items))
            except ValueError:
                bad = next(item for item in items if not _parses(element, item))
                parser.error(f"argument {option_string}: invalid {element.__name__} value: '{bad}'")

    return ListAction


def _parses(element, text: str) -> bool:
    try:
        element(text)
        return True
    except ValueError:
        return False


def add_config_flags(parser: argparse.ArgumentParser, defaults, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of a config dataclass, named after it (``style_weight`` -> ``--style-weight``),
    but for the fields in ``skip`` (options that do not act in this command: config.NOT_IN_COMMAND)."""
    for f in dataclasses.fields(defaults):
        if f.name in skip:
            continue
        default, meta = getattr(defaults, f.name), f.metadata
        # SUPPRESS: only flags the user gives reach the namespace, so presets can fill the rest
        # (config_from_args); the help text shows the dataclass default.
        kwargs: dict = dict(dest=f.name, default=argparse.SUPPRESS, help=_help(f, default))
        if meta.get("required"):
            kwargs["required"] = True
        if isinstance(default, bool):
            kwargs["action"] = "store_false" if f.default is True else "store_true"
        else:
            kwargs["type"] = _type_of(f)
            kwargs["metavar"] = meta.get("metavar")
            if meta.get("many"):
                kwargs["nargs"] = "+"
                kwargs["action"] = _list_action(kwargs.pop("type"))
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
                kwargs.pop("metavar")
        parser.add_argument(config_flag(f), **kwargs)


def _add_positionals(parser: argparse.ArgumentParser, name: str, metavar: str, what: str, output_metavar: str,
                     output_help: str) -> None:
    """The first input, the style images and -o/--output, as stylize and video take them."""
    parser.add_argument(name, metavar=metavar, help=what)
    parser.add_argument("styles", metavar="STYLE", nargs="+", help="style image(s)")
    parser.add_argument("-o", "--output", required=True, metavar=output_metavar, help=output_help)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastnst", description="Fast neural style transfer (Gatys et al., CVPR 2016).")
    parser.add_argument("--version", action="version", version=f"fastnst {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    stylize = commands.add_parser(
        "stylize", aliases=["stylise"], help="render a content image in the style of one or more style images",
        description="Optimise an image so its VGG19 features match CONTENT's and its Gram matrices "
                    "match the STYLE images' (blended when there are several).")
    _add_positionals(stylize, "content", "CONTENT", "content image (any format Pillow reads)", "OUT",
                     "output image: .png, .jpg/.jpeg, .webp or .tif/.tiff; written atomically")
    add_config_flags(stylize, StyleConfig())
    stylize.set_defaults(run=_stylize)

    bench = commands.add_parser(
        "bench", help="seconds per iteration: fast path, ablations, textbook reference, published GPUs",
        description="Time fastnst's step against the textbook reference and the published K40 / Titan X "
                    "figures, with random weights and images (speed does not depend on them).")
    add_config_flags(bench, BenchConfig())
    bench.set_defaults(run=_bench)

    batch = commands.add_parser(
        "batch", help="render many content x style jobs, batched, resumable, shardable with torchrun",
        description="Render every content x style pair (or every line of --jobs) into --out. Jobs of the same "
                    "size and options are optimised together; OUT/manifest.jsonl records finished jobs so "
                    "that running the same command again skips them. Every stylize option sets the jobs' "
                    "defaults.")
    add_config_flags(batch, BatchConfig())
    add_config_flags(batch, StyleConfig(), skip=NOT_IN_COMMAND["batch"])
    batch.set_defaults(run=_batch)

    video = commands.add_parser(
        "video", help="stylise a video (or a folder of frames) without flicker",
        description="Stylise every frame of INPUT (a video file or a folder of frames) in order; each frame "
                    "starts from the previous result warped along the optical flow and is held to it where "
                    "the flow can be trusted (Ruder et al. 2016).  OUTPUT with a video extension (.mp4 .mov "
                    ".mkv .webm .avi) is a video with every frame at its input time, upright, and the "
                    "input's audio (copied, or re-encoded where the container needs it); any other OUTPUT is a "
                    "folder of numbered frames.  Frames go to a work folder with a manifest: a rerun of the "
                    "same command skips finished frames (another command is refused), Ctrl-C keeps them.")
    _add_positionals(video, "input", "INPUT", "video file or folder of frames", "OUTPUT",
                     "video file (.mp4 .mov .mkv .webm .avi) or folder of frames")
    add_config_flags(video, VideoConfig())
    add_config_flags(video, StyleConfig(), skip=NOT_IN_COMMAND["video"])
    video.set_defaults(run=_video)

    plan = commands.add_parser(
        "plan", help="predicted peak memory and s/iter, untiled and tiled, and the tile --tile auto picks",
        description="Measure the step at two small sizes on the device, then predict peak memory and seconds "
                    "per iteration at --size (a square image), untiled and tiled, with the tile size --tile "
                    "auto would pick and the L-BFGS state cost.  Takes the options of stylize that define "
                    "the run (a stylize command line plans as it is, without its output options).")
    add_config_flags(plan, StyleConfig(), skip=NOT_IN_COMMAND["plan"])
    plan.set_defaults(run=_plan)

    info = commands.add_parser("info", help="versions, devices, usable backends and the weights cache",
                               description="Print versions, devices, usable backends and where "
                                           "the VGG19 weights are cached.")
    info.set_defaults(run=_info)
    return parser


def config_from_args(cls, args: argparse.Namespace):
    """A config from the defaults and the flags given (a --preset first, then the explicit flags)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    base = cls()
    return base.replace(**given) if hasattr(base, "replace") else dataclasses.replace(base, **given)


def checkpoint_path(output: Path, iteration: int, iterations: int) -> Path:
    """Where --save-every puts the image of ``iteration``: OUT_<iteration>.<ext>, zero-padded."""
    width = len(str(iterations))
    return output.with_name(f"{output.stem}_{iteration:0{width}d}{output.suffix}")


def remove_old_checkpoints(output: Path, inputs: list[str]) -> list[Path]:
    """Remove the --save-every images an earlier run left for OUT (OUT_<digits>.<ext>, not one of
    ``inputs``): next to this run's they would pass for its own.  The paths removed."""
    pattern = re.compile(re.escape(output.stem) + r"_\d+" + re.escape(output.suffix))
    keep = {os.path.realpath(path) for path in inputs}
    folder = output.parent if str(output.parent) else Path(".")
    old = [path for path in folder.glob(f"{glob.escape(output.stem)}_*{glob.escape(output.suffix)}")
           if pattern.fullmatch(path.name) and os.path.realpath(path) not in keep]
    for path in old:
        path.unlink(missing_ok=True)
    return old


class _InterruptFlag:
    """SIGINT (Ctrl-C) or SIGTERM asks the run to stop after the current step, so the image can be
    saved whole; a second signal aborts at once without writing.  ``code`` is the exit status the
    signal calls for: 128 + its number (130 for SIGINT, 143 for SIGTERM)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None

    @property
    def code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "_InterruptFlag":
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _stylize(args: argparse.Namespace) -> int:
    from . import distributed

    config = config_from_args(StyleConfig, args)
    config.validate(n_styles=len(args.styles))
    shard = distributed.from_environment(config.device)
    try:
        return _stylize_with(args, config, shard)
    finally:
        distributed.close(shard)


def _stylize_with(args: argparse.Namespace, config: StyleConfig, shard) -> int:
    """The run itself; under torchrun every rank computes, rank 0 alone talks and writes."""
    from .api import render
    from .images import check_output_path, read_metadata, save_image

    main_rank = shard is None or shard.is_main
    if not main_rank:
        config = config.replace(quiet=True, verbose=False, save_every=0, log=None)
    bits = 16 if config.output_16bit else 8
    output = check_output_path(args.output, bits)
    inputs = [args.content, *args.styles, config.init, *(config.content_mask or ()), *(config.style_mask or ())]
    _check_not_an_input(output, inputs)
    metadata = read_metadata(args.content)  # the content's colour profile and EXIF go to the output
    total = sum(config.iterations_at(i) for i in range(len(config.scale_sizes())))

    def write(image, path):
        try:
            save_image(image, path, bits, metadata)
        except FastNSTError as exc:  # the work is done; failing to store it is a run failure (1)
            raise RunError(str(exc)) from None

    def checkpoint(iteration, image):
        write(image, checkpoint_path(output, iteration, total))

    if config.save_every and main_rank:
        removed = remove_old_checkpoints(output, inputs)  # an --init from an earlier checkpoint stays
        if removed and not config.quiet:
            _say(f"removed {len(removed)} --save-every image{'s' * (len(removed) > 1)} of an earlier run of "
                 f"{output} ({', '.join(sorted(p.name for p in removed)[:3])}{', ...' if len(removed) > 3 else ''})")

    stop = _InterruptFlag()
    try:
        with stop:
            should_stop = stop if shard is None else (lambda: shard.any(stop()))
            result = render(args.content, args.styles, config, checkpoint=checkpoint, should_stop=should_stop,
                            notify=_say if main_rank and not config.quiet else (lambda message: None),
                            shard=shard)
    except NonFiniteLossError as exc:
        if main_rank:
            write(exc.last_image, output)
        raise NonFiniteLossError(f"{exc}; kept the image of iteration {exc.last_iteration} in "
                                 f"{output}") from None
    if not main_rank:
        return stop.code if result.interrupted else 0
    write(result.image, output)
    width, height = result.image.shape[-1], result.image.shape[-2]
    if result.interrupted:
        _say(f"interrupted after {result.iterations} of {total} iterations; saved the current image "
             f"({width}x{height}) to {output}")
        return stop.code
    if not config.quiet:
        per_iteration = result.seconds / max(result.iterations, 1)
        _say(f"wrote {output} ({width}x{height}, {result.iterations} iterations, loss {result.loss:.6g}, "
             f"{result.seconds:.1f} s, {per_iteration:.3f} s/iter)")
    if config.verbose:
        memory = f"{result.peak_memory_bytes / 2**20:.0f} MiB" if result.peak_memory_bytes else "unknown"
        source = "CUDA max allocated" if result.device.startswith("cuda") else "process peak resident set"
        tiles = f"{result.tile} px tiles" if result.tile else "untiled"
        processes = f", {shard.world} processes" if shard is not None else ""
        import torch

        from .precision import precision_reason

        why = precision_reason(config.precision, torch.device(result.device))
        _say(f"weights {result.weights}")
        _say(f"device {result.device}, precision {result.precision} ({why}), kernels {result.backend}, CUDA graph "
             f"{'on' if result.cuda_graph else 'off'}, {tiles}{processes}, skipped fp16 steps "
             f"{result.skipped_steps}, peak memory {memory} ({source})")
    return 0


def _check_not_an_input(output: Path, inputs: list[str]) -> None:
    """-o naming one of the run's own inputs would replace it (a typo away from losing a photo)."""
    target = os.path.realpath(output)
    if any(os.path.realpath(path) == target for path in inputs if os.path.exists(path)):
        raise UsageError(f"-o '{output}' is one of the inputs (the content, a style, --init or mask image); give "
                         f"another output")


def _video(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .files import check_writable
    from .video import is_video_path, render_video, work_folder

    settings = config_from_args(VideoConfig, args).validate()
    config, note = single_scale(config_from_args(StyleConfig, args))
    config.validate(n_styles=len(args.styles))
    output = Path(args.output)
    if is_video_path(output):
        check_writable(output, ConfigError)
    elif output.exists() and not output.is_dir():
        raise ConfigError(f"'{output}' exists and is not a folder (give a video extension for a video file)")
    talk = (lambda message: None) if config.quiet else _say
    if note:
        talk(f"note: {note}")
    kept = (f"every finished frame (and, with --mode multipass, pass) is kept in {work_folder(output)}: "
            f"rerun the same command to continue")
    try:
        with _InterruptFlag() as stop:
            summary = render_video(args.input, list(args.styles), output, config, settings, should_stop=stop,
                                   progress=not config.quiet, notify=lambda message: _say(f"warning: {message}"))
    except KeyboardInterrupt:  # a second Ctrl-C: out at once, but what was finished stays
        _say(f"interrupted at once; {kept}")
        return EXIT_INTERRUPTED
    mean = summary.mean_consistency
    if summary.interrupted:
        _say(f"interrupted; {kept}")
        return stop.code
    rate = f"; {summary.rendered / summary.seconds:.2f} {summary.unit}/s" if summary.rendered and summary.seconds \
        else ""
    consistency = f", consistency error {mean:.4f}" if mean is not None else ""
    talk(f"wrote {output} ({summary.frames} frames; {summary.rendered} {summary.unit} rendered, {summary.skipped} "
         f"already done{rate}{consistency})")
    if config.verbose:
        _say(f"temporal weight {summary.temporal_weight:g}")
    return 0


def _batch(args: argparse.Namespace) -> int:
    from . import distributed

    batch_config = config_from_args(BatchConfig, args).validate()
    config, note = single_scale(config_from_args(StyleConfig, args))
    config.validate()
    shard = distributed.from_environment(config.device)
    try:
        return _batch_with(batch_config, config, shard, note)
    finally:
        distributed.close(shard)


def _batch_with(batch_config: BatchConfig, config: StyleConfig, shard, note: str | None) -> int:
    from pathlib import Path

    from . import batch
    from .devices import resolve_device, run_metadata
    from .files import check_writable

    main_rank = shard is None or shard.is_main
    out = Path(batch_config.out)
    batch.check_out_folder(batch_config)
    # Every job is built (and so checked) before the output folder is made: a bad --jobs line or a
    # pattern that matches nothing leaves nothing behind.
    jobs = batch.jobs_from_file(batch_config, config) if batch_config.jobs else \
        batch.jobs_from_pairs(batch_config, config)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out: cannot create '{out}' ({exc.strerror or exc})") from None
    check_writable(out / "manifest.jsonl", UsageError)
    device = shard.device if shard is not None else resolve_device(config.device)
    mine = jobs if shard is None else [job for job in jobs if batch.rank_of(job, shard.world) == shard.rank]
    talk = main_rank and not config.quiet
    say = _say if talk else (lambda message: None)
    if note:
        say(f"note: {note}")
    try:
        with _InterruptFlag() as stop:
            summary = batch.run_batch(mine, batch_config, device, notify=say, should_stop=stop, progress=talk)
    except KeyboardInterrupt:  # a second Ctrl-C: out at once, but finished jobs stay
        _say(f"interrupted at once; the batch in flight was abandoned, finished jobs are in {out} "
             f"(rerun the same command to continue)")
        return EXIT_INTERRUPTED
    code = stop.code
    if shard is not None:
        summary = batch.merge_summaries(shard.gather(summary))
    if not main_rank:
        return code if summary.interrupted else (1 if summary.failed else 0)
    report = batch.throughput(summary, run_metadata()["device"])
    batch.Manifest(out).append({"summary": report, "jobs": len(jobs),
                                "processes": 1 if shard is None else shard.world})
    for failure in summary.failed:
        _say(f"failed: {failure.job}: {failure.error}")
    utilisation = f", {report['utilisation']:.0%} of peak" if report["utilisation"] is not None else ""
    replaced = f", {report['replaced']} of them again (another recipe)" if report["replaced"] else ""
    say(f"{report['images']} rendered{replaced}, {report['failed']} failed, {report['skipped']} already done "
        f"(of {len(jobs)} jobs) in {report['seconds']:.1f} s: {report['images_per_second']:.3f} images/s, "
        f"{report['megapixel_iterations_per_second']:.2f} megapixel-iterations/s, "
        f"{report['model_tflops']:.2f} model TFLOP/s{utilisation}")
    if summary.interrupted:
        _say("interrupted: the batch in flight was not written; run the same command again to finish")
        return code
    return 1 if summary.failed else 0


def _plan(args: argparse.Namespace) -> int:
    from .devices import resolve_device
    from .plan import plan_lines

    config = config_from_args(StyleConfig, args).validate()
    device = resolve_device(config.device)
    size = config.scale_sizes()[-1]
    for line in plan_lines(config, device, size, size):
        print(line)
    return 0


def _bench(args: argparse.Namespace) -> int:
    import json

    import torch

    from . import bench, bench_report
    from .devices import resolve_device
    from .files import atomic_write, check_writable

    config = config_from_args(BenchConfig, args).validate()
    if config.report:
        print(bench_report.markdown_table(bench_report.load_results(config.report)))
        return 0
    device = resolve_device(config.device)
    if config.max_size and device.type != "cuda":
        raise UsageError("--max-size needs a CUDA device: on the CPU the limit is the machine's memory and "
                         "the search would take hours")
    if config.json:
        check_writable(config.json, UsageError)
    if config.plot:
        bench_report.check_plot_path(config.plot)
    progress = (lambda message: None) if config.quiet else (lambda message: _say(message))

    def save(rows, max_sizes=None) -> None:
        if config.json:
            text = json.dumps(bench.as_json(rows, config, max_sizes), indent=1) + "\n"
            atomic_write(config.json, lambda stream: stream.write(text.encode()), UsageError)

    if config.max_size:  # a search instead of the timing table
        rows = []
        max_sizes = {mode: bench.max_size(mode, device, progress=progress)
                     for mode in ("fast", *(["reference"] if config.reference else []))}
    else:
        sizes = config.sizes or ((256, 512, 1024) if device.type == "cuda" else (128, 256))
        measured: list = []

        def keep(rows) -> None:  # after every row: a run stopped half-way keeps what it measured
            measured[:] = rows
            save(rows)

        try:
            timing = bench.Timing(config.iterations, config.repeats, config.warmup)
            rows = bench.bench_rows(sizes, config.optimizers, config.timed_modes(), device, timing,
                                    progress=progress, on_row=keep)
        except KeyboardInterrupt:
            done = sum(1 for row in measured if row.s_per_iter)
            _say(f"interrupted; {done} measured rows" + (f" are in {config.json}" if config.json and measured
                                                          else " (no --json: not written)"))
            return EXIT_INTERRUPTED
        max_sizes = None
    result = bench.as_json(rows, config, max_sizes)
    head = result["headline"]
    if head:
        print(f"headline: {head['megapixel_iterations_per_second']:.3f} megapixel-iterations/s "
              f"({result['meta']['device']}, fast path, {head['optimizer']}, {head['size']} px)")
    if rows:
        print(bench.format_table(rows))
        if result["lbfgs_cost"]:
            print(bench.format_lbfgs_costs(result["lbfgs_cost"]))
    if max_sizes:
        print("largest square image that fits: " + ", ".join(f"{mode} {size} px" for mode, size in max_sizes.items()))
    save(rows, max_sizes)
    if config.plot and rows:
        bench_report.plot(result["results"], list(bench.PUBLISHED), config.plot,
                          f"{result['meta']['device']}, torch {torch.__version__}, {result['meta']['date'][:10]}")
    return 0


def _info(args: argparse.Namespace) -> int:
    import platform

    import PIL
    import torch
    import torchvision

    from .devices import describe_devices
    from .kernels import backend
    from .vgg import imagenet_cache_path

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # not installed, or broken: either way not usable
        triton_version = None
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    lines = [
        f"fastnst {__version__}",
        f"python {platform.python_version()} ({sys.executable})",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}, cuDNN "
        f"{torch.backends.cudnn.version() if cuda else 'n/a'})",
        f"torchvision {torchvision.__version__}",
        f"pillow {PIL.__version__}",
        f"triton {triton_version or 'not installed'}",
        "devices:",
        *(f"  {line}" for line in describe_devices()),
        "backends:",
        "  torch (reference kernels): usable",
        f"  triton: {_triton_status(triton_version, device)}",
        f"  in force: {_backend_in_force(backend, device)}",
        _precision_line(device),
        _lbfgs_cost_line(),
        f"imagenet weights: {imagenet_cache_path()} "
        f"({'cached' if imagenet_cache_path().is_file() else 'not cached; downloaded on first use'})",
    ]
    print("\n".join(lines))
    return 0


def _precision_line(device) -> str:
    from .precision import precision_reason
    from .run import resolve_settings

    chosen = resolve_settings(StyleConfig(precision="auto"), device).precision
    return f"precision auto on {device.type}: {chosen} ({precision_reason('auto', device)})"


def _lbfgs_cost_line() -> str:
    from .optim import lbfgs_state_bytes

    history = StyleConfig().lbfgs_history
    costs = ", ".join(f"{lbfgs_state_bytes(history, size * size) / 2**20:.0f} MiB at {size} px"
                      for size in (512, 1024, 2048))
    return f"L-BFGS state (--lbfgs-history {history}, square images): {costs}"


def _triton_status(version: str | None, device) -> str:
    from .kernels import backend

    if version is None:
        return "not usable (triton is not installed)"
    if backend.interpreting():
        return "usable through the interpreter (TRITON_INTERPRET=1: CPU tensors, slow)"
    if backend.triton_runs_on(device):
        return "usable (CUDA)"
    return "not usable (no CUDA device; TRITON_INTERPRET=1 runs kernels on the CPU)"


def _backend_in_force(backend, device) -> str:
    try:
        chosen = backend.get_backend()
        return f"{chosen} -> {backend.resolve(device)} on {device}"
    except FastNSTError as exc:
        return f"none ({exc})"


def _say(message: str) -> None:
    print(f"fastnst: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    caller = CLI_CALLER.set(True)  # the library's messages keep their --flags for the CLI
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except FastNSTError as exc:
        _say(f"error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        _say("interrupted at once; nothing more was written")
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: one line for users, the traceback on request
        if os.environ.get("FASTNST_DEBUG"):
            raise
        _say(f"internal error: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
             " (set FASTNST_DEBUG=1 for the traceback)")
        return 1
    finally:
        CLI_CALLER.reset(caller)
