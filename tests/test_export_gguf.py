"""llama.cpp (through llama-cpp-python, built from source) chats with `pocketlm export gguf` from plain text:
it tokenizes real text as pocketlm does, renders the embedded chat template to pocketlm's prompt ids and
generates pocketlm's greedy reply (f32); f16 and q8_0 report how far their replies agree."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

from pocketlm import PocketLMError
from pocketlm.cli import main
from pocketlm.model.gguf_export import export_gguf
from pocketlm.model.io import load_model

# Strings that stress the tokenizer: whitespace runs, tabs, CRLF, digits, punctuation, the control
# pieces' spellings as plain text, accents, a rare symbol, an emoji.
EDGE_STRINGS = [
    "Who are you?", "Hello, world!", "  two spaces\n\ttab and newline\n\n", "line\r\nwindows\r\n",
    "1234567 digits, 3.14159 and -42%", "<|usr|>What is 2+2?<|eot|><|asst|>4<|eot|>",
    "{\"json\": [1, 2, {\"k\": null}]} ~`@#$^&*_=|\\;:'<>", "café naïve résumé", "emoji 🙂 and 漢字",
    "    indented code()\n        deeper();\n",
]


def fixture_corpus(docs: Iterable[str]) -> list[str]:
    """The text the test tokenizer is trained on (`small_corpus` in tests/conftest.py), as strings:
    documents, dolly fields, the book's paragraphs."""
    return [p for doc in docs for p in (doc.split("\n\n") if len(doc) > 100_000 else [doc]) if p]


def held_out_corpus(data: Path) -> list[str]:
    """Real text the tokenizer was not trained on, and the edge strings."""
    texts = list(EDGE_STRINGS)
    with (data / "oasst1" / "oasst1_validation_en.jsonl").open(encoding="utf-8") as f:
        texts += [json.loads(line)["text"] for _, line in zip(range(400), f)]
    with (data / "dolly" / "dolly_15k_from_docx.jsonl").open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if 1000 <= i < 1100:
                rec = json.loads(line)
                texts += [rec[k] for k in ("instruction", "context", "response") if rec[k]]
            if i >= 1100:
                break
    with (data / "fineweb_legal" / "fineweb_legal_pilot_shared.jsonl").open(encoding="utf-8") as f:
        texts += [json.loads(line)["text"] for i, line in zip(range(160), f) if i >= 120]
    return texts


@pytest.fixture(scope="module")
def llama_cpp(need_client):
    return need_client("llama_cpp", "build llama-cpp-python from its PyPI source package "
                                    "(pip install -e '.[llama]', as .ci/run does)")


@pytest.fixture(scope="module")
def gguf_files(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    return {dtype: export_gguf(tiny_ckpt, out / f"model-{dtype}.gguf", dtype) for dtype in ("f32", "f16", "q8_0")}


def _load(llama_cpp, path: Path):
    return llama_cpp.Llama(model_path=str(path), n_ctx=0, n_threads=1, n_batch=128, seed=0, verbose=False)


def _greedy(llm, prompt: list[int], eot: int, n: int) -> list[int]:
    out: list[int] = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if token == eot or len(out) == n:
            break
    return out


def _agreement(llm, tok, corpus: list[str], name: str) -> float:
    """Fraction of strings llama.cpp tokenizes as pocketlm; prints the others with their cause."""
    misses = []
    for text in corpus:
        ours = tok.encode(text)
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        if theirs != ours:
            # characters that are no piece: pocketlm writes their UTF-8 bytes, llama.cpp one <unk>
            chars = "".join(sorted({c for c in text if len(tok.encode(c)) > 1}))
            score = [sum(tok._sp.get_score(i) for i in ids) for ids in (ours, theirs)]
            why = f"characters with no piece {chars!r}" if chars else f"a tie broken the other way {score}"
            misses.append(f"  {text[:50]!r}: {why}")
        # Detokenizing pocketlm's ids (byte pieces included) gives the text back, whatever the tokenization.
        assert llm.detokenize(ours) == text.encode("utf-8")
    agree = 1 - len(misses) / len(corpus)
    print(f"\n{name}: llama.cpp tokenizes {len(corpus) - len(misses)}/{len(corpus)} strings as pocketlm "
          f"({agree:.2%})", *misses, sep="\n")
    return agree


def test_llama_cpp_tokenizes_the_fixture_corpus_as_pocketlm(llama_cpp, gguf_files, tiny_ckpt: Path, data_dir: Path,
                                                            small_corpus):
    _, tok, _ = load_model(tiny_ckpt)
    llm = _load(llama_cpp, gguf_files["f32"])
    assert _agreement(llm, tok, fixture_corpus(small_corpus(data_dir)), "fixture corpus") >= 0.99
    # A tokenizer trained before every printable ASCII character was a piece has some only as byte
    # pieces; the export declares those as pieces of llama.cpp's, so ASCII text never misses.
    text = "Who are you? Hi!!! ~`^ {x} @y \\z"
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)


