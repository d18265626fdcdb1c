"""Import a Hugging Face Mamba/Mamba2 folder as a mambatron model directory that training can start from.

    python tools/import_hf.py --hf DIR --out DIR [--config configs/X.yaml] [--set key=value ...]

The model section comes from the HF config; the rest of the run config from ``--config`` (default: built-in
defaults) and ``--set`` overrides. Start training from it with ``--set train.init_from=OUT``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from mambatron.config import config_from_dict, load_config
from mambatron.hf import from_hf, save_model_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="HF model folder (config.json + safetensors)")
    ap.add_argument("--out", required=True, help="output model directory")
    ap.add_argument("--config", help="run config to take the non-model sections from")
    ap.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    model, model_cfg = from_hf(args.hf)
    base = load_config(args.config, args.set).to_dict()
    base["model"] = {**dataclasses.asdict(model_cfg), "kernels": base["model"]["kernels"]}
    config = config_from_dict(base)
    out = save_model_dir(model, config, args.out)
    print(f"imported {model_cfg.arch} from {args.hf} into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
