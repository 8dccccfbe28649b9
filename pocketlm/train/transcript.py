"""The chat model judged on held-out prompts through `pocketlm serve` and the `openai` client.

Starts `pocketlm serve` on a free local port, asks every prompt of `heldout_prompts.txt` (written for
this purpose, in no training set: half instructions, half open questions) once greedy and once
sampled, and reports the share of replies that end on `<|eot|>` (finish_reason "stop") before the
token limit and the share that repeat a phrase 3+ times. Writes transcript.jsonl and transcript.md.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pocketlm import PocketLMError

PROMPTS_FILE = Path(__file__).resolve().parent / "heldout_prompts.txt"
MODES = {"greedy": {"temperature": 0.0}, "sampled": {"temperature": 0.8, "top_p": 0.95}}
PHRASE_WORDS = 4  # a "phrase" is this many words in a row
PHRASE_TIMES = 3


def heldout_prompts(path: Path = PROMPTS_FILE) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")]


def repeats_phrase(text: str, words: int = PHRASE_WORDS, times: int = PHRASE_TIMES) -> bool:
    """True when some run of `words` consecutive words occurs `times` times or more in `text`."""
    tokens = re.findall(r"\w+", text.lower())
    grams = Counter(tuple(tokens[i:i + words]) for i in range(len(tokens) - words + 1))
    return any(n >= times for n in grams.values())


@dataclass
class Reply:
    prompt: str
    mode: str
    text: str
    finish_reason: str

    @property
    def ended(self) -> bool:
        return self.finish_reason == "stop"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, client, timeout: float) -> None:
    """Poll /v1/models until the server answers (it loads the model first), or fail with its stderr."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PocketLMError(f"pocketlm serve exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            client.models.list()
            return
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(0.5)
    raise PocketLMError(f"pocketlm serve did not answer within {timeout:.0f} s")


def ask_all(ckpt: str | Path, prompts: list[str], max_tokens: int, device: str = "auto",
            startup_timeout: float = 180.0) -> list[Reply]:
    from openai import OpenAI

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pocketlm", "serve", "--ckpt", str(ckpt), "--port", str(port),
                             "--device", device], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    try:
        _wait_ready(proc, client, startup_timeout)
        replies = []
        for mode, params in MODES.items():
            for i, prompt in enumerate(prompts):
                r = client.chat.completions.create(model=str(ckpt), messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=max_tokens, seed=i, **params)
                choice = r.choices[0]
                replies.append(Reply(prompt, mode, choice.message.content or "", choice.finish_reason))
        return replies
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def ask_model(model, tok, prompts: list[str], max_tokens: int, modes: dict[str, dict] | None = None,
              decoding: dict | None = None) -> list[Reply]:
    """The questions of `ask_all` asked in this process (no server), with the same settings the API
    route uses: each prompt as one user message, seed = the prompt's index, finish_reason "stop" on
    `<|eot|>` and "length" otherwise. `decoding` adds GenConfig fields (e.g. repeat_penalty) to every mode."""
    from pocketlm.infer.chat import chat_prompt_ids
    from pocketlm.infer.generate import generate
    from pocketlm.infer.sampling import GenConfig

    replies = []
    for mode, params in (modes or MODES).items():
        for i, prompt in enumerate(prompts):
            cfg = GenConfig(max_new_tokens=max_tokens, seed=i, **{"top_p": 1.0, **params, **(decoding or {})})
            gen = generate(model, tok, chat_prompt_ids(tok, [{"role": "user", "content": prompt}]), cfg)
            text = "".join(s.text for s in gen if s.id != tok.eot_id)
            replies.append(Reply(prompt, mode, text, "stop" if gen.finish_reason == "eot" else "length"))
    return replies


def summary(replies: list[Reply]) -> dict[str, dict[str, float]]:
    """Per decoding mode: replies, the share that ended on `<|eot|>` and the share that loop (repeat a
    PHRASE_WORDS-word phrase PHRASE_TIMES+ times)."""
    out = {}
    for mode in dict.fromkeys(r.mode for r in replies):
        rs = [r for r in replies if r.mode == mode]
        out[mode] = {"n": len(rs), "ended_on_eot": sum(r.ended for r in rs) / max(1, len(rs)),
                     "repeats_phrase": sum(repeats_phrase(r.text) for r in rs) / max(1, len(rs))}
    return out


def write_transcript(replies: list[Reply], out_dir: Path, max_tokens: int) -> dict[str, dict[str, float]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = summary(replies)
    with (out_dir / "transcript.jsonl").open("w", encoding="utf-8") as f:
        for r in replies:
            f.write(json.dumps({"prompt": r.prompt, "mode": r.mode, "text": r.text, "finish_reason": r.finish_reason,
                                "repeats_phrase": repeats_phrase(r.text)}) + "\n")
    lines = [f"max_tokens {max_tokens}; sampled = temperature {MODES['sampled']['temperature']}, top_p "
             f"{MODES['sampled']['top_p']}, seed = prompt index", ""]
    for mode, s in stats.items():
        lines.append(f"- {mode}: {s['ended_on_eot']:.0%} of {s['n']} ended on <|eot|>; "
                     f"{s['repeats_phrase']:.0%} repeat a {PHRASE_WORDS}-word phrase {PHRASE_TIMES}+ times")
    for r in replies:
        flag = "" if r.ended else " [cut at max_tokens]"
        flag += " [repeats]" if repeats_phrase(r.text) else ""
        lines += ["", f"**{r.mode}** · *{r.prompt}*{flag}", "", "> " + r.text.strip().replace("\n", "\n> ")]
    (out_dir / "transcript.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return stats
