"""End to end: a real ``monailabel start_server --app apps/segdiff`` driven with MONAILabelClient the way
the 3D Slicer plugin drives it (Next Sample -> Auto Segmentation -> uncertainty -> Submit Label ->
Train -> Next Sample), plus the error answers. One server for the module; ~2-3 minutes on 2 cores.

Run with ``pytest tests/test_app_e2e.py -s`` to see the timings table at the end.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
from conftest import (PHANTOMS, reported, TASK_ACTIVE, app_module, dump, make_studies, slicer_params, task_idle,
                      wait_for, wait_task_done)

from monai_segdiff.cache import LRUCache

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

SCORE, TS = "segdiff_uncertainty", "segdiff_uncertainty_ts"
TIMINGS: dict[str, float] = reported("segdiff app timings (tiny test model, OMP_NUM_THREADS=1, 2 shared cores)")


# --------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model, start_server):
    root = tmp_path_factory.mktemp("e2e")
    model = root / "model" / "segdiff.pt"
    model.parent.mkdir()
    model.write_bytes(tiny_model.read_bytes())
    studies, unlabeled = make_studies(root / "studies", unlabeled=8)
    t0 = time.time()
    server = start_server(
        studies,
        {"model_path": str(model), "scoring_samples": "2", "scoring_steps": "2", "reserve_minutes": "30"},
        root / "server.log",
    )
    TIMINGS["server start until /info answers (s)"] = time.time() - t0
    return {"server": server, "url": server.url, "studies": studies, "model": model, "unlabeled": unlabeled,
            "root": root, "t0": t0}


def client(env, client_id):
    from monailabel.client import MONAILabelClient

    return MONAILabelClient(env["url"], tmpdir=str(env["root"]), client_id=client_id)


def datastore_objects(env) -> dict:
    return client(env, "test").datastore()["objects"]


def unlabeled_scores(env) -> dict[str, tuple]:
    """``{image id: (score, ts)}`` of the unlabeled images."""
    objs = datastore_objects(env)
    return {
        i: (o["image"]["info"].get(SCORE), o["image"]["info"].get(TS))
        for i, o in objs.items()
        if "final" not in o.get("labels", {})
    }


def scores_current(env):
    ts = os.stat(env["model"]).st_mtime
    scores = unlabeled_scores(env)
    return scores if scores and all(t == ts and isinstance(s, float) for s, t in scores.values()) else None


def load(path) -> nib.Nifti1Image:
    return nib.load(str(path))


def image_path(env, image_id) -> Path:
    return env["studies"] / f"{image_id}.nii.gz"


def assert_on_image_grid(result_file, env, image_id):
    img, res = load(image_path(env, image_id)), load(result_file)
    assert res.shape == img.shape, (res.shape, img.shape)
    np.testing.assert_allclose(res.affine, img.affine, atol=1e-3)


def timed(key, fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    TIMINGS[key] = time.perf_counter() - t
    return out


# --------------------------------------------------------------------------------------------------
# the steps of the Slicer loop: each done once, by whichever test needs it first, so the tests below
# run in their natural order (one journey on one server) or alone (`pytest -k <name>`)
# --------------------------------------------------------------------------------------------------
def step(env, key: str, run):
    if key not in env:
        env[key] = run()
    return env[key]


def picked(env) -> dict:
    """Annotators a and b ask for the next sample once start-up scoring is done."""
    def run():
        scores = wait_for(lambda: scores_current(env), timeout=300, interval=2, what="start-up scoring")
        wait_for(lambda: task_idle(env["url"], "scoring"), timeout=60, what="scoring task to finish")
        a = client(env, "annotator-a").next_sample("segdiff_uncertainty", {})
        b = client(env, "annotator-b").next_sample("segdiff_uncertainty", {})
        return {"scores": {i: s for i, (s, _) in scores.items()}, "a": a, "b": b}

    return step(env, "picked", run)


def ids(env) -> tuple[str, str]:
    p = picked(env)
    return p["a"]["id"], p["b"]["id"]


def submitted(env) -> dict:
    """Annotator c submits a label exported by Slicer (reordered segments plus "uncertain")."""
    def run():
        image_id = sorted(set(env["unlabeled"]) - set(ids(env)))[0]
        truth = np.asarray(load(PHANTOMS / "labels" / "final" / f"{image_id}.nii.gz").dataobj).astype(np.uint8)
        exported = np.zeros_like(truth)
        exported[truth == 2] = 1  # lesion first
        exported[truth == 1] = 2  # organ second
        exported[:4, :4, :4] = 3  # "uncertain" voxels (background in the truth there)
        assert not truth[:4, :4, :4].any()
        path = env["root"] / f"{image_id}_slicer.nii.gz"
        nib.save(nib.Nifti1Image(exported, load(image_path(env, image_id)).affine), str(path))
        label_info = [{"name": "lesion", "idx": 1}, {"name": "organ", "idx": 2}, {"name": "uncertain", "idx": 3}]
        res = client(env, "annotator-c").save_label(image_id, str(path), params={"label_info": label_info})
        return {"id": image_id, "truth": truth, "answer": res}

    return step(env, "submitted", run)


def partial(env) -> dict:
    """Annotator p asks ``segdiff_slices`` for the next sample and labels only the slices it names."""
    def run():
        picked(env)
        c = client(env, "annotator-p")
        sample = c.next_sample("segdiff_slices", {})
        image_id = sample["id"]
        info = datastore_objects(env)[image_id]["image"]["info"]
        truth = np.asarray(load(PHANTOMS / "labels" / "final" / f"{image_id}.nii.gz").dataobj).astype(np.uint8)
        drawn = np.zeros_like(truth)
        ann = sample.get("annotate") or {}
        for j in ann.get("slices", []):  # what the annotator paints: the named slices, nothing else
            idx = [slice(None)] * 3
            idx[ann["axis"]] = j
            drawn[tuple(idx)] = truth[tuple(idx)]
        path = env["root"] / f"{image_id}_partial.nii.gz"
        nib.save(nib.Nifti1Image(drawn, load(image_path(env, image_id)).affine), str(path))
        label_info = [{"name": "organ", "idx": 1}, {"name": "lesion", "idx": 2}]
        answer = c.save_label(image_id, str(path), params={"label_info": label_info})
        return {"id": image_id, "sample": sample, "info": info, "drawn": drawn, "answer": answer}

    return step(env, "partial", run)


def trained(env) -> dict:
    """Train with Slicer's parameters (1 epoch) after the submitted labels (one whole, one partial)."""
    def run():
        submitted(env)
        partial(env)
        c = client(env, "annotator-a")
        params = slicer_params(c.info(), "train", "segdiff_train")
        out = {"params": dict(params), "old_ts": os.stat(env["model"]).st_mtime}
        params["max_epochs"] = 1
        t0 = time.time()
        out["status"] = c.train_start("segdiff_train", params)
        # MONAI Label counts started subprocesses, not submitted tasks: a second request in the first
        # milliseconds would be queued behind the first instead of refused, so wait until it runs.
        wait_for(lambda: c.train_status().get("status") != "SUBMITTED", timeout=60, interval=0.2, what="train start")
        try:
            c.train_start("segdiff_train", params)
            out["second"] = "accepted"
        except Exception as e:  # noqa: BLE001 (the client raises a bare Exception with the status)
            out["second"] = str(e)
        out["done"] = wait_task_done(c.train_status, timeout=600, interval=2, what="training")
        TIMINGS["train 1 epoch, Slicer defaults, incl. subprocess start (s)"] = time.time() - t0
        out["at"] = time.time()
        out["stats"] = c.info()["train_stats"]["segdiff_train"]
        return out

    return step(env, "trained", run)


