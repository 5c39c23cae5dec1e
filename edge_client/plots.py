"""PNG plots of training runs: loss, held-out accuracy, bytes per step, Kill-and-Revive live sets.

matplotlib is imported lazily so training never depends on it.
"""
from __future__ import annotations

from pathlib import Path


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install matplotlib (or `make install`)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _line_axes(ax, ylabel: str) -> None:
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()


def loss_curves(runs: dict[str, list[dict]], path: Path, smooth: int = 5) -> Path:
    """One line per run: training loss per step (and a moving average)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, hist in runs.items():
        steps = [h["step"] for h in hist]
        loss = [h["loss"] for h in hist]
        windows = [loss[max(0, i - smooth + 1):i + 1] for i in range(len(loss))]
        avg = [sum(w) / len(w) for w in windows]
        line, = ax.plot(steps, avg, label=label, linewidth=1.8)
        ax.plot(steps, loss, color=line.get_color(), alpha=0.2, linewidth=0.8)
    ax.set_yscale("log")
    _line_axes(ax, f"training loss ({smooth}-step moving average)")
    return _save(plt, fig, path)


def live_matrix(live_sets: list[dict], modules: list[str], steps: int) -> list[list[int]]:
    """rows = modules, columns = steps 1..N; 1 where the module was live during that step.

    A selection made after step t applies from step t + 1.
    """
    updates = sorted(live_sets, key=lambda e: e["step"])
    rows = [[0] * steps for _ in modules]
    index = {m: i for i, m in enumerate(modules)}
    for k, entry in enumerate(updates):
        first = entry["step"] + 1
        last = updates[k + 1]["step"] if k + 1 < len(updates) else steps
        for m in entry["live"]:
            for t in range(first, last + 1):
                rows[index[m]][t - 1] = 1
    return rows


def live_heatmap(live_sets: list[dict], modules: list[str], steps: int, path: Path, title: str) -> Path:
    """Which modules were live over time: layer x module against steps."""
    plt = _plt()
    matrix = live_matrix(live_sets, modules, steps)
    fig, ax = plt.subplots(figsize=(9, max(4, len(modules) * 0.06 + 1.5)))
    ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap="Greens", vmin=0, vmax=1,
              extent=(0.5, steps + 0.5, len(modules) - 0.5, -0.5))
    from common.model_parts import layer_index

    # One tick per layer at its first module; modules of a layer follow in model order.
    firsts: dict[int, int] = {}
    for i, m in enumerate(modules):
        firsts.setdefault(layer_index(m), i)
    leaves = []
    for m in modules:
        leaf = m.rsplit(".", 1)[-1]
        if leaf not in leaves:
            leaves.append(leaf)
    every = max(1, len(firsts) // 30)
    ticks = [(row, layer) for k, (layer, row) in enumerate(sorted(firsts.items())) if k % every == 0]
    ax.set_yticks([r for r, _ in ticks])
    ax.set_yticklabels([f"layer {layer}" for _, layer in ticks], fontsize=6)
    for row in firsts.values():
        ax.axhline(row - 0.5, color="0.85", linewidth=0.3)
    ax.set_xlabel("step")
    ax.set_ylabel(f"module ({', '.join(leaves)} within each layer)")
    ax.set_title(title)
    return _save(plt, fig, path)


def bytes_per_step(history: list[dict], path: Path) -> Path:
    """Megabytes on the wire per step, each direction."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["bytes_sent"] / 1e6 for h in history], label="edge -> cloud")
    ax.plot(steps, [h["bytes_received"] / 1e6 for h in history], label="cloud -> edge")
    _line_axes(ax, "MB per step")
    return _save(plt, fig, path)


def heldout_curve(evals: list[dict], path: Path) -> Path:
    """Held-out accuracy (or loss) at each evaluation: before, every --eval-every steps, after."""
    plt = _plt()
    key = next(k for k in ("accuracy", "rouge_l", "loss") if k in evals[0])
    fig, ax = plt.subplots(figsize=(8, 4))
    ys = [e[key] * (100 if key == "accuracy" else 1) for e in evals]
    ax.plot([e["step"] for e in evals], ys, marker="o", label=f"held-out {key}")
    _line_axes(ax, {"accuracy": "held-out accuracy (%)", "rouge_l": "held-out ROUGE-L"}.get(key, "held-out loss"))
    return _save(plt, fig, path)


def report(run_dir: Path) -> list[Path]:
    """Render every plot a run.json supports into run_dir; returns the files written."""
    import json

    doc = json.loads((run_dir / "run.json").read_text())
    hist, summary = doc["history"], doc["summary"]
    out = [loss_curves({summary.get("policy", "run"): hist}, run_dir / "loss.png"),
           bytes_per_step(hist, run_dir / "bytes.png")]
    evals = doc.get("evals") or []
    if evals:
        name = "accuracy.png" if "accuracy" in evals[0] else "heldout_loss.png"
        out.append(heldout_curve(evals, run_dir / name))
    lives = doc.get("live_sets") or []
    if len(lives) > 1:
        from common.model_parts import layer_index
        modules = sorted(lives[0]["live"], key=lambda m: (layer_index(m), m))
        out.append(live_heatmap(lives, modules, len(hist), run_dir / "live.png",
                                f"live modules, policy {summary.get('policy')}"))
    return out
