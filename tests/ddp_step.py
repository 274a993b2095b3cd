"""Helper of tests/runtime/test_distributed.py, run by ``torchrun --nproc_per_node=2``: one training step
of a tiny multi-task network on a batch of 4, (1) in one process on the whole batch (before any
process group exists: the plain single-process code), then (2) with DistributedDataParallel on two
halves of the batch, one per process. Rank 0 saves both parameter sets and losses to ``OUT``; with
the detection head (``detect``) every rank saves its parameters after the step to ``OUT.rank<r>``.

Usage: torchrun --standalone --nproc_per_node=2 tests/ddp_step.py OUT {plain|tumour|detect} {sync|nosync}
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist

from pipeline.models.detection import LesionDetector
from pipeline.models.losses import MultiTaskLoss
from pipeline.models.networks import MultiTaskSegResNet
from pipeline.runtime import distributed


def batch(head: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    image = torch.randn(4, 1, 16, 16, 16, generator=g)
    label = (torch.rand(4, 1, 16, 16, 16, generator=g) > 0.8).float()
    label[2] = 0  # a patch without tumour
    if head == "detect":  # lesions the detector can box: one or two cubes per patch, none in sample 2
        label.zero_()
        label[0, :, 2:8, 2:8, 2:8] = 1
        label[1, :, 8:14, 3:9, 6:12] = 1
        label[3, :, 1:6, 9:15, 2:7] = 1
        label[3, :, 10:15, 2:7, 9:14] = 1
    if head == "tumour":
        grid = torch.stack(torch.meshgrid(*[torch.linspace(-0.5, 0.5, 16)] * 3, indexing="ij"))
        image = torch.cat([image, (grid[None] + 0.1 * torch.arange(4).view(4, 1, 1, 1, 1)).float()], dim=1)
    target = {"label": label, "class": torch.tensor([0, 2, 1, -1]), "has_label": torch.tensor([1, 1, 1, 0]),
              "has_class": torch.tensor([1, 1, 0, 1])}  # one sample without mask, two without class
    return image, target


def step(net: torch.nn.Module, loss_fn: MultiTaskLoss, image: torch.Tensor, target: dict) -> float:
    # plain SGD: the parameters move by lr x gradient, so they compare the gradients themselves
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    out = net(image)
    loss = loss_fn(out, target)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def main(out: str, head: str, mode: str) -> None:
    torch.manual_seed(0)
    if head == "detect":  # levels 1-2 of a 16-cubed patch: 8- and 4-cubed maps; anchors of 6 and 10 mm at 2 mm
        net = MultiTaskSegResNet(init_filters=8, blocks_down=(1, 1, 1), blocks_up=(1, 1), cls_hidden=(8,),
                                 cls_dropout=0.0, cls_pooling="mean", coord_channels=0, detect=True, det_levels=(1, 2),
                                 det_channels=8, det_anchors=2)
        detector = LesionDetector(levels=(1, 2), spacing_mm=2.0, anchor_sizes_mm=(6.0, 10.0))
        loss_fn = MultiTaskLoss(cls_weight=0.3, class_weights=[1.0, 2.5, 0.7], det_weight=1.0, detector=detector,
                                det_min_volume_mm3=50.0)
    else:
        kw = {"cls_pooling": "mean", "coord_channels": 0} if head == "plain" else \
            {"cls_pooling": "tumour", "coord_channels": 3}
        net = MultiTaskSegResNet(init_filters=8, blocks_down=(1, 1), blocks_up=(1,), cls_hidden=(8,), cls_dropout=0.0,
                                 **kw)
        loss_fn = MultiTaskLoss(cls_weight=0.3, class_weights=[1.0, 2.5, 0.7])
    image, target = batch(head)
    reference = copy.deepcopy(net)
    whole_loss = step(reference, loss_fn, image, target)  # one process, whole batch (no process group yet)

    distributed.init_process_group("cpu")
    r = dist.get_rank()
    if mode == "sync":
        ddp = distributed.wrap(net, "cpu")
    else:  # the head's batch norm left per process: what DistributedDataParallel alone would do
        ddp = torch.nn.parallel.DistributedDataParallel(net, broadcast_buffers=False)
    half = slice(2 * r, 2 * r + 2)
    torch.manual_seed(r)  # the detector's hard-negative sampler draws at random: differently per rank
    ddp_loss = step(ddp, loss_fn, image[half], {k: v[half] for k, v in target.items()})
    if head == "detect":
        torch.save({"params": distributed.unwrap(ddp).state_dict(), "loss": ddp_loss}, f"{out}.rank{r}")
    if r == 0:
        torch.save({"reference": reference.state_dict(), "ddp": distributed.unwrap(ddp).state_dict(),
                    "whole_loss": whole_loss, "ddp_loss": ddp_loss}, out)
    distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
