"""The set-up and test scripts (scripts/setup_env.sh, scripts/test.sh) and where the benchmark and
the tau experiment write by default.

The scripts run in a copy of the repository whose .venv/bin/python is a stand-in that records
how it was called and "builds" a fake library, so what the scripts decide (install or not,
build or not, which pytest arguments) is checked in a second, without pip or a compiler.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO_ROOT, load_script

FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/../calls.log"
case "$*" in
  --version) echo "Python 3.0.fake" ;;
  *"-v -e ."*)
    [ "${FAKE_BUILD_FAILS:-0}" = 1 ] && { echo "fake compiler error"; exit 1; }
    echo "  running build_ext"
    echo "  plif_cuda: building the CPU kernels only (fake build)" >&2
    mkdir -p plif_cuda && echo "library" > plif_cuda/_C.fake.so ;;
esac
exit 0
"""
# What setup_env.sh reads from the environment: fixed here so the host's settings do not leak in.
BUILD_VARIABLES = ("PLIF_CPU_ONLY", "CUDA_HOME", "TORCH_CUDA_ARCH_LIST", "PLIF_PTXAS_VERBOSE", "TORCH_SPEC", "MAX_JOBS")


@pytest.fixture
def sandbox(tmp_path):
    """A copy of what the scripts read, with the stand-in .venv/bin/python."""
    for name in ("scripts", "csrc"):
        shutil.copytree(REPO_ROOT / name, tmp_path / name)
    for name in ("setup.py", "requirements-dev.txt", "pytest.ini"):
        shutil.copy2(REPO_ROOT / name, tmp_path / name)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return tmp_path


def run_script(sandbox: Path, script: str, *args: str, **env: str) -> tuple[str, list[str]]:
    """Run scripts/<script> in the sandbox; returns (its output, the stand-in python's calls)."""
    log = sandbox / ".venv" / "calls.log"
    log.unlink(missing_ok=True)
    environment = {k: v for k, v in os.environ.items() if k not in BUILD_VARIABLES}
    # An existing folder stands in for the installed Fashion-MNIST: only the tests below run apt-get (a stand-in).
    environment.update({"CUDA_HOME": "", "MAX_JOBS": "1", "FASHION_MNIST_DIR": str(sandbox), **env})
    completed = subprocess.run(
        ["bash", str(sandbox / "scripts" / script), *args],
        cwd=sandbox,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = completed.stdout + completed.stderr
    if completed.returncode != 0:
        raise AssertionError(f"{script} failed ({completed.returncode}):\n{output}")
    return output, log.read_text().splitlines() if log.exists() else []


def pip_installs(calls):
    return [c for c in calls if c.startswith("-m pip install") and "-e ." not in c]


def builds(calls):
    return [c for c in calls if c.startswith("-m pip install") and "-e ." in c]


def test_a_second_set_up_neither_installs_nor_builds(sandbox):
    output, calls = run_script(sandbox, "setup_env.sh")
    assert len(pip_installs(calls)) == 3 and len(builds(calls)) == 1
    assert "[setup] plif_cuda: building the CPU kernels only (fake build)" in output, (
        "the build summary pip prints indented must be shown"
    )
    output, calls = run_script(sandbox, "setup_env.sh")
    assert pip_installs(calls) == [] and builds(calls) == [], calls
    assert "extension up to date" in output


@pytest.mark.parametrize(
    "change", ("kernel source", "setup.py", "arch list", "cpu only", "library deleted", "library rebuilt elsewhere")
)
def test_a_change_to_what_the_extension_is_built_from_rebuilds_it(sandbox, change):
    run_script(sandbox, "setup_env.sh")
    env = {}
    if change == "kernel source":
        with open(sandbox / "csrc" / "plif_math.h", "a") as f:
            f.write("\n// changed\n")
    elif change == "setup.py":
        with open(sandbox / "setup.py", "a") as f:
            f.write("\n# changed\n")
    elif change == "arch list":
        env["TORCH_CUDA_ARCH_LIST"] = "9.0"
    elif change == "cpu only":
        env["PLIF_CPU_ONLY"] = "1"
    elif change == "library deleted":
        (sandbox / "plif_cuda" / "_C.fake.so").unlink()
    else:
        (sandbox / "plif_cuda" / "_C.fake.so").write_text("a library of another size")
    _, calls = run_script(sandbox, "setup_env.sh", **env)
    assert len(builds(calls)) == 1, f"{change}: no rebuild"
    assert pip_installs(calls) == [], f"{change}: pip ran again"
    _, calls = run_script(sandbox, "setup_env.sh", **env)
    assert builds(calls) == [], f"{change}: rebuilt a second time"


def test_touching_a_source_without_changing_it_does_not_rebuild(sandbox):
    run_script(sandbox, "setup_env.sh")
    os.utime(sandbox / "csrc" / "plif_math.h")
    _, calls = run_script(sandbox, "setup_env.sh")
    assert builds(calls) == []


def test_a_new_torch_spec_or_requirement_reinstalls_and_rebuilds(sandbox):
    run_script(sandbox, "setup_env.sh")
    _, calls = run_script(sandbox, "setup_env.sh", TORCH_SPEC="torch==2.13.0")
    assert any("torch==2.13.0" in c for c in pip_installs(calls)) and len(builds(calls)) == 1
    with open(sandbox / "requirements-dev.txt", "a") as f:
        f.write("tomli\n")
    _, calls = run_script(sandbox, "setup_env.sh", TORCH_SPEC="torch==2.13.0")
    assert len(pip_installs(calls)) == 3 and len(builds(calls)) == 1


def test_a_failed_build_is_retried(sandbox):
    run_script(sandbox, "setup_env.sh")
    with open(sandbox / "csrc" / "plif_math.h", "a") as f:
        f.write("\n// broken\n")
    with pytest.raises(AssertionError, match="the build failed"):
        run_script(sandbox, "setup_env.sh", FAKE_BUILD_FAILS="1")
    _, calls = run_script(sandbox, "setup_env.sh")
    assert len(builds(calls)) == 1


FAKE_APT_GET = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_APT_LOG"
case "$1" in
  update) touch "$FAKE_APT_LOG.lists" ;;
  install)
    if [ "${FAKE_APT_NO_LISTS:-0}" = 1 ] && [ ! -f "$FAKE_APT_LOG.lists" ]; then
      echo "E: Unable to locate package"; exit 100
    fi
    mkdir -p "$FASHION_MNIST_DIR" ;;
