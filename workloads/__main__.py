"""``python -m workloads``: build cached workloads or list them. Parsing only; work is in build.py.

Sets ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` before transformers is imported, so a
mistake that would reach for a model hub fails at once instead of hanging on the network.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from workloads.lm_build import LM_WORKLOADS
    from workloads.recipes import WORKLOADS

    parser = argparse.ArgumentParser(prog="python -m workloads", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build workloads that are not cached yet")
    build.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"workloads to build (default: all of {', '.join(WORKLOADS)}); the decoder ones "
        f"({', '.join(LM_WORKLOADS)}) are built by name: they need requirements-llm.txt",
    )
    build.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache root (default: $OSD_FLEET_CACHE or ~/.cache/osd-fleet)",
    )
    build.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch CPU threads (default: 2, the cores of the dev machines)",
    )
    build.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress bars"
    )
    listing = commands.add_parser("list", help="list workloads and where they are cached")
    listing.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "list":
        return _list(args.cache_dir)
    known = [*WORKLOADS, *LM_WORKLOADS]
    unknown = [name for name in args.names if name not in known]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return _build(args.names or list(WORKLOADS), args.cache_dir, args.threads, args.progress)


def _build(names: list[str], cache_dir: Path | None, threads: int, progress: bool) -> int:
    import torch
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm
    from transformers.utils import logging as hf_logging

    from workloads.build import build_workload
    from workloads.lm_build import LM_WORKLOADS, build_lm_workload

    hf_logging.disable_progress_bar()
    log = logging.getLogger("workloads")
    with logging_redirect_tqdm():
        for name in tqdm(names, desc="workloads", unit="workload", disable=not progress):
            if name in LM_WORKLOADS:
                torch.set_num_threads(threads)
                built = build_lm_workload(name, cache_dir)
                before, after = built.scores["base"], built.scores["finetuned"]
                log.info("%s: eval acc %.4f -> %.4f, held-out perplexity %.2f -> %.2f, built in %.0f s, at %s",
                         name, before["eval"]["acc"], after["eval"]["acc"], before["text"]["perplexity"],
                         after["text"]["perplexity"], built.build_seconds, built.root)
                continue
            workload = build_workload(name, cache_dir, progress=progress, num_threads=threads)
            before, after = workload.scores["base"]["eval"], workload.scores["finetuned"]["eval"]
            log.info(
                "%s: eval accuracy %.4f -> %.4f (%d rows), built in %.0f s, at %s",
                name,
                before.accuracy,
                after.accuracy,
                after.n,
                workload.build_seconds,
                workload.root,
            )
    return 0


def _list(cache_dir: Path | None) -> int:
    from workloads.build import workload_dir
    from workloads.lm_build import LM_WORKLOADS
    from workloads.recipes import WORKLOADS

    found = [(name, recipe.dataset, recipe.steps, workload_dir(recipe, cache_dir))
             for name, recipe in WORKLOADS.items()]
    found += [(name, recipe.task, recipe.steps, workload_dir(recipe, cache_dir))
              for name, recipe in LM_WORKLOADS.items()]
    for name, data, steps, root in found:
        state = "built" if (root / "workload.json").is_file() else "not built"
        print(f"{name:12} {data:16} {steps:4} steps  {state:9}  {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
