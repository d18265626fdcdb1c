import math

import torch
import torch.nn.functional as F

from mambatron.models import build_model, generate
from tests.models.conftest import tiny_model_config


def _model(arch, dtype=torch.float64, **kw):
    cfg = tiny_model_config(arch, **kw)
    model = build_model(cfg).to(dtype)
    # Perturb the near-identity parameters so every path (norm weights, D, biases) matters in the comparisons.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D")):
                p.add_(0.3 * torch.randn_like(p))
    return model, cfg


def test_forward_shapes_and_loss(arch):
    model, cfg = _model(arch, torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (2, 19))
    logits = model(ids)
    assert logits.shape == (2, 19, cfg.padded_vocab_size)
    loss = model.loss(ids, ids.roll(-1, 1))
    assert abs(loss.item() - math.log(cfg.padded_vocab_size)) < 1.0  # near-uniform at init
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_ignored_labels_do_not_count(arch):
    model, cfg = _model(arch)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    labels = ids.roll(-1, 1)
    masked = labels.clone()
    masked[:, 6:] = -100
    full = F.cross_entropy(model(ids)[:, :6].flatten(0, 1), labels[:, :6].flatten())
    torch.testing.assert_close(model.loss(ids, masked), full, rtol=0, atol=1e-12)


def test_step_mode_equals_full_forward(arch):
    model, cfg = _model(arch)
    ids = torch.randint(0, cfg.vocab_size, (3, 21))
    full = model(ids)
    prefix = 5
    caches = model.empty_caches(3)
    logits = [model(ids[:, :prefix], caches=caches)]
    for t in range(prefix, ids.shape[1]):
        logits.append(model.step(ids[:, t], caches)[:, None])
    stepped = torch.cat(logits, dim=1)
    assert (stepped - full).abs().max().item() < 1e-10


def test_step_from_empty_state_equals_full_forward(arch):
    model, cfg = _model(arch)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    caches = model.empty_caches(2)
    stepped = torch.stack([model.step(ids[:, t], caches) for t in range(ids.shape[1])], dim=1)
    assert (stepped - model(ids)).abs().max().item() < 1e-10


def test_packed_documents_equal_separate_runs(arch):
    model, cfg = _model(arch)
    lengths = [7, 1, 12]
    docs = [torch.randint(0, cfg.vocab_size, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    seq_idx = torch.cat([torch.full((1, n), i, dtype=torch.int32) for i, n in enumerate(lengths)], dim=1)
    out = model(packed, seq_idx=seq_idx)
    separate = torch.cat([model(d) for d in docs], dim=1)
    assert (out - separate).abs().max().item() < 1e-10
    # Without seq_idx the later documents see the earlier ones: the reset is what makes them equal.
    assert (model(packed) - separate).abs().max().item() > 1e-6


def test_generate_greedy_matches_argmax_rollout(arch):
    model, cfg = _model(arch)
    prompt = torch.randint(0, cfg.vocab_size, (2, 4))
    out = generate(model, prompt, max_new_tokens=6)
    ids = prompt
    for _ in range(6):
        nxt = model(ids)[:, -1, : cfg.vocab_size].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(out, ids)


def test_generate_sampling_respects_top_k_and_vocab(arch):
    model, cfg = _model(arch)
    prompt = torch.randint(0, cfg.vocab_size, (4, 3))
    gen = torch.Generator().manual_seed(0)
    out = generate(model, prompt, max_new_tokens=8, temperature=1.0, top_k=1, generator=gen)
    assert torch.equal(out, generate(model, prompt, max_new_tokens=8))  # top_k=1 is greedy
    out = generate(model, prompt, max_new_tokens=8, temperature=2.0, generator=gen)
    assert out.max().item() < cfg.vocab_size


def test_init_follows_the_papers(arch):
    model, cfg = _model(arch, torch.float32)
    mixer = model.layers[0].mixer
    dt = F.softplus(mixer.dt_proj.bias if arch == "mamba1" else mixer.dt_bias)
    assert dt.min() >= cfg.dt_min * 0.999 and dt.max() <= cfg.dt_max * 1.001
    A = torch.exp(mixer.A_log)
    if arch == "mamba1":
        torch.testing.assert_close(A, torch.arange(1, cfg.d_state + 1.0).repeat(cfg.d_inner, 1))
    else:
        assert A.min() >= 1.0 and A.max() <= 16.0
    bound = 1 / math.sqrt(cfg.d_inner) / math.sqrt(cfg.n_layer)
    assert mixer.out_proj.weight.abs().max() <= bound


def test_meta_then_materialise_equals_direct_seeded_init(arch):
    cfg = tiny_model_config(arch)
    direct = build_model(cfg)
    direct.init_weights(seed=3)
    meta = build_model(cfg, device="meta")
    meta.to_empty(device="cpu")
    meta.init_weights(seed=3)
    for (name, a), (_, b) in zip(direct.state_dict().items(), meta.state_dict().items()):
        assert torch.equal(a, b), name


def _devices():
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def test_seeded_init_on_the_model_device(arch):
    """init_weights(seed) draws from a generator on the parameters' device: a model built on a GPU initialises there
    (a CUDA generator cannot sample into CPU tensors), deterministically, with the papers' ranges."""
    cfg = tiny_model_config(arch)
    for device in _devices():
        a = build_model(cfg, device=device)
        b = build_model(cfg, device=device)
        a.init_weights(seed=5)
        b.init_weights(seed=5)
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert x.device.type == device and torch.equal(x, y), name
        mixer = a.layers[0].mixer
        dt = F.softplus(mixer.dt_proj.bias if arch == "mamba1" else mixer.dt_bias)
        assert dt.min() >= cfg.dt_min * 0.999 and dt.max() <= cfg.dt_max * 1.001


def test_untied_head_and_vocab_padding(arch):
    model, cfg = _model(arch, torch.float32, tie_embeddings=False, vocab_size=50)
    assert cfg.padded_vocab_size == 56
    assert model.lm_head.weight.shape == (56, cfg.d_model)
    assert model(torch.zeros(1, 3, dtype=torch.long)).shape[-1] == 56
