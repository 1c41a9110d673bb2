"""Security against real servers: a SmolLM2 cluster over mutual TLS with API keys (coordinator, parameter
service, two workers), every RPC of every service called with every kind of wrong credential, and the
cluster serving the right callers throughout; a plaintext cluster's token; certificate rotation in place."""

from __future__ import annotations

import datetime
import json
import shutil
import socket
import ssl
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import message_factory

from coordinator.api.server import start_coordinator
from coordinator.cli.certs import create_ca, create_client, create_node
from coordinator.config import CoordinatorConfig
from coordinator.store.parameters.server import start_parameter_server
from shard_worker.server import start_worker
from shardline.auth import TOKEN_HEADER, ClusterIdentity, hash_key, new_api_key
from shardline.client import Client
from shardline.errors import NotFound, PermissionDenied, Unauthenticated
from shardline.stream import LinkSettings
from shardline.tls import TLSFilesError, check_pair
from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc, parameters_pb2, worker_pb2, worker_pb2_grpc
from tests.helpers import error_of, seq

HOSTS = ["localhost", "127.0.0.1"]
PROMPT = "The three primary colors are"
REFUSED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAVAILABLE}


def _copy_ca(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for name in ("ca.crt", "ca.key"):
        shutil.copy(src / name, dst / name)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    cluster, other, expired, wronghost = (root / n for n in ("cluster", "other", "expired", "wronghost"))
    create_ca(cluster)
    create_node(cluster, HOSTS)
    create_client(cluster, "alice")
    create_ca(other, common_name="another CA")
    create_node(other, HOSTS)
    create_client(other, "mallory")
    for d in (expired, wronghost):
        _copy_ca(cluster, d)
    create_node(expired, HOSTS, days=1,
                not_before=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=3))
    create_node(wronghost, ["other.example"])
    for d in (expired, wronghost):
        (d / "ca.key").unlink()
    return {"cluster": cluster, "other": other, "expired": expired, "wronghost": wronghost}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    client, admin, other = new_api_key(), new_api_key(), new_api_key()
    path = tmp_path_factory.mktemp("keys") / "api-keys.json"
    path.write_text(json.dumps({"keys": [{"name": "app", "role": "client", "sha256": hash_key(client)},
                                         {"name": "ops", "role": "admin", "sha256": hash_key(admin)},
                                         {"name": "other-app", "role": "client", "sha256": hash_key(other)}]}))
    return {"client": client, "admin": admin, "other": other, "file": path}


@pytest.fixture(scope="module")
def secure(loop, smollm2_store, pki, keys, tmp_path_factory):
    """Parameters, two workers and a coordinator over mutual TLS; the workers register on the cluster port."""
    certs = pki["cluster"]
    identity = ClusterIdentity(certs_dir=certs)
    parameters = loop.run(start_parameter_server(smollm2_store, identity=identity))
    workers = [loop.run(start_worker(links=LinkSettings(identity=identity))) for _ in range(2)]
    config = CoordinatorConfig(store=smollm2_store.root, model="smollm2", workers=2, port=0, cluster_port=0,
                               parameters_address=parameters.address, certs_dir=certs, api_keys=keys["file"],
                               heartbeat_timeout_ms=3_600_000, jobs_dir=tmp_path_factory.mktemp("jobs"))
    coordinator = loop.run(start_coordinator(config))
    with node_channel(coordinator.cluster_address, certs) as ch:
        registry = coordinator_pb2_grpc.WorkerRegistryStub(ch)
        for w in workers:
            registry.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(address=w.address,
                                                                          memory_budget_bytes=2**30), timeout=10)
    with Client(coordinator.address, tls=certs, api_key=keys["client"]) as client:
        client.wait_ready(timeout=120)
        reference = client.generate(PROMPT, max_tokens=12, temperature=0, ignore_eos=True)
    assert len(reference.token_ids) == 12
    yield {"coordinator": coordinator, "workers": workers, "parameters": parameters, "reference": reference,
           "certs": certs, "key": keys["client"]}
    for w in workers:
        loop.run(w.stop(0))
    loop.run(coordinator.stop())
    loop.run(parameters.stop(0))