# --------------------------------------------------------------------------------------------------
# the Slicer loop
# --------------------------------------------------------------------------------------------------
def test_info_lists_models_for_slicer(env):
    info = client(env, "a").info()
    models = info["models"]
    assert models["segdiff"]["type"] == "segmentation" and models["segdiff"]["dimension"] == 3
    assert models["segdiff"]["labels"] == {"background": 0, "organ": 1, "lesion": 2}
    assert models["segdiff_uncertainty"]["type"] == "segmentation"
    assert models["segdiff_uncertainty"]["labels"] == {"uncertain": 1}
    assert info["labels"] == ["organ", "lesion", "background"]  # the segments Slicer creates (background: its clicks)
    trainer = info["trainers"]["segdiff_train"]["config"]
    assert trainer["tracking"][0] == "none" and trainer["pretrained"] is True
    for section in ("models", "trainers"):  # Slicer's combo boxes take strings only
        for task in info[section].values():
            for v in task.get("config", {}).values():
                if isinstance(v, list):
                    assert v and all(isinstance(x, str) for x in v), (section, v)
    assert list(info["strategies"])[:3] == ["segdiff_random", "segdiff_uncertainty", "segdiff_slices"]  # default first
    assert "slices" in info["strategies"]["segdiff_slices"]["description"]
    assert {"random", "first"} <= set(info["strategies"])
    assert "segdiff_uncertainty" in info["scoring"]
    assert "segdiff_train" in info["train_stats"]


