"""The ``rectonnx`` command: rewrite, explain, export-triton, info, demo.

Every error a user can cause (a missing file, a model with unsupported ops, a bad option) ends
in one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
import warnings
from pathlib import Path

import click

from .errors import RectonnxError
from .methods import METHOD_NAMES, METHODS, all_options, methods_taking
from .options import Option

METHOD_CHOICE = click.Choice(METHOD_NAMES)


def _user_errors() -> tuple[type, ...]:
    """What a user can cause: rectonnx's errors, bad values and files (ValueError, OSError;
    JSON decoding errors, PIL's UnidentifiedImageError and NumPy's LinAlgError are among them),
    memory exhausted, Pillow's decompression bomb, and onnxruntime's own errors."""
    errors: tuple[type, ...] = (RectonnxError, ValueError, OSError, MemoryError)
    if "PIL.Image" in sys.modules:
        errors += (sys.modules["PIL.Image"].DecompressionBombError,)
    if "onnxruntime" in sys.modules:  # imported: its errors may come up
        from .runtime import onnxruntime_errors
        errors += onnxruntime_errors()
    return errors


def error_line(exc: BaseException, model=None) -> str:
    """The one line shown for ``exc``; errors of onnxruntime name the ``model`` they ran."""
    from .errors import ExecutionError

    text = str(exc).strip()
    message = text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, MemoryError):
        return (f"out of memory ({message}); use a smaller --batch-size or a --memory-budget, "
                "or a machine with more memory")
    if type(exc).__module__.startswith("onnxruntime"):
        from .runtime import onnxruntime_reason

        message = f"onnxruntime failed: {onnxruntime_reason(exc)}"
    if model is not None and (isinstance(exc, ExecutionError) or message.startswith(
            "onnxruntime failed")) and str(model) not in message:
        message = f"{model}: {message}"
    return message


def friendly_errors(function):
    """Turn the errors a user can cause into ``error: <one line>`` and exit status 2."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except Exception as exc:
            if not isinstance(exc, _user_errors()):
                raise
            click.echo(f"error: {error_line(exc, kwargs.get('model'))}", err=True)
            sys.exit(2)
    return wrapper


@contextlib.contextmanager
def echoed_warnings():
    """Show rectonnx's warnings (e.g. a RectGrad layer too small for q) as ``warning:`` lines."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            yield
        finally:
            for warning in caught:
                if issubclass(warning.category, UserWarning) and \
                        warning.category.__module__.startswith("rectonnx"):
                    click.echo(f"warning: {warning.message}", err=True)


def _default_text(option: Option) -> str:
    defaults = {entry.default(option) for entry in METHODS.values()
                if option in entry.all_options()}
    if option.name == "padding_trick":
        return "exact for rectgrad, off otherwise"
    if option.name in ("layer", "wrt"):
        return "the last feature map before the pooling" if option.name == "layer" \
            else "the input"
    value = next(iter(defaults)) if len(defaults) == 1 else option.default
    return "none" if value is None else str(value)


def _click_option(option: Option):
    """The click option of a declared option; unset (None) means the method's default."""
    takers = methods_taking(option.name)
    where = "" if len(takers) == len(METHOD_NAMES) else f" [{', '.join(takers)}]"
    help_text = f"{option.help}{where} [default: {_default_text(option)}]"
    if option.kind == "bool":
        flag = option.flag[2:]
        return click.option(f"--{flag}/--no-{flag}", option.name, default=None, help=help_text)
    if option.kind == "padding":
        return click.option(option.flag, option.name, type=click.Choice(["exact", "border", "off"]),
                            is_flag=False, flag_value="exact", default=None,
                            help=help_text + " (the flag alone: exact)")
    if option.kind == "choice":
        return click.option(option.flag, option.name, type=click.Choice(option.choices),
                            default=None, help=help_text)
    kind = {"int": int, "text": str}.get(option.kind, float)
    return click.option(option.flag, option.name, type=kind, default=None, help=help_text)


SPEC_OPTION_NAMES = tuple(all_options())


