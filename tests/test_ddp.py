"""The training step under real DDP (torch.distributed, gloo, 2 processes), without Ray.

Rank 0's images carry 1 instance and rank 1's carry 6: the ranks must agree on the chunk count (all-reduce max),
finish without hanging, and end with identical parameters (gradients are all-reduced, every rank steps the same).
"""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from instagan.config import Config
from instagan.synthetic import make_batch
from instagan.train import TrainState, build_networks, chunk_count, prepare_batch, train_step

CFG = {"model": {"ngf": 4, "ndf": 4, "n_blocks": 1}, "data": {"size": 32, "load_size": 32},
       "train": {"ins_max": 6, "ins_per": 2, "batch_size": 2}}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = Config.from_dict(CFG)
        nets = {k: DDP(v) for k, v in build_networks(cfg).items()}
        state = TrainState.create(cfg, nets=nets, rank=rank)
        ins = (1, 1) if rank == 0 else (6, 6)
        chunks = []
        for step in range(2):
            a = make_batch("a", 2, 32, ins=ins, start=10 * rank + 2 * step)
            b = make_batch("b", 2, 32, ins=ins, start=10 * rank + 2 * step)
            n = torch.tensor(chunk_count(prepare_batch(a, 6, state.device), prepare_batch(b, 6, state.device), 6, 2))
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
            chunks.append(int(n))
            train_step(state, a, b, n_chunks=int(n))
        flat = torch.cat([p.detach().flatten() for k in sorted(nets) for p in nets[k].parameters()])
        torch.save({"params": flat, "chunks": chunks}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_with_different_instance_counts_stay_identical(tmp_path):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=540)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "a rank hung"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0["chunks"] == r1["chunks"] == [3, 3]  # rank 1's 6 instances need 3 chunks; rank 0 runs them too
    torch.testing.assert_close(r0["params"], r1["params"], rtol=0, atol=0)
    # The steps changed the parameters (a no-op would also be "identical").
    fresh = build_networks(Config.from_dict(CFG))
    start = torch.cat([p.detach().flatten() for k in sorted(fresh) for p in fresh[k].parameters()])
    assert not torch.allclose(start, r0["params"])
