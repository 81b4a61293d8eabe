"""Perplexity of GGUF files three ways: layershap's own (as `prune` reports it), transformers on the
dequantized file over llama.cpp's chunks, and llama.cpp's `llama-perplexity` itself (docs/gguf.md).

    python benchmarks/gguf_llama_cpp.py IN.gguf PRUNED.gguf [MORE.gguf ...] [--ctx 256 --chunks 16]

llama.cpp's tool cuts the text into chunks of `--ctx` tokens and scores the second half of each chunk; the
middle column runs the same protocol in float on the model transformers dequantizes from the same file, so
it differs from llama.cpp only by llama.cpp's quantized arithmetic (it quantizes activations for its
quantized matmuls). The first column is layershap's held-out protocol (16 windows x 256 tokens of the
evaluation half of `wiki`, every token but the first scored), the numbers `prune` prints.

The llama.cpp tools come from `tools/build_llama_cpp.sh` (in $LLAMA_CPP_BIN, default
~/.cache/layershap/llama.cpp/bin).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F

TEXT_SOURCE, TEXT_START, TEXT_CHARS = "wiki", 100_000, 60_000  # the same slice of wiki the ANCHORS evaluation uses


def llama_cpp_bin() -> Path | None:
    """The directory holding llama-perplexity, or None when it has not been built."""
    root = os.environ.get("LLAMA_CPP_BIN") or Path.home() / ".cache" / "layershap" / "llama.cpp" / "bin"
    root = Path(root).expanduser()
    return root if (root / "llama-perplexity").is_file() else None


def write_text(path: Path, chars: int = TEXT_CHARS) -> Path:
    from layershap.data.windows import load_text

    path.write_text(load_text(TEXT_SOURCE)[TEXT_START:TEXT_START + chars])
    return path


def llama_perplexity(gguf, text_file, *, ctx: int, chunks: int, threads: int = 2,
                     binary_dir: Path | None = None) -> dict:
    """Run llama.cpp's perplexity tool; return its final estimate and the chunks it scored."""
    binary = (binary_dir or llama_cpp_bin()) / "llama-perplexity"
    result = subprocess.run([str(binary), "-m", str(gguf), "-f", str(text_file), "-c", str(ctx), "--chunks",
                             str(chunks), "-t", str(threads), "-b", str(ctx)],
                            capture_output=True, text=True, check=False)
    log = result.stdout + result.stderr
    final = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
    scored = re.search(r"calculating perplexity over (\d+) chunks", log)
    if result.returncode != 0 or final is None or scored is None:
        raise RuntimeError(f"llama-perplexity failed on {gguf} (exit {result.returncode}):\n{log[-3000:]}")
    return {"ppl": float(final.group(1)), "chunks": int(scored.group(1)), "ctx": ctx}


def chunked_perplexity(model, tokenizer, text: str, *, ctx: int, chunks: int, add_bos: bool = False) -> dict:
    """llama-perplexity's protocol on a transformers model: the text's tokens cut into chunks of `ctx`, the
    first token of each replaced by BOS when the vocabulary adds one, and the NLL of the tokens of each
    chunk's second half (from position ctx/2 + 1 on) averaged over all chunks."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if add_bos:
        ids = [tokenizer.bos_token_id, *ids]
    n_chunks = min(chunks, len(ids) // ctx)
    first = ctx // 2
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(n_chunks):
            chunk = torch.tensor(ids[i * ctx:(i + 1) * ctx]).unsqueeze(0)
            targets = chunk[0, first + 1:].clone()
            if add_bos:
                chunk[0, 0] = tokenizer.bos_token_id
            logits = model(input_ids=chunk, use_cache=False).logits[0, first:-1].float()
            total += float(F.cross_entropy(logits, targets, reduction="sum").double())
            count += targets.numel()
    return {"ppl": math.exp(total / count), "chunks": n_chunks, "ctx": ctx}


def gguf_adds_bos(path) -> bool:
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("tokenizer.ggml.add_bos_token")
    return bool(field.parts[field.data[0]][0]) if field is not None else False


def load_dequantized(path):
    """The model transformers reads from a GGUF, in float32 (layershap's own loader)."""
    from layershap.models.load import load_model

    return load_model(str(path), dtype="float32", device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="Also write the rows here.")
    args = parser.parse_args()
    if llama_cpp_bin() is None:
        raise SystemExit("llama-perplexity not found: run tools/build_llama_cpp.sh or set LLAMA_CPP_BIN")
    from layershap.evaluate.perplexity import perplexities

    text_file = write_text(Path(os.environ.get("TMPDIR", "/tmp")) / "layershap-gguf-ppl.txt")
    text = text_file.read_text()
    rows = []
    for path in args.files:
        model, tokenizer = load_dequantized(path)
        own = perplexities(model, tokenizer, ["wiki"], samples=16, seq_len=256)["wiki"]
        same = chunked_perplexity(model, tokenizer, text, ctx=args.ctx, chunks=args.chunks,
                                  add_bos=gguf_adds_bos(path))
        llama = llama_perplexity(path, text_file, ctx=args.ctx, chunks=args.chunks, threads=args.threads)
        rows.append({"file": path.name, "layershap_wiki_16x256": own, "transformers_chunked": same["ppl"],
                     "llama_cpp": llama["ppl"], "chunks": llama["chunks"], "ctx": args.ctx,
                     "chunks_agree": same["chunks"] == llama["chunks"]})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n| file | layershap ppl (wiki, 16x256) | transformers, llama.cpp chunks | llama.cpp ppl "
          f"({args.chunks} chunks x {args.ctx}) |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['file']} | {row['layershap_wiki_16x256']:.3f} | {row['transformers_chunked']:.3f} | "
              f"{row['llama_cpp']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
