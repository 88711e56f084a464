"""Scale out on Ray Data: the same job on a laptop or a cluster (``pip install 'rectonnx[ray]'``).

Ray schedules everything; rectonnx only supplies the work per batch, as a callable class that
``Dataset.map_batches`` runs in an actor pool (``ActorPoolStrategy``), one explainer per CPU or
GPU slot. The driver rewrites the model once; each actor loads that explainer graph
(``Explainer.from_graph``) and keeps its onnxruntime session.

* :func:`explain_dataset` adds ``attribution``, ``logits`` and ``target`` columns to a Ray
  Dataset whose ``column`` holds preprocessed arrays (``[C, H, W]`` per row, as the model).
* :func:`explain_images_ray` is ``rectonnx explain --ray``: the driver plans the job exactly as
  :func:`rectonnx.batch.explain_images` does (resume from the manifest, output names, settings,
  lock) and appends the manifest; the actors decode, explain and write each image's files
  atomically. On a cluster the output directory must be on a file system every node sees.

Ray is started here only when it is not running yet: ``address=None`` starts a local instance
(no dashboard), ``address="auto"`` or ``"ray://host:10001"`` joins a cluster.
"""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .batch import (FORMATS, Item, Job, OutputDir, ResultWriter, Summary, _explain_groups,
                    check_max_pixels, fit_preprocess_to_model, job_settings, load_item,
                    parse_bytes, pixel_preprocess, sidecar)
from .errors import RectonnxError, require
from .images import DEFAULT_MAX_PIXELS, DecodeBudget, Preprocess, iter_image_paths


def _ray():
    """The ``ray`` module with Ray Data, or MissingDependencyError naming the ``ray`` extra."""
    ray = require("ray", "ray", "rectonnx.distributed (explain --ray)")
    require("ray.data", "ray", "rectonnx.distributed (explain --ray)")
    return ray


def ensure_ray(address: str | None = None, num_cpus: int | None = None):
    """Connect to Ray (a running instance, the cluster at ``address``, or a new local one)."""
    import logging

    ray = _ray()
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # rectonnx reports progress itself
    if not ray.is_initialized():
        if address is None:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    return ray


def _explainer_graph(model, method, options: dict, *, input_name=None,
                     output_name=None) -> bytes:
    """The explainer graph as bytes (actors on other nodes need no file; no rewrite there):
    ``model`` rewritten with ``method`` and ``options`` (a spec works too), or ``model`` itself
    when it is an explainer graph whose recorded spec agrees with them."""
    from .artifact import agreeing_explainer
    from .rewrite import rewrite
    from .spec import resolve

    made = agreeing_explainer(model, method, options)
    if made is not None:
        return made.SerializeToString()
    return rewrite(model, resolve(method, **options), input_name=input_name,
                   output_name=output_name).SerializeToString()


def _load(graph: bytes):
    import onnx

    return onnx.load_from_string(graph)


