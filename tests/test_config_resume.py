"""`segdiff train --config FILE.yaml` and `--resume CKPT`: real (tiny) training runs through the CLI,
compared weight for weight (one thread, fixed seed: bit-identical runs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import PHANTOMS, labelled_phantoms, tiny_config

from monai_segdiff import data
from monai_segdiff.cli import TRAIN_DEFAULTS, _train_actions, main
from monai_segdiff.config import load_checkpoint, save_checkpoint, training_state_path
from monai_segdiff.networks import build_network
from monai_segdiff.training import train

ITERATIONS = 3  # per epoch


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    """Three labelled phantoms."""
    return labelled_phantoms(tmp_path_factory.mktemp("studies"), 3)


# a small run, as YAML (mixing the accepted spellings) and as the equivalent flags
RUN = {
    "network": "concat", "channels": [16, 16, 32], "roi-size": "64x64", "spacing": [-1, -1, -1], "context": 1,
    "batch_size": 4, "iterations_per_epoch": ITERATIONS, "epochs": 2, "lr": "2e-3", "seed": 3, "val_split": 0.0,
    "steps": 2, "samples": 3, "prediction_type": "sample", "intensity": "percentile",
    "postprocess": ["fill_holes", "largest_component"], "quiet": True,
}
FLAGS = ["--network", "concat", "--channels", "16,16,32", "--roi-size", "64,64", "--spacing=-1,-1,-1",
         "--context", "1", "--batch-size", "4", "--iterations-per-epoch", str(ITERATIONS), "--epochs", "2",
         "--lr", "0.002", "--seed", "3", "--val-split", "0", "--steps", "2", "--samples", "3",
         "--prediction-type", "sample", "--intensity", "percentile",
         "--postprocess", "largest_component,fill_holes", "--quiet"]


def run_train(*args: str, capsys=None) -> dict:
    """``segdiff train ...`` in this process; returns the printed result."""
    if capsys is not None:
        capsys.readouterr()
    assert main(["train", *args]) == 0
    return json.loads(capsys.readouterr().out) if capsys is not None else {}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_train_option_can_come_from_yaml():
    options = set(_train_actions())
    assert options <= set(TRAIN_DEFAULTS), options - set(TRAIN_DEFAULTS)
    assert {"studies", "output", "epochs", "resume", "postprocess", "quiet"} <= options
    assert {"use_raters", "extra"} <= set(TRAIN_DEFAULTS) - options  # YAML-only


def test_yaml_config_is_the_same_run_as_the_flags(studies, tmp_path, capsys, one_thread):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**RUN, "studies": str(studies), "output": str(tmp_path / "yaml.pt")}))
    from_yaml = run_train("--config", str(config), capsys=capsys)
    from_flags = run_train("--studies", str(studies), "--output", str(tmp_path / "flags.pt"), *FLAGS, capsys=capsys)
    a, cfg_a, rest_a = load_checkpoint(tmp_path / "yaml.pt")
    b, cfg_b, rest_b = load_checkpoint(tmp_path / "flags.pt")
    assert cfg_a.to_dict() == cfg_b.to_dict()
    assert cfg_a.network == "concat" and cfg_a.roi_size == [64, 64]
    assert cfg_a.postprocess == ["largest_component", "fill_holes"]
    assert same_weights(a, b) and rest_a == rest_b
    assert from_yaml["losses"] == from_flags["losses"] and from_yaml["steps"] == 2 * ITERATIONS
    stored = load_checkpoint(training_state_path(tmp_path / "yaml.pt"))[2]["options"]
    assert stored["batch_size"] == 4 and stored["lr"] == 0.002 and stored["spacing"] == [-1.0, -1.0, -1.0]
    # the command line overrides the file
    run_train("--config", str(config), "--output", str(tmp_path / "override.pt"), "--epochs", "1", capsys=capsys)
    assert load_checkpoint(training_state_path(tmp_path / "override.pt"))[2]["step"] == ITERATIONS


@pytest.mark.parametrize(
    "text, message",
    [
        ("epoch: 3\n", "unknown option(s) epoch (did you mean epochs?)"),
        ("epochs: 3\nflux: 1\n", "unknown option(s) flux"),
        ("epochs: ten\n", "invalid epochs 'ten'"),
        ("network: transformer\n", "network must be one of concat, medsegdiff"),
        ("postprocess: [blur]\n", "unknown postprocess option(s) blur"),
        ("anchor: maybe\n", "anchor must be true or false"),
        ("epochs: [1\n", "is not valid YAML"),
        ("- epochs\n", "must hold a mapping"),
        ("epochs: 1\n", "--studies is required"),
    ],
)
def test_bad_config_is_a_one_line_error(text, message, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "x.pt")]
                + ([] if "studies" in message else ["--studies", str(tmp_path)])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("segdiff train: error: ") and message in err, err


def test_resume_continues_the_run_exactly(studies, tmp_path, capsys, one_thread):
    common = ["--studies", str(studies), "--network", "concat", "--channels", "16,16,32", "--roi-size", "64,64",
              "--spacing=-1,-1,-1", "--batch-size", "4", "--iterations-per-epoch", str(ITERATIONS),
              "--val-split", "0", "--seed", "1", "--lr", "3e-3", "--quiet"]
    straight = run_train(*common, "--output", str(tmp_path / "straight.pt"), "--epochs", "4", capsys=capsys)
    first = run_train(*common, "--output", str(tmp_path / "split.pt"), "--epochs", "2", capsys=capsys)
    # the model file stays small (weights + config); what resuming needs is beside it
    payload = torch.load(tmp_path / "split.pt", weights_only=True)
    assert set(payload) == {"model", "config", "epoch", "step", "best_dice"}
    state = load_checkpoint(training_state_path(tmp_path / "split.pt"))[2]
    assert {"ema", "optimizer", "scheduler", "rng", "options"} <= set(state)
    # batch size, iterations, lr and seed come from the resumed run
    second = run_train("--studies", str(studies), "--output", str(tmp_path / "split.pt"), "--resume",
                       str(tmp_path / "split.pt"), "--epochs", "2", "--quiet", capsys=capsys)
    assert second["steps"] == 4 * ITERATIONS and second["epochs"] == 2
    raw, _, state = load_checkpoint(training_state_path(tmp_path / "split.pt"))
    assert state["step"] == 4 * ITERATIONS and state["epoch"] == 4
    # the loss goes on from where it stopped instead of jumping back to the untrained level
    untrained, before, after = first["losses"][0], first["losses"][-1], second["losses"][0]
    assert after < before + 0.25 * (untrained - before) and untrained - before > 0.1, (untrained, before, after)
    # ... and the run is the one that did not stop: raw weights, EMA (the saved model), optimiser
    assert first["losses"] + second["losses"] == straight["losses"]
    raw_s, _, state_s = load_checkpoint(training_state_path(tmp_path / "straight.pt"))
    assert same_weights(raw, raw_s) and same_weights(state["ema"], state_s["ema"])
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], state_s["optimizer"]["state"][0]["exp_avg"])
    model, _, rest = load_checkpoint(tmp_path / "split.pt")
    assert same_weights(model, load_checkpoint(tmp_path / "straight.pt")[0]) and rest["step"] == 4 * ITERATIONS


def test_resume_restores_warm_up_and_validation_best(one_thread, tmp_path):
    """Library level: a fine-tune (learning-rate warm-up, weight average started from the given
    weights) with validation, split 2 + 2 epochs into another model file, equals 4 epochs."""
    items = data.labelled(data.datalist(PHANTOMS))
    init = build_network(tiny_config()).state_dict()  # stands in for a trained model
    kw = dict(val_samples=1, val_every=2, iterations_per_epoch=2, batch_size=4, init_state=init, save_state=True,
              seed=2)
    full = train(tiny_config(), items[:2], items[2:3], output=tmp_path / "full.pt", epochs=4, **kw)
    train(tiny_config(), items[:2], items[2:3], output=tmp_path / "a.pt", epochs=2, **kw)
    rest = train(tiny_config(), items[:2], items[2:3], output=tmp_path / "b.pt", epochs=2, resume=tmp_path / "a.pt",
                 **{**kw, "init_state": None})
    assert rest.steps == full.steps == 8 and rest.val_dice == full.val_dice[1:]
    s_full = load_checkpoint(training_state_path(tmp_path / "full.pt"))[2]
    s_rest = load_checkpoint(training_state_path(tmp_path / "b.pt"))[2]
    assert s_rest["scheduler"]["last_epoch"] == 8 and s_rest["scheduler"]["_last_lr"] == s_full["scheduler"]["_last_lr"]
    assert s_full["scheduler"]["_last_lr"][0] < 1e-3  # still warming up: the resumed run did not restart it
    assert same_weights(s_rest["ema"], s_full["ema"])
    assert (tmp_path / "b.pt").is_file()  # a new model file is written even if no epoch beat the old best


def test_resume_without_state_is_a_clear_error(studies, tmp_path, capsys):
    bare = tmp_path / "bare.pt"  # a model file without its .state (e.g. a shipped model)
    save_checkpoint(bare, build_network(tiny_config()).state_dict(), tiny_config())
    assert main(["train", "--studies", str(studies), "--output", str(tmp_path / "x.pt"), "--resume", str(bare)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no training state" in err and f"--init {bare}" in err, err
    assert main(["train", "--studies", str(studies), "--output", str(tmp_path / "x.pt"),
                 "--resume", str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint to resume not found" in capsys.readouterr().err


def test_init_keeps_the_model_but_takes_new_augment_and_postprocess(studies, tmp_path, capsys, one_thread):
    """``--init`` fine-tunes the given model (its network and grid), with the augmentation and the
    default clean-up given on the command line (the shipped model is made this way)."""
    base = save_checkpoint(tmp_path / "base.pt", build_network(tiny_config()).state_dict(),
                           tiny_config(postprocess=[], augment=["flip"]))
    run_train("--studies", str(studies), "--output", str(tmp_path / "ft.pt"), "--init", str(base), "--epochs", "1",
              "--iterations-per-epoch", "2", "--batch-size", "2", "--val-split", "0", "--network", "medsegdiff",
              "--postprocess", "median,fill_holes", "--augment", "noise", "--quiet", capsys=capsys)
    state, cfg, _ = load_checkpoint(tmp_path / "ft.pt")
    assert cfg.network == "concat" and cfg.channels == tiny_config().channels  # the model, not --network
    assert cfg.postprocess == ["median", "fill_holes"] and cfg.augment == ["noise"]
    assert not same_weights(state, load_checkpoint(base)[0])  # it was trained


def test_cosine_schedule_decays_to_the_floor_and_resume_finishes_it(one_thread, tmp_path):
    """``lr_schedule='cosine'``: the rate falls from ``lr`` to 1 % of it by the last step; a run stopped
    half-way and resumed for the same number of epochs again ends at the floor, not restarted."""
    items = data.labelled(data.datalist(PHANTOMS))
    kw = dict(iterations_per_epoch=2, batch_size=4, seed=2, save_state=True, lr=2e-3)
    seen: list[float] = []
    const = train(tiny_config(), items[:2], output=tmp_path / "c.pt", epochs=2, **kw,
                  callback=lambda s: seen.append(s["lr"]))
    assert seen == [2e-3, 2e-3] and const.steps == 4
    seen.clear()
    train(tiny_config(), items[:2], output=tmp_path / "cos.pt", epochs=4, lr_schedule="cosine", **kw,
          callback=lambda s: seen.append(s["lr"]))
    # after 2, 4, 6, 8 of 8 steps: half a cosine from 2e-3 down to 2e-5
    expected = [2e-5 + (2e-3 - 2e-5) * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in (1, 2, 3, 4)]
    assert seen == pytest.approx(expected, rel=1e-6)
    state = load_checkpoint(training_state_path(tmp_path / "cos.pt"))[2]
    assert state["lr_progress"] == 1.0
    # a 4-epoch run cut off after epoch 2, resumed for the 2 epochs it had left: the same rates
    class Cut(Exception):
        pass

    def cut(stats: dict) -> None:
        if stats["epoch"] == 2:
            raise Cut

    with pytest.raises(Cut):
        train(tiny_config(), items[:2], output=tmp_path / "cut.pt", epochs=4, lr_schedule="cosine", **kw, callback=cut)
    assert load_checkpoint(training_state_path(tmp_path / "cut.pt"))[2]["lr_progress"] == 0.5
    seen.clear()
    train(tiny_config(), items[:2], output=tmp_path / "cut.pt", epochs=2, lr_schedule="cosine",
          resume=tmp_path / "cut.pt", **kw, callback=lambda s: seen.append(s["lr"]))
    assert seen == pytest.approx(expected[2:], rel=1e-6)
    with pytest.raises(ValueError, match="lr_schedule"):
        train(tiny_config(), items[:2], epochs=1, lr_schedule="step", **kw)


def test_keep_last_writes_the_last_epoch_not_the_best(one_thread, tmp_path, monkeypatch):
    """``keep='last'`` (``segdiff train --keep last``) writes the averaged weights of the last epoch, the
    end of a cosine decay, where ``best`` writes those of the best validation epoch. The validation
    scores are scripted (falling 0.9, 0.5, 0.1) so the two must differ; training and saving are real."""
    import monai_segdiff.training as training

    items = data.labelled(data.datalist(PHANTOMS))
    kw = dict(iterations_per_epoch=2, batch_size=4, seed=2, save_state=True, lr=2e-3, epochs=3, val_samples=1)
    runs = {}
    for keep in ("best", "last"):
        scores = iter([0.9, 0.5, 0.1])
        monkeypatch.setattr(training, "validation_dice", lambda *a, **k: next(scores))
        result = train(tiny_config(), items[:2], items[2:3], output=tmp_path / f"{keep}.pt", keep=keep, **kw)
        runs[keep] = load_checkpoint(tmp_path / f"{keep}.pt"), result
    (best_state, _, best_rest), best = runs["best"]
    (last_state, _, last_rest), last = runs["last"]
    assert (best.best_epoch, best_rest["epoch"], best_rest["best_dice"]) == (1, 1, 0.9)
    assert (last.best_epoch, last_rest["epoch"], last_rest["best_dice"]) == (3, 3, 0.1)
    ema = load_checkpoint(training_state_path(tmp_path / "last.pt"))[2]["ema"]  # averaged weights, epoch 3
    assert same_weights(last_state, {k[len("module."):]: v for k, v in ema.items() if k.startswith("module.")})
    assert not same_weights(best_state, last_state)
    with pytest.raises(ValueError, match="keep must be one of best, last"):
        train(tiny_config(), items[:2], epochs=1, keep="first", iterations_per_epoch=1)
