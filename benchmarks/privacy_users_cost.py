"""The picture docs/img/privacy_users_cost.png: what DP costs with users as clients
(tuning/privacy_users.yaml), each trial's test AUC against the no-DP trial of its seed and LoRA mode,
paired on that seed's 500 test rows, and the mean over seeds.

The figures are those of docs/results.md's tables ("Points measured" and "Seed 1 of separate, and
ffa at seeds 0 and 1"), each `fedsim compare RUN_A RUN_B` on the two trials' predictions. Most of
those run directories are gone (the machines they ran on were replaced), so the mean over seeds is
`fedsim.metrics.pooled_mean` of the seeds' figures: their errors taken as independent, as their test
rows nearly are (a seed draws its own 500; seeds 0 and 1 scored 951 distinct rows). Where all the
seeds' runs are kept, `fedsim compare SWEEP_DIR --against ...` resamples their rows instead.

    python benchmarks/privacy_users_cost.py --out docs/img/privacy_users_cost.png
"""
from __future__ import annotations

import argparse

from fedsim.metrics import pooled_mean
from fedsim.report import pyplot, save_figure

# (kind, LoRA mode, epsilon) -> {seed: (test AUC - no DP, 95 % low, high)}, paired on the seed's rows
PAIRED = {
    ("client", "separate", 8): {0: (-0.008, -0.015, -0.001), 1: (0.002, -0.005, 0.009), 2: (-0.015, -0.023, -0.007)},
    ("client", "separate", 4): {0: (-0.012, -0.024, -0.000), 1: (-0.004, -0.017, 0.009), 2: (-0.014, -0.023, -0.005)},
    ("client", "separate", 2): {0: (-0.047, -0.071, -0.021), 1: (-0.074, -0.107, -0.042), 2: (-0.032, -0.049, -0.013)},
    ("client", "separate", 1): {0: (-0.146, -0.195, -0.091), 1: (-0.143, -0.198, -0.088)},
    ("record", "separate", 8): {0: (-0.042, -0.066, -0.021), 1: (-0.038, -0.057, -0.020)},
    ("record", "separate", 2): {0: (-0.043, -0.067, -0.021), 1: (-0.038, -0.058, -0.021)},
    ("client", "ffa", 2): {0: (-0.017, -0.030, -0.004), 1: (-0.020, -0.036, -0.007)},
}
SEED_STYLE = {0: ("o", "tab:blue"), 1: ("s", "tab:orange"), 2: ("^", "tab:purple")}


def means() -> dict:
    """(kind, mode, epsilon) -> (pooled_mean's dict, seeds), for the points with two seeds or more."""
    return {k: (pooled_mean(list(v.values())), sorted(v)) for k, v in PAIRED.items() if len(v) > 1}


def table() -> str:
    rows = ["| DP | LoRA mode | " + " | ".join(f"seed {s}" for s in SEED_STYLE) + " | mean over seeds |",
            "|---|---|" + "---|" * (len(SEED_STYLE) + 1)]
    pooled = means()
    cell = lambda d, lo, hi: f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]"  # noqa: E731
    for (kind, mode, eps), seeds in PAIRED.items():
        m = pooled.get((kind, mode, eps))
        rows.append(f"| {kind}-level ε = {eps} | `{mode}` | " + " | ".join(cell(*seeds[s]) if s in seeds else "—" for s in SEED_STYLE)
                    + " | " + (cell(m[0]["diff"], m[0]["low"], m[0]["high"]) if m else "—") + " |")
    return "\n".join(rows)


def plot(path: str) -> None:
    plt = pyplot()
    pooled = means()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    for ax, kind, title in ((axes[0], "client", "client-level DP-FedAvg"), (axes[1], "record", "record-level DP-SGD on each client")):
        ax.axhline(0, color="grey", ls="--", lw=1, label="no DP (each seed's own)")
        # on a log axis, each seed's point a little left of its epsilon and the mean right of it; ffa further right
        for mode, colour, dx in (("separate", "black", 0.93), ("ffa", "tab:green", 1.13)):
            keys = sorted((k for k in PAIRED if k[0] == kind and k[1] == mode), key=lambda k: k[2])
            for seed, (marker, c) in SEED_STYLE.items():
                pts = [(k[2], PAIRED[k][seed]) for k in keys if seed in PAIRED[k]]
                if pts:
                    x = [e * dx * (0.97 + 0.025 * seed) for e, _ in pts]
                    ax.errorbar(x, [p[0] for _, p in pts], yerr=[[p[0] - p[1] for _, p in pts], [p[2] - p[0] for _, p in pts]],
                                fmt=marker, color=c if mode == "separate" else colour, mfc="white" if mode == "ffa" else c,
                                alpha=0.7, capsize=3, ms=5, label=f"{mode}, seed {seed}")
            mk = [k for k in keys if k in pooled]
            if mk:
                m = [pooled[k][0] for k in mk]
                xs = [k[2] * dx * 1.07 for k in mk]
                ax.errorbar(xs, [d["diff"] for d in m], fmt="D-", color=colour, capsize=4, ms=7, lw=1.5,
                            yerr=[[d["diff"] - d["low"] for d in m], [d["high"] - d["diff"] for d in m]],
                            label=f"{mode}, mean over seeds (n: how many)")
                for x, k, d in zip(xs, mk, m):
                    ax.annotate(f"n={len(pooled[k][1])}", (x, d["diff"]), textcoords="offset points", xytext=(7, -3),
                                ha="left", fontsize=7, color=colour)
        eps = sorted({k[2] for k in PAIRED if k[0] == kind})
        ax.set_xscale("log")
        ax.set_xticks(eps, [str(e) for e in eps])
        ax.minorticks_off()
        ax.set_xlim(min(eps) / 1.4, max(eps) * 1.4)
        ax.set_xlabel(f"{kind}-level ε (target; δ = 1e-5)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("test AUC − no DP, paired (bars: 95 % CI)")
    fig.suptitle("What DP costs with users as clients (64 of 200 a round, 6 rounds, SmolLM2-135M)")
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="privacy_users_cost.png")
    a = ap.parse_args()
    plot(a.out)
    print(table())
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
