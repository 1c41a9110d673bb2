"""Deployments: what the coordinator serves. A deployment is one version of a model (a model in the store)
with a number of pipeline replicas, each a chain of `workers` stages; several versions of one name may be
deployed, and one of them is the name's default. Requests name `name` (the default version) or
`name@version`."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from shardline.errors import InvalidArgument, NotFound

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


def resolve(requested: str, versions: dict[str, list[str]], defaults: dict[str, str], fallback: str) -> str:
    """The deployment key a request means; NotFound lists what exists. An empty name is `fallback`'s."""
    name, version = split_name(requested or fallback)
    if name not in versions:
        listing = ", ".join(f"{n} (versions {', '.join(v)})" for n, v in sorted(versions.items())) or "none"
        raise NotFound(f"model {name!r} is not served here; served: {listing}")
    if not version:
        return f"{name}@{defaults[name]}"
    if version not in versions[name]:
        raise NotFound(f"model {name!r} has no version {version!r}; its versions: {', '.join(versions[name])} "
                       f"(default {defaults[name]})")
    return f"{name}@{version}"


def check_replicas(replicas: int, pool: int, stages: int, key: str) -> None:
    """A replica count an operator asks for: 0 up to what the pool could hold."""
    if replicas < 0:
        raise InvalidArgument(f"replicas must be >= 0, got {replicas}")
    most = pool // max(1, stages)
    if replicas > most:
        raise InvalidArgument(f"{key}: {replicas} replicas of {stages} workers need {replicas * stages} workers; "
                              f"the pool has {pool} (at most {most} replicas)")
