"""The original's training steps, written from SPEC.md section 4, against the scripts' ``train_epoch``.

The reference below uses the networks' layers and PyTorch's Adam, nothing else of the project: its
own masked forward (a block no image keeps is skipped), reward, bounded Bernoulli log-likelihood,
curriculum mask and losses, with gradients zeroed (not set to None) before each step as PyTorch
0.3 did. Two batches with fixed sampled policies run through both; the second batch drops one
block for every image. Losses, gradients of both networks, BatchNorm running statistics, Adam's
state and the weights after the steps must agree.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import cl_training
import core.reinforce
import finetune
import utils
from models.base import BasicBlock
from models.resnet import FlatResNet32, Policy32

K = 6  # a ResNet-14: [2, 2, 2]
B = 8  # images per batch; two batches
DROPPED = 4  # the block that every image of the second batch drops (segment 2, its first block)
# Adam's first steps move a weight by about lr whatever its gradient's size: with a larger epsilon a
# gradient at float-rounding level moves it by as little, so weights can be compared closely.
EPS = 1e-4


# ---- the reference, from SPEC.md section 4 ---------------------------------------------------


def ref_resnet(rnet, x, policy):
    """The original's FlatResNet.forward: kept blocks run on the whole batch and are masked per
    image; a block that no image keeps is skipped."""
    x = F.relu(rnet.bn1(rnet.conv1(x)))
    t = 0
    for segment, n in enumerate(rnet.layer_config):
        for b in range(n):
            residual = rnet.ds[segment](x) if b == 0 else x
            if policy[:, t].sum() == 0:
                x = residual
            else:
                mask = policy[:, t].float().view(-1, 1, 1, 1)
                fx = F.relu(residual + rnet.blocks[segment][b](x))
                x = fx * mask + residual * (1 - mask)
            t += 1
    x = rnet.avgpool(x)
    return rnet.fc(x.view(x.size(0), -1))


def ref_agent(agent, x):
    """Keep-probabilities (B, K): the policy ResNet's pooled features, a linear layer, a sigmoid."""
    f = agent.features
    x = F.relu(f.bn1(f.conv1(x)))
    for segment, n in enumerate(f.layer_config):
        for b in range(n):
            residual = f.ds[segment](x) if b == 0 else x
            x = F.relu(residual + f.blocks[segment][b](x))
    feats = f.avgpool(x).view(x.size(0), -1)
    return torch.sigmoid(agent.logit(feats))


def ref_reward(preds, targets, policy, penalty):
    """R(u) = 1 - (|u| / K)^2 where the prediction is right, else the penalty."""
    correct = preds.argmax(1) == targets
    return torch.where(
        correct, 1 - (policy.sum(1) / policy.shape[1]) ** 2, torch.full_like(correct, penalty, dtype=torch.float)
    )


def ref_log_prob(bounded, u):
    return u * torch.log(bounded) + (1 - u) * torch.log(1 - bounded)


def ref_steps(stage, rnet, agent, batches, policies, alpha, penalty, beta=0.1, decided=K, lr=1e-3):
    """The original's steps over ``batches`` with the sampled ``policies``; returns per-step records."""
    optimizer = torch.optim.Adam(
        list(agent.parameters()) + (list(rnet.parameters()) if stage == "finetune" else []), lr=lr, eps=EPS
    )
    agent.train()
    rnet.train(stage == "finetune")
    forced = torch.arange(K) < K - decided  # curriculum: the first K - decided blocks always run
    records = []
    for (x, y), u in zip(batches, policies, strict=True):
        probs = ref_agent(agent, x)
        u_map = (probs.detach() >= 0.5).float()
        u = u.clone()
        u[:, forced], u_map[:, forced] = 1.0, 1.0
        bounded = alpha * probs + (1 - alpha) * (1 - probs)
        if stage == "finetune":
            with torch.no_grad():
                preds_map = ref_resnet(rnet, x, u_map)
            preds = ref_resnet(rnet, x, u)
        else:
            with torch.no_grad():
                preds_map, preds = ref_resnet(rnet, x, u_map), ref_resnet(rnet, x, u)
        advantage = ref_reward(preds, y, u, penalty) - ref_reward(preds_map, y, u_map, penalty)  # (B,)
        if stage == "finetune":
            loss = (-ref_log_prob(bounded, u).sum(1) * advantage).sum() + F.cross_entropy(preds, y)
        else:
            clamped = bounded.clamp(1e-15, 1 - 1e-15)
            entropy = (-clamped * torch.log(clamped)).sum()
            policy_term = (-ref_log_prob(bounded, u) * advantage[:, None] * (~forced).float()).sum()
            loss = (policy_term - beta * entropy) / x.shape[0]
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        records.append({"loss": loss.item(), "advantage": advantage, "grads": grads_of(agent, rnet)})
        optimizer.step()
    return records, optimizer


