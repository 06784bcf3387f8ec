"""The model trained on the Triton kernels follows the same loss curve as on sdpa/eager.

Forward and gradient agreement (test_model_ops, the per-kernel tests) does not show that small
differences stay small over many optimizer steps. Here a micro GPT is trained with AdamW for
some steps on a fixed batch stream, once with every op on megapt's Triton kernels (attention,
RMSNorm, RoPE, fused linear+CE) and once on sdpa/eager/chunked, from the same initial weights;
the two loss curves must agree step by step. On CPU the kernels run through TRITON_INTERPRET=1
(fp32); tests/gpu runs the same at bf16 on a real GPU.
"""

import pytest

from tests.unit.kernels.training_curve import check_curves, run_curves


@pytest.mark.timeout(300)
def test_training_on_triton_kernels_follows_the_reference_loss_curve_fp32_interpreter():
    pytest.importorskip("triton")
    from megapt.kernels._common import interpreter_problem

    if interpreter_problem():
        pytest.skip(interpreter_problem())
    # measured: the two curves agree to 2e-7 relative over 8 steps (3.89 -> 3.11)
    curves = run_curves("cpu", "float32", steps=8, T=24, B=2, V=48, shape="32,2,2,1", timeout=280)
    check_curves(curves, rtol=1e-4, min_drop=0.5)
