"""Compression at LLM scale: osd-fleet against its I/O and SVD floors and mergekit, side by side in one run.

    python bench/scale.py [--layers 2] [--rank 16] [--methods truncsvd,default] [--no-mergekit]

Builds a sharded bf16 pair with Llama-2-7B's shapes (hidden 4096, FFN 11008, vocab 32000) to
``--layers`` decoder layers, with fine-tune-like deltas: a rank-16 product with a decaying spectrum
plus small dense noise on every matrix, small noise on norms and embeddings. Then, in this one run:

* the **I/O floor**: reading every byte of both checkpoints once, in this process, from a warm
  page cache (every tool after it reads from memory too);
* the **delta floor**: reading every tensor pair and taking its float32 delta, timed in this
  process (on ``--device``), which any delta tool pays before it factors anything;
* the **SVD floor**: osd-fleet's truncated SVD of each delta the tool factorised, alone, at the
  rank the tool factors at (``k``), timed in this process on deltas already in memory;
* ``osd-fleet compress`` per method, as a child process whose peak resident memory is sampled,
  in a fleet's steady state: the base's shard hashes and the architecture's roles were kept by
  an earlier run (``osd_core.file_hashes``, ``osd_core.roles``; a private cache under the pair),
  and the fine-tune, new to the cache, is hashed in the run. Hashing the base, which a fleet
  pays once per base, is timed apart and printed;
* ``mergekit-extract-lora --max-rank`` at the same rank on the same pair, from its own virtual
  environment (``mergekit==0.1.5``, created under ``~/.cache/osd-fleet`` on first use), with
  absolute paths (with relative ones it calls the Hub at the end and fails offline).

Prints one table: wall seconds, seconds per GB of checkpoint, ratios to the I/O and SVD floors
and to mergekit, the overhead (wall beyond the delta and SVD floors) as a fraction of the SVD
floor, and peak RSS against the largest tensor pair. The 32-layer column keeps the start-up
(the imports, measured alone) once and scales the rest linearly in layers (every decoder layer
has the same shapes); it counts the embeddings and the head once per layer group too, so it
overstates a little.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from osd_core.checkpoint import Checkpoint  # noqa: E402
from osd_core.compress import plan_pair  # noqa: E402
from osd_core.config import CompressionConfig  # noqa: E402
from osd_core.file_hashes import KIND as HASHES  # noqa: E402
from osd_core.float_delta import float_difference  # noqa: E402
from osd_core.pair_buffers import PairBuffers  # noqa: E402
from osd_core.svd import truncated_svd  # noqa: E402

HIDDEN, FFN, VOCAB, HEADS = 4096, 11008, 32000, 32
FULL_LAYERS = 32
MIB, GB = 1 << 20, 1e9
MERGEKIT = "mergekit==0.1.5"
MERGEKIT_VENV = Path(os.environ.get("OSD_FLEET_CACHE", Path.home() / ".cache" / "osd-fleet")) / "mergekit-0.1.5"


def layer_shapes(layer: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{layer}."
    return {
        **{f"{p}self_attn.{m}_proj.weight": (HIDDEN, HIDDEN) for m in "qkvo"},
        f"{p}mlp.gate_proj.weight": (FFN, HIDDEN),
        f"{p}mlp.up_proj.weight": (FFN, HIDDEN),
        f"{p}mlp.down_proj.weight": (HIDDEN, FFN),
        f"{p}input_layernorm.weight": (HIDDEN,),
        f"{p}post_attention_layernorm.weight": (HIDDEN,),
    }


def model_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for layer in range(layers):
        shapes.update(layer_shapes(layer))
    shapes.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    return shapes


def fine_tune_delta(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A rank-16 update with a decaying spectrum plus dense noise 1/10 of its scale (1-D: noise only)."""
    device = generator.device
    if len(shape) == 1:
        return 1e-3 * torch.randn(shape, generator=generator, device=device)
    n, d = shape
    spectrum = torch.logspace(0, -1.5, 16, device=device)
    u = torch.randn(n, 16, generator=generator, device=device) / n**0.5
    v = torch.randn(d, 16, generator=generator, device=device) / d**0.5
    low_rank = (u * spectrum) @ v.T * 0.05
    return low_rank + 5e-4 * torch.randn(shape, generator=generator, device=device) / (n * d) ** 0.25


