"""Workloads: loaders on generated files of the real formats, models, transforms, errors."""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from hetsim.config import WorkloadSpec
from hetsim.errors import DataError, SpecError
from hetsim.workloads import build_workload
from hetsim.workloads.fashion_mnist import read_idx
from hetsim.workloads.models import ResNet20
from hetsim.workloads.transforms import random_crop_flip


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


@pytest.fixture
def fashion_dir(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n, gz in (("train", 40, True), ("t10k", 10, False)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n), gz)
    return tmp_path


@pytest.fixture
def cifar_dir(tmp_path):
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, 6))}
        with open(tmp_path / name, "wb") as f:
            pickle.dump(batch, f)
    return tmp_path


def test_digits_is_the_fixed_80_20_split():
    w = build_workload(WorkloadSpec("digits"))
    assert (w.n_train, len(w.test_y)) == (1437, 360)
    assert w.train_x.shape == (1437, 64) and 0 <= w.train_x.min() and w.train_x.max() <= 1
    assert w.make_model()(w.train_x[:3]).shape == (3, 10)


def test_synthetic_is_deterministic_and_sized():
    a = build_workload(WorkloadSpec("synthetic", n_train=100, n_test=20, n_features=5, n_classes=3))
    b = build_workload(WorkloadSpec("synthetic", n_train=100, n_test=20, n_features=5, n_classes=3))
    assert torch.equal(a.train_x, b.train_x) and a.train_x.shape == (100, 5)
    assert set(a.train_y.tolist()) == {0, 1, 2}


def test_idx_reader_reads_plain_and_gzip(fashion_dir):
    assert read_idx(fashion_dir / "train-images-idx3-ubyte.gz").shape == (40, 28, 28)
    assert read_idx(fashion_dir / "t10k-labels-idx1-ubyte").shape == (10,)


def test_fashion_mnist_workload_from_idx_files(fashion_dir):
    w = build_workload(WorkloadSpec("fashion_mnist", path=str(fashion_dir)))
    assert w.train_x.shape == (40, 1, 28, 28) and w.train_x.dtype == torch.uint8
    x = w.prepare(w.train_x[:4], True, torch.Generator().manual_seed(0))
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32
    assert w.make_model()(x).shape == (4, 10)


def test_truncated_idx_is_a_data_error(fashion_dir):
    p = fashion_dir / "t10k-labels-idx1-ubyte"
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: header says"):
        build_workload(WorkloadSpec("fashion_mnist", path=str(fashion_dir)))


def test_cifar10_from_python_batches(cifar_dir):
    w = build_workload(WorkloadSpec("cifar10", path=str(cifar_dir)))
    assert w.train_x.shape == (30, 3, 32, 32) and len(w.test_y) == 6
    x = w.prepare(w.train_x[:2], True, torch.Generator().manual_seed(0))
    assert w.make_model()(x).shape == (2, 10)


def test_cifar10_missing_files_are_named(cifar_dir):
    (cifar_dir / "test_batch").unlink()
    with pytest.raises(SpecError, match="workload.path: .* lacks test_batch"):
        build_workload(WorkloadSpec("cifar10", path=str(cifar_dir)))


def test_resnet20_has_the_reference_shape():
    m = ResNet20()
    n = sum(p.numel() for p in m.parameters())
    assert 270_000 < n < 275_000  # ~0.27M parameters (He et al. 2016)
    assert all((b.bn2.weight == 0).all() for b in m.blocks)  # each block starts as the identity


def test_random_crop_flip_moves_pixels_within_the_padding():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    out = random_crop_flip(x, 1, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    # with pad 0 the crop is the identity and only flips remain
    same = random_crop_flip(x, 0, torch.Generator().manual_seed(0))
    assert all(torch.equal(s, x[0]) or torch.equal(s, x[0].flip(-1)) for s in same)
    # every output pixel is an input pixel or padding zero, and crops differ across the batch
    assert set(out.unique().tolist()) <= set(range(16)) | {0.0}
    assert len({tuple(o.flatten().tolist()) for o in out}) > 4


def test_real_fashion_mnist_when_installed():
    root = Path("/usr/share/datasets/fashion-mnist")
    if not root.is_dir():
        pytest.skip("dataset-fashion-mnist not installed")
    w = build_workload(WorkloadSpec("fashion_mnist", n_train=1000, n_test=500))
    assert w.train_x.shape == (1000, 1, 28, 28) and len(w.test_y) == 500


@pytest.fixture
def plays(tmp_path):
    rng = np.random.default_rng(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "\n"]
    for name in ("hamlet_gut.txt", "lear_gut.txt", "lear_gut_f.txt"):
        (tmp_path / name).write_text(" ".join(rng.choice(words, 2000)) + " é")
    return tmp_path


def test_shakespeare_chunks_text_into_next_character_samples(plays):
    from hetsim.workloads.shakespeare import SEQ_LEN, VOCAB

    w = build_workload(WorkloadSpec("shakespeare", path=str(plays)))
    assert w.train_x.shape[1] == SEQ_LEN and w.train_y.shape == w.train_x.shape
    assert torch.equal(w.train_x[:, 1:], w.train_y[:, :-1])  # targets are the inputs shifted by one
    assert int(w.train_x.max()) < len(VOCAB)
    out = w.make_model()(w.train_x[:3])
    assert out.shape == (3, len(VOCAB), SEQ_LEN)


def test_shakespeare_reads_modern_editions_only(plays):
    from hetsim.workloads.shakespeare import text_files

    assert [p.name for p in text_files(plays)] == ["hamlet_gut.txt", "lear_gut.txt"]


def test_shakespeare_missing_folder_is_named():
    with pytest.raises(SpecError, match="workload.path: data directory .* for shakespeare does not exist"):
        build_workload(WorkloadSpec("shakespeare", path="/nonexistent/texts"))


def test_sequence_loss_and_accuracy_are_per_position(plays):
    from hetsim.training import per_sample_loss, test_metrics

    w = build_workload(WorkloadSpec("shakespeare", path=str(plays)))
    out = torch.zeros(2, 96, 64)
    y = torch.zeros(2, 64, dtype=torch.long)
    assert torch.allclose(per_sample_loss(out, y), torch.full((2,), float(np.log(96))))
    loss, acc = test_metrics(w.make_model(), w)
    assert 0 <= acc <= 1 and loss == pytest.approx(np.log(96), rel=0.1)


def test_lstm_language_model_trains_in_the_simulator(plays, tiny_spec):
    from hetsim.sim import simulate

    r = simulate(tiny_spec(f"workload={{name='shakespeare', path='{plays}'}}", "sim.batched=true", "optim.lr=1.0",
                           "optim.momentum=0.0", "stop.max_rounds=6",
                           "sampler={name='loss_topk', params={kinds=['cpu']}}"))
    assert r.summary["batched"] is False  # LSTMs fall back to the per-replica loop
    assert r.metrics["test_acc"][-1] > r.metrics["test_acc"][0]


def test_a_batch_larger_than_data_dependent_training_set_is_named_when_the_data_load(plays, tiny_spec):
    from hetsim.resolve import build_policies
    from hetsim.training import TrainingCore

    n = build_workload(WorkloadSpec("shakespeare", path=str(plays))).n_train  # ~220 chunks of 65 characters
    spec = tiny_spec(f"workload={{name='shakespeare', path='{plays}'}}", f"optim.batch_size={n + 1}")  # size unknown on load
    with pytest.raises(SpecError, match=rf"^optim.batch_size: expected at most the {n} training samples of "
                                        rf"shakespeare, got {n + 1}$"):
        TrainingCore(spec, build_policies(spec))
