"""The science of the flat ResNets: full policy, per-image policies, skipped blocks, FLOPs."""

import pytest
import torch
import torchvision

import utils
from models.base import BasicBlock, Bottleneck
from models.resnet import FlatResNet32, FlatResNet224, Policy32, Policy224


def randomize_bn(model):
    """Give BatchNorm non-trivial statistics so eval-mode comparisons mean something."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def r20():
    return randomize_bn(FlatResNet32(BasicBlock, [3, 3, 3], num_classes=10))


@pytest.fixture(scope="module")
def r18():
    return randomize_bn(FlatResNet224(BasicBlock, [2, 2, 2, 2], num_classes=1000))


def test_model_table_has_the_original_names_and_block_counts():
    expected = {
        "R32_C10": 15,
        "R110_C10": 54,
        "R32_C100": 15,
        "R110_C100": 54,
        "R101_ImgNet": 33,
        "R20_FMNIST": 9,
        "R32_FMNIST": 15,
        "R110_FMNIST": 54,
        "R20_C10": 9,
    }
    for name, k in expected.items():
        assert utils.model_spec(name).num_blocks == k
    assert utils.model_spec("R110_C100").num_classes == 100
    assert utils.model_spec("R101_ImgNet").block is Bottleneck


def test_unknown_model_lists_valid_names():
    with pytest.raises(utils.UserError) as e:
        utils.model_spec("R111_C10")
    assert "R111_C10" in str(e.value) and "R110_C10" in str(e.value) and "R101_ImgNet" in str(e.value)


@pytest.mark.parametrize("name", ["r20", "r18"])
def test_full_policy_equals_forward_full(name, request):
    net = request.getfixturevalue(name)
    size = 32 if name == "r20" else 224
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        full = net.forward_full(x)
        ones = torch.ones(3, net.num_blocks)
        assert torch.allclose(net(x, ones), full, atol=1e-5)
        assert torch.allclose(net.forward_single(x, ones[0]), full, atol=1e-5)
        assert torch.allclose(net.forward_masked(x, ones), full, atol=1e-5)


def test_same_policy_for_every_image_equals_forward_single(r20):
    x = torch.randn(5, 3, 32, 32)
    policy = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0, 1.0])
    with torch.no_grad():
        batched = r20(x, policy.expand(5, -1))
        single = r20.forward_single(x, policy)
    assert torch.allclose(batched, single, atol=1e-5)


def test_per_image_policies_equal_one_image_at_a_time_and_the_masked_form(r20):
    x = torch.randn(16, 3, 32, 32)
    policy = (torch.rand(16, 9) < 0.5).float()
    policy[0] = 0  # every block dropped
    policy[1] = 1  # every block kept
    with torch.no_grad():
        sparse = r20(x, policy)
        masked = r20.forward_masked(x, policy)
        one_by_one = torch.cat([r20.forward_single(x[i : i + 1], policy[i]) for i in range(16)])
    assert torch.allclose(sparse, masked, atol=1e-5)
    assert torch.allclose(sparse, one_by_one, atol=1e-5)
    # Different policies really give different outputs.
    assert not torch.allclose(sparse[0], r20.forward_full(x[:1])[0], atol=1e-3)


@pytest.mark.parametrize("t", [0, 3, 8])  # 3: first block of segment 1, which still downsamples
def test_dropped_block_is_skipped(t):
    net = randomize_bn(FlatResNet32(BasicBlock, [3, 3, 3], num_classes=10))
    x = torch.randn(4, 3, 32, 32)
    policy = torch.ones(4, 9)
    policy[:2, t] = 0  # the first two images drop block t
    segment, k = divmod(t, 3)
    with torch.no_grad():
        before = net(x, policy)
        for p in net.blocks[segment][k].parameters():
            p.add_(torch.randn_like(p))
        after = net(x, policy)
    assert torch.equal(before[:2], after[:2])  # the block's weights do not reach these images
    assert not torch.allclose(before[2:], after[2:])  # but they do reach the others


def test_dropped_first_block_still_downsamples(r18):
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = r18(x, torch.zeros(2, 8))
        # By hand: stem, then only the shortcuts of each segment, then the head.
        h = r18.seed(x)
        for s in range(4):
            h = r18.ds[s](h) if len(r18.ds[s]) else h
        assert torch.allclose(out, r18.head(h), atol=1e-5)


def grads(net, fn, x, policy) -> list[torch.Tensor]:
    """Gradients of every parameter (zeros where none arrive) of a squared-output loss."""
    net.zero_grad()
    fn(x, policy).square().sum().backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]


def test_sparse_forward_gradients_match_masked_form():
    net = FlatResNet32(BasicBlock, [2, 2, 2], num_classes=10).eval()  # eval: BN is per-image
    x = torch.randn(6, 3, 32, 32)
    policy = (torch.rand(6, 6) < 0.5).float()
    for a, b in zip(grads(net, net.forward, x, policy), grads(net, net.forward_masked, x, policy), strict=True):
        assert torch.allclose(a, b, atol=1e-4)


def few_policies(batch: int, distinct: int, k: int) -> torch.Tensor:
    choices = (torch.rand(distinct, k) < 0.5).float()
    return choices[torch.arange(batch) % distinct]


@pytest.mark.parametrize("distinct", [1, 3, 64])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_both_sparse_forms_equal_the_masked_form_and_are_chosen_by_the_policies(r20, distinct, mode, monkeypatch):
    x = torch.randn(64, 3, 32, 32)
    x0 = x.clone()
    policy = few_policies(64, distinct, 9)
    calls = []
    for form in ("_forward_rows", "_forward_grouped"):
        real = getattr(type(r20), form)
        monkeypatch.setattr(r20, form, lambda *a, real=real, form=form: calls.append(form) or real(r20, *a))
    with getattr(torch, mode)():
        sparse = r20(x, policy)
        rows = r20._forward_rows(x, policy.bool())
        masked = r20.forward_masked(x, policy)
    assert calls[0] == ("_forward_grouped" if distinct <= 64 // r20.MIN_GROUP else "_forward_rows")
    assert torch.allclose(sparse, masked, atol=1e-5) and torch.allclose(rows, masked, atol=1e-5)
    assert torch.equal(x, x0)  # the in-place writes never reach the input


def test_grouped_form_gradients_match_masked_form():
    net = FlatResNet32(BasicBlock, [2, 2, 2], num_classes=10).eval()
    x = torch.randn(64, 3, 32, 32)
    policy = few_policies(64, 2, 6)
    for a, b in zip(grads(net, net.forward, x, policy), grads(net, net.forward_masked, x, policy), strict=True):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-4)


def batch_sizes_seen_by(module, fn) -> list[int]:
    """Batch sizes that reach ``module`` while ``fn`` runs."""
    seen = []
    hook = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    try:
        fn()
    finally:
        hook.remove()
    return seen


def test_training_mode_is_the_original_masked_form_by_default():
    """In training a kept block runs on the whole batch (BatchNorm over all 64 images), as in the original."""
    net = FlatResNet32(BasicBlock, [1, 1, 1], num_classes=10).train()
    x = torch.randn(64, 3, 32, 32)
    policy = torch.ones(64, 3)
    policy[:, 1] = torch.arange(64) % 2  # block 1 used by half the images
    assert batch_sizes_seen_by(net.blocks[1][0].bn1, lambda: net(x, policy)) == [64]
    reference = FlatResNet32(BasicBlock, [1, 1, 1], num_classes=10).train()
    reference.load_state_dict(net.state_dict())
    out, expected = net(x, policy), reference.forward_masked(x, policy)
    assert torch.equal(out, expected)
    assert torch.equal(net.blocks[1][0].bn1.running_mean, reference.blocks[1][0].bn1.running_mean)


def test_sparse_training_gathers_rows_and_normalises_over_the_images_that_use_a_block():
    net = FlatResNet32(BasicBlock, [1, 1, 1], num_classes=10).train()
    x = torch.randn(64, 3, 32, 32)
    policy = few_policies(64, 1, 3)
    policy[:, 1] = torch.arange(64) % 2  # block 1 used by half the images
    net(x, policy, masked=False).sum().backward()  # rows path: gradients reach every kept block
    assert all(p.grad is not None for p in net.blocks[1][0].parameters())
    # BatchNorm statistics of block 1 come from its 32 images only.
    assert batch_sizes_seen_by(net.blocks[1][0].bn1, lambda: net(x, policy, masked=False)) == [32]


@pytest.mark.parametrize("masked", [None, True, False])
def test_a_block_no_image_keeps_is_skipped_in_training(masked):
    """No computation, no gradient and no BatchNorm update for a block the whole batch drops."""
    net = FlatResNet32(BasicBlock, [2, 2, 2], num_classes=10).train()
    x = torch.randn(8, 3, 32, 32)
    policy = (torch.rand(8, 6) < 0.5).float()
    policy[0] = 1
    policy[:, 2] = 0  # block 2 (segment 1, block 0: its shortcut still downsamples) dropped by every image
    bn = net.blocks[1][0].bn1
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    assert batch_sizes_seen_by(bn, lambda: net(x, policy, masked=masked).sum().backward()) == []
    assert all(torch.equal(v, bn.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in net.blocks[1][0].parameters())
    assert all(p.grad is not None for p in net.blocks[1][1].parameters())


def test_the_masked_form_keeps_bfloat16_under_autocast():
    """Under --amp the mask takes the activations' dtype: every block sees bfloat16, as in the sparse form."""
    net = FlatResNet32(BasicBlock, [2, 2, 2], num_classes=10).train()
    x = torch.randn(8, 3, 32, 32)
    policy = (torch.rand(8, 6) < 0.5).float()
    policy[:, 0], policy[0, 1:] = 1, 0  # one block kept by all, the others by some
    dtypes = []
    hooks = [b.register_forward_pre_hook(lambda m, a: dtypes.append(a[0].dtype)) for s in net.blocks for b in s]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x, policy)
    for h in hooks:
        h.remove()
    assert dtypes == [torch.bfloat16] * 6


