"""Run in a fresh process by test_shards.py: restore loader states and stream on from each.

python resume_child.py CFG_JSON STATE_JSON:N_BATCHES:OUT_NPZ [...]
"""

from __future__ import annotations

import json
import sys

import numpy as np

from mambatron.config import DataConfig
from mambatron.data import build_loader


def main() -> None:
    cfg = DataConfig(**json.loads(sys.argv[1]))
    for job in sys.argv[2:]:
        state_path, n, out = job.split(":")
        with open(state_path) as f:
            state = json.load(f)
        loader = build_loader(cfg, "train", rank=state["rank"], world_size=state["world_size"])
        loader.load_state_dict(state)
        batches = []
        for batch in loader:
            batches.append(batch)
            if len(batches) == int(n):
                break
        np.savez(out, **{k: np.stack([b[k].numpy() for b in batches]) for k in ("input_ids", "labels", "seq_idx")})


if __name__ == "__main__":
    main()
