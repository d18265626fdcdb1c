import pytest

from mambatron.config import ConfigError, load_config, parse_overrides


def test_presets_and_overrides_load():
    cfg = load_config("configs/tiny.yaml", ["train.max_steps=7", "optim.betas=[0.8, 0.9]", "model.arch=mamba2"])
    assert cfg.train.max_steps == 7
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.model.arch == "mamba2"


def test_override_parsing_types():
    assert parse_overrides(["a.b=1", "c=true", "d=1e-3", "e=x"]) == {"a": {"b": 1}, "c": True, "d": 1e-3, "e": "x"}


def test_typo_key_names_field_and_suggests():
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yaml", ["model.d_modle=64"])
    msg = str(e.value)
    assert "model.d_modle" in msg and "model.d_model" in msg and "\n" not in msg


def test_typo_section_suggests():
    with pytest.raises(ConfigError, match="did you mean 'optim'"):
        load_config(None, ["optm.lr=1"])


def test_non_divisible_shape_names_field():
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yaml", ["model.arch=mamba2", "model.headdim=48"])
    msg = str(e.value)
    assert "model.headdim=48" in msg and "d_inner=256" in msg and "\n" not in msg


def test_bad_literal_and_type():
    with pytest.raises(ConfigError, match="model.kernels='fast' is not one of"):
        load_config(None, ["model.kernels=fast"])
    # model.arch names a registered layer kind (mambatron/models/layers.py).
    with pytest.raises(ConfigError, match=r"unknown layer kind 'mamba3' \(model.arch\); known kinds: mamba1, mamba2"):
        load_config(None, ["model.arch=mamba3"])
    with pytest.raises(ConfigError, match="train.max_steps='abc' must be an integer"):
        load_config(None, ["train.max_steps=abc"])


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.yaml")


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=nan", "optim.lr=nan must be a finite number"),
        ("optim.lr=inf", "optim.lr=inf must be a finite number"),
        ("optim.betas=[2, 3]", r"optim.betas=\[2.0, 3.0\] must be two numbers in \[0, 1\)"),
        ("optim.betas=[0.9]", r"optim.betas=\[0.9\] must be a list of 2 values"),
        ("optim.eps=0", "optim.eps=0.0 must be > 0"),
        ("train.out_dir=", "train.out_dir is empty"),
    ],
)
def test_impossible_optimizer_and_run_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny.yaml", [override])


def test_tiny_config_reads_the_data_make_demo_writes():
    """`python -m mambatron.train --config configs/tiny.yaml` needs no --set after `make demo`."""
    import re
    from pathlib import Path

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    demo = re.search(r"^DEMO := (\S+)$", makefile, re.M).group(1)
    assert "--out $(DEMO)/tokenizer" in makefile and "--out $(DEMO)/data" in makefile
    cfg = load_config("configs/tiny.yaml")
    assert (cfg.data.index, cfg.data.tokenizer) == (f"{demo}/data/index.json", f"{demo}/tokenizer")
