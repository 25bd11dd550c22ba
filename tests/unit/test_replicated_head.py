"""The value head's replicas start from rank 0's weights (two gloo processes, no DeepSpeed)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def _rank(rank: int, init_file: str, out_dir: str) -> None:
    from rlhf_ray.backends.replicated import replicate
    from rlhf_ray.config import LearnerConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(100 + rank)  # each rank initialises its head differently
        head = nn.Linear(8, 1)
        rep = replicate(head, LearnerConfig(), total_steps=4, device=torch.device("cpu"), world_size=2)
        before = {k: v.clone() for k, v in rep.module.state_dict().items()}
        # one step on rank-dependent gradients: the averaged update keeps the replicas equal
        loss = rep.module(torch.full((3, 8), float(rank + 1))).sum()
        loss.backward()
        rep.step()
        torch.save({"start": before, "after": rep.module.state_dict()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_replicas_start_from_rank_0_and_stay_equal(tmp_path):
    mp.start_processes(_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    torch.manual_seed(100)
    expected = nn.Linear(8, 1).state_dict()  # what rank 0 drew
    for k in expected:
        torch.testing.assert_close(r0["start"][k], expected[k])
        torch.testing.assert_close(r1["start"][k], expected[k])
        torch.testing.assert_close(r1["after"][k], r0["after"][k])
    assert not torch.equal(r0["after"]["bias"], expected["bias"])  # the step did move the head
