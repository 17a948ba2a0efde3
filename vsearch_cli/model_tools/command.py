"""`vsearch model ...`: preparing embedding models for the embedder service, quantizing them to int8
(with an accuracy guard), reducing their vectors with PCA, and writing Triton model repositories for them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vsearch_cli.model_tools.presets import DEFAULT_PRESET, PRESETS


def _shared_dir() -> Path:
    from vsearch_cli.checkout import default_shared_dir

    return default_shared_dir()


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _three_floats(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers (one per channel), got {text!r}")
    return values  # type: ignore[return-value]


def _scale(text: str) -> float:
    """A positive number, or a fraction such as 1/255."""
    try:
        numerator, _, denominator = text.partition("/")
        value = float(numerator) / float(denominator) if denominator else float(numerator)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction such as 1/255, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


# `vsearch model prepare` options that describe a model without a preset (their dest names).
CUSTOM_PREPARE_OPTIONS = ("name", "input_name", "input_size", "input_layout", "resize_shorter", "interpolation",
                          "channel_order", "pixel_scale", "mean", "std")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `model` command to the main CLI's subparsers; handlers are `args.func(args) -> int`."""
    model = subparsers.add_parser(
        "model", help="prepare, quantize, reduce and export embedding models",
        description=("Prepare embedding models, quantize them to int8, reduce their vectors with PCA, write Triton "
                     "model repositories for them."),
    )
    commands = model.add_subparsers(dest="model_command", metavar="COMMAND", required=True)

    prepare = commands.add_parser(
        "prepare",
        help="turn a classification ONNX model into an embedding model",
        description=(
            "Cut a classification ONNX model at a feature tensor, append pooling and L2 normalisation, and "
            "write model.onnx + model_card.json into --out (the embedder's EMBEDDER_MODEL_DIR). With a preset "
            "the source is --source, else $VSEARCH_SHARED_DIR/models/<preset>/<preset>.onnx, else downloaded; "
            "its checksum is verified. Any other image ONNX model: --source FILE plus the options of the "
            "'custom model' group (any of them makes it one), which say how an image becomes its input."
        ),
    )
    prepare.add_argument("--preset", choices=sorted(PRESETS),
                         help=f"known source model: its checksum, cut and preprocessing (default {DEFAULT_PRESET})")
    prepare.add_argument("--source", type=Path, help="the source ONNX file, instead of the shared copy or a download")
    prepare.add_argument("--feature-tensor", "--output", dest="feature_tensor",
                         help="tensor to cut the graph at: a feature map [N,C,h,w] or a pooled vector [N,D] "
                              "(default: the preset's; for a custom model, its only output)")
    prepare.add_argument("--pooling", choices=["avg", "gem", "none"],
                         help="global pooling of the feature map; none for a tensor that is already a vector "
                              "(default: the preset's; for a custom model or another --feature-tensor, from its "
                              "shape: avg for a map, none for a vector)")
    prepare.add_argument("--gem-p", type=float, default=3.0, help="GeM exponent p (default 3)")
    prepare.add_argument("--skip-checksum", action="store_true",
                         help="accept a --source whose sha256 differs from the preset's (a deliberately different model)")
    prepare.add_argument("--cache-dir", type=Path, help="where downloads are kept (default ~/.cache/vsearch/models)")
    prepare.add_argument("--out", type=Path, required=True, help="directory to write model.onnx and model_card.json into")
    prepare.add_argument("--json", action="store_true", help="print the result as one JSON object")
    custom = prepare.add_argument_group(
        "custom model (no preset; needs --source)",
        "Preprocessing: resize the shorter side, centre-crop to the input size, then per channel "
        "(pixel * scale - mean) / std, in the channel order given. Unset options default to the torchvision "
        "ImageNet convention: RGB, bilinear, shorter side = size / 0.875, scale 1/255, ImageNet mean/std.")
    custom.add_argument("--name", help="model name on the card (default: the source file's name)")
    custom.add_argument("--input-name", help="the image input (default: the model's only input)")
    custom.add_argument("--input-size", "--crop", dest="input_size", type=_positive_int, metavar="N",
                        help="the model's square input, N x N: the centre crop (default: its declared size)")
    custom.add_argument("--input-layout", choices=["auto", "NCHW", "NHWC"],
                        help="the source's input layout; NHWC gets a transpose in front (default auto: NHWC "
                             "when declared [N,H,W,3])")
    custom.add_argument("--resize-shorter", "--resize", dest="resize_shorter", type=_positive_int, metavar="N",
                        help="resize the shorter side to N before the crop (default: size / 0.875)")
    custom.add_argument("--interpolation", choices=["nearest", "bilinear", "bicubic", "lanczos"], help="default bilinear")
    custom.add_argument("--channel-order", choices=["RGB", "BGR"], help="default RGB")
    custom.add_argument("--pixel-scale", "--scale", dest="pixel_scale", type=_scale,
                        help="pixels (0..255) are multiplied by this, e.g. 1/255 (the default) or 1")
    custom.add_argument("--mean", type=_three_floats, metavar="R,G,B",
                        help="per-channel mean subtracted after scaling, in --channel-order (default 0.485,0.456,0.406)")
    custom.add_argument("--std", type=_three_floats, metavar="R,G,B",
                        help="per-channel divisor, in --channel-order (default 0.229,0.224,0.225)")
    prepare.set_defaults(func=run_prepare)

    from vsearch_cli.model_tools import compare as compare_command  # its module imports nothing heavy

    compare_command.register(commands)

    from vsearch_cli.model_tools import label_commands  # adapt and calibrate; imports nothing heavy

    label_commands.register(commands)

    from vsearch_cli.model_tools import text_command  # add-text-encoder; imports nothing heavy

    text_command.register(commands)

    caltech = "$VSEARCH_SHARED_DIR/datasets/caltech101"
    quantize = commands.add_parser(
        "quantize",
        help="int8-quantize a prepared model, refusing if retrieval quality drops",
        description=(
            "Static int8 quantization (QDQ, onnxruntime.quantization) of a prepared embedding model: "
            "quant_pre_process, per-channel int8 weights, activations calibrated on images drawn from a "
            "folder (never the evaluation images). Both models then embed a labelled set in-process and are "
            "scored all-vs-all like `vsearch eval` (relevant = same label); if mAP@100 drops by more than "
            "--tolerance nothing is written and the exit status is 3. Otherwise --out gets model.onnx and a "
            "card recording the quantization, with a new version. Prints size, batch-1/batch-32 latency "
            "and the metrics of both models side by side."
        ),
    )
    quantize.add_argument("--model-dir", type=Path, required=True, help="the prepared float model (model.onnx + model_card.json)")
    quantize.add_argument("--out", type=Path, required=True, help="directory for the int8 model (written only if the guard passes)")
    quantize.add_argument("--name", help="model name on the new card (default: <float name>-int8)")
    quantize.add_argument("--calibration-dir", type=Path,
                          help=f"folder of catalog images to calibrate on, searched recursively (default {caltech}/101_ObjectCategories)")
    quantize.add_argument("--calibration-count", type=_positive_int, default=128,
                          help="images drawn (seeded) from --calibration-dir (default 128)")
    quantize.add_argument("--calibration-method", choices=["minmax", "entropy", "percentile"], default="minmax",
                          help="how activation ranges are chosen (default minmax)")
    quantize.add_argument("--percentile", type=float, default=99.999, help="for --calibration-method percentile (default 99.999)")
    quantize.add_argument("--activation-type", choices=["uint8", "int8"], default="uint8",
                          help="activation type (default uint8: the fast U8S8 kernels of onnxruntime on x86)")
    quantize.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor instead of per output channel")
    quantize.add_argument("--eval-labels", type=Path,
                          help=f"labels CSV of the guard's labelled set (default {caltech}/labels.csv)")
    quantize.add_argument("--eval-images", type=Path, help="folder the CSV's paths are relative to (default: the CSV's folder)")
    quantize.add_argument("--eval-path-col", default="path")
    quantize.add_argument("--eval-label-col", default="label")
    quantize.add_argument("--eval-split-col", default="split")
    quantize.add_argument("--eval-split", help="use only the rows of this split (default: all rows)")
    quantize.add_argument("--eval-per-class", type=_positive_int, default=10,
                          help="at most this many images per label, a seeded pick (default 10)")
    quantize.add_argument("--eval-limit", type=_positive_int, help="at most this many images in all")
    quantize.add_argument("--eval-exclude-label", action="append", metavar="LABEL", default=[],
                          help="no queries of this label (its images stay as distractors), e.g. BACKGROUND_Google; repeatable")
    quantize.add_argument("--tolerance", type=float, default=0.01,
                          help="largest allowed drop of mAP@100, absolute (default 0.01 = 1 point)")
    quantize.add_argument("--latency-runs", type=_positive_int, default=20, help="timed runs per latency figure (median; default 20)")
    quantize.add_argument("--latency-batch-sizes", type=_batch_sizes, default=(1, 32),
                          help="batch sizes timed for both models (default 1,32)")
    quantize.add_argument("--seed", type=int, default=0, help="seed of the calibration and evaluation picks")
    quantize.add_argument("--json", action="store_true", help="print the report as one JSON object")
    quantize.set_defaults(func=run_quantize)

    pca = commands.add_parser(
        "pca",
        help="reduce a prepared model's vectors to fewer dimensions with PCA fitted on catalog images",
        description=(
            "Embed catalog images with a prepared model (in-process, as the embedder does), fit PCA on the "
            "vectors (mean and top --dim components of their covariance, float64) and write into --out a model "
            "whose graph ends in: subtract the mean, project onto the components, L2-normalise. Its card has "
            "the new dimension, records the PCA (explained variance, fit images) and has a new version: "
            "re-index the catalog, with SEARCH_DIMENSION set to --dim (`vsearch up --model-dir` does that)."
        ),
    )
    pca.add_argument("--model-dir", type=Path, required=True, help="the prepared model (model.onnx + model_card.json)")
    fit_images = pca.add_mutually_exclusive_group(required=True)
    fit_images.add_argument("--images", type=Path, metavar="ROOT", help="folder of catalog images, searched recursively")
    fit_images.add_argument("--manifest", type=Path, help="catalog manifest (as for `vsearch index --manifest`)")
    pca.add_argument("--max-images", type=_positive_int, help="fit on at most this many images, a seeded pick (default: all)")
    pca.add_argument("--seed", type=int, default=0, help="seed of the --max-images pick")
    pca.add_argument("--dim", type=int, required=True, help="dimension of the reduced vectors")
    pca.add_argument("--whiten", action="store_true",
                     help="divide each component by the square root of its variance before normalising")
    pca.add_argument("--name", help="model name on the new card (default: <source name>-pca<dim>[w])")
    pca.add_argument("--batch-size", type=_positive_int, default=32, help="images per model run (default 32)")
    pca.add_argument("--out", type=Path, required=True, help="directory for the reduced model")
    pca.add_argument("--json", action="store_true", help="print the result as one JSON object")
    pca.set_defaults(func=run_pca)

    triton = commands.add_parser(
        "triton-repo",
        help="write a Triton model repository for a prepared model",
        description=(
            "Write <out>/<name>/config.pbtxt and <out>/<name>/<version>/model.onnx for Triton Inference Server. "
            "--flavour gpu (production): onnxruntime backend on GPU, dynamic batching, TensorRT accelerator "
            "(FP16; INT8 for a quantized model), warm-up. --flavour cpu: python backend running the same ONNX "
            "file with onnxruntime (model.py), what the tritonserver of the nvidia-pytriton wheel can serve. "
            "Point the embedder at it with EMBEDDER_BACKEND=triton EMBEDDER_TRITON__URL=host:8001 "
            "(EMBEDDER_MODEL_DIR still names the model directory: its card drives preprocessing)."
        ),
    )
    triton.add_argument("--model-dir", type=Path, required=True, help="the prepared model (model.onnx + model_card.json)")
    triton.add_argument("--out", type=Path, required=True, help="the model repository (other models in it are kept)")
    triton.add_argument("--flavour", choices=["gpu", "cpu"], default="gpu", help="default gpu")
    triton.add_argument("--name", help="model name in the repository (default: the card's name)")
    triton.add_argument("--model-version", type=_positive_int, default=1, help="Triton version directory (default 1)")
    triton.add_argument("--max-batch-size", type=_positive_int, default=64, help="default 64")
    triton.add_argument("--preferred-batch-sizes", type=_batch_sizes,
                        help="dynamic batcher's preferred sizes, e.g. 16,32,64 (default: the three largest powers of two up to the max)")
    triton.add_argument("--max-queue-delay-us", type=int, default=2000,
                        help="how long the dynamic batcher may hold a request for a fuller batch (default 2000)")
    triton.add_argument("--instances", type=_positive_int, default=1, help="model instances (default 1)")
    triton.add_argument("--gpus", type=_batch_sizes, help="gpu flavour: GPU ids for the instances, e.g. 0,1 (default: all)")
    triton.add_argument("--tensorrt-precision", choices=["FP32", "FP16", "INT8"],
                        help="gpu flavour (default: INT8 for a quantized model, else FP16)")
    triton.add_argument("--cpu-threads", type=int, default=0, help="cpu flavour: onnxruntime threads (default 0: all cores)")
    triton.add_argument("--json", action="store_true", help="print the result as one JSON object")
    triton.set_defaults(func=run_triton_repo)


