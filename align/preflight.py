"""Before a run builds or writes anything: does what its config names exist?

Loading a config checks keys, types and ranges (align/config.py) and stays free of the
filesystem, so a checkpoint's config loads on a machine without its training data. What needs
the filesystem is checked here, when ``align train`` or ``align eval`` starts: manifests, local
shards, the media root, model folders, open_clip model names and pretrained weights. A typo is
refused in a second with the key that holds it, instead of surfacing as a traceback from a model
factory or a dataloader worker after the model was built and the run folder written. A training
split too small for one step is refused too, once its loader has counted it (before anything
is written).
"""
from __future__ import annotations

import os

from align.config import Config, ConfigError


def check_data_spec(key: str, spec: str) -> None:
    """A manifest must exist; every local shard a spec expands to must exist (``pipe:`` and
    remote URLs are left to the reader, which counts what it cannot read)."""
    from align.data.manifest import is_manifest
    from align.data.shards import expand_spec, local_path

    if is_manifest(spec):
        if not os.path.isfile(spec):
            raise ConfigError(f"{key}: manifest {spec} does not exist")
        return
    try:
        sources = expand_spec(spec)
    except ValueError as error:
        raise ConfigError(f"{key}: {error}") from None
    local = [path for urls in sources for path in map(local_path, urls) if path is not None]
    missing = [path for path in local if not os.path.isfile(path)]
    if missing:
        raise ConfigError(f"{key}: {len(missing)} of the {len(local)} local shards in {spec!r} do not exist, "
                          f"e.g. {missing[0]}")


def check_towers(config: Config) -> None:
    from align.registry import TOWERS

    for modality, tower in config.model.towers.items():
        TOWERS.get(tower.type).check_sources(tower.params, f"model.towers.{modality}")


def check_eval_index(config: Config) -> None:
    """``eval.index``: none, a kind align index knows, or a FAISS factory string for the model's
    width. Checked before training, not at its first evaluation (faiss is imported only then)."""
    index = config.eval.index
    if index == "none":
        return
    from align.index.build import KINDS, check_factory

    if index not in KINDS:
        check_factory(index, config.model.embed_dim, key="eval.index")


def check_run_inputs(config: Config) -> None:
    """Everything a training run reads: its data, its media root and its towers' sources."""
    search = config.data.search_log
    if search.log:
        for key, path in [("data.search_log.log", search.log), ("data.search_log.val", search.val)] + [
                (f"data.search_log.catalogue[{n}]", p) for n, p in enumerate(search.catalogue)]:
            if path and not os.path.isfile(path):
                raise ConfigError(f"{key}: {path} does not exist")
    elif not config.data.train:
        raise ConfigError("data.train is required: a manifest (.csv/.jsonl/.parquet) or a shard spec "
                          "(or data.search_log.log to train on a search log)")
    for key, spec in (("data.train", config.data.train), ("data.val", config.data.val),
                      ("eval.split", config.eval.split)):
        if spec:
            check_data_spec(key, spec)
    if config.model.init_from and not os.path.isdir(config.model.init_from):
        raise ConfigError(f"model.init_from: no such checkpoint folder {config.model.init_from}")
    if config.data.root and not os.path.isdir(config.data.root):
        raise ConfigError(f"data.root: no such folder {config.data.root}")
    resume = config.train.resume
    if resume not in ("", "latest") and not os.path.isfile(os.path.join(resume, "trainer_state.json")):
        raise ConfigError(f"train.resume: {resume} is not a complete checkpoint (no trainer_state.json); "
                          "give a checkpoint folder, 'latest' or ''")
    check_towers(config)
    check_eval_index(config)


def check_train_split_fills_a_step(config: Config, loader, processes: int) -> None:
    """Training drops the tail of an epoch that does not fill a step on every process
    (``drop_last``), so a split smaller than one optimiser step would train on nothing."""
    accum = config.train.accum_steps
    if len(loader) >= accum:
        return
    per_step = config.data.batch_size * processes * accum
    raise ConfigError(f"data.train: {config.data.train} has {loader.rows} rows, fewer than one training step "
                      f"takes ({per_step} = data.batch_size {config.data.batch_size} x {processes} process(es) x "
                      f"train.accum_steps {accum}); lower data.batch_size or train.accum_steps")
