"""Pictures of a run: the distilled images per class, and the spectral filters f(λ) over
the real Ψ spectrum of every site (the paper's Fig. 1 idea, on real statistics)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .. import filters  # noqa: E402
from ..errors import ConfigError  # noqa: E402
from ..real_stats import RealStats, atomic_write  # noqa: E402
from ..schedule import beta_schedule  # noqa: E402
from .distilled import INDEX_FILE, read_index, read_set  # noqa: E402

MAX_CLASSES = 20  # rows of one grid; larger sets show their first classes


def image_grid(distilled: Path, path: Path, max_classes: int = MAX_CLASSES) -> None:
    """PNG grid of a distilled set (its ``distilled.json``): one row per class, one column per
    image of the class."""
    images, labels = read_set(distilled, max_classes)
    classes = sorted(set(labels.tolist()))
    ipc = max(int((labels == c).sum()) for c in classes)
    fig, axes = plt.subplots(len(classes), ipc, figsize=(0.9 * ipc + 0.6, 0.9 * len(classes) + 0.4), squeeze=False)
    for row, c in enumerate(classes):
        members = images[labels == c]
        for col in range(ipc):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col < members.shape[0]:
                img = members[col].permute(1, 2, 0).numpy()
                ax.imshow(img[:, :, 0] if img.shape[2] == 1 else img, cmap="gray", vmin=0, vmax=255)
            if col == 0:
                ax.set_ylabel(str(c), rotation=0, labelpad=12, fontsize=8)
    fig.suptitle(f"{distilled.parent.name}: {read_index(distilled)['count']} images", fontsize=9)
    _save(fig, path)


def filter_responses(stats: RealStats, path: Path, beta: float, beta_min: float = 1e-6, steps: int = 5) -> None:
    """One panel per site: f(λ)/max f over the eigenvalues λ of the real Ψ, for the CFM
    filter (λ + β_t)⁻¹ along the cosine curriculum, low-pass (DC) and all-pass (DM)."""
    names = stats.sites
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, name in zip(axes.flat, names):
        lam = torch.linalg.eigvalsh(stats[name].psi.double()).clamp(min=0).flip(0)
        x = torch.arange(1, lam.numel() + 1)
        curves = [(f"β_t={b:.3g}", filters.krr(b), cmap(i / max(steps - 1, 1)))
                  for i, b in enumerate(beta_schedule(beta, t, steps - 1, "cosine", beta_min) for t in range(steps))]
        curves += [("low-pass (DC)", filters.low_pass(), "tab:red"), ("all-pass (DM)", filters.all_pass(), "tab:gray")]
        for label, f, color in curves:
            response = f(lam)
            ax.plot(x, (response / response.abs().max()).numpy(), label=label, color=color, lw=1.2)
        ax.set_xscale("log")
        ax.set_title(f"{name} (d={lam.numel()})", fontsize=8)
        ax.set_xlabel("eigenvalue rank (large λ → small λ)", fontsize=7)
        ax.set_ylabel("f(λ) / max", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle("filter responses over the real Ψ spectrum: high-pass CFM vs. low-/all-pass", fontsize=9)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def run(root, stats_path=None, beta: float = 0.1, beta_min: float = 1e-6) -> list[Path]:
    """Write ``<root>/show/*.png`` for every distilled set under ``root`` and, when
    statistics are known, the filter plot. Returns the written paths."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{root} does not exist; `unidd-fast show` takes a recover or distill run directory")
    sets = sorted(root.rglob(INDEX_FILE))
    if not sets and stats_path is None:
        raise ConfigError(f"{root} holds no {INDEX_FILE} and no statistics were given: run `unidd-fast recover` "
                          "first, or pass --stats FILE")
    written = []
    for distilled in sets:
        rel = distilled.parent.relative_to(root)
        name = "grid" if rel == Path(".") else "grid_" + "_".join(rel.parts)
        image_grid(distilled, root / "show" / f"{name}.png")
        written.append(root / "show" / f"{name}.png")
    if stats_path:
        filter_responses(RealStats.load(stats_path), root / "show" / "filters.png", beta, beta_min)
        written.append(root / "show" / "filters.png")
    return written