def test_startup_scoring_scores_every_unlabeled_image(env):
    if "picked" not in env:  # alone, or first: time the start-up scoring
        scores = wait_for(lambda: scores_current(env), timeout=300, interval=2, what="start-up scoring")
        TIMINGS["start-up: server start until all unlabeled scored (s)"] = time.time() - env["t0"]
    scores = picked(env)["scores"]
    assert sorted(scores) == sorted(env["unlabeled"])
    assert all(0.0 <= s <= 1.0 for s in scores.values())


def test_next_sample_highest_score_and_one_annotator_per_image(env):
    p = picked(env)
    scores, a, b = p["scores"], p["a"], p["b"]
    ranked = sorted(scores, key=lambda i: (scores[i], i), reverse=True)
    assert a["id"] == ranked[0], dump({"a": a, "scores": scores})
    assert b["id"] == ranked[1] != a["id"]
    assert a[SCORE] == pytest.approx(scores[a["id"]])
    assert Path(a["path"]).is_file()
    first = client(env, "annotator-c").next_sample("first", {})
    assert first["id"] == sorted(env["unlabeled"])[0]
    assert client(env, "annotator-c").next_sample("random", {})["id"] in env["unlabeled"]


def test_auto_segmentation_returns_label_on_image_grid(env):
    a, _ = ids(env)
    c = client(env, "annotator-a")
    params = slicer_params(c.info(), "infer", "segdiff")
    result, out = timed("infer segdiff, uncached (s)", c.infer, "segdiff", a, params)
    try:
        assert_on_image_grid(result, env, a)
        values = set(np.unique(np.asarray(load(result).dataobj)).astype(int).tolist())
        assert values <= {0, 1, 2}
        assert out["label_names"] == {"background": 0, "organ": 1, "lesion": 2}
        assert set(out["uncertainty_stats"]) == {"organ", "lesion"}
        for stats in out["uncertainty_stats"].values():
            assert {"volume_ml", "mean_uncertainty", "uncertain_volume_ml", "sample_agreement"} <= set(stats)
        assert out["cached"] is False and 0.0 <= out["case_score"] <= 1.0
        assert out["model_ts"] == os.stat(env["model"]).st_mtime
    finally:
        os.unlink(result)


