"""Tests for fastfm.models: shapes, precision, forward-mode AD, configs, compile/export."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from fastfm.models import MLP, ConditionEmbedding, SinusoidalEmbedding, UNet, build_model
from fastfm.models.blocks import group_norm

IMAGE_CASES = [(1, 8), (1, 28), (3, 32)]  # (channels, side)


def tiny_unet(channels: int, size: int, **kwargs) -> UNet:
    return UNet(channels, model_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1,
                num_heads=2, image_size=size, **kwargs)


def perturb_(model: nn.Module, std: float = 0.1, seed: int = 0) -> nn.Module:
    """Add noise to every parameter, moving zero-initialised layers away from zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


# ---------------------------------------------------------------- embeddings


def test_sinusoidal_embedding_values_and_odd_dim() -> None:
    emb = SinusoidalEmbedding(8)(torch.tensor([0.0, 0.5]))
    assert emb.shape == (2, 8) and emb.dtype == torch.float32
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    torch.testing.assert_close(emb[1, 0], torch.cos(torch.tensor(500.0)))  # w_0 = 1, scale 1000
    assert SinusoidalEmbedding(7)(torch.rand(3)).shape == (3, 7)


def test_time_embedding_stays_fp32_under_bf16_autocast() -> None:
    t = torch.rand(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = SinusoidalEmbedding(16)(t.to(torch.bfloat16))
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb, SinusoidalEmbedding(16)(t.to(torch.bfloat16).float()))


