"""`vsearch model ...`: preparing embedding models for the embedder service."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from embedder_svc.model_presets import DEFAULT_PRESET, PRESETS


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `model` command to the main CLI's subparsers; handlers are `args.func(args) -> int`."""
    model = subparsers.add_parser("model", help="prepare embedding models", description="Prepare embedding models.")
    commands = model.add_subparsers(dest="model_command", metavar="COMMAND", required=True)

    prepare = commands.add_parser(
        "prepare",
        help="turn a classification ONNX model into an embedding model",
        description=(
            "Cut a classification ONNX model at a feature tensor, append pooling and L2 normalisation, and "
            "write model.onnx + model_card.json into --out (the embedder's EMBEDDER_MODEL_DIR). The source is "
            "--source, else $VSEARCH_SHARED_DIR/models/<preset>/<preset>.onnx, else downloaded; its checksum "
            "is verified."
        ),
    )
    prepare.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                         help=f"known source model: its checksum, cut and preprocessing (default {DEFAULT_PRESET})")
    prepare.add_argument("--source", type=Path, help="the source ONNX file, instead of the shared copy or a download")
    prepare.add_argument("--feature-tensor", help="tensor to cut the graph at (default: the preset's)")
    prepare.add_argument("--pooling", choices=["avg", "gem"], help="global pooling of the feature map (default: the preset's)")
    prepare.add_argument("--gem-p", type=float, default=3.0, help="GeM exponent p (default 3)")
    prepare.add_argument("--skip-checksum", action="store_true",
                         help="accept a --source whose sha256 differs from the preset's (a deliberately different model)")
    prepare.add_argument("--cache-dir", type=Path, help="where downloads are kept (default ~/.cache/vsearch/models)")
    prepare.add_argument("--out", type=Path, required=True, help="directory to write model.onnx and model_card.json into")
    prepare.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    # Imported here: onnx and onnxruntime are slow to import and only this command needs them.
    from embedder_svc.model_prepare import ModelPrepareError, prepare_model

    try:
        card = prepare_model(
            args.out,
            preset=args.preset,
            source=args.source,
            feature_tensor=args.feature_tensor,
            pooling=args.pooling,
            gem_p=args.gem_p,
            verify_checksum=not args.skip_checksum,
            cache_dir=args.cache_dir,
        )
    except ModelPrepareError as error:
        print(f"vsearch model prepare: error: {error}", file=sys.stderr)
        return 1
    pooling = f"GeM p={card.output.gem_p:g}" if card.output.pooling == "gem" else "average"
    print(f"prepared {card.name} version {card.version} in {args.out}")
    print(f"  {card.output.dimension}-d, cut at {card.feature_tensor!r}, {pooling} pooling, L2-normalised")
    print(f"  preprocessing: {card.preprocessing_summary()}")
    return 0
