"""The ``rectonnx`` command: rewrite, explain, export-triton, info, demo.

Every error a user can cause (a missing file, a model with unsupported ops, a bad option) ends
in one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import click

from .errors import RectonnxError
from .methods import METHOD_NAMES
from .rewrite import RUNTIMES
from .threshold import ALGORITHMS

METHOD_CHOICE = click.Choice(METHOD_NAMES)


def friendly_errors(function):
    """Turn the errors a user can cause into ``error: <one line>`` and exit status 2."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (RectonnxError, ValueError, OSError) as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            click.echo(f"error: {message}", err=True)
            sys.exit(2)
    return wrapper


def method_options(function):
    """--method/--q/--tau/--padding-trick/--prr, shared by rewrite and explain."""
    options = [
        click.option("--method", "-m", type=METHOD_CHOICE, default="rectgrad", show_default=True,
                     help="Attribution method."),
        click.option("--q", type=click.FloatRange(0, 100), default=98.0, show_default=True,
                     help="RectGrad: per-layer percentile of importance scores."),
        click.option("--tau", type=float, default=None,
                     help="RectGrad: constant threshold instead of the percentile."),
        click.option("--padding-trick", is_flag=True,
                     help="Zero gradients whose receptive field covers conv padding."),
        click.option("--prr", is_flag=True,
                     help="Max-pool backward by proportional redistribution."),
        click.option("--input-name", default=None, help="The image input, for multi-input models."),
        click.option("--output-name", default=None, help="The score output, for multi-output models."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rectonnx")
def main():
    """Explain any ONNX image classifier with Rectified Gradient and friends."""


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
              help="Where to write the explainer graph (.onnx).")
@method_options
@click.option("--threshold", type=click.Choice(ALGORITHMS), default="topk",
              show_default=True, help="RectGrad percentile algorithm (same result): topk is "
                                      "fastest on CPU; bisect uses no TopK (TensorRT-safe).")
@click.option("--q-input", is_flag=True,
              help="RectGrad: make q an optional graph input (float64 [1] or [N]; default --q).")
@click.option("--runtime", type=click.Choice(RUNTIMES), default="any",
              show_default=True, help="any: ops every tested runtime runs; onnxruntime-cpu: "
                                      "also MaxUnpool (faster there, absent from OpenVINO).")
@friendly_errors
def rewrite(model, output, method, q, tau, padding_trick, prr, input_name, output_name,
            threshold, q_input, runtime):
    """Write the explainer graph of MODEL (inputs: image, target; outputs: logits, attribution)."""
    import onnx

    from .rewrite import rewrite as rewrite_model

    started = time.perf_counter()
    graph = rewrite_model(model, method, q=q, tau=tau, padding_trick=padding_trick, prr=prr,
                          input_name=input_name, output_name=output_name, threshold=threshold,
                          q_input=q_input, runtime=runtime)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(graph, output)
    click.echo(f"wrote {output}: {method}, {len(graph.graph.node)} nodes, "
               f"{time.perf_counter() - started:.2f} s")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--input-name", default=None)
@click.option("--output-name", default=None)
@friendly_errors
def info(model, input_name, output_name):
    """Inputs, outputs, operators of MODEL, and which ops rectonnx can differentiate."""
    from .info import coverage_report

    click.echo(coverage_report(model, input_name=input_name, output_name=output_name))


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("images", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output directory (attributions, heatmaps, manifest.jsonl); re-running the "
                   "same command resumes where it stopped.")
@method_options
@click.option("--threshold", type=click.Choice(ALGORITHMS), default="topk",
              show_default=True, help="RectGrad percentile algorithm (same result): topk is "
                                      "fastest on CPU; bisect uses no TopK (TensorRT-safe).")
@click.option("--target", type=int, default=-1, show_default=True,
              help="Class to explain; negative = the predicted class.")
@click.option("--size", type=int, default=None, help="Input size (default: the model's).")
@click.option("--resize", type=int, default=None,
              help="Resize the shorter side to this, then centre-crop to --size.")
@click.option("--mean", type=str, default=None, help="Per-channel mean, e.g. 0.485,0.456,0.406.")
@click.option("--std", type=str, default=None, help="Per-channel std, e.g. 0.229,0.224,0.225.")
@click.option("--preset", type=click.Choice(["imagenet", "minus1to1", "unit"]), default=None,
              help="Normalisation preset (default: the model's sidecar JSON, else unit).")
@click.option("--format", "fmt", type=click.Choice(["npy", "npz", "shards"]), default="npy",
              show_default=True, help="One .npy or compressed .npz per image, or sharded .npz "
                                      "files of --shard-size maps.")
@click.option("--shard-size", type=click.IntRange(1), default=256, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--memory-budget", default=None,
              help="Lower the batch size so activations fit, e.g. 2GB.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="auto: CUDA when onnxruntime can use it, else CPU.")
@click.option("--workers", type=click.IntRange(1), default=None,
              help="Image decoding threads (default: CPU count, at most 8).")
@click.option("--png/--no-png", default=True, show_default=True, help="Write heatmap PNGs.")
@click.option("--overlay/--no-overlay", default=True, show_default=True,
              help="Also write the heatmap over the image.")
@click.option("--ray", "use_ray", is_flag=True,
              help="Run on Ray: an actor pool of explainers (pip install 'rectonnx[ray]').")
@click.option("--ray-address", default=None,
              help="Ray cluster to join (default: a local Ray instance).")
@click.option("--actors", type=click.IntRange(1), default=None,
              help="Ray: explainer actors (default: one per CPU, or per GPU with --gpus).")
@click.option("--gpus", "gpus_per_actor", type=click.FloatRange(0), default=0.0,
              help="Ray: GPUs per actor (e.g. 1, or 0.5 to share one).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@friendly_errors
def explain(model, images, out_dir, method, q, tau, padding_trick, prr, input_name, output_name,
            threshold, target, size, resize, mean, std, preset, fmt, shard_size, batch_size,
            memory_budget, device, workers, png, overlay, use_ray, ray_address, actors,
            gpus_per_actor, progress):
    """Explain every image in IMAGES (files, directories, globs, .txt lists) with MODEL."""
    from .batch import explain_images, preprocess_for

    preprocess = preprocess_for(model, size=size, resize=resize, mean=mean, std=std,
                                preset=preset)
    options = dict(preprocess=preprocess, method=method, q=q, tau=tau,
                   padding_trick=padding_trick, prr=prr, input_name=input_name,
                   output_name=output_name, threshold=threshold, target=target,
                   batch_size=batch_size,
                   memory_budget=memory_budget, fmt=fmt, shard_size=shard_size, write_png=png,
                   write_overlay=overlay, progress=progress)
    try:
        if use_ray:
            from .distributed import explain_images_ray

            summary = explain_images_ray(model, images, out_dir, address=ray_address,
                                         actors=actors, gpus_per_actor=gpus_per_actor,
                                         **options)
        else:
            summary = explain_images(model, images, out_dir, device=device, workers=workers,
                                     **options)
    except KeyboardInterrupt:
        click.echo(f"interrupted: finished images are listed in {out_dir}/manifest.jsonl; "
                   "run the same command again to resume", err=True)
        sys.exit(130)
    click.echo(summary.text())
    if summary.explained == 0 and summary.resumed == 0:
        sys.exit(2)


@main.command("export-triton")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--repo", required=True, type=click.Path(file_okay=False),
              help="Triton model repository to write into.")
@click.option("--name", default=None, help="Model name in the repository (default: the "
                                           "file's stem and the method, e.g. resnet_rectgrad).")
@click.option("--version", type=click.IntRange(1), default=1, show_default=True)
@method_options
@click.option("--threshold", type=click.Choice(ALGORITHMS), default="topk",
              show_default=True, help="RectGrad percentile algorithm (same result): topk is "
                                      "fastest on CPU; bisect uses no TopK (TensorRT-safe).")
@click.option("--max-batch-size", type=click.IntRange(0), default=32, show_default=True,
              help="Largest batch Triton forms (0: no batching, dims include the batch).")
@click.option("--max-queue-delay-us", type=click.IntRange(0), default=1000, show_default=True,
              help="Dynamic batching: how long a request may wait for others.")
@click.option("--instance", "instance_kind", type=click.Choice(["auto", "cpu", "gpu"]),
              default="auto", show_default=True, help="Where Triton runs the instances.")
@click.option("--instances", "instance_count", type=click.IntRange(1), default=1,
              show_default=True, help="Model instances per device.")
@click.option("--q-input", is_flag=True,
              help="RectGrad: make q an optional per-request input (FP64; default --q).")
@click.option("--force", is_flag=True, help="Replace an existing version directory.")
@friendly_errors
def export_triton(model, repo, name, version, method, q, tau, padding_trick, prr, input_name,
                  output_name, threshold, max_batch_size, max_queue_delay_us, instance_kind,
                  instance_count, q_input, force):
    """Write MODEL's explainer graph as a Triton model repository entry (onnxruntime backend)."""
    from .serve import export_triton as export

    written = export(model, repo, name=name, version=version, method=method, q=q, tau=tau,
                     padding_trick=padding_trick, prr=prr, input_name=input_name,
                     output_name=output_name, threshold=threshold, max_batch_size=max_batch_size,
                     max_queue_delay_us=max_queue_delay_us, instance_kind=instance_kind,
                     instance_count=instance_count, q_input=q_input, overwrite=force)
    click.echo(f"wrote {written.model_file} and {written.config_file}")
    click.echo(written.summary())


@main.command()
@click.option("--out", "out_dir", default="rectonnx-demo", show_default=True,
              type=click.Path(file_okay=False), help="Where to write the pictures.")
@friendly_errors
def demo(out_dir):
    """Compare the methods on the shipped models and photos; writes PNG grids."""
    from .demo import run_demo

    for line in run_demo(Path(out_dir)):
        click.echo(line)


@main.command()
@click.option("--out", "out_dir", default="rectonnx-eval", show_default=True,
              type=click.Path(file_okay=False), help="Report directory.")
@click.option("--cifar10", type=click.Path(exists=True, file_okay=False), default=None,
              help="A local CIFAR-10 (python version) directory instead of digits on photos.")
@click.option("--paper", is_flag=True, help="The paper's protocol: 20 epochs, 3 networks per "
              "ROAR/KAR point trained from scratch, width 1, more data (a day or more on two "
              "CPU cores; hours with --device cuda).")
@click.option("--train-size", type=click.IntRange(10), default=None,
              help="Training images [2000; --paper: 20000 or all of CIFAR-10].")
@click.option("--test-size", type=click.IntRange(10), default=None,
              help="Test images [500; --paper: 2000 or all of CIFAR-10].")
@click.option("--epochs", type=click.IntRange(1), default=None, help="Training epochs [10].")
@click.option("--width", type=click.FloatRange(0.05), default=None,
              help="Channel multiplier of the paper's CNN [0.5; --paper: 1].")
@click.option("--retrain", type=click.Choice(["finetune", "scratch"]), default=None,
              help="ROAR/KAR networks: fine-tuned from the trained one, or from scratch "
              "(the paper) [finetune].")
@click.option("--retrain-epochs", type=click.IntRange(1), default=None,
              help="Epochs of ROAR/KAR fine-tuning [2] (scratch uses --epochs).")
@click.option("--repeats", type=click.IntRange(1), default=None,
              help="Networks per ROAR/KAR point [1].")
@click.option("--roar-target", type=click.Choice(["predicted", "label"]), default=None,
              help="Class whose maps rank the pixels in ROAR/KAR [predicted].")
@click.option("--fractions", default=None, help="ROAR/KAR fractions [0.1,0.3,0.5,0.7,0.9].")
@click.option("--methods", default=None, help="Comma-separated methods [random,saliency,"
              "grad_input,guided_backprop,smoothgrad,integrated_gradients,deeplift,rectgrad].")
@click.option("--experiments", default=None, help="Comma-separated subset of occlusion,noise,"
              "roar_kar,sensitivity,q_sweep,layers [all].")
@click.option("--seed", type=int, default=None, help="Seed of data, training and noise [0].")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="Torch threads of the main process [1].")
@click.option("--workers", type=click.IntRange(1), default=None,
              help="Processes that retrain ROAR/KAR networks in parallel [CPU cores; 1 on GPU].")
@click.option("--device", default=None, help="Torch device for training, e.g. cuda [cpu].")
@click.option("--progress/--no-progress", default=True, show_default=True)
@friendly_errors
def evaluate(out_dir, paper, **options):
    """Reproduce the paper's experiments (Table 1, Figures 6-9) and write a report directory."""
    from .evaluate import configure, run

    config = configure(out=out_dir, paper=paper, **options)
    results = run(config, command="rectonnx " + " ".join(sys.argv[1:]))
    click.echo(f"wrote {Path(out_dir) / 'summary.md'} in {results['timings_s']['total']:.0f} s")


if __name__ == "__main__":  # pragma: no cover
    main()
