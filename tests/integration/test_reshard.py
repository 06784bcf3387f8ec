"""Resharding through universal checkpoints: 2 ranks -> 1 rank -> 2 ranks (ZeRO-2, CPU, gloo).

1. R: 2 ranks train 6 steps (the reference), checkpointing at steps 2, 4 and 6.
2. 2 -> 1: `megapt ckpt universal` on R@2; one rank (micro_batch 4: same global batch) resumes
   from it and trains steps 3-4 (S). Its losses equal R's: step 3's loss needs the same weights
   and the same next global samples (a lost or repeated sample changes the batch and the loss),
   step 4's also the same Adam moments. S@4 and R@4, both converted to universal form, hold the
   same fp32 weights, exp_avg and exp_avg_sq for every parameter (up to the all-reduce's
   summation order) and the same data position (the loader's global sample offset).
3. 1 -> 2: `megapt ckpt universal` on S@4; two ranks resume and train steps 5-6 (T): losses equal R's.
4. `megapt ckpt consolidate` writes one model.safetensors equal to the checkpoint's weights
   (compared with the universal checkpoint's per-parameter fp32 tensors, a separate code path).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from scale_utils import base_env, free_port, kill_all, prepare_data, start, tail, wait_all, write_micro_config

TIMEOUT = 200
pytestmark = pytest.mark.slow


def _train(cfg: Path, name: str, ranks: int, log: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
           str(free_port()), "-m", "megapt", "train", "-c", str(cfg), f"--run.name={name}", *extra]
    p = start(cmd, base_env(), log)
    try:
        rc = wait_all([p], TIMEOUT)[0]
    finally:
        kill_all([p])
    assert rc == 0, tail(log)


def _megapt(log: Path, *args: str) -> None:
    p = start([sys.executable, "-m", "megapt", *args], base_env(), log)
    try:
        rc = wait_all([p], TIMEOUT)[0]
    finally:
        kill_all([p])
    assert rc == 0, tail(log)


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("kind") == "train"}


def _universal_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """{param/state: tensor} from ds_universal/<tag>/zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt"""
    out = {}
    for f in sorted((ckpt / "ds_universal").rglob("zero/*/*.pt")):
        obj = torch.load(f, map_location="cpu", weights_only=False)
        t = obj["param"] if isinstance(obj, dict) and "param" in obj else obj
        out[f"{f.parent.name}/{f.stem}"] = torch.as_tensor(t)
    return out


def _meta(ckpt: Path) -> dict:
    return json.loads((ckpt / "megapt.json").read_text())


def _convert_all(tmp: Path, ckpts: list[Path]) -> None:
    """`megapt ckpt universal` on each checkpoint, in parallel (mostly interpreter start-up)."""
    procs = [start([sys.executable, "-m", "megapt", "ckpt", "universal", str(c)], base_env(), tmp / f"u{i}.log")
             for i, c in enumerate(ckpts)]
    try:
        codes = wait_all(procs, TIMEOUT)
    finally:
        kill_all(procs)
    assert codes == [0] * len(ckpts), "\n".join(tail(tmp / f"u{i}.log") for i in range(len(ckpts)))


@pytest.mark.timeout(6 * TIMEOUT)
def test_reshard_2_to_1_to_2_keeps_weights_optimizer_and_data(tmp_path):
    cfg = write_micro_config(tmp_path, train={"max_steps": 6, "micro_batch": 2, "grad_accum": 1,
                                              "lr": 1e-2, "warmup_steps": 1},
                             checkpoint={"every": 2, "keep_last": 5}, deepspeed={"zero_stage": 2})
    prepare_data(cfg)
    runs = tmp_path / "runs"
    ckpt = lambda run, step: runs / run / "checkpoints" / f"step_{step:07d}"  # noqa: E731

    # 1. reference: 2 ranks, 6 steps
    _train(cfg, "ref", 2, tmp_path / "ref.log")
    ref_loss = _losses(runs / "ref")
    assert sorted(ref_loss) == [1, 2, 3, 4, 5, 6] and _meta(ckpt("ref", 2))["world_size"] == 2

    # 2. 2 -> 1
    _convert_all(tmp_path, [ckpt("ref", 2)])
    _train(cfg, "one", 1, tmp_path / "one.log", "--train.micro_batch=4", "--train.stop_after=4",
           "--checkpoint.universal=true", f"--checkpoint.load={ckpt('ref', 2)}")
    one_loss = _losses(runs / "one")
    assert sorted(one_loss) == [3, 4], one_loss
    for step in (3, 4):
        assert one_loss[step] == pytest.approx(ref_loss[step], rel=1e-5, abs=1e-6), (step, ref_loss, one_loss)
    s4, r4 = ckpt("one", 4), ckpt("ref", 4)
    assert _meta(s4)["world_size"] == 1
    assert _meta(s4)["loader"] == _meta(r4)["loader"], "data position differs after 2 -> 1 ranks"
    assert _meta(s4)["tokens_seen"] == _meta(r4)["tokens_seen"]
    _convert_all(tmp_path, [s4, r4])
    ref_state, one_state = _universal_tensors(r4), _universal_tensors(s4)
    kinds = {k.split("/")[1] for k in ref_state}
    assert {"fp32", "exp_avg", "exp_avg_sq"} <= kinds, sorted(kinds)
    assert ref_state.keys() == one_state.keys()
    for k in ref_state:
        torch.testing.assert_close(one_state[k], ref_state[k], rtol=1e-5, atol=1e-7, msg=lambda m: f"{k}: {m}")

    # 3. 1 -> 2
    _train(cfg, "two", 2, tmp_path / "two.log", "--checkpoint.universal=true", f"--checkpoint.load={s4}")
    two_loss = _losses(runs / "two")
    assert sorted(two_loss) == [5, 6], two_loss
    for step in (5, 6):
        assert two_loss[step] == pytest.approx(ref_loss[step], rel=1e-5, abs=1e-6), (step, ref_loss, two_loss)
    assert _meta(ckpt("two", 6))["loader"] == _meta(ckpt("ref", 6))["loader"]

    # 4. consolidate R@4: one safetensors file == the checkpoint's weights
    from safetensors.torch import load_file

    _megapt(tmp_path / "cons.log", "ckpt", "consolidate", str(r4), "--out", str(tmp_path / "cons_r4"))
    files = sorted(p.name for p in (tmp_path / "cons_r4").glob("*.safetensors"))
    assert files == ["model.safetensors"], files
    weights = load_file(str(tmp_path / "cons_r4" / "model.safetensors"))
    fp32 = {k.split("/")[0]: v for k, v in ref_state.items() if k.endswith("/fp32")}
    assert set(fp32) <= set(weights), sorted(set(fp32) - set(weights))
    for name, t in fp32.items():
        assert torch.equal(weights[name].float(), t.float().reshape(weights[name].shape)), name
