"""`ctxscale generate`: sample text from a trained model (one process).

    ctxscale generate --model runs/shakespeare --prompt "ROMEO:" --max-new-tokens 200

`--model`: a train run folder (its newest checkpoint), a `convert` model/ folder or a Hugging
Face folder (`launch.convert.load_model`). Every family decodes with state (`forward_step`):
the Transformer with a KV cache; linear attention, Mamba, Mamba-2 and hybrids with their
recurrent states; Titans from its state at the last whole memory unit, rerunning only the
tokens since (fewer than segment_len / chunk_size). A model without `forward_step` reruns the
whole sequence for every token, which is said on the first line.

The tokenizer: `--tokenizer` (a sentencepiece .model, a tokenizer.json or a folder), else the
model folder's own (tokenizer.json / tokenizer.model), else the run's: its config.yaml
`data.tokenizer`, or the sentencepiece model that training trained and cached (`data.cache_dir`
or the run's cache/). Without one (synthetic data, token files), give `--prompt-ids 5,17,2`
and the ids are printed.

Sampling: `--temperature` (0: greedy), `--top-k`, `--top-p` (nucleus), `--seed`; generation
stops at `--max-new-tokens` or when every sample has produced the EOS id.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids `(batch,)` from last-position logits `(batch, vocab)`: greedy at
    temperature 0, else a draw from softmax(logits / temperature) restricted to the `top_k`
    most likely ids (0: all) and to the smallest set of them whose probability reaches
    `top_p` (the most likely id is always kept)."""
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature} must be >= 0, top_k={top_k} >= 0 and "
                         f"top_p={top_p} in (0, 1]")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the more likely ids
        drop = before >= top_p
        drop[:, 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt: torch.Tensor, *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None, seed: int = 0,
             use_cache: bool = True) -> torch.Tensor:
    """`prompt` `(batch, s)` followed by up to `max_new_tokens` sampled ids `(batch, s + n)`;
    rows that produced `eos_id` are padded with it until every row has. `use_cache=False`
    reruns the whole sequence for every token (what models without `step` always do)."""
    model.eval()
    limit = model.cfg.max_seq_len
    if prompt.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt ({prompt.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) "
                         f"exceed model.max_seq_len={limit}; shorten them")
    gen = torch.Generator(device=prompt.device).manual_seed(seed)
    step = use_cache and getattr(model, "can_step", False)
    ids, done = prompt, torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    state = None
    for _ in range(max_new_tokens):
        if step:
            out, state = model.forward_step(ids if state is None else ids[:, -1:], state)
        else:
            out = model(ids)
        logits = out[:, -1]
        nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                          generator=gen)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        ids = torch.cat([ids, nxt[:, None]], 1)
        if eos_id is not None and bool(done.all()):
            break
    return ids


def find_tokenizer(model_path: str | Path, explicit: str | None = None):
    """The tokenizer to use with the model at `model_path` (module docstring), or None."""
    import yaml

    from ctxscale.launch.data.cache import run_cache_dir
    from ctxscale.launch.data.hf_tokenizer import load_tokenizer
    from ctxscale.launch.data.tokenizer import Tokenizer

    if explicit:
        return load_tokenizer(explicit)
    p = Path(model_path)
    if (p / "tokenizer.json").is_file() or (p / "tokenizer.model").is_file():
        return load_tokenizer(p)
    cfg_file = p / "config.yaml"
    if not cfg_file.is_file():
        return None
    data = (yaml.safe_load(cfg_file.read_text()) or {}).get("data") or {}
    if data.get("tokenizer"):
        return load_tokenizer(data["tokenizer"], eos_id=data.get("eos_id", -1))
    if data.get("kind") != "text":
        return None
    cache = run_cache_dir(p, data.get("cache_dir"))
    vocab = data.get("tokenizer_vocab_size")
    trained = sorted((cache / "tokenizers").glob(f"spm-*{vocab}-*.model"))
    if len(trained) > 1:
        raise ValueError(f"{len(trained)} trained tokenizers in {cache / 'tokenizers'} "
                         f"({', '.join(t.name for t in trained[:3])}); pass --tokenizer")
    return Tokenizer(trained[0]) if trained else None


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"--prompt-ids {text!r} must be comma-separated integers") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ctxscale generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="run folder, convert model/ folder or HF folder")
    p.add_argument("--prompt", default=None, help="text to continue (needs a tokenizer)")
    p.add_argument("--prompt-ids", default=None, help="token ids to continue, e.g. 5,17,2")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from ctxscale.launch.convert import load_model

    try:
        if (args.prompt is None) == (args.prompt_ids is None):
            raise ValueError("give exactly one of --prompt (text) and --prompt-ids")
        if args.max_new_tokens < 1 or args.num_samples < 1:
            raise ValueError("--max-new-tokens and --num-samples must be >= 1")
        tokenizer = find_tokenizer(args.model, args.tokenizer)
        if args.prompt is not None:
            if tokenizer is None:
                raise ValueError(f"no tokenizer found for {args.model} (module docstring); pass "
                                 "--tokenizer, or --prompt-ids for a model trained on token ids")
            ids = tokenizer.encode(args.prompt)
        else:
            ids = _parse_ids(args.prompt_ids)
        if not ids:
            raise ValueError("the prompt encodes to no tokens; give a longer one")
        model = load_model(args.model)
        if max(ids) >= model.cfg.vocab_size:
            raise ValueError(f"prompt id {max(ids)} is outside the model's vocabulary "
                             f"({model.cfg.vocab_size})")
        eos = tokenizer.eos_id if tokenizer is not None and tokenizer.eos_id >= 0 else None
        prompt = torch.tensor([ids] * args.num_samples)
        print(f"generate: {type(model).__name__}, "
              + ("KV cache / recurrent state" if model.can_step
                 else "no forward_step: the whole sequence reruns for every token"),
              file=sys.stderr)
        out = generate(model, prompt, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       eos_id=eos, seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"ctxscale generate: {e}", file=sys.stderr)
        return 2
    for i, row in enumerate(out.tolist()):
        if args.num_samples > 1:
            print(f"--- sample {i}")
        if eos is not None and eos in row[len(ids):]:
            row = row[: len(ids) + row[len(ids):].index(eos)]
        print(tokenizer.decode(row) if args.prompt is not None else ",".join(map(str, row)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