def spec_options(function):
    """--method, one flag per declared option (methods.py) and --input-name/--output-name:
    the options of every command that builds an explainer."""
    options = [click.option("--method", "-m", type=METHOD_CHOICE, default=None,
                            help="Attribution method [default: rectgrad; for an explainer "
                                 "graph: the one it was made with].")]
    options += [_click_option(option) for option in all_options().values()]
    options += [
        click.option("--input-name", default=None,
                     help="The image input, for models with several inputs."),
        click.option("--output-name", default=None,
                     help="The score output, for models with several outputs."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def split_spec(kwargs: dict) -> tuple[str | None, dict]:
    """Take the method and the options set on the command line out of ``kwargs``."""
    method = kwargs.pop("method", None)
    given = {}
    for name in SPEC_OPTION_NAMES:
        value = kwargs.pop(name, None)
        if value is not None:
            given[name] = value
    return method, given


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(package_name="rectonnx")
def main():
    """Explain any ONNX image classifier with Rectified Gradient and friends."""


@main.command(short_help="Write MODEL's explainer graph (one ONNX file).")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
              help="Where to write the explainer graph (.onnx).")
@spec_options
@friendly_errors
def rewrite(model, output, input_name, output_name, **kwargs):
    """Write the explainer graph of MODEL (inputs: image, target; outputs: logits, attribution)."""
    from .fileio import save_model_atomic
    from .rewrite import rewrite as rewrite_model
    from .spec import resolve

    method, given = split_spec(kwargs)
    started = time.perf_counter()
    spec = resolve(method, **given)
    with echoed_warnings():
        graph = rewrite_model(model, spec, input_name=input_name, output_name=output_name)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    save_model_atomic(graph, output)
    click.echo(f"wrote {output}: {spec.describe()}, {len(graph.graph.node)} nodes, "
               f"{time.perf_counter() - started:.2f} s")


@main.command(short_help="Inputs, outputs and ops of MODEL; which are supported.")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--input-name", default=None,
              help="The image input, for models with several inputs.")
@click.option("--output-name", default=None,
              help="The score output, for models with several outputs.")
@friendly_errors
def info(model, input_name, output_name):
    """Inputs, outputs, operators of MODEL, and which ops rectonnx can differentiate.

    When MODEL cannot be rewritten, an error line says why (exit status 2)."""
    from .info import coverage

    report, problem = coverage(model, input_name=input_name, output_name=output_name)
    click.echo(report)
    if problem:
        raise RectonnxError(f"{model} cannot be rewritten: {problem}")


@main.command(short_help="Attribution maps of images, folders, globs and lists.")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("images", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output directory (attributions, heatmaps, manifest.jsonl); re-running the "
                   "same command resumes where it stopped.")
@spec_options
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
@click.option("--shard-size", type=click.IntRange(1), default=256, show_default=True,
              help="Maps per .npz file with --format shards.")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True,
              help="Images per run of the explainer (lowered to fit --memory-budget).")
