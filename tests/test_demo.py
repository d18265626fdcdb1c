"""`make demo` builds its tokenizer and shards once and reuses them on later runs (checked with `make -n`)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def planned(tmp_path: Path) -> str:
    return subprocess.run(["make", "-n", "demo", f"DEMO={tmp_path / 'demo'}", f"VENV={tmp_path / 'venv'}"], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout  # fmt: skip


def test_demo_reuses_its_tokenizer_and_shards(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".installed").touch()  # an installed environment, newer than pyproject.toml
    first = planned(tmp_path)
    assert "tools/train_tokenizer.py" in first and "tools/prepare_data.py" in first
    assert "pip install" not in first
    tok, index = tmp_path / "demo/tokenizer/mambatron_tokenizer.json", tmp_path / "demo/data/index.json"
    for path in (tok, index):
        path.parent.mkdir(parents=True)
        path.write_text("{}")
    now = time.time()
    os.utime(tok, (now - 10, now - 10))
    second = planned(tmp_path)
    assert "tools/train_tokenizer.py" not in second and "tools/prepare_data.py" not in second, second
    assert "mambatron.train" in second and "tools/export_hf.py" in second and "tools/sample.py" in second
    os.utime(tok, (now + 10, now + 10))  # a retrained tokenizer makes the shards stale
    third = planned(tmp_path)
    assert "tools/prepare_data.py" in third and "tools/train_tokenizer.py" not in third


def test_demo_trains_the_config_it_is_given(tmp_path):
    (tmp_path / "venv").mkdir()
    (tmp_path / "venv" / ".installed").touch()
    hybrid = subprocess.run(["make", "-n", "demo", f"DEMO={tmp_path / 'demo'}", f"VENV={tmp_path / 'venv'}",
                             "CONFIG=configs/hybrid-tiny.yaml"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout  # fmt: skip
    assert "--config configs/hybrid-tiny.yaml" in hybrid and f"{tmp_path}/demo/run-hybrid-tiny" in hybrid
    assert "--config configs/tiny.yaml" in planned(tmp_path) and "run-tiny" in planned(tmp_path)
