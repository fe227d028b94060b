"""The fleet subcommands of ``osd-fleet``: run, run-fleet, catalog, fetch, notify, scan, serve and demo.

Registered by ``osd_cli.main`` through :func:`add_fleet_commands`. Handlers import Prefect, Ray,
boto3 and pandas only when they run, so ``osd-fleet compress`` never pays for them. Bad input
exits 2 with one line; a catalog query that no artifact meets exits 1 with the catalog's
explanation; a sweep with failed variants exits 1 after printing them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows.fleet_config import SCAN_SWEEP, ModelSpec, SweepSpec
from osd_cli.arguments import comma_list, whole_number
from osd_cli.flags import add_settings, read_settings
from osd_core.config import ADAPTER_DTYPES, ADAPTER_PROFILES, VACUUM_RETAIN_HOURS, CompressionConfig
from osd_core.outputs import scratch_dir
from osd_core.settings import to_table

if TYPE_CHECKING:
    from osd_io.catalog import CatalogRow

SWEEP_AXES = ("method", "rank")  # swept: SweepSpec's methods and ranks
EXIT_NONE_MEETS = 1
EXIT_FAILED = 1
DEMO_STORE = Path(".osd-fleet") / "store"
TABLE_COLUMNS = (
    "model",
    "method",
    "rank",
    "extra_rank",
    "allocation",
    "budget_bits",
    "paper_bits",
    "bytes",
    "accuracy",
    "status",
)


def add_fleet_commands(commands: Any) -> None:
    """Register the fleet subcommands on the ``osd-fleet`` subparsers object."""
    run = commands.add_parser("run", help="compress one model at several budgets and methods, evaluate, catalogue")
    add_settings(run, ModelSpec, flags={"name": "model"})
    _add_sweep_arguments(run)
    _add_store_argument(run)
    _add_runtime_arguments(run)
    run.add_argument("--json", action="store_true", help="print one JSON object per catalog row")
    run.set_defaults(handler=run_run)

    fleet = commands.add_parser("run-fleet", help="run the sweep of a fleet file (TOML or JSON) for every model")
    fleet.add_argument("config", type=Path, help="fleet file: store, [sweep], [[models]]")
    _add_runtime_arguments(fleet)
    fleet.add_argument("--json", action="store_true", help="print one JSON object per catalog row")
    fleet.set_defaults(handler=run_run_fleet)

    catalog = commands.add_parser("catalog", help="query the artifact catalog")
    queries = catalog.add_subparsers(dest="query", required=True)
    smallest = queries.add_parser("smallest", help="the smallest artifact of a model meeting a floor (accuracy) "
                                                   "or a ceiling (perplexity)")
    _add_store_argument(smallest)
    smallest.add_argument("--model", required=True)
    _add_bound_arguments(smallest)
    smallest.add_argument("--json", action="store_true", help="print the row as one JSON object")
    smallest.set_defaults(handler=run_smallest)
    listing = queries.add_parser("list", help="every catalog row (one per artifact)")
    _add_store_argument(listing)
    listing.add_argument("--model", help="only this model's rows")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(handler=run_list)
    plot = queries.add_parser("plot", help="accuracy versus size of a model's deltas with the Pareto front, as PNG")
    _add_store_argument(plot)
    plot.add_argument("--model", required=True)
    plot.add_argument("--out", required=True, type=Path, help="PNG file to write")
    plot.set_defaults(handler=run_plot)
    compact = queries.add_parser("compact", help="rewrite the catalog table's files into one and vacuum the old "
                                                 "ones (runs also do this past a threshold); safe beside running "
                                                 "appends and reads")
    _add_store_argument(compact)
    compact.add_argument("--retain-hours", type=whole_number, default=VACUUM_RETAIN_HOURS,
                         help="keep replaced files this long for readers that opened the table before "
                              "(default %(default)s)")
    compact.set_defaults(handler=run_compact)
    migrate = queries.add_parser("migrate", help="move an osd-fleet 0.1 catalog (parquet parts) into the Delta "
                                                 "table; safe to re-run, loses nothing")
    _add_store_argument(migrate)
    migrate.set_defaults(handler=run_migrate)

    fetch = commands.add_parser("fetch", help="restore a model (or its LoRA adapter) from its base and its smallest "
                                              "delta meeting a floor")
    _add_store_argument(fetch)
    fetch.add_argument("--model", required=True)
    _add_bound_arguments(fetch)
    fetch.add_argument("--base", required=True, type=Path, help="local base checkpoint directory")
    fetch.add_argument("--out", required=True, type=Path, help="checkpoint (or adapter) directory to create")
    fetch.add_argument("--format", choices=("checkpoint", "peft"), default="checkpoint",
                       help="checkpoint: base + delta merged (reconstruct); peft: a LoRA adapter (export)")
    fetch.add_argument("--profile", choices=ADAPTER_PROFILES, default="peft", help="with --format peft, as in export")
    fetch.add_argument("--dtype", choices=ADAPTER_DTYPES, default="float16",
                       help="with --format peft: adapter tensor type")
    fetch.add_argument("--overwrite", action="store_true")
    fetch.set_defaults(handler=run_fetch)

    notify = commands.add_parser(
        "notify", help="announce a saved checkpoint: the event that starts the compress deployment"
    )
    notify.add_argument("--checkpoint", required=True, help="the fine-tuned checkpoint: directory or s3://bucket/prefix")
    notify.add_argument("--base", required=True, help="its base checkpoint: directory or s3://bucket/prefix")
    notify.add_argument("--model", required=True, help="the model's name in the catalog")
    notify.add_argument("--store", help="artifact store (default: the deployment's $OSD_FLEET_STORE)")
    notify.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="read the checkpoint's headers first and refuse an incomplete one")
    notify.add_argument("--prefect-api-url", default=os.environ.get("PREFECT_API_URL"),
                        help="the Prefect API the deployments run on (default: $PREFECT_API_URL)")
    notify.add_argument("--json", action="store_true", help="print the event as one JSON object")
    notify.set_defaults(handler=run_notify)

    scan = commands.add_parser("scan", help="compress every checkpoint under a prefix that the catalog lacks")
    scan.add_argument("--prefix", required=True, help="where checkpoints appear: directory or s3://bucket/prefix")
    add_settings(scan, ModelSpec, skip=("name", "finetuned", "revision"))
    scan.add_argument("--retry-failed", action=argparse.BooleanOptionalAction, default=False,
                      help="compress again checkpoints whose catalog rows say failed")
    _add_sweep_arguments(scan, **_axes(SCAN_SWEEP))
    _add_store_argument(scan)
    _add_runtime_arguments(scan)
    scan.add_argument("--json", action="store_true", help="print the scan report as one JSON object")
    scan.set_defaults(handler=run_scan_command)

    serve = commands.add_parser(
        "serve", help="serve the scan (cron) and compress-on-event deployments from this process"
    )
    serve.add_argument("--prefix", required=True, help="where checkpoints appear: directory or s3://bucket/prefix")
    add_settings(serve, ModelSpec, skip=("name", "finetuned", "revision"))
    _add_store_argument(serve)
    serve.add_argument("--cron", default="*/30 * * * *", help="scan schedule (default: every 30 minutes, UTC)")
    _add_sweep_arguments(serve, **_axes(SCAN_SWEEP))
    _add_runtime_arguments(serve)
    serve.set_defaults(handler=run_serve)

    demo = commands.add_parser("demo", help="the whole pipeline on packaged workloads, on this machine, no setup")
    demo.add_argument("--workloads", type=comma_list(str), default=("tiny",),
                      help="comma-separated workload names (default: tiny; the decoder smollm2-sst2 and "
                           "smollm2-arc after `make llm`)")
    # 10 variants (truncsvd runs at whole ranks only): a few minutes here
    _add_sweep_arguments(demo, ranks=(0.5, 1), allocations=("uniform", "global-all"))
    demo.add_argument("--store", default=str(DEMO_STORE), help=f"artifact store (default: {DEMO_STORE})")
    demo.add_argument(
        "--min-accuracy",
        type=float,
        help="accuracy floor of the smallest-delta query (default: the fine-tune's accuracy minus 0.02)",
    )
    _add_runtime_arguments(demo)
    demo.set_defaults(handler=run_demo_command)


def _add_sweep_arguments(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """The sweep's axes (``--ranks``, ``--methods``, ``--allocations``, ``--group-mib``) and every other
    compression setting as the template of its variants: the fields of ``SweepSpec`` and ``CompressionConfig``."""
    add_settings(parser, SweepSpec, defaults=defaults)
    add_settings(parser, CompressionConfig, skip=SWEEP_AXES)


def _axes(sweep: SweepSpec) -> dict[str, Any]:
    """A sweep's axes as flag defaults."""
    return {name: getattr(sweep, name) for name in ("ranks", "methods", "allocations", "group_mib")}


