"""Text data through a Hugging Face tokenizer (`data.tokenizer`: a tokenizer.json or a model
folder): EOS lookup and override, exact round trips through the token cache, the cache key,
passkey rows, refusals, and convert refusing a teacher's text in the wrong ids."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from ctxscale.launch.data import DataConfig, build_data, passkey_text_sample
from ctxscale.launch.data.hf_tokenizer import HFTokenizer, check_teacher_tokenizer, load_tokenizer
from ctxscale.launch.data.tokenizer import Tokenizer
from tests.launch.test_data_text import _args, _make_corpus

tokenizers = pytest.importorskip("tokenizers")
EOT = "<|endoftext|>"


def _write_tokenizer(folder, texts, *, eos_config=EOT):
    """A byte-level BPE tokenizer.json (GPT-2 style) trained here, with a tokenizer_config.json
    naming its EOS (`eos_config`: a string, a dict, or None for none)."""
    from tokenizers import Tokenizer as Fast
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Fast(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if eos_config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos_config}))
    return folder


@pytest.fixture()
def hf_corpus(tmp_path):
    a = tmp_path / "a.txt"
    docs = _make_corpus(a, 40, seed=3)
    folder = _write_tokenizer(tmp_path / "tok", docs)
    cfg = DataConfig(kind="text", seq_len=19, text_files=[str(a)], tokenizer=str(folder),
                     val_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    return cfg, docs, folder


def test_documents_round_trip_through_the_cache(hf_corpus):
    cfg, docs, folder = hf_corpus
    src = build_data(cfg, **_args())
    tok = src.tokenizer
    assert isinstance(tok, HFTokenizer)
    eos = tok.tok.token_to_id(EOT)
    assert tok.eos_id == eos and src.vocab_size == tok.tok.get_vocab_size() > 300
    corpus = src.corpus
    assert corpus.num_docs == len(docs) and corpus.meta["eos_id"] == eos
    for d, text in enumerate(docs):
        ids = corpus.tokens[corpus.offsets[d] : corpus.offsets[d + 1]].tolist()
        assert ids[-1] == eos and eos not in ids[:-1]  # no BOS or other specials
        assert tok.decode(ids[:-1]) == text
    batch = src.next_batch()
    assert batch["input_ids"].shape == (2, 19) and int(batch["input_ids"].max()) < src.vocab_size


def test_eos_from_the_folder_or_data_eos_id(tmp_path, hf_corpus):
    _, docs, folder = hf_corpus
    eos = HFTokenizer(folder).eos_id
    dict_form = _write_tokenizer(tmp_path / "dict", docs, eos_config={"content": EOT})
    assert HFTokenizer(dict_form).eos_id == eos
    from_config = _write_tokenizer(tmp_path / "cfg", docs, eos_config=None)
    assert HFTokenizer(from_config).eos_id == -1
    (from_config / "config.json").write_text(json.dumps({"eos_token_id": [7, 8]}))
    assert HFTokenizer(from_config).eos_id == 7
    assert HFTokenizer(from_config / "tokenizer.json", eos_id=11).eos_id == 11
    assert isinstance(load_tokenizer(from_config / "tokenizer.json"), HFTokenizer)


def test_eos_override_is_in_the_cache_key(hf_corpus):
    cfg, _, _ = hf_corpus
    plain = build_data(cfg, **_args()).corpus
    other = build_data(replace(cfg, eos_id=5), **_args()).corpus
    assert plain.paths["bin"] != other.paths["bin"]
    assert other.meta["eos_id"] == 5 and other.tokens[int(other.offsets[1]) - 1] == 5


def test_refusals_name_the_fix(tmp_path, hf_corpus):
    cfg, docs, _ = hf_corpus
    no_eos = _write_tokenizer(tmp_path / "noeos", docs, eos_config=None)
    with pytest.raises(ValueError, match="has no EOS piece.*set data.eos_id"):
        build_data(replace(cfg, tokenizer=str(no_eos)), **_args())
    with pytest.raises(ValueError, match=r"data.eos_id=999 is outside the tokenizer's \d+ ids"):
        build_data(replace(cfg, tokenizer=str(no_eos), eos_id=999), **_args())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="without tokenizer.json or tokenizer.model"):
        build_data(replace(cfg, tokenizer=str(empty)), **_args())
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="is not a valid Hugging Face tokenizer.json"):
        build_data(replace(cfg, tokenizer=str(broken)), **_args())
    bad_config = _write_tokenizer(tmp_path / "badcfg", docs)
    (bad_config / "tokenizer_config.json").write_text("{")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        HFTokenizer(bad_config)
    with pytest.raises(ValueError, match="applies to a given data.tokenizer"):
        replace(cfg, tokenizer=None, eos_id=3).validate()


def test_sentencepiece_model_folder(tmp_path, hf_corpus):
    """A model folder with only tokenizer.model (sentencepiece) loads as the sentencepiece
    tokenizer; data.eos_id overrides its EOS."""
    cfg, docs, _ = hf_corpus
    src = build_data(replace(cfg, tokenizer=None, tokenizer_vocab_size=320), **_args())
    folder = tmp_path / "spm"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(src.tokenizer.path.read_bytes())
    tok = load_tokenizer(folder)
    assert isinstance(tok, Tokenizer) and tok.eos_id == 2
    assert load_tokenizer(folder, eos_id=4).eos_id == 4


def test_passkey_rows_with_a_hf_tokenizer(hf_corpus):
    cfg, _, _ = hf_corpus
    src = build_data(cfg, **_args())
    filler = src.next_batch()["input_ids"].flatten().tolist()
    row = passkey_text_sample(src.tokenizer, filler, 256, 0.5, np.random.default_rng(0))
    answer = row["labels"][row["labels"] != -100].tolist()
    assert src.tokenizer.decode(answer).strip() == row["passkey"]


def test_convert_refuses_a_teachers_text_in_other_ids(tmp_path, hf_corpus):
    cfg, _, folder = hf_corpus
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    check_teacher_tokenizer(str(teacher), replace(cfg, tokenizer=None))  # no tokenizer there
    (teacher / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    with pytest.raises(ValueError, match=f"comes with its own tokenizer.*data.tokenizer: {teacher}"):
        check_teacher_tokenizer(str(teacher), replace(cfg, tokenizer=None))
    check_teacher_tokenizer(str(teacher), cfg, 400, 512)
    with pytest.raises(ValueError, match="the data has 400 token ids but the teacher .* embeds 300"):
        check_teacher_tokenizer(str(teacher), cfg, 400, 300)
    from ctxscale.launch.convert import load_convert_config

    with pytest.raises(ValueError, match="comes with its own tokenizer"):
        load_convert_config("configs/convert_lawcat.yaml",
                            [f"convert.teacher={teacher}", f"data.text_files=[{cfg.text_files[0]}]"])
