"""docker/ and docker/k8s/: parsed and cross-checked against the entry point and the README.

There is no Docker engine or Kubernetes here, so these tests check what can be checked:
valid YAML, the services/kinds the cluster needs, loopback-only published ports, no
secrets, and that every command is a mode the entry-point script implements.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import yaml

from tests.conftest import REPO

DOCKER = REPO / "docker"


def entrypoint_modes() -> set[str]:
    text = (DOCKER / "entrypoint.sh").read_text()
    case = text[text.index('case "$mode" in') :]
    return set(re.findall(r"^\s{2}([a-z]+)\)", case, flags=re.M))


def test_entrypoint_is_valid_bash_and_rejects_unknown_modes():
    assert {"head", "worker", "mlflow", "campaign", "validate", "health"} <= entrypoint_modes()
    subprocess.run(["bash", "-n", str(DOCKER / "entrypoint.sh")], check=True)
    r = subprocess.run(["bash", str(DOCKER / "entrypoint.sh"), "nonsense"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr


def test_compose_services_ports_and_gpu_profile():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "mlflow", "ray-head", "ray-worker", "ray-gpu-worker"} <= set(services)
    modes = entrypoint_modes()
    for name in ("mlflow", "ray-head", "ray-worker", "ray-gpu-worker"):
        assert services[name]["command"][0] in modes, name
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile"
    # Published ports bind loopback only; MLflow and PostgreSQL publish nothing.
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    assert "ports" not in services["mlflow"] and "ports" not in services["postgres"]
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    # ray-worker must be scalable: no fixed container name.
    assert "container_name" not in services["ray-worker"]
    gpu = services["ray-gpu-worker"]
    assert gpu["profiles"] == ["gpu"]
    dev = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert "gpu" in dev["capabilities"]
    # the GPU worker builds the CUDA image (not the CPU one under the CUDA tag)
    assert gpu["build"]["args"]["BASE_IMAGE"].startswith("nvidia/cuda:") and gpu["build"]["args"]["TORCH_INDEX_URL"] == ""
    # both secrets are required: compose refuses to start without them
    env = services["ray-worker"]["environment"]
    assert ":?" in env["XRDMATCH_STORE_URL"] and env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?")


def test_image_user_can_write_the_shared_volumes():
    """Named volumes take the owner of the image's mount point: /runs and the MLflow artifact
    folder must exist, owned by the image's non-root user, or no campaign can write."""
    text = (DOCKER / "Dockerfile").read_text()
    user_line = text.index("\nUSER xrdmatch")
    chown = re.search(r"mkdir -p (/runs /mlflow/artifacts) && chown xrdmatch:xrdmatch \1", text)
    assert chown and chown.start() < user_line
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    mounts = {v.split(":")[1] for svc in compose["services"].values() for v in svc.get("volumes", [])
              if not v.startswith(".")}
    assert {"/runs", "/mlflow/artifacts"} <= mounts


