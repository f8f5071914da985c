"""Training curves of `examples/spiking_evidence.py` (its defaults) for BPTT, D-RTRL and ES-D-RTRL
over seeds 0, 1, 2: `results-spiking-curves-2cpu.json` and `docs/images/spiking-curves.png`.

    PYTHONPATH=. python benchmarks/spiking_curves.py
"""

import json
import pathlib
import sys
import tempfile


ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import spiking_evidence  # noqa: E402


ALGORITHMS = ("bptt", "d_rtrl", "es_d_rtrl")
SEEDS = (0, 1, 2)


def run(out: pathlib.Path) -> list[dict]:
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for algorithm in ALGORITHMS:
            for seed in SEEDS:
                print(f"== {algorithm}, seed {seed}", flush=True)
                path = pathlib.Path(tmp) / f"{algorithm}-{seed}.json"
                spiking_evidence.main(
                    [
                        "--algorithm",
                        algorithm,
                        "--seed",
                        str(seed),
                        "--print-every",
                        "20",
                        "--curve",
                        str(path),
                    ]
                )
                runs.append(json.loads(path.read_text()))
    out.write_text(json.dumps(runs, indent=1))
    return runs


def plot(runs: list[dict], out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    names = {"bptt": "BPTT", "d_rtrl": "D-RTRL", "es_d_rtrl": "ES-D-RTRL(0.9)"}
    for c, algorithm in enumerate(ALGORITHMS):
        for k, r in enumerate(x for x in runs if x["algorithm"] == algorithm):
            label = names[algorithm] if k == 0 else None
            axes[0].plot(r["step"], r["loss"], color=f"C{c}", alpha=0.8, label=label)
            axes[1].plot(r["step"], r["accuracy"], color=f"C{c}", alpha=0.8, label=label)
    axes[0].set(xlabel="training step", ylabel="training loss (mean of 20 steps)")
    axes[1].set(xlabel="training step", ylabel="training accuracy", ylim=(0.4, 1.02))
    axes[1].axhline(spiking_evidence.CHANCE, color="grey", lw=0.8, ls=":")
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle("Evidence accumulation, 32 recurrent ALIF neurons: seeds 0, 1, 2", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    results = ROOT / "benchmarks" / "results-spiking-curves-2cpu.json"
    plot(run(results), ROOT / "docs" / "images" / "spiking-curves.png")
