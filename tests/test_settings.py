"""Settings are declared once: flags, fleet-file tables and flow parameters all derive from the fields."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from flows.fleet_config import (
    DEFAULT_GROUP_BYTES,
    GPU_GROUP_BYTES,
    FleetConfig,
    ModelSpec,
    SweepSpec,
    load_fleet_config,
    sweep_from_dict,
)
from osd_cli.flags import add_settings, read_settings
from osd_cli.main import build_parser
from osd_core.config import CompressionConfig
from osd_core.errors import ConfigError
from osd_core.settings import from_table, to_table


def subcommand(name: str) -> argparse.ArgumentParser:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


def flag_dests(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions if action.option_strings}


def test_every_compression_setting_is_a_flag_with_its_fields_help_and_choices():
    flags = flag_dests(subcommand("compress"))
    for field in dataclasses.fields(CompressionConfig):
        action = flags[field.name]
        assert action.option_strings[0] == "--" + field.name.replace("_", "-")
        assert action.help.startswith(field.metadata["help"])
        assert tuple(action.choices or ()) == field.metadata.get("choices", ())
    assert flags["allocation"].choices == ("uniform", "global", "global-all")  # across layers; factor_split: within one


@pytest.mark.parametrize("command", ["run", "scan", "serve", "demo"])
def test_sweep_commands_take_the_sweep_axes_and_every_other_compression_setting(command):
    flags = flag_dests(subcommand(command))
    for name in ("ranks", "methods", "allocations", "group_mib"):
        assert name in flags, name
    others = {f.name for f in dataclasses.fields(CompressionConfig)} - {"method", "rank"}
    assert others <= set(flags) and "rank" not in flags and "method" not in flags


def test_flags_parse_into_the_same_sweep_a_table_gives():
    parser = argparse.ArgumentParser()
    add_settings(parser, SweepSpec)
    add_settings(parser, CompressionConfig, skip=("method", "rank"))
    args = parser.parse_args(["--ranks", "0.5,1", "--methods", "magtruncsvd", "--allocations", "uniform,global",
                              "--group-mib", "0.5", "--seed", "3", "--no-compress-embeddings"])
    template = CompressionConfig(**read_settings(args, CompressionConfig, skip=("method", "rank")))
    from_flags = SweepSpec(**read_settings(args, SweepSpec, skip=("compression",)), compression=template)
    from_file = sweep_from_dict({"ranks": [0.5, 1], "methods": ["magtruncsvd"], "allocations": ["uniform", "global"],
                                 "group_mib": 0.5, "compression": {"seed": 3, "compress_embeddings": False}})
    assert from_flags == from_file and from_file.group_bytes() == 1 << 19
    assert sweep_from_dict(to_table(from_file)) == from_file  # the deployments' JSON parameter round-trips


def test_layer_groups_are_larger_where_tasks_take_a_gpu_unless_the_sweep_sets_their_size():
    assert SweepSpec().group_bytes() == DEFAULT_GROUP_BYTES and SweepSpec().group_bytes(gpu=True) == GPU_GROUP_BYTES
    assert GPU_GROUP_BYTES > DEFAULT_GROUP_BYTES
    assert SweepSpec(group_mib=64).group_bytes(gpu=True) == SweepSpec(group_mib=64).group_bytes() == 64 << 20


@pytest.mark.parametrize(("table", "message"), [
    ({"ranks": [1, True]}, r"sweep\.ranks\[2\] must be an integer or a number, got True"),
    ({"ranks": "1"}, r"sweep\.ranks must be a list of an integer or a number, got '1'"),
    ({"methods": ["truncsvd", 3]}, r"sweep\.methods\[2\] must be a string, got 3"),
    ({"group_mib": "32"}, r"sweep\.group_mib must be a number or null, got '32'"),
    ({"group_mib": 0}, r"group_mib must be a positive number, got 0"),
    ({"compression": {"whiten": "yes"}}, r"sweep\.compression\.whiten must be true or false, got 'yes'"),
    ({"compression": {"sede": 1}}, r"sweep\.compression: unknown field 'sede'; expected compress_embeddings"),
    ({"compression": []}, r"sweep\.compression must be a table/object, got list"),
    ({"compression": {"factor_split": "joint"}}, r"factor_split='joint' needs commensurate scores"),
])
def test_tables_are_checked_by_the_fields_types_naming_the_value(table, message):
    with pytest.raises(ConfigError, match=message):
        sweep_from_dict(table)


def test_a_fleet_file_reads_into_the_same_classes(tmp_path):
    (tmp_path / "fleet.toml").write_text('store = "s"\n[[models]]\nname = "m"\nbase = "b"\n')
    with pytest.raises(ConfigError, match=r"fleet.toml: models\[1\]: missing field 'finetuned'"):
        load_fleet_config(tmp_path / "fleet.toml")
    (tmp_path / "fleet.toml").write_text('store = 3\n[[models]]\nname = "m"\nbase = "b"\nfinetuned = "f"\n')
    with pytest.raises(ConfigError, match=r"fleet.toml: store must be a string, got 3"):
        load_fleet_config(tmp_path / "fleet.toml")
    table = {"store": "s", "models": [{"name": "m", "base": "b", "finetuned": "f"}], "sweep": {"methods": ["truncsvd"]}}
    fleet = from_table(FleetConfig, table)
    assert fleet.models == (ModelSpec("m", "b", "f"),) and fleet.sweep == SweepSpec(methods=("truncsvd",))


def test_flows_validate_their_parameters():
    from flows.operations import compress_checkpoint, scan_checkpoints
    from flows.pipeline import compress_fleet, compress_model

    for flow in (compress_model, compress_fleet, scan_checkpoints, compress_checkpoint):
        assert flow.should_validate_parameters, flow.name
    checked = compress_model.validate_parameters(
        {"model": {"name": "m", "base": "b", "finetuned": "f"}, "sweep": {"ranks": [1]}, "store": "s"}
    )
    assert checked["model"] == ModelSpec("m", "b", "f") and checked["sweep"].ranks == (1,)
    from prefect.exceptions import ParameterTypeError

    with pytest.raises(ParameterTypeError):
        compress_model.validate_parameters({"model": {"name": "m", "base": "b"}, "sweep": {}, "store": "s"})
    with pytest.raises(ParameterTypeError):
        scan_checkpoints.validate_parameters({"prefix_uri": ["not", "a", "string"], "base_uri": "b", "store_uri": "s"})
