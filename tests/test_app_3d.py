"""The app serving a 3D model (``segdiff train --spatial-dims 3``, README "Strided image path"): a real
``monailabel start_server`` with a tiny 3D MedSegDiff (strided image path, anchor head) trained for a
few iterations, driven with MONAILabelClient. It checks the 3D path end to end (sliding windows over
a volume larger than the patch, resampling back to the image grid, the uncertainty model, a fine-tune
in the train task), not the quality of a model this small."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
from conftest import PHANTOMS, TASK_ACTIVE, dump, make_studies, slicer_params, tiny_config, wait_task_done

from monai_segdiff import data
from monai_segdiff.config import load_checkpoint

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def model_3d(tmp_path_factory, one_thread):
    from monai_segdiff.training import train

    cfg = tiny_config(
        network="medsegdiff", spatial_dims=3, channels=[8, 16, 16], norm_num_groups=8, roi_size=[32, 32, 16],
        spacing=[1.25, 1.25, -1], context=0, extra={"medsegdiff": {"anchor": True, "image_stride": 2}},
    )
    items = data.labelled(data.datalist(PHANTOMS))
    out = tmp_path_factory.mktemp("model3d") / "model" / "segdiff.pt"
    out.parent.mkdir()
    train(cfg, items[:4], items[4:5], output=out, epochs=1, iterations_per_epoch=3, batch_size=2)
    return out


def test_server_segments_volumes_with_a_3d_model(model_3d, start_server, tmp_path):
    from monailabel.client import MONAILabelClient

    assert load_checkpoint(model_3d)[1].spatial_dims == 3
    studies, unlabeled = make_studies(tmp_path / "studies", unlabeled=2)
    server = start_server(studies, {"model_path": str(model_3d), "scoring_samples": "2", "scoring_steps": "2"},
                          tmp_path / "server.log")
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    info = client.info()
    assert info["models"]["segdiff"]["dimension"] == 3, dump(info["models"])
    assert info["labels"] == ["organ", "lesion", "background"]

    image_id = unlabeled[0]
    img = nib.load(str(studies / f"{image_id}.nii.gz"))
    result, out = client.infer("segdiff", image_id, {})
    try:
        res = nib.load(result)
        assert res.shape == img.shape, server.tail()  # the phantom's own grid, not the 1.25 mm one
        np.testing.assert_allclose(res.affine, img.affine, atol=1e-3)
        assert set(np.unique(np.asarray(res.dataobj)).astype(int).tolist()) <= {0, 1, 2}
        assert out["label_names"] == {"background": 0, "organ": 1, "lesion": 2}
        assert out["cached"] is False and set(out["uncertainty_stats"]) == {"organ", "lesion"}
    finally:
        os.unlink(result)

    # the uncertainty map comes from the cached ensemble, on the image grid, in [0, 1]
    map_file, out_map = client.infer("segdiff_uncertainty", image_id, {"output_map": True})
    try:
        umap = nib.load(map_file)
        assert umap.shape == img.shape and out_map["cached"] is True
        values = np.asarray(umap.dataobj)
        assert 0.0 <= values.min() and values.max() <= 1.0 and values.max() > 0.0  # an untrained model is unsure
    finally:
        os.unlink(map_file)

    # Train with what Slicer sends (shortened): the 3D model is fine-tuned, not replaced by a 2.5D one
    params = slicer_params(info, "train", "segdiff_train")
    params.update(max_epochs=1, iterations_per_epoch=3, train_batch_size=2)
    assert client.train_start("segdiff_train", params)["status"] in TASK_ACTIVE
    done = wait_task_done(client.train_status, timeout=600, interval=2, what="training")
    stats = client.info()["train_stats"]["segdiff_train"]
    assert done["status"] == "DONE" and stats["init"] == "pretrained", dump(stats) + "\n" + server.tail()
    assert load_checkpoint(model_3d)[1].spatial_dims == 3
