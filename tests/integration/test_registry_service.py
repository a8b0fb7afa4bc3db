"""RegistryService over real gRPC (auth on, two tenants) with the registry on a real S3 server."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from atelier_api.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from services.common.config import Settings
from services.registry.registry import Registry
from services.registry.servicer import registry_bindings
from services.registry.store import REGISTRY_UNAVAILABLE, open_store
from tests.fixtures.grpc_servers import ServerThread, bearer, loopback_settings
from tests.fixtures.s3 import MotoServer, make_s3_settings, write_fake_pipeline, write_lora

A, B, ADMIN = bearer("key-a"), bearer("key-b"), bearer("key-ops")
LORA = common_pb2.ADAPTER_KIND_LORA


@pytest.fixture
def registry(s3_settings: Settings) -> Registry:
    return Registry(open_store(s3_settings))


@pytest.fixture
def stub(registry: Registry, tmp_path: Path, grpc_server: Callable[..., ServerThread]
         ) -> registry_pb2_grpc.RegistryServiceStub:
    registry.base_models.import_folder("tiny", write_fake_pipeline(tmp_path / "pipe"))
    settings = loopback_settings(auth_enabled=True, api_keys="key-a=tenant-a,key-b=tenant-b,key-ops=ops",
                                 admin_tenants="ops")
    server = grpc_server(settings, lambda: registry_bindings(registry, work_dir=tmp_path / "work"))
    return registry_pb2_grpc.RegistryServiceStub(server.channel())


def import_requests(path: Path, name: str = "cat", chunk: int = 700, **header: object
                    ) -> Iterator[registry_pb2.ImportAdapterRequest]:
    data = path.read_bytes()
    fields: dict[str, object] = {"name": name, "base_model": "tiny", "filename": path.name, "size": len(data)}
    fields.update(header)
    yield registry_pb2.ImportAdapterRequest(header=registry_pb2.ImportAdapterHeader(**fields))  # type: ignore[arg-type]
    for i in range(0, len(data), chunk):
        yield registry_pb2.ImportAdapterRequest(chunk=data[i : i + chunk])


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def field_violations(err: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    out: list[str] = []
    for detail in status.details if status else []:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            out += [v.field for v in bad.field_violations]
    return out


def ref(name: str, version: int | None = None, alias: str | None = None) -> common_pb2.AdapterRef:
    if version is not None:
        return common_pb2.AdapterRef(name=name, version=version)
    return common_pb2.AdapterRef(name=name, alias=alias) if alias else common_pb2.AdapterRef(name=name)


def test_import_get_list_versions_alias_export(stub: registry_pb2_grpc.RegistryServiceStub, tmp_path: Path) -> None:
    files = [write_lora(tmp_path / f"l{i}.safetensors", seed=i) for i in range(3)]
    for i, f in enumerate(files):
        got = stub.ImportAdapter(import_requests(f, description=f"v{i}"), metadata=A).version
        assert (got.version, got.tenant, got.kind, got.source_format) == (i + 1, "tenant-a", LORA, "diffusers")
    latest = stub.GetAdapter(registry_pb2.GetAdapterRequest(ref=ref("cat")), metadata=A)
    assert latest.version.version == 3 and latest.adapter.latest_version == 3 and latest.version.manifest_digest
    assert latest.version.files[0].sha256 == hashlib.sha256(files[2].read_bytes()).hexdigest()
    resp = stub.SetAlias(registry_pb2.SetAliasRequest(name="cat", alias="prod", version=2, expected_version=0),
                         metadata=A)
    assert not resp.HasField("previous_version")
    resp = stub.SetAlias(registry_pb2.SetAliasRequest(name="cat", alias="prod", version=1), metadata=A)
    assert resp.previous_version == 2
    by_alias = stub.GetAdapter(registry_pb2.GetAdapterRequest(ref=ref("cat", alias="prod")), metadata=A)
    assert by_alias.version.description == "v0" and dict(by_alias.adapter.aliases) == {"prod": 1}
    page = stub.ListAdapterVersions(registry_pb2.ListAdapterVersionsRequest(name="cat", page_size=2), metadata=A)
    rest = stub.ListAdapterVersions(registry_pb2.ListAdapterVersionsRequest(
        name="cat", page_size=2, page_token=page.next_page_token), metadata=A)
    assert [v.version for v in page.versions] + [v.version for v in rest.versions] == [1, 2, 3]
    assert rest.next_page_token == ""

    stream = list(stub.ExportAdapter(registry_pb2.ExportAdapterRequest(ref=ref("cat", version=2)), metadata=A))
    header, body = stream[0].header, b"".join(m.chunk for m in stream[1:])
    assert body == files[1].read_bytes() and header.sha256 == hashlib.sha256(body).hexdigest()
    assert header.filename == "pytorch_lora_weights.safetensors" and header.version.version == 2

    stub.DeleteAlias(registry_pb2.DeleteAliasRequest(name="cat", alias="prod"), metadata=A)
    stub.DeleteAdapterVersion(registry_pb2.DeleteAdapterVersionRequest(name="cat", version=1), metadata=A)
    err = rpc_error(lambda: stub.GetAdapter(registry_pb2.GetAdapterRequest(ref=ref("cat", 1)), metadata=A))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_tenants_cannot_see_each_other(stub: registry_pb2_grpc.RegistryServiceStub, tmp_path: Path) -> None:
    stub.ImportAdapter(import_requests(write_lora(tmp_path / "l.safetensors"), name="secret"), metadata=A)
    stub.SetAlias(registry_pb2.SetAliasRequest(name="secret", alias="prod", version=1), metadata=A)
    assert list(stub.ListAdapters(registry_pb2.ListAdaptersRequest(), metadata=B).adapters) == []
    calls = [
        lambda: stub.GetAdapter(registry_pb2.GetAdapterRequest(ref=ref("secret")), metadata=B),
        lambda: stub.GetAdapter(registry_pb2.GetAdapterRequest(ref=ref("secret", alias="prod")), metadata=B),
        lambda: stub.ListAdapterVersions(registry_pb2.ListAdapterVersionsRequest(name="secret"), metadata=B),
        lambda: stub.SetAlias(registry_pb2.SetAliasRequest(name="secret", alias="mine", version=1), metadata=B),
        lambda: stub.DeleteAlias(registry_pb2.DeleteAliasRequest(name="secret", alias="prod"), metadata=B),
        lambda: stub.DeleteAdapterVersion(registry_pb2.DeleteAdapterVersionRequest(name="secret", version=1),
                                          metadata=B),
        lambda: list(stub.ExportAdapter(registry_pb2.ExportAdapterRequest(ref=ref("secret")), metadata=B)),
    ]
    missing = rpc_error(lambda: stub.GetAdapter(registry_pb2.GetAdapterRequest(ref=ref("nothing")), metadata=B))
    for call in calls:
        err = rpc_error(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert "tenant-a" not in (err.details() or "")
    assert missing.details() == rpc_error(calls[0]).details().replace("secret", "nothing")  # type: ignore[union-attr]
    got = stub.GetAdapter(registry_pb2.GetAdapterRequest(ref=ref("secret", alias="prod")), metadata=A)
    assert got.version.version == 1 and list(got.adapter.aliases) == ["prod"]  # B changed nothing


def test_missing_key_is_unauthenticated(stub: registry_pb2_grpc.RegistryServiceStub) -> None:
    for md in [(), bearer("wrong")]:
        err = rpc_error(lambda md=md: stub.ListAdapters(registry_pb2.ListAdaptersRequest(), metadata=md))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("bad", ["../x", "a/b", "Upper", "", "x" * 200])
def test_bad_names_are_invalid_argument_naming_the_field(stub: registry_pb2_grpc.RegistryServiceStub,
                                                         tmp_path: Path, bad: str) -> None:
    lora = write_lora(tmp_path / "l.safetensors")
    checks = [
        (lambda: stub.ImportAdapter(import_requests(lora, name=bad), metadata=A), "name"),
        (lambda: stub.ImportAdapter(import_requests(lora, base_model=bad), metadata=A), "base_model"),
        (lambda: stub.ListAdapterVersions(registry_pb2.ListAdapterVersionsRequest(name=bad), metadata=A), "name"),
        (lambda: stub.SetAlias(registry_pb2.SetAliasRequest(name="cat", alias=bad, version=1), metadata=A), "alias"),
        (lambda: stub.GetBaseModel(registry_pb2.GetBaseModelRequest(name=bad), metadata=A), "name"),
    ]
    if bad:
        checks.append((lambda: stub.GetAdapter(registry_pb2.GetAdapterRequest(ref=ref(bad)), metadata=A), "name"))
    for call, field in checks:
        err = rpc_error(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in field_violations(err) or f"ref.{field}" in field_violations(err), field_violations(err)


def test_pickle_imports_are_invalid_argument(stub: registry_pb2_grpc.RegistryServiceStub, tmp_path: Path) -> None:
    pickled = tmp_path / "adapter.bin"
    pickled.write_bytes(b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94.")
    err = rpc_error(lambda: stub.ImportAdapter(import_requests(pickled), metadata=A))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "pickle" in (err.details() or "")
    disguised = tmp_path / "adapter.safetensors"
    disguised.write_bytes(pickled.read_bytes())
    err = rpc_error(lambda: stub.ImportAdapter(import_requests(disguised), metadata=A))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "pickle" in (err.details() or "")
    err = rpc_error(lambda: stub.ImportAdapter(import_requests(write_lora(tmp_path / "ok.safetensors"),
                                                               base_model="unknown"), metadata=A))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert list(stub.ListAdapters(registry_pb2.ListAdaptersRequest(), metadata=A).adapters) == []


def test_malformed_import_streams(stub: registry_pb2_grpc.RegistryServiceStub, tmp_path: Path) -> None:
    lora = write_lora(tmp_path / "l.safetensors")
    chunks_only = list(import_requests(lora))[1:]
    wrong_size = import_requests(lora, size=5)
    for requests, field in [(iter(chunks_only), "header"), (iter([]), "header"), (wrong_size, "header.size")]:
        err = rpc_error(lambda r=requests: stub.ImportAdapter(r, metadata=A))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and field in field_violations(err)


def test_corrupted_blob_is_data_loss_through_the_servicer(stub: registry_pb2_grpc.RegistryServiceStub,
                                                          registry: Registry, tmp_path: Path) -> None:
    version = stub.ImportAdapter(import_requests(write_lora(tmp_path / "l.safetensors")), metadata=A).version
    registry.store.put_bytes(registry.keys.blob(version.files[0].sha256), b"bit rot")
    stream = stub.ExportAdapter(registry_pb2.ExportAdapterRequest(ref=ref("cat")), metadata=A)
    received: list[registry_pb2.ExportAdapterResponse] = []
    err = rpc_error(lambda: received.extend(stream))
    assert err.code() == grpc.StatusCode.DATA_LOSS and received == []  # never a byte of the bad blob
    registry.store.put_bytes(registry.keys.version("tenant-a", "cat", 1), b"{not a manifest")
    err = rpc_error(lambda: stub.GetAdapter(registry_pb2.GetAdapterRequest(ref=ref("cat")), metadata=A))
    assert err.code() == grpc.StatusCode.DATA_LOSS


def test_alias_race_has_one_winner_and_a_clear_loser(stub: registry_pb2_grpc.RegistryServiceStub,
                                                     tmp_path: Path) -> None:
    for i in range(3):
        stub.ImportAdapter(import_requests(write_lora(tmp_path / f"l{i}.safetensors", seed=i)), metadata=A)
    stub.SetAlias(registry_pb2.SetAliasRequest(name="cat", alias="prod", version=1), metadata=A)
    barrier = threading.Barrier(2)
    outcomes: dict[int, object] = {}

    def writer(target: int) -> None:
        barrier.wait()
        try:
            outcomes[target] = stub.SetAlias(registry_pb2.SetAliasRequest(
                name="cat", alias="prod", version=target, expected_version=1), metadata=A)
        except grpc.RpcError as exc:
            outcomes[target] = exc

    threads = [threading.Thread(target=writer, args=(t,)) for t in (2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [o for o in outcomes.values() if isinstance(o, grpc.RpcError)]
    wins = [t for t, o in outcomes.items() if not isinstance(o, grpc.RpcError)]
    assert len(wins) == 1 and len(errors) == 1
    assert errors[0].code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "alias 'prod' of adapter 'cat' was not changed" in (errors[0].details() or "")
    now = stub.GetAdapter(registry_pb2.GetAdapterRequest(ref=ref("cat", alias="prod")), metadata=A)
    assert now.version.version == wins[0]


def test_list_adapters_pagination_and_filters(stub: registry_pb2_grpc.RegistryServiceStub, tmp_path: Path) -> None:
    lora = write_lora(tmp_path / "l.safetensors")
    names = [f"n{i}" for i in range(5)]
    for name in names:
        stub.ImportAdapter(import_requests(lora, name=name), metadata=A)
    seen, token = [], ""
    while True:
        page = stub.ListAdapters(registry_pb2.ListAdaptersRequest(page_size=2, page_token=token), metadata=A)
        assert len(page.adapters) <= 2
        seen += [a.name for a in page.adapters]
        token = page.next_page_token
        if not token:
            break
    assert seen == names
    ti = stub.ListAdapters(registry_pb2.ListAdaptersRequest(kind=common_pb2.ADAPTER_KIND_TEXTUAL_INVERSION),
                           metadata=A)
    assert list(ti.adapters) == []
    err = rpc_error(lambda: stub.ListAdapters(registry_pb2.ListAdaptersRequest(page_token="zzz"), metadata=A))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in field_violations(err)


def base_model_requests(folder: Path, name: str, extra: dict[str, bytes] | None = None
                        ) -> Iterator[registry_pb2.ImportBaseModelRequest]:
    yield registry_pb2.ImportBaseModelRequest(header=registry_pb2.ImportBaseModelHeader(name=name))
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    files.update(extra or {})
    for path, data in files.items():
        yield registry_pb2.ImportBaseModelRequest(file=registry_pb2.ImportBaseModelFile(path=path, size=len(data)))
        for i in range(0, len(data), 50):
            yield registry_pb2.ImportBaseModelRequest(chunk=data[i : i + 50])


def test_base_models_over_grpc(stub: registry_pb2_grpc.RegistryServiceStub, tmp_path: Path) -> None:
    folder = write_fake_pipeline(tmp_path / "sd", seed=3)
    made = stub.ImportBaseModel(base_model_requests(folder, "sd15"), metadata=ADMIN).base_model
    assert made.architecture == "stable-diffusion" and len(made.files) == 9 and made.version == 1
    got = stub.GetBaseModel(registry_pb2.GetBaseModelRequest(name="sd15"), metadata=A).base_model
    assert got.digest == made.digest  # base models are shared across tenants
    listed = stub.ListBaseModels(registry_pb2.ListBaseModelsRequest(), metadata=A).base_models
    assert sorted(m.name for m in listed) == ["sd15", "tiny"]
    again = stub.ImportBaseModel(base_model_requests(folder, "sd15"), metadata=ADMIN).base_model
    assert again == made  # the same bytes: the same version, not a new one
    for extra, field in [({"unet/model.bin": b"\x80\x04."}, "files"), ({"../escape.json": b"{}"}, "file.path")]:
        err = rpc_error(lambda e=extra: stub.ImportBaseModel(base_model_requests(folder, "evil", e), metadata=ADMIN))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and field in field_violations(err)
    err = rpc_error(lambda: stub.DeleteBaseModel(registry_pb2.DeleteBaseModelRequest(name="sd15"), metadata=A))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED  # tenants share base models but cannot change them
    stub.DeleteBaseModel(registry_pb2.DeleteBaseModelRequest(name="sd15"), metadata=ADMIN)
    err = rpc_error(lambda: stub.GetBaseModel(registry_pb2.GetBaseModelRequest(name="sd15"), metadata=A))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_store_down_is_unavailable(tmp_path: Path, grpc_server: Callable[..., ServerThread]) -> None:
    s3 = MotoServer()
    s3.start()
    try:
        _check_unavailable(s3, grpc_server)
    finally:
        s3.stop()


def _check_unavailable(s3: MotoServer, grpc_server: Callable[..., ServerThread]) -> None:
    registry = Registry(open_store(make_s3_settings(s3.endpoint, s3.create_bucket(), s3_connect_timeout_seconds=0.5)))
    server = grpc_server(loopback_settings(), lambda: registry_bindings(registry))
    stub = registry_pb2_grpc.RegistryServiceStub(server.channel())
    assert list(stub.ListAdapters(registry_pb2.ListAdaptersRequest()).adapters) == []
    s3.stop()
    err = rpc_error(lambda: stub.ListAdapters(registry_pb2.ListAdaptersRequest()))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    s3.start()  # same port, fresh (empty) server: the bucket is gone
    err = rpc_error(lambda: stub.ListAdapters(registry_pb2.ListAdaptersRequest()))
    # Generic to the caller (the missing bucket's name is an internal, logged server-side).
    assert err.code() == grpc.StatusCode.UNAVAILABLE and err.details() == REGISTRY_UNAVAILABLE