def _add_bound_arguments(parser: argparse.ArgumentParser) -> None:
    """The query's bound: a floor for a higher-is-better metric, a ceiling for perplexity."""
    bound = parser.add_mutually_exclusive_group(required=True)
    bound.add_argument("--min-accuracy", "--at-least", dest="min_accuracy", type=float,
                       help="floor of a higher-is-better metric (accuracy, acc, acc_norm)")
    bound.add_argument("--at-most", type=float, help="ceiling of a lower-is-better metric (perplexity)")
    parser.add_argument("--metric", help="which metric, when the model's rows measure several")


def _add_store_argument(parser: argparse.ArgumentParser) -> None:
    """``--store``, by default the ``$OSD_FLEET_STORE`` that deployments and ``infra/local-stack.sh`` set."""
    default = os.environ.get("OSD_FLEET_STORE")
    parser.add_argument("--store", default=default, required=default is None,
                        help="artifact store and catalog: directory or s3://bucket/prefix (default: $OSD_FLEET_STORE)")


def _add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prefect-api-url",
        default=os.environ.get("PREFECT_API_URL"),
        help="use this Prefect API (default: $PREFECT_API_URL, else start a local server)",
    )
    parser.add_argument(
        "--ray-address",
        default=os.environ.get("RAY_ADDRESS"),
        help="join this Ray cluster (default: $RAY_ADDRESS, else start a local one)",
    )
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of a local Ray instance")
    parser.add_argument(
        "--prefect-home", type=Path, help="PREFECT_HOME of a started server (default: .osd-fleet/prefect)"
    )
    parser.add_argument("--ui", action=argparse.BooleanOptionalAction, default=False, help="serve the Prefect UI")