def _slots(ray, actors: int | None, cpus_per_actor: float, gpus_per_actor: float) -> int:
    if actors:
        return actors
    resources = ray.cluster_resources()
    if gpus_per_actor:
        return max(1, int(resources.get("GPU", 0) // gpus_per_actor))
    return max(1, int(resources.get("CPU", 1) // cpus_per_actor))


def _unwrap(exc: BaseException) -> BaseException:
    """The rectonnx error inside a Ray task error, if there is one."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, RectonnxError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


class ExplainerActor:
    """``map_batches`` callable: preprocessed arrays in ``column`` -> attribution columns.
    A token model's other inputs (attention mask, token type ids) come from the columns of
    the same names."""

    def __init__(self, graph: bytes, column: str = "image", threads: int | None = None,
                 **runtime):
        from .runtime import Explainer

        self.column = column
        self.explainer = Explainer.from_graph(_load(graph), threads=threads, **runtime)

    def __call__(self, batch: dict) -> dict:
        missing = [name for name in (self.column, *self.explainer.other_inputs)
                   if name not in batch]
        if missing:
            raise RectonnxError(f"the dataset has no column(s) {missing} (columns: "
                                f"{sorted(batch)}); the explainer reads the model's input from "
                                f"column {self.column!r} and its other inputs from columns of "
                                "their names")
        x = _stacked(batch[self.column])
        others = {name: _stacked(batch[name]) for name in self.explainer.other_inputs}
        result = self.explainer.explain(x, batch.get("target"), **others)
        return {**batch, "attribution": result.attribution, "logits": result.logits,
                "target": result.target}


def _stacked(column: np.ndarray) -> np.ndarray:
    """A column as one array (rows of equal shape that Arrow kept as objects are stacked)."""
    return np.stack(list(column)) if column.dtype == object else column


def explain_dataset(ds, model, method=None, *, column: str = "image",
                    input_name: str | None = None, output_name: str | None = None,
                    batch_size: int = 16, actors: int | None = None, cpus_per_actor: float = 1,
                    gpus_per_actor: float = 0, **options):
    """``ds.map_batches`` with an actor pool of explainers; a ``target`` column is used if
    present (negative = predicted class). ``method`` and ``options`` as for
    ``rectonnx.rewrite``. For a token model ``column`` holds the ids and its other inputs
    (``attention_mask``, ...) are read from the columns of their names. Lazy, like every Ray
    Dataset transform."""
    ray = _ray()
    graph = _explainer_graph(model, method, options, input_name=input_name,
                             output_name=output_name)
    return ds.map_batches(
        ExplainerActor, batch_size=batch_size, batch_format="numpy",
        fn_constructor_kwargs=dict(graph=graph, column=column,
                                   threads=max(1, int(cpus_per_actor)), batch_size=batch_size),
        compute=ray.data.ActorPoolStrategy(size=_slots(ray, actors, cpus_per_actor,
                                                        gpus_per_actor)),
        num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None)


class FileJobActor:
    """``map_batches`` callable of ``explain_images_ray``: paths in, files written, manifest
    records (JSON text) out. A batch in ``shards`` format becomes one shard file."""

    def __init__(self, graph: bytes, method: str, preprocess: dict, out_dir: str, fmt: str,
                 write_png: bool, write_overlay: bool, target: int, classes,
                 threads: int | None = None, workers: int = 2,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, **runtime):
        from .runtime import Explainer

        self.explainer = Explainer.from_graph(_load(graph), threads=threads, spinning=False,
                                              **runtime)
        self.preprocess = Preprocess.from_dict(preprocess)
        self.target, self.write_overlay = target, write_overlay
        self.pool = ThreadPoolExecutor(max(1, workers))
        # the actor's decoding threads share one budget, as the local job's do
        self.max_pixels, self.budget = max_pixels, DecodeBudget.for_pixels(max_pixels)
        output = OutputDir(Path(out_dir))  # the driver holds the lock and made the temp dir
        self.writer = ResultWriter(output, None, fmt=fmt, shard_size=1 << 30,
                                   layout=self.preprocess.layout, method=method,
                                   classes=classes, write_png=write_png,
                                   write_overlay=write_overlay,
                                   shard_name=lambda: f"shard-{uuid.uuid4().hex[:16]}.npz")

    def __call__(self, batch: dict) -> dict:
        items = [Item(Path(p), str(k), str(n))
                 for p, k, n in zip(batch["path"], batch["key"], batch["name"])]
        loaded = list(self.pool.map(
            lambda item: load_item(item, self.preprocess, self.write_overlay,
                                   max_pixels=self.max_pixels, budget=self.budget), items))
        good = [(item, r) for item, r in zip(items, loaded) if not isinstance(r, str)]
        failed = [json.dumps({"input": item.key, "error": r})
                  for item, r in zip(items, loaded) if isinstance(r, str)]
        records = []
        for item, display, attribution, logits, chosen, layers in _explain_groups(
                self.explainer, good, self.target):
            records += self.writer.add(item, attribution, logits, chosen, display, layers)
        records += self.writer.flush()
        rows = [json.dumps(r) for r in records]
        return {"record": np.array(rows + [""] * len(failed), dtype=object),
                "failure": np.array([""] * len(rows) + failed, dtype=object)}


def explain_images_ray(model, sources, out_dir, *, preprocess: Preprocess, method=None,
                       input_name=None, output_name=None, target=-1, batch_size=16,
                       memory_budget=None,
                       fmt="npy", shard_size=None, write_png=True, write_overlay=True,
                       address=None, actors=None, cpus_per_actor=1, gpus_per_actor=0,
                       max_pixels=DEFAULT_MAX_PIXELS, progress=True, **options) -> Summary:
    """:func:`rectonnx.batch.explain_images` on Ray (same outputs, manifest and resume).

    ``shard_size`` is ignored: with ``fmt="shards"`` each Ray batch (``batch_size`` images)
    becomes one ``shard-<id>.npz``. ``max_pixels``: as for the local job, in every actor (whose
    decoding threads share one decode budget).
    """
    from tqdm import tqdm

    from .runtime import Explainer

    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
    check_max_pixels(max_pixels)
    ray = _ray()
    paths = iter_image_paths(sources)
    graph = _explainer_graph(model, method, options, input_name=input_name,
                             output_name=output_name)
    budget = parse_bytes(memory_budget)
    runtime = dict(batch_size=batch_size, memory_budget_mb=budget / 2**20 if budget else None)
    probe = Explainer.from_graph(_load(graph), providers=["CPUExecutionProvider"], **runtime)
    probe.check_target(target, 1)  # clear errors here, before any actor starts
    batch_size = min(batch_size, probe.batch_size)  # fitted to the memory budget
    preprocess = fit_preprocess_to_model(preprocess, probe.input_shape)
    if probe.integer_pixels:
        preprocess = pixel_preprocess(preprocess)
    spec, method = probe.spec, probe.method
    del probe
    settings = job_settings(model, spec=spec, input_name=input_name, output_name=output_name,
                            target=target, preprocess=preprocess, fmt=fmt)
    summary = Summary(Path(out_dir), device="Ray")
    started = time.perf_counter()
    with Job(out_dir, paths, settings, fmt=fmt, write_png=write_png,
             write_overlay=write_overlay) as job:
        summary.resumed = job.resumed
        if not job.items:
            summary.seconds = time.perf_counter() - started
            return summary
        ensure_ray(address)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        size = _slots(ray, actors, cpus_per_actor, gpus_per_actor)
        summary.device = f"Ray, {size} actor(s)"
        rows = [{"path": str(i.path), "key": i.key, "name": i.name} for i in job.items]
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(
            len(rows), size * 4, -(-len(rows) // batch_size))))
        ds = ds.map_batches(
            FileJobActor, batch_size=batch_size, batch_format="numpy",
            fn_constructor_kwargs=dict(
                graph=graph, method=method, preprocess=preprocess.to_dict(),
                out_dir=str(job.output.root.resolve()), fmt=fmt, write_png=write_png,
                write_overlay=write_overlay, target=target,
                classes=sidecar(model).get("classes"), threads=max(1, int(cpus_per_actor)),
                max_pixels=max_pixels, **runtime),
            compute=ray.data.ActorPoolStrategy(size=size),
            num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None)
        bar = tqdm(total=len(rows), unit="img", desc=f"{method} (ray)", disable=not progress,
                   smoothing=0.1)
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                records = [json.loads(r) for r in batch["record"] if r]
                failures = [json.loads(f) for f in batch["failure"] if f]
                job.manifest.append(records)
                job.record_failures([(Item(Path(f["input"]), f["input"], ""), f["error"])
                                     for f in failures], summary)
                bar.update(len(records) + len(failures))
        except Exception as exc:
            inner = _unwrap(exc)
            if inner is None or inner is exc:
                raise
            raise type(inner)(str(inner)) from None
        finally:
            bar.close()
        summary.explained = job.manifest.appended
    summary.seconds = time.perf_counter() - started
    return summary
