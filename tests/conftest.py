"""Shared test fixtures. Real data comes from ../shared/data (beside the clone), read at run time."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("POCKETLM_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "README.md").is_file():
        pytest.fail(f"real data not found at {SHARED_DATA}: put the shared data folder beside the clone "
                    "or set POCKETLM_SHARED_DATA")
    return SHARED_DATA


def _small_corpus(data: Path) -> Iterator[str]:
    """~1.5 MB of real text: FineWeb documents, one Gutenberg book, dolly records."""
    import json

    with (data / "fineweb_legal" / "fineweb_legal_pilot_shared.jsonl").open(encoding="utf-8") as f:
        for _, line in zip(range(120), f):
            yield json.loads(line)["text"]
    yield (data / "gutenberg" / "11-0.txt").read_text(encoding="utf-8-sig")
    with (data / "dolly" / "dolly_15k_from_docx.jsonl").open(encoding="utf-8") as f:
        for _, line in zip(range(600), f):
            rec = json.loads(line)
            yield from (rec[k] for k in ("instruction", "context", "response") if rec[k])


@pytest.fixture(scope="session")
def small_tokenizer(shared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """A 2000-piece unigram tokenizer (same lossless settings and special ids as v1), trained in seconds."""
    from pocketlm.tokenizer.tokenizer_sp import Tokenizer, train_tokenizer

    out = tmp_path_factory.mktemp("small_tokenizer")
    return Tokenizer.load(train_tokenizer(_small_corpus(shared_data), vocab_size=2000, out_dir=out, seed=0))


@pytest.fixture(scope="session")
def encode_document():
    """The pretrain format of one document written out plainly, `(tok, text) -> ids + [<|eot|>]`: the
    reference the cache's bulk encoding (`format.pretrain.encode_documents`) is held to."""
    return lambda tok, text: tok.encode(text) + [tok.eot_id]


@pytest.fixture
def mps_rules():
    """The test runs under MPS's rules with the CPU as the device (pocketlm/mps_rules.py): float64 or
    complex tensors, non_blocking copies from unpinned memory, device work from two threads at once and
    known-bad MPS kernels raise MPSRuleError."""
    from pocketlm.mps_rules import MPSRules

    with MPSRules() as rules:
        yield rules
