"""`ctxscale generate`: cached decoding (KV cache, recurrent states, Titans' state at the last
whole memory unit) gives the logits and tokens of rerunning the whole sequence; sampling honours top-k / top-p /
temperature and the seed; EOS stops a row; the CLI finds a run's trained tokenizer; bad input
is refused by name.

Tolerance: cached and full forwards sum the same float32 terms in another order: 1e-5."""

from __future__ import annotations

import pytest
import torch

from ctxscale.launch.cli import main as cli_main
from ctxscale.launch.config import load_job_config
from ctxscale.launch.generate import find_tokenizer, generate, sample_next
from ctxscale.launch.train import train
from ctxscale.models import build_model
from ctxscale.models.config import ModelConfig
from tests.launch.test_data_text import SHAKESPEARE

FAMILIES = {
    "transformer": dict(family="transformer"),
    "hybrid_LMSA": dict(family="hybrid", layer_pattern="LMSA", num_layers=4),
    "titans_mac": dict(family="titans"),  # the state at the last whole unit + the tail
    "titans_mag": dict(family="titans"),
}


def _model(kind):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=61, dim=32, num_heads=4, num_kv_heads=2,
                                num_layers=2, max_seq_len=128), **FAMILIES[kind]})
    if kind == "hybrid_LMSA":
        cfg.mamba.d_state, cfg.mamba.head_dim = 4, 8
    if kind.startswith("titans"):
        cfg.titans.variant = kind.split("_")[1]
        cfg.titans.segment_len, cfg.titans.chunk_size = 8, 4  # units complete while decoding
    return build_model(cfg)


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_cached_decoding_equals_rerunning_the_sequence(kind):
    model = _model(kind).eval()
    prompt = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(1))
    assert model.can_step
    fast = generate(model, prompt, max_new_tokens=12, temperature=0)
    slow = generate(model, prompt, max_new_tokens=12, temperature=0, use_cache=False)
    assert torch.equal(fast, slow) and fast.shape == (2, 19)
    assert torch.equal(fast[:, :7], prompt)
    with torch.no_grad():  # the logits themselves, token by token after the prompt
        full = model(fast)
        out, state = model.forward_step(fast[:, :7])
        steps = [out]
        for t in range(7, fast.shape[1]):
            out, state = model.forward_step(fast[:, t : t + 1], state)
            steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    sampled = generate(model, prompt, max_new_tokens=12, temperature=1.0, seed=3)
    assert torch.equal(sampled, generate(model, prompt, max_new_tokens=12, temperature=1.0,
                                         seed=3, use_cache=False))


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]]).expand(4000, 5)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, temperature=0).tolist()) == {1}
    assert set(sample_next(logits, top_k=1, generator=gen).tolist()) == {1}
    assert set(sample_next(logits, top_k=2, generator=gen).tolist()) == {1, 2}
    probs = logits[0].softmax(-1)  # 0.09, 0.64, 0.23, 0.03 ...: top_p=0.8 keeps ids 1 and 2
    assert probs[1] < 0.8 < probs[1] + probs[2]
    draws = sample_next(logits, top_p=0.8, generator=gen)
    assert set(draws.tolist()) == {1, 2}
    share = float((draws == 1).float().mean())  # renormalized: 0.64 / 0.87 = 0.736
    assert abs(share - float(probs[1] / (probs[1] + probs[2]))) < 0.03  # 4000 draws: ~4 sigma
    hot = sample_next(logits, temperature=100.0, generator=gen)
    assert set(hot.tolist()) == {0, 1, 2, 3, 4}
    with pytest.raises(ValueError, match="top_p=0 in"):
        sample_next(logits, top_p=0)


def test_eos_stops_and_pads_each_row():
    model = _model("transformer").eval()
    prompt = torch.randint(0, 61, (3, 5), generator=torch.Generator().manual_seed(2))
    free = generate(model, prompt, max_new_tokens=10, temperature=1.0, seed=5)
    eos = int(free[0, 5])  # the first sampled token of row 0 plays EOS
    out = generate(model, prompt, max_new_tokens=10, temperature=1.0, seed=5, eos_id=eos)
    assert torch.all(out[0, 5:] == eos)
    for row in out:
        hits = (row[5:] == eos).nonzero()
        if len(hits):
            assert torch.all(row[5 + int(hits[0]):] == eos)  # padded after its EOS
    with pytest.raises(ValueError, match="exceed model.max_seq_len=128"):
        generate(model, prompt, max_new_tokens=124)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("gen") / "run"
    text = SHAKESPEARE.read_text(encoding="utf-8")[:60_000]
    corpus = run.parent / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    train(load_job_config(None, [
        "data.kind=text", f"data.text_files=[{corpus}]", "data.tokenizer_vocab_size=384",
        "data.seq_len=64", "model.vocab_size=0", "model.dim=32", "model.num_layers=1",
        "model.num_heads=2", "model.num_kv_heads=1", "train.steps=2", "train.batch_size=2",
        "train.progress=false", "train.tensorboard=false", "train.eval_every=0",
        "train.eval_batches=1", "checkpoint.at_end=true", f"train.output_dir={run}"]))
    return run


def test_cli_samples_text_with_the_runs_trained_tokenizer(text_run, capsys):
    tok = find_tokenizer(text_run)
    assert tok is not None and tok.vocab_size == 384
    assert cli_main(["generate", "--model", str(text_run), "--prompt", "ROMEO:",
                     "--max-new-tokens", "8", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("ROMEO:")
    assert "KV cache" in captured.err
    assert cli_main(["generate", "--model", str(text_run), "--prompt-ids", "5,17,2",
                     "--max-new-tokens", "3", "--temperature", "0"]) == 0
    ids = [int(x) for x in capsys.readouterr().out.strip().split(",")]
    assert ids[:3] == [5, 17, 2] and len(ids) <= 6


def test_cli_refusals(text_run, tmp_path, capsys):
    assert cli_main(["generate", "--model", str(text_run)]) == 2
    assert "exactly one of --prompt" in capsys.readouterr().err
    assert cli_main(["generate", "--model", str(text_run), "--prompt-ids", "5,x"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert cli_main(["generate", "--model", str(text_run), "--prompt-ids", "999"]) == 2
    assert "outside the model's vocabulary (384)" in capsys.readouterr().err
    mqar = tmp_path / "mqar"
    train(load_job_config(None, ["model.dim=16", "model.num_layers=1", "model.num_heads=2",
                                 "model.num_kv_heads=1", "train.steps=1", "train.progress=false",
                                 "train.tensorboard=false", "train.eval_every=0",
                                 "train.eval_batches=1", f"train.output_dir={mqar}"]))
    assert cli_main(["generate", "--model", str(mqar), "--prompt", "hi"]) == 2
    assert "no tokenizer found" in capsys.readouterr().err