def run_prepare(args: argparse.Namespace) -> int:
    # Imported here: onnx and onnxruntime are slow to import and only this command needs them.
    from vsearch_cli.model_tools.prepare import (
        ChecksumMismatchError,
        ModelPrepareError,
        prepare_custom_model,
        prepare_model,
    )

    custom = {name: getattr(args, name) for name in CUSTOM_PREPARE_OPTIONS if getattr(args, name) is not None}
    try:
        if custom:
            given = ", ".join("--" + name.replace("_", "-") for name in custom)
            if args.preset is not None:
                raise ModelPrepareError(f"a preset fixes the input and preprocessing: drop --preset or {given}")
            if args.source is None:
                raise ModelPrepareError(f"a custom model ({given}) needs --source FILE")
            card = prepare_custom_model(args.out, args.source, feature_tensor=args.feature_tensor,
                                        pooling=args.pooling, gem_p=args.gem_p, **custom)
        else:
            card = prepare_model(
                args.out,
                preset=args.preset or DEFAULT_PRESET,
                source=args.source,
                feature_tensor=args.feature_tensor,
                pooling=args.pooling,
                gem_p=args.gem_p,
                verify_checksum=not args.skip_checksum,
                cache_dir=args.cache_dir,
            )
    except ModelPrepareError as error:
        hint = ""
        if isinstance(error, ChecksumMismatchError) and args.preset is None:
            hint = "; for a model without a preset, describe it with the custom model options (e.g. --input-size)"
        print(f"vsearch model prepare: error: {error}{hint}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({
            "out_dir": str(args.out), "name": card.name, "version": card.version, "dimension": card.output.dimension,
            "feature_tensor": card.feature_tensor, "pooling": card.output.pooling, "gem_p": card.output.gem_p,
            "preprocessing": card.preprocessing_summary(),
        }))
        return 0
    pooling = {"gem": f"GeM p={card.output.gem_p or 0:g} pooling", "avg": "average pooling",
               "none": "already pooled (no pooling added)"}[card.output.pooling]
    print(f"prepared {card.name} version {card.version} in {args.out}")
    print(f"  {card.output.dimension}-d, cut at {card.feature_tensor!r}, {pooling}, L2-normalised")
    print(f"  preprocessing: {card.preprocessing_summary()}")
    return 0


