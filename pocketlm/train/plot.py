"""`pocketlm plot runs/NAME`: loss and bits-per-byte curves from metrics.jsonl, as PNG files in the run."""

from __future__ import annotations

from pathlib import Path

from pocketlm import PocketLMError
from pocketlm.train import metrics


def plot_run(run_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed (servers, CI)
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
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
