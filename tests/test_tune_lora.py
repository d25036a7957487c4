"""openherd.tune.lora: the LoRA maths, trainable flags, state dicts and merging."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from openherd.errors import InvalidRequest
from openherd.model import ModelArgs, Transformer
from openherd.tune.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_lora_state_dict,
    lora_dropout,
    lora_dropout_mask,
    lora_projection,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora_weights,
    unwrap_lora,
)


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=50, max_seq_len=64)
    return Transformer(args).eval()


def randomize_b(model, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * std)


def test_lora_linear_is_the_formula():
    base = torch.nn.Linear(6, 5)
    m = LoRALinear(base, rank=3, alpha=6.0, dropout=0.0)
    with torch.no_grad():
        m.lora_b.normal_()
    x = torch.randn(2, 4, 6)
    expected = x @ base.weight.T + base.bias + (x @ m.lora_a.T @ m.lora_b.T) * (6.0 / 3)
    torch.testing.assert_close(m(x), expected)
    torch.testing.assert_close(m.delta_weight(), m.lora_b @ m.lora_a * 2.0)


def test_fresh_adapter_leaves_the_model_unchanged():
    model = tiny_model()
    ids = torch.randint(0, 50, (2, 9))
    before = model(ids)
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    torch.testing.assert_close(model(ids), before)  # B = 0 at init (Hu et al. 2021, sec. 4.1)


def test_all_seven_projections_are_adapted_and_only_lora_trains():
    model = tiny_model()
    apply_lora(model, LoRAConfig())
    mark_only_lora_as_trainable(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 7 * 2  # (A, B) x 7 projections x 2 layers
    assert all(n.endswith((".lora_a", ".lora_b")) for n in trainable)
    adapted = {n.split(".")[-2] for n in trainable}
    assert adapted == {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}
    # The base state dict keeps its names: loaders and exporters see the same keys.
    assert "layers.0.attention.wq.weight" in model.state_dict()


def test_merge_matches_the_unmerged_forward():
    model = tiny_model()
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    randomize_b(model)
    ids = torch.randint(0, 50, (1, 12))
    unmerged = model(ids)
    merge_lora_weights(model)
    assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    torch.testing.assert_close(model(ids), unmerged, atol=1e-5, rtol=1e-5)


def test_unwrap_leaves_a_plain_model_with_the_merged_weights():
    model = tiny_model()
    base_keys = set(model.state_dict())
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    randomize_b(model)
    ids = torch.randint(0, 50, (1, 12))
    adapted = model(ids)
    unwrap_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == base_keys
    torch.testing.assert_close(model(ids), adapted, atol=1e-5, rtol=1e-5)


def test_seeded_init_is_reproducible_and_state_dict_round_trips():
    a, b = tiny_model(), tiny_model()
    apply_lora(a, LoRAConfig(), generator=torch.Generator().manual_seed(5))
    apply_lora(b, LoRAConfig(), generator=torch.Generator().manual_seed(5))
    for k, v in lora_state_dict(a).items():
        torch.testing.assert_close(v, lora_state_dict(b)[k], rtol=0, atol=0)
    randomize_b(a)
    load_lora_state_dict(b, lora_state_dict(a))
    ids = torch.randint(0, 50, (1, 7))
    torch.testing.assert_close(a(ids), b(ids))


def test_bad_configs_and_mismatched_adapters_are_clear_errors():
    with pytest.raises(InvalidRequest, match="--rank"):
        LoRAConfig(rank=0)
    with pytest.raises(InvalidRequest, match="--dropout"):
        LoRAConfig(dropout=1.0)
    with pytest.raises(InvalidRequest, match="targets"):
        LoRAConfig(targets=("lm_head",))
    model = tiny_model()
    apply_lora(model, LoRAConfig(rank=4))
    sd = lora_state_dict(model)
    sd["layers.0.attention.wq.lora_a"] = torch.zeros(2, 32)
    with pytest.raises(InvalidRequest, match="does not fit"):
        load_lora_state_dict(model, sd)
    del sd["layers.0.attention.wq.lora_a"]
    with pytest.raises(InvalidRequest, match="missing"):
        load_lora_state_dict(model, sd)


def test_lora_dropout_drops_at_rate_p_and_keeps_the_expectation():
    x = torch.ones(256, 512)
    torch.manual_seed(3)
    xd, scale = lora_dropout(x, 0.1, training=True)
    kept = (xd != 0).float().mean().item()
    assert abs(kept - 0.9) < 0.005  # 131072 draws: 5 standard errors is ~0.004
    assert set(xd.unique().tolist()) <= {0.0, 1.0}  # masked, not yet rescaled ...
    assert scale == pytest.approx(1 / 0.9, rel=1e-4)  # ... the caller folds 1/(1-p) into B
    assert (xd * scale).mean().item() == pytest.approx(1.0, abs=0.01)
    # Seeded by torch's generator: the same seed, the same mask; the next call, another one.
    torch.manual_seed(3)
    again, _ = lora_dropout(x, 0.1, training=True)
    other, _ = lora_dropout(x, 0.1, training=True)
    assert torch.equal(xd, again) and not torch.equal(xd, other)
    # Eval mode and p = 0 leave the input alone; gradients flow through the kept entries.
    assert lora_dropout(x, 0.1, training=False) == (x, 1.0) and lora_dropout(x, 0.0, training=True) == (x, 1.0)
    w = torch.randn(512, requires_grad=True)
    torch.manual_seed(4)
    y, _ = lora_dropout(x * w, 0.5, training=True)
    y.sum().backward()
    torch.manual_seed(4)
    mask, _ = lora_dropout(x, 0.5, training=True)
    assert torch.equal(w.grad, mask.sum(0))


@pytest.mark.parametrize("drop", [1, 100, 3277, 32768, 65535])  # p = drop / 65536, ties on either byte
def test_keep_mask_drops_at_the_16_bit_rate(drop):
    # The high byte alone would give floor or ceil(drop / 256) / 256: 28 standard errors off
    # for drop = 3277 at this size, so a mask that skipped the low-byte draws would fail.
    from openherd.tune.lora import _keep_mask

    n = 1 << 22
    keep = _keep_mask(np.random.SFC64(7), n, drop)
    assert keep.dtype == np.float32 and keep.shape == (n,) and set(np.unique(keep)) <= {0.0, 1.0}
    p = drop / 65536
    assert abs((1 - keep.mean()) - p) < 5 * (p * (1 - p) / n) ** 0.5 + 1e-9


def test_lora_linear_dropout_matches_the_unfolded_formula():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8)
    m = LoRALinear(base, rank=2, alpha=4.0, dropout=0.25)
    with torch.no_grad():
        m.lora_b.normal_()
    m.train()
    x = torch.randn(5, 16)
    torch.manual_seed(9)
    y = m(x)
    torch.manual_seed(9)
    keep, scale = lora_dropout(torch.ones_like(x), 0.25, training=True)
    ref = base(x) + (x * keep * scale) @ m.lora_a.t() @ m.lora_b.t() * m.scaling
    assert torch.allclose(y, ref, atol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("bias", [False, True])
def test_lora_projection_is_the_lora_linears_side_by_side(dropout, bias):
    torch.manual_seed(0)
    mods = [LoRALinear(torch.nn.Linear(16, n, bias=bias), rank=2, alpha=4.0) for n in (12, 4, 4)]  # q, k, v
    for m in mods:
        m.weight.requires_grad_(False)
        if bias:
            m.bias.requires_grad_(False)
        with torch.no_grad():
            m.lora_b.normal_()
    x = torch.randn(3, 5, 16, requires_grad=True)
    torch.manual_seed(9)
    keep, scale = lora_dropout_mask(x, dropout, training=True)
    weight = torch.cat([m.weight for m in mods])
    bias_ = torch.cat([m.bias for m in mods]) if bias else None
    a = torch.cat([m.lora_a for m in mods])
    y = lora_projection(x, weight, bias_, keep, a, [m.lora_b for m in mods], [m.scaling * scale for m in mods])
    grad = torch.randn_like(y)
    params = [x] + [p for m in mods for p in (m.lora_a, m.lora_b)]
    ours = torch.autograd.grad(y, params, grad)
    xd = x if keep is None else x * keep * scale
    ref = torch.cat([F.linear(x, m.weight, m.bias) + xd @ m.lora_a.t() @ m.lora_b.t() * m.scaling for m in mods], -1)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(ours, torch.autograd.grad(ref, params, grad), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # An input that needs no gradient (the first layer's) gets none, the adapters still do.
    y0 = lora_projection(x.detach(), weight, bias_, keep, a, [m.lora_b for m in mods], [1.0] * 3)
    y0.sum().backward()
    assert x.grad is None and all(m.lora_b.grad is not None for m in mods)
    with pytest.raises(RuntimeError, match="frozen"):
        lora_projection(x, weight.requires_grad_(True), None, None, a, [m.lora_b for m in mods], [1.0] * 3)