def runtime_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "api_url": args.prefect_api_url,
        "ray_address": args.ray_address,
        "num_cpus": args.num_cpus,
        "home": args.prefect_home,
        "ui": args.ui,
    }


def sweep_from_args(args: argparse.Namespace) -> SweepSpec:
    template = CompressionConfig(**read_settings(args, CompressionConfig, skip=SWEEP_AXES))
    return SweepSpec(**read_settings(args, SweepSpec, skip=("compression",)), compression=template)


def run_run(args: argparse.Namespace) -> int:
    from flows.pipeline import run_model

    model = ModelSpec(**read_settings(args, ModelSpec))
    rows = run_model(model, sweep_from_args(args), args.store, **runtime_options(args))
    return _report(rows, args.json)


def run_run_fleet(args: argparse.Namespace) -> int:
    from flows.fleet_config import load_fleet_config
    from flows.pipeline import run_fleet

    rows = run_fleet(load_fleet_config(args.config), **runtime_options(args))
    return _report(rows, args.json)


def run_smallest(args: argparse.Namespace) -> int:
    from osd_io.catalog import Catalog, NoneMeetsError
    from osd_io.storage import open_store

    try:
        row = Catalog(open_store(args.store)).smallest(args.model, args.min_accuracy, at_most=args.at_most,
                                                       metric=args.metric)
    except NoneMeetsError as exc:
        print(f"osd-fleet: {exc}", file=sys.stderr)
        return EXIT_NONE_MEETS
    if args.json:
        print(json.dumps(row_json(row), sort_keys=True))
    else:
        print(
            f"{row.model} {row.method} r={row.rank} {row.allocation}: {row.metric} {row.accuracy:.4f}, "
            f"{row.bytes:,} bytes at {row.uri}"
        )
    return 0


def run_compact(args: argparse.Namespace) -> int:
    from osd_io.catalog import Catalog
    from osd_io.storage import open_store

    catalog = Catalog(open_store(args.store))
    done = catalog.compact(retain_hours=args.retain_hours)
    if done is None:
        print(f"nothing to compact ({catalog.file_count()} file(s)) in {catalog.uri}")
    else:
        print(f"compacted {catalog.uri}: {done.files_before} files into {done.files_after}, "
              f"{done.vacuumed} old file(s) vacuumed")
    return 0


