"""The SDK's train(..., webhook_url=, webhook_secret=) reaches CreateTrainingJobRequest."""

from __future__ import annotations

from atelier.requests import TrainArgs, training_request


def test_webhook_options_travel_outside_the_spec() -> None:
    args = TrainArgs(method="lora", base_model="tiny", dataset="ds1", name="dog",
                     webhook_url="https://hooks.example/atelier", webhook_secret="0123456789abcdef")
    request = training_request(args, "req-1")
    assert (request.webhook_url, request.webhook_secret) == ("https://hooks.example/atelier", "0123456789abcdef")
    assert "webhook" not in str(request.spec)
    plain = training_request(TrainArgs(method="lora", base_model="tiny", dataset="ds1", name="dog"), None)
    assert (plain.webhook_url, plain.webhook_secret) == ("", "")