# ---- helpers ---------------------------------------------------------------------------------


def grads_of(agent, rnet):
    return {
        f"{prefix}.{name}": (None if p.grad is None else p.grad.clone())
        for prefix, module in (("agent", agent), ("rnet", rnet))
        for name, p in module.named_parameters()
    }


class RecordingAdam(torch.optim.Adam):
    """Adam that keeps each step's gradients (None where a parameter has none)."""

    def __init__(self, params, agent, rnet, **kwargs):
        super().__init__(params, **kwargs)
        self.models, self.grads = (agent, rnet), []

    def step(self, closure=None):
        self.grads.append(grads_of(*self.models))
        return super().step(closure)


def randomized_models(seed=0):
    torch.manual_seed(seed)
    rnet = FlatResNet32(BasicBlock, [2, 2, 2], num_classes=10)
    agent = Policy32([1, 1, 1], num_blocks=K)
    g = torch.Generator().manual_seed(seed)
    for m in rnet.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # statistics and affine terms worth comparing
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    with torch.no_grad():  # the greedy policy drops DROPPED for every image
        agent.logit.weight[DROPPED] = 0.0
        agent.logit.bias[DROPPED] = -4.0
    return rnet, agent


def fixed_policies():
    g = torch.Generator().manual_seed(3)
    first = (torch.rand(B, K, generator=g) < 0.5).float()
    first[:3, DROPPED] = 1.0  # some images keep it in the first batch: it gets gradients and momentum
    second = (torch.rand(B, K, generator=g) < 0.5).float()
    second[:, DROPPED] = 0.0  # no image keeps it in the second
    return [first, second]


def data(rnet, policies):
    """Two batches; half the targets are the network's own predictions, so that rewards vary."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2 * B, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (2 * B,), generator=g)
    with torch.no_grad():
        probe = copy.deepcopy(rnet).eval()
        own = torch.cat([ref_resnet(probe, x[i * B : (i + 1) * B], policies[i]).argmax(1) for i in range(2)])
    y[::2] = own[::2]
    return x, y


def run_script(stage, rnet, agent, x, y, policies, monkeypatch, alpha, penalty, decided=K, lr=1e-3, sparse=False):
    """The script's ``train_epoch`` over the two batches, the sampled policies replaced by ``policies``."""
    queue = list(policies)
    sample = utils.sample_policy

    def fixed(probs, alpha, generator=None, rows=0):
        policy_map, _, distr = sample(probs, alpha, generator, rows)
        return policy_map, queue.pop(0).clone(), distr

    losses = []
    check = utils.check_finite

    def record(value, what, why=""):
        if what == "loss":
            losses.append(value.item())
        check(value, what, why)

    monkeypatch.setattr(core.reinforce, "sample_policy", fixed)  # what sampled_batches draws
    monkeypatch.setattr(utils, "check_finite", record)
    loader = utils.make_loader(TensorDataset(x, y), B, False, 0, torch.device("cpu"))
    agent.vnet.requires_grad_(False)  # as the scripts' main(): the value head takes no part
    flags = ["--alpha", str(alpha), "--penalty", str(penalty)]
    rt = utils.Runtime(torch.device("cpu"))
    if stage == "finetune":
        args = finetune.get_args_parser().parse_args(flags + (["--sparse"] if sparse else []))
        params = [p for p in [*agent.parameters(), *rnet.parameters()] if p.requires_grad]
        optimizer = RecordingAdam(params, agent, rnet, lr=lr, eps=EPS)
        stats, sampled = finetune.train_epoch(args, rnet, agent, loader, optimizer, rt)
    else:
        args = cl_training.get_args_parser().parse_args(flags)
        rnet.eval()
        for p in rnet.parameters():
            p.requires_grad_(False)
        optimizer = RecordingAdam([p for p in agent.parameters() if p.requires_grad], agent, rnet, lr=lr, eps=EPS)
        stats, sampled = cl_training.train_epoch(args, rnet, agent, loader, optimizer, rt, decided)
    return losses, optimizer, stats, sampled


def assert_same_grads(ours, reference):
    for name, theirs in reference.items():
        mine = ours.get(name)
        if theirs is None:  # the original had no gradient there (never used), so neither may we
            assert mine is None or not mine.any(), name
        else:
            assert mine is not None, f"{name}: no gradient, the original has one"
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6, msg=name)


