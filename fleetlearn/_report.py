"""The end of a simulation: a terminal summary, a JSON report and PNG plots.

Input is the list of per-round records the simulation collected (plain dicts with
``round``, ``accuracy``, ``emulated_time_s`` (cumulative), ``bytes_up``,
``bytes_up_dense``, ``selected``, ``reported``, ``dropped``, each device's
``contributions`` to the round: weight share, consensus cosine, marginal; with
differential privacy ``dp_epsilon`` and ``dp_clip_norm``), per-profile participation
counts and each device's final reputation (with whether the simulation made it
Byzantine). Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from broker_bridge import atomic_write


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def human_time(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def time_to_accuracy(rounds: Sequence[Mapping[str, Any]], target: float) -> dict[str, Any] | None:
    """First round (and emulated time) at which test accuracy reached ``target``."""
    for r in rounds:
        acc = r.get("accuracy")
        if acc is not None and acc >= target:
            return {"round": r["round"], "emulated_time_s": r.get("emulated_time_s")}
    return None


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(
    out_dir: Path,
    rounds: Sequence[Mapping[str, Any]],
    participation: Mapping[str, Mapping[str, int]],
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    evald = [r for r in rounds if r.get("accuracy") is not None]
    x_round = [r["round"] for r in evald]
    acc = [100 * r["accuracy"] for r in evald]

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(x_round, acc, marker=".", color="tab:blue")
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].set_title("accuracy vs round")
    axes[0].grid(alpha=0.3)
    seconds = [r.get("emulated_time_s") or 0.0 for r in evald]
    unit, div = ("h", 3600.0) if max(seconds, default=0) > 7200 else (
        ("min", 60.0) if max(seconds, default=0) > 120 else ("s", 1.0))
    axes[1].plot([s / div for s in seconds], acc, marker=".", color="tab:green")
    axes[1].set_xlabel(f"emulated fleet time ({unit})")
    axes[1].set_ylabel("test accuracy (%)")
    axes[1].set_title("accuracy vs emulated time")
    axes[1].grid(alpha=0.3)
    paths.append(_save(fig, out_dir / "accuracy.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    rr = [r["round"] for r in rounds]
    ax.bar(rr, [r.get("bytes_up_dense", 0) / 1024 for r in rounds], color="lightgray",
           label="dense float32 (baseline)")
    ax.bar(rr, [r.get("bytes_up", 0) / 1024 for r in rounds], color="tab:orange",
           label="actual (compressed)")
    ax.set_xlabel("round")
    ax.set_ylabel("uploaded KB")
    ax.set_yscale("log")
    ax.set_title("upload bytes per round")
    ax.legend()
    paths.append(_save(fig, out_dir / "bytes.png"))

    names = sorted(participation)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names)), 4))
    xs = range(len(names))
    done = [participation[n].get("completed", 0) for n in names]
    dropped = [participation[n].get("dropped", 0) for n in names]
    ax.bar(xs, done, color="tab:blue", label="completed")
    ax.bar(xs, dropped, bottom=done, color="tab:red", label="dropped / missed")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("tasks")
    ax.set_title("participation per device profile")
    ax.legend()
    paths.append(_save(fig, out_dir / "participation.png"))

    private = [r for r in rounds if r.get("dp_epsilon") is not None]
    if private:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        axes[0].plot([r["round"] for r in private], [r["dp_epsilon"] for r in private],
                     marker=".", color="tab:purple")
        axes[0].set_xlabel("round")
        axes[0].set_ylabel("epsilon spent")
        axes[0].set_title("privacy spent (device-level, at the configured delta)")
        axes[0].grid(alpha=0.3)
        axes[1].plot([r["round"] for r in private], [r.get("dp_clip_norm") for r in private],
                     marker=".", color="tab:brown")
        axes[1].set_xlabel("round")
        axes[1].set_ylabel("clipping bound (L2)")
        axes[1].set_title("clipping bound per round")
        axes[1].grid(alpha=0.3)
        paths.append(_save(fig, out_dir / "privacy.png"))
    return paths


def reputation_summary(reputation: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per group (``byzantine``, ``honest``): devices, mean and lowest reputation, how
    many ended below the floor, and the group's share of all the weight the aggregates
    gave (its devices' weight shares added up, over every device's)."""
    total = sum(float(r.get("weight_total", 0.0)) for r in reputation.values())
    out: dict[str, Any] = {}
    for group, byz in (("byzantine", True), ("honest", False)):
        rows = [r for r in reputation.values() if bool(r.get("byzantine")) is byz]
        if not rows:
            continue
        scores = [float(r["reputation"]) for r in rows]
        out[group] = {
            "devices": len(rows),
            "mean_reputation": round(sum(scores) / len(scores), 4),
            "min_reputation": round(min(scores), 4),
            "distrusted": sum(1 for r in rows if r.get("distrusted")),
            "weight_share": (round(sum(float(r.get("weight_total", 0.0)) for r in rows)
                                   / total, 4) if total > 0 else None),
        }
    return out