esac
exit 0
"""


def fake_commands(sandbox: Path, uid: int) -> dict:
    """PATH with a stand-in apt-get (logs its arguments, "installs" the folder) and an id that says ``uid``."""
    bin_dir = sandbox / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "apt-get").write_text(FAKE_APT_GET)
    (bin_dir / "id").write_text(f"#!/usr/bin/env bash\necho {uid}\n")
    for tool in ("apt-get", "id"):
        (bin_dir / tool).chmod(0o755)
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_APT_LOG": str(sandbox / "apt.log"),
        "FASHION_MNIST_DIR": str(sandbox / "datasets" / "fashion-mnist"),
    }


def apt_calls(sandbox: Path) -> list[str]:
    log = sandbox / "apt.log"
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("package_lists", ("present", "absent"))
def test_set_up_installs_fashion_mnist_with_apt_get_once(sandbox, package_lists):
    env = fake_commands(sandbox, uid=0)
    if package_lists == "absent":
        env["FAKE_APT_NO_LISTS"] = "1"
    output, _ = run_script(sandbox, "setup_env.sh", **env)
    expected = ["install -y -q dataset-fashion-mnist"]
    if package_lists == "absent":
        expected += ["update -q", "install -y -q dataset-fashion-mnist"]
    assert apt_calls(sandbox) == expected
    assert "installing Debian's dataset-fashion-mnist" in output
    assert (sandbox / "datasets" / "fashion-mnist").is_dir()
    output, _ = run_script(sandbox, "setup_env.sh", **env)
    assert apt_calls(sandbox) == expected, "apt-get ran again with the dataset installed"
    assert "Fashion-MNIST: installed in" in output


def test_set_up_without_root_skips_fashion_mnist_and_says_how_to_install_it(sandbox):
    output, calls = run_script(sandbox, "setup_env.sh", **fake_commands(sandbox, uid=1000))
    assert apt_calls(sandbox) == []
    assert "apt-get cannot install it here (it needs root and apt-get)" in output
    assert "apt-get install dataset-fashion-mnist" in output
    assert len(builds(calls)) == 1, "the rest of the set-up must go on"


@pytest.mark.parametrize(
    "args", (["-q", "tests/test_bad_inputs.py"], ["-q", "-ra"], ["tests/test_ops.py::test_x", "-x"])
)
def test_test_sh_passes_its_arguments_to_pytest_unchanged(sandbox, args):
    run_script(sandbox, "setup_env.sh")
    _, calls = run_script(sandbox, "test.sh", *args)
    assert calls[-1] == "-m pytest " + " ".join(args)


def test_pytest_runs_tests_without_paths_and_only_the_given_paths_with_them(tmp_path):
    """test.sh relies on pytest.ini's testpaths: no path means tests/, a path replaces it."""
    shutil.copy2(REPO_ROOT / "pytest.ini", tmp_path / "pytest.ini")
    for folder, name in (("tests", "test_a.py"), ("tests", "test_b.py"), ("other", "test_c.py")):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / name).write_text("def test_one():\n    pass\n")

    def collected(*args):
        completed = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return sorted(line.split("::")[0] for line in completed.stdout.splitlines() if "::" in line)

    assert collected() == ["tests/test_a.py", "tests/test_b.py"]
    assert collected("-ra", "tests/test_b.py") == ["tests/test_b.py"]
    assert collected("other/test_c.py") == ["other/test_c.py"]


# ---- default output locations -----------------------------------------------------------------
def _ignored_by_git(path: Path) -> bool:
    completed = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO_ROOT, capture_output=True)
    assert completed.returncode in (0, 1), completed.stderr
    return completed.returncode == 0


def _git_checkout() -> bool:
    try:
        return subprocess.run(["git", "rev-parse", "--git-dir"], cwd=REPO_ROOT, capture_output=True).returncode == 0
    except OSError:
        return False


def _default_outputs():
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        import run as benchmark
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks"))
    tau_sensitivity = load_script("examples/tau_sensitivity.py")
    stem = benchmark.output_stem(benchmark.arguments([]), ["cpu"])
    return {
        "benchmark": [benchmark.arguments([]).out / f"{stem}{suffix}" for suffix in (".json", ".md", ".png")],
        "tau_sensitivity": [
            tau_sensitivity.parse_args([]).out / name for name in ("tau_sensitivity.csv", "tau_sensitivity.png")
        ],
    }


@pytest.mark.parametrize("script", ("benchmark", "tau_sensitivity"))
def test_default_runs_write_outside_the_committed_results(script):
    outputs = _default_outputs()[script]
    for path in outputs:
        assert "results" not in path.relative_to(REPO_ROOT).parts, f"{path}: a default run must not overwrite results/"
        if _git_checkout():
            assert _ignored_by_git(path), f"{path} is not ignored by git: a default run would dirty the checkout"