def write_pair(root: Path, layers: int, device: str = "cpu") -> tuple[Path, Path]:
    """Base and fine-tune as sharded bf16 checkpoints (one shard per decoder layer, one for the rest).

    The numbers are drawn on ``device`` (a GPU draws a 32-layer pair in seconds); a pair drawn on
    a GPU holds other values than one drawn on the CPU, of the same distribution.
    """
    base_dir, tuned_dir = root / "base", root / "finetuned"
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": FFN, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS, "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
        "max_position_embeddings": 4096, "tie_word_embeddings": False,
    }
    generator = torch.Generator(device).manual_seed(0)
    groups = [{k: v for k, v in model_shapes(layers).items() if not k.startswith("model.layers.")}]
    groups += [layer_shapes(layer) for layer in range(layers)]
    for directory in (base_dir, tuned_dir):
        directory.mkdir(parents=True)
        (directory / "config.json").write_text(json.dumps(config))
    weight_map: dict[str, str] = {}
    for number, shapes in enumerate(groups):
        shard = f"model-{number + 1:05d}-of-{len(groups):05d}.safetensors"
        base, tuned = {}, {}
        for name, shape in shapes.items():
            weight = (torch.ones(shape, device=device) if len(shape) == 1 else
                      torch.randn(shape, generator=generator, device=device) * 0.02)
            base[name] = weight.to(torch.bfloat16).cpu()
            tuned[name] = (weight + fine_tune_delta(shape, generator)).to(torch.bfloat16).cpu()
            weight_map[name] = shard
        save_file(base, base_dir / shard, metadata={"format": "pt"})
        save_file(tuned, tuned_dir / shard, metadata={"format": "pt"})
    for directory in (base_dir, tuned_dir):
        index = {"metadata": {"total_size": sum(p.stat().st_size for p in directory.glob("*.safetensors"))},
                 "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return base_dir, tuned_dir


def io_floor(base_dir: Path, tuned_dir: Path) -> float:
    """Seconds to read every byte of both checkpoints once (safetensors' own reads map lazily)."""
    started = time.perf_counter()
    buffer = bytearray(64 * MIB)
    for shard in (*base_dir.glob("*.safetensors"), *tuned_dir.glob("*.safetensors")):
        with shard.open("rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    return time.perf_counter() - started


def floors(base_dir: Path, tuned_dir: Path, k: int, factorised: set[str], device: str) -> tuple[float, float]:
    """Seconds of the two floors every delta tool pays, timed apart on ``device``, in this process.

    The **delta floor**: reading every tensor pair and taking its float32 delta (what any tool
    does before it can factor anything). The **SVD floor**: ``truncated_svd`` at rank ``k`` of
    each factorised delta, already in memory. What a run costs beyond both is its overhead:
    planning, hashing, encoding, error reports, writing and imports.
    """
    base, tuned = Checkpoint.open(base_dir), Checkpoint.open(tuned_dir)
    buffers = PairBuffers()  # on the CPU, memory reused from pair to pair, as osd-fleet reads
    delta_s = svd_s = 0.0
    for name in tuned.tensors:
        started = time.perf_counter()
        if device == "cpu":
            delta, _ = float_difference(buffers.load("tuned", tuned, name), buffers.load("base", base, name),
                                        buffers.delta(tuned.entry(name).shape))
        else:
            delta = tuned.load(name).to(device).float().sub_(base.load(name).to(device))
        _synchronize(device)
        delta_s += time.perf_counter() - started
        if name in factorised:
            started = time.perf_counter()
            truncated_svd(delta, min(k, *delta.shape))
            _synchronize(device)
            svd_s += time.perf_counter() - started
    return delta_s, svd_s


def fleet_state(base_dir: Path, tuned_dir: Path, cache: Path) -> float:
    """Leave ``cache`` as a fleet's is when a new fine-tune of a known base arrives; return the
    seconds that hashing the base took (paid once per base, by the fleet's first fine-tune).

    Roles come from the first call on and stay; the shard hashes are dropped and the base's alone
    taken again, so the fine-tune is hashed inside the timed run.
    """
    base, tuned = Checkpoint.open(base_dir), Checkpoint.open(tuned_dir)
    plan_pair(base, tuned, CompressionConfig(rank=1))  # derives the roles once, into the cache
    shutil.rmtree(cache / HASHES, ignore_errors=True)
    started = time.perf_counter()
    base.identity()
    return time.perf_counter() - started


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_sampled(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run a child; return (wall seconds, peak RSS MiB of it and its children, its output)."""
    import psutil

    started = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak, done = [0], threading.Event()

    def sample() -> None:
        process = psutil.Process(child.pid)
        while not done.is_set():
            try:
                rss = process.memory_info().rss + sum(c.memory_info().rss for c in process.children(recursive=True))
                peak[0] = max(peak[0], rss)
            except psutil.Error:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = child.communicate()
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    if child.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({child.returncode}):\n{output[-3000:]}")
    return wall, peak[0] / MIB, output


def mergekit_command() -> Path:
    """``mergekit-extract-lora`` in its own environment, installed there on first use."""
    command = MERGEKIT_VENV / "bin" / "mergekit-extract-lora"
    if not command.exists():
        print(f"installing {MERGEKIT} into {MERGEKIT_VENV} (once)", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(MERGEKIT_VENV)], check=True)
        subprocess.run([str(MERGEKIT_VENV / "bin" / "pip"), "install", "--quiet", "torch==2.13.0", MERGEKIT],
                       check=True)
    return command


def decoder_linear_maps(shapes: dict[str, tuple[int, ...]]) -> set[str]:
    """What mergekit factorises by default: it keeps the embeddings whole (``modules_to_save``)."""
    return {name for name, shape in shapes.items() if len(shape) == 2 and name.startswith("model.layers.")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--methods", default="truncsvd,default",
                        help="osd-fleet methods; 'default' is compress's default (magtruncsvd, int4)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument("--scratch", type=Path, help="where to write the pair (default: a temporary directory)")
    args = parser.parse_args()
    methods = args.methods.split(",")
    shapes = model_shapes(args.layers)
    decoder_maps = decoder_linear_maps(shapes)
    largest_pair = max(2 * 2 * torch.Size(s).numel() for s in shapes.values()) / MIB  # two bf16 tensors
    with tempfile.TemporaryDirectory(prefix="osd-scale-", dir=args.scratch) as tmp:
        root = Path(tmp)
        os.environ["OSD_FLEET_CACHE"] = str(root / "cache")  # this process's and every child's
        started = time.perf_counter()
        base_dir, tuned_dir = write_pair(root, args.layers, args.device)
        pair_gb = sum(p.stat().st_size for p in (*base_dir.glob("*"), *tuned_dir.glob("*"))) / GB
        print(f"pair: {args.layers} Llama-2-7B-shaped layers, {pair_gb:.2f} GB bf16 for both checkpoints, "
              f"written in {time.perf_counter() - started:.0f} s; largest tensor pair {largest_pair:.0f} MiB",
              flush=True)
        io_floor(base_dir, tuned_dir)  # warm the page cache: every tool then reads from memory
        io_s = io_floor(base_dir, tuned_dir)
        imports_s, _, _ = run_sampled([sys.executable, "-c", "import osd_cli.delta_commands, osd_core.compress"])
        rows = []
        for method in methods:
            config = CompressionConfig(rank=args.rank) if method == "default" else \
                CompressionConfig(method=method, rank=args.rank)
            k = config.k
            out = root / f"delta-{method}"
            argv = [sys.executable, "-m", "osd_cli", "compress", "--base", str(base_dir), "--finetuned",
                    str(tuned_dir), "--out", str(out), "--rank", str(args.rank), "--device", args.device, "--json"]
            if method != "default":
                argv += ["--method", method]
            base_hash_s = fleet_state(base_dir, tuned_dir, root / "cache")
            wall, rss, output = run_sampled(argv)
            layers = json.loads(output.strip().splitlines()[-1])["layers"]
            ours = {name for name, layer in layers.items() if layer["kind"] == "factored"}
            delta_s, svd_s = floors(base_dir, tuned_dir, k, ours, args.device)
            label = f"osd-fleet {method}" + (f" ({config.method}, {config.value_dtype})" if method == "default" else "")
            rows.append((label, k, wall, rss, delta_s, svd_s,
                         sum(p.stat().st_size for p in out.rglob("*") if p.is_file())))
            print(f"  {label}: {wall:.1f} s (k = {k}; floors: delta {delta_s:.1f} s, SVD {svd_s:.1f} s)", flush=True)
        mergekit = None
        if not args.no_mergekit:
            command = mergekit_command()
            out = root / "mergekit-lora"
            argv = [str(command), "--model", str(tuned_dir.resolve()), "--base-model", str(base_dir.resolve()),
                    "--out-path", str(out.resolve()), "--max-rank", str(args.rank)]
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
            wall, rss, _ = run_sampled(argv, env)
            delta_s, svd_s = floors(base_dir, tuned_dir, args.rank, decoder_maps, "cpu")
            mergekit = wall
            rows.append(("mergekit-extract-lora", args.rank, wall, rss, delta_s, svd_s,
                         sum(p.stat().st_size for p in out.rglob("*") if p.is_file())))
            print(f"  mergekit: {wall:.1f} s", flush=True)
    scale = FULL_LAYERS / args.layers
    print(f"\nI/O floor (reading both checkpoints once, warm): {io_s:.2f} s; osd-fleet's imports alone: "
          f"{imports_s:.1f} s; hashing the base, once per fleet: {base_hash_s:.1f} s\n")
    print("| tool | k | wall s | s/GB | / I/O floor | / SVD floor | overhead / SVD | / mergekit | peak RSS MiB "
          "| / largest pair | bytes out | 32 layers, s (extrapolated) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, k, wall, rss, delta_s, svd_s, size in rows:
        versus = f"{wall / mergekit:.2f}" if mergekit else "–"
        overhead = (wall - delta_s - svd_s) / svd_s
        print(f"| {label} | {k} | {wall:.1f} | {wall / pair_gb:.1f} | {wall / io_s:.0f} | {wall / svd_s:.2f} | "
              f"{overhead:.2f} | {versus} | {rss:,.0f} | {rss / largest_pair:.1f} | {size:,} | "
              f"{imports_s + (wall - imports_s) * scale:,.0f} |")
    print("\noverhead / SVD: (wall − delta floor − SVD floor) / SVD floor, where the delta floor is reading every "
          "pair and taking its float32 delta; it counts start-up, planning, hashing, encoding, error reports and "
          "writes")
    print(f"32-layer column: the imports once, the rest × {scale:g}, linear in layers (embeddings and head "
          f"counted {scale:g} times: an overstatement); osd-fleet's runs hash the fine-tune, not the base")


if __name__ == "__main__":
    main()