def test_uncertainty_model_reuses_the_ensemble(env):
    a, b = ids(env)
    c = client(env, "annotator-a")
    os.unlink(c.infer("segdiff", a, slicer_params(c.info(), "infer", "segdiff"))[0])  # Auto Segmentation first
    params = slicer_params(c.info(), "infer", "segdiff_uncertainty")
    assert params["output_map"] is False and params["uncertainty_threshold"] == 0.5
    mask_file, out = timed("infer segdiff_uncertainty, cached (s)", c.infer, "segdiff_uncertainty", a, params)
    map_file, out_map = c.infer("segdiff_uncertainty", a, dict(params, output_map=True))
    try:
        assert out["cached"] is True and out_map["cached"] is True
        assert out["label_names"] == {"uncertain": 1}
        assert_on_image_grid(mask_file, env, a)
        assert_on_image_grid(map_file, env, a)
        mask = np.asarray(load(mask_file).dataobj)
        umap = np.asarray(load(map_file).dataobj)
        assert set(np.unique(mask).astype(int).tolist()) <= {0, 1}
        assert np.issubdtype(umap.dtype, np.floating) and 0.0 <= umap.min() and umap.max() <= 1.0
        np.testing.assert_array_equal(mask.astype(bool), umap > 0.5)
        assert out["uncertain_voxels"] == int(mask.sum()) and out_map["output"] == "uncertainty_map"
    finally:
        os.unlink(mask_file)
        os.unlink(map_file)
    first, out = timed("infer segdiff_uncertainty, uncached (s)", c.infer, "segdiff_uncertainty", b, params)
    again, out2 = timed("infer segdiff_uncertainty, cached again (s)", c.infer, "segdiff_uncertainty", b, params)
    os.unlink(first)
    os.unlink(again)
    assert out["cached"] is False and out2["cached"] is True
    assert out2["uncertain_voxels"] == out["uncertain_voxels"]


def test_default_client_on_this_machine_keeps_its_result(env):
    """A `MONAILabelClient` with its default temp folder, on the server's machine: it saves the result
    under the server's file name in the same folder, where the server deletes the file it sent. The app
    writes its results into a folder of its own, so the client's copy survives."""
    from monailabel.client import MONAILabelClient

    c = MONAILabelClient(env["url"], client_id="default-tmpdir")
    image = env["unlabeled"][0]
    result, out = c.infer("segdiff", image, {})
    try:
        assert os.path.dirname(result) == tempfile.gettempdir()
        time.sleep(2)  # the server removes its file in a background task after the response
        assert os.path.isfile(result), "the client's copy of the result was deleted"
        assert_on_image_grid(result, env, image)
    finally:
        if os.path.exists(result):
            os.unlink(result)


def test_submit_label_maps_segments_by_name(env):
    # Slicer exports segments with values 1..n in segment order and names them in label_info; here the
    # annotator reordered the segments and kept the "uncertain" one from the uncertainty model.
    sub = submitted(env)
    assert sub["answer"]["image"] == sub["id"] and sub["answer"]["remapped"] == {"1": 2, "2": 1, "3": 0}
    stored = np.asarray(load(env["studies"] / "labels" / "final" / f"{sub['id']}.nii.gz").dataobj)
    np.testing.assert_array_equal(stored, sub["truth"])
    assert sub["id"] not in unlabeled_scores(env)


def test_partial_annotation_of_the_most_uncertain_slices(env):
    """``segdiff_slices``: the image whose most uncertain slices are most uncertain (from the scoring's
    per-slice scores), not one another annotator holds, with those slices; the submitted label is recorded
    as partial (its other slices unannotated, not background) and said so in the answer."""
    from monai_segdiff import data, selection

    p = partial(env)
    sample, ann = p["sample"], p["sample"]["annotate"]
    assert sample["id"] in env["unlabeled"] and sample["id"] not in ids(env), dump(sample)
    assert sample["selection"] == "most uncertain slices" and ann is not None, dump(sample)
    per_slice = p["info"]["segdiff_slice_scores"]
    slices, score = selection.case_slices(dict(zip(per_slice["slices"], per_slice["scores"])), 4)
    assert ann["axis"] == per_slice["axis"] == 2 and ann["slices"] == slices and len(slices) == 4
    assert sample["score"] == pytest.approx(score)
    affine = load(image_path(env, sample["id"])).affine
    assert ann["positions_mm"] == pytest.approx([float((affine @ [0, 0, j, 1])[2]) for j in slices], abs=0.01)
    assert p["answer"]["annotated_slices"]["slices"] == slices, dump(p["answer"])
    assert data.annotated_slices(env["studies"])[sample["id"]] == {"axis": 2, "slices": slices}
    stored = np.asarray(load(env["studies"] / "labels" / "final" / f"{sample['id']}.nii.gz").dataobj)
    np.testing.assert_array_equal(stored, p["drawn"])  # the label itself is kept as drawn
    objs = datastore_objects(env)
    assert "segdiff_annotate" not in objs[sample["id"]]["image"]["info"]  # the request is answered


