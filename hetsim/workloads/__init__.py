"""Workloads: a model and a data set, all behind one interface (`Workload`).

Built-ins: `digits` (scikit-learn's bundled handwritten digits + MLP; the embedded default, no
download), `fashion_mnist` (IDX files, small CNN), `cifar10` (python batches, ResNet-20, the paper's
workload) and `synthetic` (Gaussian classes, for fast tests). Data are held in memory as raw tensors;
`Workload.prepare` turns a raw batch into model input (normalisation, and augmentation in training).
"""

from __future__ import annotations

from torch import nn

from hetsim.config import WorkloadSpec
from hetsim.errors import DataError, SpecError
# the registry lives in .base so that the built-ins can register without importing this package back
from hetsim.workloads.base import WORKLOADS, Workload, WorkloadEntry, data_path, register_workload  # noqa: F401


def check_workload(spec: WorkloadSpec, need_files: bool = True) -> None:
    """Validate a workload spec on load: known name, sizes, and (for file-based data) files present."""
    _load_builtins()
    if spec.name not in WORKLOADS:
        raise SpecError(f"workload.name: expected one of {sorted(WORKLOADS)}, got {spec.name!r}")
    for key in ("n_train", "n_test"):
        if getattr(spec, key) < 0:
            raise SpecError(f"workload.{key}: expected an integer >= 0 (0 = all), got {getattr(spec, key)!r}")
    if spec.n_features < 1 or spec.n_classes < 2:
        raise SpecError("workload: expected n_features >= 1 and n_classes >= 2")
    entry = WORKLOADS[spec.name]
    if not (entry.required_files or entry.required_glob) or not need_files:
        return
    root = data_path(spec)
    if not root.is_dir():
        raise SpecError(f"workload.path: data directory {str(root)!r} for {spec.name} does not exist "
                        f"({entry.description})")
    for alternatives in entry.required_files:
        if not any((root / f).is_file() for f in alternatives):
            raise SpecError(f"workload.path: {str(root)!r} lacks {alternatives[0]} ({entry.description})")
    if entry.required_glob and not any(root.glob(entry.required_glob)):
        raise SpecError(f"workload.path: {str(root)!r} has no {entry.required_glob} files ({entry.description})")


def build_model(spec: WorkloadSpec) -> nn.Module:
    """A freshly initialised model of the workload (no data loaded)."""
    _load_builtins()
    return WORKLOADS[spec.name].model(spec)


def nominal_train_size(spec: WorkloadSpec) -> int:
    """The training-set size a run of `spec` uses, without loading the data."""
    _load_builtins()
    full = WORKLOADS[spec.name].n_train or spec.n_train or 2048
    return min(full, spec.n_train) if spec.n_train else full


def known_train_size(spec: WorkloadSpec) -> int | None:
    """The training-set size of `spec` when it is known without reading data files; None when it depends
    on them (shakespeare's, from its texts)."""
    _load_builtins()
    entry = WORKLOADS[spec.name]
    if not entry.n_train and (entry.required_files or entry.required_glob):
        return None
    return nominal_train_size(spec)


def check_batch_fits(spec: WorkloadSpec, batch_size: int, n_train: int | None = None) -> None:
    """A batch must fit in the training set: a batch is drawn without replacement. `n_train`: the loaded
    set's size; unset, the size known without the data (the check is skipped where that is unknown)."""
    if spec.n_train and spec.n_train < batch_size:
        raise SpecError(f"workload.n_train: expected at least one batch (optim.batch_size = {batch_size} "
                        f"samples), got {spec.n_train}")
    size = known_train_size(spec) if n_train is None else n_train
    if size is not None and batch_size > size:
        raise SpecError(f"optim.batch_size: expected at most the {size} training samples of {spec.name}, "
                        f"got {batch_size}")


def build_workload(spec: WorkloadSpec) -> Workload:
    """Load the data and return the workload; `n_train`/`n_test` truncate the sets."""
    check_workload(spec)
    try:
        w = WORKLOADS[spec.name].build(spec)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"workload {spec.name} at {str(data_path(spec))!r}: {e}") from None
    if spec.n_train:
        w.train_x, w.train_y = w.train_x[:spec.n_train], w.train_y[:spec.n_train]
    if spec.n_test:
        w.test_x, w.test_y = w.test_x[:spec.n_test], w.test_y[:spec.n_test]
    return w


def _load_builtins() -> None:
    from hetsim.workloads import cifar10, digits, fashion_mnist, shakespeare, synthetic  # noqa: F401