def run_quantize(args: argparse.Namespace) -> int:
    from vsearch_cli.model_tools.quantize import (
        GUARD_METRIC,
        AccuracyGuardError,
        QuantizeError,
        QuantizeReport,
        draw_calibration_images,
        load_labelled_images,
        quantize_embedding_model,
    )

    caltech = _shared_dir() / "datasets" / "caltech101"
    labels = args.eval_labels or caltech / "labels.csv"
    calibration_dir = args.calibration_dir or caltech / "101_ObjectCategories"

    def progress(message: str) -> None:
        print(f"vsearch model quantize: {message}", file=sys.stderr, flush=True)

    def show(report: QuantizeReport) -> None:
        if args.json:
            print(json.dumps({
                "passed": report.passed, "out_dir": str(report.out_dir) if report.out_dir else None,
                "version": report.card.version if report.card else None,
                "float": vars(report.float_model), "int8": vars(report.int8_model),
                "guard_metric": GUARD_METRIC, "drop": report.guard_drop, "tolerance": report.tolerance,
                "eval_set": report.eval_set, "eval_images": report.eval_images,
                "calibration_images": report.calibration_images, "calibration_method": report.calibration_method,
                "qdq_nodes": report.qdq_nodes, "seconds": report.seconds,
            }, default=str))
            return
        print(report.table())
        print(f"\nguard: {GUARD_METRIC} {report.float_model.metrics[GUARD_METRIC]:.4f} -> "
              f"{report.int8_model.metrics[GUARD_METRIC]:.4f} (drop {report.guard_drop:+.4f}, tolerance "
              f"{report.tolerance:.4f}) on {report.eval_set}; calibrated on {report.calibration_images} images "
              f"({report.calibration_method}); {report.qdq_nodes} QDQ nodes; "
              + ", ".join(f"{name} {value:.1f}s" for name, value in report.seconds.items()))

    try:
        eval_set = load_labelled_images(
            labels, args.eval_images, path_col=args.eval_path_col, label_col=args.eval_label_col,
            split_col=args.eval_split_col, split=args.eval_split, per_class=args.eval_per_class,
            limit=args.eval_limit, exclude_labels=args.eval_exclude_label, seed=args.seed,
        )
        calibration = draw_calibration_images(calibration_dir, args.calibration_count, seed=args.seed,
                                              exclude=eval_set.paths)
        report = quantize_embedding_model(
            args.model_dir, args.out, calibration_images=calibration, eval_set=eval_set,
            calibration_method=args.calibration_method, per_channel=not args.per_tensor,
            activation_type=args.activation_type, percentile=args.percentile, tolerance=args.tolerance,
            name=args.name, latency_batches=args.latency_batch_sizes, latency_runs=args.latency_runs,
            progress=progress,
        )
    except AccuracyGuardError as error:
        show(error.report)
        print(f"vsearch model quantize: {error}", file=sys.stderr)
        return 3
    except QuantizeError as error:
        print(f"vsearch model quantize: error: {error}", file=sys.stderr)
        return 1
    show(report)
    if not args.json and report.card is not None:
        print(f"wrote {report.card.name} version {report.card.version} to {report.out_dir}")
    return 0


