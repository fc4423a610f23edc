import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lmjax.config import default_config
from lmjax.data import build_tokenizer, make_pipeline, prepare, tokenizers


def messy_corpus(tmp_path):
    """40 distinct documents plus what cleaning must remove: 3 exact copies, 3 near copies
    (one word changed), 2 too short, 1 spam of repeated lines."""
    rng = np.random.default_rng(0)
    docs = [" ".join(f"w{i}" for i in rng.integers(0, 3000, 200)) + "\n" for _ in range(40)]
    extra = [docs[1], docs[2], docs[3].upper()]
    for src in (4, 5, 6):
        words = docs[src].split()
        words[100] = "changed"
        extra.append(" ".join(words) + "\n")
    extra += ["short", "tiny", "click here\n" * 40]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs + extra))
    c = default_config().data
    c.source = f"text:{corpus}"
    c.val_fraction = 0.2
    c.vocab_size = 300
    c.cache_dir = str(tmp_path / "cache")
    return c, docs


def test_prepare_removes_each_kind_and_the_pipeline_reads_it_back(tmp_path, monkeypatch):
    c, docs = messy_corpus(tmp_path)
    out = str(tmp_path / "prepared")
    lines = []
    meta = prepare.prepare(c, out, log=lines.append)
    removed = {s["stage"]: s["removed_docs"] for s in meta["stats"]}
    assert removed["filter:too_short"] == 2 and removed["filter:repeated_lines"] == 1
    assert removed["exact_dedup"] == 3 and removed["near_dedup"] == 3
    assert meta["docs"]["train"] + meta["docs"]["validation"] == 40
    assert any("near_dedup" in line and "bytes" in line for line in lines)
    kept = [json.loads(x)["text"] for s in ("train", "validation")
            for x in open(os.path.join(out, f"{s}.jsonl"))]
    # One of each duplicate group survives (the train copy when the group spans both splits).
    assert sorted(k.lower() for k in kept) == sorted(d.lower() for d in docs)

    p = c.copy_and_resolve_references()
    p.source = f"prepared:{out}"
    monkeypatch.setattr(tokenizers, "train_sentencepiece", lambda *a: pytest.fail("retrained"))
    tok = build_tokenizer(p)  # DIR/tokenizer.model, trained by prepare
    assert tok.fingerprint == tokenizers.SentencePieceTokenizer.load(f"{out}/tokenizer.model").fingerprint
    pipe = make_pipeline(p, tok, "train", 4)
    assert next(pipe)["inputs"].shape == (4, p.seq_len)
    assert pipe.info["prepared_from"] == {"source": c.source}


def test_prepare_fails_clearly_when_cleaning_leaves_nothing(tmp_path):
    c, _ = messy_corpus(tmp_path)
    c.clean.min_chars = 10**6
    with pytest.raises(ValueError, match="split is empty after cleaning"):
        prepare.prepare(c, str(tmp_path / "out"), log=lambda s: None)


def test_prepare_command_line(tmp_path):
    c, _ = messy_corpus(tmp_path)
    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "from lmjax.config import default_config\n"
        "def get_config():\n"
        "    c = default_config()\n"
        f"    c.data.source = {c.source!r}\n"
        f"    c.data.val_fraction = 0.2\n"
        f"    c.data.tokenizer = 'byte'\n"
        f"    c.data.cache_dir = {c.cache_dir!r}\n"
        "    return c\n"
    )
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "lmjax.data.prepare", f"--config={config_file}", f"--out={out}"],
        capture_output=True, text=True, timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.returncode == 0, result.stderr
    assert "exact_dedup" in result.stdout and "removed" in result.stdout
    assert sorted(os.listdir(out)) == ["meta.json", "train.jsonl", "validation.jsonl"]
