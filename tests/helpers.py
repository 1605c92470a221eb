"""Shared test helpers: per-dtype tolerances and comparison against a float64 reference."""

import torch

# Tolerances of a fused kernel against the float64 reference, per dtype: (atol, rtol), atol relative to the
# reference's largest magnitude (gradients such as dW grow with the number of rows).
TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 4e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def assert_close_ref(out: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, name: str, torch_out=None):
    """``out`` (computed in ``dtype``) must match the float64 reference ``ref64`` within the dtype's tolerance, and,
    when ``torch_out`` (torch's own result in ``dtype``) is given, its max error may be at most twice torch's plus a
    rounding floor (FlashAttention's oracle)."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    assert not out.isnan().any(), f"{name}: NaN in output (unwritten element or bad math)"
    atol, rtol = TOL[dtype]
    scale = max(ref64.abs().max().item(), 1.0) if ref64.numel() else 1.0
    torch.testing.assert_close(out.double(), ref64, atol=atol * scale, rtol=rtol, msg=lambda m: f"{name}: {m}")
    if torch_out is not None and ref64.numel():
        err = (out.double() - ref64).abs().max().item()
        torch_err = (torch_out.double() - ref64).abs().max().item()
        floor = torch.finfo(dtype).eps * scale
        assert err <= 2 * torch_err + floor, f"{name}: error {err:.3g} > 2 x torch's {torch_err:.3g} + {floor:.3g}"
