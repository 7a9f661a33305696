"""deploy/kubernetes/ against the real Cog server: the probes' scripts tell READY from the rest, and
the queue metrics the autoscaler reads (fastsd.metrics) are served and count what happened."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from fastsd_testing.cog_server import PROJECT_ROOT, CogServer, _free_port

MANIFEST = PROJECT_ROOT / "deploy" / "kubernetes" / "fastsd.yaml"


def container() -> dict:
    (deployment,) = [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc["kind"] == "Deployment"]
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def probe(kind: str, server: CogServer) -> int:
    """The manifest's probe script, run against the test server (its port for the pod's 5000)."""
    command = container()[kind]["exec"]["command"]
    assert command[:2] == ["python", "-c"]
    script = command[2].replace("127.0.0.1:5000", f"127.0.0.1:{server.port}")
    return subprocess.run([sys.executable, "-c", script], timeout=60).returncode


@pytest.fixture(scope="module")
def served(weights_root, tmp_path_factory):
    metrics_port = _free_port()
    folder = tmp_path_factory.mktemp("deploy")
    environment = {"FASTSD_VARIANT": "sd-turbo", "FASTSD_WEIGHTS_ROOT": str(weights_root),
                   "FASTSD_METRICS_PORT": str(metrics_port)}  # fmt: skip
    server = CogServer(environment, folder / "server.log")
    try:
        assert server.wait_for_setup()["status"] == "READY", (folder / "server.log").read_text()[-3000:]
        yield server, metrics_port
    finally:
        server.stop()


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{key}={value}" for key, value in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def test_the_queue_metrics_count_the_requests_served(served):
    server, port = served
    before = scrape(port)
    assert before["fastsd_queued_requests"] == 0 and before["fastsd_running_requests"] == 0
    for seed in (1, 2):
        answer = server.predict(prompt="a kite", width=64, height=64, num_outputs=2, seed=seed)
        assert answer["status"] == "succeeded"
    after = scrape(port)
    assert after["fastsd_queue_time_seconds_count"] - before.get("fastsd_queue_time_seconds_count", 0) == 2
    assert after["fastsd_images_total"] - before.get("fastsd_images_total", 0) == 4
    assert after["fastsd_calls_total{outcome=succeeded}"] >= 2
    assert after["fastsd_queue_time_seconds_sum"] >= 0


def test_the_readiness_probe_passes_only_when_ready(served, tmp_path):
    server, _ = served
    assert probe("readinessProbe", server) == 0 and probe("livenessProbe", server) == 0
    failed = CogServer({"FASTSD_VARIANT": "sd-turbo", "FASTSD_WEIGHTS_ROOT": str(tmp_path)}, tmp_path / "failed.log")
    try:
        assert failed.wait_for_setup()["status"] == "SETUP_FAILED"
        assert probe("readinessProbe", failed) != 0 and probe("livenessProbe", failed) != 0
    finally:
        failed.stop()


def test_the_manifest_serves_the_metrics_port_it_scrapes():
    ports = {port["name"]: port["containerPort"] for port in container()["ports"]}
    environment = {item["name"]: item["value"] for item in container()["env"]}
    assert environment["FASTSD_METRICS_PORT"] == str(ports["metrics"])
    (deployment,) = [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc["kind"] == "Deployment"]
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])
    assert Path(PROJECT_ROOT / "deploy" / "kubernetes" / "prometheus-adapter-values.yaml").is_file()
