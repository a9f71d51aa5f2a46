"""Multi-adapter kernels (``KernelSpec.multi``) against a float64 per-adapter reference.

The reference regenerates each adapter's mask with ``keep_mask(seed_i, p_i, count_i, K)``
over its own rows, so kernel and reference use the same masks. Runs in the Triton
interpreter on CPU (small shapes, one large tile configuration).
"""

import pytest
import torch

from lorafusion_compiler.codegen import kernels as K
from lorafusion_compiler.ops.multi_routing import ROUTING_BLOCK_MS, multi_routing, unpack_routing
from lorafusion_compiler.ops.dropout_mask import keep_mask
from lorafusion_compiler.ops.multi_lora_linear import multi_lora_linear, unpack_grads


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def reference(x, w, bias, lora_a, lora_b, scales, ps, rows, seeds, dy):
    """float64 (y, S, dX, [dA_i], [dB_i]) looping over adapters on their own rows."""
    x, dy = x.double(), dy.double()
    n_out = lora_b[0].shape[0]
    y = x @ w.double().T if w is not None else x.new_zeros(x.shape[0], n_out)
    if bias is not None:
        y = y + bias.double()
    dx = dy @ w.double() if w is not None else torch.zeros_like(x)
    s_all = x.new_zeros(x.shape[0], max(a.shape[0] for a in lora_a))
    d_a, d_b = [], []
    for i, (a, b) in enumerate(zip(lora_a, lora_b)):
        start, count = rows[i].tolist()
        r = slice(start, start + count)
        mask = keep_mask(seeds[i : i + 1], ps[i], count, x.shape[1]).double() / (1 - ps[i])
        xt = x[r] * mask
        s = xt @ a.double().T
        s_all[r, : a.shape[0]] = s
        y[r] += scales[i] * s @ b.double().T
        ds = scales[i] * dy[r] @ b.double()
        d_b.append(scales[i] * dy[r].T @ s)
        d_a.append(ds.T @ xt)
        dx[r] += (ds @ a.double()) * mask
    return y, s_all, dx, d_a, d_b


def multi_backward(dy, x, w, la, lb, *args, **kw):
    """K.multi_backward with its packed gradients unpacked into per-adapter views."""
    d_x, d_a, d_b = K.multi_backward(dy, x, w, la, lb, *args, **kw)
    return d_x, unpack_grads(d_a, la), unpack_grads(d_b, lb)


def _problem(m, k, n, ranks, starts, counts, ps, dtype, *, weight=True, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype) if weight else None
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    lora_a = [torch.randn(r, k, generator=g) / k**0.5 for r in ranks]
    lora_b = [torch.randn(n, r, generator=g) / r**0.5 for r in ranks]
    scales = [0.5 + i for i in range(len(ranks))]
    rows = torch.tensor(list(zip(starts, counts)), dtype=torch.int64)
    seeds = torch.randint(0, 2**62, (len(ranks),), generator=g, dtype=torch.int64)
    dy = torch.randn(m, n, generator=g).to(dtype)
    return x, w, b, lora_a, lora_b, scales, list(ps), rows, seeds, dy


CASES = [
    # m, k, n, ranks, starts, counts, ps, dtype, weight, bias, tol
    (200, 96, 80, (5, 24, 1, 16), (3, 40, 0, 150), (37, 70, 0, 1), (0.25, 0.0, 0.25, 0.25), torch.float32, True, True, 1e-5),
    (150, 61, 45, (1, 24, 5), (0, 37, 110), (37, 70, 1), (0.0, 0.0, 0.0), torch.float32, True, False, 1e-5),
    (129, 64, 72, (24, 5, 1), (1, 38, 128), (37, 70, 1), (0.25, 0.25, 0.0), torch.float32, False, False, 1e-5),
    (200, 96, 80, (5, 24, 1, 16), (3, 40, 0, 150), (37, 70, 0, 1), (0.25, 0.0, 0.25, 0.25), torch.float16, True, True, 3e-3),
    # every rank and K a multiple of 8: the adapters_aligned specialisation (vector-load hints)
    (200, 96, 80, (8, 24, 16), (3, 40, 150), (37, 70, 50), (0.25, 0.0, 0.25), torch.float32, True, True, 1e-5),
    # one adapter, one column block: its dA is split over programs that add atomically
    (150, 64, 40, (24,), (10,), (130,), (0.25,), torch.float32, True, False, 1e-5),
]


