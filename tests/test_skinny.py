"""lcot.fast.skinny: the step's linear layers as one Triton kernel each, run here by Triton's CPU interpreter in
fp32 against torch's and peft's layers; the kernel copy of the language model (the model's own layers untouched),
its fallbacks, and its place in a runner's graphed step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
peft = pytest.importorskip("peft")

from lcot.core.model import latent_hidden_states  # noqa: E402
from lcot.fast import Runner, skinny  # noqa: E402

TOL = {"atol": 2e-5, "rtol": 1e-5}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU model through Triton's interpreter; on a "
                              "GPU test_graphed_cuda_steps covers it")


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """The kernel on the CPU: Triton's interpreter (conftest sets TRITON_INTERPRET=1 before triton's import)."""
    if not torch.cuda.is_available():
        assert skinny.interpreting()
    monkeypatch.setattr(skinny, "PLAIN_MIN_OUTPUTS", 0)  # the tiny model's layers are all small


@pytest.fixture
def calls(monkeypatch):
    """Count the kernel's launches."""
    from lcot.fast import skinny_kernel

    count = {"n": 0}
    real = skinny_kernel.launch

    def launch(*args, **kwargs):
        count["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(skinny_kernel, "launch", launch)
    return count


@pytest.mark.parametrize("rows,n,k,r,bias", [(1, 40, 96, 0, False), (2, 33, 300, 8, True), (5, 64, 512, 16, False),
                                             (16, 100, 250, 24, True), (2, 20, 5000, 4, False)])
def test_kernel_equals_torch_in_fp32(rows, n, k, r, bias, calls):
    """One layer, with an adapter of rank r (0: none) whose input differs from the base's (as after dropout); K
    over one or more tiles and shrink slices (5000: 20 slices of 256 columns, two tiles each)."""
    g = torch.Generator().manual_seed(rows + n)
    x, w = torch.randn(rows, k, generator=g).to(DEVICE), torch.randn(n, k, generator=g).to(DEVICE) / k ** 0.5
    b = torch.randn(n, generator=g).to(DEVICE) if bias else None
    xa, a, u = (torch.randn(*shape, generator=g).to(DEVICE) / shape[1] ** 0.5
                for shape in ((rows, k), (max(r, 1), k), (n, max(r, 1))))  # outputs of order 1, as in a model
    with torch.no_grad():
        got = skinny.skinny_linear(x, w, b, xa, a, u, scale=0.5) if r else skinny.skinny_linear(x, w, b)
    want = F.linear(x, w, b) + (0.5 * (xa @ a.T) @ u.T if r else 0)
    assert calls["n"] == 1
    assert got.shape == (rows, n) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.gpu  # the 7B projections
@pytest.mark.parametrize("n,k", [(3584, 3584), (512, 3584), (18944, 3584), (3584, 18944)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_on_the_7b_projections(n, k, dtype):
    """The tiles chosen for the 7B shapes run (fp32's fit in shared memory), with an adapter of rank 16: fp32 to
    rounding; bf16 no further from the fp32 product than cuBLAS's bf16 products are."""
    g = torch.Generator(device="cuda").manual_seed(n + k)
    x, w = torch.randn(2, k, device="cuda", generator=g), torch.randn(n, k, device="cuda", generator=g) / k ** 0.5
    a, u = torch.randn(16, k, device="cuda", generator=g) / k ** 0.5, torch.randn(n, 16, device="cuda", generator=g)
    h = [v.to(dtype) for v in (x, w, a, u)]
    want = F.linear(h[0].float(), h[1].float()) + 0.5 * F.linear(F.linear(h[0].float(), h[2].float()), h[3].float())
    got = skinny.skinny_linear(h[0], h[1], None, h[0], h[2], h[3], 0.5).float()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    else:
        cublas = (F.linear(h[0], h[1]) + 0.5 * F.linear(F.linear(h[0], h[2]), h[3])).float()
        assert (got - want).abs().max() <= 1.5 * (cublas - want).abs().max()


def test_the_tile_height_is_the_row_limit():
    from lcot.fast import skinny_kernel

    assert skinny_kernel.BM == skinny.MAX_ROWS


def test_tiles_fit_shared_memory():
    """fp32 tiles hold as many bytes as bf16's (a (32, 256) bf16 tile in 6 stages, in fp32, asked 240 KiB of an
    H100's 227)."""
    for n, k in ((3584, 3584), (512, 3584), (18944, 3584), (3584, 18944), (2048, 11008)):
        bn, bk, _, stages = skinny.config(n, k, 2)
        assert skinny.config(n, k, 4) == (bn, bk // 2, 4, stages)
        assert (bn + 16) * bk * 2 * stages <= 160 * 1024


def test_kernel_reads_a_strided_bias_and_wants_both_adapter_products():
    x, w = torch.randn(2, 64, device=DEVICE), torch.randn(48, 64, device=DEVICE) / 8
    bias = torch.randn(96, device=DEVICE)[::2]  # not contiguous
    torch.testing.assert_close(skinny.skinny_linear(x, w, bias), F.linear(x, w, bias), **TOL)
    with pytest.raises(ValueError, match="both its products"):
        skinny.skinny_linear(x, w, None, x, torch.randn(4, 64, device=DEVICE))


def test_kernel_keeps_leading_dims_and_refuses_many_rows():
    x, w = torch.randn(2, 1, 64, device=DEVICE), torch.randn(48, 64, device=DEVICE)
    torch.testing.assert_close(skinny.skinny_linear(x, w), F.linear(x, w), **TOL)
    assert skinny.skinny_linear(x, w).shape == (2, 1, 48)
    with pytest.raises(ValueError, match="at most 16 rows"):
        skinny.skinny_linear(torch.randn(17, 64, device=DEVICE), w)


@cpu_only
def test_applies_only_without_gradients_to_few_rows_of_one_dtype(monkeypatch):
    w = torch.randn(8, 32)
    with torch.no_grad():
        assert skinny.applies(torch.randn(2, 1, 32), w)
        assert not skinny.applies(torch.randn(17, 32), w)
        assert not skinny.applies(torch.randn(2, 32, dtype=torch.bfloat16), w)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # F.linear would cast: leave it the call
            assert not skinny.applies(torch.randn(2, 32), w)
    assert not skinny.applies(torch.randn(2, 32), w)  # gradients on
    cpu = torch.device("cpu")
    assert skinny.runs_on(cpu, interpret=True) and not skinny.runs_on(cpu)  # a runner's default leaves the CPU alone


@pytest.fixture(scope="module")
def lora32(tiny_dir, records):
    """An fp32 tiny model with LoRA on some projections (non-zero B, no dropout), and a stage2 batch."""
    from conftest import lora_tiny

    return lora_tiny(tiny_dir, records, torch.float32)


def _step_layers(model):
    lm = model.model.language_model
    lora = [m for m in lm.modules() if hasattr(m, "lora_A")]
    plain = [m for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear) and ".lora_" not in n
             and not n.endswith("base_layer")]
    return lora, plain


@cpu_only
def test_the_kernel_copy_runs_every_projection_and_leaves_the_model_alone(lora32, calls):
    model, _ = lora32
    lm = model.model.language_model
    lora, plain = _step_layers(model)
    layers = model.config.text_config.num_hidden_layers
    assert len(lora) == 4 * layers and len(plain) == 3 * layers  # q, v, gate, down adapted; k, o, up plain
    classes = {id(m): type(m) for m in lm.modules()}
    copy = skinny.step_copy(lm)
    mirrored = dict(zip([id(m) for m in lm.modules()], copy.modules()))
    x = torch.randn(2, 1, model.config.text_config.hidden_size)
    with torch.no_grad():
        want = [m(x) for m in lora[:2] + plain[:2]]
        assert calls["n"] == 0  # the model's own layers: torch's and peft's products
        got = [mirrored[id(m)](x) for m in lora[:2] + plain[:2]]
    assert calls["n"] == 4  # one kernel per layer, the adapter's expand product folded in
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)
    assert {id(m): type(m) for m in lm.modules()} == classes and not any("forward" in m.__dict__ for m in lm.modules())
    for m in lora[:2] + plain[:2]:  # the copy shares the tensors, so training updates reach it
        twin = mirrored[id(m)]
        assert twin is not m and type(twin).__name__.startswith("Skinny")
        assert all(p is q for p, q in zip(m.parameters(), twin.parameters()))
    assert len(list(copy.parameters())) == len(list(lm.parameters()))
    key = skinny.copy_key(lm)  # the containers' flags are copies: a runner rebuilds the copy when they change
    flags = [(m, m.training) for m in lm.modules()]
    model.train()
    assert skinny.copy_key(lm) != key
    for m, training in flags:
        m.training = training
    assert skinny.copy_key(lm) == key


@cpu_only
def test_fp32_adapters_without_autocast_stay_with_peft(tiny_dir, records, calls, monkeypatch):
    """fp32 adapters on a bf16 model and no autocast: peft computes the adapter in fp32; the kernel would not.
    (Plain weights are left to cuBLAS here, so that peft's base product does not count.)"""
    from conftest import lora_tiny

    monkeypatch.setattr(skinny, "PLAIN_MIN_OUTPUTS", 1 << 30)

    model, _ = lora_tiny(tiny_dir, records, torch.bfloat16, "q_proj")
    layer = _step_layers(model)[0][0]
    x = torch.randn(2, 1, layer.in_features, dtype=torch.bfloat16)
    twin = dict(zip(map(id, model.model.language_model.modules()),
                    skinny.step_copy(model.model.language_model).modules()))[id(layer)]
    with torch.no_grad():
        twin(x)
        assert calls["n"] == 0
        for p in layer.lora_A.parameters():
            p.data = p.data.bfloat16()  # adapters in the model's dtype: the kernel
        twin(x)
    assert calls["n"] == 1


@cpu_only
def test_small_plain_weights_stay_with_cublas(lora32, calls, monkeypatch):
    model, _ = lora32
    lora, plain = _step_layers(model)
    monkeypatch.setattr(skinny, "PLAIN_MIN_OUTPUTS", plain[0].out_features + 1)
    x = torch.randn(2, 1, model.config.text_config.hidden_size)
    twin = _twins(model)
    with torch.no_grad():
        twin[id(plain[0])](x)
        assert calls["n"] == 0
        twin[id(lora[0])](x)
        assert calls["n"] == 1  # an adapted layer of any size folds its adapter in


@cpu_only
def test_lora_forward_falls_back_to_peft(lora32, calls):
    model, _ = lora32
    layer = _step_layers(model)[0][0]
    twin = _twins(model)[id(layer)]
    x = torch.randn(2, 1, model.config.text_config.hidden_size)
    with torch.no_grad():
        want = layer(x)
        layer.enable_adapters(False)
        try:
            plain = layer(x)
            torch.testing.assert_close(twin(x), plain, **TOL)  # adapters off (seen by the copy): peft's forward
        finally:
            layer.enable_adapters(True)
        assert calls["n"] == 0 and (want - plain).abs().max() > 1e-3
        torch.testing.assert_close(twin(x), want, **TOL)  # on again: the kernel, the adapter folded in
        assert calls["n"] == 1
        twin(torch.randn(20, model.config.text_config.hidden_size))  # too many rows: peft's forward
    assert calls["n"] == 1


def _twins(model) -> dict:
    """{id(layer): its kernel copy} over the language model's modules."""
    lm = model.model.language_model
    return dict(zip(map(id, lm.modules()), skinny.step_copy(lm).modules()))


@cpu_only
def test_graphed_steps_use_the_kernels_and_match_the_reference(lora32, calls):
    """The (fake, CPU) graphed chain captures its step with the kernels and gives the reference's latents; a runner
    with kernels=False captures torch's products."""
    from test_fast import fake_runner

    model, batch = lora32
    with torch.no_grad():
        want = latent_hidden_states(model.eval(), batch, grad="truncated", runner=Runner(model, fast="off"))[1]
        got = latent_hidden_states(model, batch, grad="truncated", runner=fake_runner(model, kernels="interpret"))[1]
        assert calls["n"] > 0
        torch.testing.assert_close(got, want, **TOL)
        before = calls["n"]
        plain = fake_runner(model, kernels=False)
        torch.testing.assert_close(latent_hidden_states(model, batch, grad="truncated", runner=plain)[1], want, **TOL)
        assert calls["n"] == before


@cpu_only
def test_a_failing_kernel_falls_back_to_torch_with_a_warning(lora32, monkeypatch):
    from test_fast import fake_runner

    from lcot.fast import skinny_kernel

    model, batch = lora32

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel today")

    monkeypatch.setattr(skinny_kernel, "launch", broken)
    runner = fake_runner(model, kernels="interpret")
    with torch.no_grad():
        want = latent_hidden_states(model.eval(), batch, grad="truncated", runner=Runner(model, fast="off"))[1]
        with pytest.warns(RuntimeWarning, match="skinny's kernels failed"):
            got = latent_hidden_states(model, batch, grad="truncated", runner=runner)[1]
    torch.testing.assert_close(got, want, **TOL)
    assert runner.kernels_failed and "no kernel today" in runner.kernel_errors[0]
    assert not runner.kernels_active(model)
    assert fake_runner(model, kernels="interpret").kernels_active(model)  # the failure is this runner's alone


@cpu_only
def test_a_failure_that_is_not_the_kernels_is_not_blamed_on_them(lora32):
    """A capture that fails with torch's products too: reported once as a failed capture, the kernels stay on."""
    from test_fast import fake_runner

    model, batch = lora32

    def broken(step, rewind, device):
        raise RuntimeError("no graphs today")

    runner = fake_runner(model, kernels="interpret")
    runner.capture = broken
    with torch.no_grad():
        want = latent_hidden_states(model.eval(), batch, grad="truncated", runner=Runner(model, fast="off"))[1]
        with pytest.warns(RuntimeWarning, match="CUDA graph capture failed") as seen:
            got = latent_hidden_states(model, batch, grad="truncated", runner=runner)[1]
    torch.testing.assert_close(got, want, **TOL)
    assert not any("skinny" in str(w.message) for w in seen)
    assert runner.kernel_errors == [] and runner.capture_errors == ["RuntimeError: no graphs today"]
    assert runner.kernels_active(model)


@cpu_only
def test_graphs_know_whether_they_hold_the_kernels(lora32):
    model, _ = lora32
    on, off = Runner(model, kernels="interpret"), Runner(model, kernels=False)
    assert on.forward_state(model) != off.forward_state(model)  # a graph captured with the kernels is not replayed


@pytest.mark.gpu  # CUDA graphs
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_cuda_steps(tiny_dir, records, calls, monkeypatch, dtype):
    """On a GPU: the tiny model with LoRA, its chain captured in a real CUDA graph with the kernels, against
    cuBLAS's products (fp32: to rounding; bf16: the first latents, before a random recurrence amplifies rounding)."""
    from conftest import lora_tiny

    model, batch = lora_tiny(tiny_dir, records, dtype, "q_proj|down_proj", "cuda")
    model.eval()
    with torch.no_grad():
        got = latent_hidden_states(model, batch, grad="truncated", runner=Runner(model, fast="graph"))[1]
        assert calls["n"] > 0
        want = latent_hidden_states(model, batch, grad="truncated",
                                    runner=Runner(model, fast="graph", kernels=False))[1]
    tol = TOL if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.05}
    torch.testing.assert_close(got[:, :1].float(), want[:, :1].float(), **tol)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, **TOL)
