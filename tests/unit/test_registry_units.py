"""Pure units of the registry: names, safetensors policy, page tokens, proto conversion, key layout."""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from pathlib import Path

import pytest

from atelier_api.v1 import common_pb2
from services.common.errors import InvalidInput
from services.registry import convert as pc
from services.registry.documents import checked_page_size, decode_token, encode_token
from services.registry.keys import Keys, number_from_key
from services.registry.manifests import AdapterManifest, FileRecord, files_digest
from services.registry.names import validate_alias, validate_name, validate_relpath
from services.registry.refs import AdapterRef
from services.registry.safety import ensure_safetensors
from tests.fixtures.s3 import write_lora


@pytest.mark.parametrize("good", ["a", "cat-toy", "v1.5_lora", "0", "a" * 63, "x.y-z_0"])
def test_good_names(good: str) -> None:
    assert validate_name(good, "name") == good


@pytest.mark.parametrize("bad,why", [
    ("", "empty"), ("../x", "match"), ("a/b", "match"), ("Upper", "match"), ("x" * 200, "200 characters"),
    ("a..b", "match"), ("-a", "match"), (".hidden", "match"), ("a b", "match"), ("é", "match"), ("a\n", "match"),
])
def test_bad_names_name_the_field(bad: str, why: str) -> None:
    with pytest.raises(InvalidInput) as err:
        validate_name(bad, "adapter_name")
    assert err.value.violations[0].field == "adapter_name" and why in err.value.violations[0].description


def test_latest_is_a_reserved_alias() -> None:
    with pytest.raises(InvalidInput):
        validate_alias("latest")


@pytest.mark.parametrize("bad", ["", "/etc/passwd", "a/../b", "a//b", "./a", "a\\b", "a\0b"])
def test_relpaths(bad: str) -> None:
    assert validate_relpath("unet/config.json", "f") == "unet/config.json"
    with pytest.raises(InvalidInput):
        validate_relpath(bad, "f")


def test_safetensors_header_checks(tmp_path: Path) -> None:
    header = ensure_safetensors(write_lora(tmp_path / "ok.safetensors"), "file")
    assert len([k for k in header if k != "__metadata__"]) == 2
    data = (tmp_path / "ok.safetensors").read_bytes()
    assert ensure_safetensors(data, "file") == header  # bytes work too
    cases = {
        "huge header": struct.pack("<Q", 10**12) + b"{}",
        "list header": struct.pack("<Q", 2) + b"[]",
        "bad offsets": struct.pack("<Q", 56) + b'{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,99]}}',
        "pickle": b"\x80\x05\x95" + b"\0" * 20,
        "zip": b"PK\x03\x04" + b"\0" * 20,
    }
    for label, payload in cases.items():
        with pytest.raises(InvalidInput) as err:
            ensure_safetensors(payload, "weights")
        assert err.value.violations[0].field == "weights", label
    with pytest.raises(InvalidInput, match="pickle-based"):
        ensure_safetensors(tmp_path / "ok.ckpt", "weights")


def test_page_tokens_are_scoped_and_opaque() -> None:
    token = encode_token("adapters::", "cat")
    assert "cat" not in token and decode_token(token, "adapters::") == "cat"
    assert decode_token("", "x") == ""
    for bad, scope in [(token, "versions:cat"), ("@@@", "adapters::"), ("e30", "adapters::")]:
        with pytest.raises(InvalidInput):
            decode_token(bad, scope)
    assert checked_page_size(0) == 50 and checked_page_size(5) == 5 and checked_page_size(10**6) == 1000


def test_key_layout() -> None:
    keys = Keys("pfx/")
    assert keys.version("t", "cat", 12) == "pfx/adapters/t/cat/versions/0000000012.json"
    assert keys.alias("t", "cat", "prod") == "pfx/adapters/t/cat/aliases/prod.json"
    assert keys.blob("ab" * 32) == f"pfx/blobs/sha256/{'ab' * 32}"
    assert Keys().base_model("sd") == "base-models/sd/manifest.json"
    assert number_from_key(keys.version("t", "cat", 12)) == 12
    assert keys.version("t", "c", 9) < keys.version("t", "c", 10)  # sorted listing is numeric order
    assert keys.is_adapter_version(keys.version("t", "versions", 3))
    assert not keys.is_adapter_version(keys.alias("t", "versions", "prod"))  # an adapter named "versions"
    assert not keys.is_adapter_version(keys.tombstone("t", "cat", 3))
    assert not keys.is_adapter_version(Keys().version("t", "cat", 3))  # outside this prefix


def test_files_digest_is_order_independent() -> None:
    a, b = FileRecord(path="a", sha256="1" * 64, size=1), FileRecord(path="b", sha256="2" * 64, size=2)
    assert files_digest([a, b]) == files_digest([b, a]) != files_digest([a])


def test_proto_conversion() -> None:
    manifest = AdapterManifest(
        tenant="t", name="cat", version=3, kind="TEXTUAL_INVERSION", base_model="tiny",
        files=[FileRecord(path="learned_embeds.safetensors", sha256="a" * 64, size=10)],
        trigger_tokens=["<cat>"], training_config={"lr": 0.001, "steps": 100, "nested": {"x": [1, 2]}},
        metrics={"loss": 0.25}, created_at=datetime(2025, 1, 2, tzinfo=UTC), manifest_digest="d" * 64,
    )
    msg = pc.adapter_version_to_proto(manifest)
    assert msg.kind == common_pb2.ADAPTER_KIND_TEXTUAL_INVERSION and msg.size_bytes == 10
    assert msg.training_config["nested"]["x"][1] == 2 and msg.metrics["loss"] == 0.25
    assert msg.created_at.ToDatetime(tzinfo=UTC) == manifest.created_at and msg.manifest_digest == "d" * 64
    assert "manifest_digest" not in manifest.model_dump()  # never serialised into the document
    assert pc.kind_from_proto(common_pb2.ADAPTER_KIND_UNSPECIFIED) is None
    with pytest.raises(InvalidInput):
        pc.kind_from_proto(99)
    by_alias = common_pb2.AdapterRef(name="cat", alias="prod")
    assert pc.ref_from_proto(by_alias, "t") == AdapterRef("t", "cat", alias="prod")
    assert pc.ref_from_proto(common_pb2.AdapterRef(name="cat", version=2), "t") == AdapterRef("t", "cat", version=2)
    assert pc.ref_from_proto(common_pb2.AdapterRef(name="cat"), "t") == AdapterRef("t", "cat")
    with pytest.raises(InvalidInput) as err:
        pc.ref_from_proto(common_pb2.AdapterRef(name="cat", version=0), "t")
    assert err.value.violations[0].field == "ref.version"


def test_non_finite_metrics_round_trip() -> None:
    """A diverged run's NaN loss must not make its manifest unreadable."""
    m = AdapterManifest(tenant="t", name="n", version=1, kind="LORA", base_model="b", files=[],
                        metrics={"loss": float("nan"), "grad": float("inf")})
    back = AdapterManifest.model_validate_json(m.to_json_bytes())
    assert back.metrics["grad"] == float("inf") and back.metrics["loss"] != back.metrics["loss"]
