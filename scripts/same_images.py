"""Same images: every preset and task on the tiny models, drawn by this checkout and by another
commit of the project, compared byte for byte (PNG, fixed seeds). For a change meant to change no
behaviour (a refactoring), run it against the commit before the change:

    .venv/bin/python scripts/same_images.py HEAD~3
    .venv/bin/python scripts/same_images.py 5a41854 --variants sd-turbo sdxl-lcm

Each side runs its own Cog server (the other commit from a git worktree, its fastsd first on the
path) on the same tiny random weights; the requests are text-to-image (full and tiny VAE, a batch),
image-to-image, inpainting and ControlNet (canny, depth). Prints one line per case and exits 1 if
any image differs.
"""

from __future__ import annotations

import argparse
import base64
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fastsd import variants
from fastsd_testing import random_models
from fastsd_testing.cog_server import PROJECT_ROOT, CogServer, _free_port, server_command, server_environment

SMALL = dict(width=64, height=64, seed=3, output_format="png", disable_safety_checker=True)


def png_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def cases() -> dict[str, dict]:
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    drawing = np.full((64, 64, 3), 255, dtype=np.uint8)
    drawing[10:40, 12:30] = (20, 40, 200)
    return {
        "text_to_image": {},
        "text_to_image_tiny_vae": {"vae": "tiny"},
        "batch_of_2": {"num_outputs": 2},
        "image_to_image": {"image": png_uri(photo), "strength": 0.6},
        "inpainting": {"image": png_uri(photo), "mask": png_uri(Image.fromarray(mask))},
        "controlnet_canny": {"control_image": png_uri(Image.fromarray(drawing)), "controlnet": "canny"},
        "controlnet_depth": {"control_image": png_uri(Image.fromarray(drawing)), "controlnet": "depth"},
    }


class OtherServer(CogServer):
    """The Cog server of another commit's checkout: its folder, its fastsd first on the path."""

    def __init__(self, checkout: Path, env: dict[str, str], log_path: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        environment = server_environment(self.port, log_path.parent, env)
        environment["PYTHONPATH"] = str(checkout)
        self.process = subprocess.Popen(
            server_command(), cwd=checkout, env=environment, stdout=self._log, stderr=subprocess.STDOUT
        )


def draw(server: CogServer, inputs: dict) -> list[bytes]:
    answer = server.predict(prompt="a lighthouse at dawn, (oil painting:1.2)", **SMALL, **inputs)
    if answer["status"] != "succeeded":
        return [f"failed: {answer.get('error')}".encode()]
    return [base64.b64decode(uri.split(",", 1)[1]) for uri in answer["output"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revision", help="the other commit (a hash, HEAD~3, a branch)")
    parser.add_argument("--variants", nargs="+", default=list(variants.VARIANTS), choices=list(variants.VARIANTS))
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="fastsd-same-images-"))
    root, checkout = scratch / "root", scratch / "other"
    subprocess.run(["git", "worktree", "add", "--detach", str(checkout), args.revision], cwd=PROJECT_ROOT, check=True)
    try:
        random_models.quiet()
        for variant in variants.VARIANTS.values():
            random_models.build_variant(variant, root)
        for repo in random_models.CONTROLNET_REPOS:
            random_models.build_controlnet_repo(repo, root)
        differing = 0
        for name in args.variants:
            env = {"FASTSD_VARIANT": name, "FASTSD_WEIGHTS_ROOT": str(root), "FASTSD_CONTROLNETS": "canny,depth"}
            started = time.perf_counter()
            servers = [
                CogServer(env, scratch / f"{name}-this.log"),
                OtherServer(checkout, env, scratch / f"{name}-other.log"),
            ]
            try:
                for server in servers:
                    if server.wait_for_setup()["status"] != "READY":
                        raise RuntimeError(f"{name}: setup failed\n{server.log_path.read_text()[-2000:]}")
                for case, inputs in cases().items():
                    this, other = (draw(server, inputs) for server in servers)
                    same = this == other
                    differing += not same
                    print(f"{name:16} {case:24} {'same' if same else 'DIFFERENT'}", flush=True)
            finally:
                for server in servers:
                    server.stop()
            print(f"{name:16} ({time.perf_counter() - started:.0f} s)", flush=True)
        print(f"{differing} case(s) differ" if differing else "every image is the same, byte for byte")
        return 1 if differing else 0
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(checkout)], cwd=PROJECT_ROOT, check=False)


if __name__ == "__main__":
    sys.exit(main())
