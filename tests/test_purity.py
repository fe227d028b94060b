"""osd_core stays pure: importing it (all of it) loads no orchestration or storage library."""

import subprocess
import sys


def test_osd_core_loads_no_prefect_ray_boto3_or_pandas():
    code = (
        "import sys, pkgutil, importlib, osd_core\n"
        "for m in pkgutil.iter_modules(osd_core.__path__): importlib.import_module('osd_core.' + m.name)\n"
        "bad = sorted({n.split('.')[0] for n in sys.modules} & {'prefect', 'ray', 'boto3', 'botocore', 'pandas'})\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_compress_command_does_not_import_orchestration():
    code = (
        "import sys, osd_cli.main\n"
        "bad = sorted({n.split('.')[0] for n in sys.modules} & {'prefect', 'ray', 'boto3', 'pandas'})\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