def test_no_secrets_committed():
    assert (DOCKER / ".env.example").is_file()
    example = dict(ln.split("=", 1) for ln in (DOCKER / ".env.example").read_text().splitlines()
                   if ln.strip() and not ln.startswith("#"))
    assert example == {"POSTGRES_PASSWORD": "", "RAY_AUTH_TOKEN": ""}  # no working default secret
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert "docker/.env" not in tracked
    for f in ("compose.yaml", "k8s/raycluster.yaml", "k8s/rayjob.yaml", "k8s/mlflow.yaml"):
        text = "\n".join(ln for ln in (DOCKER / f).read_text().splitlines() if not ln.lstrip().startswith("#"))
        # passwords only as ${VAR} references or secretKeyRef, never literal
        for m in re.finditer(r"postgresql://([^@\s]+)@", text):
            assert "${" in m.group(1) or ":" not in m.group(1), (f, m.group(0))


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests(name):
    doc = yaml.safe_load((DOCKER / "k8s" / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert doc["kind"] in {"RayCluster", "RayJob"}
    modes = entrypoint_modes()
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["command"][-1].endswith("entrypoint.sh") and head["args"][0] == "head"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert {"cpu", "gpu"} <= set(groups)
    for g in groups.values():
        c = g["template"]["spec"]["containers"][0]
        assert c["args"][0] in modes and c["args"][0] == "worker"
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert {"MLFLOW_TRACKING_URI", "XRDMATCH_STORE_URL"} <= set(env)
        if doc["kind"] == "RayCluster":  # its head service is <name>-head-svc
            assert env["RAY_HEAD_ADDRESS"] == f"{doc['metadata']['name']}-head-svc:6379"
        else:  # a RayJob's cluster name is generated: the entrypoint joins KubeRay's FQ_RAY_IP
            assert "RAY_HEAD_ADDRESS" not in env
    assert groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    if doc["kind"] == "RayJob":
        assert doc["spec"]["entrypoint"].split()[-1] in modes
        # KubeRay's submitter runs `ray job submit` only when the pod names no command: the
        # driver then runs on the head, which mounts /runs and says where the run directory is
        assert "command" not in doc["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
        head_env = {e["name"]: e.get("value") for e in head["env"]}
        assert head_env["XRDMATCH_RUN_DIR"].startswith("/runs/")
        assert any(m["mountPath"] == "/runs" for m in head["volumeMounts"])
    # every Ray node and the driver carry the cluster's token, from the secret (the head's
    # dashboard listens on the pod network and takes jobs)
    pods = [spec["headGroupSpec"]["template"], *(g["template"] for g in groups.values())]
    if doc["kind"] == "RayJob":
        pods.append(doc["spec"]["submitterPodTemplate"])
    for pod in pods:
        for c in pod["spec"]["containers"]:
            tok = {e["name"]: e for e in c["env"]}.get("RAY_AUTH_TOKEN")
            assert tok and tok["valueFrom"]["secretKeyRef"] == {"name": "xrdmatch-secrets", "key": "ray-auth-token"}, c["name"]


def test_the_mlflow_service_the_ray_pods_log_to_is_defined():
    """Every Ray pod logs to MLFLOW_TRACKING_URI; mlflow.yaml must define that Service (name,
    namespace, port) in front of a server started by the entry point's mlflow mode, its backend
    URL from the secret, and the host name the pods use allowed by the server."""
    from urllib.parse import urlsplit

    uris = set()
    for name in ("raycluster.yaml", "rayjob.yaml"):
        text = (DOCKER / "k8s" / name).read_text()
        uris |= set(re.findall(r"MLFLOW_TRACKING_URI, value: \"([^\"]+)\"", text))
    (uri,) = uris
    host, port = urlsplit(uri).hostname, urlsplit(uri).port
    svc_name, namespace = host.split(".")[:2]
    docs = {d["kind"]: d for d in yaml.safe_load_all((DOCKER / "k8s" / "mlflow.yaml").read_text())}
    svc, dep = docs["Service"], docs["Deployment"]
    assert (svc["metadata"]["name"], svc["metadata"]["namespace"]) == (svc_name, namespace)
    assert svc["spec"]["type"] == "ClusterIP" and [p["port"] for p in svc["spec"]["ports"]] == [port]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["command"][-1].endswith("entrypoint.sh") and c["args"][0] == "mlflow" and "mlflow" in entrypoint_modes()
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "xrdmatch-secrets"
    assert env["MLFLOW_PORT"]["value"] == str(port) and f"{host}:{port}" in env["MLFLOW_ALLOWED_HOSTS"]["value"].split(",")
    claim = dep["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert docs["PersistentVolumeClaim"]["metadata"]["name"] == claim
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_entrypoint_worker_needs_a_head_and_takes_kuberays_when_none_is_named(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "FQ_RAY"))}
    env["RAY_BLOCK"] = "0"
    r = subprocess.run(["bash", str(DOCKER / "entrypoint.sh"), "worker"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode != 0 and "set RAY_HEAD_ADDRESS" in r.stderr, r.stderr
    ray = tmp_path / "ray"  # a stand-in `ray` first on PATH: it prints what it was asked to join
    ray.write_text('#!/bin/bash\necho "ray $*"\n')
    ray.chmod(0o755)
    env.update(PATH=f"{tmp_path}:{env['PATH']}", FQ_RAY_IP="job-raycluster-abcde-head-svc.ns.svc.cluster.local")
    r = subprocess.run(["bash", str(DOCKER / "entrypoint.sh"), "worker"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0 and "--address=job-raycluster-abcde-head-svc.ns.svc.cluster.local:6379" in r.stdout


def test_entrypoint_refuses_an_open_head_off_loopback():
    """A head whose dashboard binds the pod network must have a token (or be opened on purpose);
    refused before Ray starts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_BLOCK="0", RAY_DASHBOARD_HOST="0.0.0.0", RAY_AUTH_TOKEN_PATH="/nonexistent")
    r = subprocess.run(["bash", str(DOCKER / "entrypoint.sh"), "head"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "RAY_AUTH_TOKEN" in r.stderr, r.stderr


def test_dockerfile_installs_with_the_readme_command():
    docker = (DOCKER / "Dockerfile").read_text()
    readme = (REPO / "README.md").read_text()
    install = "bash scripts/bootstrap.sh"
    assert re.search(r"^RUN " + re.escape(install), docker, flags=re.M)
    code = "\n".join(re.findall(r"```bash\n(.*?)```", readme, flags=re.S))
    assert install in code
    assert re.search(r"^USER (?!root)\w+", docker, flags=re.M), "image must run as a non-root user"
    assert "HEALTHCHECK" in docker and "ARG BASE_IMAGE" in docker


def test_main_sh_reads_relative_paths_from_where_it_was_typed(tmp_path):
    """scripts/main.sh runs from the repository, but a relative --dir (and a --config that exists
    there) names a path from the caller's directory; the report reads the same ones. The heavy
    parts (bootstrap, xrdmatch) are stand-ins that print what they were given."""
    import shutil

    repo = tmp_path / "my repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "main.sh", repo / "scripts")
    (repo / "scripts" / "bootstrap.sh").write_text("true\n")
    fake = repo / ".venv" / "bin" / "xrdmatch"
    fake.write_text('#!/bin/bash\necho "$PWD|$*"\n')
    fake.chmod(0o755)
    here = tmp_path / "elsewhere"
    here.mkdir()
    (here / "my.yaml").write_text("{}\n")
    out = subprocess.run(["bash", str(repo / "scripts" / "main.sh"), "--config", "my.yaml", "-dout", "--rounds", "3"],
                         cwd=here, capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == [f"{repo}|campaign run --config {here}/my.yaml --config {here}/my.yaml --dir {here}/out --rounds 3",
                   f"{repo}|campaign report --config {here}/my.yaml --dir {here}/out"]
    out = subprocess.run(["bash", str(repo / "scripts" / "main.sh"), "-c", "configs/cluster.yaml"], cwd=here,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == f"{repo}|campaign run --config configs/cluster.yaml --config configs/cluster.yaml"  # the repo's
    out = subprocess.run(["bash", str(repo / "scripts" / "main.sh"), "--help"], cwd=here,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == [f"{repo}|campaign run --config configs/default.yaml --help"]  # no report after --help


def test_entrypoint_mlflow_passes_the_store_url_in_the_environment_not_argv(tmp_path):
    """argv is readable by every local user (ps): the PostgreSQL password must not be in it; a
    stand-in `mlflow` prints its argv and the MLFLOW_BACKEND_STORE_URI it was given."""
    mlflow = tmp_path / "mlflow"
    mlflow.write_text('#!/bin/bash\necho "argv: $*"\necho "env: $MLFLOW_BACKEND_STORE_URI"\n')
    mlflow.chmod(0o755)
    url = "postgresql://xrdmatch:s3cret@postgres:5432/mlflow"
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "MLFLOW_BACKEND_STORE_URI": url}
    r = subprocess.run(["bash", str(DOCKER / "entrypoint.sh"), "mlflow"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    argv, given = r.stdout.splitlines()
    assert argv.startswith("argv: server ") and "s3cret" not in argv and "--backend-store-uri" not in argv, argv
    assert given == f"env: {url}"
