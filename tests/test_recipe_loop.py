"""The loop's schedule: one periodic path evaluates and saves every N steps, or at each epoch's
end when N is 0 (an epoch that ends on the run's last step is left to the final evaluation);
the trainer state round-trips through its JSON dict."""
import json
from types import SimpleNamespace

import torch

from align.config import Config
from align.data.bad_samples import BadSampleTally, take_bad_report
from align.train import recipe
from align.train.checkpoint import TrainState
from align.train.recipe import Run, end_epoch, train_epoch


class FakeLoader:
    bad = BadSampleTally()

    def iterate(self, epoch, skip_batches=0, count_bad=True):
        for index in range(skip_batches, 5):  # 5 batches: 2 steps of 2, one batch left over
            batch = {"ids": [f"{epoch}-{index}"], "bad": {"seen": 1, "skipped": []}}
            yield take_bad_report(batch, self.bad) if count_bad else batch


def schedule(monkeypatch, eval_every, save_every, total_steps=4):
    done = []
    monkeypatch.setattr(recipe, "optimizer_step", lambda *args: {"loss": torch.tensor(1.0)})
    monkeypatch.setattr(recipe, "_evaluate", lambda accelerator, model, config, step: done.append(("eval", step)))
    monkeypatch.setattr(recipe.checkpoint, "save_checkpoint",
                        lambda accelerator, objective, optimizer, scheduler, config, out, state, keep, bad=None:
                        done.append(("save", state.step)))
    config = Config()
    config.train.accum_steps, config.train.log_every = 2, 1
    config.train.eval_every, config.train.save_every = eval_every, save_every
    accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=1, unwrap_model=lambda o: o,
                                  reduce=lambda t, reduction: t, log=lambda *a, **k: None)
    scheduler = SimpleNamespace(step=lambda: None, get_last_lr=lambda: [0.1])
    run = Run(accelerator, config, SimpleNamespace(model=None), None, scheduler, FakeLoader(), total_steps)
    state = TrainState()
    while state.step < total_steps:
        if train_epoch(run, state):
            end_epoch(run, state)
    return done, state


def test_epoch_end_when_every_is_zero_never_at_the_last_step(monkeypatch):
    done, state = schedule(monkeypatch, eval_every=0, save_every=0)
    assert done == [("eval", 2), ("save", 2)]
    assert state == TrainState(step=4, epoch=1, batch_in_epoch=4, samples=8)


def test_every_n_steps_including_the_last(monkeypatch):
    done, _ = schedule(monkeypatch, eval_every=3, save_every=2, total_steps=5)
    assert done == [("save", 2), ("eval", 3), ("save", 4)]


def test_trainer_state_round_trips_through_json():
    state = TrainState(step=7, epoch=1, batch_in_epoch=3, samples=448)
    assert TrainState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    assert state.to_dict() == {"step": 7, "epoch": 1, "batch_in_epoch": 3, "samples": 448, "run_id": "",
                               "reading": {}, "segments": [], "best": {}}
    # train.best_metric's record travels too (align/train/best.py)
    state.best.update(metric="search/ndcg@10", value=0.5, step=4, since=1, counted_step=6)
    assert TrainState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    state.best.clear()
    # A checkpoint written before the run id, reading, segments and best were recorded still loads.
    assert TrainState.from_dict({"step": 7, "epoch": 1, "batch_in_epoch": 3, "samples": 448}) == state
