"""deploy/ checked offline: every Kubernetes manifest against the newest schema kubernetes-validate ships, the
flags of every container (and of the Dockerfile's command) against the CLI, ports against the CLI's defaults
and against each other, probes against the real health services, and no key material anywhere."""

from __future__ import annotations

import copy
import ipaddress
import json
import re
import shlex
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import typer.main
import yaml
from kubernetes_validate.utils import latest_version

from coordinator.config import CoordinatorConfig
from shardline.v1 import coordinator_pb2, parameters_pb2, worker_pb2

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
KUBERNETES_HA = DEPLOY / "kubernetes-ha"  # standby coordinators on etcd, jobs on PostgreSQL
VARIANTS = (KUBERNETES, KUBERNETES_HA)
CERTS_SECRET = "shardline-certs"
NODE_FILES = {"ca.crt", "node.crt", "node.key"}
PROBES = ("startupProbe", "livenessProbe", "readinessProbe")
METRICS_PORT = 9400  # every pod's /metrics (prometheus.yml's pod discovery scrapes this port)
NAMESPACE, HOME = "(namespace)", "shardline"  # a source pod's namespace in the policy model below

Doc = dict[str, Any]


# ---------------------------------------------------------------------------------------------- loading


def _manifest_files(root: Path = KUBERNETES) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml"))


@cache
def _documents(root: Path = KUBERNETES) -> tuple[tuple[str, Doc], ...]:
    """(file:index, document) for every non-empty YAML document of one variant (deploy/kubernetes/ or
    deploy/kubernetes-ha/)."""
    found = []
    for path in _manifest_files(root):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                found.append((f"{path.relative_to(ROOT)}:{i}", doc))
    return tuple(found)


def _docs(kind: str, root: Path = KUBERNETES) -> list[Doc]:
    return [d for _, d in _documents(root) if d.get("kind") == kind]


