"""The command-line tools around Hugging Face folders: import_hf → model directory → export_hf, and sample."""

import dataclasses
import importlib.util
from pathlib import Path

import torch

from mambatron.data.tokenizers import load_tokenizer, train_tokenizer
from mambatron.hf import from_hf, load_model_dir, to_hf
from mambatron.models import build_model, generate
from tests.models.conftest import tiny_model_config

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_import_then_export_round_trip(tmp_path):
    cfg = tiny_model_config("mamba1", tie_embeddings=False)
    model = build_model(cfg)
    to_hf(model, cfg, tmp_path / "hf")
    assert _tool("import_hf").main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "dir"),
                                    "--set", "train.max_steps=7"]) == 0  # fmt: skip
    loaded, config = load_model_dir(tmp_path / "dir")
    # The model section comes from the HF folder; the kernel choice and the rest from the run config.
    assert config.model == dataclasses.replace(cfg, kernels="auto") and config.train.max_steps == 7
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    assert torch.equal(loaded(ids), model(ids))
    assert _tool("export_hf").main(["--checkpoint", str(tmp_path / "dir"), "--out", str(tmp_path / "hf2")]) == 0
    again, _ = from_hf(tmp_path / "hf2")
    assert torch.equal(again(ids), model(ids))


def test_sample_prints_the_greedy_continuation(tmp_path, capsys):
    tok = load_tokenizer(train_tokenizer([], 0, tmp_path / "tok", kind="bytes"))
    cfg = tiny_model_config("mamba2", vocab_size=tok.vocab_size)
    model = build_model(cfg)
    to_hf(model, cfg, tmp_path / "hf", tokenizer_dir=tok.path)
    args = ["--hf", str(tmp_path / "hf"), "--prompt", "def ", "--max-new-tokens", "6", "--temperature", "0"]
    assert _tool("sample").main(args) == 0
    expected = generate(model, torch.tensor([[tok.bos_id, *tok.encode("def ")]]), 6, eos_id=tok.eos_id)
    assert capsys.readouterr().out.rstrip("\n") == tok.decode(expected[0].tolist())


def test_sample_takes_a_model_directory(tmp_path, capsys):
    """A model directory (config.yaml + model.safetensors, from import_hf) samples like the HF folder it came from,
    with the tokenizer given by --tokenizer; without a tokenizer, or for a path that is no model, one error line."""
    tok = load_tokenizer(train_tokenizer([], 0, tmp_path / "tok", kind="bytes"))
    cfg = tiny_model_config("mamba1", vocab_size=tok.vocab_size)
    to_hf(build_model(cfg), cfg, tmp_path / "hf", tokenizer_dir=tok.path)
    assert _tool("import_hf").main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "dir")]) == 0
    capsys.readouterr()
    common = ["--prompt", "def ", "--max-new-tokens", "6", "--temperature", "0"]
    assert _tool("sample").main(["--hf", str(tmp_path / "hf"), *common]) == 0
    from_hf_folder = capsys.readouterr().out
    assert _tool("sample").main(["--hf", str(tmp_path / "dir"), "--tokenizer", str(tok.path), *common]) == 0
    assert capsys.readouterr().out == from_hf_folder
    for path in (tmp_path / "dir", tmp_path / "nothing"):
        assert _tool("sample").main(["--hf", str(path), *common]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