def node_channel(target: str, certs: Path, cert_dir: Path | None = None, client: str = "") -> grpc.Channel:
    """A TLS channel trusting `certs`' CA, presenting `cert_dir`'s node certificate (or client.NAME)."""
    cert_dir = cert_dir or certs
    names = (f"client.{client}.crt", f"client.{client}.key") if client else ("node.crt", "node.key")
    creds = grpc.ssl_channel_credentials((certs / "ca.crt").read_bytes(), (cert_dir / names[1]).read_bytes(),
                                         (cert_dir / names[0]).read_bytes())
    return grpc.secure_channel(target, creds)


def tls_channel(target: str, ca: Path) -> grpc.Channel:
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(ca.read_bytes()))


def call(channel: grpc.Channel, service: str, method: str, metadata=(), request=None) -> grpc.StatusCode:
    """Call one RPC with a default (empty) request; the status it ends with."""
    descriptor = {s.full_name: s for pb in (coordinator_pb2, worker_pb2, parameters_pb2)
                  for s in pb.DESCRIPTOR.services_by_name.values()}[service].methods_by_name[method]
    request_class = message_factory.GetMessageClass(descriptor.input_type)
    response_class = message_factory.GetMessageClass(descriptor.output_type)
    path = f"/{service}/{method}"
    kind = ("stream" if descriptor.client_streaming else "unary") + "_" + (
        "stream" if descriptor.server_streaming else "unary")
    rpc = getattr(channel, kind)(path, request_serializer=lambda m: m.SerializeToString(),
                                 response_deserializer=response_class.FromString)
    message = request if request is not None else request_class()
    try:
        if descriptor.client_streaming:
            for _ in rpc(iter([message]), timeout=10, metadata=metadata):
                pass
        elif descriptor.server_streaming:
            for _ in rpc(message, timeout=10, metadata=metadata):
                pass
        else:
            rpc(message, timeout=10, metadata=metadata)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def methods(service: str) -> list[str]:
    for pb in (coordinator_pb2, worker_pb2, parameters_pb2):
        if service.rsplit(".", 1)[-1] in pb.DESCRIPTOR.services_by_name:
            return list(pb.DESCRIPTOR.services_by_name[service.rsplit(".", 1)[-1]].methods_by_name)
    raise KeyError(service)


WORKER, PARAMETERS = "shardline.v1.ShardWorker", "shardline.v1.Parameters"
COORDINATOR, REGISTRY = "shardline.v1.Coordinator", "shardline.v1.WorkerRegistry"
ADMIN = {"GetClusterStatus", "DrainWorker", "Rebalance", "LoadModel", "UnloadModel", "ScaleModel", "PromoteModel"}
# calls that would change the cluster if they were let through: only ever made with wrong credentials
CHANGES = {"SetPeers", "Rebalance", "DrainWorker", "LeaveCluster", "LoadShard", "UnloadShard"}


def bad_transports(target: str, pki) -> dict[str, grpc.Channel]:
    """Callers that must not complete a handshake with a port that requires the cluster's certificate."""
    c = pki["cluster"]
    return {"plaintext": grpc.insecure_channel(target),
            "no certificate": tls_channel(target, c / "ca.crt"),
            "another CA's certificate": node_channel(target, c, pki["other"], client="mallory"),
            "another CA's node certificate": node_channel(target, c, pki["other"]),
            "an expired certificate": node_channel(target, c, pki["expired"]),
            "trusting another CA": node_channel(target, pki["other"], c)}