def _one(kind: str, name: str, root: Path = KUBERNETES) -> Doc:
    matches = [d for d in _docs(kind, root) if d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def _pod_templates(root: Path = KUBERNETES) -> Iterator[tuple[Doc, Doc]]:
    """(workload, pod template) of every Deployment, StatefulSet, DaemonSet, Job."""
    for _, doc in _documents(root):
        if doc.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            yield doc, doc["spec"]["template"]
        elif doc.get("kind") == "Pod":
            yield doc, doc


def _containers(root: Path = KUBERNETES) -> Iterator[tuple[Doc, Doc]]:
    for _, template in _pod_templates(root):
        spec = template["spec"]
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            yield template, container


def _container(workload: str, root: Path = KUBERNETES) -> tuple[Doc, Doc]:
    for doc, template in _pod_templates(root):
        if doc["metadata"]["name"] == workload:
            (container,) = template["spec"]["containers"]
            return template, container
    raise AssertionError(f"no workload {workload}")


# ------------------------------------------------------------------------------------------ the CLI side


@cache
def _commands() -> dict[tuple[str, str], Any]:
    """(program, subcommand) -> the click command the console script runs (typer's own click: duck-typed)."""
    from coordinator.cli.main import app as coordinator_app
    from shard_worker.cli import app as worker_app

    found: dict[tuple[str, str], Any] = {}
    for program, app in (("coordinator", coordinator_app), ("shard-worker", worker_app)):
        group = typer.main.get_command(app)
        for name, command in group.commands.items():  # type: ignore[attr-defined]
            found[(program, name)] = command
    return found


def _command(program: str, sub: str) -> Any:
    commands = _commands()
    assert (program, sub) in commands, f"`{program} {sub}` is not a command of the CLI"
    return commands[(program, sub)]


def _options(command: Any) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for param in command.params:
        if param.param_type_name == "option":
            for opt in [*param.opts, *param.secondary_opts]:
                opts[opt] = param
    return opts


def _argv(container: Doc) -> list[str]:
    """The command line a container runs (image CMD replaced by args), `sh -c SCRIPT` unwrapped."""
    argv = [*container.get("command", []), *container.get("args", [])]
    return _unwrap(argv)


def _unwrap(argv: list[str]) -> list[str]:
    if len(argv) >= 3 and argv[0] in ("sh", "/bin/sh", "bash", "/bin/bash") and argv[1] == "-c":
        argv = shlex.split(argv[2])
    if argv and argv[0] == "exec":
        argv = argv[1:]
    return argv


def _program(argv: list[str]) -> tuple[str, str]:
    assert len(argv) >= 2, f"not a shardline command line: {argv}"
    return Path(argv[0]).name, argv[1]


def _flags(argv: list[str]) -> dict[str, str | None]:
    """--flag -> value (None for a boolean flag), as the CLI parses the command line."""
    program, sub = _program(argv)
    options = _options(_command(program, sub))
    parsed: dict[str, str | None] = {}
    rest = argv[2:]
    i = 0
    while i < len(rest):
        token = rest[i]
        i += 1
        if not token.startswith("--"):
            continue
        name, eq, value = token.partition("=")
        option = options.get(name)
        if eq:
            parsed[name] = value
        elif option is not None and (option.is_flag or option.count):
            parsed[name] = None
        elif i < len(rest) and not rest[i].startswith("--"):
            parsed[name] = rest[i]
            i += 1
        else:
            parsed[name] = None
    return parsed


def _flag_names(argv: list[str]) -> list[str]:
    return [t.partition("=")[0] for t in argv[2:] if t.startswith("--")]


def _port(value: str | None, default: int) -> int:
    return default if value is None else int(value)


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


@cache
def _health_services() -> dict[str, frozenset[str]]:
    """The proto file of each server -> the health service names it answers for ("" = the whole server)."""

    def names(module: Any) -> frozenset[str]:
        return frozenset({"", *(s.full_name for s in module.DESCRIPTOR.services_by_name.values())})

    return {"coordinator": names(coordinator_pb2), "parameters": names(parameters_pb2), "worker": names(worker_pb2)}


def _all_health_services() -> frozenset[str]:
    return frozenset().union(*_health_services().values())


def _server_ports(argv: list[str]) -> dict[int, str]:
    """The ports a container's shardline server listens on -> which server (its health services)."""
    program, sub = _program(argv)
    flags = _flags(argv)
    config = CoordinatorConfig()
    if (program, sub) == ("coordinator", "serve"):
        ports = {_port(flags.get("--port"), config.port): "coordinator"}
        if "--certs-dir" in flags:  # with TLS, the registry has a port of its own on the same server
            ports[_port(flags.get("--cluster-port"), config.cluster_port)] = "coordinator"
        if "--parameters" not in flags:
            ports[_port(flags.get("--parameters-port"), config.parameters_port)] = "parameters"
        return ports
    if (program, sub) == ("shard-worker", "serve"):
        assert "--port" in flags, "a worker in a manifest needs a fixed --port (the default is a free one)"
        return {_port(flags["--port"], 0): "worker"}
    return {}


def _container_ports(container: Doc) -> dict[int, str]:
    return {p["containerPort"]: p.get("name", "") for p in container.get("ports", [])}


def _resolve(container: Doc, port: int | str) -> int:
    """A probe's or Service's port (a number or a containerPort's name) as a number of the container."""
    ports = _container_ports(container)
    if isinstance(port, str):
        named = [n for n, name in ports.items() if name == port]
        assert named, f"container {container['name']} has no port named {port!r}"
        return named[0]
    assert port in ports, f"container {container['name']} does not declare containerPort {port}"
    return port


def _probes(container: Doc) -> Iterator[tuple[str, Doc]]:
    for kind in PROBES:
        if kind in container:
            yield kind, container[kind]


def _health_probe(probe: Doc) -> tuple[str, str, list[str]] | None:
    """(endpoint, service, argv) of an exec probe that runs `coordinator health`."""
    if "exec" not in probe:
        return None
    argv = _unwrap(list(probe["exec"]["command"]))
    if _program(argv) != ("coordinator", "health"):
        return None
    flags = _flags(argv)
    return flags.get("--endpoint") or "127.0.0.1:50051", flags.get("--service") or "", argv


# ------------------------------------------------------------------------------------------------ schema


def test_manifests_are_there() -> None:
    kinds = {d.get("kind") for _, d in _documents()}
    assert {"Service", "Deployment", "StatefulSet", "NetworkPolicy"} <= kinds
    _one("Deployment", "shardline-coordinator")
    _one("StatefulSet", "shardline-worker")
    _one("Service", "shardline-coordinator")
    _one("Service", "shardline-worker")


@pytest.mark.parametrize("where", [w for root in VARIANTS for w, _ in _documents(root)])
def test_every_document_validates_against_the_newest_kubernetes_schema(where: str) -> None:
    doc = {w: d for root in VARIANTS for w, d in _documents(root)}[where]
    version = kubernetes_validate.validate(doc, latest_version(), strict=True)
    assert version == ".".join(latest_version().split(".")[:2])


def test_the_schema_check_catches_broken_documents() -> None:
    deployment = _one("Deployment", "shardline-coordinator")
    kubernetes_validate.validate(deployment, latest_version(), strict=True)

    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["replica"] = misspelt["spec"].pop("replicas")
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "fifty"
    no_selector = copy.deepcopy(deployment)
    del no_selector["spec"]["selector"]
    for broken in (misspelt, wrong_type, no_selector):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, latest_version(), strict=True)

    policy = copy.deepcopy(_one("NetworkPolicy", "shardline-worker"))
    policy["spec"]["ingress"][0]["ports"][0]["port"] = {"number": 50061}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(policy, latest_version(), strict=True)


# ------------------------------------------------------------------------------------------------- flags


