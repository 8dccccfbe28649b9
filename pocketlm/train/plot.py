"""`pocketlm plot runs/NAME`: loss and bits-per-byte curves from metrics.jsonl, as PNG files in the run."""

from __future__ import annotations

from pathlib import Path

from pocketlm import PocketLMError
from pocketlm.train import metrics


def find_run(folder: Path) -> Path:
    """The run folder meant by `folder`: itself, the run around a phase folder (runs/NAME/sft), or the one
    run inside a folder that holds it (a quickstart's --out holds its run in run/)."""
    if (folder / "metrics.jsonl").is_file():
        return folder
    if not folder.is_dir():
        raise PocketLMError(f"{folder} not found: pass a run folder (runs/NAME, or a quickstart's runs/quickstart/run)")
    around = [p for p in (folder.parent, folder.parent.parent) if (p / "metrics.jsonl").is_file()]
    inside = sorted(p.parent for p in folder.glob("*/metrics.jsonl"))
    found = around[:1] or inside
    if len(found) == 1:
        return found[0]
    if found:
        raise PocketLMError(f"{folder} holds several runs: pass one of {', '.join(str(p) for p in found)}")
    raise PocketLMError(f"{folder} has no metrics.jsonl: pass a run folder that has trained (runs/NAME)")


def plot_run(run_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed (servers, CI)
    import matplotlib.pyplot as plt

    run_dir = find_run(Path(run_dir))
    records = metrics.read(run_dir / "metrics.jsonl")
    if not records:
        raise PocketLMError(f"{run_dir / 'metrics.jsonl'} is missing or empty: pass a run folder that has trained")
    phases = [p for p in metrics.PHASE_ORDER if any(r["phase"] == p for r in records)]
    outputs = []
    for name, key, title in (("loss.png", "loss", "loss (nats/token)"), ("bpb.png", "bpb", "bits per byte")):
        fig, axes = plt.subplots(1, len(phases), figsize=(6 * len(phases), 4), squeeze=False)
        for ax, phase in zip(axes[0], phases):
            rows = [r for r in records if r["phase"] == phase]
            if key == "loss":
                train = [r for r in rows if r["kind"] == "train"]
                ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", alpha=0.6)
            sources = sorted({r["source"] for r in rows if r["kind"] == "eval" and key in r})
            for source in sources:
                ev = [r for r in rows if r["kind"] == "eval" and r["source"] == source]
                ax.plot([r["step"] for r in ev], [r[key] for r in ev], marker="o", label=f"val {source}")
            ax.set(title=f"{phase}: {title}", xlabel="step")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / name, dpi=100)
        plt.close(fig)
        outputs.append(run_dir / name)
    return outputs
