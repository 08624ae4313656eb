"""Flat ResNets whose residual blocks can be dropped per image, and the BlockDrop policy networks.

A flat ResNet keeps its blocks as ``blocks[segment][k]`` and the shortcut of each segment's first
block as ``ds[segment]``; block ``t`` counts over all segments in order (K blocks in all). Block
``t`` computes ``x = relu(residual + block(x))`` when kept and ``x = residual`` when dropped, where
``residual = ds[segment](x)`` for the first block of a segment, so a dropped first block still
changes the resolution and width.
"""

import torch
import torch.nn.functional as F
from torch import nn

from models.base import BasicBlock, DownsampleB, conv3x3


def add_relu(branch: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """relu(residual + branch), in place in ``branch`` (a block's fresh output) as torchvision does: the
    same numbers as ``F.relu(residual + branch)`` without two tensors of the activations' size."""
    if branch.dtype != residual.dtype:  # mixed precision: promote as the out-of-place sum would
        return F.relu(residual + branch)
    return branch.add_(residual).relu_()


class FlatResNet(nn.Module):
    """Shared forward passes; subclasses build the stem (``seed``), ``blocks``, ``ds`` and ``fc``."""

    layer_config: list[int]

    def seed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(x)
        return self.fc(torch.flatten(x, 1))

    @property
    def num_blocks(self) -> int:
        return sum(self.layer_config)

    def block_positions(self):
        """Yield (t, segment, k) for every block in execution order."""
        t = 0
        for segment, n in enumerate(self.layer_config):
            for k in range(n):
                yield t, segment, k
                t += 1

    def forward_full(self, x: torch.Tensor) -> torch.Tensor:
        """The plain ResNet: every block runs."""
        x = self.seed(x)
        for _, segment, k in self.block_positions():
            residual = self.ds[segment](x) if k == 0 else x
            x = add_relu(self.blocks[segment][k](x), residual)
        return self.head(x)

    def forward_single(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        """One policy (K,) for the whole batch; dropped blocks are not computed."""
        keep = [bool(v) for v in policy.reshape(-1).tolist()]  # one host sync, not K
        if len(keep) != self.num_blocks:
            raise ValueError(f"policy has {len(keep)} entries, the network has {self.num_blocks} blocks")
        x = self.seed(x)
        for t, segment, k in self.block_positions():
            residual = self.ds[segment](x) if k == 0 else x
            x = add_relu(self.blocks[segment][k](x), residual) if keep[t] else residual
        return self.head(x)

    # On CPU, grouping pays when the average group has at least this many images (measured on
    # R110 at batch 256: groups of 32-64 images run 20-35% faster than row gathering, groups of 16
    # break even, groups of 1-4 run 1.5-2.5x slower).
    MIN_GROUP = 16

    # Set by distributed.prepare under --parallel: sums a tensor over the processes. In training,
    # every process then runs the same layers in the same order (a block on no rows where it has
    # no image to run it on), so that every process calls every BatchNorm layer alike.
    process_sum = None

    def forward(self, x: torch.Tensor, policy: torch.Tensor, masked: bool | None = None) -> torch.Tensor:
        """Per-image policies (B, K): block t runs for the images whose policy keeps it.

        ``masked`` chooses the form:

        - None (default): the original's numbers at the least cost. In training mode that is the
          masked form (``forward_masked``): a kept block runs on the whole batch, so BatchNorm
          normalises over every image, as in the original. In eval mode, where BatchNorm uses its
          running statistics, the sparse forms below give the same numbers for less.
        - True: the masked form in every mode (``--dense``, for comparison).
        - False: the sparse forms in every mode (``--sparse``). In training mode BatchNorm then
          normalises over the images that keep the block only, which changes the numbers.

        The sparse forms, chosen by the policies' statistics:

        - row gathering (``_forward_rows``): for each block, the rows that keep it are gathered,
          run through it and written back. Its cost is K small gathers and scatters whatever the
          policies. Used in training, on CUDA (where it is K launches more rather than K per
          distinct policy), and on CPU when the policies are varied.
        - grouping by identical policy (``_forward_grouped``): each distinct policy runs once, with
          ``forward_single``, on the images that share it. On CPU, with few distinct policies
          (groups of ``MIN_GROUP`` images or more), it avoids the scatters and keeps each group's
          activations in cache. Only in eval mode.

        Every form goes through this entry point, so that DistributedDataParallel sees the call.
        """
        if policy.shape != (x.shape[0], self.num_blocks):
            raise ValueError(f"policy shape {tuple(policy.shape)}, expected {(x.shape[0], self.num_blocks)}")
        if masked or (masked is None and self.training):
            return self.forward_masked(x, policy)
        keep = policy.bool()  # (B, K)
        if not self.training and x.device.type == "cpu" and x.shape[0] >= 2 * self.MIN_GROUP:
            distinct, groups = torch.unique(keep, dim=0, return_inverse=True)
            if x.shape[0] >= self.MIN_GROUP * distinct.shape[0]:
                return self._forward_grouped(x, distinct, groups)
        return self._forward_rows(x, keep)

    def _uniform(self) -> bool:
        """True where every process must run the same layers (training under ``--parallel``)."""
        return self.process_sum is not None and self.training

    def _on_rows(self, block: nn.Module, x: torch.Tensor, residual: torch.Tensor, rows: torch.Tensor):
        """``residual`` with block(x) + residual (after ReLU) written into ``rows`` (n,)."""
        out = add_relu(block(x.index_select(0, rows)), residual.index_select(0, rows))
        if torch.is_grad_enabled() and (out.requires_grad or residual.requires_grad):
            return residual.index_copy(0, rows, out)  # autograd needs residual unchanged
        return residual.index_copy_(0, rows, out)  # no copy of the whole batch

    def _forward_rows(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        counts = keep.sum(0).tolist()  # blocks kept per column, one host sync
        uniform = self._uniform()  # eval-mode BatchNorm needs no other process
        x = self.seed(x)
        batch = x.shape[0]
        for t, segment, k in self.block_positions():
            residual = self.ds[segment](x) if k == 0 else x
            block = self.blocks[segment][k]
            if counts[t] == batch:
                x = add_relu(block(x), residual)
            elif counts[t] == 0 and not uniform:
                x = residual
            else:
                x = self._on_rows(block, x, residual, keep[:, t].nonzero().squeeze(1))
        return self.head(x)

    def _forward_grouped(self, x: torch.Tensor, distinct: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        rows = [(groups == g).nonzero().squeeze(1) for g in range(distinct.shape[0])]
        outs = [self.forward_single(x.index_select(0, r), p) for r, p in zip(rows, distinct, strict=True)]
        order = torch.cat(rows).argsort()  # back to the input's order
        return torch.cat(outs).index_select(0, order)

    def forward_masked(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        """The original's form: a block that some image keeps runs on every image, and the images
        that drop it take the shortcut (``fx * mask + residual * (1 - mask)``); a block that no image
        of the batch keeps is skipped (no computation, no BatchNorm running-statistics update)."""
        local = (policy != 0).sum(0)  # (K,) images keeping each block
        uniform = self._uniform()
        # Under --parallel "no image keeps it" is a property of the whole batch, over every process.
        local_counts = local.tolist()  # one host sync (two under --parallel)
        counts = self.process_sum(local).tolist() if uniform else local_counts
        everyone = [n == x.shape[0] for n in local_counts]
        no_rows = torch.zeros(0, dtype=torch.long, device=x.device)
        x = self.seed(x)
        for t, segment, k in self.block_positions():
            residual = self.ds[segment](x) if k == 0 else x
            block = self.blocks[segment][k]
            if counts[t] == 0:
                # Skipped; under --parallel it runs on no rows, so that every process calls it.
                x = self._on_rows(block, x, residual, no_rows) if uniform else residual
                continue
            fx = add_relu(block(x), residual)
            if everyone[t]:
                x = fx  # what the mask gives, bit for bit, without two more passes over the batch
            else:
                m = policy[:, t].to(fx.dtype).view(-1, 1, 1, 1)  # fx's dtype: bfloat16 stays so under --amp
                x = fx * m + residual * (1 - m)
        return self.head(x)

    def _build(self, block, widths: list[int], layers: list[int], strides: list[int], num_classes: int) -> None:
        """The segments of blocks with their shortcuts, the classifier, then the initial weights."""
        blocks, ds = [], []
        for planes, n, stride in zip(widths, layers, strides, strict=True):
            segment, shortcut = self._make_layer(block, planes, n, stride)
            blocks.append(nn.ModuleList(segment))
            ds.append(shortcut)
        self.blocks = nn.ModuleList(blocks)
        self.ds = nn.ModuleList(ds)
        self.fc_dim = widths[-1] * block.expansion
        self.fc = nn.Linear(self.fc_dim, num_classes)
        self.layer_config = list(layers)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


class FlatResNet32(FlatResNet):
    """CIFAR-style ResNet (depth 6n+2): widths 16/32/64, parameter-free shortcuts, 8x8 pooling."""

    def __init__(self, block: type[nn.Module], layers: list[int], num_classes: int = 10):
        super().__init__()
        self.inplanes = 16
        self.conv1 = conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(8)
        self._build(block, [16, 32, 64], layers, [1, 2, 2], num_classes)

    def _make_layer(self, block, planes, n, stride):
        shortcut = nn.Sequential()
        if stride != 1 or self.inplanes != planes * block.expansion:
            shortcut = DownsampleB(self.inplanes, planes * block.expansion, stride)
        segment = [block(self.inplanes, planes, stride)]
        self.inplanes = planes * block.expansion
        segment += [block(self.inplanes, planes, 1) for _ in range(1, n)]
        return segment, shortcut

    def seed(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))


class FlatResNet224(FlatResNet):
    """ImageNet-style ResNet in torchvision's layout (7x7 stem, max-pool, conv1x1+BN shortcuts)."""

    def __init__(self, block: type[nn.Module], layers: list[int], num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.avgpool = nn.AvgPool2d(7)
        self._build(block, [64, 128, 256, 512], layers, [1, 2, 2, 2], num_classes)

    def _make_layer(self, block, planes, n, stride):
        shortcut = nn.Sequential()
        if stride != 1 or self.inplanes != planes * block.expansion:
            shortcut = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        segment = [block(self.inplanes, planes, stride)]
        self.inplanes = planes * block.expansion
        segment += [block(self.inplanes, planes, 1) for _ in range(1, n)]
        return segment, shortcut

    def seed(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


class Policy(nn.Module):
    """A small ResNet whose features give K keep-probabilities, plus an unused value head."""

    features: FlatResNet

    def _make_heads(self, num_blocks: int):
        self.feat_dim = self.features.fc.weight.shape[1]
        self.features.fc = nn.Identity()  # the classifier is not part of the policy network
        self.logit = nn.Linear(self.feat_dim, num_blocks)
        # Kept only so that the released checkpoints load with strict=True.
        self.vnet = nn.Linear(self.feat_dim, 1)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load, dropping the ``features.fc.*`` keys that legacy checkpoints still carry."""
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("features.fc.")}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.features.forward_full(self.prepare(x))  # (B, feat_dim)
        # The sigmoid in float32 even under bfloat16 autocast: there, probabilities above about
        # 0.998 would round to 1 and their logits would get no gradient at all.
        probs = torch.sigmoid(self.logit(feats).float())  # (B, K)
        return probs, self.vnet(feats)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Policy32(Policy):
    """Policy network for 32x32 inputs: a ResNet-8 ([1,1,1]) with 64-d features."""

    def __init__(self, layer_config: list[int] = (1, 1, 1), num_blocks: int = 15):
        super().__init__()
        self.features = FlatResNet32(BasicBlock, list(layer_config), num_classes=10)
        self._make_heads(num_blocks)


class Policy224(Policy):
    """Policy network for 224x224 inputs: ResNet-18's first block per stage on a 112x112 input."""

    def __init__(self, layer_config: list[int] = (1, 1, 1, 1), num_blocks: int = 16):
        super().__init__()
        self.features = FlatResNet224(BasicBlock, list(layer_config), num_classes=1000)
        self.features.avgpool = nn.AvgPool2d(4)  # 112x112 input leaves a 4x4 map
        self._make_heads(num_blocks)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2)