def _command_lines(root: Path = KUBERNETES) -> Iterator[tuple[str, list[str]]]:
    """Every shardline command line of a variant: containers, exec probes, the Dockerfile's CMD."""
    for template, container in _containers(root):
        where = f"{template['metadata']['labels']}/{container['name']}"
        yield where, _argv(container)
        for kind, probe in _probes(container):
            if "exec" in probe:
                yield f"{where} {kind}", _unwrap(list(probe["exec"]["command"]))
    yield "deploy/Dockerfile CMD", _dockerfile_cmd()


@pytest.mark.parametrize("root", VARIANTS, ids=lambda r: r.name)
def test_every_flag_in_deploy_exists_on_the_cli(root: Path) -> None:
    missing = []
    for where, argv in _command_lines(root):
        program, sub = _program(argv)
        options = _options(_command(program, sub))
        missing += [f"{where}: `{program} {sub} {flag}`" for flag in _flag_names(argv) if flag not in options]
    assert not missing, "flags the CLI does not have:\n" + "\n".join(missing)


@pytest.mark.parametrize("root", VARIANTS, ids=lambda r: r.name)
def test_variables_in_args_are_defined(root: Path) -> None:
    for _, container in _containers(root):
        defined = {e["name"] for e in container.get("env", [])}
        used = set(re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", " ".join(_argv(container))))
        assert used <= defined, f"{container['name']} uses $({used - defined}) without defining it"


@pytest.mark.parametrize("root", VARIANTS, ids=lambda r: r.name)
def test_every_server_listens_securely(root: Path) -> None:
    """A bind other machines can reach needs TLS (and, for the public API, API keys); --insecure never."""
    for where, argv in _command_lines(root):
        flags = _flags(argv)
        if _program(argv) == ("coordinator", "http"):  # the HTTP gateway alone: HTTPS, keys judged from the file
            assert "--insecure" not in flags and flags.get("--tls-cert") and flags.get("--tls-key"), where
            assert flags.get("--api-keys") == "/etc/shardline/keys/api-keys.json", where
            continue
        if _program(argv)[1] != "serve":
            continue
        assert "--insecure" not in flags, where
        assert flags.get("--certs-dir") == "/etc/shardline/certs", f"{where}: TLS from the mounted certificates"
        if _program(argv)[0] == "coordinator":
            assert flags.get("--api-keys") == "/etc/shardline/keys/api-keys.json", where


# ------------------------------------------------------------------------------------------------- ports


def test_coordinator_ports_are_the_cli_defaults_and_match_the_service() -> None:
    config = CoordinatorConfig()
    _, container = _container("shardline-coordinator")
    flags = _flags(_argv(container))
    api = _port(flags.get("--port"), config.port)
    cluster = _port(flags.get("--cluster-port"), config.cluster_port)
    parameters = _port(flags.get("--parameters-port"), config.parameters_port)
    assert api == config.port == 50051
    assert cluster == config.cluster_port == 50053
    assert parameters == 50052, "the parameters port must be fixed (the default 0 is a free one)"

    http = _port(flags.get("--http-port"), config.http_port)
    assert "--no-http" not in flags and http == config.http_port == 8000
    assert _port(flags.get("--metrics-port"), -1) == METRICS_PORT

    ports = {name: number for number, name in _container_ports(container).items()}
    assert ports == {"api": api, "parameters": parameters, "cluster": cluster, "http": http,
                     "metrics": METRICS_PORT}
    service = _one("Service", "shardline-coordinator")
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(by_name) == {"api", "parameters", "cluster", "http"}, "metrics are scraped per pod, not served"
    for name, number in ports.items():
        if name == "metrics":
            continue
        assert by_name[name]["port"] == number, f"Service port {name} is not the coordinator's"
        assert _resolve(container, by_name[name].get("targetPort", by_name[name]["port"])) == number


def test_worker_port_matches_its_container_probes_service_and_policy() -> None:
    _, container = _container("shardline-worker")
    argv = _argv(container)
    flags = _flags(argv)
    port = int(flags["--port"] or 0)
    assert _port(flags.get("--metrics-port"), -1) == METRICS_PORT
    assert _container_ports(container) == {port: "worker", METRICS_PORT: "metrics"}
    for kind, probe in _probes(container):
        for handler in ("tcpSocket", "grpc", "httpGet"):
            if handler in probe:
                assert _resolve(container, probe[handler]["port"]) == port, kind
    service = _one("Service", "shardline-worker")
    assert service["spec"].get("clusterIP") == "None", "workers need a headless Service for their DNS names"
    assert [_resolve(container, p.get("targetPort", p["port"])) for p in service["spec"]["ports"]] == [port]
    policy_ports = {p["port"] for rule in _one("NetworkPolicy", "shardline-worker")["spec"]["ingress"]
                    for p in rule["ports"]}
    assert policy_ports == {port}


def test_workers_register_at_the_cluster_port_and_advertise_a_name_of_their_certificate() -> None:
    workers = _one("StatefulSet", "shardline-worker")
    _, worker = _container("shardline-worker")
    _, coordinator = _container("shardline-coordinator")
    flags = _flags(_argv(worker))
    coordinator_flags = _flags(_argv(coordinator))
    host, port = _host_port(flags["--coordinator"] or "")
    assert host == "shardline-coordinator"
    assert port == _port(coordinator_flags.get("--cluster-port"), CoordinatorConfig().cluster_port)
    assert coordinator_flags.get("--advertise") == "shardline-coordinator"  # workers fetch weights there
    service = workers["spec"]["serviceName"]
    assert flags["--advertise"] == f"$(POD_NAME).{service}.$(POD_NAMESPACE).svc.cluster.local"
    assert _one("Service", service)["spec"].get("publishNotReadyAddresses") is True, \
        "a worker must be reachable by name before it is Ready (a spare never is)"
    assert workers["spec"].get("podManagementPolicy") == "Parallel", \
        "OrderedReady would wait for worker 0 to be Ready, which needs the other workers"


def test_the_create_node_command_names_every_host_the_pods_are_reached_on() -> None:
    """The documented `coordinator certs create-node` covers what the workers advertise, the coordinator's
    Service, and 127.0.0.1 (the probes)."""
    certs = _command("coordinator", "certs")
    assert "create-node" in getattr(certs, "commands", {}), "`coordinator certs create-node` is missing"
    options = _options(certs.commands["create-node"])
    for path in (KUBERNETES / "shardline.yaml", DEPLOY / "README.md"):
        text = path.read_text().replace("\\\n#", " ").replace("\\\n", " ")
        match = re.search(r"coordinator certs create-node ([^\n`]*)", text)
        assert match, f"{path.name} does not show the `coordinator certs create-node` command"
        tokens = shlex.split(match.group(1))
        hosts = []
        while tokens:
            token = tokens.pop(0)
            if token.startswith("--"):
                assert token in options, f"{path.name}: create-node has no {token}"
                tokens.pop(0)
            else:
                hosts.append(token)
        assert set(hosts) >= {"*.shardline-worker.default.svc.cluster.local", "shardline-coordinator",
                              "shardline-coordinator.default.svc.cluster.local", "localhost", "127.0.0.1"}, path.name


@pytest.mark.parametrize("root", VARIANTS, ids=lambda r: r.name)
def test_every_service_targets_a_declared_container_port(root: Path) -> None:
    for service in _docs("Service", root):
        if service["spec"].get("type") == "ExternalName":  # etcd, PostgreSQL: the user's own
            continue
        selector = service["spec"]["selector"]
        containers = [c for template, c in _containers(root)
                      if selector.items() <= template["metadata"]["labels"].items()]
        assert containers, f"Service {service['metadata']['name']} selects no pod"
        for p in service["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            assert any(_resolve_or_none(c, target) for c in containers), \
                f"Service {service['metadata']['name']} targets {target}, which no container declares"


def _resolve_or_none(container: Doc, port: int | str) -> int | None:
    try:
        return _resolve(container, port)
    except AssertionError:
        return None


# ------------------------------------------------------------------------------------------------ probes


@pytest.mark.parametrize("root", VARIANTS, ids=lambda r: r.name)
def test_probes_ask_real_health_services_on_the_right_ports(root: Path) -> None:
    seen = 0
    for _, container in _containers(root):
        argv = _argv(container)
        servers = _server_ports(argv)
        for kind, probe in _probes(container):
            health = _health_probe(probe)
            if health is not None:
                endpoint, service, probe_argv = health
                host, port = _host_port(endpoint)
                assert ipaddress.ip_address(host).is_loopback, f"{kind} must ask the pod itself, not {host}"
                assert "--certs-dir" in _flags(probe_argv) if "--certs-dir" in _flags(argv) else True, \
                    f"{container['name']} {kind}: the server speaks TLS, so must the probe"
            elif "grpc" in probe:
                port = _resolve(container, probe["grpc"]["port"])
                service = probe["grpc"].get("service", "")
                assert "--certs-dir" not in _flags(argv), \
                    f"{container['name']} {kind}: kubelet's gRPC probe cannot speak TLS; use `coordinator health`"
            else:
                continue
            seen += 1
            assert service in _all_health_services(), f"{container['name']} {kind}: no health service {service!r}"
            assert port in servers, f"{container['name']} {kind}: no shardline server on port {port}"
            assert service in _health_services()[servers[port]], \
                f"{container['name']} {kind}: port {port} serves {servers[port]}, which has no {service!r}"
            if health is not None:
                assert probe.get("timeoutSeconds", 1) >= 5, f"{kind}: `coordinator health` needs time to start"
    # (the HA variant's coordinators are probed by TCP: a standby's health services say NOT_SERVING)
    assert seen or root == KUBERNETES_HA, "no probe asks a health service"


def test_a_spare_worker_is_neither_restarted_nor_held_back() -> None:
    """A worker with no shard (a spare) is NOT_SERVING, for its ShardWorker service and as a server: its
    probes must not ask either."""
    _, container = _container("shardline-worker")
    assert "livenessProbe" in container
    for kind, probe in _probes(container):
        health = _health_probe(probe)
        asked = health[1] if health is not None else probe["grpc"].get("service", "") if "grpc" in probe else None
        assert asked is None, f"the worker's {kind} asks for health {asked!r}, which a spare never reports"


def test_the_coordinator_is_ready_once_the_model_is_deployed() -> None:
    _, container = _container("shardline-coordinator")
    health = _health_probe(container["readinessProbe"])
    assert health is not None and health[1] == coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name
    for kind in ("startupProbe", "livenessProbe"):  # not the model: a coordinator waiting for workers is alive
        health = _health_probe(container[kind])
        assert health is not None and health[1] == "shardline.v1.WorkerRegistry", kind
    assert _one("Service", "shardline-coordinator")["spec"].get("publishNotReadyAddresses") is True, \
        "workers register with the coordinator before it is Ready"


# ------------------------------------------------------------------------------------------ network policy


def _selects(policy: Doc, labels: dict[str, str]) -> bool:
    selector = policy["spec"]["podSelector"]
    return bool(selector.get("matchLabels", {}).items() <= labels.items()) and not selector.get("matchExpressions")


def _allowed(port: int, labels: dict[str, str], source: dict[str, str] | None, root: Path = KUBERNETES) -> bool:
    """Whether the policies let a pod labelled `source` (None: anything that is not a pod of the cluster) reach
    `port` of a pod labelled `labels`. A pod no policy selects is open. A source's namespace is its NAMESPACE
    entry (HOME, shardline's own, when absent)."""
    policies = [p for p in _docs("NetworkPolicy", root)
                if _selects(p, labels) and "Ingress" in p["spec"]["policyTypes"]]
    if not policies:
        return True
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is not None and port not in {p["port"] for p in ports}:
                continue
            peers = rule.get("from")
            if peers is None:
                return True
            for peer in peers:
                assert set(peer) in ({"podSelector"}, {"podSelector", "namespaceSelector"}), f"unexpected peer {peer}"
                if source is None:
                    continue
                namespace = source.get(NAMESPACE, HOME)
                if "namespaceSelector" in peer:  # any namespace ({}), or the one its name label names
                    selector = peer["namespaceSelector"]
                    assert set(selector) <= {"matchLabels"}, f"unexpected peer {peer}"
                    wanted = selector.get("matchLabels", {}).get("kubernetes.io/metadata.name")
                    if wanted is not None and namespace != wanted:
                        continue
                elif namespace != HOME:  # a pod selector alone: pods of the policy's own namespace
                    continue
                labels_only = {k: v for k, v in source.items() if k != NAMESPACE}
                if peer["podSelector"].get("matchLabels", {}).items() <= labels_only.items():
                    return True
    return False


def test_network_policies_allow_exactly_the_links_shardline_needs() -> None:
    coordinator = _container("shardline-coordinator")[0]["metadata"]["labels"]
    worker = _container("shardline-worker")[0]["metadata"]["labels"]
    other = {"app": "something-else"}
    config = CoordinatorConfig()
    worker_port = int(_flags(_argv(_container("shardline-worker")[1]))["--port"] or 0)

    prometheus = {"app.kubernetes.io/name": "prometheus", NAMESPACE: "monitoring"}
    impostor = {"app.kubernetes.io/name": "prometheus", NAMESPACE: "someone-elses"}
    for source in (coordinator, worker, other, prometheus, None):
        assert _allowed(config.port, coordinator, source), "the public API is open to every client"
        assert _allowed(config.http_port, coordinator, source), "so is the HTTP API"
    for labels in (coordinator, worker):  # /metrics: Prometheus of the monitoring namespace only
        assert _allowed(METRICS_PORT, labels, prometheus)
        for source in (coordinator, worker, other, impostor, None):
            assert not _allowed(METRICS_PORT, labels, source)
    for port in (50052, config.cluster_port):
        assert _allowed(port, coordinator, worker)
        assert not _allowed(port, coordinator, other) and not _allowed(port, coordinator, None)
    assert _allowed(worker_port, worker, coordinator) and _allowed(worker_port, worker, worker)
    assert not _allowed(worker_port, worker, other) and not _allowed(worker_port, worker, None)
    for port in (22, 8080, 50054):  # default deny: nothing else
        for labels in (coordinator, worker):
            assert not _allowed(port, labels, coordinator) and not _allowed(port, labels, other)


# ----------------------------------------------------------------------------------------------- secrets

PEM = re.compile(r"-----BEGIN [A-Z ]*(PRIVATE KEY|CERTIFICATE)-----")


def test_no_secret_in_deploy_carries_data() -> None:
    for secret in _docs("Secret"):
        assert not secret.get("data") and not secret.get("stringData"), \
            f"Secret {secret['metadata']['name']} carries data: create it with kubectl, not in a manifest"
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert not PEM.search(text), f"{path.relative_to(ROOT)} holds a PEM certificate or key"
            assert not re.search(r"\bsl_[A-Za-z0-9_-]{20,}", text), f"{path.relative_to(ROOT)} holds an API key"
            for source in re.findall(r"--from-file=(\S+)", text):
                file = source.rpartition("=")[2]
                assert not file.endswith("ca.key"), f"{path.relative_to(ROOT)}: ca.key must not go into a Secret"
                assert not file.endswith("/") and "." in Path(file).name, \
                    f"{path.relative_to(ROOT)}: --from-file={source} would put a whole directory (ca.key too)"


@pytest.mark.parametrize("root", VARIANTS, ids=lambda r: r.name)
def test_no_manifest_mounts_ca_key(root: Path) -> None:
    mounted = 0
    for _, doc in _documents(root):
        assert "ca.key" not in json.dumps(doc), "ca.key belongs on the machine that creates certificates only"
    for template, container in _containers(root):
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            # a Secret mounted alone, or several projected into one directory (the coordinator's certificates)
            projected = volume.get("projected")
            secrets = [volume["secret"]] if "secret" in volume else \
                [{**src["secret"], "secretName": src["secret"]["name"], "defaultMode": projected.get("defaultMode")}
                 for src in projected["sources"] if "secret" in src] if projected else []
            if not secrets:
                continue
            assert mount.get("readOnly") is True, f"{container['name']}: mount {mount['name']} read-only"
            files: set[str] = set()
            for secret in secrets:
                assert secret.get("defaultMode") in (0o400, 0o440), f"{mount['name']}: key files 0400 or 0440"
                items = secret.get("items")
                assert items, f"{mount['name']}: list the Secret's files, so that nothing else is ever mounted"
                assert {i["key"] for i in items} == {i["path"] for i in items}
                if secret["secretName"] == CERTS_SECRET:
                    keys = {i["key"] for i in items}
                    assert mount["mountPath"] == "/etc/shardline/certs"
                    # the node's three files, or the CA alone (the HTTP gateway: it trusts, and holds no node key)
                    assert keys == NODE_FILES or (keys == {"ca.crt"} and container["name"] == "http"), keys
                    mounted += keys == NODE_FILES
                files |= {i["key"] for i in items}
            if mount["mountPath"] == "/etc/shardline/certs" and files - {"ca.crt"} and files != NODE_FILES:
                assert files == NODE_FILES | {"server.crt", "server.key"}, files  # the coordinator's HTTPS key
                assert container["name"] == "coordinator", "only the coordinator holds the HTTPS key"
    assert mounted == 2, "the coordinators and the workers mount the node certificates"


# ---------------------------------------------------------------------------------------------- Dockerfile


def _dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")


def _dockerfile_cmd() -> list[str]:
    cmds = [line for line in _dockerfile().splitlines() if line.startswith("CMD ")]
    assert len(cmds) == 1
    argv = json.loads(cmds[0].removeprefix("CMD "))
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), "CMD in exec form"
    return argv


def test_the_image_installs_the_extras_the_manifests_use() -> None:
    """The HA variant's `serve --etcd --jobs-db` imports aetcd and psycopg: the `ha` extra, in the image."""
    installs = re.findall(r'pip install [^&]*"\.\[([a-z,]+)\]"', _dockerfile())
    assert len(installs) == 1, installs
    extras = set(installs[0].split(","))
    for root in VARIANTS:
        for where, argv in _command_lines(root):
            flags = _flags(argv)
            if "--etcd" in flags or "--jobs-db" in flags:
                assert "ha" in extras, f"{where} needs the ha extra, which the image does not install"
    assert "server" in extras


def test_dockerfile_exposes_every_port_and_does_not_run_as_root() -> None:
    text = _dockerfile()
    exposed = {int(p) for line in text.splitlines() if line.startswith("EXPOSE ") for p in line.split()[1:]}
    config = CoordinatorConfig()
    worker_port = int(_flags(_argv(_container("shardline-worker")[1]))["--port"] or 0)
    assert exposed == {config.port, 50052, config.cluster_port, worker_port, config.http_port, METRICS_PORT}
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    for template, _ in (*_containers(KUBERNETES), *_containers(KUBERNETES_HA)):
        context = template["spec"].get("securityContext", {})
        assert context.get("runAsNonRoot") is True and context.get("runAsUser") == int(users[-1])


# ------------------------------------------------------------------------------------------- monitoring

DASHBOARD = DEPLOY / "grafana" / "shardline-dashboard.json"
BUILTIN_VARIABLES = {"__rate_interval", "__range", "__interval", "__all"}


def _dashboard_panels() -> list[Doc]:
    panels: list[Doc] = json.loads(DASHBOARD.read_text())["panels"]
    return panels


def test_the_grafana_dashboard_is_well_formed_and_covers_every_topic() -> None:
    """The dashboard parses, its panels neither share an id nor overlap, every query uses the datasource and
    model variables it defines, and it shows each topic. (That every metric it queries is served by a real
    /metrics page is tests/integration/test_metrics.py's check.)"""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = _dashboard_panels()
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(g["x"] + dx, g["y"] + dy) for dx in range(g["w"]) for dy in range(g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    queries = [t for p in panels if p["type"] != "row" for t in p["targets"]]
    assert all(p["targets"] and p["datasource"]["uid"] == "${datasource}" for p in panels if p["type"] != "row")
    used = {name for t in queries for name in re.findall(r"\$(\w+)", t["expr"])}
    assert used - BUILTIN_VARIABLES <= variables, used - BUILTIN_VARIABLES - variables
    exprs = " ".join(t["expr"] for t in queries)
    for metric in ("shardline:request_success_total", "shardline:request_errors_total",
                   "shardline:time_to_first_token_seconds_bucket", "shardline:time_per_output_token_seconds_bucket",
                   "shardline:e2e_request_latency_seconds_bucket", "shardline:num_requests_waiting",
                   "shardline:num_requests_running", "shardline:kv_cache_used_blocks",
                   "shardline:kv_cache_capacity_blocks", "shardline:stage_busy_seconds_total",
                   "shardline:stage_bubble_seconds_total", "shardline:stage_sent_bytes_total",
                   "shardline:stage_received_bytes_total", "shardline:recoveries_total"):
        assert metric in exprs, f"the dashboard shows no {metric}"
    for quantile in ("0.5", "0.95"):
        assert f"histogram_quantile({quantile}, sum by (le) (rate(shardline:time_to_first_token_seconds_bucket" \
            in exprs


def test_the_prometheus_config_scrapes_the_ports_launch_gives() -> None:
    """deploy/prometheus.yml lists the coordinator and workers of the `coordinator launch --metrics-port P
    --workers N` line it documents, on the ports launch gives them (P, then P+1 .. P+N)."""
    from coordinator.cli.launcher import LocalCluster

    text = (DEPLOY / "prometheus.yml").read_text()
    config = yaml.safe_load(text)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in jobs.values())

    def ports(job: str) -> list[int]:
        return [_host_port(t)[1] for c in jobs[job]["static_configs"] for t in c["targets"]]

    match = re.search(r"coordinator launch --metrics-port (\d+) --workers (\d+)", text)
    assert match, "prometheus.yml does not show the launch line its targets follow"
    base, workers = int(match.group(1)), int(match.group(2))
    assert ports("shardline-coordinator") == [base]
    cluster = LocalCluster(CoordinatorConfig(metrics_port=base, workers=workers))
    assert ports("shardline-worker") == [cluster._worker_metrics_port(i) for i in range(workers)]
    for program, sub in (("coordinator", "launch"), ("coordinator", "serve"), ("shard-worker", "serve")):
        assert "--metrics-port" in _options(_command(program, sub)), f"`{program} {sub}` has no --metrics-port"


def test_the_commented_pod_discovery_scrapes_the_manifests_metrics_port() -> None:
    """prometheus.yml's Kubernetes job (commented) keeps shardline's pods and scrapes the port the manifests
    give every pod, which the NetworkPolicies open to Prometheus."""
    text = (DEPLOY / "prometheus.yml").read_text()
    start = text.index("# - job_name: shardline")
    job = yaml.safe_load("\n".join(line.strip().removeprefix("#")[1:] for line in text[start:].splitlines()
                                   if line.strip().startswith("#")))[0]
    rules = job["relabel_configs"]
    (address,) = [r for r in rules if r.get("target_label") == "__address__"]
    assert address["replacement"] == f"$1:{METRICS_PORT}"
    (keep,) = [r for r in rules if r.get("action") == "keep"]
    for _, container in _containers():
        assert METRICS_PORT in _container_ports(container), f"{container['name']} declares no metrics port"
    for app in ("shardline-coordinator", "shardline-worker"):
        assert re.fullmatch(keep["regex"], app)


# ------------------------------------------------------------------------------ standby coordinators (HA)


def _env(container: Doc) -> dict[str, str]:
    """A container's plain env values, $(VAR) of earlier ones expanded as Kubernetes does (the downward API's
    left as $(VAR))."""
    out: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            out[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: out.get(m.group(1), m.group(0)), e["value"])
    return out


def _expanded(container: Doc) -> list[str]:
    env = _env(container)
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in _argv(container)]