def test_saturated_keep_probabilities_still_learn_under_bfloat16_autocast():
    """Under autocast the sigmoid stays in float32, so a logit of 8 still gets a gradient."""
    agent = Policy32([1, 1, 1], num_blocks=9)
    with torch.no_grad():
        agent.logit.bias.fill_(8.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs, _ = agent(torch.randn(4, 3, 32, 32))
    assert probs.dtype == torch.float32 and (probs < 1).all()
    torch.log(probs).sum().backward()
    assert (agent.logit.bias.grad != 0).all()


def original_layout(state, imagenet):
    """Rename a flat state dict into the released files' layout: module.layer<N>.<k>.*"""
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue  # PyTorch 0.3 had none
        if key.startswith("blocks."):
            _, s, rest = key.split(".", 2)
            key = f"layer{int(s) + 1}.{rest}"
        elif key.startswith("ds."):
            _, s, rest = key.split(".", 2)
            key = f"layer{int(s) + 1}.0.downsample.{rest}"
        out["module." + key] = value
    assert imagenet == any("downsample" in k for k in out)
    return out


@pytest.mark.parametrize("imagenet", [False, True])
def test_strict_loading_of_the_original_layout(imagenet):
    make = (
        (lambda: FlatResNet224(Bottleneck, [1, 1, 1, 1], 1000))
        if imagenet
        else (lambda: FlatResNet32(BasicBlock, [2, 2, 2], 10))
    )
    source, target = randomize_bn(make()), make().eval()
    ckpt = {"state_dict": original_layout(source.state_dict(), imagenet), "epoch": 3}
    utils.load_weights_to_flatresnet(ckpt, target)
    x = torch.randn(1, 3, 224 if imagenet else 32, 224 if imagenet else 32)
    with torch.no_grad():
        assert torch.equal(source.forward_full(x), target.forward_full(x))


def test_loading_weights_of_another_depth_is_a_clear_error():
    src = FlatResNet32(BasicBlock, [2, 2, 2], 10)
    with pytest.raises(utils.UserError, match=r"blocks \[2, 2, 2\].*blocks \[3, 3, 3\]"):
        utils.load_weights_to_flatresnet(src, FlatResNet32(BasicBlock, [3, 3, 3], 10))
    with pytest.raises(utils.UserError, match="100 classes"):
        utils.load_weights_to_flatresnet(
            FlatResNet32(BasicBlock, [3, 3, 3], 100), FlatResNet32(BasicBlock, [3, 3, 3], 10)
        )


def test_policy_parameter_names_and_legacy_keys():
    agent = Policy32([1, 1, 1], num_blocks=15)
    keys = set(agent.state_dict())
    assert {"features.conv1.weight", "features.blocks.2.0.bn2.running_var", "logit.weight", "vnet.bias"} <= keys
    assert not any(k.startswith("features.fc") for k in keys)
    legacy = dict(agent.state_dict())
    legacy["features.fc.weight"] = torch.zeros(10, 64)
    legacy["features.fc.bias"] = torch.zeros(10)
    Policy32([1, 1, 1], num_blocks=15).load_state_dict(legacy)  # strict, the legacy keys dropped
    probs, value = agent(torch.randn(2, 3, 32, 32))
    assert probs.shape == (2, 15) and value.shape == (2, 1)
    assert ((probs > 0) & (probs < 1)).all()
    assert "features.ds.0.0.weight" not in Policy224(num_blocks=33).state_dict()  # BasicBlock, no ds in stage 1
    assert "features.ds.1.0.weight" in Policy224(num_blocks=33).state_dict()


def test_resnet_parameter_names():
    keys = set(utils.build_model("R101_ImgNet")[0].state_dict())
    assert {
        "conv1.weight",
        "bn1.running_mean",
        "blocks.2.22.conv3.weight",
        "blocks.3.2.bn3.bias",
        "ds.0.0.weight",
        "ds.3.1.running_var",
        "fc.weight",
        "fc.bias",
    } <= keys
    keys = set(utils.build_model("R110_C10")[0].state_dict())
    assert "blocks.2.17.conv2.weight" in keys and not any(k.startswith("ds.") for k in keys)


@pytest.mark.parametrize(
    "model, expected",
    [("R110_C10", 5.058e8), ("R32_C10", 1.377e8), ("R101_ImgNet", 1.560e10)],
)
def test_flops_of_full_networks_match_the_spec(model, expected):
    rnet, _ = utils.build_model(model)
    base, per_block = utils.block_flops(rnet, utils.model_spec(model).input_size)
    assert float(f"{base + per_block.sum().item():.3e}") == expected


def test_policy_flops_match_the_spec():
    _, agent = utils.build_model("R110_C10")
    assert float(f"{utils.policy_flops(agent, (3, 32, 32)):.3e}") == 2.448e7


def test_summed_block_flops_equal_a_measured_policy():
    rnet, _ = utils.build_model("R32_C10")
    base, per_block = utils.block_flops(rnet, (3, 32, 32))
    policy = (torch.rand(15) < 0.5).float()
    policy[5] = 0  # a dropped first block of a segment
    x = torch.zeros(1, 3, 32, 32)
    measured = utils.count_flops(lambda: rnet.forward_single(x, policy))
    assert measured == base + int((policy.double() @ per_block).item())


@pytest.mark.parametrize(
    "arch, block, layers", [("resnet18", BasicBlock, [2, 2, 2, 2]), ("resnet50", Bottleneck, [3, 4, 6, 3])]
)
def test_the_full_network_computes_what_torchvision_s_resnet_computes(arch, block, layers):
    reference = randomize_bn(torchvision.models.get_model(arch, weights=None))
    flat = FlatResNet224(block, layers, 1000).eval()
    utils.load_weights_to_flatresnet(reference.state_dict(), flat)
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = reference(x)
        atol = 1e-5 * expected.abs().max().item()  # float rounding, at the logits' scale (hundreds here)
        assert torch.allclose(flat.forward_full(x), expected, rtol=1e-4, atol=atol)
        # kept blocks alike: the sparse forward with every block, and with one policy per image
        assert torch.allclose(flat(x, torch.ones(3, flat.num_blocks)), expected, rtol=1e-4, atol=atol)
        # and back: benchmark.py's torchvision twin of the flat network is the reference itself
        twin = utils.torchvision_twin(flat, arch.replace("resnet", "R") + "_ImgNet")
        assert torch.equal(twin(x), expected)


@pytest.mark.parametrize("imagenet", [False, True])
@pytest.mark.parametrize("amp", [False, True])
def test_blocks_add_in_place_yet_autograd_gets_the_out_of_place_gradients(imagenet, amp, monkeypatch):
    import models.resnet

    if imagenet:
        net, size = randomize_bn(FlatResNet224(Bottleneck, [1, 1, 1, 1], 10)), 224
        policy = torch.tensor([[1.0, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]])
    else:
        net, size = randomize_bn(FlatResNet32(BasicBlock, [3, 3, 3], 10)), 32
        policy = torch.tensor([[1.0] * 9, [1, 0] * 4 + [1], [0] * 9])
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    net.train()
    grads = []
    for out_of_place in (False, True):
        if out_of_place:
            monkeypatch.setattr(models.resnet, "add_relu", lambda branch, res: torch.nn.functional.relu(res + branch))
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            # the masked form (training's default) and the row-gathering one (--sparse)
            loss = net(x, policy).float().square().sum() + net(x, policy, masked=False).float().square().sum()
        loss.backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)