def test_condition_embedding_none_is_null_class() -> None:
    cond = ConditionEmbedding(8, 16, num_classes=5)
    t = torch.rand(3)
    torch.testing.assert_close(cond(t), cond(t, torch.full((3,), 5)))
    with pytest.raises(ValueError, match="num_classes=None"):
        ConditionEmbedding(8, 16)(t, torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("dim", [2, 3, 64])
@pytest.mark.parametrize("num_classes", [None, 4])
@pytest.mark.parametrize("batch", [1, 3])
def test_mlp_shapes(dim: int, num_classes: int | None, batch: int) -> None:
    model = MLP(dim, hidden=32, depth=3, time_dim=16, num_classes=num_classes)
    y = None if num_classes is None else torch.randint(0, num_classes + 1, (batch,))
    assert model(torch.randn(batch, dim), torch.rand(batch), y=y).shape == (batch, dim)


@pytest.mark.parametrize("channels,size", IMAGE_CASES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("cond", ["none", "class", "class+low_res"])
def test_unet_shapes(channels: int, size: int, batch: int, cond: str) -> None:
    kwargs = {}
    if "class" in cond:
        kwargs["num_classes"] = 10
    if "low_res" in cond:
        kwargs["low_res_channels"] = channels
    model = perturb_(tiny_unet(channels, size, **kwargs)).eval()
    inputs = {}
    if "class" in cond:
        inputs["y"] = torch.randint(0, 11, (batch,))
    if "low_res" in cond:
        inputs["low_res"] = torch.randn(batch, channels, size // 2, size // 2)
    out = model(torch.randn(batch, channels, size, size), torch.rand(batch), **inputs)
    assert out.shape == (batch, channels, size, size) and torch.isfinite(out).all()


def test_unet_options() -> None:
    model = UNet(1, out_channels=2, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(8, 4), num_head_channels=4, image_size=8)
    assert model.config["attention_resolutions"] == [8, 4]
    assert model(torch.randn(2, 1, 8, 8), torch.rand(2)).shape == (2, 2, 8, 8)
    with pytest.raises(ValueError, match="feature-map sizes"):
        UNet(1, attention_resolutions=(16,), image_size=28)
    with pytest.raises(ValueError, match="low_res"):
        tiny_unet(1, 8, low_res_channels=1)(torch.randn(1, 1, 8, 8), torch.rand(1))
    with pytest.raises(ValueError, match="low_res"):
        tiny_unet(1, 8)(torch.randn(1, 1, 8, 8), torch.rand(1), low_res=torch.randn(1, 1, 4, 4))


# ---------------------------------------------------------------- init / conditioning


def test_unet_zero_output_at_init() -> None:
    model = tiny_unet(3, 32, num_classes=10, low_res_channels=3)
    out = model(torch.randn(2, 3, 32, 32), torch.rand(2), y=torch.tensor([1, 10]),
                low_res=torch.randn(2, 3, 16, 16))
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_null_class_differs_from_real_class(kind: str) -> None:
    if kind == "mlp":
        model, x = MLP(3, hidden=32, depth=2, time_dim=16, num_classes=5), torch.randn(2, 3)
    else:
        model, x = perturb_(tiny_unet(1, 8, num_classes=5)), torch.randn(2, 1, 8, 8)
    t = torch.rand(2)
    null = model(x, t, y=torch.full((2,), 5))
    torch.testing.assert_close(model(x, t), null)  # y=None means the NULL class
    assert model.num_classes == 5
    assert not torch.allclose(model(x, t, y=torch.tensor([0, 3])), null)


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_gradient_reaches_every_parameter(kind: str) -> None:
    if kind == "mlp":
        model = MLP(2, hidden=16, depth=2, time_dim=8, num_classes=3)
        x, extra = torch.randn(4, 2), {}
    else:
        model = tiny_unet(1, 8, num_classes=3, low_res_channels=1)
        x, extra = torch.randn(4, 1, 8, 8), {"low_res": torch.randn(4, 1, 4, 4)}
    perturb_(model)
    y = torch.tensor([0, 1, 2, 3])  # includes the NULL class so every embedding row is used
    model(x, torch.rand(4), y=y, **extra).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------- precision and AD


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_runs_under_bf16_autocast_with_fp32_time_embedding(kind: str) -> None:
    model = MLP(3, hidden=16, depth=2, time_dim=8) if kind == "mlp" else perturb_(tiny_unet(1, 28))
    x, t = (torch.randn(2, 3) if kind == "mlp" else torch.randn(2, 1, 28, 28)), torch.rand(2)
    dtypes = []
    model.cond.sinusoidal.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t)
    assert dtypes == [torch.float32] and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), model(x, t), rtol=0.1, atol=0.1)


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_jvp_matches_finite_difference(kind: str) -> None:
    if kind == "mlp":
        model, x = MLP(3, hidden=16, depth=2, time_dim=8, num_classes=2), torch.randn(2, 3)
    else:
        model, x = perturb_(tiny_unet(1, 8, num_classes=2)), torch.randn(2, 1, 8, 8)
    model = model.double().eval()
    x, v, t, y = x.double(), torch.randn_like(x.double()), torch.rand(2), torch.tensor([0, 2])
    out, jvp_out = torch.func.jvp(lambda z: model(z, t, y=y), (x,), (v,))
    eps = 1e-6
    fd = (model(x + eps * v, t, y=y) - model(x - eps * v, t, y=y)) / (2 * eps)
    torch.testing.assert_close(out, model(x, t, y=y))
    torch.testing.assert_close(jvp_out, fd, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_build_model_round_trip(kind: str) -> None:
    if kind == "mlp":
        model, x = MLP(3, hidden=16, depth=2, time_dim=8, num_classes=4, activation="gelu"), torch.randn(2, 3)
    else:
        model, x = perturb_(tiny_unet(1, 8, num_classes=4, low_res_channels=1)), torch.randn(2, 1, 8, 8)
    config = json.loads(json.dumps(model.config))
    assert config == model.config
    rebuilt = build_model(config)
    assert type(rebuilt) is type(model) and rebuilt.config == model.config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    rebuilt.load_state_dict(model.state_dict())
    extra = {"low_res": torch.randn(2, 1, 4, 4)} if kind == "unet" else {}
    t, y = torch.rand(2), torch.tensor([1, 4])
    torch.testing.assert_close(rebuilt(x, t, y=y, **extra), model(x, t, y=y, **extra))


def test_build_model_errors() -> None:
    with pytest.raises(ValueError, match="unknown model 'dit'; choose one of mlp, unet"):
        build_model({"name": "dit"})
    with pytest.raises(ValueError, match="unknown model None"):
        build_model({"dim": 2})
    with pytest.raises(ValueError, match="bad parameters for model 'mlp'.*widht"):
        build_model({"name": "mlp", "dim": 2, "widht": 3})
    with pytest.raises(ValueError, match="bad parameters for model 'unet'.*in_channels"):
        build_model({"name": "unet"})  # in_channels missing
    with pytest.raises(ValueError, match="unknown activation"):
        build_model({"name": "mlp", "dim": 2, "activation": "swish2"})


@pytest.mark.parametrize("config, message", [
    ({"name": "unet", "in_channels": 1, "channel_mult": 1},
     "unet model option channel_mult=1: expected a non-empty list of integers >= 1"),
    ({"name": "unet", "in_channels": 1, "channel_mult": []}, "channel_mult=[]: expected a non-empty list"),
    ({"name": "unet", "in_channels": 1, "dropout": "abc"}, "dropout='abc': expected a number in [0, 1)"),
    ({"name": "unet", "in_channels": 1, "num_head_channels": 0},
     "num_head_channels=0: expected an integer >= 1 or null"),
    ({"name": "mlp", "dim": 2, "hidden": "abc"}, "mlp model option hidden='abc': expected an integer >= 1"),
    ({"name": "mlp", "dim": 2, "hidden": 2.5}, "hidden=2.5: expected an integer >= 1"),
    ({"name": "mlp", "dim": 2, "depth": -1}, "depth=-1: expected an integer >= 1"),
    ({"name": "mlp", "dim": 2, "time_dim": True}, "time_dim=True: expected an integer >= 2"),
], ids=["unet-channel_mult-scalar", "unet-channel_mult-empty", "unet-dropout-text", "unet-head_channels-0",
        "mlp-hidden-text", "mlp-hidden-float", "mlp-depth-negative", "mlp-time_dim-bool"])
def test_bad_option_names_option_value_and_expectation(config: dict, message: str) -> None:
    """A wrong-typed or out-of-range option (from --model-args or model.json) is one ValueError, not a TypeError
    from deep inside the constructor."""
    with pytest.raises(ValueError, match=re.escape(message)):
        build_model(config)


# ---------------------------------------------------------------- compile / export


def test_mlp_compile_fullgraph_matches_eager() -> None:
    model = MLP(2, hidden=16, depth=2, time_dim=8, num_classes=3).eval()
    x, t, y = torch.randn(5, 2), torch.rand(5), torch.tensor([0, 1, 2, 3, 0])
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():  # forward-only graph: keeps the (slow on CPU) compile small
        torch.testing.assert_close(compiled(x, t, y=y), model(x, t, y=y))


def test_mlp_export() -> None:
    model = MLP(2, hidden=16, depth=2, time_dim=8, num_classes=3).eval()
    x, t, y = torch.randn(5, 2), torch.rand(5), torch.tensor([0, 1, 2, 3, 0])
    exported = torch.export.export(model, (x, t), {"y": y})
    torch.testing.assert_close(exported.module()(x, t, y=y), model(x, t, y=y))


def test_group_norm_matches_torch_and_compiles_under_jvp() -> None:
    norm = group_norm(16)
    reference = nn.GroupNorm(norm.num_groups, 16)
    perturb_(reference)
    norm.load_state_dict(reference.state_dict())
    x, v = torch.randn(2, 16, 3, 3), torch.randn(2, 16, 3, 3)
    torch.testing.assert_close(norm(x), reference(x))
    jvp = torch.compile(lambda z, dz: torch.func.jvp(norm, (z,), (dz,))[1], fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(jvp(x, v), torch.func.jvp(reference, (x,), (v,))[1])
