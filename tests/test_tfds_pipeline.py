"""End-to-end runs of the tfds configs on mock data (``tfds.testing.mock_data``; no download, no TensorFlow).

The mock serves distinct random images per split (TFDS' own generator repeats the same images in every split,
which the pipeline rightly refuses as an overlap between training and evaluation data).
"""

import json
import pathlib
import zlib

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import config, in_fresh_process

from oefsmc_jax.models import imagenet_resnet_spec, init_variables
from oefsmc_jax.run import run
from oefsmc_jax.training.checkpoint import save_model

pytestmark = pytest.mark.slow  # every test here is an end-to-end run

REPO = pathlib.Path(__file__).resolve().parents[1]
cifar10 = config("cifar10")
imagenet = config("imagenet")


class FakeSource:
    """A random-access source of distinct random images per (dataset, split)."""

    def __init__(self, key: str, n: int, num_classes: int, side: int, reads: list):
        rng = np.random.default_rng(zlib.crc32(key.encode()))
        self.x = rng.integers(0, 256, (n, side, side + 4, 3), dtype=np.uint8)  # non-square: exercises the crop
        self.y = np.arange(n) % num_classes
        self.reads, self.key = reads, key

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads.append((self.key, i))
        return {"image": self.x[i], "label": self.y[i]}


def mock(num_examples, num_classes, side, reads):
    def as_data_source(builder, split, decoders=None, **kwargs):
        return FakeSource(f"{builder.name}/{split}", num_examples, num_classes, side, reads)

    return tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_data_source_fn=as_data_source)


def shrink_for_test(c, size):
    for k in ("id", "test", "ood"):
        c.data[k].image_size = size
    c.data.image_size = size
    c.data.pad = 1
    c.train.batch_id = 8
    c.train.batch_ood = 8
    return c


def test_cifar10_tfds_config_end_to_end_on_mock_data(tmp_path):
    c = shrink_for_test(cifar10.get_config("data=tfds,runlocal=1,per_class=3"), 8)
    c.arch.name = "resnet8"
    c.arch.widths = (4, 8, 8)
    c.teacher.steps = 10
    c.teacher.batch_size = 32
    with mock(200, 10, 32, []):
        out = run(c, tmp_path)
    assert set(out["arms"]) == {"base", "oe"}
    assert "| KD + OE-FSMC |" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "subset.json").read_text())["id_source"] == "tfds:cifar10/train"


def test_imagenet_config_reads_only_the_few_samples_lazily(tmp_path):
    spec = imagenet_resnet_spec(18, 1000, widths=(4, 8, 8, 8), stem_width=4)
    save_model(tmp_path / "teacher", spec, init_variables(spec, 32, 0))
    c = shrink_for_test(imagenet.get_config(f"runlocal=1,per_class=1,rho=1,teacher={tmp_path / 'teacher'}"), 32)
    c.data.ood.max_examples = 400
    c.oe.heldout = 16
    c.train.steps = 4
    c.method.prune_ratio = 0.5
    reads = []
    with mock(3000, 1000, 40, reads):
        out = run(c, tmp_path / "run")
    # labels are scanned once (3000 reads) and only the 1000 chosen training images are decoded afterwards; of the
    # OOD pool (400 records) only the 16 images of the held-out slice (a balanced set gets m = 0 OOD images)
    assert out["arms"]["oe"]["steps"] == 4
    train_reads = len(reads) - 3000 - 3000 - 16  # minus label scan, the whole test split and the held-out slice
    assert train_reads == 1000
    pool_reads = [i for key, i in reads if key.startswith(c.data.ood.name)]
    assert len(pool_reads) == len(set(pool_reads)) == 16 and max(pool_reads) < 400
    assert (tmp_path / "run" / "cache" / "id_labels.npz").exists()
    student = out["arms"]["oe"]["spec"]
    assert student["inner_widths"] != spec.to_dict()["inner_widths"]
    assert jax.device_count() == 4


@pytest.fixture(autouse=True)
def _no_download(monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", "/nonexistent-tfds-dir")


def test_imagenet_resnet34_data_dependent_method_end_to_end_on_mock_data(tmp_path, request):
    """A data-dependent compression (FSKD: least squares on the calibration set, OOD images included with OE) on an
    ImageNet ResNet-34 layout, through the tfds config on mock data; FSKD does not fine-tune."""
    if in_fresh_process(request.node.nodeid):
        return
    spec = imagenet_resnet_spec(34, 1000, widths=(4, 4, 8, 8), stem_width=4)
    save_model(tmp_path / "teacher", spec, init_variables(spec, 32, 0))
    c = shrink_for_test(imagenet.get_config(f"runlocal=1,per_class=1,rho=1,method=fskd,oe=both,"
                                            f"teacher={tmp_path / 'teacher'}"), 32)
    c.data.ood.max_examples = 300
    c.oe.heldout = 16
    c.oe.size = 40  # a balanced set gets no OOD images by default (m = K*n_max - n = 0)
    c.oe.calibration_ood_share = "count"  # FSKD's own share (0) would leave the OOD rows out of its solves
    with mock(2000, 1000, 40, []):
        out = run(c, tmp_path / "run")
    base, oe = out["arms"]["base"], out["arms"]["oe"]
    assert base["steps"] == oe["steps"] == 0 and oe["ood_images"] == 40
    assert base["spec"]["inner_widths"] == oe["spec"]["inner_widths"] != spec.to_dict()["inner_widths"]
    record = json.loads((tmp_path / "run" / "oe" / "compression" / "fskd.json").read_text())
    assert record["images"] == 1000 + 40 and len(record["corrections"]) == 2 * 16