@click.option("--memory-budget", default=None,
              help="Lower the batch size so activations fit, e.g. 2GB.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="auto: CUDA when onnxruntime can use it, else CPU.")
@click.option("--workers", type=click.IntRange(1), default=None,
              help="Image decoding threads (default: CPU count, at most 8).")
@click.option("--max-pixels", type=click.IntRange(1), default=100_000_000, show_default=True,
              help="Refuse (skip, list in failures.jsonl) images with more pixels; large JPEGs "
                   "are first decoded smaller where --size allows. Decoding threads share a "
                   "memory budget of about two such images.")
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
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show a progress bar.")
@click.option("--tokenizer", default=None, type=click.Path(dir_okay=False, exists=True),
              help="A token model: IMAGES are text files (one text per line) encoded with "
                   "this tokenizers JSON file; writes per-token scores to manifest.jsonl and "
                   "tokens.html.")
@friendly_errors
def explain(model, images, out_dir, input_name, output_name, target, size, resize, mean, std,
            preset, fmt, shard_size, batch_size, memory_budget, device, workers, max_pixels, png,
            overlay, use_ray, ray_address, actors, gpus_per_actor, progress, tokenizer,
            **kwargs):
    """Explain every image in IMAGES (files, directories, globs, .txt lists) with MODEL.

    With --tokenizer, IMAGES are text files and MODEL a token model (one text per line)."""
    from .batch import explain_images, preprocess_for, providers_for

    method, given = split_spec(kwargs)
    if tokenizer is not None:
        from .text import explain_texts

        with echoed_warnings():
            summary = explain_texts(model, images, out_dir, tokenizer=tokenizer, method=method,
                                    input_name=input_name, output_name=output_name,
                                    target=target, batch_size=batch_size,
                                    providers=providers_for(device), **given)
        click.echo(summary.text())
        return
    with echoed_warnings():
        preprocess = preprocess_for(model, size=size, resize=resize, mean=mean, std=std,
                                    preset=preset)
    options = dict(preprocess=preprocess, method=method, input_name=input_name,
                   output_name=output_name, target=target, batch_size=batch_size,
                   memory_budget=memory_budget, fmt=fmt, shard_size=shard_size, write_png=png,
                   write_overlay=overlay, progress=progress, **given)
    try:
        with echoed_warnings():
            if use_ray:
                from .distributed import explain_images_ray

                summary = explain_images_ray(model, images, out_dir, address=ray_address,
                                             actors=actors, gpus_per_actor=gpus_per_actor,
                                             max_pixels=max_pixels, **options)
            else:
                summary = explain_images(model, images, out_dir, device=device,
                                         workers=workers, max_pixels=max_pixels, **options)
    except KeyboardInterrupt:
        click.echo(f"interrupted: finished images are listed in {out_dir}/manifest.jsonl; "
                   "run the same command again to resume", err=True)
        sys.exit(130)
    click.echo(summary.text())
    if summary.explained == 0 and summary.resumed == 0:
        sys.exit(2)


@main.command("export-triton", short_help="Write MODEL as a Triton model repository entry.")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--repo", required=True, type=click.Path(file_okay=False),
              help="Triton model repository to write into.")
@click.option("--name", default=None, help="Model name in the repository (default: the "
                                           "file's stem and the method, e.g. resnet_rectgrad).")
@click.option("--version", type=click.IntRange(1), default=1, show_default=True,
              help="Model version: the numbered directory to write (Triton serves the highest).")
@spec_options
@click.option("--max-batch-size", type=click.IntRange(0), default=32, show_default=True,
              help="Largest batch Triton forms (0: no batching, dims include the batch).")
@click.option("--max-queue-delay-us", type=click.IntRange(0), default=1000, show_default=True,
              help="Dynamic batching: how long a request may wait for others.")
@click.option("--instance", "instance_kind", type=click.Choice(["auto", "cpu", "gpu"]),
              default="auto", show_default=True, help="Where Triton runs the instances.")
@click.option("--instances", "instance_count", type=click.IntRange(1), default=1,
              show_default=True, help="Model instances per device.")
@click.option("--force", is_flag=True, help="Replace an existing version directory.")
@friendly_errors
def export_triton(model, repo, name, version, input_name, output_name, max_batch_size,
                  max_queue_delay_us, instance_kind, instance_count, force, **kwargs):
    """Write MODEL's explainer graph as a Triton model repository entry (onnxruntime backend)."""
    from .serve import export_triton as export

    method, given = split_spec(kwargs)
    with echoed_warnings():
        written = export(model, repo, method, name=name, version=version,
                         input_name=input_name, output_name=output_name,
                         max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us,
                         instance_kind=instance_kind, instance_count=instance_count,
                         overwrite=force, **given)
    click.echo(f"wrote {written.model_file} and {written.config_file}")
    click.echo(written.summary())
    from .serve import model_config_schema, validate_config

    if model_config_schema() is None:
        click.echo("config.pbtxt not validated: pip install 'rectonnx[serve]'")
    else:
        validate_config(written.config_file.read_text())
        click.echo("config.pbtxt validated against Triton's model config schema")


@main.command(short_help="Compare the methods on the shipped models and photos.")
@click.option("--out", "out_dir", default="rectonnx-demo", show_default=True,
              type=click.Path(file_okay=False), help="Where to write the pictures.")