def _manifest_images(manifest: Path) -> list[Path]:
    """The image paths of the manifest's usable rows, in order, each once."""
    from vsearch_cli.catalog.manifest import ManifestError, check_manifest, read_manifest

    try:
        check_manifest(manifest)
        paths = [row.image_path for row in read_manifest(manifest) if row.error is None and row.image_path]
    except ManifestError as error:
        raise ValueError(str(error)) from None
    return list(dict.fromkeys(paths))


def run_pca(args: argparse.Namespace) -> int:
    from vsearch_cli.model_tools.pca import PcaError, list_images, reduce_model, sample_images

    def progress(message: str) -> None:
        print(f"vsearch model pca: {message}", file=sys.stderr, flush=True)

    try:
        if args.manifest is not None:
            found, source = _manifest_images(args.manifest), f"manifest {args.manifest}"
        else:
            found, source = list_images(args.images), f"{args.images}"
        images = sample_images(found, args.max_images, args.seed)
        fit_set = f"{source}: {len(images)} of {len(found)} images" + (
            f" (seed {args.seed})" if len(images) < len(found) else "")
        report = reduce_model(args.model_dir, args.out, images=images, dimension=args.dim, whiten=args.whiten,
                              name=args.name, fit_set=fit_set, batch_size=args.batch_size, progress=progress)
    except (PcaError, ValueError) as error:
        print(f"vsearch model pca: error: {error}", file=sys.stderr)
        return 1
    card, pca = report.card, report.card.pca
    assert pca is not None
    if args.json:
        print(json.dumps({
            "out_dir": str(report.out_dir), "name": card.name, "version": card.version,
            "source_version": pca.source_version, "source_dimension": pca.source_dimension,
            "dimension": pca.dimension, "whiten": pca.whiten, "fit_images": pca.fit_images,
            "skipped_images": report.skipped_images, "fit_set": pca.fit_set,
            "explained_variance_ratio": pca.explained_variance_ratio, "seconds": report.seconds,
        }))
        return 0
    print(f"wrote {card.name} version {card.version} to {report.out_dir}")
    print(f"  {pca.source_dimension}-d -> {pca.dimension}-d{' (whitened)' if pca.whiten else ''}, "
          f"{pca.explained_variance_ratio:.1%} of the variance kept; fitted on {pca.fit_set}"
          + (f", {report.skipped_images} undecodable left out" if report.skipped_images else ""))
    print(f"  serve it with SEARCH_DIMENSION={pca.dimension}: vsearch up --model-dir {report.out_dir}")
    return 0