def test_errors_are_clear_4xx(env):
    url = env["url"]
    r = requests.post(f"{url}/infer/segdiff?image=no_such_image", data={"params": "{}"}, timeout=60)
    assert r.status_code == 404 and "no_such_image" in r.text
    r = requests.post(f"{url}/infer/no_such_model?image={env['unlabeled'][0]}", data={"params": "{}"}, timeout=60)
    assert r.status_code == 404 and "no_such_model" in r.text
    r = requests.post(f"{url}/infer/segdiff", data={"params": "{}"},
                      files={"file": ("broken.nii.gz", b"not an image", "application/octet-stream")}, timeout=60)
    assert r.status_code == 422 and "cannot read image" in r.text, r.text


def test_train_with_slicer_parameters_publishes_a_better_model(env):
    t = trained(env)
    assert t["params"]["tracking"] == "none" and t["params"]["pretrained"] is True
    assert t["status"]["status"] in TASK_ACTIVE
    assert "429" in t["second"], t["second"]  # a second run while one runs is refused
    assert t["done"]["status"] == "DONE", dump(t["done"]) + "\n" + env["server"].tail()
    stats = t["stats"]
    assert stats["status"] == "DONE" and stats["total_time"] and stats["init"] == "pretrained", dump(stats)
    assert stats["published"] is True, dump(stats)
    assert stats["best_metric"] > stats["baseline_metric"]
    assert stats["train_cases"] + stats["val_cases"] == 28 - len(env["unlabeled"]) + 2
    assert stats["partial_cases"] == 1, dump(stats)  # annotator p's label, learnt from its slices only
    assert os.stat(env["model"]).st_mtime > t["old_ts"]
    assert stats["model_ts"] == os.stat(env["model"]).st_mtime
    TIMINGS["train: fine-tune seconds inside the task (s)"] = stats["seconds"]


def test_next_infer_uses_the_new_model(env):
    trained(env)
    c = client(env, "annotator-a")
    result, out = timed("infer segdiff after model reload (s)", c.infer, "segdiff", ids(env)[0],
                        slicer_params(c.info(), "infer", "segdiff"))
    os.unlink(result)
    assert out["model_ts"] == os.stat(env["model"]).st_mtime and out["cached"] is False


def test_scores_refreshed_with_the_new_model(env):
    done_at = trained(env)["at"]
    scores = wait_for(lambda: scores_current(env), timeout=300, interval=2, what="rescoring after training")
    TIMINGS[f"rescoring {len(scores)} unlabeled after training (s, from train DONE)"] = time.time() - done_at
    assert sorted(scores) == sorted(set(env["unlabeled"]) - {submitted(env)["id"], partial(env)["id"]})
    wait_for(lambda: task_idle(env["url"], "scoring"), timeout=60, what="scoring task to finish")


def test_scoring_on_demand(env):
    # what a client (or cron) calls to rescore every unlabeled image now
    wait_for(lambda: task_idle(env["url"], "scoring"), timeout=300, what="scoring task to finish")
    t0 = time.time()
    r = requests.post(f"{env['url']}/scoring/segdiff_uncertainty", json={"force": True}, timeout=60)
    assert r.status_code == 200, r.text
    done = wait_task_done(lambda: requests.get(f"{env['url']}/scoring/", timeout=10).json(), timeout=300,
                          what="scoring")
    n = len(unlabeled_scores(env))
    TIMINGS[f"scoring all {n} unlabeled on demand, incl. subprocess start (s)"] = time.time() - t0
    assert done["status"] == "DONE", dump(done)
    assert scores_current(env)


