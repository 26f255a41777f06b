"""Tables and plots of measured subnets, for training's final evaluation and for search.

Both read records of the shape ``{"name", "macs", "params", "top1", ...}`` (top-1 as a fraction).
"""

from __future__ import annotations


def _percent(value) -> str:
  return "-" if value is None else f"{100 * value:.2f}%"


def format_table(records: list[dict], columns: list[tuple[str, str]] | None = None) -> str:
  """A fixed-width table sorted by MACs. ``columns``: extra (key, header) pairs printed before
  the name, e.g. ``[("target_macs", "target MACs"), ("test_top1", "test top-1")]``; a pair whose
  key is one of the first three columns renames it instead (search's ``("top1", "val top-1")``).
  Keys ending in ``top1`` print as percentages, in ``latency_ms`` with three decimals."""
  extra = dict(columns or [])
  columns = [(k, extra.pop(k, h)) for k, h in (("macs", "MACs"), ("params", "params"),
                                                ("top1", "top-1"))] + list(extra.items())

  def cell(record, key):
    value = record.get(key)
    if key.endswith("top1"):
      return _percent(value)
    if key.endswith("latency_ms"):
      return "-" if value is None else f"{value:.3f}"
    return "-" if value is None else f"{value:,.0f}"

  rows = [[cell(r, k) for k, _ in columns] + [r["name"]]
          for r in sorted(records, key=lambda r: r["macs"])]
  widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, (_, h) in enumerate(columns)]
  head = "  ".join(f"{h:>{w}}" for (_, h), w in zip(columns, widths)) + "  subnet"
  return "\n".join([head] + ["  ".join(f"{c:>{w}}" for c, w in zip(row, widths))
                             + f"  {row[-1]}" for row in rows])


def plot_accuracy_vs_macs(path: str, title: str, evaluated: list[dict],
                          front: list[dict] = (), chosen: list[dict] = (),
                          targets=(), ylabel: str = "top-1 (%)") -> None:
  """A PNG of top-1 against MACs: every evaluated subnet (largest and smallest marked), and
  optionally a Pareto front, chosen subnets and vertical lines at MACs targets."""
  import matplotlib  # pylint: disable=g-import-not-at-top  (only when a plot is written)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
  mark = {"largest": ("tab:red", "largest"), "smallest": ("tab:blue", "smallest")}
  for r in evaluated:
    color, label = mark.get(r["name"], ("tab:gray", None))
    ax.scatter(r["macs"] / 1e6, 100 * r["top1"], s=10, color=color, label=label,
               alpha=1.0 if label else 0.5)
  if front:
    ax.plot([r["macs"] / 1e6 for r in front], [100 * r["top1"] for r in front], "-o", ms=3,
            color="tab:red", label="Pareto front")
  if chosen:
    ax.scatter([r["macs"] / 1e6 for r in chosen], [100 * r["top1"] for r in chosen],
               marker="*", s=120, color="tab:blue", zorder=3, label="chosen")
  for t in targets:
    ax.axvline(t / 1e6, color="tab:blue", ls=":", lw=0.8)
  ax.set_xlabel("MACs (M)")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  handles, labels = ax.get_legend_handles_labels()
  if handles:
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), loc="lower right", fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
