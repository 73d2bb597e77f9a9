"""Models of two times (``flow_map=true``): a one-time model's state dict and calls unchanged, the step h as an
input (h=None is h = 0), configs that rebuild them, forward-mode AD through the UNet's attention (MeanFlow's JVP),
and ``--init`` from a one-time run."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from fastfm.commands.train import parse_config
from fastfm.data import get_dataset
from fastfm.models import MLP, UNet, build_model
from fastfm.run.checkpoint import CheckpointError, load_inference
from fastfm.training.assemble import FRESH_IN_FLOW_MAP, init_from, model_for

from conftest import Run
from test_models import perturb_

BATCH = 5


def _mlp(**kw: Any) -> MLP:
    return MLP(3, hidden=16, depth=2, time_dim=8, **kw)


def _unet(**kw: Any) -> UNet:
    """Two levels on 7x7 images (4x4 below), attention at 4x4 and in the middle block."""
    return UNet(1, model_channels=8, channel_mult=[1, 2], num_res_blocks=1, num_heads=2, image_size=7, **kw)


MODELS = {"mlp": (_mlp, (3,)), "unet": (_unet, (1, 7, 7))}


def _inputs(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(x, t, h) with t + h <= 1."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(BATCH, generator=g)
    return torch.randn(BATCH, *shape, generator=g, dtype=dtype), t, (1 - t) * torch.rand(BATCH, generator=g)


@pytest.mark.parametrize("name", list(MODELS))
def test_one_time_model_keeps_its_state_dict_and_refuses_h(name: str) -> None:
    """flow_map=false: no step embedding, the keys of a config without the option (an older model.json) loading
    strictly; a flow map adds exactly a copy of the time MLP under cond.step. A step h is a ValueError."""
    make, shape = MODELS[name]
    one, two = make(), make(flow_map=True)
    keys, two_keys = set(one.state_dict()), set(two.state_dict())
    step = {k for k in two_keys if k.startswith(FRESH_IN_FLOW_MAP)}
    assert not any("step" in k for k in keys)
    assert two_keys - step == keys
    assert step == {k.replace("cond.time.", FRESH_IN_FLOW_MAP) for k in keys if k.startswith("cond.time.")} != set()
    older = {k: v for k, v in one.config.items() if k != "flow_map"}
    build_model(older).load_state_dict(one.state_dict())
    x, t, h = _inputs(shape)
    with pytest.raises(ValueError, match="flow_map=true"):
        one(x, t, h=h)


@pytest.mark.parametrize("name", list(MODELS))
def test_flow_map_takes_the_step(name: str) -> None:
    """h=None is h = 0 bitwise; the output moves with h; build_model(config) (through JSON) rebuilds the model,
    which takes its state dict and gives the same outputs."""
    make, shape = MODELS[name]
    model = perturb_(make(flow_map=True))
    x, t, h = _inputs(shape)
    assert torch.equal(model(x, t), model(x, t, h=torch.zeros_like(t)))
    assert (model(x, t, h=h) - model(x, t)).abs().max() > 1e-3
    config = json.loads(json.dumps(model.config))
    assert config["flow_map"] is True
    twin = build_model(config)
    twin.load_state_dict(model.state_dict())
    assert torch.equal(twin(x, t, h=h), model(x, t, h=h))


def test_cli_model_args_build_a_flow_map() -> None:
    """--model-args flow_map=true gives a model of two times (for any objective); a flow-map objective gives one
    by itself; the default, one time."""
    data = get_dataset("moons", seed=0)

    def built(*flags: str) -> nn.Module:
        return model_for(parse_config(["--data", "moons", "--out", "unused", *flags]), data)

    tiny = ["hidden=16", "depth=2"]
    assert built("--model-args", "flow_map=true", *tiny).flow_map
    assert built("--objective", "shortcut", "--model-args", *tiny).flow_map
    plain = built("--model-args", *tiny)
    assert not plain.flow_map and plain.cond.step is None


def test_unet_jvp_through_attention() -> None:
    """torch.func.jvp through the flow-map UNet as MeanFlow takes it (no forward_mode_attention context): in x
    against a float64 central difference (error ~1e-10); in (x, t, h) against reverse mode, <w, J d> = <J^T w, d>
    (the time embedding is fp32 by design, hence rtol 1e-4)."""
    model = perturb_(_unet(flow_map=True)).double()
    x, t, h = _inputs((1, 7, 7), torch.float64, seed=1)
    g = torch.Generator().manual_seed(2)
    dx, w = torch.randn(2, *x.shape, generator=g, dtype=torch.float64)
    dt, dh = torch.randn(2, BATCH, generator=g)

    def f(x: Tensor, t: Tensor, h: Tensor) -> Tensor:
        return model(x, t, h=h)

    _, along_x = torch.func.jvp(lambda x: f(x, t, h), (x,), (dx,))
    eps = 1e-6
    central = (f(x + eps * dx, t, h) - f(x - eps * dx, t, h)) / (2 * eps)
    assert torch.allclose(along_x, central, rtol=1e-6, atol=1e-8)
    assert along_x.abs().max() > 1e-2
    _, along = torch.func.jvp(f, (x, t, h), (dx, dt, dh))
    _, pull = torch.func.vjp(f, x, t, h)
    back = pull(w)
    assert torch.allclose((w * along).sum(), sum((b * d).sum().double() for b, d in zip(back, (dx, dt, dh))),
                          rtol=1e-4)
    assert (along - along_x).abs().max() > 1e-3  # the time tangents count


def test_init_from_a_one_time_run(toy_run: Run) -> None:
    """A one-time run's EMA weights into a flow map of its architecture: every shared tensor copied, the step
    embedding left as initialised; another architecture is a CheckpointError naming the tensors that differ."""
    weights, meta = load_inference(toy_run.dir)
    model = build_model({**meta["model"], "flow_map": True})
    fresh = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(FRESH_IN_FLOW_MAP)}
    init_from(model, str(toy_run.dir))
    state = model.state_dict()
    assert all(torch.equal(state[k], w) for k, w in weights.items())
    assert fresh and all(torch.equal(state[k], v) for k, v in fresh.items())
    with pytest.raises(CheckpointError, match=r"other shapes \[.*'net\.0\.weight'"):
        init_from(build_model({**meta["model"], "hidden": 16, "flow_map": True}), str(toy_run.dir))
    with pytest.raises(CheckpointError, match=r"unexpected \['net\.0\.bias'"):
        init_from(UNet(2, model_channels=8, channel_mult=[1], num_res_blocks=1, image_size=4, flow_map=True),
                  str(toy_run.dir))