def test_every_internal_rpc_refuses_every_wrong_credential(secure, pki):
    c = pki["cluster"]
    targets = {WORKER: secure["workers"][0].address, PARAMETERS: secure["parameters"].address,
               REGISTRY: secure["coordinator"].cluster_address}
    seen = 0
    for service, target in targets.items():
        for name, channel in bad_transports(target, pki).items():
            with channel:
                for method in methods(service):
                    code = call(channel, service, method)
                    # no handshake: gRPC cannot deliver a status, the client sees the connection fail
                    assert code == grpc.StatusCode.UNAVAILABLE, (service, method, name, code)
                    seen += 1
        with node_channel(target, c, client="alice") as channel:  # the cluster's CA, but a client's cert
            for method in methods(service):
                assert call(channel, service, method) == grpc.StatusCode.PERMISSION_DENIED, (service, method)
        with node_channel(target, c) as channel:  # the cluster's node certificate: let through
            for method in set(methods(service)) - CHANGES:
                assert call(channel, service, method) not in REFUSED, (service, method)
    assert seen == 6 * (7 + 4 + 3)  # 7 ShardWorker methods (Calibrate among them), 4 Parameters, 3 WorkerRegistry
    assert_serving(secure)


def test_the_public_port_refuses_wrong_keys_and_roles_and_the_registry(secure, pki, keys):
    c, address = pki["cluster"], secure["coordinator"].address
    bearer = lambda key: (("authorization", f"Bearer {key}"),)  # noqa: E731
    wrong = {"no key": (), "a wrong key": bearer(new_api_key()), "a key of the wrong scheme":
             (("authorization", f"Basic {keys['client']}"),), "an empty bearer": (("authorization", "Bearer "),),
             "an oversized key": bearer("k" * 4000), "a key in another header": (("x-api-key", keys["client"]),)}
    with tls_channel(address, c / "ca.crt") as channel:
        for method in methods(COORDINATOR):
            for name, metadata in wrong.items():
                assert call(channel, COORDINATOR, method, metadata) == grpc.StatusCode.UNAUTHENTICATED, (method, name)
            expected_client = grpc.StatusCode.PERMISSION_DENIED if method in ADMIN else None
            code = call(channel, COORDINATOR, method, bearer(keys["client"]))
            if expected_client is not None:
                assert code == expected_client, method
            else:
                assert code not in REFUSED, (method, code)
            if method not in CHANGES:
                assert call(channel, COORDINATOR, method, bearer(keys["admin"])) not in REFUSED, method
        # the registry is the cluster's own: not on the public port, whatever the key
        for method in methods(REGISTRY):
            assert call(channel, REGISTRY, method, bearer(keys["admin"])) == grpc.StatusCode.UNAUTHENTICATED
    for name, channel in {"plaintext": grpc.insecure_channel(address),
                          "trusting another CA": tls_channel(address, pki["other"] / "ca.crt")}.items():
        with channel:
            assert call(channel, COORDINATOR, "ListModels", bearer(keys["admin"])) == grpc.StatusCode.UNAVAILABLE, name
    assert_serving(secure)


def test_a_job_is_seen_only_by_the_key_that_submitted_it_and_admins(secure, keys):
    address, certs = secure["coordinator"].address, secure["certs"]
    with Client(address, tls=certs, api_key=keys["client"]) as app:
        job_id = app.submit_job([{"prompt": PROMPT, "max_tokens": 2, "temperature": 0}])
        assert app.wait_job(job_id, timeout=60, poll_s=0.05).done == 1
        assert job_id in [j.job_id for j in app.list_jobs()]
    with Client(address, tls=certs, api_key=keys["other"]) as other:
        for call_ in (other.get_job, other.job_results, other.cancel_job):
            with pytest.raises(NotFound, match=f"no job '{job_id}'"):
                call_(job_id)
        assert job_id not in [j.job_id for j in other.list_jobs()]
    with Client(address, tls=certs, api_key=keys["admin"]) as ops:
        assert ops.get_job(job_id).state == "completed"
        assert job_id in [j.job_id for j in ops.list_jobs()]


