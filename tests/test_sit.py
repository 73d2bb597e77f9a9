"""The SiT/DiT transformer (fastfm.models.sit): DiT's parameter counts, adaLN-Zero at init, the token layout and
positions, LightningDiT's options, attention (one function with the UNet) and JVPs through it, configs and their
errors, a compiled training run sampled with guidance and the SDE and scored by exact likelihood, and engines with
parity.

Models are tiny (depth 2, width 32, 2 heads) on 8x8 images; DiT's sizes are only built on the meta device.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Run, run_training
from test_export import DIGITS, assert_parity, make_run
from test_models import perturb_
from torch import Tensor

from fastfm import seeding
from fastfm.export import EngineRequest, export_engine, load
from fastfm.export.graph import ModelInDtype
from fastfm.models import build_model, config_for_data
from fastfm.models.blocks import attend, forward_mode_attention
from fastfm.models.sit import SIZES, HeadNorm, SiT, rope_2d, rotate, sincos_2d, unpatchify
from fastfm.run.load import load_run
from fastfm.solve import EagerSampler, InferenceSettings
from fastfm.solve.divergence import divergence_exact

TINY = {"name": "sit", "in_channels": 1, "image_size": 8, "patch": 2, "depth": 2, "hidden_size": 32, "num_heads": 2}
OPTIONS = {"norm": "rms", "mlp": "swiglu", "rope": True, "qk_norm": True}
"""LightningDiT's options, all on."""
EVERYTHING = {**OPTIONS, "num_classes": 10, "low_res_channels": 1, "flow_map": True}
ONE_BLOCK = {**TINY, "depth": 1}
"""What the export and device tests build: their graphs grow with the depth, their bugs do not."""
SIT_RUNS: dict[str, tuple[dict[str, Any], dict[str, Any], int]] = {  # model config, data, superres factor
    "sit_cond": ({**ONE_BLOCK, "num_classes": 10}, DIGITS, 0),
    "sit_options_sr": ({**ONE_BLOCK, **OPTIONS, "low_res_channels": 1}, DIGITS, 2),
    "sit_cond_fm": ({**ONE_BLOCK, "num_classes": 10, "flow_map": True}, DIGITS, 0),
}
"""Runs for test_export's ``make_run`` (also traced on the meta device by tests/test_devices.py)."""
DIT_TABLE = {"S": 33.0, "B": 130.5, "L": 458.1, "XL": 675.1}
"""DiT's parameter counts in millions at patch 2, 32x32x4 inputs (out_channels 8: learn_sigma), 1000 classes."""


def tiny(**options: Any) -> SiT:
    return build_model({**TINY, **options})


