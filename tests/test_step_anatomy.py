"""benchmarks/step_anatomy.py: its kernel bookkeeping, its variants, and a run on the tiny model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_path = Path(__file__).parents[1] / "benchmarks" / "step_anatomy.py"
_spec = importlib.util.spec_from_file_location("step_anatomy", _path)
anat = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(anat)


@pytest.mark.parametrize("name,kind", [
    ("nvjet_sm90_tst_128x8_64x12_4x1_v_bz_TNT", "gemm"),
    ("void cutlass::Kernel2<cutlass_80_simt_sgemm_64x64_8x5_tn_align1>", "gemm"),
    ("triton_tem_fused_mm_t_view_15", "gemm"),
    ("triton_tem_fused_flex_attention_view_3", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm80_flash_fprop_wmma_f16", "attention"),
    ("triton_poi_fused__scaled_dot_product_cudnn_attention__unsafe_view_clone_expand", "attention"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda", "copy"),
    ("void at::native::index_copy_kernel_impl", "copy"),
    ("triton_red_fused_add_mean_mul_pow_rsqrt_0", "fused"),
    ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<mul>>", "other"),
])
def test_kernel_kinds(name, kind):
    assert anat.kind_of(name) == kind


def test_anatomy_counts_per_step_and_idle_time():
    kernels = [("nvjet_gemm", 0.0, 10.0), ("fmha_attention", 12.0, 4.0), ("triton_poi_fused_x", 14.0, 4.0),
               ("nvjet_gemm", 30.0, 10.0)]  # two steps; 14-16 overlaps; idle 10-12 and 18-30
    a = anat.anatomy(kernels, steps=2)
    assert a["kernels"] == 2 and a["sum_us"] == 14.0
    assert a["kinds"]["gemm"] == {"count": 1.0, "us": 10.0} and a["kinds"]["attention"]["us"] == 2.0
    assert a["busy_us"] == 13.0 and a["span_us"] == 20.0  # (10 + 6 + 10) / 2 and 40 / 2
    top = anat.top_kernels(kernels, steps=2, n=1)
    assert top == [("nvjet_gemm", 1.0, 10.0)]


def test_variants_filter():
    class A:
        compile, lora, autocast, stock_attention, sdpa_steps, cublas = "both", True, True, True, True, True
        variants = "eager*,compiled train?*merged,compiled eval + cu*,compiled eval + sdpa*"

    names = [v["name"] for v in anat.variants(A)]
    assert names == ["eager train", "eager eval", "eager train + adapters off", "eager train + adapters merged",
                     "eager train + per-call casts", "eager eval + transformers' attention", "eager train + cuBLAS",
                     "eager eval + cuBLAS", "compiled train + adapters merged", "compiled eval + sdpa's kernel",
                     "compiled eval + cuBLAS"]  # sdpa's kernel: compiled steps only
    assert anat.kind_of("skinny_kernel") == anat.kind_of("shrink_kernel") == "gemm"
    assert anat.kind_of("triton_red_fused_add_mean_native_dropout_rsqrt_skinny_linear_view_9") == "fused"


def test_runs_on_the_tiny_model(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["step_anatomy.py"])
    out = tmp_path / "tiny.json"
    rows = anat.main(["--shape", "tiny", "--latent_size", "2", "--compile", "off", "--stock_attention", "--lora",
                      "--probe_iters", "1", "--variants", "eager eval*,eager train + adapters off",
                      "--question_tokens", "8", "--answer_tokens", "4", "--out", str(out)])
    assert [r["variant"] for r in rows] == ["eager eval", "eager train + adapters off",
                                            "eager eval + transformers' attention"]
    assert all(r["step_ms"] > 0 and r["profiled_kernels"] == 0 for r in rows)  # a CPU: no CUDA kernels
    assert rows[-1]["attention"] == "sdpa" and rows[-1]["diff"] < 1e-4  # fp32: transformers' path, the same latents
    assert "no CUDA kernels" in out.with_suffix(".md").read_text()
