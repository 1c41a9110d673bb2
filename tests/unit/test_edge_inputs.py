"""The edge's own checks, without a server: KServe values fitted to the native fields, and the HTTP gateway's
judge of API keys (its memory of each answer, keyless callers, a coordinator out of reach)."""

from __future__ import annotations

import asyncio
import json

import pytest

from coordinator.api.http_keys import REMEMBER_S, CoordinatorJudge, bearer_key
from coordinator.api.kserve_inputs import Tensor, generate_request
from coordinator.api.openai_errors import ApiError
from shardline.errors import InvalidArgument, Unauthenticated, Unavailable


def inputs(**values: object) -> dict[str, Tensor]:
    """A prompt, and `values` as the JSON of sampling_parameters (where any JSON value may come)."""
    sampling = json.dumps(values).encode()
    return {"text_input": Tensor("text_input", "BYTES", (1,), [b"hello"]),
            "sampling_parameters": Tensor("sampling_parameters", "BYTES", (1,), [sampling])}


def test_kserve_values_are_held_as_the_native_fields_would_hold_them():
    req = generate_request("m", inputs(temperature=0.7, max_tokens=5, seed=2**64 - 1, stop=["x"], ignore_eos=True))
    assert req.temperature == pytest.approx(0.7, abs=1e-7) and req.temperature != 0.7  # float32, as the proto's
    assert (req.max_tokens, req.seed, req.stop, req.ignore_eos, req.top_k, req.min_tokens) == \
        (5, 2**64 - 1, ("x",), True, 0, 0)
    assert generate_request("m", inputs(temperature=1e39)).temperature == float("inf")  # the core refuses it


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 2**31), ("top_k", -2**31 - 1), ("seed", -1), ("seed", 2**64),
    ("temperature", 10**400), ("stop", ["\ud800"]),
])
def test_a_kserve_value_that_no_native_field_holds_is_invalid_argument(field, value):
    with pytest.raises(InvalidArgument, match=f"{field} .* does not fit its field"):
        generate_request("m", inputs(**{field: value}))


def test_the_judge_remembers_each_answer_for_a_second_and_asks_again_after():
    asked: list[str | None] = []
    now = [0.0]

    async def ask(key: str | None) -> None:
        asked.append(key)
        if key != "good":
            raise Unauthenticated("no")

    judge = CoordinatorJudge(ask, clock=lambda: now[0])

    async def run() -> list[bool]:
        out = [await judge.admits(k) for k in ("good", "bad", None, "good", "bad", None)]
        now[0] += REMEMBER_S
        out.append(await judge.admits("good"))
        return out

    assert asyncio.run(run()) == [True, False, False, True, False, False, True]
    assert asked == ["good", "bad", None, "good"]  # a flood of one key (or of none) is one call a second


def test_the_judge_lets_the_call_speak_when_the_coordinator_cannot_answer_for_the_key():
    async def down(key: str | None) -> None:
        raise Unavailable("coordinator down")

    async def tls(key: str | None) -> None:
        raise Unauthenticated("TLS handshake failed with the coordinator")

    assert asyncio.run(CoordinatorJudge(down).admits("k")) is True
    assert asyncio.run(CoordinatorJudge(tls).admits("k")) is True


@pytest.mark.parametrize("header", [b"Basic abc", b"Token x", b"Bearer two words", b"Bearer " + b"k" * 5000])
def test_a_malformed_authorization_header_is_401_without_the_key(header):
    with pytest.raises(ApiError) as err:
        bearer_key([(b"authorization", header)])
    assert err.value.status == 401 and "words" not in err.value.message
    assert bearer_key([]) is None and bearer_key([(b"authorization", b"bearer sl_x")]) == "sl_x"
    # the README's curl with SHARDLINE_API_KEY unset sends `Bearer `: no key, which a keyless cluster takes
    assert bearer_key([(b"authorization", b"Bearer ")]) is None and bearer_key([(b"authorization", b"Bearer")]) is None


def test_local_workers_share_the_machines_memory():
    from coordinator.cli.launcher import shared_memory_mb

    assert shared_memory_mb(3, available_bytes=30 * 2**30) == int(30 * 2**30 * 0.8) // 3 // 2**20
    assert shared_memory_mb(4, available_bytes=30 * 2**30) * 4 <= 0.8 * 30 * 1024


def test_an_error_keeps_its_field_indexes_and_loses_its_addresses():
    from coordinator.api.openai_errors import redacted

    said = "prompt_token_ids[3] is 9; ipv4:10.0.0.1:5 , 127.0.0.1:8 and [::1]:50051 and [fe80::1] failed"
    assert redacted(said) == "prompt_token_ids[3] is 9; <address> , <address> and <address> and <address> failed"


def test_health_probes_ask_the_coordinator_at_most_once_a_second():
    """However many keyless /health or /ping probes come, the gateway asks the coordinator once a second (a
    fake client stands in for the coordinator's health service; what is under test is the gateway's route)."""
    import asyncio
    import json as jsonlib

    from grpc_health.v1.health_pb2 import HealthCheckResponse

    from coordinator.api.http_gateway import GatewaySettings, Routes

    asked = []

    class Health:
        async def Check(self, request, timeout):  # noqa: N802 - the stub's name
            asked.append(request.service)
            await asyncio.sleep(0.01)
            return HealthCheckResponse(status=HealthCheckResponse.SERVING)

    class Fake:
        health = Health()

    async def probes():
        routes = Routes(Fake(), GatewaySettings("127.0.0.1:1", port=0))  # type: ignore[arg-type]
        first = await asyncio.gather(*(routes.health(None) for _ in range(30)))
        await asyncio.sleep(1.05)
        later = await routes.health(None)
        return first, later

    first, later = asyncio.run(probes())
    assert all(r.status_code == 200 and jsonlib.loads(r.body) == {"status": "ok"} for r in [*first, later])
    assert len(asked) == 2  # 30 probes at once: one question; a second later: one more
