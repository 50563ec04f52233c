"""deploy/kubernetes: the DaemonSet runs one torpord per GPU node with all of its GPUs, host
paths where its config puts state, snapshots and the socket, probes over the socket, and a
grace period that covers the drain; the ConfigMap is a valid torpord config."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.deployfiles import DAEMONSET_PATH, KUBERNETES_DIR
from torpor.scheduler.daemon_config import DaemonConfig, config_keys, load_config
from torpor.units import parse_size

IMAGE = "registry.example.com/torpor/torpord"


@pytest.fixture(scope="module")
def documents() -> dict[str, dict]:
    docs = [doc for doc in yaml.safe_load_all(DAEMONSET_PATH.read_text()) if doc]
    by_kind = {doc["kind"]: doc for doc in docs}
    assert len(by_kind) == len(docs), "one document of each kind"
    return by_kind


@pytest.fixture(scope="module")
def daemonset(documents) -> dict:
    return documents["DaemonSet"]


@pytest.fixture(scope="module")
def pod(daemonset) -> dict:
    return daemonset["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod) -> dict:
    (torpord,) = [c for c in pod["containers"] if c["name"] == "torpord"]
    return torpord


@pytest.fixture(scope="module")
def toml_text(documents) -> str:
    return documents["ConfigMap"]["data"]["torpord.toml"]


@pytest.fixture(scope="module")
def config(toml_text: str, tmp_path_factory) -> DaemonConfig:
    """The ConfigMap's torpord.toml as torpord loads it (an empty environment)."""
    path = tmp_path_factory.mktemp("configmap") / "torpord.toml"
    path.write_text(toml_text)
    return load_config(path, {}, {})


def mounts(container: dict) -> dict[str, str]:
    """mountPath -> volume name."""
    return {m["mountPath"]: m["name"] for m in container["volumeMounts"]}


def test_every_object_lives_in_the_namespace(documents) -> None:
    namespace = documents["Namespace"]["metadata"]["name"]
    for kind in ("ServiceAccount", "ConfigMap", "DaemonSet"):
        assert documents[kind]["metadata"]["namespace"] == namespace, kind


def test_is_a_daemonset_whose_selector_matches_its_pods(daemonset, pod, documents) -> None:
    assert daemonset["apiVersion"] == "apps/v1"
    assert daemonset["kind"] == "DaemonSet"
    selector = daemonset["spec"]["selector"]["matchLabels"]
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    assert pod["serviceAccountName"] == documents["ServiceAccount"]["metadata"]["name"]