@pytest.mark.parametrize("case", CASES, ids=["f32-bias-p", "f32-oddK-p0", "f32-noW-p", "f16-bias-p", "f32-aligned-p", "f32-one-adapter-split-dA"])
def test_multi_kernels_match_float64(case, device):
    m, k, n, ranks, starts, counts, ps, dtype, weight, bias, tol = case
    x, w, b, la, lb, scales, ps, rows, seeds, dy = _problem(m, k, n, ranks, starts, counts, ps, dtype, weight=weight, bias=bias)
    mv = lambda t: None if t is None else t.to(device)
    x, w, b, dy, rows, seeds = map(mv, (x, w, b, dy, rows, seeds))
    la, lb = [a.to(device) for a in la], [t.to(device) for t in lb]
    y, s_act = K.multi_forward(x, w, b, la, lb, scales, ps, rows, seeds, torch.float32)
    d_x, d_a, d_b = multi_backward(dy, x, w, la, lb, s_act, seeds, rows, scales, ps, True)
    yr, sr, dxr, dar, dbr = reference(*(t.cpu() if isinstance(t, torch.Tensor) else t for t in (x, w, b)),
                                      [a.cpu() for a in la], [t.cpu() for t in lb], scales, ps, rows.cpu(), seeds.cpu(), dy.cpu())
    assert _rel(y.cpu(), yr) <= tol
    for i, r in enumerate(ranks):  # S: the adapter's r_i columns on its rows
        st, c = starts[i], counts[i]
        if c:
            assert _rel(s_act[st : st + c, :r].cpu(), sr[st : st + c, :r]) <= tol
    owned = torch.zeros(m, dtype=torch.bool)
    for st, c in zip(starts, counts):
        owned[st : st + c] = True
    assert (s_act.cpu()[~owned] == 0).all()  # rows of no adapter: S = 0 (written by the kernel)
    assert _rel(d_x.cpu(), dxr) <= tol
    for i in range(len(ranks)):
        assert d_a[i].shape == la[i].shape and d_b[i].shape == lb[i].shape
        if counts[i] == 0:
            assert d_a[i].abs().sum() == 0 and d_b[i].abs().sum() == 0
        else:
            assert _rel(d_a[i].cpu(), dar[i]) <= tol, f"dA {i}"
            assert _rel(d_b[i].cpu(), dbr[i]) <= tol, f"dB {i}"


@pytest.mark.parametrize("split", [1, 5, 1000])  # one chunk; chunks of t/5 pieces; one piece each
def test_multi_da_chunks_of_any_size(split, device, monkeypatch):
    """dA with the piece table cut into chunks of every size (one piece per chunk .. one chunk):
    runs of an adapter cut at chunk boundaries, chunks starting on gap pieces, empty adapters."""
    from lorafusion_compiler.codegen import multi as multi_module

    monkeypatch.setattr(multi_module, "_split", lambda blocks, other, dev, cfg: min(split, blocks))
    x, w, b, la, lb, scales, ps, rows, seeds, dy = _problem(
        200, 64, 40, (5, 24, 1, 16), (3, 40, 0, 150), (37, 70, 0, 50), (0.25, 0.0, 0.25, 0.25), torch.float32)
    x, w, dy, rows, seeds = (t.to(device) for t in (x, w, dy, rows, seeds))
    la, lb = [a.to(device) for a in la], [t.to(device) for t in lb]
    _, s_act = K.multi_forward(x, w, None, la, lb, scales, ps, rows, seeds, torch.float32)
    _, d_a, _ = multi_backward(dy, x, w, la, lb, s_act, seeds, rows, scales, ps, False)
    _, _, _, dar, _ = reference(x.cpu(), w.cpu(), None, [a.cpu() for a in la], [t.cpu() for t in lb], scales, ps,
                                rows.cpu(), seeds.cpu(), dy.cpu())
    assert d_a[2].abs().sum() == 0  # the adapter without rows
    assert max(_rel(d_a[i].cpu(), dar[i]) for i in (0, 1, 3)) <= 1e-5


