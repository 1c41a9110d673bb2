"""The coordinator's configuration: one typed object, built by the CLI (nothing reads the environment at
import time), and what it deploys.

A deployment is one version of a model (a model in the store) with a number of pipeline replicas, each a chain
of `workers` stages; several versions of one name may be deployed, and one of them is the name's default.
Requests name `name` (the default version) or `name@version`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit

from pydantic import BaseModel, Field, ValidationError, model_validator

from coordinator.store.models import default_store
from shardline.limits import DEFAULT_MAX_REQUEST_BYTES, MAX_MESSAGE_BYTES
from shardline.wire_dtype import WIRE_DTYPES

T = TypeVar("T")

DEFAULT_VERSION = "1"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class DeploymentSpec(BaseModel):
    """One entry of `[[deployments]]` in the coordinator's TOML config."""

    model_config = {"extra": "forbid"}

    name: str = Field(pattern=NAME_PATTERN, description="the name requests use")
    version: str = Field(DEFAULT_VERSION, pattern=NAME_PATTERN)
    source: str = Field("", description="the model in the store (default: the name)")
    replicas: int = Field(1, ge=0, description="pipeline replicas, each a chain of `workers` stages")
    workers: int = Field(0, ge=0, description="stages of one replica (0 = the config's `workers`)")
    default: bool = Field(False, description="the version `name` means (default: the first listed)")
    # autoscaling, off unless max_replicas is set
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(0, ge=0, description="> 0 turns autoscaling on, between min and max replicas")
    target_queue: float = Field(4.0, gt=0, description="autoscaling: streams waiting per replica that, held "
                                "for `scale_up_after_s`, add a replica")
    scale_up_after_s: float = Field(5.0, ge=0)
    scale_down_after_s: float = Field(30.0, ge=0, description="a replica idle this long is removed (above "
                                      "min_replicas), drained first")

    @model_validator(mode="after")
    def _bounds(self) -> DeploymentSpec:
        if self.max_replicas and self.min_replicas < 1:
            raise ValueError(f"deployment {self.key}: autoscaling needs min_replicas >= 1 (a deployment at 0 "
                             "replicas gets no requests to scale up on)")
        if self.max_replicas and not self.min_replicas <= self.replicas <= self.max_replicas:
            raise ValueError(f"deployment {self.key}: replicas {self.replicas} is outside min_replicas "
                             f"{self.min_replicas} .. max_replicas {self.max_replicas}")
        return self

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def model(self) -> str:
        """The model's name in the store."""
        return self.source or self.name

    @property
    def autoscaled(self) -> bool:
        return self.max_replicas > 0


def split_name(requested: str) -> tuple[str, str]:
    """`name` or `name@version` -> (name, version or "")."""
    name, _, version = requested.partition("@")
    return name, version


def check_unique(specs: list[DeploymentSpec]) -> None:
    keys = [s.key for s in specs]
    doubles = sorted({k for k in keys if keys.count(k) > 1})
    if doubles:
        raise ValueError(f"deployments listed twice: {', '.join(doubles)}")
    for name in {s.name for s in specs}:
        defaults = [s.key for s in specs if s.name == name and s.default]
        if len(defaults) > 1:
            raise ValueError(f"model {name!r} has more than one default version: {', '.join(defaults)}")


def defaults_of(specs: list[DeploymentSpec]) -> dict[str, str]:
    """name -> its default version: the one marked default, else the first listed."""
    out = {s.name: s.version for s in specs if s.default}
    for spec in specs:
        out.setdefault(spec.name, spec.version)
    return out


