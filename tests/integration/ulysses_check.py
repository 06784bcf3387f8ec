"""Ulysses attention on the bare model vs one process; run by test_train_parallel.py (no test).

    torchrun --nproc_per_node 2 tests/integration/ulysses_check.py OUT.json

Every rank builds the same GPT (fp32, seed 0) twice: a reference run on whole rows, and a
sequence-parallel run (``megapt.train.parallel.prepare_model``: seq_shard + DeepSpeed's
DistributedAttention) on its half of every row. Rows are packed with several documents
(doc_mask), the model has 4 query heads on 1 KV head (GQA with fewer KV heads than the 2 ranks:
the replication path), and activation checkpointing is on in the parallel run. Rank 0 writes the
reference and the parallel loss (the ranks' shares summed) and the largest relative gradient
difference (the ranks' gradients summed, as DeepSpeed does over a sequence group) per backend.
"""

import json
import sys

import deepspeed
import torch
import torch.distributed as dist

from megapt.model.gpt import GPT, ModelArgs
from megapt.model.ops import Backends
from megapt.train import parallel

EOS = 1


def main(out: str) -> int:
    dist.init_process_group("gloo")
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    layout = parallel.Layout(world=2, sp=2)
    mpu = parallel.init_groups(layout)
    args = ModelArgs(
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=1,
        ffn_hidden=96,
        vocab_size=64,
        max_seq_len=32,
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randint(2, 64, (2, 24), generator=g)
    x[0, [4, 5, 13, 17]] = EOS  # documents [0..4] [5] [6..13] [14..17] [18..23]: both halves cut
    x[1, [11]] = EOS
    y = torch.roll(x, -1, dims=1)
    y[:, -1] = -100  # an ignored label: the shares must still add up to the mean
    result = {}
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else ["eager", "sdpa"]
    for name in names:  # "triton": the flash kernel with document starts (TRITON_INTERPRET=1)
        backends = Backends(name, "eager", "eager", "eager")
        ref = GPT(args, backends, seed=0, doc_mask=True, eos_id=EOS)
        loss_ref = ref(x, y).loss
        loss_ref.backward()
        sp = GPT(args, backends, seed=0, doc_mask=True, eos_id=EOS)
        sp = parallel.prepare_model(sp, layout, mpu)
        sp.gradient_checkpointing = True
        share = sp(x, y).loss
        share.backward()
        total = share.detach().clone()
        dist.all_reduce(total)
        worst = 0.0
        for p, q in zip(sp.parameters(), ref.parameters()):
            grad = p.grad.clone()
            dist.all_reduce(grad)
            worst = max(worst, float((grad - q.grad).norm() / q.grad.norm()))
        with torch.no_grad():
            plain = float(GPT(args, backends, seed=0)(x, y).loss)  # no document mask
        result[name] = {
            "ref": loss_ref.item(),
            "sp": total.item(),
            "grad_rel": worst,
            "no_doc_mask": plain,
        }
    if rank == 0:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(result, f)
    return 0


if __name__ == "__main__":
    from megapt.train.dist import exit_process

    exit_process(main(sys.argv[1]))  # destroys the group; no SIGABRT in interpreter tear-down