def test_multi_da_one_chunk_writes_every_element(device, monkeypatch):
    """With one chunk (one program per adapter and column block) dA is stored in the adapters' dtype
    into an unfilled buffer: every element must be written, zeros for the adapter without rows.
    Uninitialised float buffers are NaN-filled here, so an element left unwritten shows."""
    from lorafusion_compiler.codegen import multi as multi_module

    monkeypatch.setattr(multi_module, "_split", lambda blocks, other, dev, cfg: 1)
    empty = torch.empty

    def nan_empty(*shape, dtype=None, device=None, **kw):
        t = empty(*shape, dtype=dtype, device=device, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    x, w, b, la, lb, scales, ps, rows, seeds, dy = _problem(
        200, 64, 40, (5, 24, 1, 16), (3, 40, 0, 150), (37, 70, 0, 50), (0.25, 0.0, 0.25, 0.25), torch.float16)
    x, w, dy, rows, seeds = (t.to(device) for t in (x, w, dy, rows, seeds))
    la, lb = [a.to(device, torch.float16) for a in la], [t.to(device, torch.float16) for t in lb]
    _, s_act = K.multi_forward(x, w, None, la, lb, scales, ps, rows, seeds, torch.float16)
    monkeypatch.setattr(torch, "empty", nan_empty)
    _, packed_a, _ = K.multi_backward(dy, x, w, la, lb, s_act, seeds, rows, scales, ps, False)
    monkeypatch.setattr(torch, "empty", empty)
    assert packed_a.dtype == torch.float16  # stored directly, no fp32 buffer and cast
    d_a = unpack_grads(packed_a, la)
    _, _, _, dar, _ = reference(x.cpu().float(), w.cpu().float(), None, [a.cpu().float() for a in la],
                                [t.cpu().float() for t in lb], scales, ps, rows.cpu(), seeds.cpu(), dy.cpu().float())
    assert not packed_a.isnan().any()
    assert d_a[2].abs().sum() == 0  # the adapter without rows
    assert max(_rel(d_a[i].cpu().float(), dar[i]) for i in (0, 1, 3)) <= 3e-3


def test_multi_deterministic_is_bitwise_repeatable(device):
    x, w, b, la, lb, scales, ps, rows, seeds, dy = _problem(
        170, 64, 48, (5, 24, 1), (0, 37, 120), (37, 70, 50), (0.25, 0.0, 0.25), torch.float32)
    x, w, dy, rows, seeds = (t.to(device) for t in (x, w, dy, rows, seeds))
    la, lb = [a.to(device) for a in la], [t.to(device) for t in lb]
    y, s_act = K.multi_forward(x, w, None, la, lb, scales, ps, rows, seeds, torch.float32)
    runs = [multi_backward(dy, x, w, la, lb, s_act, seeds, rows, scales, ps, True, deterministic=True) for _ in range(2)]
    (dx0, da0, db0), (dx1, da1, db1) = runs
    assert torch.equal(dx0, dx1)
    assert all(torch.equal(p, q) for p, q in zip(da0 + db0, da1 + db1))
    _, _, dxr, dar, dbr = reference(x.cpu(), w.cpu(), None, [a.cpu() for a in la], [t.cpu() for t in lb], scales, ps,
                                    rows.cpu(), seeds.cpu(), dy.cpu())
    assert max(_rel(p.cpu(), q) for p, q in zip(da0 + db0, dar + dbr)) <= 1e-5


@pytest.mark.parametrize("block_m", ROUTING_BLOCK_MS)
@pytest.mark.parametrize("rows, m", [
    ([[5, 0], [3, 40], [43, 1], [100, 60], [70, 0]], 170),   # gaps, empty adapters, a 1-row adapter
    ([[0, 300], [300, 212]], 512),                           # ranges on block boundaries, no gaps
    ([[600, 1], [2, 7], [9, 500]], 601),                     # ranges out of order
])
def test_piece_tables_split_at_blocks_and_ranges(rows, m, block_m):
    """Every row lies in exactly one piece; a piece stays in one row block and one adapter; the
    block index and the spans point at the right pieces; the table length is cdiv(M, BLOCK_M) + 2n."""
    rows = torch.tensor(rows, dtype=torch.int64)
    n, bm = rows.shape[0], block_m
    pieces, blk, spans = unpack_routing(multi_routing(rows, torch.empty(m, 1)), m, n, bm)
    assert pieces.shape[0] == -(-m // bm) + 2 * n
    owner = torch.full((m,), -1)
    for i, (s, c) in enumerate(rows.tolist()):
        owner[s : s + c] = i
    covered = torch.zeros(m, dtype=torch.int64)
    for lo, hi, ad, seg0 in pieces.tolist():
        assert 0 <= hi - lo <= bm and (lo // bm == (hi - 1) // bm or hi == lo)
        covered[lo:hi] += 1
        if hi > lo:
            assert (owner[lo:hi] == ad).all()
            if ad >= 0:
                assert seg0 == rows[ad, 0]
    assert (covered == 1).all()
    for i, (s, c) in enumerate(rows.tolist()):  # spans: first/last piece of each adapter
        mine = [j for j, piece in enumerate(pieces.tolist()) if piece[2] == i]
        assert spans[i].tolist() == ([mine[0], mine[-1]] if c else [pieces.shape[0], -1])
    assert blk.shape[0] == -(-m // bm) + 1
    for b in range(blk.shape[0] - 1):  # block b's pieces are exactly the non-empty ones starting in it
        starting = [j for j, (lo, hi, _, _) in enumerate(pieces.tolist()) if b * bm <= lo < (b + 1) * bm and hi > lo]
        assert all(blk[b] <= j < blk[b + 1] for j in starting)
        assert all(pieces[j, 0] >= b * bm for j in range(blk[b], blk[b + 1]))


def test_every_tile_config_has_a_routing_table():
    from lorafusion_compiler.codegen.autotune import _configs

    for kernel in ("shrink", "base_expand", "ds_db", "da", "dx"):
        for rb in (16, 32, 64, 128, 256):
            assert {c["BLOCK_M"] for c in _configs(kernel, rb)} <= set(ROUTING_BLOCK_MS), (kernel, rb)


def test_packed_routing_fake_size_and_bad_inputs():
    """multi_routing's fake (meta) result has the real size; unpacking names a wrong block or size."""
    rows = torch.tensor([[5, 0], [3, 40], [43, 1], [100, 60]], dtype=torch.int64)
    x = torch.empty(2, 85, 7)  # 170 rows: only the shape is read
    packed = multi_routing(rows, x)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = multi_routing(mode.from_tensor(rows), mode.from_tensor(x))
    assert fake.shape == packed.shape and packed.dtype == fake.dtype == torch.int32
    with pytest.raises(ValueError, match="BLOCK_M=48"):
        unpack_routing(packed, 170, 4, 48)
    with pytest.raises(ValueError, match="for 200 rows and 4 adapters"):
        unpack_routing(packed, 200, 4, 32)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_op_triton_matches_torch(p, device):
    m, k, n = 130, 64, 40
    ranks, starts, counts = (5, 24, 1), (2, 40, 120), (37, 70, 1)
    x, w, b, la, lb, scales, ps, rows, _, dy = _problem(m, k, n, ranks, starts, counts, (p, 0.0, p), torch.float32,
                                                      bias=True, seed=3)
    results = []
    # the fused kernels with their own tables and with the packed tables of multi_routing
    for kernels, packed in (("torch", False), ("triton", False), ("triton", True)):
        xs = x.to(device).requires_grad_()
        las = [a.to(device).requires_grad_() for a in la]
        lbs = [t.to(device).requires_grad_() for t in lb]
        routing = multi_routing(rows, xs) if packed else None
        torch.manual_seed(11)  # same seeds drawn inside the op -> same masks
        y, _, seeds = multi_lora_linear(xs, w.to(device), b.to(device), las, lbs, scales, ps, rows.to(device),
                                        torch.float32, kernels, False, routing)
        (y * dy.to(device)).sum().backward()
        results.append((y.detach().cpu(), xs.grad.cpu(), [a.grad.cpu() for a in las], [t.grad.cpu() for t in lbs], seeds.cpu()))
    (y0, dx0, da0, db0, s0), *fused = results
    for y1, dx1, da1, db1, s1 in fused:
        if p:  # with p == 0 the op leaves the (unused) seeds uninitialised
            assert torch.equal(s0, s1)
        assert _rel(y1, y0.double()) <= 1e-5 and _rel(dx1, dx0.double()) <= 1e-5
        for p_, q in zip(da1 + db1, da0 + db0):
            assert _rel(p_, q.double()) <= 1e-5
    assert torch.equal(fused[0][0], fused[1][0]) and torch.equal(fused[0][1], fused[1][1])  # same tables, same kernels


def test_many_adapters_shuffled_ranges(device):
    """12 adapters, random lengths (incl. 0 and 1), ranges laid out in a shuffled order with gaps."""
    g = torch.Generator().manual_seed(7)
    n = 12
    counts = torch.randint(0, 30, (n,), generator=g).tolist()
    counts[3], counts[7] = 0, 1
    ranks = torch.randint(1, 33, (n,), generator=g).tolist()
    order = torch.randperm(n, generator=g).tolist()
    starts, pos = [0] * n, 2
    for i in order:
        starts[i] = pos
        pos += counts[i] + int(torch.randint(0, 3, (1,), generator=g))
    m = pos + 1
    ps = [0.25 if i % 3 else 0.0 for i in range(n)]
    x, w, b, la, lb, scales, ps, rows, seeds, dy = _problem(m, 64, 40, ranks, starts, counts, ps, torch.float32, bias=True, seed=9)
    dev = lambda t: t.to(device)
    la_d, lb_d = [dev(a) for a in la], [dev(t) for t in lb]
    y, s_act = K.multi_forward(dev(x), dev(w), dev(b), la_d, lb_d, scales, ps, dev(rows), dev(seeds), torch.float32)
    d_x, d_a, d_b = multi_backward(dev(dy), dev(x), dev(w), la_d, lb_d, s_act, dev(seeds), dev(rows), scales, ps, True)
    yr, _, dxr, dar, dbr = reference(x, w, b, la, lb, scales, ps, rows, seeds, dy)
    assert _rel(y.cpu(), yr) <= 1e-5 and _rel(d_x.cpu(), dxr) <= 1e-5
    for i in range(n):
        if counts[i]:
            assert _rel(d_a[i].cpu(), dar[i]) <= 1e-5 and _rel(d_b[i].cpu(), dbr[i]) <= 1e-5, i
        else:
            assert d_a[i].abs().sum() == 0 and d_b[i].abs().sum() == 0


def test_multi_launchers_import_in_either_order():
    """codegen.multi imports helpers of codegen.kernels, which exposes multi's launchers: no import cycle."""
    import subprocess
    import sys

    code = ("import lorafusion_compiler.codegen.multi as m, lorafusion_compiler.codegen.kernels as k; "
            "assert k.multi_forward is m.multi_forward and k.multi_backward is m.multi_backward")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("kernels", ["triton", "gluon"])
def test_compiled_model_builds_routing_once_and_matches_eager(kernels, device):
    """backend kernels="triton" or "gluon" (whose multi-adapter launchers are Triton's): every
    multi-adapter site reads one shared multi_routing node. On a GPU the models run there (the
    Triton launchers cannot read CPU tensors outside the interpreter)."""
    import torch.nn.functional as F

    from lorafusion_compiler.backend import lorafusion_backend
    from lorafusion_compiler.runtime import AdapterBatch, MultiAdapterModel
    from helpers import peft_with_adapters

    graphs = []

    def backend(gm, example_inputs):
        compiled = lorafusion_backend(gm, example_inputs, options={"kernels": kernels, "inner_backend": "eager"})
        graphs.append(gm)
        return compiled

    names = ["a", "b", "c"]
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(3)).to(device)
    batch = AdapterBatch.from_sequence_adapters([0, 1, 2], seq_len=16, num_adapters=3, device=device)
    eager, fused = (MultiAdapterModel(peft_with_adapters(names)).to(device) for _ in range(2))
    losses = []
    for model in (eager, torch.compile(fused, backend=backend)):
        logits = model(batch, input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        loss.backward()
        losses.append(loss.detach())
    targets = [n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.lorafusion.multi_routing.default) == 1
    assert targets.count(torch.ops.lorafusion.multi_lora_linear.default) == 6  # 2 layers x 3 targets
    assert _rel(losses[1], losses[0].double()) <= 1e-5
    for name in names:
        for k, (g, w) in enumerate(zip(fused.adapter_parameters(name), eager.adapter_parameters(name))):
            assert _rel(g.grad, w.grad.double()) <= 1e-4, (name, k)