def test_runs_on_gpu_nodes_and_tolerates_their_taint(pod) -> None:
    assert pod["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    gpu_taints = [t for t in pod["tolerations"] if t["key"] == "nvidia.com/gpu"]
    assert gpu_taints and gpu_taints[0]["operator"] == "Exists"


def test_asks_for_every_gpu_of_the_nodes_it_selects(pod, container) -> None:
    """The GPU count a node must have and the GPUs requested are one number."""
    per_node = int(pod["nodeSelector"]["nvidia.com/gpu.count"])
    resources = container["resources"]
    assert per_node >= 1
    assert int(resources["limits"]["nvidia.com/gpu"]) == per_node
    assert int(resources["requests"]["nvidia.com/gpu"]) == per_node


def test_requests_equal_limits_for_guaranteed_qos(container) -> None:
    resources = container["resources"]
    for name in ("cpu", "memory", "nvidia.com/gpu"):
        assert str(resources["requests"][name]) == str(resources["limits"][name]), name


def test_memory_limit_leaves_room_beyond_the_pinned_host_budget(container, config) -> None:
    limit = parse_size(re.sub(r"i$", "iB", container["resources"]["limits"]["memory"]))
    budget = config.budgets.host_memory
    assert isinstance(budget, int), "budgets.host_memory must be explicit in a container"
    assert limit >= budget + 16 * 2**30, (limit, budget)


def test_configmap_holds_only_known_keys_and_is_mounted_where_torpord_reads_it(
    documents, toml_text, container, pod
) -> None:
    import tomllib

    keys = {f"{s}.{k}" for s, table in tomllib.loads(toml_text).items() for k in table}
    assert keys <= set(config_keys())
    config_volume = [v for v in pod["volumes"] if "configMap" in v]
    assert [v["configMap"]["name"] for v in config_volume] == [
        documents["ConfigMap"]["metadata"]["name"]
    ]
    assert mounts(container)["/etc/torpor"] == config_volume[0]["name"]
    assert container["command"] == ["torpord", "--config", "/etc/torpor/torpord.toml"]


def test_host_paths_back_the_state_snapshots_and_socket_directories(pod, container, config):
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    mounted = mounts(container)
    for directory in (
        config.daemon.state_dir,
        config.store.snapshot_dir,
        config.daemon.runtime_dir,
    ):
        assert mounted.get(str(directory)) in host_paths, f"{directory} is not a host path"
    # The snapshot store is a host path of its own (the node's NVMe), not the state's.
    assert mounted[str(config.store.snapshot_dir)] != mounted[str(config.daemon.state_dir)]
    # Node-local clients find the socket at the same path on the host.
    socket_dir = str(config.daemon.socket.parent)
    assert host_paths[mounted[socket_dir]] == socket_dir
    assert config.daemon.listen == ""  # no unauthenticated TCP listener on the pod network


def test_every_mount_names_a_volume(pod) -> None:
    volumes = {v["name"] for v in pod["volumes"]}
    for c in pod["containers"] + pod.get("initContainers", []):
        for m in c["volumeMounts"]:
            assert m["name"] in volumes, f"{c['name']}: {m['name']}"


def test_init_container_gives_the_host_directories_to_torpords_uid(pod, config) -> None:
    (init,) = pod["initContainers"]
    script = " ".join(init["command"])
    uid, gid = pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]
    assert f"-o {uid} -g {gid}" in script
    for directory in (
        config.daemon.state_dir,
        config.store.snapshot_dir,
        config.daemon.runtime_dir,
        *config.daemon.model_roots,
    ):
        assert str(directory) in script
    assert init["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert set(init["securityContext"]["capabilities"]["add"]) <= {
        "CHOWN",
        "FOWNER",
        "DAC_OVERRIDE",
    }


def test_the_daemon_runs_unprivileged(pod, container) -> None:
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    security = container["securityContext"]
    assert security.get("privileged", False) is False
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert "add" not in security["capabilities"]
    assert pod.get("hostNetwork", False) is False
    assert pod.get("hostPID", False) is False


def test_writable_places_exist_under_a_read_only_root(container) -> None:
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    env = {e["name"]: e["value"] for e in container["env"]}
    mounted = mounts(container)
    assert "/tmp" in mounted
    for variable in ("HOME", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH"):
        assert any(env[variable].startswith(path) for path in mounted if path != "/etc/torpor")


def test_probes_ask_torpord_over_its_socket(container, config) -> None:
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["TORPOR_SOCKET"] == str(config.daemon.socket)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == ["torpor", "status"], probe
        assert container[probe]["timeoutSeconds"] >= 5, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_grace_period_covers_the_drain(pod, config) -> None:
    drain = config.daemon.drain_timeout_s + config.worker.stop_timeout_s
    assert pod["terminationGracePeriodSeconds"] >= drain + 15


def test_the_image_is_one_parameter(pod) -> None:
    images = {c["image"].rsplit(":", 1)[0] for c in pod["containers"] + pod["initContainers"]}
    assert images == {IMAGE}
    kustomization = yaml.safe_load((KUBERNETES_DIR / "kustomization.yaml").read_text())
    assert kustomization["resources"] == [DAEMONSET_PATH.name]
    assert [i["name"] for i in kustomization["images"]] == [IMAGE]


def test_kustomize_sets_the_image_of_both_containers(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed here (its built-in kustomize builds the overlay)")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [str(Path("..") / "base")],
                "images": [{"name": IMAGE, "newName": "example.org/t/torpord", "newTag": "9"}],
            }
        )
    )
    shutil.copytree(KUBERNETES_DIR, tmp_path / "base")
    run = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    (daemonset,) = [d for d in yaml.safe_load_all(run.stdout) if d["kind"] == "DaemonSet"]
    spec = daemonset["spec"]["template"]["spec"]
    images = {c["image"] for c in spec["containers"] + spec["initContainers"]}
    assert images == {"example.org/t/torpord:9"}
