"""facecompat.models: registry, insightface arcface_torch layout, options and weight loading.

The expectations below (stage depths, key names, shapes, parameter counts) are written from
insightface's recognition/arcface_torch/backbones/{iresnet,mobilefacenet}.py, independently of
our implementation: the counts come both as numbers and from a formula over their layer list.
Full-width networks are built on the meta device (no memory, no init cost) except for one r50
forward; everything that runs uses small width variants.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from facecompat.models import (
    WeightsError,
    count_parameters,
    get_model,
    list_models,
    load_backbone_weights,
    parse_model_name,
)
from tests.helpers.models import calibrated_model, single_thread

IRESNET_DEPTHS = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}
# Parameter counts (trainable + the frozen features.weight) at embedding size 512.
PARAM_COUNTS = {
    "r18": 24_025_600,
    "r34": 34_139_328,
    "r50": 43_590_848,
    "r100": 65_156_160,
    "r200": 118_833_920,
    "mbf": 2_059_520,
}
STATE_KEYS = {"r18": 187, "r34": 331, "r50": 475, "r100": 925, "r200": 1807, "mbf": 333}
# A sample of insightface state_dict names and shapes; None = must not exist.
SAMPLE_KEYS: dict[str, dict[str, list[int] | None]] = {
    "r18": {
        "layer1.0.downsample.0.weight": [64, 64, 1, 1],
        "layer4.1.bn3.weight": [512],
        "layer4.2.bn3.weight": None,
        "layer1.1.downsample.0.weight": None,
    },
    "r34": {"layer3.5.conv2.weight": [256, 256, 3, 3], "layer3.6.conv2.weight": None},
    "r50": {
        "conv1.weight": [64, 3, 3, 3],
        "bn1.running_var": [64],
        "prelu.weight": [64],
        "layer1.0.bn1.weight": [64],
        "layer1.0.conv1.weight": [64, 64, 3, 3],
        "layer2.0.conv1.weight": [128, 64, 3, 3],
        "layer2.0.conv2.weight": [128, 128, 3, 3],
        "layer2.0.downsample.0.weight": [128, 64, 1, 1],
        "layer2.0.downsample.1.running_mean": [128],
        "layer3.13.bn3.running_var": [256],
        "layer3.13.prelu.weight": [256],
        "layer3.14.bn3.running_var": None,
        "layer4.2.conv2.weight": [512, 512, 3, 3],
        "layer4.0.downsample.1.num_batches_tracked": [],
        "bn2.weight": [512],
        "fc.weight": [512, 25088],
        "fc.bias": [512],
        "features.weight": [512],
        "features.bias": [512],
        "features.running_mean": [512],
        "dropout.p": None,
    },
    "r100": {"layer2.12.prelu.weight": [128], "layer3.29.conv1.weight": [256, 256, 3, 3],
             "layer3.30.conv1.weight": None, "fc.weight": [512, 25088]},
    "r200": {"layer1.5.bn2.weight": [64], "layer2.25.conv2.weight": [128, 128, 3, 3],
             "layer3.59.bn3.running_var": [256], "layer4.5.prelu.weight": [512],
             "layer4.6.prelu.weight": None},
    "mbf": {
        "layers.0.layers.0.weight": [128, 3, 3, 3],
        "layers.0.layers.2.weight": [128],
        "layers.1.layers.0.weight": [128, 2, 3, 3],  # groups=64 on 128 channels
        "layers.2.layers.0.layers.0.weight": [128, 128, 1, 1],
        "layers.2.layers.1.layers.0.weight": [128, 1, 3, 3],
        "layers.2.layers.2.layers.1.running_var": [128],
        "layers.3.layers.3.layers.1.layers.0.weight": [128, 1, 3, 3],
        "layers.3.layers.4.layers.1.layers.0.weight": None,
        "layers.4.layers.2.layers.0.weight": [256, 256, 1, 1],
        "layers.5.layers.5.layers.2.layers.0.weight": [256, 256, 1, 1],
        "layers.6.layers.0.layers.0.weight": [512, 256, 1, 1],
        "layers.6.layers.2.layers.0.weight": [256, 512, 1, 1],
        "layers.7.layers.1.layers.2.layers.1.running_var": [256],
        "layers.8.layers.0.weight": None,
        "conv_sep.layers.0.weight": [512, 256, 1, 1],
        "conv_sep.layers.2.weight": [512],
        "features.layers.0.layers.0.weight": [512, 1, 7, 7],
        "features.layers.0.layers.1.running_mean": [512],
        "features.layers.2.weight": [512, 512],
        "features.layers.2.bias": None,
        "features.layers.3.weight": [512],
        "features.layers.3.running_var": [512],
    },
}


_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


# --- independent parameter counts, from insightface's layer lists ---------------------------------


def _bn(c: int) -> int:
    return 2 * c


def _iresnet_params(depths: tuple[int, ...], emb: int) -> int:
    total = 3 * 64 * 9 + _bn(64) + 64  # conv1, bn1, prelu
    in_ch = 64
    for depth, out_ch in zip(depths, (64, 128, 256, 512)):
        for j in range(depth):
            c_in = in_ch if j == 0 else out_ch
            total += _bn(c_in) + c_in * out_ch * 9 + _bn(out_ch) + out_ch + out_ch * out_ch * 9 + _bn(out_ch)
            if j == 0:  # every stage starts with stride 2: conv1x1 + BN shortcut
                total += c_in * out_ch + _bn(out_ch)
        in_ch = out_ch
    return total + _bn(512) + (512 * 49 * emb + emb) + _bn(emb)  # bn2, fc, features


def _conv_block(i: int, o: int, k: int = 1, groups: int = 1) -> int:
    return i // groups * o * k * k + _bn(o) + o  # conv + BN + PReLU


def _linear_block(i: int, o: int, k: int = 1, groups: int = 1) -> int:
    return i // groups * o * k * k + _bn(o)


def _depthwise(i: int, o: int, mid: int) -> int:
    return _conv_block(i, mid) + _conv_block(mid, mid, 3, groups=mid) + _linear_block(mid, o)


def _mbf_params(emb: int) -> int:
    return (_conv_block(3, 128, 3) + _conv_block(128, 128, 3, groups=64)
            + _depthwise(128, 128, 128) + 4 * _depthwise(128, 128, 128)
            + _depthwise(128, 256, 256) + 6 * _depthwise(256, 256, 256)
            + _depthwise(256, 256, 512) + 2 * _depthwise(256, 256, 256)
            + _conv_block(256, 512) + _linear_block(512, 512, 7, groups=512) + 512 * emb + _bn(emb))


def _expected_params(name: str, emb: int = 512) -> int:
    return _mbf_params(emb) if name == "mbf" else _iresnet_params(IRESNET_DEPTHS[name], emb)


# --- helpers ------------------------------------------------------------------------------------


def _meta_model(name: str, **kw) -> nn.Module:
    with torch.device("meta"):
        return get_model(name, **kw)


_calibrated = calibrated_model


def _images(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.rand((batch, 3, 112, 112), generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- registry -----------------------------------------------------------------------------------


def test_registry_names():
    assert set(list_models()) == {"r18", "r34", "r50", "r100", "r200", "mbf"}


@pytest.mark.parametrize("name", list_models())
def test_forward_shape_dtype_and_eval_determinism(name):
    torch.manual_seed(0)
    model = get_model(f"{name}-w0.125", embedding_size=96).eval()
    assert model.embedding_size == 96
    x = _images(2)
    with torch.no_grad():
        emb = model(x)
        again = model(x)
    assert emb.shape == (2, 96) and emb.dtype == torch.float32
    assert torch.isfinite(emb).all()
    assert torch.equal(emb, again)


@pytest.mark.parametrize("name", list_models())
def test_insightface_layout(name):
    model = _meta_model(name)
    state = model.state_dict()
    assert count_parameters(model) == PARAM_COUNTS[name] == _expected_params(name)
    assert len(state) == STATE_KEYS[name]
    for key, shape in SAMPLE_KEYS[name].items():
        if shape is None:
            assert key not in state, key
        else:
            assert list(state[key].shape) == shape, key
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(m.eps == 1e-5 and m.momentum == 0.1 and m.affine for m in norms)
    assert count_parameters(_meta_model(name, embedding_size=128)) == _expected_params(name, 128)


def test_parameter_counts_match_published_sizes():
    # insightface's model zoo: r50 ~43.6M, r100 ~65.2M parameters
    assert round(PARAM_COUNTS["r50"] / 1e6, 1) == 43.6
    assert round(PARAM_COUNTS["r100"] / 1e6, 1) == 65.2


@pytest.mark.parametrize("name", [n for n in IRESNET_DEPTHS])
def test_iresnet_features_weight_is_frozen_at_one(name):
    model = _meta_model(name) if name != "r18" else get_model("r18-w0.125")
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["features.weight"]
    if name == "r18":
        assert torch.equal(model.features.weight, torch.ones(512))


def test_mbf_all_parameters_trainable():
    assert all(p.requires_grad for p in get_model("mbf-w0.125").parameters())


def test_insightface_initialisation():
    torch.manual_seed(0)
    resnet = get_model("r18-w0.5")
    conv = resnet.layer2[1].conv1.weight  # 64 x 64 x 3 x 3
    assert abs(conv.mean().item()) < 0.01 and conv.std().item() == pytest.approx(0.1, rel=0.05)
    assert torch.equal(resnet.layer2[1].bn1.weight, torch.ones(64))
    assert torch.equal(resnet.layer2[1].prelu.weight, torch.full((64,), 0.25))
    mbf = get_model("mbf-w0.5")
    conv = mbf.layers[4].layers[0].layers[0].weight  # 1x1, 64 -> 128: fan_out 128
    assert conv.std().item() == pytest.approx((2 / 128) ** 0.5, rel=0.1)


def test_zero_init_residual_zeroes_bn2():
    model = get_model("r18-w0.125", zero_init_residual=True)
    blocks = [b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage]
    assert all(torch.equal(b.bn2.weight, torch.zeros_like(b.bn2.weight)) for b in blocks)
    assert not torch.equal(blocks[0].bn3.weight, torch.zeros_like(blocks[0].bn3.weight))


def test_r50_full_width_forward():
    torch.manual_seed(0)
    model = get_model("r50").train()  # batch statistics: a sane scale without calibration
    with torch.no_grad():
        emb = model(_images(2))
    assert emb.shape == (2, 512) and torch.isfinite(emb).all()


# --- names and options --------------------------------------------------------------------------


def test_width_variant_names():
    assert parse_model_name("r50") == ("r50", 1.0)
    assert parse_model_name("r18-w0.25") == ("r18", 0.25)
    assert parse_model_name("mbf-w.5") == ("mbf", 0.5)
    state = get_model("r18-w0.25").state_dict()
    assert list(state["conv1.weight"].shape) == [16, 3, 3, 3]
    assert list(state["layer4.0.conv2.weight"].shape) == [128, 128, 3, 3]
    assert list(state["fc.weight"].shape) == [512, 128 * 49]  # the embedding size stays
    tiny = get_model("r18-w0.01").state_dict()
    assert list(tiny["conv1.weight"].shape) == [8, 3, 3, 3]  # at least 8 channels
    mbf = get_model("mbf-w0.25").state_dict()
    assert list(mbf["layers.1.layers.0.weight"].shape) == [32, 2, 3, 3]  # still 2 channels per group
    assert list(mbf["features.layers.2.weight"].shape) == [512, 128]


@pytest.mark.parametrize("bad", ["r42", "resnet50", "r18-w", "r18-w0", "r18-wx", "R18", ""])
def test_unknown_or_bad_name_lists_valid_names(bad):
    with pytest.raises(ValueError) as info:
        get_model(bad)
    if bad != "r18-w0":
        assert "r18, r34, r50, r100, r200, mbf" in str(info.value)


def test_unknown_option_and_bad_values():
    with pytest.raises(ValueError, match="zero_init_residual"):
        get_model("mbf-w0.125", zero_init_residual=True)
    with pytest.raises(ValueError, match="no option 'width'"):
        get_model("r18", width=0.5)
    with pytest.raises(ValueError, match="dropout"):
        get_model("r18-w0.125", dropout=1.0)
    with pytest.raises(ValueError, match="embedding_size"):
        get_model("r18-w0.125", embedding_size=0)


@pytest.mark.parametrize("name", ["r18-w0.125", "mbf-w0.125"])
def test_dropout_only_in_training(name):
    model = get_model(name, dropout=0.5)
    x = _images(4)
    with torch.no_grad():
        torch.manual_seed(1)
        a = model.train()(x)
        torch.manual_seed(2)
        b = model(x)
        assert not torch.allclose(a, b)
        model.eval()
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("name", ["r18-w0.25", "mbf-w0.25"])
def test_channels_last_same_output(name):
    reference = _calibrated(name)
    model = get_model(name, channels_last=True)
    model.load_state_dict(reference.state_dict())
    model.eval()
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), reference(x),
                                   rtol=1e-4, atol=1e-4)


# The module whose input is the trunk output: after it, insightface runs float32 outside autocast.
HEAD_ENTRY = {"r18-w0.125": "fc", "mbf-w0.125": "conv_sep"}


@pytest.mark.parametrize("name", list(HEAD_ENTRY))
def test_embedding_head_in_fp32_under_autocast(name):
    """bf16 trunk, float32 head (iresnet fc + features, mbf conv_sep + GDC), as arcface_torch does."""
    model = _calibrated(name, embedding_size=32)
    head = getattr(model, HEAD_ENTRY[name])
    inputs = []
    head.register_forward_pre_hook(lambda _module, args: inputs.append(args[0].detach()))
    upstream = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = model(_images(2))
    (emb * upstream).sum().backward()
    trunk = inputs[0].float()
    assert torch.equal(trunk, trunk.bfloat16().float())  # the trunk itself did run in bf16
    head_params = {f"{HEAD_ENTRY[name]}.{k}": p for k, p in head.named_parameters()}
    head_params.update({f"features.{k}": p for k, p in model.features.named_parameters() if p.requires_grad})
    grads = {k: p.grad.clone() for k, p in head_params.items()}
    model.zero_grad()

    reference = model.features(head(trunk))  # float32, no autocast
    (reference * upstream).sum().backward()
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb, reference, rtol=1e-5, atol=1e-5)
    for key, p in head_params.items():
        assert grads[key].dtype == torch.float32, key
        torch.testing.assert_close(grads[key], p.grad, rtol=1e-5, atol=1e-5, msg=key)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        all_bf16 = model.features(head(trunk))  # what autocast over the whole forward gave
    assert all_bf16.dtype == torch.bfloat16
    assert not torch.allclose(emb, all_bf16.float(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["r18-w0.125", "mbf-w0.125"])
def test_grad_checkpoint_same_loss_grads_and_running_stats(name):
    torch.manual_seed(0)
    plain = get_model(name, embedding_size=32)
    ckpt = get_model(name, embedding_size=32, grad_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    block = ckpt.layer1[0] if hasattr(ckpt, "layer1") else ckpt.layers[3].layers[0]
    calls = []
    block.register_forward_pre_hook(lambda *_: calls.append(1))
    x = _images(4)
    losses = []
    for model in (plain, ckpt):
        model.train()
        loss = model(x).square().mean()
        loss.backward()
        losses.append(loss.detach())
    assert len(calls) == 2  # forward + recompute in backward: checkpointing is active
    # (a pre-hook: the recompute stops early, once it has what backward needs)
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for (name_p, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name_p
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name_p)
    # the recompute must not apply the BatchNorm momentum update a second time
    for (key, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)


def test_grad_checkpoint_inactive_in_eval_and_no_grad():
    model = get_model("r18-w0.125", grad_checkpoint=True)
    calls = []
    model.layer1[0].register_forward_pre_hook(lambda *_: calls.append(1))
    model.eval()
    model(_images(1)).sum().backward()
    assert len(calls) == 1


# --- weights ------------------------------------------------------------------------------------


def test_load_round_trip_with_prefixes(tmp_path):
    source = _calibrated("r18-w0.125")
    x = _images(2)
    with torch.no_grad():
        expected = source(x)
    state = source.state_dict()
    variants = {
        "module.pt": {f"module.{k}": v for k, v in state.items()},  # DDP-saved, as some zoo files
        "compiled.pt": {"backbone": {f"module._orig_mod.{k}": v for k, v in state.items()}, "epoch": 3},
    }
    for file_name, obj in variants.items():
        torch.save(obj, tmp_path / file_name)
        model = get_model("r18-w0.125")
        load_backbone_weights(model, tmp_path / file_name)
        with torch.no_grad():
            assert torch.equal(model.eval()(x), expected), file_name
    model = get_model("r18-w0.125")
    load_backbone_weights(model, state)  # a mapping works too
    with torch.no_grad():
        assert torch.equal(model.eval()(x), expected)


def test_missing_num_batches_tracked_is_accepted():
    state = {k: v for k, v in get_model("mbf-w0.125").state_dict().items()
             if not k.endswith("num_batches_tracked")}
    load_backbone_weights(get_model("mbf-w0.125"), state)


def test_strict_mismatch_names_file_and_keys(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(get_model("r18-w0.125").state_dict(), path)
    with pytest.raises(WeightsError) as info:  # r18 weights into r34: missing layer1.2.*
        load_backbone_weights(get_model("r34-w0.125"), path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "missing keys layer1.2." in message

    state = get_model("r18-w0.125").state_dict()
    state.pop("layer3.1.prelu.weight")
    state["head.weight"] = torch.zeros(3)
    with pytest.raises(WeightsError, match=r"missing keys layer3\.1\.prelu\.weight.*unexpected keys head\."):
        load_backbone_weights(get_model("r18-w0.125"), state)
    load_backbone_weights(get_model("r18-w0.125"), state, strict=False)

    with pytest.raises(WeightsError, match=r"conv1\.weight \[8, 3, 3, 3\] in file vs \[16, 3, 3, 3\] in mod"):
        load_backbone_weights(get_model("r18-w0.25"), path)
    with pytest.raises(WeightsError, match=r"fc\.weight \[512, 3136\] in file vs \[128, 3136\]"):
        load_backbone_weights(get_model("r18-w0.125", embedding_size=128), path, strict=False)


def test_unreadable_files_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a torch file")
    truncated = tmp_path / "truncated.pt"
    torch.save(get_model("r18-w0.125").state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    not_state = tmp_path / "not_state.pt"
    torch.save({"lr": 0.1, "epoch": 3}, not_state)
    code = tmp_path / "module.pt"
    torch.save(get_model("r18-w0.125"), code)  # a whole pickled module: refused by weights_only
    reasons = {
        corrupt: "PyTorch weights file",
        truncated: "not a readable PyTorch weights file",
        not_state: "entry 'lr' is a float, not a tensor",
        code: "save the model's state_dict()",
        tmp_path / "absent.pt": "no such file",
    }
    for path, reason in reasons.items():
        with pytest.raises(WeightsError) as info:
            load_backbone_weights(get_model("r18-w0.125"), path)
        message = str(info.value)
        assert message.startswith(f"{path}: ") and reason in message and "\n" not in message, message