@pytest.mark.full_data
def test_llama_cpp_tokenizes_held_out_text_as_pocketlm(llama_cpp, gguf_files, tiny_ckpt: Path, shared_data: Path):
    """Unseen text can hold characters that are no piece of the test's small tokenizer (Devanagari, CJK, emoji,
    rare Latin letters): llama.cpp's unigram tokenizer has no byte fallback for them. Measured 2026-12-03:
    666 of 679 strings (98.1%); every miss holds such a character."""
    _, tok, _ = load_model(tiny_ckpt)
    llm = _load(llama_cpp, gguf_files["f32"])
    assert _agreement(llm, tok, held_out_corpus(shared_data), "held-out text") >= 0.98


def test_ascii_byte_pieces_of_an_older_tokenizer(llama_cpp, shared_data: Path, tmp_path: Path):
    """A tokenizer trained without REQUIRED_CHARS (as before they existed) has ASCII characters that are
    only byte pieces; llama.cpp still tokenizes and detokenizes them as pocketlm does."""
    import sentencepiece as spm
    import torch

    from pocketlm.model import GPT, GPTConfig
    from pocketlm.model.io import save_model
    from pocketlm.tokenizer.tokenizer_sp import SPECIAL_TOKENS, Tokenizer

    with (shared_data / "dolly" / "dolly_15k_from_docx.jsonl").open(encoding="utf-8") as f:
        texts = [json.loads(line)["response"] for _, line in zip(range(300), f)]
    spm.SentencePieceTrainer.train(  # tokenizer_sp's settings of 2026-11-25
        sentence_iterator=iter(texts), model_prefix=str(tmp_path / "old"), model_type="unigram", vocab_size=600,
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, control_symbols=list(SPECIAL_TOKENS), byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        split_digits=True, allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2)
    tok = Tokenizer.load(tmp_path / "old.model")
    text = "Hi!!! ~`^ {x} @y \\z | <b> 100% [ok] #1 & $2 * 3 = 6; é"
    byte_only = [c for c in text if tok.id_to_piece(tok.encode(c)[0]).startswith("<0x")]
    assert len(set(byte_only) - {"é"}) >= 3, byte_only  # the case this test is about
    model = GPT(GPTConfig.tiny(vocab_size=tok.vocab_size))
    ckpt = save_model(tmp_path / "ckpt", model, tok.path, {})
    llm = _load(llama_cpp, export_gguf(ckpt, tmp_path / "old.gguf", "f32"))
    ascii_text = text[:-2]
    assert llm.tokenize(ascii_text.encode(), add_bos=False, special=False) == tok.encode(ascii_text)
    assert llm.detokenize(tok.encode(text)) == text.encode()


