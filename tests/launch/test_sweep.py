import json

import pytest

from ctxscale.launch.sweep import collect, main


def _fake_run(root, n, acc):
    d = root / f"seq_{n}"
    d.mkdir()
    recs = [{"step": 1, "loss": 3.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1000.0 / n,
             "tflops": 0.001 * n, "memory_bytes": n * 2**20},
            {"step": 1, "eval_loss": 2.5, "eval_accuracy": acc}]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")


def test_collect_writes_table_csv_and_plot(tmp_path):
    for n, acc in [(512, 0.5), (128, 0.9), (256, 0.7)]:
        _fake_run(tmp_path, n, acc)
    rows = collect(tmp_path)
    assert [r["seq_len"] for r in rows] == [128, 256, 512]
    assert [r["eval_accuracy"] for r in rows] == [0.9, 0.7, 0.5]
    assert [r["tflops"] for r in rows] == [0.128, 0.256, 0.512]
    assert [r["mfu"] for r in rows] == [None] * 3  # no known peak: shown as "—"
    table = (tmp_path / "sweep.md").read_text()
    assert table.splitlines()[0].startswith("| seq_len |") and "| 256 |" in table
    assert (tmp_path / "sweep.csv").read_text().count("\n") == 4
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_collect_without_runs_and_bad_lengths(tmp_path):
    with pytest.raises(ValueError, match="no finished runs"):
        collect(tmp_path)
    assert main(["--config", "configs/tiny.yaml", "--seq-lens", "12x"]) == 2


@pytest.mark.parametrize("override, flag", [("train.output_dir=elsewhere", "--out"),
                                            ("data.seq_len=64", "--seq-lens")])
def test_overrides_the_sweep_sets_are_refused(override, flag, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["--config", "configs/tiny.yaml", "--seq-lens", "32", "--out", str(out),
                 override]) == 2
    assert f"use {flag} instead" in capsys.readouterr().err
    assert not out.exists()  # refused before any run
