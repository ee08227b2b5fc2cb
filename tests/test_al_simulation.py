"""``segdiff al-simulate``: the label-saving arithmetic on constructed curves, the MC-dropout scorer,
and a real end-to-end simulation on a few phantoms (2 strategies, 2 rounds, 1 seed, tiny budget)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest

from conftest import labelled_phantoms, strict_json

from monai_segdiff.al_simulation import SimulationSettings, case_scores, curves, label_saving, scorer_config
from monai_segdiff.cli import add_al_parser, cmd_al_simulate

PHANTOMS = Path(__file__).resolve().parents[1] / "sample-data" / "phantoms"

pytestmark = pytest.mark.usefixtures("one_thread")


def run(strategy: str, seed: int, dice: list[float], start: int = 2, step: int = 2) -> dict:
    return {"strategy": strategy, "seed": seed,
            "rounds": [{"n_labelled": start + i * step, "dice": d} for i, d in enumerate(dice)]}


def test_label_saving_on_constructed_curves():
    runs = [
        run("random", 0, [0.5, 0.6, 0.65, 0.70, 0.75]), run("random", 1, [0.5, 0.6, 0.65, 0.70, 0.75]),
        run("segdiff_uncertainty", 0, [0.5, 0.7, 0.74, 0.80, 0.80]),
        run("segdiff_uncertainty", 1, [0.5, 0.7, 0.78, 0.80, 0.80]),  # mean 0.76 >= 0.75 at n = 6
        run("mc_dropout", 0, [0.5, 0.55, 0.6, 0.65, 0.7]),
    ]
    c = curves(runs, ["random", "segdiff_uncertainty", "mc_dropout"])
    assert c["segdiff_uncertainty"]["mean"][2] == pytest.approx(0.76)
    assert c["segdiff_uncertainty"]["std"][2] == pytest.approx(math.sqrt(2 * 0.02**2))
    assert c["random"]["seeds"] == 2 and c["mc_dropout"]["seeds"] == 1
    s = label_saving(c, initial=2)
    assert s["target_dice"] == pytest.approx(0.75) and s["random_final_n"] == 10
    u = s["strategies"]["segdiff_uncertainty"]
    assert u["n_to_reach_target"] == 6
    assert u["fraction_of_labels"] == pytest.approx(0.6)
    assert u["fraction_of_added_labels"] == pytest.approx(0.5)  # 4 of random's 8 added labels
    assert u["label_saving"] == pytest.approx(0.4)
    assert s["strategies"]["random"]["n_to_reach_target"] == 10
    assert s["strategies"]["mc_dropout"]["n_to_reach_target"] is None  # never reaches 0.75


def test_settings_validate_and_accept_aliases():
    s = SimulationSettings(strategies=["random", "uncertainty", "epistemic"])
    assert s.strategies == ["random", "segdiff_uncertainty", "mc_dropout"]
    with pytest.raises(ValueError, match="unknown strategy"):
        SimulationSettings(strategies=["entropy_max"])
    with pytest.raises(ValueError, match="budget"):
        SimulationSettings(epochs=None, max_minutes=None)


# ----------------------------------------------------------------------------------- real, tiny runs
@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    """Seven labelled phantoms: 2 test cases, a pool of 5."""
    return labelled_phantoms(tmp_path_factory.mktemp("studies"), 7)


def test_mc_dropout_scorer_uses_the_case_score_of_its_samples(studies, tmp_path):
    from monai_segdiff import data
    from monai_segdiff.al_simulation import _segmenter, learner_config
    from monai_segdiff.training import train

    items = data.labelled(data.datalist(studies))
    s = SimulationSettings(channels=[8, 16, 16], spacing=[-1, -1, -1], mc_samples=3)
    ucfg = scorer_config(learner_config(s, studies, items), s)
    assert ucfg.network == "unet" and ucfg.channels == [16, 32, 64, 128] and ucfg.labels == ["organ", "lesion"]
    train(ucfg, items[:2], (), output=tmp_path / "u.pt", epochs=1, iterations_per_epoch=2, batch_size=4)
    from monai_segdiff.config import load_checkpoint

    seg = _segmenter(ucfg, load_checkpoint(tmp_path / "u.pt")[0], 3, None, 0, "cpu")
    scores = case_scores(seg, items[2:3])
    pred = seg(items[2]["image"])  # the app's scoring call
    assert scores[items[2]["id"]]["score"] == pytest.approx(pred.stats["case_score"])
    assert 0.0 <= scores[items[2]["id"]]["score"] <= 1.0 and 0.0 <= scores[items[2]["id"]]["dice"] <= 1.0


def al_simulate(studies: Path, out: Path, *options: str) -> int:
    """``segdiff al-simulate`` on a tiny budget (2 initial cases, 30 % test, a tiny learner) with ``options``."""
    parser = argparse.ArgumentParser(prog="segdiff")
    add_al_parser(parser.add_subparsers(dest="command"))
    return cmd_al_simulate(parser.parse_args([
        "al-simulate", "--studies", str(studies), "--report", str(out), "--seeds", "0", "--initial", "2",
        "--test-fraction", "0.3", "--epochs", "1", "--iterations-per-epoch", "2", "--batch-size", "4",
        "--channels", "8,16,16", "--spacing=-1,-1,-1", "--samples", "2", "--steps", "2", "--quiet", *options,
    ]))


@pytest.mark.slow
def test_simulation_runs_end_to_end(studies, tmp_path):
    out = tmp_path / "al"
    assert al_simulate(studies, out, "--strategies", "random,segdiff_uncertainty", "--rounds", "2") == 0
    result = strict_json(out / "curves.json")
    assert result["split"] == {"pool": 5, "test": 2, "test_ids": result["split"]["test_ids"]}
    runs = {r["strategy"]: r for r in result["runs"]}
    assert set(runs) == {"random", "segdiff_uncertainty"}
    test_ids = set(result["split"]["test_ids"])
    for name, r in runs.items():
        assert [x["n_labelled"] for x in r["rounds"]] == [2, 3, 4]
        assert all(0.0 <= x["dice"] <= 1.0 for x in r["rounds"])
        labelled = r["rounds"][-1]["labelled"]
        assert len(set(labelled)) == 4 and not set(labelled) & test_ids
        assert r["rounds"][0]["labelled"] == runs["random"]["rounds"][0]["labelled"]  # same start
    assert r["rounds"][0]["dice"] == runs["random"]["rounds"][0]["dice"]  # same round-0 model
    u = runs["segdiff_uncertainty"]["rounds"]
    for x in u[1:]:
        pool = x["pool_scores"]
        assert len(pool) == 3 - (x["round"] - 1) and x["picked"][0] == min(pool, key=lambda i: (-pool[i]["score"], i))
    assert u[1]["pool_spearman_score_vs_dice"]["n"] == 3
    summary = strict_json(out / "summary.json")
    assert summary["target_dice"] == pytest.approx(runs["random"]["rounds"][-1]["dice"])
    assert set(summary["strategies"]) == {"random", "segdiff_uncertainty"}
    assert summary["strategies"]["random"]["n_to_reach_target"] is not None
    assert set(result["curves_per_label"]) == {"organ", "lesion"}
    assert result["curves_per_label"]["organ"]["random"]["n_labelled"] == [2, 3, 4]
    for name in ("curves.png", "curves_label1.png", "curves_label2.png"):
        png = out / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "Label saving" in (out / "report.html").read_text()
    assert not list(out.glob(".work-*"))  # temporary checkpoints removed


@pytest.mark.slow
def test_an_interrupted_simulation_resumes_where_it_stopped(studies, tmp_path):
    from monai_segdiff.al_simulation import simulate

    s = SimulationSettings(strategies=["random", "fg_random", "diverse_uncertainty"], seeds=[0], initial=2, rounds=2,
                           test_fraction=0.3, epochs=1, iterations_per_epoch=2, batch_size=4, channels=[8, 16, 16],
                           spacing=[-1, -1, -1], samples=2, steps=2)
    out = tmp_path / "al"

    class Stop(Exception):
        pass

    def stop_in_fg_random(msg: str) -> None:  # the run is killed after fg_random's first round
        if "fg_random: round 1" in msg:
            raise Stop

    with pytest.raises(Stop):
        simulate(studies, s, out, log=stop_in_fg_random)
    before = {r["strategy"]: r for r in strict_json(out / "curves.json")["runs"]}
    assert [len(before[n]["rounds"]) for n in ("random", "fg_random")] == [3, 2] and (out / ".resume").is_dir()
    said: list[str] = []
    simulate(studies, s, out, log=said.append)
    # round 0 and random's rounds are not redone; fg_random goes on at round 2, then diverse_uncertainty runs
    assert [m.split(":")[0] + ":" + m.split(":")[1].split(",")[0] for m in said] == [
        "seed 0 fg_random: round 2", "seed 0 diverse_uncertainty: round 1", "seed 0 diverse_uncertainty: round 2"]
    after = {r["strategy"]: r for r in strict_json(out / "curves.json")["runs"]}
    assert after["random"] == before["random"] and after["fg_random"]["rounds"][:2] == before["fg_random"]["rounds"]
    assert [x["n_labelled"] for x in after["fg_random"]["rounds"]] == [2, 3, 4]
    assert after["diverse_uncertainty"]["rounds"][0]["dice"] == before["random"]["rounds"][0]["dice"]
    assert not (out / ".resume").exists()
    summary = strict_json(out / "summary.json")["per_seed"]
    assert set(summary) == {"random", "fg_random", "diverse_uncertainty"} and summary["random"]["aubc"]["n"] == 1
    assert "Over seeds" in (out / "report.html").read_text()
    again: list[str] = []
    simulate(studies, s, out, log=again.append)  # everything finished: nothing is trained again
    assert again == [] and strict_json(out / "curves.json")["runs"] == list(after.values())


@pytest.mark.slow
def test_partial_annotation_simulation_counts_annotated_slices(studies, tmp_path):
    """``al-simulate --unit slices``: each picked case gets ``--slices-per-case`` annotated slices, the budget
    counts them, the learner trains on them, and the uncertainty rule hands out uncertain slices."""
    out = tmp_path / "al"
    assert al_simulate(studies, out, "--strategies", "random,segdiff_uncertainty", "--unit", "slices",
                       "--slices-per-case", "3", "--rounds", "1") == 0
    result = strict_json(out / "curves.json")
    assert result["settings"]["unit"] == "slices"
    runs = {r["strategy"]: r for r in result["runs"]}
    for r in runs.values():
        first, last = r["rounds"]
        assert [first["n_labelled"], last["n_labelled"]] == [6, 9]  # 2 cases x 3 slices, then one more case
        assert last["annotated"] == {**first["annotated"], **last["picked_slices"]} and len(last["annotated"]) == 3
        for slices in last["annotated"].values():
            assert len(set(slices)) == 3 and slices == sorted(slices)
        assert last["train_steps"] > 0 and 0.0 <= last["dice"] <= 1.0
    assert runs["random"]["rounds"][0] == runs["segdiff_uncertainty"]["rounds"][0]  # same start, same slices
    picked = runs["segdiff_uncertainty"]["rounds"][1]["picked_slices"]
    (slices,) = picked.values()
    assert all(b - a >= 2 for a, b in zip(slices, slices[1:]))  # uncertain slices keep SLICE_GAP apart
    assert "slice_scores" not in str(runs["segdiff_uncertainty"]["rounds"][1]["pool_scores"])  # not stored
    assert strict_json(out / "summary.json")["random_final_n"] == 9
    with pytest.raises(ValueError, match="with unit slices"):
        SimulationSettings(strategies=["mc_dropout"], unit="slices")


def test_power_acquisition_draws_in_proportion_to_score():
    """``power`` picks distinct cases, each with probability ~ score ** beta; a large beta is ``top``."""
    import random as rnd

    from monai_segdiff.al_simulation import _pick

    pool = [{"id": i} for i in ("a", "b", "c", "d")]
    scores = {"a": {"score": 0.6}, "b": {"score": 0.2}, "c": {"score": 0.2}, "d": {"score": 0.0}}
    assert _pick("segdiff_uncertainty", pool, scores, 2, rnd.Random(0)) == ["a", "b"]  # top: ties by id
    firsts = [_pick("segdiff_uncertainty", pool, scores, 1, rnd.Random(s), "power")[0] for s in range(2000)]
    assert abs(firsts.count("a") / 2000 - 0.6) < 0.05 and "d" not in firsts
    pairs = [_pick("segdiff_uncertainty", pool, scores, 2, rnd.Random(s), "power") for s in range(200)]
    assert all(len(set(p)) == 2 for p in pairs) and any(p != ["a", "b"] for p in pairs)
    assert all(_pick("mc_dropout", pool, scores, 2, rnd.Random(s), "power", beta=50.0)[0] == "a" for s in range(50))
    with pytest.raises(ValueError, match="acquisition"):
        SimulationSettings(acquisition="greedy")