def test_the_ha_variant_runs_two_coordinators_with_stable_names_and_the_gateway_apart() -> None:
    coordinators = _one("StatefulSet", "shardline-coordinator", KUBERNETES_HA)
    assert coordinators["spec"]["replicas"] == 2 and coordinators["spec"]["podManagementPolicy"] == "Parallel"
    headless = _one("Service", coordinators["spec"]["serviceName"], KUBERNETES_HA)
    assert headless["spec"].get("clusterIP") == "None" and headless["spec"].get("publishNotReadyAddresses") is True, \
        "workers register with the leader by its pod name before it is Ready"
    _, container = _container("shardline-coordinator", KUBERNETES_HA)
    flags = _flags(_argv(container))
    assert flags["--advertise"] == f"$(POD_NAME).{headless['metadata']['name']}.$(POD_NAMESPACE).svc.cluster.local"
    assert "--no-http" in flags, "the HTTP API is the gateway Deployment's (serve --etcd serves none)"
    assert _one("Deployment", "shardline-http", KUBERNETES_HA)["spec"]["replicas"] >= 2
    # a standby's health services are all NOT_SERVING, and a StatefulSet's rolling update waits for each pod
    # it replaces to be Ready: every probe is one a standby passes (its ports are open)
    for kind in PROBES:
        assert "tcpSocket" in container[kind], kind


