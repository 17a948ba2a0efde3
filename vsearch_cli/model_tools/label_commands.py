"""The command lines of the tools that learn from a catalog's labels: `vsearch model adapt` and
`vsearch model calibrate` (the work is in adapt.py and calibrate.py; this module imports nothing heavy)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _labelled_set_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", type=Path, required=True, help="the prepared model (model.onnx + model_card.json)")
    parser.add_argument("--images", type=Path, required=True, metavar="ROOT", help="folder the CSV's paths are relative to")
    parser.add_argument("--labels", type=Path, required=True, metavar="CSV", help="labels CSV with a header row")
    parser.add_argument("--path-col", default="path")
    parser.add_argument("--label-col", default="label")
    parser.add_argument("--split-col", help="column naming each row's split (with --fit-split)")
    parser.add_argument("--fit-split", help="fit on the rows of this split; the other rows are the held-out check "
                                            "(default: a seeded quarter of each label's images is held out)")
    parser.add_argument("--exclude-label", action="append", default=[], metavar="LABEL",
                        help="rows of this label are never fitted on nor queries (they stay among the neighbours "
                             "as distractors), e.g. BACKGROUND_Google; repeatable")
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="images per model run (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out pick, the folds and the halves")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def register(commands: argparse._SubParsersAction) -> None:
    adapt = commands.add_parser(
        "adapt",
        help="fit a prepared model to a catalog's labels (LDA head), refusing if it retrieves worse",
        description=(
            "Embed labelled images with a prepared model (in-process, as the embedder does), learn a projection "
            "that pulls same-label images together and pushes others apart (regularised LDA; its shrinkage and "
            "its blend with the source vector, which keeps labels never seen in the fit from collapsing, chosen "
            "on the fit rows alone), then evaluate source and adapted model on the held-out rows side by side "
            "(mAP@100 and the like, as `vsearch eval` scores; also per labels in / not in the fit). A worse "
            "adapted model is refused: exit status 3, nothing written. Otherwise --out gets a model whose graph "
            "ends in the projection and L2 normalisation, with a card recording the adaptation and a "
            "calibration of its scores (hits then carry match_probability), with a new version: re-index."
        ),
    )
    _labelled_set_arguments(adapt)
    adapt.add_argument("--tolerance", type=float, default=0.0,
                       help="largest allowed drop of mAP@100 on the held-out images, absolute (default 0: any drop refuses)")
    adapt.add_argument("--unseen-tolerance", type=float, default=0.02,
                       help="largest drop of mAP@100 on labels held out of the internal validation's fit that the "
                            "chosen blend may cost (default 0.02)")
    adapt.add_argument("--method", choices=("lda", "metric"), default="metric",
                       help="lda: the regularised LDA alone; metric (default): the LDA then fine-tuned with a "
                            "metric-learning loss for the epochs the internal validation chooses (0 keeps the LDA)")
    adapt.add_argument("--name", help="model name on the new card (default: <source name>-adapted)")
    adapt.add_argument("--out", type=Path, required=True, help="directory for the adapted model")
    adapt.set_defaults(func=run_adapt)

    calibrate = commands.add_parser(
        "calibrate",
        help="fit the probability that a hit is relevant given its score, and store it in the model card",
        description=(
            "Embed labelled images with a prepared model, let every fit image query the others (top 100 by "
            "cosine), fit an isotonic regression of 'same label' on the score (and rank, if the log loss on "
            "held-out folds says it helps), check its expected calibration error on the held-out rows, and "
            "write it into the model card (--out: a copy of the model; default: the card in --model-dir "
            "itself), with a new version. The gateway then gives every hit a match_probability."
        ),
    )
    _labelled_set_arguments(calibrate)
    calibrate.add_argument("--out", type=Path, help="write a calibrated copy of the model here (default: update "
                                                    "--model-dir's card in place)")
    calibrate.set_defaults(func=run_calibrate)


def _read_labels(args: argparse.Namespace):  # noqa: ANN202 - a LabelledSplit, imported lazily
    from vsearch_cli.model_tools.labelled_split import read_labelled_split

    return read_labelled_split(
        args.labels, args.images, path_col=args.path_col, label_col=args.label_col, split_col=args.split_col,
        fit_split=args.fit_split, exclude_labels=args.exclude_label, seed=args.seed,
    )


def run_adapt(args: argparse.Namespace) -> int:
    from vsearch_cli.model_tools.adapt import AdaptError, AdaptGuardError, AdaptReport, adapt_model
    from vsearch_cli.model_tools.labelled_split import LabelledSplitError

    def progress(message: str) -> None:
        print(f"vsearch model adapt: {message}", file=sys.stderr, flush=True)

    def show(report: AdaptReport) -> None:
        if args.json:
            print(json.dumps(report.as_json(), default=str))
            return
        print(report.table())
        selection = report.selection
        print(f"\nfit: {report.fit_images} images ({report.labelled}); shrinkage {selection.shrinkage:g}, "
              f"fine-tuning epochs {selection.epochs}, blend {selection.blend:g}, {report.source_dimension}-d -> {report.dimension}-d")
        print(f"guard: map_at_100 {report.guard_source:.4f} -> {report.guard_adapted:.4f} "
              f"({report.guard_adapted - report.guard_source:+.4f}, tolerance {report.tolerance:.4f}) on "
              f"{report.held_out_images} held-out images")

    try:
        labelled = _read_labels(args)
        report = adapt_model(args.model_dir, args.out, labelled, tolerance=args.tolerance,
                             unseen_tolerance=args.unseen_tolerance, name=args.name, batch_size=args.batch_size,
                             seed=args.seed, method=args.method, progress=progress)
    except AdaptGuardError as error:
        show(error.report)
        print(f"vsearch model adapt: {error}", file=sys.stderr)
        return 3
    except (AdaptError, LabelledSplitError) as error:
        print(f"vsearch model adapt: error: {error}", file=sys.stderr)
        return 1
    show(report)
    if not args.json and report.card is not None:
        print(f"calibration: isotonic on {report.calibration_pairs:,} cross-fitted pairs, rank_scale "
              f"{report.rank_scale:g}, held-out ECE {report.calibration_ece:.4f}")
        if report.text_note:
            print(report.text_note)
        print(f"wrote {report.card.name} version {report.card.version} to {report.out_dir}")
        print(f"  serve it with SEARCH_DIMENSION={report.dimension} (re-index): vsearch up --model-dir {report.out_dir}")
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from vsearch_cli.model_tools.calibrate import CalibrateError, calibrate_model, probability_table
    from vsearch_cli.model_tools.labelled_split import LabelledSplitError

    def progress(message: str) -> None:
        print(f"vsearch model calibrate: {message}", file=sys.stderr, flush=True)

    out_dir = args.out or args.model_dir
    try:
        labelled = _read_labels(args)
        report = calibrate_model(args.model_dir, out_dir, labelled, batch_size=args.batch_size, seed=args.seed,
                                 progress=progress)
    except (CalibrateError, LabelledSplitError) as error:
        print(f"vsearch model calibrate: error: {error}", file=sys.stderr)
        return 1
    calibration = report.calibration
    if args.json:
        print(json.dumps({
            "out_dir": str(out_dir), "name": report.card.name, "version": report.card.version,
            "pairs": report.pairs, "fit_images": report.fit_images, "held_out_images": report.held_out_images,
            "held_out_ece": report.held_out_ece, "held_out_on": report.held_out_on,
            "rank_scale": calibration.rank_scale, "knots": len(calibration.score_knots),
            "rank_scale_log_loss": {str(scale): loss for scale, loss in report.rank_losses.items()},
            "seconds": report.seconds,
        }))
        return 0
    print(f"wrote the calibration of {report.card.name} (now version {report.card.version}) to {out_dir}")
    print(f"  isotonic on {report.pairs:,} pairs of {report.fit_images} images, {len(calibration.score_knots)} knots, "
          f"rank_scale {calibration.rank_scale:g}")
    ece = "n/a" if report.held_out_ece is None else f"{report.held_out_ece:.4f}"
    print(f"  expected calibration error {ece} on {report.held_out_on}")
    print(f"  probability at score (rank 1): {probability_table(calibration)}")
    return 0
