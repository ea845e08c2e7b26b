"""The ``align`` command: ``align train | eval | embed | index | search | search-eval | export | serve | rec-train | rec-eval | recommend | prep ...``."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from align.errors import ConfigError, RunError

PREP_TOOLS = {
    "demo": ("data_prep.demo", "build the embedded demo catalogue (deterministic, cached)"),
    "shards": ("data_prep.shards", "catalogue manifest -> webdataset shards + stats.json"),
    "mine-negatives": ("data_prep.mine_negatives", "mine hard negatives with a checkpoint and FAISS"),
    "interactions": ("data_prep.interactions", "validate an interaction log against the catalogue"),
    "shop-sim": ("data_prep.shop_sim", "simulate a shop's users and interactions over a catalogue"),
    "search-log": ("data_prep.search_log", "validate a shop's search log, or simulate one over a catalogue"),
}
# Verbs that own their arguments: name -> (module with main(argv), help).
TOOL_VERBS = {
    "embed": ("align.index.embed", "embed a catalogue with a checkpoint: item vectors per modality and fused"),
    "index": ("align.index.build", "build a FAISS index (exact, HNSW or IVF-PQ) over `align embed` vectors"),
    "search": ("align.search.command", "search a catalogue index by text, image or audio"),
    "search-eval": ("align.searchlog.evaluate", "graded zero-shot evaluation of a checkpoint on a search log's splits"),
    "export": ("align.export.command", "export towers as open_clip, sentence-transformers and ONNX folders"),
    "serve": ("align.serve.app", "serve search (and recommendations) over HTTP with FastAPI + uvicorn"),
    "rec-eval": ("align.rec.evaluate", "evaluate a recommender head and its peers on the held-out interactions"),
    "recommend": ("align.rec.recommend", "top-k items for a user id or a history of item ids"),
    "rec-update": ("align.rec.update", "continue training a recommender head on new events only (warm start)"),
    "map": ("align.map.command", "2-D map of a catalogue's embeddings (PCA, or UMAP) as PNG and offline HTML"),
    "audit": ("align.audit.command", "audit a catalogue: mismatched, duplicate, outlying and unreadable listings"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="align",
        description="Align text, image and audio encoders in one embedding space.",
        epilog="Any config key can be overridden as key.sub=value, e.g. optim.lr=3e-4 train.epochs=2",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB",
                                  title="verbs (align VERB --help for each one's arguments)")

    train = verbs.add_parser("train", help="train a model from a YAML config",
                             description="Train with Accelerate (CPU, one GPU or many; use `accelerate launch`).")
    train.add_argument("--config", "-c", help="YAML config (see configs/)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4")

    evaluate = verbs.add_parser("eval", help="zero-shot retrieval evaluation of a checkpoint",
                                description="Embed a held-out split and report R@1/5/10, median rank and mAP "
                                            "for every ordered pair of modalities.")
    evaluate.add_argument("--checkpoint", required=True, help="checkpoint or export folder (model.safetensors)")
    evaluate.add_argument("--split", help="manifest or shards to evaluate (default: the config's eval split)")
    evaluate.add_argument("--output", help="where to write the JSON (default: <checkpoint>/eval.json)")
    evaluate.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    evaluate.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.batch_size=512")

    for verb, (_, text) in TOOL_VERBS.items():  # listed for --help; main() hands them their arguments
        if verb == "rec-eval":  # the recommender's verbs together, in the order a shop runs them
            rec_train = verbs.add_parser("rec-train", help="train the recommender head from a YAML config",
                                         description="Train the recommender head on item vectors from `align embed` "
                                                     "and an interaction log (configs/rec/).")
            rec_train.add_argument("--config", "-c", help="YAML config (see configs/rec/)")
            rec_train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=5")
        verbs.add_parser(verb, help=text)

    prep = verbs.add_parser("prep", help="make training data", description="Data preparation tools.")
    prep.add_argument("tool", choices=sorted(PREP_TOOLS), help="; ".join(f"{k}: {v[1]}" for k, v in PREP_TOOLS.items()))
    prep.add_argument("args", nargs=argparse.REMAINDER, help="the tool's own arguments (see align prep TOOL --help)")
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.verb == "prep":
        import importlib

        return int(importlib.import_module(PREP_TOOLS[args.tool][0]).main(args.args) or 0)
    if args.verb in TOOL_VERBS:
        import importlib

        return int(importlib.import_module(TOOL_VERBS[args.verb][0]).main(args.tool_args) or 0)
    if args.verb == "rec-train":
        from align.rec.config import load_rec_config

        rec_config = load_rec_config(args.config, args.overrides)  # refused here, before any data is read
        from align.rec.train import train_head

        train_head(rec_config)
        return 0
    if args.verb == "train":
        from align.config import load_config

        config = load_config(args.config, args.overrides)  # refused here, before anything is built
        from align.train.preempt import EXIT_STOPPED, Stopped
        from align.train.recipe import train

        try:
            train(config)
        except Stopped as stopped:  # saved; a requeued SLURM job or the same command goes on
            print(f"align train: {stopped}", file=sys.stderr)
            return EXIT_STOPPED
        return 0
    from align.eval.runner import evaluate_checkpoint

    evaluate_checkpoint(args.checkpoint, args.split, args.overrides, args.output, args.device)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Run one verb. A bad config ends with its message and exit 2 before any work; an expected
    failure during the run (too many bad samples, a missing file, a full disk, an unsafe
    checkpoint file) with its message and exit 1. Anything else is a bug and keeps its traceback."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for chatty in ("accelerate", "open_clip", "faiss"):  # their INFO lines drown the progress bar
        logging.getLogger(chatty).setLevel(logging.WARNING)
    # open_clip logs its INFO lines on the root logger itself; ours all have names (align.*)
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: record.name != "root" or record.levelno >= logging.WARNING)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOL_VERBS:  # these parse their own arguments, --help included
        args = argparse.Namespace(verb=argv[0], tool_args=argv[1:])
    elif not argv:  # the verbs and what each does, rather than argparse's "arguments are required"
        _parser().print_help(sys.stderr)
        return 2
    else:
        args = _parser().parse_args(argv)
    verb = args.verb if args.verb != "prep" else f"prep {args.tool}"
    try:
        return _run(args)
    except ConfigError as error:
        print(f"align {verb}: config error: {error}", file=sys.stderr)
        return 2
    except RunError as error:
        print(f"align {verb}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