def test_the_ha_coordinators_find_etcd_and_postgresql_and_the_password_is_in_no_url() -> None:
    _, container = _container("shardline-coordinator", KUBERNETES_HA)
    flags = _flags(_argv(container))
    etcd = _host_port((flags["--etcd"] or "").removeprefix("http://"))
    database = (flags["--jobs-db"] or "")
    config = CoordinatorConfig(etcd=[flags["--etcd"] or ""], jobs_db=database)  # the CLI's checks accept them
    assert config.jobs_db and re.match(r"postgresql://\w+@", database), "the user in the URL, not a password"
    services = {s["metadata"]["name"]: s for s in _docs("Service", KUBERNETES_HA)}
    assert services[etcd[0]]["spec"]["type"] == "ExternalName" and etcd[1] == 2379
    assert services[database.split("@")[1].split(":")[0]]["spec"]["type"] == "ExternalName"
    (password,) = [e for e in container["env"] if e["name"] == "PGPASSWORD"]
    assert password["valueFrom"]["secretKeyRef"]["name"] == "shardline-postgres"


def test_workers_and_the_gateway_are_given_every_coordinator() -> None:
    coordinators = _one("StatefulSet", "shardline-coordinator", KUBERNETES_HA)
    names = [f"shardline-coordinator-{i}.{coordinators['spec']['serviceName']}.$(POD_NAMESPACE).svc.cluster.local"
             for i in range(coordinators["spec"]["replicas"])]
    config = CoordinatorConfig()
    _, worker = _container("shardline-worker", KUBERNETES_HA)
    given = _flags(_expanded(worker))["--coordinator"] or ""
    assert given.split(",") == [f"{n}:{config.cluster_port}" for n in names]
    _, gateway = _container("shardline-http", KUBERNETES_HA)
    gateway_flags = _flags(_expanded(gateway))
    assert (gateway_flags["--endpoint"] or "").split(",") == [f"{n}:{config.port}" for n in names]
    assert gateway_flags["--port"] == "8000" and {p["containerPort"] for p in gateway["ports"]} == {8000}