@friendly_errors
def demo(out_dir):
    """Compare the methods on the shipped models and photos; writes PNG grids."""
    from .demo import run_demo

    for line in run_demo(Path(out_dir)):
        click.echo(line)


@main.command(short_help="Run the paper's experiments; write a report directory.")
@click.option("--out", "out_dir", default="rectonnx-eval", show_default=True,
              type=click.Path(file_okay=False), help="Report directory.")
@click.option("--cifar10", type=click.Path(exists=True, file_okay=False), default=None,
              help="A local CIFAR-10 (python version) directory instead of digits on photos.")
@click.option("--paper", is_flag=True, help="The paper's protocol: 20 epochs, 3 networks per "
              "ROAR/KAR point trained from scratch, width 1, more data (a day or more on two "
              "CPU cores; hours with --device cuda).")
@click.option("--quick", is_flag=True, help="A smoke run in about a minute on two CPU cores: "
              "3000 training and 500 test images, 5 epochs, 3 methods, every experiment but "
              "occlusion, ROAR/KAR at fraction 0.5 only (the other options still override). It "
              "shows that everything runs; its numbers mean little.")
@click.option("--train-size", type=click.IntRange(10), default=None,
              help="Training images [1000; --paper: 20000 or all of CIFAR-10].")
@click.option("--test-size", type=click.IntRange(10), default=None,
              help="Test images [500; --paper: 2000 or all of CIFAR-10].")
@click.option("--epochs", type=click.IntRange(1), default=None, help="Training epochs [10].")
@click.option("--width", type=click.FloatRange(0.05), default=None,
              help="Channel multiplier of the paper's CNN [1; --quick: 0.5].")
@click.option("--network", default=None,
              help="auto: reuse the shipped paper CNN (models/paper_cnn_digits.onnx, 0.93) "
              "when the data and width match it, else train; train: always train; or an ONNX "
              "paper CNN's path [auto; --paper, --quick: train].")
@click.option("--retrain", type=click.Choice(["finetune", "scratch"]), default=None,
              help="ROAR/KAR networks: fine-tuned from the trained one, or from scratch "
              "(the paper) [finetune].")
@click.option("--retrain-epochs", type=click.IntRange(1), default=None,
              help="Epochs of ROAR/KAR fine-tuning [1] (scratch uses --epochs).")
@click.option("--repeats", type=click.IntRange(1), default=None,
              help="Networks per ROAR/KAR point, differing in seed [3; --quick: 1].")
@click.option("--roar-target", type=click.Choice(["predicted", "label"]), default=None,
              help="Class whose maps rank the pixels in ROAR/KAR [predicted].")
@click.option("--fractions", default=None, help="ROAR/KAR fractions [0.1,0.5,0.9; --paper: "
              "0.1,0.3,0.5,0.7,0.9].")
@click.option("--methods", default=None, help="Comma-separated methods [random,saliency,"
              "grad_input,guided_backprop,smoothgrad,integrated_gradients,deeplift,rectgrad].")
@click.option("--experiments", default=None, help="Comma-separated subset of occlusion,noise,"
              "roar_kar,sensitivity,q_sweep,layers,sanity,deletion [all].")
@click.option("--seed", type=int, default=None, help="Seed of data, training and noise [0].")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="Torch threads of the main process [1].")
@click.option("--workers", type=click.IntRange(1), default=None,
              help="Processes that retrain ROAR/KAR networks in parallel [CPU cores; 1 on GPU].")
@click.option("--device", default=None, help="Torch device for training, e.g. cuda [cpu].")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show progress bars.")
@friendly_errors
def evaluate(out_dir, paper, quick, **options):
    """Reproduce the paper's experiments (Table 1, Figures 6-9) and write a report directory."""
    from .evaluate import configure, run

    config = configure(out=out_dir, paper=paper, quick=quick, **options)
    results = run(config, command="rectonnx " + " ".join(sys.argv[1:]),
                  warn=lambda message: click.echo(f"warning: {message}", err=True))
    click.echo(f"wrote {Path(out_dir) / 'summary.md'} in {results['timings_s']['total']:.0f} s"
               + ("; it repeats the warning above" if results.get("warnings") else ""))


if __name__ == "__main__":  # pragma: no cover
    main()
