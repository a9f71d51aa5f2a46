"""``lorafusion train``: config parsing, a short run of the shipped example, PEFT-loadable adapters."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from lorafusion.cli import main
from lorafusion_compiler.product.train_config import load_train_config

EXAMPLE = Path(__file__).resolve().parents[1] / "lorafusion_compiler" / "product" / "examples" / "train.yaml"


def _write(tmp_path, raw, suffix=".yaml"):
    path = tmp_path / f"config{suffix}"
    path.write_text(yaml.safe_dump(raw) if suffix == ".yaml" else json.dumps(raw))
    return path


def test_example_config_trains_every_job_and_adapters_reload_in_peft(tmp_path, capsys):
    raw = yaml.safe_load(EXAMPLE.read_text())
    for job in raw["jobs"]:
        job["steps"] = 10
    out = tmp_path / "run"
    assert main(["train", str(_write(tmp_path, raw, ".json")), "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert set(report["jobs"]) == {"tales", "recipes", "code"} and "trained 3 job(s)" in printed
    for name, job in report["jobs"].items():
        assert job["steps_done"] == 10 and job["last_loss"] < job["first_loss"], (name, job)
    assert Path(report["timeline_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from peft import PeftModel

    from lorafusion_compiler.product.tiny_llama import build_tiny_llama

    adapter = out / "recipes" / "step-10"
    loaded = PeftModel.from_pretrained(build_tiny_llama(), str(adapter))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 32
    b = [p for n, p in loaded.named_parameters() if "lora_B" in n]
    assert b and any(p.abs().sum() > 0 for p in b)  # trained: B moved away from its zero init


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.pop("jobs"), "no jobs"),
        (lambda r: r.update(dtype="int8"), "dtype='int8'"),
        (lambda r: r.update(modle="tiny"), r"unknown config key\(s\) \['modle'\]"),
        (lambda r: r["jobs"][0].update(data={"text": "tales", "jsonl": "x.jsonl"}), "exactly one of text, jsonl, tokens"),
        (lambda r: r["jobs"][0].update(ranks=4), r"unknown job 0 key\(s\) \['ranks'\]"),
        (lambda r: r["jobs"].append(dict(r["jobs"][0])), "job names must be unique"),
        (lambda r: r.update(model={"path": "/nonexistent"}), None),
    ],
)
def test_bad_config_is_named(tmp_path, change, message):
    raw = yaml.safe_load(EXAMPLE.read_text())
    change(raw)
    path = _write(tmp_path, raw)
    if message is None:  # parses, fails when the model is built
        from lorafusion_compiler.product.train import build_model

        with pytest.raises(ValueError, match="/nonexistent"):
            build_model(load_train_config(path))
        return
    with pytest.raises(ValueError, match=message):
        load_train_config(path)


def test_missing_config_file_is_named(capsys):
    assert main(["train", "/no/such/config.yaml"]) == 2
    assert "/no/such/config.yaml" in capsys.readouterr().err


def test_jsonl_and_token_file_data(tmp_path):
    from lorafusion_compiler.product.train import load_samples
    from lorafusion_compiler.product.train_config import DataConfig

    (tmp_path / "d.jsonl").write_text('{"text": "hello world"}\n{"text": "x"}\n{"text": "abcdef"}\n')
    samples = load_samples(DataConfig(jsonl=str(tmp_path / "d.jsonl"), seq_len=4))
    assert [s.tolist() for s in samples] == [list(b"hell"), list(b"abcd")]  # 1-token sample dropped
    torch.save([torch.arange(10), torch.arange(3)], tmp_path / "t.pt")
    assert [s.numel() for s in load_samples(DataConfig(tokens=str(tmp_path / "t.pt"), seq_len=8))] == [8, 3]
