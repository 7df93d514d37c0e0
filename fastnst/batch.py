"""Batch rendering: many jobs, stacked along the batch dimension, resumable, shardable.

A job is one output image: a content image, its style image(s) and its options.  Jobs whose output
size and options agree (the seed and the initialisation may differ) share a bucket and are
optimised together, ``batch_size`` at a time, in one VGG pass: each sample has its own targets,
its own noise and, for L-BFGS, its own history, so each output is what rendering it alone gives.

Every finished job is recorded in ``OUT/manifest.jsonl`` (one JSON line, appended and flushed as it
happens; one ``write`` per line, so lines from several processes never interleave on a local file
system) and its image written atomically, so a kill loses only the batch in flight; running the
same command again skips finished jobs.  Under torchrun each rank takes the jobs whose id hashes
to it, whatever the world size, so a rerun with another world size still skips finished work.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import color
from .config import INITS, NOT_IN_COMMAND, BatchConfig, StyleConfig, single_scale
from .errors import ConfigError, FastNSTError, first_line
from .images import (SAVE_FORMATS, displayed_size, fitted_size, image_to_tensor, load_image, read_metadata, resized,
                     resized_style, save_image)
from .loop import Hooks
from .measure import SAFETY, free_bytes, model_flops, peak_tflops
from .objective import check_fits, feature_layers
from .recipe import file_fingerprint, first_difference, pixel_options
from .run import Inputs, Runtime, build_run, calibrate, initial_image, resolve_runtime

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif")
MAX_AUTO_BATCH = 16  # beyond this, a bigger batch no longer raises images/s (one image fills little)


@dataclass
class Job:
    id: str  # the output file name: unique in the output folder, stable across runs
    content: str
    styles: tuple[str, ...]
    config: StyleConfig
    output: Path


@dataclass
class Outcome:
    job: str
    status: str  # done | failed
    output: str | None = None
    seconds: float | None = None
    loss: float | None = None
    error: str | None = None
    size: tuple[int, int] | None = None  # (width, height)
    iterations: int = 0
    batch: int = 0
    recipe: dict | None = None  # what a done job was rendered from (job_recipe): a rerun compares it


@dataclass
class Summary:
    outcomes: list[Outcome] = field(default_factory=list)
    skipped: int = 0  # finished in an earlier run, from the same recipe
    replaced: int = 0  # finished in an earlier run from another recipe: rendered again
    seconds: float = 0.0
    megapixel_iterations: float = 0.0
    model_flops: float = 0.0
    interrupted: bool = False
    precision: str | None = None  # what the runs computed in (the last runtime's)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def done(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "done"]


# --------------------------------------------------------------------------------------------
# Job lists


def expand_contents(items: tuple[str, ...]) -> list[str]:
    """Files as given, folders as their images (sorted; hidden files are no images: macOS's ``._*``),
    glob patterns as their matches (sorted)."""
    paths: list[str] = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(str(p) for p in Path(item).iterdir()
                           if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))  # not ._* forks
            if not found:
                raise ConfigError(f"--content: folder '{item}' holds no images")
            paths += found
        elif any(ch in item for ch in "*?["):
            found = sorted(glob.glob(item))
            if not found:
                raise ConfigError(f"--content: no file matches '{item}'")
            paths += found
        else:
            paths.append(item)  # a missing file becomes a failed job, reported with the others
    return paths


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _stem(path: str) -> str:
    """A file stem safe in a file name: odd characters become '_', no leading dots."""
    return _UNSAFE.sub("_", Path(path).stem).lstrip(".") or "image"


def labels_for(paths: list[str]) -> dict[str, str]:
    """A name label per input path: its stem, or stem_extension where two inputs share a stem
    (photo.jpg and photo.png would otherwise write the same output)."""
    stems: dict[str, set[str]] = {}
    for path in paths:
        stems.setdefault(_stem(path), set()).add(path)
    return {path: (_stem(path) if len(stems[_stem(path)]) == 1
                   else f"{_stem(path)}_{Path(path).suffix.lstrip('.').lower() or 'file'}") for path in paths}


def output_name(template: str, content: str, styles: tuple[str, ...], variation: int, config: StyleConfig,
                labels: dict[str, str] | None = None) -> str:
    """The output file name of a job; never a path, so it cannot leave the output folder."""
    labels = labels or {}
    try:
        name = template.format(content=labels.get(content, _stem(content)),
                               style="+".join(labels.get(s, _stem(s)) for s in styles),
                               variation=variation, seed=config.seed, size=config.size)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"--name template '{template}' is invalid ({exc})") from None
    return check_plain_name(name, "--name")


def check_plain_name(name: str, what: str) -> str:
    if not name or os.sep in name or "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise ConfigError(f"{what}: '{name}' must be a plain file name (no folders, not hidden)")
    if Path(name).suffix.lower() not in SAVE_FORMATS:
        raise ConfigError(f"{what}: '{name}' needs an image extension ({', '.join(sorted(SAVE_FORMATS))})")
    return name


def default_template(variations: int) -> str:
    return "{content}__{style}__v{variation}.png" if variations > 1 else "{content}__{style}.png"


def jobs_from_pairs(batch: BatchConfig, config: StyleConfig) -> list[Job]:
    template = batch.name or default_template(batch.variations)
    out = Path(batch.out)
    jobs = []
    contents = expand_contents(batch.content)
    labels = {**labels_for(contents), **labels_for(list(batch.style))}
    for content in contents:
        for style in batch.style:
            jobs += _variants(content, (style,), config, batch.variations, template, out, labels)
    return _unique(jobs)


def jobs_from_file(batch: BatchConfig, config: StyleConfig) -> list[Job]:
    """One job per non-empty line of --jobs: {"content", "style" (or a list), "name"?, options...}."""
    path = Path(batch.jobs)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"--jobs: cannot read '{path}' ({exc.strerror or exc})") from None
    out, jobs = Path(batch.out), []
    fields = {f.name for f in dataclasses.fields(StyleConfig)}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"--jobs line {number}"
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"{where}: not JSON ({exc})") from None
        if not isinstance(entry, dict) or "content" not in entry or not (entry.get("style") or entry.get("styles")):
            raise ConfigError(f"{where}: needs \"content\" and \"style\"")
        styles = entry.get("style", entry.get("styles"))
        styles = tuple(styles) if isinstance(styles, list) else (styles,)
        options = {k: v for k, v in entry.items() if k not in ("content", "style", "styles", "name")}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ConfigError(f"{where}: unknown option '{unknown[0]}'")
        inert = sorted(set(options) & set(NOT_IN_COMMAND["batch"]))
        if inert:
            raise ConfigError(f"{where}: '{inert[0]}' does not apply in batch (see fastnst batch --help)")
        try:
            job_config = single_scale(config.replace(**options))[0].validate(n_styles=len(styles))
        except FastNSTError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if "name" in entry:
            name = check_plain_name(str(entry["name"]), f"{where} \"name\"")
            jobs += _variants(str(entry["content"]), styles, job_config, batch.variations,
                              _with_variation(name, batch.variations), out)
        else:
            jobs += _variants(str(entry["content"]), styles, job_config, batch.variations,
                              batch.name or default_template(batch.variations), out)
    return _unique(jobs)


def _with_variation(name: str, variations: int) -> str:
    if variations == 1:
        return name.replace("{", "{{").replace("}", "}}")
    stem, suffix = os.path.splitext(name.replace("{", "{{").replace("}", "}}"))
    return f"{stem}__v{{variation}}{suffix}"


def _variants(content, styles, config, variations, template, out, labels=None) -> list[Job]:
    jobs = []
    for variation in range(variations):
        job_config = config.replace(seed=config.seed + variation) if variations > 1 else config
        name = output_name(template, content, styles, variation, job_config, labels)
        jobs.append(Job(id=name, content=content, styles=styles, config=job_config, output=out / name))
    return jobs


def _unique(jobs: list[Job]) -> list[Job]:
    """Jobs whose outputs are distinct and are none of the inputs (a job would overwrite its own
    content or style image, or another job's)."""
    seen: dict[str, Job] = {}
    inputs = {os.path.realpath(path) for job in jobs for path in (job.content, *job.styles)}
    for job in jobs:
        if job.id in seen:
            raise ConfigError(f"two jobs would write '{job.id}' ({seen[job.id].content} and {job.content}); "
                              f"use a --name template that tells them apart")
        if os.path.realpath(job.output) in inputs:
            raise ConfigError(f"job '{job.id}' would overwrite the input '{job.output}'; give another --out "
                              f"or --name")
        seen[job.id] = job
    return jobs


def check_out_folder(batch: BatchConfig) -> None:
    """--out must not be one of the --content folders: the next run would read its outputs as
    content images."""
    out = os.path.realpath(batch.out)
    for item in batch.content or ():
        if os.path.isdir(item) and os.path.realpath(item) == out:
            raise ConfigError(f"--out '{batch.out}' is a --content folder: the next run would take its outputs "
                              f"for content images; give another --out")


def rank_of(job: Job, world: int) -> int:
    """The rank that renders ``job``: a hash of its id, stable across runs and world sizes."""
    return int(hashlib.sha1(job.id.encode()).hexdigest(), 16) % world


def job_recipe(job: Job, fingerprints: dict[str, str] | None = None) -> dict | None:
    """What a job's output is of (recipe.py): its content, styles and --init image by content, and
    every option that changes its pixels; None when an input cannot be read.  ``fingerprints``
    caches file hashes (a style image is shared by many jobs)."""
    fingerprints = {} if fingerprints is None else fingerprints

    def of(path: str) -> str:
        if path not in fingerprints:
            fingerprints[path] = file_fingerprint(path)
        return fingerprints[path]

    try:
        recipe = {"input": of(job.content), "styles": [of(s) for s in job.styles],
                  "options": pixel_options(job.config)}
        if job.config.init not in INITS:
            recipe["init"] = of(job.config.init)
        return recipe
    except OSError:
        return None


# --------------------------------------------------------------------------------------------
# Manifest


class Manifest:
    """OUT/manifest.jsonl: one line per finished (or failed) job, appended as it happens."""

    def __init__(self, folder: Path):
        self.path = folder / "manifest.jsonl"

    def finished(self) -> dict[str, dict | None]:
        """Jobs recorded as done whose output file still exists: id -> the recipe it was rendered
        from (the last record of the job; None in manifests of fastnst versions without recipes)."""
        done: dict[str, dict | None] = {}
        if not self.path.exists():
            return done
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill mid-write: that job simply runs again
            job = record.get("job")
            if record.get("status") == "done" and job and (self.path.parent / job).exists():
                done[job] = record.get("recipe")
            elif record.get("status") == "failed" and job:
                done.pop(job, None)  # rendered again since and failed: its output is an older one's
        return done

    def append(self, record: dict) -> None:
        data = (json.dumps(record, sort_keys=True) + "\n").encode()
        handle = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(handle, data)  # one write: appends from several processes do not interleave
            os.fsync(handle)
        finally:
            os.close(handle)


# --------------------------------------------------------------------------------------------
# Running


def output_size(job: Job) -> tuple[int, int]:
    return fitted_size(displayed_size(job.content), job.config.size)


def bucket_key_options(config: StyleConfig) -> str:
    """The options that must agree for jobs to share a batch: all but seed and initialisation."""
    options = dataclasses.asdict(config.replace(seed=0, init="noise", quiet=True, verbose=False, save_every=0))
    return json.dumps(options, sort_keys=True, default=str)


def bucket_key(job: Job, size: tuple[int, int]) -> tuple:
    """Jobs batch together when their output size and options agree, seed and init aside."""
    return size, bucket_key_options(job.config)


@dataclass
class _Ledger:
    """Where each job's outcome goes: the summary, the manifest on disk, and notes for the user."""

    summary: Summary
    manifest: Manifest
    notify: Callable[[str], None]
    fingerprints: dict[str, str]  # file hashes for the recipes (job_recipe)

    def record(self, outcome: Outcome) -> None:
        self.summary.outcomes.append(outcome)
        self.manifest.append(dataclasses.asdict(outcome))

    def fail(self, job: Job, error: str) -> None:
        self.record(Outcome(job=job.id, status="failed", error=error))


def auto_batch_size(config: StyleConfig, device: torch.device, width: int, height: int, jobs: int,
                    models: dict | None = None) -> int:
    """As many images as the planner says fit the free memory (at most MAX_AUTO_BATCH).  ``models``
    caches the planner's measurement per option set: it does not depend on the image size."""
    free = free_bytes(device)
    if not free:
        return 1
    models = {} if models is None else models
    key = bucket_key_options(config)
    if key not in models:
        models[key] = calibrate(config, device)
    model = models[key]
    fit = int((SAFETY * free - model.fixed_bytes) // max(model.bytes_per_pixel * width * height, 1))
    return max(1, min(fit, MAX_AUTO_BATCH, jobs))


def _still_to_render(jobs: list[Job], finished: dict[str, dict | None], ledger: "_Ledger") -> list[Job]:
    """The jobs to render: all but those done before from the same recipe.  A job done from
    another recipe (other inputs by content, or options) is rendered again, and the user told."""
    todo, first = [], None
    for job in jobs:
        if job.id not in finished:
            todo.append(job)
            continue
        difference = first_difference(finished[job.id], job_recipe(job, ledger.fingerprints) or {})
        if difference is None:
            ledger.summary.skipped += 1
            continue
        todo.append(job)
        ledger.summary.replaced += 1
        first = first or f"{job.id}: {difference}"
    if first:
        count = ledger.summary.replaced
        ledger.notify(f"{count} job{'s were' if count > 1 else ' was'} done from another recipe (first {first}); "
                      f"rendering {'them' if count > 1 else 'it'} again")
    return todo


def run_batch(jobs: list[Job], batch: BatchConfig, device: torch.device, *, notify: Callable[[str], None],
              should_stop: Callable[[], bool] = lambda: False, stop_after_batches: int | None = None,
              progress: bool = True) -> Summary:
    """Render ``jobs`` (this rank's share) into batch.out; see the module docstring."""
    out = Path(batch.out)
    manifest = Manifest(out)
    summary = Summary()
    ledger = _Ledger(summary, manifest, notify, {})
    todo = _still_to_render(jobs, {} if batch.force else manifest.finished(), ledger)
    started = time.perf_counter()
    buckets: dict[tuple, list[Job]] = {}
    for job in todo:
        try:
            size = output_size(job)
        except FastNSTError as exc:
            ledger.fail(job, str(exc))
            continue
        buckets.setdefault(bucket_key(job, size), []).append(job)
    batches_run, models, runtimes = 0, {}, {}
    hooks = Hooks(progress=progress, should_stop=should_stop)
    for (size, _), members in buckets.items():
        config = members[0].config
        per_batch = (int(batch.batch_size) if batch.batch_size != "auto"
                     else auto_batch_size(config, device, size[0], size[1], len(members), models))
        key = (config.weights, config.pooling, feature_layers(config), config.precision, config.backend,
               config.cuda_graph)
        bucket_hooks = dataclasses.replace(hooks, report_every=config.report_every)
        for start in range(0, len(members), per_batch):
            if should_stop() or (stop_after_batches is not None and batches_run >= stop_after_batches):
                summary.interrupted = True
                break
            if key not in runtimes:  # one network per weights and layers, built when first needed
                runtimes[key] = resolve_runtime(config, device)
            summary.precision = runtimes[key].precision
            _render_batch(members[start:start + per_batch], size, runtimes[key], ledger, bucket_hooks)
            batches_run += 1
            if summary.interrupted:
                break
        if summary.interrupted:
            break
    summary.seconds = time.perf_counter() - started
    return summary


def _load_job(job: Job, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(original content, content and styles as the transfer sees them) of one job; FastNSTError
    for an input that cannot take part."""
    config = job.config
    if config.content_mask or config.style_mask:
        raise FastNSTError("--content-mask/--style-mask work with stylize, not yet with batch")
    content = resized(load_image(job.content), config.size, config.resample)
    if content.size != size:
        raise FastNSTError(f"'{job.content}' decodes to another size than its header says")
    style_images = [resized_style(load_image(s), config.size, config.style_scale, config.resample)
                    for s in job.styles]
    if config.init not in INITS:
        load_image(config.init)  # an --init image that cannot be read fails this job alone
    layers = feature_layers(config)
    check_fits(content, layers, "content image")
    for image in style_images:
        check_fits(image, layers, "style image")
    original = image_to_tensor(content)
    prepared, styles = color.prepare_inputs(config.preserve_color, original,
                                            [image_to_tensor(image) for image in style_images])
    return original, prepared, styles


def _render_batch(jobs: list[Job], size: tuple[int, int], runtime: Runtime, ledger: _Ledger, hooks: Hooks) -> None:
    """Load, optimise and write one batch; a job whose inputs fail to load is dropped from it."""
    loaded, ready = [], []
    for job in jobs:
        try:
            loaded.append(_load_job(job, size))
            ready.append(job)
        except FastNSTError as exc:
            ledger.fail(job, str(exc))
    if not ready:
        return
    device, config = runtime.device, ready[0].config
    content = torch.cat([prepared for _, prepared, _ in loaded]).to(device)
    styles = [[style.to(device) for style in own] for _, _, own in loaded]
    start = torch.cat([initial_image(job.config.init, content[b:b + 1], styles[b][0], job.config.seed,
                                     job.config.preserve_color)
                       for b, job in enumerate(ready)])
    began = time.perf_counter()
    try:
        run = build_run(runtime, config, Inputs(content=content, styles=styles, start=start))
        label = f"batch of {len(ready)} at {size[0]}x{size[1]}"
        result = run.optimise(config.iterations, dataclasses.replace(hooks, label=label))
    except (FastNSTError, torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        message = first_line(exc)
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            message = f"out of memory with a batch of {len(ready)}; use a smaller --batch-size"
        for job in ready:
            ledger.fail(job, message)
        return
    if result.interrupted:
        ledger.summary.interrupted = True  # the batch in flight is not written; a rerun redoes it
        return
    seconds = time.perf_counter() - began
    for b, (job, (original, _, _)) in enumerate(zip(ready, loaded)):
        try:
            image = color.finish(job.config.preserve_color, result.image[b:b + 1], original)
            save_image(image, job.output, 16 if job.config.output_16bit else 8, read_metadata(job.content))
        except FastNSTError as exc:
            ledger.fail(job, str(exc))
            continue
        ledger.record(Outcome(job=job.id, status="done", output=str(job.output), seconds=seconds / len(ready),
                          loss=result.sample_losses[b], size=size, iterations=result.iterations,
                          batch=len(ready), recipe=job_recipe(job, ledger.fingerprints)))
    pixels = size[0] * size[1]
    ledger.summary.megapixel_iterations += len(ready) * pixels * result.iterations / 1e6
    ledger.summary.model_flops += len(ready) * model_flops(size[1], size[0]) * result.iterations
    ledger.notify(f"batch of {len(ready)} at {size[0]}x{size[1]}: {seconds:.1f} s, "
           f"{len(ready) / seconds:.2f} images/s")


def throughput(summary: Summary, device_name: str) -> dict:
    """images/s, megapixel-iterations/s and, for known GPUs, the share of peak by the cost model."""
    seconds = max(summary.seconds, 1e-9)
    report = {"images": len(summary.done), "failed": len(summary.failed), "skipped": summary.skipped,
              "replaced": summary.replaced,
              "seconds": summary.seconds, "images_per_second": len(summary.done) / seconds,
              "megapixel_iterations_per_second": summary.megapixel_iterations / seconds,
              "model_tflops": summary.model_flops / seconds / 1e12, "utilisation": None}
    peak = peak_tflops(device_name, summary.precision or "fp32")
    if peak:
        report["utilisation"] = report["model_tflops"] / peak
    return report


def merge_summaries(summaries: list[Summary]) -> Summary:
    merged = Summary()
    for s in summaries:
        merged.outcomes += s.outcomes
        merged.skipped += s.skipped
        merged.replaced += s.replaced
        merged.seconds = max(merged.seconds, s.seconds)
        merged.megapixel_iterations += s.megapixel_iterations
        merged.model_flops += s.model_flops
        merged.interrupted |= s.interrupted
        merged.precision = merged.precision or s.precision
    return merged