def test_the_ha_create_node_command_covers_the_coordinators_names() -> None:
    text = (KUBERNETES_HA / "shardline-ha.yaml").read_text().replace("\\\n#", " ")
    match = re.search(r"coordinator certs create-node ([^\n`]*)", text)
    assert match
    hosts = {t for t in shlex.split(match.group(1)) if not t.startswith("--") and t != "certs"}
    assert {"*.shardline-worker.default.svc.cluster.local", "*.shardline-coordinators.default.svc.cluster.local",
            "localhost", "127.0.0.1"} <= hosts


def test_the_ha_network_policies_allow_exactly_the_links_it_needs() -> None:
    root = KUBERNETES_HA
    coordinator = _container("shardline-coordinator", root)[0]["metadata"]["labels"]
    worker = _container("shardline-worker", root)[0]["metadata"]["labels"]
    gateway = _container("shardline-http", root)[0]["metadata"]["labels"]
    other = {"app": "something-else"}
    prometheus = {"app.kubernetes.io/name": "prometheus", NAMESPACE: "monitoring"}
    config = CoordinatorConfig()
    for source in (gateway, other, worker, None):
        assert _allowed(config.port, coordinator, source, root)
        assert _allowed(8000, gateway, source, root)
    for port in (50052, config.cluster_port):
        assert _allowed(port, coordinator, worker, root)
        assert not _allowed(port, coordinator, gateway, root) and not _allowed(port, coordinator, None, root)
        assert not _allowed(port, coordinator, coordinator, root), "the coordinators never call each other"
    assert _allowed(50061, worker, coordinator, root) and not _allowed(50061, worker, gateway, root)
    for labels in (coordinator, worker, gateway):
        assert _allowed(METRICS_PORT, labels, prometheus, root) and not _allowed(METRICS_PORT, labels, other, root)
        assert not _allowed(8080, labels, other, root)
