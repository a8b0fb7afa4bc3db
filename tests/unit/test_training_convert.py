"""services/training/convert.py: the training edge turns messages into plain values."""

from __future__ import annotations

import pytest

from atelier_api.v1 import common_pb2, training_pb2
from services.common.config import Settings
from services.common.errors import InvalidInput
from services.training import convert
from services.training.upload import ImageChunk, UploadAssembler, UploadHeader
from tests.unit.test_trainer_config import spec


def test_a_stored_spec_resolves_like_the_message_it_came_from() -> None:
    s = spec("LORA", learning_rate=3e-4, seed=11, optimizer=training_pb2.OPTIMIZER_KIND_PRODIGY)
    s.lora.rank = 8
    stored = convert.config_from_stored_spec(convert.spec_to_dict(s))
    assert stored == convert.config_from_proto(s)
    assert (stored.learning_rate, stored.rank, stored.alpha, stored.optimizer) == (3e-4, 8, 8.0, "prodigy")


def test_conversion_violations_are_reported_together() -> None:
    s = spec("LORA", optimizer=99, lr_scheduler_kind=99)
    with pytest.raises(InvalidInput) as err:
        convert.config_from_proto(s)
    assert [v.field for v in err.value.violations] == ["spec.hyperparameters.optimizer",
                                                       "spec.hyperparameters.lr_scheduler_kind"]


def test_upload_messages_become_headers_and_chunks() -> None:
    header = training_pb2.UploadDatasetRequest(header=training_pb2.DatasetHeader(name="dogs"))
    chunk = training_pb2.UploadDatasetRequest(image=training_pb2.DatasetImageChunk(index=0, filename="a.png",
                                                                                   caption="c", data=b"xy"))
    assert convert.upload_part(header) == UploadHeader("dogs")
    assert convert.upload_part(chunk) == ImageChunk(0, "a.png", "c", b"xy")
    with pytest.raises(InvalidInput) as err:
        convert.upload_part(training_pb2.UploadDatasetRequest())
    assert err.value.violations[0].field == "payload"


def test_the_assembler_joins_chunks_and_refuses_a_late_header() -> None:
    assembler = UploadAssembler(Settings())
    for part in (UploadHeader("dogs"), ImageChunk(0, "a.png", "", b"ab"), ImageChunk(0, "", "cap", b"cd")):
        assembler.add(part)
    [image] = assembler.images()
    assert (assembler.name, image.filename, image.caption, image.data) == ("dogs", "a.png", "cap", b"abcd")
    with pytest.raises(InvalidInput) as err:
        assembler.add(UploadHeader("again"))
    assert err.value.violations[0].field == "header"


def test_list_filters_map_enum_numbers_to_names() -> None:
    assert convert.state_filter(training_pb2.JOB_STATE_UNSPECIFIED) is None
    assert convert.state_filter(training_pb2.JOB_STATE_RUNNING) == "RUNNING"
    assert convert.method_filter(common_pb2.ADAPTER_KIND_UNSPECIFIED) is None
    assert convert.method_filter(common_pb2.ADAPTER_KIND_DREAMBOOTH) == "DREAMBOOTH"
    for call, field in ((convert.state_filter, "state"), (convert.method_filter, "method")):
        with pytest.raises(InvalidInput) as err:
            call(99)
        assert err.value.violations[0].field == field