def test_the_sdk_says_what_is_wrong_and_never_shows_the_key(secure, pki, keys):
    c, address = pki["cluster"], secure["coordinator"].address
    with Client(address, tls=c) as client, pytest.raises(Unauthenticated, match="authorization: Bearer"):
        client.list_models()
    wrong = new_api_key()
    with Client(address, tls=c, api_key=wrong) as client, pytest.raises(Unauthenticated) as err:
        client.list_models()
    assert wrong not in err.value.message and "not known" in err.value.message
    with Client(address, tls=c, api_key=keys["client"]) as client:
        with pytest.raises(PermissionDenied, match="role admin") as denied:
            client.cluster_status()
        assert keys["client"] not in denied.value.message
        assert client.list_models()[0].name == "smollm2"
    with Client(address, tls=pki["other"], api_key=keys["client"]) as client, \
            pytest.raises(Unauthenticated, match="TLS handshake failed"):
        client.list_models()
    with Client(address, tls=pki["wronghost"], api_key=keys["admin"]) as client:  # same CA: trusted
        assert client.cluster_status().ready


def test_a_server_with_an_expired_or_foreign_certificate_is_not_trusted(loop, pki):
    c = pki["cluster"]
    for name in ("expired", "wronghost"):
        worker = loop.run(start_worker(links=LinkSettings(identity=ClusterIdentity(certs_dir=pki[name]))))
        try:
            with node_channel(worker.address, c) as channel:
                assert call(channel, WORKER, "GetStatus") == grpc.StatusCode.UNAVAILABLE, name
            with Client(worker.address, tls=c) as client, pytest.raises(Unauthenticated, match="TLS handshake"):
                client.list_models()
        finally:
            loop.run(worker.stop(0))