def assert_same_state(a, b):
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(x, y), name
        else:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=name)


# ---- the tests -------------------------------------------------------------------------------


def test_one_finetuning_step_is_the_originals(monkeypatch):
    rnet, agent = randomized_models()
    policies = fixed_policies()
    x, y = data(rnet, policies)
    ref_rnet, ref_agent_ = copy.deepcopy(rnet), copy.deepcopy(agent)
    batches = [(x[:B], y[:B]), (x[B:], y[B:])]
    records, ref_opt = ref_steps("finetune", ref_rnet, ref_agent_, batches, policies, alpha=0.8, penalty=-5.0)
    assert all(r["advantage"].abs().sum() > 0 for r in records)  # the policy term is not empty

    losses, optimizer, stats, sampled = run_script("finetune", rnet, agent, x, y, policies, monkeypatch, 0.8, -5.0)

    assert torch.equal(sampled, torch.cat(policies))
    assert losses == pytest.approx([r["loss"] for r in records], rel=1e-5)
    for ours, r in zip(optimizer.grads, records, strict=True):
        assert_same_grads(ours, r["grads"])
    # The dropped block: no gradient in the second step, zeroed rather than None ...
    dropped = rnet.blocks[2][0]
    assert all(p.grad is not None and not p.grad.any() for p in dropped.parameters())
    # ... so that Adam still moved it, from its momentum of the first step.
    assert all(optimizer.state[p]["step"] == 2 for p in dropped.parameters())
    # BatchNorm: both runs of each batch updated the running statistics over the whole batch;
    # the dropped block's layers only in the first batch (twice: greedy and sampled run).
    assert int(dropped.bn1.num_batches_tracked) == 1  # greedy drops it; only the first sampled run kept it
    assert int(rnet.blocks[0][0].bn1.num_batches_tracked) == 4
    assert_same_state(rnet, ref_rnet)
    assert_same_state(agent, ref_agent_)
    for p, q in zip(
        [*agent.parameters(), *rnet.parameters()], [*ref_agent_.parameters(), *ref_rnet.parameters()], strict=True
    ):
        if p.requires_grad:
            torch.testing.assert_close(optimizer.state[p]["exp_avg"], ref_opt.state[q]["exp_avg"], rtol=1e-4, atol=1e-7)


def test_the_sparse_opt_in_changes_the_numbers(monkeypatch):
    """--sparse normalises over the images that keep a block: not the original's numbers (docs/differences.md)."""
    rnet, agent = randomized_models()
    policies = fixed_policies()
    x, y = data(rnet, policies)
    ref_rnet = copy.deepcopy(rnet)
    ref_steps("finetune", ref_rnet, copy.deepcopy(agent), [(x[:B], y[:B]), (x[B:], y[B:])], policies, 0.8, -5.0)
    run_script("finetune", rnet, agent, x, y, policies, monkeypatch, 0.8, -5.0, sparse=True)
    bn, ref_bn = rnet.blocks[1][1].bn1, ref_rnet.blocks[1][1].bn1
    assert not torch.allclose(bn.running_mean, ref_bn.running_mean, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("decided", [3, K])
def test_one_curriculum_step_is_the_originals(monkeypatch, decided):
    rnet, agent = randomized_models()
    policies = fixed_policies()
    x, y = data(rnet, policies)
    ref_rnet, ref_agent_ = copy.deepcopy(rnet), copy.deepcopy(agent)
    batches = [(x[:B], y[:B]), (x[B:], y[B:])]
    records, _ = ref_steps("curriculum", ref_rnet, ref_agent_, batches, policies, 0.8, -1.0, decided=decided)
    assert all(r["advantage"].abs().sum() > 0 for r in records)

    losses, optimizer, _, sampled = run_script(
        "curriculum", rnet, agent, x, y, policies, monkeypatch, 0.8, -1.0, decided=decided
    )

    forced = torch.arange(K) < K - decided
    assert sampled[:, forced].eq(1).all()  # the curriculum forces the first K - decided blocks on
    assert torch.equal(sampled[:, ~forced], torch.cat(policies)[:, ~forced])
    assert losses == pytest.approx([r["loss"] for r in records], rel=1e-5)
    for ours, r in zip(optimizer.grads, records, strict=True):
        assert_same_grads(ours, {k: v for k, v in r["grads"].items() if k.startswith("agent.")})
        assert all(v is None for k, v in ours.items() if k.startswith("rnet."))  # the ResNet is frozen
    assert_same_state(rnet, ref_rnet)  # eval mode: statistics unchanged
    assert_same_state(agent, ref_agent_)
