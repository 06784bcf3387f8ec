"""On a GPU: the model trained in bf16 on megapt's Triton kernels follows the sdpa/eager loss curve.

Same script (tests/unit/kernels/training_curve.py) as the CPU test, which runs it at fp32
through the interpreter, here at a real size under bf16 autocast. bf16 rounding differs between the two
paths at every step, so the curves agree within a few percent rather than bit for bit; the
tolerance is a first estimate that has not been run on a GPU yet.
"""

import pytest

pytestmark = pytest.mark.gpu


@pytest.mark.timeout(600)
def test_bf16_training_on_triton_kernels_follows_the_reference_loss_curve():
    from tests.unit.kernels.training_curve import check_curves, run_curves

    curves = run_curves(
        "cuda", "bfloat16", steps=60, T=1024, B=4, V=8192, shape="512,4,8,2", timeout=580
    )
    check_curves(curves, rtol=0.03, min_drop=1.0)
