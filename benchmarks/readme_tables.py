"""Print the README's end-to-end table from benchmarks/results/e2e-*.json (newest file per GPU)."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def e2e_table() -> str:
    lines = []
    by_gpu: dict[str, Path] = {}
    for path in sorted(RESULTS.glob("e2e-*.json")):
        by_gpu[json.loads(path.read_text())["gpu"]] = path  # sorted by date: the newest wins
    for gpu, path in by_gpu.items():
        doc = json.loads(path.read_text())
        lines += [f"{gpu}, {doc['date']}, `{path.name}` (commit {doc['versions']['vdit_accel']}):", "",
                  "| shape | impl | block density | step ms | self-attention ms | vs dense cuDNN | peak GiB |",
                  "|---|---|---|---|---|---|---|"]
        for r in doc["rows"]:
            if r.get("ms") is None:
                lines.append(f"| {r['shape']} | {r['impl']} | — | — | — | — | — | {r.get('error', '')}")
                continue
            lines.append(f"| {r['shape']} | {r['impl']} | {r.get('density', 1.0):.3f} | {r['ms']:.0f} | "
                         f"{r['attn_ms']:.0f} | {r.get('speedup_vs_dense_cudnn', 0):.2f}× | {r.get('peak_gib', 0):.1f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(e2e_table())