def run_triton_repo(args: argparse.Namespace) -> int:
    from embedder_svc.model_card import ModelCardError
    from vsearch_cli.model_tools.triton_repo import TritonRepoError, TritonRepoOptions, tensorrt_precision_for, write_triton_repo

    options = TritonRepoOptions(
        flavour=args.flavour, model_name=args.name, model_version=args.model_version,
        max_batch_size=args.max_batch_size, preferred_batch_sizes=args.preferred_batch_sizes,
        max_queue_delay_us=args.max_queue_delay_us, instance_count=args.instances, gpus=args.gpus or (),
        tensorrt_precision=args.tensorrt_precision, cpu_threads=args.cpu_threads,
    )
    try:
        written = write_triton_repo(args.model_dir, args.out, options)
    except (TritonRepoError, ModelCardError) as error:
        print(f"vsearch model triton-repo: error: {error}", file=sys.stderr)
        return 1
    precision = tensorrt_precision_for(written.card, args.tensorrt_precision) if args.flavour == "gpu" else None
    if args.json:
        print(json.dumps({
            "out_dir": str(args.out), "model_name": written.model_name, "model_version": written.model_version,
            "flavour": args.flavour, "tensorrt_precision": precision, "max_batch_size": args.max_batch_size,
            "config": str(written.config_path), "model_dir": str(args.model_dir),
        }))
        return 0
    detail = f"onnxruntime on GPU, TensorRT {precision}" if args.flavour == "gpu" else "python backend, onnxruntime CPU"
    print(f"wrote {written.model_name} version {written.model_version} ({detail}, max batch {args.max_batch_size}) "
          f"to {args.out}")
    print(f"  config: {written.config_path}")
    print(f"  embedder: EMBEDDER_BACKEND=triton EMBEDDER_TRITON__URL=<triton host>:8001 "
          f"EMBEDDER_TRITON__MODEL_NAME={written.model_name} EMBEDDER_MODEL_DIR={args.model_dir}")
    return 0