def database_name(url: str) -> str:
    """The PostgreSQL database a URL names, as messages and other coordinators see it: never its password. Its
    hosts as given (libpq takes several: `postgresql://u@h1:5432,h2:5432/db`)."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    hosts = hosts or parse_qs(parts.query).get("host", ["localhost"])[0]
    return f"postgresql://{user + '@' if user else ''}{hosts}{parts.path or '/'}"


def check_database_url(url: str) -> str:
    """The URL, or ValueError saying what is wrong with it (libpq's own parser, where psycopg is installed)."""
    scheme = urlsplit(url).scheme
    if scheme not in ("postgresql", "postgres"):
        raise ValueError(f"jobs_db must be a postgresql:// URL, not one of scheme {scheme[:20]!r}")
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:  # the server checks it when it connects (and says psycopg is missing)
        return url
    try:
        conninfo_to_dict(url)
    except Exception as exc:  # noqa: BLE001 - libpq's reason, said
        raise ValueError(f"jobs_db {database_name(url)}: {exc}") from None
    return url


def parse_endpoints(urls: list[str]) -> list[str]:
    """`http://HOST:PORT` (or HOST:PORT) of each etcd member, comma-separated or repeated, as HOST:PORT targets;
    ValueError naming a URL that is not one (https needs certificates this release does not take yet)."""
    out: list[str] = []
    for url in (u.strip() for given in urls for u in given.split(",")):
        if not url:
            continue
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/") or parts.query:
            raise ValueError(f"etcd endpoint {url!r}: give http://HOST:PORT (etcd's client URL)")
        try:
            port = parts.port or 2379
        except ValueError:
            raise ValueError(f"etcd endpoint {url!r}: the port is not a number from 1 to 65535") from None
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        out.append(f"{host}:{port}")
    if not out:
        raise ValueError("--etcd needs at least one endpoint (http://HOST:2379)")
    return out



class CoordinatorConfig(BaseModel):
    """Every field can come from a TOML file (`coordinator serve --config FILE`) or from flags."""

    model_config = {"extra": "forbid"}

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    store: Path = Field(default_factory=default_store)
    model: str = Field("smollm2", description="the model served when `deployments` is empty (one replica)")
    workers: int = Field(3, ge=1, description="stages of one replica (a deployment's default)")
    deployments: list[DeploymentSpec] = Field(default_factory=list, description="what the coordinator serves "
                                              "([[deployments]]: name, version, source, replicas, workers, ...)")
    unload_grace_s: float = Field(30, ge=0, description="unloading or scaling down waits this long for the "
                                  "streams in flight; the rest move to another replica by replay, or fail")
    advertise: str = Field("", description="host workers reach this machine on (default: host)")
    parameters_address: str = Field("", description="host:port of a parameter service; empty = in-process")
    parameters_port: int = Field(0, ge=0, le=65535, description="port of the in-process parameter service")
    dtype: str = Field("float32", pattern="^(float32|float16|bfloat16)$")
    # compressed activations and weights (README "Compressed activations and weights")
    wire_dtype: str = Field("", pattern="^(|float32|float16|bfloat16|int8)$", description="the dtype hidden "
                            "states travel between stages in (int8: with a scale per row); empty = `dtype`")
    link_wire_dtypes: dict[int, str] = Field(default_factory=dict, description="per link (link i: stage i -> "
                                             "stage i + 1), overriding wire_dtype, e.g. {1 = \"bfloat16\"}")
    quantize: str = Field("", pattern="^(|int8)$", description="weight-only quantization of the layers' linear "
                          "weights at load: int8 (a scale per output channel); empty = none")
    max_tokens_limit: int = Field(2048, ge=1)
    default_max_tokens: int = Field(256, ge=1)
    max_active_streams: int = Field(64, ge=1, description="streams batched together at most")
    max_queued_streams: int = Field(256, ge=0, description="streams waiting to join; more are refused")
    prefill_chunk_tokens: int = Field(256, ge=1, description="prompt tokens fed per step")
    micro_batch_groups: int = Field(0, ge=0, description="micro-batch groups in flight; 0 = one per stage")
    # bounded input: every request field that can grow has a limit, checked before any worker is involved
    max_request_bytes: int = Field(DEFAULT_MAX_REQUEST_BYTES, ge=64 * 1024, le=MAX_MESSAGE_BYTES,
                                   description="the largest message the public port receives (larger: "
                                   "RESOURCE_EXHAUSTED); internal links keep their own, larger limit")
    max_prompt_bytes: int = Field(256 * 1024, ge=1, description="UTF-8 bytes of a prompt, or of all chat messages' "
                                  "contents together")
    max_prompt_tokens: int = Field(32_768, ge=1, description="tokens of a prompt (after the chat template); the "
                                   "model's context bounds it too")
    max_chat_messages: int = Field(256, ge=1, description="messages of one chat request")
    max_stop_sequences: int = Field(16, ge=0, description="stop sequences of one request")
    max_stop_bytes: int = Field(256, ge=1, description="UTF-8 bytes of one stop sequence")
    max_logprobs: int = Field(20, ge=0, le=1000, description="likeliest tokens a request may ask for at each "
                              "position (logprobs, prompt_logprobs)")
    max_logit_bias: int = Field(1024, ge=0, description="entries of one request's logit_bias")
    max_choices: int = Field(16, ge=1, le=256, description="choices one request may ask for (n)")
    max_grammar_bytes: int = Field(64 * 1024, ge=1, description="UTF-8 bytes of one request's json_schema, "
                                   "regex or grammar (structured output)")
    max_infer_batch: int = Field(1024, ge=1, description="inputs one Infer may carry")
    max_infer_tokens: int = Field(262_144, ge=1, description="tokens of one Infer, all its inputs together")
    infer_micro_batch: int = Field(32, ge=1, description="inputs per micro-batch of an Infer")
    heartbeat_interval_ms: int = Field(2000, ge=100)
    adoption_wait_s: float = Field(5.0, ge=0, description="after a start, a replica some of whose layers a "
                                   "registered worker holds already waits this long for the rest of their holders "
                                   "(it adopts them, loading nothing) before it is placed elsewhere")
    heartbeat_timeout_ms: int = Field(10000, ge=500)
    step_timeout_ms: int = Field(60_000, ge=100, description="a step not answered within this heals the chain")
    fair_share: bool = Field(True, description="API keys take turns in each replica's queue and steps, by tokens "
                             "(false: first come, first served)")
    token_wait_s: float = Field(900, gt=0, description="a stream that gets no token for this long (a step, a heal "
                                "or a queue that never moves) fails with UNAVAILABLE; a job's queued item waits on")
    keepalive_time_ms: int = Field(20_000, ge=1000, description="ping idle connections this often")
    keepalive_timeout_ms: int = Field(10_000, ge=100, description="a ping unanswered this long closes the link")
    probe_timeout_ms: int = Field(2000, ge=100, description="a worker that does not answer a probe within this "
                                  "is taken for dead during recovery")
    load_timeout_s: float = Field(600, gt=0, description="deadline of one LoadShard")
    # planning for mixed machines (README "Planning for mixed machines"): workers are calibrated on the planned
    # step (one layer of the model, `calibration_sequences` x `calibration_tokens` over
    # `calibration_context_tokens` cached positions) before a replica is planned on them
    calibrate: bool = Field(False, description="plan by measured time (compute + hop) once the chosen workers are "
                            "calibrated; off: balance weight bytes only (README \"Planning for mixed machines\")")
    calibration_sequences: int = Field(16, ge=1, le=1024, description="sequences of the calibrated step")
    calibration_tokens: int = Field(1, ge=1, le=4096, description="tokens of each sequence in the calibrated "
                                    "step (1 = a decode step)")
    calibration_context_tokens: int = Field(256, ge=0, le=131_072, description="positions already cached per "
                                            "sequence in the calibrated step")
    calibration_max_ms: int = Field(10_000, ge=100, le=60_000, description="bound on one worker's calibration")
    calibration_tolerance: float = Field(0.1, ge=0, description="the byte-balanced split is kept where its "
                                         "predicted step time is within this share of the best (noise)")
    calibration_min_gain_ms: float = Field(2.0, ge=0, description="... or within this many milliseconds of it")
    rebalance_on_join: bool = Field(False, description="fold a joining spare into a chain narrower than `workers`")
    drain_seconds: float = Field(30, ge=0, description="on SIGTERM, how long streams in flight may finish")
    max_step_tokens: int = Field(2048, ge=1, le=65_536, description="token rows of one step (all its sequences); "
                                 "each stage measures its activation headroom with a step this large")
    kv_block_tokens: int = Field(16, ge=1, le=4096, description="KV memory is allocated and admitted in blocks of "
                                 "this many positions")
    prefix_cache: bool = Field(True, description="prompts that share a prefix reuse its KV blocks on every stage "
                               "instead of computing them again (README \"Prefix cache\"); kept in free KV blocks")
    cache_scope: str = Field("key", pattern="^(key|shared)$", description="key: the result cache and the prefix "
                             "cache are kept apart per API key (a caller cannot learn from `cached` or from time "
                             "to first token what another key sent); shared: one for every caller "
                             "(a single-tenant cluster)")
    kv_reserve_tokens: int = Field(16, ge=0, description="a stream is admitted when every stage has room for its "
                                   "prompt plus this many positions")
    session_ttl_s: float = Field(600, gt=0, description="a session with no step for this long is freed on every "
                                 "stage (a stream abandoned without EndSession)")
    # jobs and the result cache (README "Jobs and the result cache")
    jobs_dir: Path | None = Field(None, description="where the jobs database lives (jobs.sqlite3); default: the "
                                  "store directory. One coordinator per directory")
    jobs_db: str | None = Field(None, description="a PostgreSQL URL (postgresql://USER@HOST:5432/DB) for jobs that "
                                "every coordinator of a cluster shares (standby coordinators): a new leader goes on "
                                "with them. Give the password in PGPASSWORD or ~/.pgpass, not the URL. Default: "
                                "SQLite in jobs_dir")
    durable_fleet: bool = Field(True, description="commit every run-time change (load, unload, scale, promote) "
                                "to fleet-<digest of the configured deployments>.sqlite in jobs_dir (or the store) "
                                "before acknowledging it, and replay them at start")
    # standby coordinators (README "Standby coordinators"): leader election on etcd
    etcd: list[str] = Field(default_factory=list, max_length=16, description="etcd client URLs "
                            "(http://HOST:2379): coordinators given the same etcd and etcd_prefix elect one "
                            "leader; the others stand by. Empty: one coordinator, no election")
    etcd_prefix: str = Field("/shardline/default", pattern=r"^/[A-Za-z0-9._/-]{1,200}$", description="the "
                             "cluster's keys in etcd (one prefix per cluster)")
    etcd_lease_s: int = Field(3, ge=1, le=60, description="the leader's lease: a standby takes over at most this "
                              "long after the leader stops renewing it (died, paused, cut off)")
    job_concurrency: int = Field(64, ge=1, description="job items in flight at once (they run as background "
                                 "streams, after interactive ones)")
    job_step_share: float = Field(0.5, ge=0, description="while interactive streams run, a step carries at most "
                                  "this many job tokens per interactive token (0.5: interactive requests are slowed "
                                  "by 1.5x at most; 0: jobs wait while anything interactive runs)")
    job_result_ttl_s: float = Field(7 * 86400, gt=0, description="a finished job's results are kept this long")
    max_job_items: int = Field(10_000, ge=1, description="items of one job")
    max_unfinished_jobs: int = Field(100, ge=1, description="jobs queued or running at once; more are refused")
    jobs_max_mb: float = Field(10_240, ge=0, description="results the job store keeps in all; past it new jobs are "
                               "refused until results expire (0 = no limit)")
    jobs_key_max_mb: float = Field(2_048, ge=0, description="results one API key's jobs keep; past it that key's new "
                                   "jobs are refused (0 = no limit)")
    result_cache_mb: float = Field(0, ge=0, description="memory of the cache of deterministic results (greedy, or "
                                   "seeded by the caller); 0 = no cache (off unless asked for)")
    otlp_endpoint: str = Field("", max_length=1000, description="export a trace per request with OTLP/gRPC to "
                               "this collector (http://HOST:4317 without TLS); empty: "
                               "$OTEL_EXPORTER_OTLP_ENDPOINT, else no tracing (needs the 'tracing' extra)")
    log_prompts: bool = Field(False, description="the request log (logger shardline.requests) also writes each "
                              "request's prompt (or texts); off: token counts and timings only")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="serve Prometheus metrics at "
                                     "http://host:PORT/metrics (0 = a free port); none = no metrics endpoint")
    # security (README "Security"): TLS and the cluster's identity, API keys for the public API
    certs_dir: Path | None = Field(None, description="TLS on every link with the certificates of this directory "
                                   "(`coordinator certs`): ca.crt, node.crt, node.key")
    client_certs: str = Field("optional", pattern="^(optional|required)$", description="with certs_dir: "
                              "'required': public API clients must present a certificate from the cluster CA, whose "
                              "role is its entry in api_keys; 'optional': the public port does not ask for one "
                              "(clients authenticate by key, or by a certificate the keys file names)")
    cluster_port: int = Field(50053, ge=0, le=65535, description="with certs_dir: the port workers register on "
                              "(mutual TLS only; the public port takes clients without certificates)")
    cluster_token_file: Path | None = Field(None, description="without TLS: a file holding the token every "
                                            "process of the cluster sends on internal RPCs")
    api_keys: Path | None = Field(None, description="a JSON file of hashed API keys with roles "
                                  "(`coordinator api-keys create`); without it the public API takes any caller")
    insecure: bool = Field(False, description="serve on a non-loopback address without TLS or authentication")
    # the OpenAI-compatible HTTP gateway (README "OpenAI-compatible HTTP API"): started beside the coordinator by
    # `coordinator serve` / `launch` on `host`, a client of its gRPC port like any other
    http: bool = Field(True, description="serve the OpenAI-compatible HTTP API on http_port (CLI: --no-http)")
    http_port: int = Field(8000, ge=0, le=65535, description="the HTTP API's port (0 = a free one)")
    max_http_body_bytes: int = Field(4 * 2**20, ge=1024, le=MAX_MESSAGE_BYTES, description="the largest HTTP "
                                     "request body the gateway reads (larger: 413)")


    @model_validator(mode="after")
    def _security_fits(self) -> CoordinatorConfig:
        if self.etcd:
            parse_endpoints(self.etcd)  # ValueError naming a URL that is not one
        if self.jobs_db is not None:
            check_database_url(self.jobs_db)
        if self.client_certs == "required" and self.certs_dir is None:
            raise ValueError("client_certs 'required' needs certs_dir (TLS): without TLS there is no certificate")
        if self.client_certs == "required" and self.api_keys is None:
            raise ValueError("client_certs 'required' needs api_keys: a certificate's role comes from its entry in "
                             'the API keys file ({"name": ..., "role": ..., "certificate": COMMON_NAME}); a '
                             "certificate the file does not name has no access")
        if self.certs_dir is not None and self.cluster_token_file is not None:
            raise ValueError("give certs_dir (TLS) or cluster_token_file (plaintext), not both")
        check_unique(self.deployments)
        for link, name in self.link_wire_dtypes.items():
            if link < 0 or name not in WIRE_DTYPES:
                raise ValueError(f"link_wire_dtypes: link {link} -> {name!r}: links are >= 0 and dtypes one of "
                                 f"{', '.join(WIRE_DTYPES)}")
        return self

    def initial_deployments(self) -> list[DeploymentSpec]:
        """What to deploy at start: the listed deployments, or `model` on `workers` stages; each with its
        stage count filled in."""
        specs = self.deployments or [DeploymentSpec.model_validate({"name": self.model})]
        return [s.model_copy(update={"workers": s.workers or self.workers}) for s in specs]


def load_config(path: Path, **overrides: object) -> CoordinatorConfig:
    """A config from a TOML file; `overrides` (flags given on the command line) win."""
    import tomllib

    try:
        fields = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return checked(lambda: CoordinatorConfig(**{**fields, **overrides}), f"{path}: ")


def checked(make: Callable[[], T], where: str = "") -> T:
    """`make()`, with pydantic's multi-line report of what is wrong said as one ValueError line per setting."""
    try:
        return make()
    except ValidationError as exc:
        said = [f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg'].removeprefix('Value error, ')}"
                for e in exc.errors()]
        raise ValueError(where + "; ".join(said)) from None
