"""The GitHub Actions workflows and the publishing scripts: the rules they must keep, checked
without GitHub (scripts/lint runs the linters; these are fastsd's own rules)."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from fastsd.variants import VARIANTS
from fastsd_testing.helpers import script_module

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yaml"))
SCRIPTS = ROOT / ".github" / "scripts"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def triggers(workflow: dict) -> dict:
    return workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` key as True


def steps(workflow: dict):
    for job_name, job in workflow["jobs"].items():
        for step in job.get("steps", []):
            yield job_name, step


def import_script(name: str):
    return script_module(f".github/scripts/{name}.py")


@pytest.fixture(scope="module")
def push_workflow() -> dict:
    return load(ROOT / ".github" / "workflows" / "push.yaml")


def test_both_workflows_exist():
    assert {path.name for path in WORKFLOWS} >= {"ci.yaml", "push.yaml"}


# --- supply chain and least privilege -------------------------------------------------------

USES = re.compile(r"^\s*(?:-\s+)?uses:\s*(?P<ref>\S+)(?P<comment>.*)$")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_action_is_pinned_to_a_full_commit_sha_with_its_version(path):
    uses = [USES.match(line) for line in path.read_text().splitlines()]
    uses = [match for match in uses if match]
    assert uses, "no uses: found: the pattern is stale"
    for match in uses:
        assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", match["ref"]), f"not pinned to a commit: {match[0]}"
        assert re.fullmatch(r"\s*# v\d+\.\d+\.\d+", match["comment"]), f"no # vX.Y.Z comment: {match[0]}"


def test_one_action_one_pin_across_workflows():
    pins: dict[str, set[str]] = {}
    for path in WORKFLOWS:
        for line in path.read_text().splitlines():
            if match := USES.match(line):
                action, _, sha = match["ref"].partition("@")
                pins.setdefault(action, set()).add(f"{sha}{match['comment']}")
    assert {action: refs for action, refs in pins.items() if len(refs) > 1} == {}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_no_template_expansion_inside_run_blocks(path):
    # ${{ }} in a script is pasted in before the shell parses it: values go through env: instead.
    offenders = [
        f"{job}: {step.get('name', step['run'][:40])}"
        for job, step in steps(load(path))
        if "run" in step and "${{" in step["run"]
    ]
    assert offenders == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_permissions_are_empty_by_default_and_granted_per_job(path):
    workflow = load(path)
    assert workflow["permissions"] == {}
    for name, job in workflow["jobs"].items():
        assert job.get("permissions") == {"contents": "read"}, name
        assert isinstance(job.get("timeout-minutes"), int), f"{name} has no timeout-minutes"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_checkout_never_leaves_the_token_in_git_config(path):
    checkouts = [step for _, step in steps(load(path)) if step.get("uses", "").startswith("actions/checkout@")]
    assert checkouts
    assert all(step.get("with", {}).get("persist-credentials") is False for step in checkouts)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_runs_are_grouped_for_concurrency(path):
    concurrency = load(path)["concurrency"]
    assert "${{ github.workflow }}" in concurrency["group"]


def test_ci_runs_once_per_change_and_never_cancels_a_check_on_main():
    workflow = load(ROOT / ".github" / "workflows" / "ci.yaml")
    assert triggers(workflow)["push"] == {"branches": ["main"]}  # a pull request's pushes run as the pull request
    concurrency = workflow["concurrency"]
    assert concurrency["cancel-in-progress"] == "${{ github.event_name == 'pull_request' }}"
    assert concurrency["group"].endswith("${{ github.event.pull_request.number || github.sha }}")


def test_publishing_queues_every_run_and_cancels_none(push_workflow):
    # Without queue: max GitHub keeps one pending run and cancels it when another arrives.
    assert push_workflow["concurrency"] == {
        "group": "${{ github.workflow }}",
        "cancel-in-progress": False,
        "queue": "max",
    }
    # actionlint 1.7.12 does not know the key yet: its config silences that one message, nothing else.
    config = load(ROOT / ".github" / "actionlint.yaml")
    assert config == {
        "paths": {".github/workflows/push.yaml": {"ignore": ['unexpected key "queue" for "concurrency" section']}}
    }


# --- one Cog version ------------------------------------------------------------------------


def cog_version() -> str:
    return subprocess.run([ROOT / "scripts" / "cog-version"], capture_output=True, text=True, check=True).stdout.strip()


def test_cog_yaml_pins_the_sdk_the_tests_run():
    sdk_version = load(ROOT / "cog.yaml")["build"]["sdk_version"]
    dev = (ROOT / "requirements-dev.txt").read_text()
    assert re.search(r"^cog==(\S+)$", dev, re.M)[1] == sdk_version
    assert re.search(r"^coglet==(\S+)$", dev, re.M)[1] == sdk_version
    assert cog_version() == sdk_version


def test_cog_version_fails_without_an_sdk_version(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy2(ROOT / "scripts" / "cog-version", tmp_path / "scripts")
    (tmp_path / "cog.yaml").write_text("build:\n  gpu: true\n")
    result = subprocess.run([tmp_path / "scripts" / "cog-version"], capture_output=True, text=True)
    assert result.returncode == 1 and "no build.sdk_version" in result.stderr


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_cog_build_and_push_uses_the_projects_cog_and_coglet(path, tmp_path):
    checked = 0
    for job_name, job in load(path)["jobs"].items():
        job_steps = job.get("steps", [])
        cog_runs = [i for i, step in enumerate(job_steps) if re.search(r"\bcog (build|push)\b", step.get("run", ""))]
        if not cog_runs:
            continue
        version_step = next(i for i, step in enumerate(job_steps) if step.get("id") == "cog")
        setup = next(i for i, step in enumerate(job_steps) if step.get("uses", "").startswith("replicate/setup-cog@"))
        assert version_step < setup < min(cog_runs), job_name
        # setup-cog's own default is an ancient v0.9.8.
        assert job_steps[setup]["with"]["cog-version"] == "v${{ steps.cog.outputs.version }}"
        # Run the step as GitHub would: it must hand the version on and pin coglet for what follows.
        output, env_file = tmp_path / f"{job_name}-output", tmp_path / f"{job_name}-env"
        subprocess.run(
            ["bash", "-eo", "pipefail", "-c", job_steps[version_step]["run"]],
            cwd=ROOT,
            check=True,
            env=dict(os.environ, GITHUB_OUTPUT=str(output), GITHUB_ENV=str(env_file)),
        )
        assert output.read_text() == f"version={cog_version()}\n"
        assert env_file.read_text() == f"COGLET_WHEEL=pypi:{cog_version()}\n"
        checked += 1
    assert checked == 1  # ci.yaml's cog-build, push.yaml's push


def test_scripts_the_workflows_run_exist_and_are_executable():
    named = set()
    for path in WORKFLOWS:
        for _, step in steps(load(path)):
            named |= set(re.findall(r"(?<![\w/.])((?:\.github/)?scripts/[\w.-]+)", step.get("run", "")))
    assert ".github/scripts/smoke_test_image.py" in named
    named.discard("scripts/download_weights.py")  # another part of fastsd, run as python scripts/...
    for script in sorted(named):
        path = ROOT / script
        assert path.is_file(), script
        if not path.suffix:  # run as a command, not through python or pip
            assert os.access(path, os.X_OK), f"{script} is not executable"


# --- ci.yaml --------------------------------------------------------------------------------


def test_ci_runs_tests_lint_and_a_real_cog_build_on_every_change():
    workflow = load(ROOT / ".github" / "workflows" / "ci.yaml")
    assert set(triggers(workflow)) == {"push", "pull_request"}
    runs = {job: " ".join(step.get("run", "") for step in spec["steps"]) for job, spec in workflow["jobs"].items()}
    assert "scripts/test" in runs["test"]
    assert "scripts/lint" in runs["lint"]
    assert "cog build -t fastsd:test" in runs["cog-build"]
    assert "python -m fastsd_testing.random_models --size tiny" in runs["cog-build"]
    assert "smoke_test_image.py fastsd:test" in runs["cog-build"]


# --- push.yaml ------------------------------------------------------------------------------


def test_push_runs_on_releases_and_by_hand(push_workflow):
    on = triggers(push_workflow)
    assert on["release"]["types"] == ["published"]
    assert on["workflow_dispatch"]["inputs"]["variants"]["default"] == "all"


def test_push_matrix_is_every_variant_by_default():
    select = import_script("push_matrix").select
    assert select("all") == select("") == select("  ALL ") == list(VARIANTS)


def test_push_matrix_takes_commas_and_spaces_in_variant_order():
    select = import_script("push_matrix").select
    assert select("sdxl, sd-turbo sdxl,sd-turbo") == ["sd-turbo", "sdxl"]


@pytest.mark.parametrize("requested", ["sd-turbo nope", "all, sdxl", "sd_turbo"])
def test_push_matrix_refuses_unknown_names(requested):
    with pytest.raises(ValueError):
        import_script("push_matrix").select(requested)


def test_select_variants_writes_the_matrix_output(tmp_path):
    output = tmp_path / "github_output"
    env = dict(os.environ, REQUESTED="sd15 lcm-dreamshaper", GITHUB_OUTPUT=str(output))
    subprocess.run([sys.executable, SCRIPTS / "push_matrix.py"], env=env, check=True, capture_output=True)
    assert output.read_text() == 'variants=["lcm-dreamshaper", "sd15"]\n'
    env["REQUESTED"] = "sd16"
    failed = subprocess.run([sys.executable, SCRIPTS / "push_matrix.py"], env=env, capture_output=True, text=True)
    assert failed.returncode == 1 and "::error" in failed.stdout and "sd16" in failed.stdout


def test_push_job_builds_each_selected_variant_with_its_own_weights(push_workflow):
    job = push_workflow["jobs"]["push"]
    assert job["strategy"]["matrix"]["variant"] == "${{ fromJSON(needs.variants.outputs.variants) }}"
    assert job["strategy"]["fail-fast"] is False
    assert job["env"]["VARIANT"] == "${{ matrix.variant }}"
    runs = [step.get("run", "") for step in job["steps"]]
    order = [
        next(i for i, run in enumerate(runs) if "free-disk-space" in run),
        next(i for i, run in enumerate(runs) if 'python scripts/download_weights.py "$VARIANT"' in run),
        next(i for i, run in enumerate(runs) if 'python scripts/select_variant.py "$VARIANT"' in run),
        next(i for i, run in enumerate(runs) if 'cog push "r8.im/$MODEL"' in run),
        next(i for i, run in enumerate(runs) if "replicate_model.py check" in run),
    ]
    assert order == sorted(order)


def test_push_job_names_models_from_repository_variables(push_workflow):
    model = push_workflow["jobs"]["push"]["env"]["MODEL"]
    assert model == ("${{ vars.REPLICATE_OWNER }}/${{ vars.REPLICATE_MODEL_PREFIX || 'fastsd-' }}${{ matrix.variant }}")


def test_push_job_uses_secrets_only_through_inputs_and_env(push_workflow):
    job = push_workflow["jobs"]["push"]
    cog = next(step for step in job["steps"] if step.get("uses", "").startswith("replicate/setup-cog@"))
    assert cog["with"]["token"] == "${{ secrets.REPLICATE_CLI_AUTH_TOKEN }}"
    check = next(step for step in job["steps"] if "replicate_model.py check" in step.get("run", ""))
    assert check["env"]["REPLICATE_API_TOKEN"] == "${{ secrets.REPLICATE_API_TOKEN }}"
    assert job["environment"]["name"] == "replicate"
    replicate_pin = (SCRIPTS / "requirements-replicate.txt").read_text()
    assert re.search(r"^replicate==\d+\.\d+\.\d+$", replicate_pin, re.M)


def test_push_job_installs_what_publishing_needs_and_no_torch(push_workflow):
    steps = push_workflow["jobs"]["push"]["steps"]
    # torch only where ControlNets are asked for (converting the SD 2.1 ones' pickles needs it).
    torch_steps = [step for step in steps if "torch" in step.get("run", "")]
    assert [step.get("if") for step in torch_steps] == ["inputs.controlnets != ''"]
    runs = " ".join(step.get("run", "") for step in steps if step not in torch_steps)
    assert "install-fastsd-deps" not in runs
    installs = re.findall(r"pip install .*", runs)
    assert len(installs) == 2
    assert installs[1].endswith("--no-deps -e .")  # fastsd itself, for the scripts, without its dependencies
    files = re.findall(r"-r (\S+)", installs[0])
    assert files == ["requirements-publish.txt", ".github/scripts/requirements-replicate.txt"]
    pins = {
        line.split("==")[0].lower()
        for name in files
        for line in (ROOT / name).read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert pins == {"huggingface_hub", "hf_xet", "replicate"}


def test_publish_requirements_are_the_images_own_pins():
    image = set((ROOT / "requirements.txt").read_text().splitlines())
    publish = [
        line
        for line in (ROOT / "requirements-publish.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert publish and set(publish) <= image


def test_download_weights_runs_without_torch(tmp_path):
    # What the push job and scripts/push give it: huggingface_hub, hf_xet and the standard library.
    blocked = ["torch", "diffusers", "transformers", "peft", "accelerate", "PIL", "numpy", "safetensors"]
    code = (
        "import runpy, sys\n"
        f"sys.modules.update(dict.fromkeys({blocked!r}))\n"  # None in sys.modules: import fails
        "sys.argv = ['download_weights.py', '--list']\n"
        "runpy.run_path('scripts/download_weights.py', run_name='__main__')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, FASTSD_WEIGHTS_ROOT=str(tmp_path)),
    )
    assert result.returncode == 0, result.stderr
    assert "sdxl-lcm" in result.stdout


def test_images_leave_out_local_leftovers():
    ignored = script_module("scripts/select_variant.py").dockerignore_text("sd-turbo", []).splitlines()
    assert {".whl", ".venv", ".venv-publish", ".git", "tests", "fastsd_testing"} <= set(ignored)


# --- replicate_model.py check ---------------------------------------------------------------


class FakeReplicate:
    """The few calls of the replicate client that check() makes: the Replicate API itself cannot be
    reached from a test."""

    def __init__(self, latest: str | None, status: str = "succeeded", output=("https://replicate.delivery/x.webp",)):
        self.latest, self.status, self.output, self.created = latest, status, list(output), []
        self.models = self
        self.predictions = self

    def get(self, model):
        return type(
            "Model", (), {"latest_version": type("Version", (), {"id": self.latest})() if self.latest else None}
        )

    def create(self, version, input):
        self.created.append(version)
        fake = self

        class Prediction:
            id, status, output, logs, metrics, error = "p1", fake.status, fake.output, "", {}, None

            def reload(self):
                pass

            def cancel(self):
                pass

        return Prediction()


def test_check_fails_when_the_push_made_no_new_version(capsys):
    client = FakeReplicate(latest="v1")
    assert import_script("replicate_model").check(client, "acme/m", previous="v1") == 1
    assert "made no new version" in capsys.readouterr().out
    assert client.created == []  # the old version is not what this run built: nothing to check


def test_check_runs_one_prediction_on_the_new_version():
    client = FakeReplicate(latest="v2")
    assert import_script("replicate_model").check(client, "acme/m", previous="v1") == 0
    assert client.created == ["v2"]
    assert import_script("replicate_model").check(FakeReplicate(latest="v1"), "acme/new", previous="") == 0


def test_check_fails_when_the_prediction_fails(capsys):
    assert import_script("replicate_model").check(FakeReplicate(latest="v2", status="failed"), "acme/m", "v1") == 1
    assert "failed" in capsys.readouterr().out


# --- scripts/push ---------------------------------------------------------------------------


@pytest.fixture
def project_copy(tmp_path) -> Path:
    """The files scripts/push uses, with download_weights.py stubbed: no hub, no Docker."""
    copy = tmp_path / "project"
    (copy / "scripts").mkdir(parents=True)
    for script in ("push", "select_variant.py"):
        shutil.copy2(ROOT / "scripts" / script, copy / "scripts" / script)
    shutil.copytree(ROOT / "fastsd", copy / "fastsd", ignore=shutil.ignore_patterns("__pycache__"))
    for script in ("cog-version",):
        shutil.copy2(ROOT / "scripts" / script, copy / "scripts" / script)
    shutil.copy2(ROOT / "cog.yaml", copy / "cog.yaml")
    shutil.copy2(ROOT / "requirements-publish.txt", copy / "requirements-publish.txt")
    # The project's venv, as scripts/setup-dev leaves it (fastsd installed, huggingface_hub): this one.
    (copy / ".venv").symlink_to(Path(sys.prefix))
    (copy / ".dockerignore").write_text("# the committed one\n.git\n")
    (copy / "scripts" / "download_weights.py").write_text(
        "import sys, pathlib\npathlib.Path('downloaded').write_text(' '.join(sys.argv[1:]))\n"
    )
    return copy


def fake_cog(folder: Path, exit_code: int, version: str | None = None) -> Path:
    """A `cog` of the project's version (or another) that records, while it runs, cog.yaml's
    variant, .dockerignore, its arguments and the coglet it would install."""
    folder.mkdir()
    cog = folder / "cog"
    cog.write_text(
        f"#!/bin/sh\n"
        f'if [ "$1" = --version ]; then\n'
        f"  echo 'cog version {version or cog_version()} (built 2026-10-20)'; exit 0\n"
        f"fi\n"
        f'grep FASTSD_VARIANT= cog.yaml > cog-saw\necho "$@" >> cog-saw\n'
        f'echo "$COGLET_WHEEL" > cog-saw-coglet\n'
        f"cp .dockerignore cog-saw-dockerignore\nexit {exit_code}\n"
    )
    cog.chmod(cog.stat().st_mode | stat.S_IXUSR)
    return folder


def run_push(project: Path, *args: str, path: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=path)
    return subprocess.run(
        [str(project / "scripts" / "push"), *args], cwd=project, env=env, capture_output=True, text=True, timeout=60
    )


def test_push_script_builds_the_variant_and_restores_cog_yaml(project_copy, tmp_path):
    original = (project_copy / "cog.yaml").read_text()
    original_ignore = (project_copy / ".dockerignore").read_text()
    bin_dir = fake_cog(tmp_path / "bin", 0)
    result = run_push(
        project_copy, "sdxl-turbo", "r8.im/acme/fastsd-sdxl-turbo", path=f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    )
    assert result.returncode == 0, result.stderr
    assert (project_copy / "downloaded").read_text() == "sdxl-turbo --controlnet "
    assert (project_copy / "cog-saw").read_text().split() == [
        "-",
        "FASTSD_VARIANT=sdxl-turbo",
        "push",
        "r8.im/acme/fastsd-sdxl-turbo",
    ]
    assert (project_copy / "cog-saw-coglet").read_text() == f"pypi:{cog_version()}\n"  # not the newest coglet
    # The image got this variant's weights only.
    ignored = (project_copy / "cog-saw-dockerignore").read_text().splitlines()
    assert "!weights/stabilityai/sdxl-turbo/**" in ignored and "weights/**" in ignored
    assert "!weights/stabilityai/sd-turbo/**" not in ignored
    assert (project_copy / "cog.yaml").read_text() == original
    assert (project_copy / ".dockerignore").read_text() == original_ignore
    # How to call it: a pushed model runs by version, through /v1/predictions.
    assert "https://api.replicate.com/v1/models/acme/fastsd-sdxl-turbo |" in result.stdout
    assert '"version": "acme/fastsd-sdxl-turbo:\'"$version"\'"' in result.stdout


def test_push_script_restores_cog_yaml_when_the_push_fails(project_copy, tmp_path):
    original = (project_copy / "cog.yaml").read_text()
    bin_dir = fake_cog(tmp_path / "bin", 3)
    result = run_push(project_copy, "sd15", "r8.im/acme/x", path=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert result.returncode == 3
    assert "FASTSD_VARIANT=sd15" in (project_copy / "cog-saw").read_text()
    assert (project_copy / "cog.yaml").read_text() == original
    assert (project_copy / ".dockerignore").read_text() == "# the committed one\n.git\n"


def test_push_script_names_the_variants_when_one_is_unknown(project_copy):
    result = run_push(project_copy, "sd-turbo-xl", "r8.im/acme/x", path=os.environ["PATH"])
    assert result.returncode == 1
    assert "unknown variant 'sd-turbo-xl'" in result.stderr and "lcm-dreamshaper" in result.stderr
    assert not (project_copy / "downloaded").exists()


def test_push_script_says_how_to_install_cog_when_it_is_missing(project_copy, tmp_path):
    # A PATH with python3 and the basic tools, but no cog.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    path = f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin"
    if shutil.which("cog", path=path):
        pytest.skip("cog is installed in /usr/bin")
    result = run_push(project_copy, "sd-turbo", "r8.im/acme/x", path=path)
    assert result.returncode == 127
    assert "cog CLI is not installed" in result.stderr and "releases/download/v" in result.stderr
    assert not (project_copy / "downloaded").exists()


def test_push_script_refuses_another_cog_release(project_copy, tmp_path):
    bin_dir = fake_cog(tmp_path / "bin", 0, version="0.19.2")
    result = run_push(project_copy, "sd-turbo", "r8.im/acme/x", path=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert result.returncode == 1
    assert f"this is cog 0.19.2; fastsd is built and tested with cog {cog_version()}" in result.stderr
    assert f"releases/download/v{cog_version()}/" in result.stderr
    assert not (project_copy / "downloaded").exists()


@pytest.mark.slow  # builds a virtualenv: 9 s
def test_push_script_without_the_project_venv_makes_its_own(project_copy, tmp_path):
    # No .venv: scripts/push makes .venv-publish and installs requirements-publish.txt there. Here
    # pip may not reach an index, so it is told not to: the script must then say what failed.
    (project_copy / ".venv").unlink()
    bin_dir = fake_cog(tmp_path / "bin", 0)
    env_path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    result = subprocess.run(
        [str(project_copy / "scripts" / "push"), "sd-turbo", "r8.im/acme/x"],
        cwd=project_copy,
        env=dict(os.environ, PATH=env_path, PIP_NO_INDEX="1", PIP_FIND_LINKS=""),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (project_copy / ".venv-publish" / "bin" / "python").exists()
    assert result.returncode == 1
    assert "could not install requirements-publish.txt into .venv-publish/" in result.stderr
    assert not (project_copy / "downloaded").exists()


def test_push_script_usage(project_copy):
    result = run_push(project_copy, "sd-turbo", path=os.environ["PATH"])
    assert result.returncode == 2 and "usage: scripts/push VARIANT DESTINATION" in result.stderr


# --- smoke_test_image.py --------------------------------------------------------------------


def data_uri(image: Image.Image, fmt: str = "WEBP") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def test_smoke_test_decodes_image_data_uris():
    smoke = import_script("smoke_test_image")
    assert smoke.decode_image(data_uri(Image.new("RGB", (64, 64), "red"))).size == (64, 64)
    for bad in ("https://example.com/x.webp", "data:image/webp;base64,bm90IGFuIGltYWdl", "data:text/plain;base64,"):
        with pytest.raises(smoke.Failed):
            smoke.decode_image(bad)