def batch(model: SiT, n: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Random inputs for every conditioning the model takes (labels include the null class, steps h > 0)."""
    gen = torch.Generator().manual_seed(seed)
    side = model.image_size
    out = {"x": torch.randn(n, model.in_channels, side, side, generator=gen, dtype=dtype),
           "t": torch.rand(n, generator=gen)}
    if model.num_classes is not None:
        out["y"] = torch.arange(n) % (model.num_classes + 1)
    if model.low_res_channels is not None:
        out["low_res"] = torch.randn(n, model.low_res_channels, side // 2, side // 2, generator=gen, dtype=dtype)
    if model.flow_map:
        out["h"] = torch.rand(n, generator=gen)
    return out


def patchify(x: Tensor, patch: int) -> Tensor:
    """The reference token layout (DiT's): (B, C, H, W) -> (B, (H/p)(W/p), p*p*C), tokens row-major over the patch
    grid, each holding its patch's pixels in (row, column, channel) order."""
    b, c, h, w = x.shape
    grid = x.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 3, 5, 1)
    return grid.reshape(b, (h // patch) * (w // patch), patch * patch * c)


# ------------------------------------------------------------------------- sizes and initialisation


def dit_count(depth: int, d: int, c: int, out: int, p: int, classes: int, grid: int) -> int:
    """DiT's parameters (its frozen (grid^2, d) position table included): patch conv, time MLP (256 -> d -> d),
    label table (with the null class), per block qkv, proj, fc1, fc2 (4d) and adaLN (6d), final adaLN and linear."""
    block = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + (6 * d * d + 6 * d)
    return ((c * p * p * d + d) + grid * grid * d + (256 * d + d + d * d + d) + (classes + 1) * d + depth * block
            + (2 * d * d + 2 * d) + (d * p * p * out + p * p * out))


@pytest.mark.parametrize("size,patch", [(s, 2) for s in SIZES] + [("B", 4), ("B", 8)])
def test_parameter_counts_are_dits(size: str, patch: int) -> None:
    """SiT/DiT at 32x32x4 with 1000 classes: DiT's closed-form count, and at patch 2 DiT's table to 0.1M. DiT keeps
    its fixed positions as a frozen nn.Parameter and counts them (the table's numbers need them: without them S/2
    would be 32.9M, B/2 130.3M); here they are a buffer."""
    with torch.device("meta"):
        model = SiT(4, out_channels=8, image_size=32, patch=patch, size=size, num_classes=1000)
    total = sum(p.numel() for p in model.parameters()) + model.pos_embed.numel()
    depth, hidden, _ = SIZES[size]
    assert total == dit_count(depth, hidden, 4, 8, patch, 1000, 32 // patch)
    if patch == 2:
        assert round(total / 1e6, 1) == DIT_TABLE[size], total


@pytest.mark.parametrize("options", [{}, EVERYTHING], ids=["dit", "every-option"])
def test_fresh_blocks_are_the_identity_and_the_output_zero(options: dict[str, Any]) -> None:
    """adaLN-Zero: every fresh block maps its tokens to themselves exactly and the fresh model outputs exactly 0;
    once the weights move, neither holds."""
    model = tiny(**options)
    inputs = batch(model)
    c = model.cond(inputs["t"], inputs.get("y"), inputs.get("h"))
    tokens = torch.randn(3, model.grid ** 2, 32)
    assert all(torch.equal(block(tokens, c, model.rope), tokens) for block in model.blocks)
    assert torch.count_nonzero(model(**inputs)) == 0
    perturb_(model)
    c = model.cond(inputs["t"], inputs.get("y"), inputs.get("h"))
    assert not any(torch.equal(block(tokens, c, model.rope), tokens) for block in model.blocks)
    assert bool((model(**inputs) != 0).all())


# ------------------------------------------------------------------------- tokens and positions


@pytest.mark.parametrize("channels,patch,side", [(3, 2, 6), (5, 4, 8), (1, 1, 5)])
def test_unpatchify_inverts_the_patch_layout(channels: int, patch: int, side: int) -> None:
    """unpatchify is the exact inverse of the token layout, which is the patch embedding's: the Conv2d equals a
    Linear on ``patchify(x)`` with the kernel laid out alike."""
    x = torch.randn(2, channels, side, side)
    tokens = patchify(x, patch)
    assert torch.equal(unpatchify(tokens, patch, channels, side // patch), x)
    assert torch.equal(patchify(unpatchify(tokens, patch, channels, side // patch), patch), tokens)
    model = perturb_(SiT(channels, image_size=side, patch=patch, depth=1, hidden_size=8, num_heads=2))
    kernel = model.patch_embed.weight.permute(0, 2, 3, 1).flatten(1)  # (hidden, p * p * C) in (row, col, channel)
    embedded = model.patch_embed(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(embedded, tokens @ kernel.T + model.patch_embed.bias)


def test_positions_are_dits_sincos_table() -> None:
    """Token (i, j) of a 3x3 grid at width 8: [sin(j w), cos(j w), sin(i w), cos(i w)], w = (1, 10000^(-1/2));
    a non-persistent fp32 buffer."""
    pos = sincos_2d(8, 3)
    w = torch.tensor([1.0, 0.01])
    for i in range(3):
        for j in range(3):
            want = torch.cat([torch.sin(j * w), torch.cos(j * w), torch.sin(i * w), torch.cos(i * w)])
            torch.testing.assert_close(pos[3 * i + j], want)
    model = tiny()
    assert model.pos_embed.dtype == torch.float32 and "pos_embed" not in model.state_dict()


def test_rope_is_a_complex_rotation_by_row_and_column() -> None:
    """Pair k of a head (dims 2k, 2k + 1 as one complex number) of token (i, j) turns by i w_k for the first
    head_dim / 4 pairs and by j w_(k - head_dim / 4) for the rest, w_k = 10000^(-4k / head_dim); so <R q, R k>
    depends only on the offset between two tokens."""
    head_dim, grid = 8, 3
    cos, sin = (t.double() for t in rope_2d(head_dim, grid))
    q = torch.randn(2, grid * grid, head_dim, dtype=torch.float64)
    rows, cols = torch.arange(grid * grid) // grid, torch.arange(grid * grid) % grid
    w = 10000.0 ** -(torch.arange(2, dtype=torch.float64) / 2)
    angles = torch.cat([rows[:, None] * w, cols[:, None] * w], dim=1)  # (tokens, pairs)
    turned = torch.view_as_complex(q.reshape(2, grid * grid, head_dim // 2, 2)) * torch.polar(
        torch.ones_like(angles), angles)
    torch.testing.assert_close(rotate(q, cos, sin), torch.view_as_real(turned).flatten(-2))
    a, b = torch.randn(2, 1, head_dim, dtype=torch.float64).expand(2, grid * grid, head_dim)
    scores = rotate(a, cos, sin) @ rotate(b, cos, sin).T
    by_offset: dict[tuple[int, int], list[Tensor]] = {}
    for m in range(grid * grid):
        for n in range(grid * grid):
            by_offset.setdefault((int(rows[m] - rows[n]), int(cols[m] - cols[n])), []).append(scores[m, n])
    assert len(by_offset) == 25
    for same in by_offset.values():
        torch.testing.assert_close(torch.stack(same), same[0].expand(len(same)))
    assert len({round(float(s[0]), 6) for s in by_offset.values()}) == 25  # and does depend on it


# ------------------------------------------------------------------------- options


OPTION_CASES = {"rms": {"norm": "rms"}, "swiglu": {"mlp": "swiglu"}, "rope": {"rope": True},
                "qk_norm": {"qk_norm": True}, "flow_map": {"flow_map": True}, "class": {"num_classes": 10},
                "low_res": {"low_res_channels": 1}}


@pytest.mark.parametrize("option", list(OPTION_CASES))
def test_each_option_changes_the_output_and_trains(option: str) -> None:
    """The option on, with the plain model's (perturbed) weights wherever the shapes agree: another output; a
    backward pass reaches every parameter."""
    plain = perturb_(tiny())
    model = perturb_(tiny(**OPTION_CASES[option]), seed=1)
    mine = model.state_dict()
    shared = {k: v for k, v in plain.state_dict().items() if k in mine and mine[k].shape == v.shape}
    model.load_state_dict(shared, strict=False)
    inputs = batch(model)
    out = model(**inputs)
    assert (out - plain(inputs["x"], inputs["t"])).abs().max() > 1e-3
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bf16_autocast_and_bf16_weights() -> None:
    """Every option under bf16 autocast (norms in fp32, attention inputs of one dtype) and with bf16 parameters and
    fp32 buffers (an engine's ``ModelInDtype``): bf16 outputs near the fp32 ones."""
    model = perturb_(tiny(**EVERYTHING), std=0.05)
    inputs = batch(model)
    with torch.no_grad():
        want = model(**inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(**inputs)
        cast = ModelInDtype(model, torch.bfloat16)(**inputs)
    assert autocast.dtype == torch.bfloat16
    for got in (autocast.float(), cast):
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_head_norm_is_the_affine_norm_and_compiles_under_jvp(norm: str) -> None:
    """qk_norm's HeadNorm equals torch's affine LayerNorm / RMSNorm with the same (perturbed) weights, and its JVP
    compiles (fullgraph) to the eager JVP: the affine norm ops fail there, as MeanFlow's compiled step showed."""
    head = perturb_(HeadNorm(norm, 6))
    reference = torch.nn.LayerNorm(6, eps=1e-6) if norm == "layer" else torch.nn.RMSNorm(6, eps=1e-6)
    reference.load_state_dict(head.state_dict())
    x, dx = torch.randn(2, 3, 5, 6), torch.randn(2, 3, 5, 6)
    torch.testing.assert_close(head(x), reference(x))
    jvp = torch.compile(lambda z, dz: torch.func.jvp(head, (z,), (dz,))[1], fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(jvp(x, dx), torch.func.jvp(reference, (x,), (dx,))[1])


# ------------------------------------------------------------------------- attention


@pytest.mark.parametrize("forward_mode", [False, True], ids=["sdpa", "forward-mode"])
def test_attend_is_softmax_attention(forward_mode: bool) -> None:
    """``attend`` (the UNet's and the SiT's) against softmax(q k^T / sqrt(d)) v on odd sizes."""
    q, k, v = torch.randn(3, 2, 3, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(5), dim=-1) @ v
    with forward_mode_attention() if forward_mode else contextlib.nullcontext():
        torch.testing.assert_close(attend(q, k, v), want)


def test_jvp_through_sit_matches_finite_difference_and_reverse_mode() -> None:
    """torch.func.jvp in x through a SiT with every option, under forward_mode_attention, against a float64 central
    difference and against reverse mode through the fused attention: <w, J dx> = <J^T w, dx>."""
    model = perturb_(tiny(**EVERYTHING)).double()
    inputs = batch(model, dtype=torch.float64)
    x = inputs.pop("x")
    dx, w = torch.randn(2, *x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def f(z: Tensor) -> Tensor:
        return model(z, **inputs)

    with forward_mode_attention():
        out, along = torch.func.jvp(f, (x,), (dx,))
    eps = 1e-6
    torch.testing.assert_close(along, (f(x + eps * dx) - f(x - eps * dx)) / (2 * eps), rtol=1e-6, atol=1e-8)
    assert along.abs().max() > 1e-2
    _, pull = torch.func.vjp(f, x)
    torch.testing.assert_close((w * along).sum(), (pull(w)[0] * dx).sum())
    torch.testing.assert_close(out, f(x))


# ------------------------------------------------------------------------- configs and errors


def test_build_model_round_trip() -> None:
    """``build_model(model.config)`` (through JSON) rebuilds the architecture, takes the state dict and gives the
    same output; a size's numbers are resolved into the config."""
    model = perturb_(tiny(**EVERYTHING))
    config = json.loads(json.dumps(model.config))
    assert config == model.config
    rebuilt = build_model(config)
    rebuilt.load_state_dict(model.state_dict())
    inputs = batch(model)
    assert torch.equal(rebuilt(**inputs), model(**inputs))
    with torch.device("meta"):
        big = build_model({"name": "sit", "in_channels": 4, "size": "B", "patch": 4, "depth": 3})
    assert {k: big.config[k] for k in ("depth", "hidden_size", "num_heads", "patch")} == {
        "depth": 3, "hidden_size": 768, "num_heads": 12, "patch": 4}
    assert len(big.blocks) == 3


def test_config_for_data() -> None:
    """Square images: the data's channels and side, patch 2 where it divides the side, else 1; superres conditions
    on as many channels."""
    assert config_for_data("sit", data="digits", kind="image", shape=(1, 8, 8), num_classes=10, class_cond=True) == {
        "name": "sit", "in_channels": 1, "image_size": 8, "patch": 2, "num_classes": 10, "low_res_channels": None}
    odd = config_for_data("sit", data="d", kind="image", shape=(3, 7, 7), num_classes=None, superres=7)
    assert odd["patch"] == 1 and odd["low_res_channels"] == 3
    build_model(odd)
    for kind, shape, superres, message in [
        ("vector", (2,), 0, "the sit model takes image data; 'd' is vector data"),
        ("image", (1, 8, 6), 0, "the sit model takes square images; 'd' has 8x6 images"),
        ("image", (1, 8, 8), 3, "superres factor 3 does not divide the image size 8"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            config_for_data("sit", data="d", kind=kind, shape=shape, num_classes=None, superres=superres)


@pytest.mark.parametrize("options, message", [
    ({"size": "M"}, "sit model option size='M': expected one of S, B, L, XL"),
    ({"patch": 3}, "sit model option patch=3 does not divide the image size 8x8"),
    ({"hidden_size": 36, "num_heads": 5}, "hidden_size=36 cannot be split into num_heads=5 attention heads"),
    ({"hidden_size": 30, "num_heads": 3}, "hidden_size=30: the 2D sin-cos positions need a multiple of 4"),
    ({"hidden_size": 24, "num_heads": 4, "rope": True}, "rope=true needs a head size divisible by 4; "
                                                         "hidden_size=24 / num_heads=4 = 6"),
    ({"norm": "batch"}, "sit model option norm='batch': expected one of layer, rms"),
    ({"mlp": "relu"}, "sit model option mlp='relu': expected one of gelu, swiglu"),
    ({"mlp_ratio": 0.5}, "sit model option mlp_ratio=0.5: expected a number >= 1"),
    ({"depth": 0}, "sit model option depth=0: expected an integer >= 1 or null"),
], ids=["size", "patch", "heads", "width", "rope-head", "norm", "mlp", "mlp_ratio", "depth"])
def test_bad_options_are_one_value_error(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny(**options)


def test_forward_errors() -> None:
    """An image of another size than the model's, low_res missing or unexpected: one ValueError each."""
    model = tiny(low_res_channels=1)
    with pytest.raises(ValueError, match=re.escape("built for 8x8 images (patch 2); got 16x16")):
        model(torch.zeros(1, 1, 16, 16), torch.rand(1), low_res=torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="low_res must be given exactly when"):
        model(torch.zeros(1, 1, 8, 8), torch.rand(1))
    with pytest.raises(ValueError, match="low_res must be given exactly when"):
        tiny()(torch.zeros(1, 1, 8, 8), torch.rand(1), low_res=torch.zeros(1, 1, 4, 4))


# ------------------------------------------------------------------------- a trained run


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """``python -m fastfm.train --model sit --compile`` on 8x8 digits, class-conditional, 3 steps."""
    out = tmp_path_factory.mktemp("sit") / "run"
    return run_training(out, "--data", "digits", "--class-cond", "--compile", "--batch-size", "16", "--eval-n", "8",
                        "--n-samples", "8", model=["--model", "sit", "--model-args", "depth=2", "hidden_size=32",
                                                   "num_heads=2"])


def test_cli_training_run(trained: Run) -> None:
    """No recompile after the first step (the process's graph count is the same at every logged step), finite
    losses and test NLL; model.json holds the SiT's full config."""
    summary = trained.summary
    records = [json.loads(line) for line in (trained.dir / "metrics.jsonl").read_text().splitlines()]
    graphs = [r["compiled_graphs"] for r in records if "compiled_graphs" in r]
    assert len(graphs) == 3 and graphs == [graphs[0]] * 3, graphs
    assert summary["skipped_steps"] == 0 and math.isfinite(summary["last"]["loss"])
    assert math.isfinite(summary["test"]["nll_nats"])
    config = json.loads((trained.dir / "model.json").read_text())["model"]
    assert config == {**TINY, "out_channels": 1, "size": "S", "mlp_ratio": 4.0, "num_classes": 10,
                      "low_res_channels": None, "flow_map": False, "norm": "layer", "mlp": "gelu", "rope": False,
                      "qk_norm": False}


def test_trained_run_guidance_sde_and_exact_likelihood(trained: Run) -> None:
    """On the trained weights: a guided Euler step is x0 + w v(x0, 0, y) + (1 - w) v(x0, 0, null); the SDE sampler
    runs (its score term moves the samples off the ODE's); the exact divergence of the likelihood (64 JVPs through
    the forward-mode attention) is the trace of the reverse-mode Jacobian."""
    run = load_run(trained.dir)
    assert isinstance(run.model, SiT)
    y = torch.tensor([3, 7, 0])
    guided = EagerSampler.from_run(run, InferenceSettings(solver="euler", steps=1, guidance=2.0))
    got = guided.sample(3, seed=5, cond={"y": y}, progress=False).x
    x0 = guided.plan("sample").draw(run.path, 3, seeding.generator(5, seeding.SAMPLE), "cpu")["x0"]
    t0 = torch.zeros(3)
    with torch.no_grad():
        torch.testing.assert_close(got, x0 + 2.0 * run.model(x0, t0, y=y) - run.model(x0, t0))
    ode = EagerSampler.from_run(run, InferenceSettings(solver="euler", steps=3)).sample(3, seed=5, cond={"y": y},
                                                                                         progress=False).x
    sde = EagerSampler.from_run(run, InferenceSettings(steps=3, diffusion="1")).sample(3, seed=5, cond={"y": y},
                                                                                        progress=False).x
    assert sde.shape == (3, 1, 8, 8) and bool(torch.isfinite(sde).all()) and (sde - ode).abs().max() > 1e-2
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    exact = EagerSampler.from_run(run, InferenceSettings(solver="euler", steps=1, divergence="exact"))
    assert bool(torch.isfinite(exact.log_likelihood(x, cond={"y": y[:2]}, progress=False).log_prob).all())
    t = torch.full((2,), 0.7)
    with torch.no_grad():
        _, div = divergence_exact(lambda z, s: run.model(z, s, y=y[:2]), x, t)
    for i in range(2):
        jac = torch.autograd.functional.jacobian(lambda z: run.model(z[None], t[i:i + 1], y=y[i:i + 1]).flatten(),
                                                 x[i])
        torch.testing.assert_close(div[i], jac.reshape(64, 64).trace(), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------- engines


@pytest.fixture(scope="module")
def sit_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sit_runs")
    return {name: make_run(root / name, *args) for name, args in SIT_RUNS.items()}


@pytest.mark.parametrize("run, spec", [
    ("sit_options_sr", dict(task="likelihood", solver="euler", steps=1, batch=4, backend="onnx")),
    ("sit_cond", dict(task="sample", solver="euler", steps=1, batch=4, backend="aoti", guidance=2.0)),
], ids=["onnx-options-superres-likelihood", "aoti-guided-sample"])
def test_engine_parity(sit_runs: dict[str, Path], tmp_path: Path, run: str, spec: dict[str, Any]) -> None:
    """Engines of a SiT against the eager solve on 5 rows (not a multiple of the batch): an ONNX likelihood
    (Hutchinson JVPs through RoPE, qk-norm, RMSNorm, SwiGLU and the low-res input) and a guided AOTInductor
    sampler."""
    export_engine(sit_runs[run], EngineRequest.of(**spec), tmp_path / "engine", device="cpu")
    assert_parity(sit_runs[run], load(tmp_path / "engine"), rows=5)