def test_certificate_files_that_do_not_parse_are_refused_with_their_name(loop, pki, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(pki["cluster"], broken)
    (broken / "node.crt").write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    with pytest.raises(TLSFilesError, match="node.crt") as err:
        loop.run(start_worker(links=LinkSettings(identity=ClusterIdentity.from_files(broken, None))))
    assert "PRIVATE KEY" not in str(err.value)
    shutil.copy(pki["other"] / "node.crt", broken / "node.crt")  # parses, but not this key's certificate
    with pytest.raises(TLSFilesError, match="not this certificate's"):
        check_pair(broken / "node.crt", broken / "node.key")
    with pytest.raises(TLSFilesError, match="ca.crt"):
        (broken / "ca.crt").write_bytes(b"\x00garbage")
        Client("127.0.0.1:1", tls=broken)


def test_a_plaintext_cluster_token_guards_every_internal_rpc_and_routes(loop, store, tmp_path):
    token = "t" * 32
    identity = ClusterIdentity(token=token)
    parameters = loop.run(start_parameter_server(store, identity=identity))
    a, b = (loop.run(start_worker(links=LinkSettings(identity=identity))) for _ in range(2))
    good = ((TOKEN_HEADER, token),)
    try:
        for service, target in ((WORKER, a.address), (PARAMETERS, parameters.address)):
            with grpc.insecure_channel(target) as channel:
                for method in methods(service):
                    for metadata in ((), ((TOKEN_HEADER, "x" * 32),), ((TOKEN_HEADER, "y" * 5000),)):
                        assert call(channel, service, method, metadata) == grpc.StatusCode.UNAUTHENTICATED
                for method in set(methods(service)) - CHANGES:
                    assert call(channel, service, method, good) not in REFUSED, (service, method)
        # a refused call's request is not even parsed: bytes that are no message get UNAUTHENTICATED too
        with grpc.insecure_channel(a.address) as channel:
            garbage = channel.unary_unary(f"/{WORKER}/EndSession", request_serializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as refused_unread:
                garbage(b"\xff\xff\xff", timeout=10)
            assert refused_unread.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as parsed:
                garbage(b"\xff\xff\xff", timeout=10, metadata=good)
            assert parsed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # the cluster's own loads work; a route outside the plan is refused before any compute
        stub_a = worker_pb2_grpc.ShardWorkerStub(grpc.insecure_channel(a.address))
        for worker, (start, end) in ((a, (0, 3)), (b, (3, 6))):
            request = worker_pb2.LoadShardRequest(model="tiny-llama", start_layer=start, end_layer=end,
                                                  parameters_address=parameters.address)
            stub = worker_pb2_grpc.ShardWorkerStub(grpc.insecure_channel(worker.address))
            list(stub.LoadShard(request, timeout=120, metadata=good))

        def forward(route: list[str]) -> worker_pb2.ForwardResponse:
            request = worker_pb2.ForwardRequest(step_id=1, sequences=[seq("s", 0, 2)], token_ids=[1, 2],
                                                start_layer=0, route=route)
            (response,) = stub_a.Forward(iter([request]), timeout=30, metadata=good)
            return response

        refused = error_of(forward([b.address]))  # told no peers yet: a worker with an identity refuses routes
        assert refused.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and "plan" in refused.message
        stub_a.SetPeers(worker_pb2.SetPeersRequest(addresses=[a.address, b.address]), timeout=5, metadata=good)
        outside = error_of(forward(["127.0.0.1:1"]))
        assert outside.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and "127.0.0.1:1" in outside.message
        response = forward([b.address])
        assert not response.HasField("error") and not response.sequence_errors and len(response.token_ids) == 1
        with pytest.raises(grpc.RpcError) as bad:
            stub_a.SetPeers(worker_pb2.SetPeersRequest(addresses=["not an address"]), timeout=5, metadata=good)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # the cluster (and only the cluster, above) unloads a worker's shard
        unloaded = stub_a.UnloadShard(worker_pb2.UnloadShardRequest(model="tiny-llama"), timeout=30, metadata=good)
        assert unloaded.freed_weight_bytes > 0 and unloaded.sessions_ended == 1
    finally:
        for s in (a, b):
            loop.run(s.stop(0))
        loop.run(parameters.stop(0))


def test_oversized_metadata_is_refused_and_the_server_goes_on(secure, pki, keys):
    c, address = pki["cluster"], secure["coordinator"].address
    key = (("authorization", f"Bearer {keys['client']}"),)
    with tls_channel(address, c / "ca.crt") as channel:
        assert call(channel, COORDINATOR, "ListModels", key) == grpc.StatusCode.OK
        # beyond what the guard reads: refused as a credential it will not look at
        code = call(channel, COORDINATOR, "ListModels", (*key, ("x-filler", "f" * 32 * 1024)))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        # beyond what gRPC itself accepts: refused before any handler
        code = call(channel, COORDINATOR, "ListModels", (*key, ("x-filler", "f" * 128 * 1024)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert call(channel, COORDINATOR, "ListModels", key) == grpc.StatusCode.OK
    with node_channel(secure["workers"][0].address, c) as channel:
        code = call(channel, WORKER, "GetStatus", (("x-filler", "f" * 32 * 1024),))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    assert_serving(secure)


def served_certificate(address: str, certs: Path) -> bytes:
    """The certificate a server presents to a new connection (DER)."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    context.load_cert_chain(certs / "node.crt", certs / "node.key")
    with socket.create_connection((host, int(port)), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_rotating_the_node_certificate_in_place_keeps_serving(secure, tmp_path):
    certs = secure["certs"]
    servers = [secure["coordinator"].address, secure["coordinator"].cluster_address, secure["parameters"].address,
               *(w.address for w in secure["workers"])]
    before = {a: served_certificate(a, certs) for a in servers}
    assert len(set(before.values())) == 1
    staged = tmp_path / "staged"
    _copy_ca(certs, staged)
    create_node(staged, HOSTS)
    for name in ("node.key", "node.crt"):  # new files in place, each replaced atomically
        shutil.copy(staged / name, certs / f".{name}.new")
        (certs / f".{name}.new").replace(certs / name)
    new = ssl.PEM_cert_to_DER_cert((staged / "node.crt").read_text())
    assert_serving(secure)  # old connections go on; new ones (status, sessions' ends) use the new files
    # every server of every role presents the new certificate to a new connection, not only the first
    # to notice the change
    assert {a: served_certificate(a, certs) for a in servers} == dict.fromkeys(servers, new)
    assert_serving(secure)


def assert_serving(secure) -> None:
    """The cluster still serves the right caller the same greedy tokens as before."""
    with Client(secure["coordinator"].address, tls=secure["certs"], api_key=secure["key"]) as client:
        again = client.generate(PROMPT, max_tokens=12, temperature=0, ignore_eos=True)
    assert again.token_ids == secure["reference"].token_ids


def test_a_client_certificate_has_the_role_the_keys_file_gives_its_name_and_loses_it_when_removed(
        loop, store, pki, tmp_path):
    """--client-certs required: alice's certificate is a client, carol's an admin, dave's (signed by the same CA,
    named nowhere) nothing, even where keyless callers are served; a key sent beside a certificate decides.
    Removing alice's entry refuses her at once."""
    c = pki["cluster"]
    for name in ("carol", "dave"):
        if not (c / f"client.{name}.crt").exists():
            create_client(c, name)
    admin = new_api_key()
    keys = tmp_path / "keys.json"
    entries = [{"name": "alice", "role": "client", "certificate": "alice"},
               {"name": "carol", "role": "admin", "certificate": "carol"},
               {"name": "ops", "role": "admin", "sha256": hash_key(admin)}]
    # callers without a key are served as clients, but a certificate speaks for its caller: unnamed, no access
    keys.write_text(json.dumps({"keys": entries, "keyless": "client"}))
    config = CoordinatorConfig(store=store.root, model="tiny-llama", port=0, cluster_port=0, certs_dir=c,
                               client_certs="required", api_keys=keys, jobs_dir=tmp_path / "jobs")
    coordinator = loop.run(start_coordinator(config))
    address = coordinator.address
    try:
        with node_channel(address, c, client="alice") as alice, node_channel(address, c, client="carol") as carol, \
                node_channel(address, c, client="dave") as dave:
            assert call(alice, COORDINATOR, "ListModels") == grpc.StatusCode.OK
            assert call(alice, COORDINATOR, "GetClusterStatus") == grpc.StatusCode.PERMISSION_DENIED
            assert call(carol, COORDINATOR, "GetClusterStatus") == grpc.StatusCode.OK
            assert call(dave, COORDINATOR, "ListModels") == grpc.StatusCode.UNAUTHENTICATED
            bearer = (("authorization", f"Bearer {admin}"),)
            assert call(alice, COORDINATOR, "GetClusterStatus", bearer) == grpc.StatusCode.OK  # the key decides
            keys.write_text(json.dumps({"keys": entries[1:], "keyless": "client"}))  # alice's entry removed
            removed = time.monotonic()
            while call(alice, COORDINATOR, "ListModels") == grpc.StatusCode.OK:
                assert time.monotonic() - removed < 1.5, "alice's certificate was still admitted"
                time.sleep(0.05)
            assert call(alice, COORDINATOR, "ListModels") == grpc.StatusCode.UNAUTHENTICATED
            assert call(carol, COORDINATOR, "ListModels") == grpc.StatusCode.OK
        with tls_channel(address, c / "ca.crt") as anonymous:  # no certificate: no handshake
            assert call(anonymous, COORDINATOR, "ListModels") == grpc.StatusCode.UNAVAILABLE
    finally:
        loop.run(coordinator.stop())


def test_client_certs_required_without_a_keys_file_is_refused_at_start(pki, tmp_path):
    with pytest.raises(ValueError, match="client_certs 'required' needs api_keys"):
        CoordinatorConfig(store=tmp_path, model="m", certs_dir=pki["cluster"], client_certs="required")