def test_llama_cpp_chats_from_text_as_pocketlm(llama_cpp, gguf_files, tiny_ckpt: Path, export_chats, pocketlm_reply,
                                               reply_tokens):
    """f32: the embedded template gives pocketlm's prompt ids and greedy decoding gives its reply."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    model, tok, _ = load_model(tiny_ckpt)
    llm = _load(llama_cpp, gguf_files["f32"])
    assert llm.metadata["tokenizer.ggml.model"] == "t5"
    assert llm.token_eos() == tok.eot_id and llm.metadata["tokenizer.ggml.eot_token_id"] == str(tok.eot_id)
    template = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="<|eot|>", bos_token="")
    for chat in export_chats:
        prompt, reply = pocketlm_reply(model, tok, chat)
        text = template(messages=chat).prompt
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == prompt
        assert _greedy(llm, prompt, tok.eot_id, reply_tokens) == reply
    # The README's line: a chat completion from the messages, greedy, through the embedded template.
    chat = export_chats[1]
    expected = tok.decode(pocketlm_reply(model, tok, chat)[1], skip_special=True)
    answer = llm.create_chat_completion(chat, temperature=0.0, max_tokens=reply_tokens)
    assert answer["choices"][0]["message"]["content"] == expected


def test_llama_cpp_f16_and_q8_0_agreement(llama_cpp, gguf_files, tiny_ckpt: Path, export_chats, pocketlm_reply,
                                          reply_tokens):
    """Smaller weights change the logits a little: report how many reply tokens still match pocketlm's."""
    model, tok, _ = load_model(tiny_ckpt)
    sizes = {dtype: path.stat().st_size for dtype, path in gguf_files.items()}
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]
    for dtype in ("f16", "q8_0"):
        llm = _load(llama_cpp, gguf_files[dtype])
        same = total = 0
        for chat in export_chats:
            prompt, reply = pocketlm_reply(model, tok, chat)
            got = _greedy(llm, prompt, tok.eot_id, reply_tokens)
            prefix = next((i for i, (a, b) in enumerate(zip(got, reply)) if a != b), min(len(got), len(reply)))
            same, total = same + prefix, total + len(reply)
        print(f"\n{dtype}: {same}/{total} reply tokens agree with pocketlm before the first difference")
        assert same > 0


def test_export_gguf_cli_and_bad_input(tiny_ckpt: Path, tmp_path: Path):
    out = tmp_path / "m.gguf"
    assert main(["export", "gguf", "--ckpt", str(tiny_ckpt), "--out", str(out), "--dtype", "q8_0"]) == 0
    assert out.is_file() and not out.with_name("m.gguf.tmp").exists()
    with pytest.raises(PocketLMError, match="--dtype 'q4' is not supported"):
        export_gguf(tiny_ckpt, tmp_path / "x.gguf", "q4")
    assert main(["export", "gguf", "--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "y.gguf")]) == 1
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


def _readme_llama_cpp_line() -> str:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    return next(line for line in readme.splitlines() if line.startswith('python -c "from llama_cpp import Llama'))


def _run_readme_line(folder: Path) -> subprocess.CompletedProcess:
    """The README's llama.cpp line as a user runs it, in `folder` (which holds mine.gguf)."""
    args = shlex.split(_readme_llama_cpp_line())
    assert args[:2] == ["python", "-c"]
    return subprocess.run([sys.executable, "-c", args[2]], cwd=folder, capture_output=True, text=True, timeout=300)


def test_readme_llama_cpp_line_warns_only_below_a_multiple_of_256(llama_cpp, gguf_files, small_tokenizer,
                                                                   tmp_path: Path):
    """llama.cpp rounds every context up to a multiple of 256, whatever n_ctx asks for (0 means the model's
    own), and warns when that exceeds the model's: as the README says, a 256-multiple context loads
    without a word on stderr, the quickstart's 128 with that one warning."""
    from pocketlm.model import GPT, GPTConfig
    from pocketlm.model.io import save_model

    (tmp_path / "256").mkdir()
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny(vocab_size=small_tokenizer.vocab_size, block_size=256))
    ckpt = save_model(tmp_path / "ckpt256", model, small_tokenizer.path, {})
    export_gguf(ckpt, tmp_path / "256" / "mine.gguf", "f32")
    run = _run_readme_line(tmp_path / "256")
    assert run.returncode == 0 and run.stderr == "", run.stderr

    (tmp_path / "128").mkdir()
    shutil.copyfile(gguf_files["f32"], tmp_path / "128" / "mine.gguf")
    run = _run_readme_line(tmp_path / "128")
    assert run.returncode == 0, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "n_ctx_train (128)" in lines[0] and "overflow" in lines[0], run.stderr
    assert run.stdout.strip()
    # The warning is true: llama.cpp's context is 256 for this model, and nothing stops a reply at 128.
    llm = _load(llama_cpp, gguf_files["f32"])
    assert (llm.n_ctx(), llm._model.n_ctx_train(), int(llm.metadata["llama.context_length"])) == (256, 128, 128)