def write_reputation_plot(out_dir: Path, rounds: Sequence[Mapping[str, Any]],
                          reputation: Mapping[str, Mapping[str, Any]], *,
                          floor: float | None) -> list[Path]:
    """``reputation.png``: each device's final reputation (Byzantine ones in red), and
    per round the weight share the aggregate gave Byzantine devices and the mean
    consensus cosine of honest and Byzantine updates."""
    if not reputation:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    ranked = sorted(reputation.items(), key=lambda kv: kv[1]["reputation"])
    colors = ["tab:red" if r["byzantine"] else "tab:blue" for _, r in ranked]
    xs_rank = list(range(len(ranked)))
    axes[0].bar(xs_rank, [r["reputation"] for _, r in ranked], color=colors, alpha=0.5)
    axes[0].scatter(xs_rank, [r["reputation"] for _, r in ranked], color=colors, s=12,
                    zorder=3)  # a reputation of 0 has no bar: the dot shows it
    if floor is not None:
        axes[0].axhline(floor, color="black", linestyle="--", linewidth=1,
                        label=f"floor {floor:g}")
        axes[0].legend(loc="lower right")
    axes[0].set_xlabel("devices, by reputation (red: Byzantine)")
    axes[0].set_ylabel("reputation")
    axes[0].set_ylim(0, 1.05)
    axes[0].set_title("final reputation per device")

    byzantine = {d for d, r in reputation.items() if r["byzantine"]}
    xs, share, cos_honest, cos_byz = [], [], [], []
    for r in rounds:
        records = r.get("contributions") or []
        if not records:
            continue
        xs.append(r["round"])
        share.append(100 * sum(c["weight"] for c in records if c["device"] in byzantine))
        honest = [c["cosine"] for c in records
                  if c["device"] not in byzantine and c["cosine"] is not None]
        byz = [c["cosine"] for c in records if c["device"] in byzantine and c["cosine"] is not None]
        cos_honest.append(sum(honest) / len(honest) if honest else float("nan"))
        cos_byz.append(sum(byz) / len(byz) if byz else float("nan"))
    ax = axes[1]
    ax.plot(xs, cos_honest, marker=".", color="tab:blue", label="cosine, honest")
    if byzantine:
        ax.plot(xs, cos_byz, marker="x", linestyle="none", color="tab:red",
                label="cosine, Byzantine")
        twin = ax.twinx()
        twin.bar(xs, share, color="tab:red", alpha=0.25, label="Byzantine weight share")
        twin.set_ylabel("Byzantine weight share (%)")
        twin.set_ylim(0, 100)
    ax.set_xlabel("round")
    ax.set_ylabel("mean consensus cosine")
    ax.set_ylim(-1, 1)
    ax.axhline(0, color="gray", linewidth=0.5)
    ax.legend(loc="lower left")
    ax.set_title("contributions per round")
    return [_save(fig, out_dir / "reputation.png")]


def write_report(out_dir: Path, report: Mapping[str, Any]) -> Path:
    path = out_dir / "report.json"
    atomic_write(path, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    return path


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    rounds = report.get("rounds", [])
    final = report.get("final_accuracy")
    lines = [
        "",
        "fleetlearn simulation finished",
        f"  model {report.get('model')}, {report.get('devices')} devices "
        f"({report.get('per_round')} per round, {report.get('selection')} selection, "
        f"{report.get('mode')} rounds), codec {report.get('codec')}",
        f"  rounds completed: {len(rounds)}"
        + (f", abandoned: {report['abandoned_rounds']}" if report.get("abandoned_rounds") else ""),
        f"  final test accuracy: {100 * final:.1f}%" if final is not None else
        "  final test accuracy: n/a",
    ]
    for target, hit in sorted(report.get("time_to_accuracy", {}).items()):
        if hit:
            lines.append(f"  reached {float(target) * 100:.0f}% at round {hit['round']} "
                         f"({human_time(hit['emulated_time_s'] or 0.0)} emulated)")
        else:
            lines.append(f"  did not reach {float(target) * 100:.0f}%")
    privacy = report.get("privacy")
    if privacy:
        target = privacy.get("epsilon_target")
        lines.append(
            "  differential privacy"
            + (" (distributed: Skellam noise added on the devices under secure aggregation)"
               if privacy.get("mechanism") == "skellam" else "")
            + f": epsilon {privacy['epsilon_spent']:.3g} spent at delta "
            f"{privacy['delta']:g} over {privacy['rounds_charged']} rounds"
            + (f" (budget {target:g})" if target is not None else "")
            + (", amplified by sampling" if privacy.get("amplified") else
               ", no amplification by sampling"))
        if privacy.get("stopped"):
            lines.append(f"  stopped early: {privacy['stopped']}")
    up = report.get("bytes_up", 0)
    dense = report.get("bytes_up_dense", 0)
    if dense:
        lines.append(f"  uploaded {_human_bytes(up)} (dense float32 would be "
                     f"{_human_bytes(dense)}: {dense / max(up, 1):.1f}x less)")
    groups = report.get("reputation_summary") or {}
    for group in ("honest", "byzantine"):
        g = groups.get(group) if "byzantine" in groups else None
        if g:
            share = g["weight_share"]
            lines.append(f"  {group} devices ({g['devices']}): mean reputation "
                         f"{g['mean_reputation']:.2f}, {g['distrusted']} below the floor, "
                         + ("no weight" if share is None else f"{100 * share:.1f}% of the weight"))
    lines.append(f"  emulated fleet time {human_time(report.get('emulated_time_s', 0.0))}, "
                 f"wall time {human_time(report.get('wall_time_s', 0.0))}")
    return lines
