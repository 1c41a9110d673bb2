"""`coordinator certs` and `coordinator api-keys` as a user runs them (real processes), and what they write:
key modes, SANs, usages, expiry, CA constraints; API keys stored hashed and checked by role."""

from __future__ import annotations

import datetime
import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shardline.auth import ApiKeys, hash_key, parse_keys


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "coordinator.cli", *args], capture_output=True, text=True,
                          timeout=60)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certs_commands_write_a_ca_node_and_client_with_the_right_fields(tmp_path):
    d = tmp_path / "certs"
    assert cli("certs", "create-ca", "--certs-dir", str(d), "--days", "30").returncode == 0
    made = cli("certs", "create-node", "--certs-dir", str(d), "--days", "7", "node1.example", "*.workers.example",
               "10.0.0.5", "::1")
    assert made.returncode == 0, made.stderr
    assert cli("certs", "create-client", "--certs-dir", str(d), "alice").returncode == 0
    for key in ("ca.key", "node.key", "client.alice.key"):
        assert stat.S_IMODE((d / key).stat().st_mode) == 0o600, key
        assert "PRIVATE KEY" in (d / key).read_text()
    ca, node, client = load(d / "ca.crt"), load(d / "node.crt"), load(d / "client.alice.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not node.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert node.issuer == ca.subject and client.issuer == ca.subject
    node.verify_directly_issued_by(ca)
    assert node.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node"
    sans = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["node1.example", "*.workers.example"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "::1"]
    usages = set(node.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert usages == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert set(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.CLIENT_AUTH}
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    lifetime = node.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert datetime.timedelta(days=6.9) < lifetime < datetime.timedelta(days=7.1)


def test_the_https_gateway_gets_a_certificate_of_its_own_that_cannot_pass_for_a_node(tmp_path):
    """Issue 28.6: server.crt / server.key, server authentication only, common name "https" (internal RPCs
    require the node's), and no client may take that name."""
    d = tmp_path / "certs"
    assert cli("certs", "create-ca", "--certs-dir", str(d)).returncode == 0
    made = cli("certs", "create-server", "--certs-dir", str(d), "api.example", "127.0.0.1")
    assert made.returncode == 0 and "server certificate" in made.stdout, made.stderr
    server = load(d / "server.crt")
    server.verify_directly_issued_by(load(d / "ca.crt"))
    assert stat.S_IMODE((d / "server.key").stat().st_mode) == 0o600 and not (d / "node.key").exists()
    assert set(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH}
    assert server.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "https"
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["api.example"]
    refused = cli("certs", "create-client", "--certs-dir", str(d), "https")
    assert refused.returncode == 1 and "neither 'node' nor 'https'" in refused.stderr


def test_certs_commands_refuse_what_they_cannot_do_without_touching_files(tmp_path):
    d = tmp_path / "certs"
    no_ca = cli("certs", "create-node", "--certs-dir", str(d), "localhost")
    assert no_ca.returncode == 1 and "create-ca" in no_ca.stderr and "Traceback" not in no_ca.stderr
    assert cli("certs", "create-ca", "--certs-dir", str(d), "--days", "10").returncode == 0
    before = (d / "ca.crt").read_bytes()
    again = cli("certs", "create-ca", "--certs-dir", str(d))
    assert again.returncode == 1 and "--overwrite" in again.stderr and (d / "ca.crt").read_bytes() == before
    outlives = cli("certs", "create-node", "--certs-dir", str(d), "--days", "365", "localhost")
    assert outlives.returncode == 1 and "outlive the CA" in outlives.stderr
    for bad in (["create-node", "bad host!"], ["create-client", "node"], ["create-client", "a/b"]):
        result = cli("certs", bad[0], "--certs-dir", str(d), bad[1])
        assert result.returncode == 1 and "error:" in result.stderr, bad
    assert sorted(p.name for p in d.iterdir()) == ["ca.crt", "ca.key"]


def test_api_keys_are_printed_once_stored_hashed_and_revocable(tmp_path):
    f = tmp_path / "keys.json"
    made = cli("api-keys", "create", "app", "--file", str(f))
    admin = cli("api-keys", "create", "ops", "--file", str(f), "--role", "admin")
    assert made.returncode == 0 and admin.returncode == 0
    key = made.stdout.strip()
    assert key.startswith("sl_") and key not in f.read_text() and hash_key(key) in f.read_text()
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    keys = ApiKeys(f)
    entry = keys.role_of(key)
    assert entry is not None and (entry.name, entry.role) == ("app", "client")
    assert keys.role_of(admin.stdout.strip()).role == "admin"
    assert keys.role_of(key + "x") is None
    duplicate = cli("api-keys", "create", "app", "--file", str(f))
    assert duplicate.returncode == 1 and "exists" in duplicate.stderr
    assert cli("api-keys", "list", "--file", str(f)).stdout.split() == ["app", "client", "ops", "admin"]
    missing = cli("api-keys", "list", "--file", str(f.with_name("missing.json")))
    assert missing.returncode == 1 and "no API keys file at" in missing.stderr and "api-keys create" in missing.stderr
    assert cli("api-keys", "revoke", "app", "--file", str(f)).returncode == 0
    assert [e["name"] for e in json.loads(f.read_text())["keys"]] == ["ops"]
    assert cli("api-keys", "create", "x", "--file", str(f), "--role", "root").returncode == 1


@pytest.mark.parametrize("text, message", [
    ("{", "not JSON"), ('{"keys": 3}', '{"keys": [...]}'), ('{"keys": [{"name": "a"}]}', "needs name, role"),
    ('{"keys": [{"name": "a", "role": "god", "sha256": "' + "0" * 64 + '"}]}', "roles are"),
    ('{"keys": [{"name": "a", "role": "client", "sha256": "xyz"}]}', "64 hex"),
    ('{"keys": [{"name": "a", "role": "client", "sha256": "' + "0" * 64 + '"}, {"name": "a", "role": "admin", '
     '"sha256": "' + "1" * 64 + '"}]}', "entry 1 reuses the name 'a'"),
    ('{"keys": [{"name": "a", "role": "client", "sha256": "' + "0" * 64 + '"}, {"name": "b", "role": "client", '
     '"sha256": "' + "0" * 64 + '"}]}', "same key as 'a'"),
    ('{"keys": [{"name": "", "role": "client", "sha256": "' + "0" * 64 + '"}]}', "empty name"),
    ('{"keys": [{"name": "a", "role": "client", "certificate": "a/b"}]}', "common name"),
    ('{"keys": [{"name": "a", "role": "admin", "certificate": "node"}]}', "the cluster's own certificate"),
    ('{"keys": [{"name": "a", "role": "client", "certificate": "a", "sha256": "' + "0" * 64 + '"}]}',
     "either sha256"),
    ('{"keys": [{"name": "a", "role": "client", "certificate": "x"}, {"name": "b", "role": "admin", '
     '"certificate": "x"}]}', "same certificate as 'a'"),
])
def test_a_keys_file_that_cannot_be_used_is_refused_naming_the_problem(text, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("{", r"\{")):
        parse_keys(text, "keys.json")


def test_api_keys_cli_maps_a_certificate_to_a_role_and_keeps_the_files_quotas(tmp_path):
    f = tmp_path / "keys.json"
    f.write_text(json.dumps({"quotas": {"client": {"max_streams": 4}}, "keyless": "client", "keys": []}))
    made = cli("api-keys", "create", "bob", "--certificate", "bob", "--role", "admin", "--file", str(f))
    assert made.returncode == 0 and "client certificate 'bob' has role admin" in made.stdout, made.stderr
    assert cli("api-keys", "create", "app", "--file", str(f)).returncode == 0
    assert cli("api-keys", "revoke", "app", "--file", str(f)).returncode == 0
    document = json.loads(f.read_text())
    assert document["quotas"] == {"client": {"max_streams": 4}} and document["keyless"] == "client"
    assert document["keys"] == [{"name": "bob", "role": "admin", "certificate": "bob"}]
    assert "certificate bob" in cli("api-keys", "list", "--file", str(f)).stdout
    bad = cli("api-keys", "create", "x", "--certificate", "no/slash", "--file", str(f))
    assert bad.returncode == 1 and "common name" in bad.stderr
    keys = ApiKeys(f)
    assert keys.keyless() is not None and keys.keyless().role == "client" and keys.keyless().max_streams == 4
    assert keys.of_certificate({"x509_common_name": [b"bob"]}).role == "admin"
    assert keys.of_certificate({"x509_common_name": [b"eve"]}) is None
