"""No Docker engine runs here: check what can be checked. Every path the Dockerfile copies exists, and its
default command is a valid invocation of the installed CLI."""

import json
import re
import shutil
import subprocess

from pipeline.config import load_config

from .conftest import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()


def test_every_copied_path_exists():
    copies = re.findall(r"^COPY\s+(?!--from)(.+)$", DOCKERFILE, flags=re.MULTILINE)
    assert copies
    for line in copies:
        *sources, _dest = line.split()
        for src in sources:
            assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repository"


def test_image_runs_as_non_root_with_volumes():
    assert re.search(r"^USER\s+vitflow", DOCKERFILE, flags=re.MULTILINE)
    volumes = json.loads(re.search(r"^VOLUME\s+(\[.*\])", DOCKERFILE, flags=re.MULTILINE).group(1))
    assert "/data" in volumes and "/app/mlflow" in volumes
    assert "VITFLOW_DATA_DIR=/data" in DOCKERFILE


def test_default_command_works_here():
    cmd = json.loads(re.search(r"^CMD\s+(\[.*\])", DOCKERFILE, flags=re.MULTILINE).group(1))
    assert cmd[:2] == ["vitflow", "run"]
    config = cmd[cmd.index("--config") + 1]
    load_config(config)  # the preset it names exists and is valid
    exe = shutil.which("vitflow", path=str(REPO / ".venv" / "bin")) or shutil.which("vitflow")
    assert exe, "the vitflow console script is not installed"
    result = subprocess.run([exe, *cmd[1:], "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--config" in result.stdout
