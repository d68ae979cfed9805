"""Storage credentials stay in memory: never in a written config, a log line or a Ray
task's arguments.

`storage.access_key_id / secret_access_key / session_token` may be set in a config (a
preset or `key=value` overrides), but only the process that parsed it uses them directly.
Everything else gets them the way the AWS SDK expects:

- **Written or logged configs** go through `redacted(cfg)`: the three keys become empty,
  which reads back as "from the environment" (`config_to_yaml`, so every `config.yaml` of
  a run, checkpoint, bias, evaluation or index, uses it).
- **Configs handed to Ray** lose them on the way: a `StorageConfig` pickles without them
  (`StorageConfig.__reduce__`), so a task's or actor's arguments, a Ray Train loop config
  or a pickled S3 filesystem never carry them, and the dicts that cross as
  `config_to_dict(cfg)` are redacted.
- **Workers** resolve credentials with the AWS SDK's default chain, where they run:
  environment variables, then the web identity token file, then the instance profile.
  `export_storage_credentials(cfg)` puts the config's keys into this process's environment
  (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`) before it starts an
  embedded local Ray: Ray starts the GCS and raylet with a copy of the starting process's
  environment, and the raylet starts every worker with its own, so all of them inherit it.

Joining a running cluster (`ray.address`, `RAY_ADDRESS`, `ray job submit`) is different: a
worker inherits the environment of the `ray start` that launched its node, never the
driver's. Ray could carry the keys in `runtime_env={"env_vars": ...}`, but a runtime env is
stored with the job in the GCS and shown by the dashboard and `ray job` commands, so this
project does not put credentials there. On a cluster the nodes bring their own: an EC2
instance profile (`IamInstanceProfile` in cluster.yaml), web identity on Kubernetes
(IRSA / EKS Pod Identity on the pods' service account), or `AWS_*` variables in the
nodes' environment (e.g. from a Kubernetes secret). Config keys then reach the driver only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import MutableMapping

from gpa_ray.config import STORAGE_SECRET_FIELDS, Config, StorageConfig

logger = logging.getLogger(__name__)

AWS_ENV = {
    "access_key_id": "AWS_ACCESS_KEY_ID",
    "secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "session_token": "AWS_SESSION_TOKEN",
}
"""The AWS SDK's environment variable for each credential field of `StorageConfig`."""


def redacted_storage(storage: StorageConfig) -> StorageConfig:
    """`storage` without credentials (endpoint, region and retries kept)."""
    return dataclasses.replace(storage, **dict.fromkeys(STORAGE_SECRET_FIELDS, ""))


def redacted(cfg: Config) -> Config:
    """`cfg` without storage credentials: what may be written, logged or sent to Ray."""
    return dataclasses.replace(cfg, storage=redacted_storage(cfg.storage))


def secret_values(storage: StorageConfig) -> list[str]:
    """The non-empty credential strings of `storage` (what must never appear anywhere)."""
    return [value for name in STORAGE_SECRET_FIELDS if (value := getattr(storage, name))]


def export_storage_credentials(
    cfg: Config | StorageConfig, environ: MutableMapping[str, str] | None = None
) -> list[str]:
    """Put the config's storage credentials into `environ` (default: this process's
    environment) as the AWS SDK's variables, so the Ray this process starts and all its
    workers inherit them; returns the names set.

    A config without an access key leaves the environment alone (the SDK's chain applies
    unchanged). One with a key pair but no session token removes `AWS_SESSION_TOKEN`, which
    would otherwise pair an unrelated token with these keys.
    """
    storage = cfg.storage if isinstance(cfg, Config) else cfg
    target = os.environ if environ is None else environ
    if storage.anonymous or not storage.access_key_id:
        return []
    if not storage.secret_access_key:
        raise ValueError("storage.access_key_id is set but storage.secret_access_key is empty")
    names = []
    for name, variable in AWS_ENV.items():
        value = getattr(storage, name)
        if value:
            target[variable] = value
            names.append(variable)
        else:
            target.pop(variable, None)
    return names


def warn_if_workers_lack_credentials(cfg: Config, address: str) -> None:
    """Log (without values) that config credentials reach only this driver when it joins
    a running cluster, whose workers resolve their own."""
    if address != "local" and secret_values(cfg.storage):
        logger.warning(
            "storage credentials from the config are used by this driver only: workers of "
            "the cluster at %s resolve their own (instance profile, web identity or AWS_* "
            "variables of the nodes)",
            address,
        )
