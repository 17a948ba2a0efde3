"""The command line of `vsearch model add-text-encoder` (the work is in text_search.py; this module
imports nothing heavy)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _at_least_two(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2, got {value}")
    return value


def register(commands: argparse._SubParsersAction) -> None:
    attach = commands.add_parser(
        "add-text-encoder",
        help="let a prepared dual-encoder model (CLIP-style) search by words: add its text tower",
        description=(
            "Copy a dual encoder's text tower (ONNX, taking input_ids and optionally attention_mask, int64) and "
            "its tokenizer (a Hugging Face tokenizer.json, or a BERT-style vocab.txt) into MODEL_DIR/text/, check "
            "that they give vectors of the model's dimension, and write the card with a dual_encoder text section "
            "and a new version. The image tower must already be prepared into MODEL_DIR (`vsearch model prepare "
            "--source ... --feature-tensor ... --pooling none`). See docs/models.md#search-by-words."
        ),
    )
    attach.add_argument("--model-dir", type=Path, required=True, help="the prepared image tower")
    attach.add_argument("--encoder", type=Path, required=True, help="the text tower's ONNX file")
    attach.add_argument("--tokenizer", type=Path, required=True,
                        help="tokenizer.json (any Hugging Face tokenizer) or vocab.txt (WordPiece)")
    attach.add_argument("--output", required=True, help="the text tower's output to use, e.g. text_embeds")
    attach.add_argument("--pooling", choices=["none", "mean", "cls"], default="none",
                        help="none for an output that is already [N, D] (default); mean (over the attention mask) or "
                             "cls for token outputs [N, L, D]")
    attach.add_argument("--max-length", type=_at_least_two, default=77,
                        help="tokens per text, special ones included (default 77, CLIP's)")
    attach.add_argument("--pad-to-max-length", action="store_true",
                        help="pad every text to --max-length (exports with a fixed sequence length)")
    attach.add_argument("--pad-id", type=int, default=0, help="the padding token's id (default 0)")
    attach.add_argument("--cased", action="store_true", help="vocab.txt only: do not lower-case the text")
    attach.add_argument("--json", action="store_true", help="print the result as one JSON object")
    attach.set_defaults(func=run_attach)


def run_attach(args: argparse.Namespace) -> int:
    from vsearch_cli.model_tools.text_search import TextSearchError, attach_text_encoder
    from embedder_svc.model_card import ModelCardError

    try:
        card = attach_text_encoder(
            args.model_dir, args.encoder, args.tokenizer, output=args.output, pooling=args.pooling,
            max_length=args.max_length, pad_to_max_length=args.pad_to_max_length, pad_id=args.pad_id,
            lowercase=not args.cased,
        )
    except (TextSearchError, ModelCardError, OSError) as error:
        print(f"vsearch model add-text-encoder: {error}", file=sys.stderr)
        return 1
    assert card.text is not None
    if args.json:
        print(json.dumps({"model_dir": str(args.model_dir), "name": card.name, "version": card.version,
                          "tokenizer": card.text.tokenizer.kind, "dimension": card.text.dimension}))
        return 0
    print(f"{card.name} searches by words now ({card.text.tokenizer.kind} tokenizer, {card.text.dimension}-d); "
          f"version {card.version}")
    return 0
