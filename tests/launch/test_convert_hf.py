"""`convert.save_hf: true` for linear and hybrid students: `<output>/hf` is written by save_hf and
`load_model(<output>/hf)` is the same model as `load_model(<output>/model)`.

Tiny and fast (MQAR data, vocab 64, seq 32, dim 40, 5 heads with 1 k/v head, 2 + 2 steps).
Oracle: the DCP model folder. Both folders hold the same float32 tensors, so logits agree to
1e-6 (exact in practice).
"""

import json

import pytest
import torch

from ctxscale.launch.convert import convert, load_convert_config, load_model, save_model
from ctxscale.models import save_hf


def _cfg(out, teacher_dir, *extra):
    return load_convert_config(None, [
        "data.kind=mqar", "data.vocab_size=64", "data.seq_len=32", "data.num_kv_pairs=4",
        f"convert.teacher={teacher_dir}", "convert.transfer.steps=2",
        "convert.transfer.loss=both", "convert.finetune.steps=2", "convert.finetune.method=lora",
        "convert.save_hf=true", "run.batch_size=2", "run.device=cpu", "run.tensorboard=false",
        "run.eval_batches=1", f"run.output_dir={out}", "checkpoint.every=0",
        "checkpoint.at_end=false", *extra,
    ])


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from ctxscale.models.config import ModelConfig
    from ctxscale.models.transformer import Transformer

    torch.manual_seed(0)
    teacher = Transformer(ModelConfig(vocab_size=64, dim=40, num_layers=2, num_heads=5,
                                      num_kv_heads=1, head_dim=8, init_std=0.1))
    root = tmp_path_factory.mktemp("teacher")
    save_model(teacher, root / "model", rank=0)
    # the same teacher as a Hugging Face folder with token ids in its config.json
    save_hf(teacher, root / "hf")
    hf = json.loads((root / "hf" / "config.json").read_text())
    (root / "hf" / "config.json").write_text(json.dumps({**hf, "bos_token_id": 5,
                                                         "eos_token_id": 6}))
    return root


@pytest.mark.parametrize("kind,pattern,teacher_format", [("hedgehog", "LA", "model"),
                                                         ("lawcat", "L", "hf")])
def test_convert_writes_loadable_hf_folder(tmp_path, teacher_dir, kind, pattern, teacher_format):
    out = tmp_path / "out"
    s = convert(_cfg(out, teacher_dir / teacher_format, f"convert.student.kind={kind}",
                     f"convert.student.layer_pattern={pattern}"))
    hf = json.loads((out / "hf" / "config.json").read_text())
    assert hf["model_type"] == "llama"
    if teacher_format == "hf":  # the teacher's config.json fields carry over
        assert (hf["bos_token_id"], hf["eos_token_id"]) == (5, 6)
    assert hf["ctxscale"]["family"] == ("linear" if pattern == "L" else "hybrid")
    assert hf["ctxscale"]["linear_attention"]["kind"] == kind
    a, b = load_model(out / "model").eval(), load_model(out / "hf").eval()
    assert a.codes == b.codes == (pattern * 2)[:2]
    assert not any("lora" in n for n in b.state_dict())
    ids = torch.randint(0, 64, (2, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(b(ids), a(ids), atol=1e-6, rtol=0)
    # `ctxscale eval` reads the hf folder through load_model: the same numbers as model/
    from ctxscale.launch.cli import main

    assert main(["eval", f"models=[{out / 'model'},{out / 'hf'}]", "labels=[dcp,hf]",
                 "data.kind=mqar", "data.vocab_size=64", "data.seq_len=32",
                 "data.num_kv_pairs=4", "batch_size=2", "eval_batches=1", "mqar_samples=4",
                 "mqar_seq_len=32", f"output_dir={tmp_path / 'eval'}"]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["hf"]["perplexity"] == pytest.approx(results["dcp"]["perplexity"], rel=1e-6)
    assert results["hf"]["mqar"] == results["dcp"]["mqar"]
    assert s["model_dir"] == str(out / "model")


def test_save_hf_no_longer_refused_for_linear_students():
    cfg = load_convert_config(None, ["convert.teacher=x", "convert.save_hf=true",
                                     "convert.student.kind=hedgehog"])
    cfg.validate()