def run_migrate(args: argparse.Namespace) -> int:
    from osd_io.catalog import Catalog
    from osd_io.storage import open_store

    catalog = Catalog(open_store(args.store))
    done = catalog.migrate()
    if not done.parts:
        print(f"nothing to migrate: no parquet parts beside {catalog.uri}")
    else:
        print(f"migrated {done.parts} part(s), {done.rows} distinct row(s) ({done.added} new) into {catalog.uri}; "
              "parts deleted")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from osd_io.catalog import Catalog
    from osd_io.storage import open_store

    rows = Catalog(open_store(args.store)).rows(args.model)
    if args.json:
        for row in rows:
            print(json.dumps(row_json(row), sort_keys=True))
    else:
        print(format_rows(rows) if rows else "(the catalog is empty)")
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from flows.report import comparable_rows, finetuned_accuracy, is_png, pareto_front, plot_png
    from osd_core.outputs import write_file
    from osd_io.catalog import Catalog
    from osd_io.storage import open_store

    rows = comparable_rows(Catalog(open_store(args.store)).rows(), args.model)
    png = plot_png(rows, reference=finetuned_accuracy(rows))
    write_file(args.out, png, what="PNG plot", is_ours=is_png)
    front = pareto_front([(row.bytes, row.accuracy) for row in rows],  # type: ignore[misc]
                         higher_is_better=rows[0].higher_is_better)
    print(f"{args.out}: {len(rows)} deltas of {args.model}, {len(front)} on the Pareto front")
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    from osd_core.adapters import check_adapter_output, export_adapter
    from osd_core.errors import ArtifactError
    from osd_core.reconstruct import check_restore_output, reconstruct_checkpoint
    from osd_io.artifacts import download_delta
    from osd_io.catalog import Catalog, NoneMeetsError
    from osd_io.storage import open_store

    check = check_adapter_output if args.format == "peft" else check_restore_output
    check(args.out, inputs=(args.base,), overwrite=args.overwrite)
    store = open_store(args.store)
    try:
        row = Catalog(store).smallest(args.model, args.min_accuracy, at_most=args.at_most, metric=args.metric)
    except NoneMeetsError as exc:
        print(f"osd-fleet: {exc}", file=sys.stderr)
        return EXIT_NONE_MEETS
    prefix = row.params_dict.get("prefix")
    if not isinstance(prefix, str):
        raise ArtifactError(f"catalog row {row.artifact_id[:12]} of {row.model!r} records no artifact prefix")
    with scratch_dir("fetch") as scratch:
        delta = download_delta(store, prefix, Path(scratch) / "delta", expected_sha256=row.sha256)
        if args.format == "peft":
            report = export_adapter(args.base, delta, args.out, profile=args.profile, dtype=args.dtype,
                                    overwrite=args.overwrite)
            out, what = Path(report.out), f"{args.profile} LoRA adapter (r = {report.rank}) of "
        else:
            out = reconstruct_checkpoint(args.base, delta, args.out, overwrite=args.overwrite,
                                         expected_sha256=row.sha256)
            what = ""
    print(
        f"{out}: {what}{row.model} {row.method} r={row.rank} {row.allocation}, {row.metric} {row.accuracy:.4f}, "
        f"{row.bytes:,} bytes fetched from {row.uri}"
    )
    return 0


def run_demo_command(args: argparse.Namespace) -> int:
    from osd_cli.demo import run_demo

    return run_demo(
        args.workloads,
        args.store,
        sweep_from_args(args),
        min_accuracy=args.min_accuracy,
        runtime=runtime_options(args),
    )


def run_notify(args: argparse.Namespace) -> int:
    from flows.operations import notify_checkpoint

    event = notify_checkpoint(
        args.checkpoint, args.base, args.model, store=args.store, verify=args.verify, api_url=args.prefect_api_url
    )
    if args.json:
        print(json.dumps(event.model_dump(mode="json"), sort_keys=True))
    else:
        print(f"{event.event} {args.model}: {args.checkpoint} (event {event.id})")
    return 0


def run_scan_command(args: argparse.Namespace) -> int:
    from flows.operations import run_scan

    report = run_scan(
        args.prefix, args.base, args.store, sweep_from_args(args), calibration=args.calibration, eval=args.eval,
        retry_failed=args.retry_failed, **runtime_options(args),
    )
    if args.json:
        print(json.dumps(dataclasses.asdict(report), sort_keys=True))
    else:
        print(report.summary)
    for name, error in {**report.failed, **report.not_ready}.items():
        print(f"osd-fleet: {name}: {error}", file=sys.stderr)
    return EXIT_FAILED if report.failed else 0


def run_serve(args: argparse.Namespace) -> int:
    from flows.serve import serve_deployments

    serve_deployments(
        prefix_uri=args.prefix, base_uri=args.base, store_uri=args.store, cron=args.cron,
        sweep=to_table(sweep_from_args(args)), calibration=args.calibration, eval=args.eval,
        runtime=runtime_options(args),
    )
    return 0


def row_json(row: CatalogRow) -> dict[str, Any]:
    record = row.to_record()
    record["created"] = row.created.isoformat()
    record["params"] = row.params_dict
    return record


def format_rows(rows: Sequence[CatalogRow]) -> str:
    import pandas as pd

    frame = pd.DataFrame([row.to_record() for row in rows], columns=list(TABLE_COLUMNS))
    return frame.to_string(index=False, formatters={
        "accuracy": lambda v: "-" if pd.isna(v) else f"{v:.4f}",
        "rank": "{:g}".format,  # float columns since fractional budgets; 1 reads better than 1.0
        "extra_rank": "{:g}".format,
    })


def _report(rows: Sequence[CatalogRow], as_json: bool) -> int:
    if as_json:
        for row in rows:
            print(json.dumps(row_json(row), sort_keys=True))
    else:
        print(format_rows(rows))
    failed = [row for row in rows if row.status != "ok"]
    for row in failed:
        print(
            f"osd-fleet: {row.model} {row.method} r={row.rank} {row.allocation} failed: "
            f"{row.params_dict.get('error', 'unknown error')}",
            file=sys.stderr,
        )
    return EXIT_FAILED if failed else 0
