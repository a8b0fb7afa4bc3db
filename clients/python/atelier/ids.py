"""What the SDK accepts where the API wants an id or a reference, and the error otherwise.

A new user passes back what the SDK gave them: `client.train(..., dataset=client.upload_dataset(paths))`.
Every parameter that names a dataset, a job or an adapter takes the id/ref string or the
object the SDK returns for it (Dataset, TrainingJob or JobHandle, AdapterVersion or Adapter);
anything else is a TypeError naming the parameter and the expected types, raised before a
request is built (protobuf's own "bad argument type for built-in operation" names neither).
"""

from __future__ import annotations

from atelier_api.v1 import common_pb2, training_pb2


def _refuse(param: str, expected: str, value: object) -> TypeError:
    return TypeError(f"{param} must be {expected}, got {type(value).__name__} {value!r:.80}")


def text(value: object, param: str) -> str:
    """A plain string parameter (a base model name, an adapter output name, ...)."""
    if isinstance(value, str):
        return value
    raise _refuse(param, "a str", value)


def dataset_id(value: object, param: str = "dataset") -> str:
    """A dataset id string or the Dataset returned by `upload_dataset`."""
    if isinstance(value, str):
        return value
    if isinstance(value, common_pb2.Dataset):
        return value.id
    raise _refuse(param, "a dataset id (str) or an atelier Dataset (as returned by upload_dataset)", value)


def job_id(value: object, param: str = "job_id") -> str:
    """A job id string, a TrainingJob, or the JobHandle returned by `train` / `jobs.get`."""
    if isinstance(value, str):
        return value
    if isinstance(value, training_pb2.TrainingJob):
        return value.id
    job = getattr(value, "job", None)
    if isinstance(job, training_pb2.TrainingJob):  # JobHandle (sync SDK), without importing it here
        return job.id
    raise _refuse(param, "a job id (str), a TrainingJob or a JobHandle", value)


def adapter_ref(value: object, param: str = "ref") -> str:
    """An adapter ref string (`name`, `name@3`, `name:alias`), an AdapterVersion (that exact
    version) or an Adapter (its latest version)."""
    if isinstance(value, str):
        return value
    if isinstance(value, common_pb2.AdapterVersion):
        return f"{value.name}@{value.version}"
    if isinstance(value, common_pb2.Adapter):
        return value.name
    raise _refuse(param, "an adapter ref (str, e.g. 'cat@3'), an AdapterVersion or an Adapter", value)


def adapter_name(value: object, param: str = "name") -> str:
    """An adapter name string, or the name of an AdapterVersion / Adapter."""
    if isinstance(value, str):
        return value
    if isinstance(value, common_pb2.AdapterVersion | common_pb2.Adapter):
        return value.name
    raise _refuse(param, "an adapter name (str), an AdapterVersion or an Adapter", value)


def adapter_version(name: object, version: object, param: str = "version") -> int:
    """An explicit version number, else the version of an AdapterVersion passed as the name."""
    if version is None:
        if isinstance(name, common_pb2.AdapterVersion):
            return int(name.version)
        raise _refuse(param, "an int (required unless name is an AdapterVersion)", version)
    if isinstance(version, int) and not isinstance(version, bool):
        return version
    raise _refuse(param, "an int", version)
