"""A sublayer plan's deci GGUF in llama.cpp against the same skipped model in transformers (docs/sublayers.md).

    python benchmarks/gguf_sublayers_llama_cpp.py IN.gguf PRUNED.gguf [MORE.gguf ...] [--ctx 256 --chunks 16]

Each PRUNED file is a GGUF that `prune --granularity sublayer` wrote from IN.gguf: a deci file lists the
removed sublayers in `layershap.removed_sublayers`; a file in IN's own architecture (a whole-block plan)
in `layershap.removed_blocks`. The transformers side is IN dequantized with those sublayers skipped
(`keep_sublayers`), so nothing is read back through layershap's writer. Per file: layershap's held-out
perplexity (16 windows x 256 of wiki, what `prune` prints), the same text chunked as llama.cpp chunks it, in
float on transformers, llama.cpp's `llama-perplexity`, and the KV cache llama.cpp allocates at 4096 tokens of
context (its `llama_kv_cache: size` line, from `llama-completion -v`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import torch
from gguf_llama_cpp import (
    chunked_perplexity,
    gguf_adds_bos,
    llama_cpp_bin,
    llama_perplexity,
    load_dequantized,
    write_text,
)


def removed_of(path: Path, n: int) -> list[str]:
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    if "layershap.removed_sublayers" in fields:
        return list(fields["layershap.removed_sublayers"].contents())
    blocks = fields["layershap.removed_blocks"].contents() if "layershap.removed_blocks" in fields else []
    return [f"{kind}.{i}" for i in blocks for kind in ("attn", "mlp")]


def kv_cache_mib(path: Path, ctx: int = 4096) -> float:
    binary = llama_cpp_bin() / "llama-completion"
    result = subprocess.run([str(binary), "-m", str(path), "-p", "Hello", "-n", "1", "-c", str(ctx), "-t", "1",
                             "-no-cnv", "-v"], capture_output=True, text=True, check=False)
    found = re.findall(r"llama_kv_cache: size = +([0-9.]+) MiB", result.stderr)
    if result.returncode != 0 or not found:
        raise RuntimeError(f"llama-completion failed on {path}:\n{result.stderr[-2000:]}")
    return float(found[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if llama_cpp_bin() is None:
        raise SystemExit("llama-perplexity not found: run tools/build_llama_cpp.sh or set LLAMA_CPP_BIN")
    from layershap.evaluate.perplexity import perplexities
    from layershap.models.layers import num_layers
    from layershap.models.sublayers import keep_sublayers, sublayer_names

    text_file = write_text(Path(os.environ.get("TMPDIR", "/tmp")) / "layershap-gguf-ppl.txt")
    text = text_file.read_text()
    model, tokenizer = load_dequantized(args.source)
    n = num_layers(model)
    rows = [{"file": args.source.name, "removed": [], "kv_cache_mib": kv_cache_mib(args.source)}]
    for path in args.files:
        removed = removed_of(path, n)
        mask = np.array([name not in removed for name in sublayer_names(n)])
        with torch.no_grad(), keep_sublayers(model, mask):
            own = perplexities(model, tokenizer, ["wiki"], samples=16, seq_len=256)["wiki"]
            same = chunked_perplexity(model, tokenizer, text, ctx=args.ctx, chunks=args.chunks,
                                      add_bos=gguf_adds_bos(args.source))
        llama = llama_perplexity(path, text_file, ctx=args.ctx, chunks=args.chunks, threads=args.threads)
        rows.append({"file": path.name, "removed": removed, "layershap_wiki_16x256": own,
                     "transformers_chunked": same["ppl"], "llama_cpp": llama["ppl"],
                     "relative_gap": llama["ppl"] / same["ppl"] - 1, "chunks": llama["chunks"],
                     "kv_cache_mib": kv_cache_mib(path), "bytes": path.stat().st_size})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n| file | layershap ppl (wiki, 16x256) | transformers, llama.cpp chunks | llama.cpp ppl "
          f"({args.chunks} x {args.ctx}) | gap | KV cache at 4096 tokens |\n|---|---|---|---|---|---|")
    for row in rows[1:]:
        print(f"| {row['file']} | {row['layershap_wiki_16x256']:.3f} | {row['transformers_chunked']:.3f} | "
              f"{row['llama_cpp']:.3f} | {100 * row['relative_gap']:+.2f}% | {row['kv_cache_mib']:.1f} MiB |")
    print(f"| {rows[0]['file']} (input) | | | | | {rows[0]['kv_cache_mib']:.1f} MiB |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
