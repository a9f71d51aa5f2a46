"""The backend's product surface: entry point, explain report, options, the demo and the CLI."""

import subprocess
import sys

import pytest
import torch
from torch import nn

import lorafusion
from lorafusion.cli import main
from lorafusion_compiler.passes.cache_salt import schema_fingerprint


class OneLoRA(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 6).requires_grad_(False)
        self.a, self.b = nn.Linear(8, 2, bias=False), nn.Linear(2, 6, bias=False)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.proj(x) + 0.5 * self.b(self.a(x)))


def test_backend_name_works_without_importing_lorafusion():
    code = (
        "import sys, torch\n"
        "m = torch.nn.Linear(4, 3)\n"
        "assert 'lorafusion' not in sys.modules and 'lorafusion_compiler' not in sys.modules\n"
        "y = torch.compile(m, backend='lorafusion', options={'inner_backend': 'eager'})(torch.randn(2, 4))\n"
        "assert y.shape == (2, 3) and 'lorafusion_compiler.backend' in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_importing_lorafusion_names_the_backend_without_the_entry_point():
    """A checkout on PYTHONPATH that was never pip-installed has no entry point: the import names it."""
    code = (
        "import importlib.metadata as md, sys, torch\n"
        "real = md.entry_points\n"
        "md.entry_points = lambda **kw: md.EntryPoints(()) if kw.get('group') == 'torch_dynamo_backends' else real(**kw)\n"
        "assert 'lorafusion' not in torch._dynamo.list_backends(exclude_tags=())\n"
        "import lorafusion\n"
        "from lorafusion_compiler.backend import lorafusion_backend\n"
        "assert torch._dynamo.lookup_backend('lorafusion') is lorafusion_backend\n"
        "y = torch.compile(torch.nn.Linear(4, 3), backend='lorafusion', options={'inner_backend': 'eager'})(torch.randn(2, 4))\n"
        "assert y.shape == (2, 3)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_explain_report_fields_and_table():
    report = lorafusion.explain(OneLoRA(), torch.randn(5, 8))
    assert isinstance(report, lorafusion.ExplainReport) and report.graphs == 1
    (site,) = report.matched
    assert (site.module_path, site.rank, site.dropout_p, site.scale) == ("", 2, 0.0, 0.5)
    assert (site.in_features, site.out_features, site.x_shape) == (8, 6, (5, 8))
    assert report.kernels == ["torch"]
    assert [(s.module_path, s.reason) for s in report.skipped] == [("head", "plain linear: no LoRA branch is added to it")]
    text = str(report)
    assert "1 LoRA site(s) matched" in text and "<root>" in text and "head" in text and "plain linear" in text


def test_explain_leaves_the_model_usable_eagerly():
    model = OneLoRA()
    x = torch.randn(4, 8)
    before = model(x)
    lorafusion.explain(model, x)
    assert torch.equal(model(x), before)


def test_backend_rejects_unknown_option_by_name():
    with pytest.raises(Exception, match="kernel_set"):
        torch.compile(OneLoRA(), backend="lorafusion", options={"kernel_set": "x"})(torch.randn(2, 8))


def test_cli_demo_trains_and_loss_goes_down(capsys):
    assert main(["demo", "--steps", "30", "--batch", "4", "--seq-len", "32"]) == 0
    out = capsys.readouterr().out
    assert "14 LoRA site(s) matched" in out
    losses = out.split("trained 30 steps")[1].split("loss ")[1].split(" -> ")
    first, last = float(losses[0]), float(losses[1])
    assert last < first - 0.2, (first, last)


def test_cli_bad_value_is_named(capsys):
    assert main(["demo", "--steps", "0"]) == 2
    assert "steps=0" in capsys.readouterr().err


@pytest.mark.parametrize("kernels", ["triton", "gluon", "gluon-gemms"])
def test_dump_dir_writes_sources_and_manifest(tmp_path, kernels):
    import json

    model = OneLoRA()
    lorafusion.explain(model, torch.randn(5, 8), dump_dir=str(tmp_path), kernels=kernels, rewrite=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (entry,) = manifest["sites"]
    assert entry["kernels"] == kernels and entry["rank"] == 2 and entry["module_path"] == ""
    assert entry["files"], entry
    note = entry.get("note", "")
    assert ("codegen/gluon/split_kernels.py" in note) == kernels.startswith("gluon")
    assert ("codegen/gluon/lora_gemm.py" in note) == (kernels == "gluon-gemms")
    for name, rel in entry["files"].items():
        source = (tmp_path / rel).read_text()
        assert "@triton.jit" in source and entry["specialization"] in rel, name


def test_dump_dir_from_environment_records_torch_sites(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("LORAFUSION_DUMP_DIR", str(tmp_path))
    lorafusion.explain(OneLoRA(), torch.randn(3, 8))
    (entry,) = json.loads((tmp_path / "manifest.json").read_text())["sites"]
    assert entry["kernels"] == "torch" and entry["files"] == {} and "reference" in entry["note"]


def test_cli_multi_adapter_demo_every_adapter_learns(capsys):
    assert main(["demo", "--adapters", "3", "--steps", "12", "--batch", "2", "--seq-len", "32", "--dropout", "0", "--eager"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if " -> " in line]
    assert [r[0] for r in rows] == ["tales", "recipes", "code"]
    for row in rows:
        assert float(row[-1]) < float(row[2]) - 0.1, row


def test_auto_kernel_choice_per_device_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lorafusion_compiler.backend import kernel_set_for
    from lorafusion_compiler.config import LoRAFusionConfig

    with FakeTensorMode():
        cuda_bf16 = torch.empty(4, 8, device="cuda", dtype=torch.bfloat16)
        cuda_f64 = torch.empty(4, 8, device="cuda", dtype=torch.float64)
    auto, forced = LoRAFusionConfig(), LoRAFusionConfig(kernels="torch")
    assert kernel_set_for(cuda_bf16, torch.float32, auto) == "triton"  # PEFT default: fp32 adapters, bf16 base
    assert kernel_set_for(cuda_f64, torch.float64, auto) == "torch"
    assert kernel_set_for(torch.empty(4, 8), torch.float32, auto) == "torch"  # CPU
    assert kernel_set_for(cuda_bf16, torch.bfloat16, forced) == "torch"


@pytest.mark.parametrize("capability, graphs, dtype, expected", [
    ((9, 0), True, torch.bfloat16, "gluon"),      # Hopper, graph-replayed, bf16: the Gluon split kernels
    ((9, 0), False, torch.bfloat16, "triton"),    # without graphs their host work costs more than they save
    ((9, 0), True, torch.float16, "triton"),      # the Gluon kernels are bf16 only
    ((8, 0), True, torch.bfloat16, "triton"),     # not Hopper
    ((10, 0), True, torch.bfloat16, "triton"),
])
def test_auto_picks_gluon_only_for_graphed_bf16_on_hopper(capability, graphs, dtype, expected, monkeypatch):
    pytest.importorskip("triton.experimental.gluon")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lorafusion_compiler.backend import kernel_set_for
    from lorafusion_compiler.config import LoRAFusionConfig

    import triton

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    with FakeTensorMode():
        x = torch.empty(4, 8, device="cuda", dtype=dtype)
    assert kernel_set_for(x, torch.float32, LoRAFusionConfig(cudagraphs=graphs)) == expected


def test_auto_keeps_triton_on_a_triton_whose_gluon_was_not_validated(monkeypatch):
    pytest.importorskip("triton.experimental.gluon")
    import triton
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lorafusion_compiler.backend import kernel_set_for
    from lorafusion_compiler.config import LoRAFusionConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(triton, "__version__", "3.1.0")
    with FakeTensorMode():
        x = torch.empty(4, 8, device="cuda", dtype=torch.bfloat16)
    assert kernel_set_for(x, torch.float32, LoRAFusionConfig(cudagraphs=True)) == "triton"
    assert kernel_set_for(x, torch.float32, LoRAFusionConfig(cudagraphs=True, kernels="gluon")) == "gluon"
    assert kernel_set_for(x, torch.float32, LoRAFusionConfig(cudagraphs=True, kernels="gluon-gemms")) == "gluon-gemms"


@pytest.mark.parametrize("graphs", [True, False])
def test_cudagraphs_option_reaches_inductor(graphs, monkeypatch):
    """options={"cudagraphs": True} compiles the rewritten graph with Inductor's cudagraph trees
    (config patch ``triton.cudagraphs``; on a CPU Inductor skips the graphs and runs as usual)."""
    import torch._inductor.compile_fx as compile_fx_module

    from helpers import adapter_grads, assert_rel_close

    real, patches = compile_fx_module.compile_fx, []

    def spy(gm, inputs, **kwargs):
        patches.append(kwargs.get("config_patches"))
        return real(gm, inputs, **kwargs)

    monkeypatch.setattr(compile_fx_module, "compile_fx", spy)
    torch._dynamo.reset()
    model = OneLoRA()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend="lorafusion", options={"cudagraphs": graphs})
    compiled(x).sum().backward()
    got = adapter_grads(model)
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    backend_patches = patches[0]  # the backend's call (compile_fx re-enters itself)
    assert backend_patches.get("triton.cudagraphs", False) is graphs
    assert backend_patches["post_grad_custom_post_pass"].uuid() == schema_fingerprint()
    assert got.keys() == adapter_grads(model).keys() and got
    for name, want in adapter_grads(model).items():
        assert_rel_close(got[name], want, 1e-5, f"grad of {name}")


def test_inductor_cache_key_follows_our_op_schemas(monkeypatch):
    """The cache-salt pass hashes every lorafusion:: schema, so a changed schema changes the key."""
    from lorafusion_compiler.passes.cache_salt import SchemaSalt

    names = {str(s).split("(")[0] for s in torch._C._jit_get_all_schemas() if s.name.startswith("lorafusion::")}
    assert names == {"lorafusion::lora_linear", "lorafusion::lora_linear_backward", "lorafusion::lora_linear_shared",
                     "lorafusion::lora_linear_shared_backward", "lorafusion::multi_lora_linear",
                     "lorafusion::multi_lora_linear_backward", "lorafusion::multi_routing"}
    before = SchemaSalt().uuid()
    real = torch._C._jit_get_all_schemas()
    # the same schemas, except that the multi-adapter backward returns one tensor fewer
    changed = [_Schema(s.name, str(s).replace("-> (Tensor, Tensor, Tensor)", "-> (Tensor, Tensor)")) for s in real]
    assert [str(c) for c in changed] != [str(s) for s in real]
    monkeypatch.setattr(torch._C, "_jit_get_all_schemas", lambda: changed)
    assert SchemaSalt().uuid() != before
    monkeypatch.setattr(torch._C, "_jit_get_all_schemas", lambda: real)
    assert SchemaSalt().uuid() == before


class _Schema:
    """Stand-in for a FunctionSchema: a name and the text str() gives."""

    def __init__(self, name: str, text: str):
        self.name, self.text = name, text

    def __str__(self) -> str:
        return self.text
