"""Train a micro GPT on the Triton kernels and on sdpa/eager from the same weights and compare
the two loss curves (used by tests/unit/kernels/test_kernel_training_curve.py on CPU and by
tests/gpu/test_training_curve_gpu.py at bf16)."""

import os
import subprocess
import sys
import textwrap

CURVE_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from megapt.model.gpt import GPT, ModelArgs
    from megapt.model.ops import Backends

    device, dtype, steps = sys.argv[1], getattr(torch, sys.argv[2]), int(sys.argv[3])
    T, B, V = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    d, L, nh, nkv = (int(x) for x in sys.argv[7].split(","))
    torch.manual_seed(0)
    args = ModelArgs(n_layers=L, d_model=d, n_heads=nh, n_kv_heads=nkv, ffn_hidden=2 * d, vocab_size=V,
                     max_seq_len=T)
    # a learnable stream: each row counts up from a random start, so the loss falls fast
    g = torch.Generator().manual_seed(1)
    starts = torch.randint(0, V, (steps, B, 1), generator=g)
    data = (starts + torch.arange(T + 1)) % V
    curves = {}
    for name, be in (("reference", Backends("sdpa", "eager", "eager", "chunked")),
                     ("triton", Backends("triton", "triton", "triton", "triton"))):
        m = GPT(args, be, seed=0).to(device)
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
        losses = []
        for s in range(steps):
            x, y = data[s, :, :-1].to(device), data[s, :, 1:].to(device)
            with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                loss = m(x, y).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves[name] = losses
    print(json.dumps(curves))
""")


def run_curves(
    device: str, dtype: str, steps: int, T: int, B: int, V: int, shape: str, timeout: int
) -> dict:
    import json

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            CURVE_SCRIPT,
            device,
            dtype,
            str(steps),
            str(T),
            str(B),
            str(V),
            shape,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def check_curves(curves: dict, rtol: float, min_drop: float) -> None:
    ref, tri = curves["reference"], curves["triton"]
    assert ref[-1] < ref[0] - min_drop, ref  # it learns, so the comparison means something
    for step, (a, b) in enumerate(zip(ref, tri)):
        assert abs(a - b) <= rtol * abs(a), (
            f"step {step}: reference {a:.5f} vs triton {b:.5f}\n{ref}\n{tri}"
        )
