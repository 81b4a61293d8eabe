"""What the repair adds to `prune`'s wall time at the default budget, measured side by side in one run.

`layershap prune --ratio R --out DIR` runs once with `--repair none` and once with the default repair (the
search's finalists judged after their repair, then the kept plan's repair fitted on its own windows), each
in a fresh process on a fresh evaluation store, so both pay for every mask; `--repeats` alternates the order.
Besides the wall times, each default run's record says where the repair's time went (judging the finalists,
fitting the kept plan's repair) and its token-passes against the search's.

    python benchmarks/repair_cost.py --json repair_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _setup import write_result


def run_prune(out: Path, repair: str, ratio: float, threads: int | None) -> dict:
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "layershap", "prune", "--ratio", str(ratio), "--out", str(out / "model"),
               "--store", str(out / "store.sqlite"), "--repair", repair]
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    record = json.loads((out / "model" / "layershap.json").read_text())
    row = {"repair": repair, "wall_seconds": round(wall, 1), "removed": record["removed"],
           "ppl_after": record["ppl_after"], "search_seconds": round(record["seconds"], 1),
           "token_passes": (record.get("cost") or {}).get("token_passes")}
    if "repair" in record and record["repair"].get("cuts") is not None:
        choice = (record.get("plan") or {}).get("repair_choice") or {}
        row.update(fit_seconds=record["repair"]["seconds"], fit_token_passes=record["repair"]["cost"]["token_passes"],
                   judge_seconds=choice.get("seconds"), judge_token_passes=(choice.get("cost") or {}).get("token_passes"))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = ("none", "auto") if repeat % 2 == 0 else ("auto", "none")
            for repair in order:
                out = Path(tmp) / f"{repair}-{repeat}"
                out.mkdir()
                rows.append({"repeat": repeat, **run_prune(out, repair, args.ratio, args.threads)})
                print(json.dumps(rows[-1]), flush=True)
    none = [r["wall_seconds"] for r in rows if r["repair"] == "none"]
    repaired = [r["wall_seconds"] for r in rows if r["repair"] == "auto"]
    summary = {"wall_ratio": sum(repaired) / sum(none),
               "judge_and_fit_share_of_search_token_passes": [
                   (r["judge_token_passes"] + r["fit_token_passes"]) / (r["token_passes"] - r["judge_token_passes"])
                   for r in rows if r.get("judge_token_passes") is not None]}
    print(json.dumps(summary))
    write_result(args.json, {"ratio": args.ratio, "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
