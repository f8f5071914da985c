"""Draw the benchmark figures in docs/images/ from the results JSON files.

Usage (needs matplotlib: `pip install -e .[bench]`):

    python benchmarks/plot.py

Reads (each optional; a missing file skips its figure):

- `results-es-2cpu.json` (`bench_es_d_rtrl.py`) → `time-ratios.png`, time relative to BPTT per
  method and configuration (with braintrace's pp_prop from `results-es-braintrace-2cpu.json`),
- `results-memory-2cpu.json` (`memory_sweep.py`) → `memory-vs-T.png`, XLA temp memory vs T,
- `results-adding-2cpu.json` (`adding_curves.py`) → `adding-problem-loss.png`,
- `results-tasks-2cpu.json` (`task_suite.py`) → `task-suite.png`, each rule's test metric per task.
"""

import argparse
import json
import pathlib


HERE = pathlib.Path(__file__).resolve().parent
METHODS = {  # key: (label, colour, marker)
    "es_d_rtrl": ("ES-D-RTRL", "tab:green", "o"),
    "d_rtrl": ("D-RTRL", "tab:blue", "s"),
    "bptt": ("BPTT", "tab:red", "^"),
    "forward": ("forward only", "tab:gray", "x"),
}


def load(name):
    path = HERE / name
    if not path.exists():
        print(f"{name} not found: skipping its figure")
        return None
    return json.loads(path.read_text())


def plot_memory(data, out, plt):
    cells = list(dict.fromkeys(r["cell"] for r in data["rows"]))
    fig, axes = plt.subplots(1, len(cells), figsize=(5.2 * len(cells), 4), squeeze=False, sharey=True)
    for ax, cell in zip(axes[0], cells):
        rows = sorted((r for r in data["rows"] if r["cell"] == cell), key=lambda r: r["T"])
        Ts = [r["T"] for r in rows]
        for key, (label, colour, marker) in METHODS.items():
            mib = [r[key]["temp_bytes"] / 2**20 for r in rows]
            ax.plot(Ts, mib, marker=marker, color=colour, label=label)
        r0 = rows[0]
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="sequence length T",
            title=f"{cell}, n={r0['n']}, batch {r0['batch']}",
        )
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel("XLA temp memory (MiB)")
    axes[0][0].legend()
    fig.suptitle("Memory of one jitted gradient call vs T (CPU)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_ratios(data, bt, out, plt):
    rows = data["eqtrace"]
    cells = list(dict.fromkeys(r["cell"] for r in rows))
    btd = {(r["cell"], r["n"], r["batch"], r["T"]): r for r in (bt or {}).get("braintrace") or []}
    series = [k for k in METHODS if k != "bptt"]
    fig, axes = plt.subplots(len(cells), 1, figsize=(10, 2.9 * len(cells)), squeeze=False, sharey=True)
    width = 0.2
    for ax, cell in zip(axes[:, 0], cells):
        rs = [r for r in rows if r["cell"] == cell]
        xs = range(len(rs))
        for j, key in enumerate(series):
            label, colour, _ = METHODS[key]
            ys = [r[key]["time_s"] / r["bptt"]["time_s"] for r in rs]
            ax.bar([x + (j - 1.5) * width for x in xs], ys, width, color=colour, label=label)
        bys = [btd.get((r["cell"], r["n"], r["batch"], r["T"])) for r in rs]
        bx = [x + 1.5 * width for x, b in zip(xs, bys) if b]
        if bx:
            ax.bar(
                bx,
                [b["braintrace_multi_s"] / b["eqtrace_bptt_s"] for b in bys if b],
                width,
                color="tab:orange",
                label="braintrace pp_prop (multi-step)",
            )
        ax.axhline(1.0, color="tab:red", lw=1, ls="--", label="BPTT")
        ax.set_yscale("log")
        ax.set_xticks(list(xs), [f"n={r['n']}\nB={r['batch']} T={r['T']}" for r in rs], fontsize=8)
        ax.set_title(cell, loc="left", fontsize=10)
        ax.set_ylabel("time / BPTT time")
        ax.grid(True, axis="y", which="major", alpha=0.3)
    axes[0][0].legend(ncol=5, fontsize=8, loc="upper left")
    fig.suptitle("Wall time relative to BPTT (2-core CPU; lower is faster)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_adding(data, out, plt):
    cfg = data["config"]
    fig, ax = plt.subplots(figsize=(7, 4))
    window = 50
    for key, losses in data["losses"].items():
        label, colour, _ = METHODS[key]
        smooth = [
            sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))
        ]
        ax.plot(range(1, len(losses) + 1), smooth, color=colour, label=label)
    ax.axhline(cfg["baseline"], color="black", lw=1, ls=":", label="baseline (predict 1.0)")
    ax.set(
        yscale="log",
        xlabel="training step",
        ylabel=f"MSE (running mean of {window} steps)",
        title=f"Adding problem: GRU n={cfg['hidden']}, T={cfg['seq_len']}, batch {cfg['batch']}, "
        f"Adam {cfg['lr']:g}",
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_tasks(data, out, plt):
    """One panel per task: each rule's final test metric, mean ± std over seeds, chance dashed; a
    rule that failed or was skipped is marked on its row."""
    tasks = data["tasks"]
    rules = list(dict.fromkeys(r["rule"] for r in data["rows"]))
    cols = 3
    fig, axes = plt.subplots(
        -(-len(tasks) // cols), cols, figsize=(4.6 * cols, 0.3 * len(rules) * 2 + 3), squeeze=False
    )
    for ax, task in zip(axes.flat, tasks):
        rows = {r["rule"]: r for r in data["rows"] if r["task"] == task["name"]}
        acc = task["metric"] == "accuracy"
        for y, rule in enumerate(rules):
            r = rows.get(rule)
            if r is None or r["status"] != "ok":
                text = "skipped" if r is not None and r["status"] == "skipped" else "error"
                ax.text(0.02, y, text, transform=ax.get_yaxis_transform(), va="center", color="gray")
                continue
            every, some = r["learnt"] == len(r["runs"]), r["learnt"] > 0
            colour = "tab:green" if every else "tab:orange" if some else "tab:red"
            ax.barh(y, r["metric_mean"], xerr=r["metric_std"], color=colour, capsize=2)
            values = [run[task["metric"]] for run in r["runs"]]
            ax.plot(values, [y] * len(values), "k.", ms=3)
        ax.axvline(task["chance"], color="black", lw=1, ls=":")
        ax.set_yticks(range(len(rules)), rules, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("test accuracy" if acc else "test MSE (log)")
        if acc:
            ax.set_xlim(0, 1)
        else:
            ax.set_xscale("log")
        ax.set_title(task["name"], fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    fig.suptitle(
        "Task suite: final test metric, mean ± std over seeds (dots: seeds; dotted: chance or baseline;\n"
        "green: every seed learnt, orange: some, red: none)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default=str(HERE.parent / "docs" / "images"))
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (d := load("results-memory-2cpu.json")) is not None:
        plot_memory(d, out / "memory-vs-T.png", plt)
    if (d := load("results-es-2cpu.json")) is not None:
        plot_ratios(d, load("results-es-braintrace-2cpu.json"), out / "time-ratios.png", plt)
    if (d := load("results-adding-2cpu.json")) is not None:
        plot_adding(d, out / "adding-problem-loss.png", plt)
    if (d := load("results-tasks-2cpu.json")) is not None:
        plot_tasks(d, out / "task-suite.png", plt)


if __name__ == "__main__":
    main()