def test_next_sample_after_training(env):
    trained(env)
    held = set(ids(env))  # still with annotators a and b
    scores = {i: s for i, (s, _) in wait_for(lambda: scores_current(env), timeout=300, interval=2,
                                              what="scores of the new model").items()}
    ranked = sorted((i for i in scores if i not in held), key=lambda i: (scores[i], i), reverse=True)
    d = client(env, "annotator-d").next_sample("segdiff_uncertainty", {})
    e = client(env, "annotator-e").next_sample("segdiff_uncertainty", {})
    assert d["id"] == ranked[0], dump({"d": d, "scores": scores, "held": held})
    assert e["id"] == ranked[1] != d["id"]
    # annotator a asks again: a's previous image is released and skipped; the best free one comes next
    a = client(env, "annotator-a").next_sample("segdiff_uncertainty", {})
    assert a["id"] not in held | {d["id"], e["id"]}


def test_default_strategy_gives_each_annotator_a_free_image(env):
    """``segdiff_random``, Slicer's default (first in ``/info``): a random unlabeled image no other annotator
    holds; new annotators get distinct images until none is free, then an empty answer."""
    assert list(client(env, "a").info()["strategies"])[0] == "segdiff_random"
    labelled = {submitted(env)["id"], partial(env)["id"]}
    got = []
    for i in range(len(env["unlabeled"]) + 1):
        sample = client(env, f"annotator-r{i}").next_sample("segdiff_random", {})
        if not sample:
            break
        assert sample["selection"] == "random" and sample["id"] in env["unlabeled"], dump(sample)
        got.append(sample["id"])
    assert got and len(set(got)) == len(got) and not set(got) & labelled, got
    assert len(got) < len(env["unlabeled"]) - len(labelled)  # the images a and b (at least) hold are not given


def test_without_a_model_infer_is_404_not_500(env):
    wait_for(lambda: task_idle(env["url"], "scoring"), timeout=120, what="scoring task to finish")
    moved = env["model"].with_suffix(".bak")
    os.replace(env["model"], moved)
    try:
        r = requests.post(f"{env['url']}/infer/segdiff?image={env['unlabeled'][0]}", data={"params": "{}"}, timeout=60)
        assert r.status_code == 404, r.text
        assert "no model file" in r.text and "train" in r.text
        assert "segdiff" in client(env, "a").info()["models"]  # still listed: the answer says what to do
    finally:
        os.replace(moved, env["model"])


# --------------------------------------------------------------------------------------------------
# small units the app relies on (no server)
# --------------------------------------------------------------------------------------------------
def test_lru_cache_single_flight_and_eviction():
    import threading

    cache: LRUCache[int] = LRUCache(2)
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.2)
        return 42

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_compute("k", slow))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(r[1] for r in results) == [False, True, True, True]
    cache.put("a", 1)
    cache.put("b", 2)
    assert "k" not in cache and cache.keys() == ["a", "b"]
    with pytest.raises(ZeroDivisionError):
        cache.get_or_compute("x", lambda: 1 / 0)
    assert "x" not in cache


def test_strategy_reserves_per_client_and_falls_back_to_random():
    UncertaintyStrategy = app_module("lib.activelearning.uncertainty").UncertaintyStrategy

    class Store:
        def __init__(self, infos):
            self.infos = infos

        def get_unlabeled_images(self, *args):
            return list(self.infos)

        def get_image_info(self, image_id):
            return self.infos[image_id]

    s = UncertaintyStrategy(reserve_seconds=60, seed=0)
    unscored = Store({"x": {}, "y": {}, "z": {}})
    picks = {s({"client_id": c, "strategy": "u"}, unscored)["id"] for c in "abc"}
    assert picks == {"x", "y", "z"}  # random, but never the same image twice
    assert s({"client_id": "d", "strategy": "u"}, unscored) is None  # all three are taken

    s = UncertaintyStrategy(reserve_seconds=60)
    scored = Store({"x": {SCORE: 0.1}, "y": {SCORE: 0.9}, "z": {SCORE: 0.5}})
    assert s({"client_id": "a"}, scored)["id"] == "y"
    assert s({"client_id": "b"}, scored)["id"] == "z"
    assert s({"client_id": "a"}, scored)["id"] == "x"  # a skips y; z is b's
    assert s({"client_id": "c"}, scored)["id"] == "y"  # released by a
    s.reserve_seconds = 0  # reservations expire
    assert s({"client_id": "d"}, scored)["id"] == "y"
