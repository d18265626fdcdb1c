"""A trained, ZeRO-partitioned checkpoint exports to a Hugging Face folder whose logits equal ours; the exported
weights (via tools/import_hf.py) can seed a new run through ``train.init_from``."""

from __future__ import annotations

import subprocess
import sys

import torch

from mambatron.hf import load_full_state
from mambatron.models import build_model
from mambatron.train import checkpoint as ckpt
from tests.train.conftest import REPO, run_export, run_train


def test_export_step_dir_matches_transformers(ref_run, tmp_path):
    from transformers import AutoModelForCausalLM

    ref_dir, overrides = ref_run
    step_dir = ckpt.checkpoint_root(ref_dir) / "step_0000020"
    out = tmp_path / "hf"
    proc = run_export(step_dir, out)
    assert proc.returncode == 0, proc.stderr[-3000:]

    state, config = ckpt.load_full_model_state(ref_dir)  # the run directory resolves to its newest checkpoint
    ours = build_model(config.model)
    load_full_state(ours, state)
    hf, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.randint(0, config.model.vocab_size, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours.eval()(ids)[..., : config.model.vocab_size]
        got = hf.eval()(ids).logits[..., : config.model.vocab_size]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    # Round trip into training: import the HF folder and start a new run from its weights.
    model_dir = tmp_path / "imported"
    proc = subprocess.run(
        [sys.executable, "tools/import_hf.py", "--hf", str(out), "--out", str(model_dir), "--config",
         "configs/tiny.yaml", "--set", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = run_train(0, [*overrides, f"train.out_dir={tmp_path / 'init'}", f"train.init_from={model_dir}",
                        "train.max_steps=1", "optim.lr=1e-12", "optim.min_lr=0"])  # fmt: skip
    assert f"initial weights from {model_dir}" in run.stdout
    restarted, _ = ckpt.load_full_model_state(tmp_path / "init")
    for name, tensor in state.items():
        torch.testing.assert_close(restarted[name], tensor, rtol=0, atol=1e-6, msg=name)
