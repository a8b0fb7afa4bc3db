"""Textual Inversion: learn new token embeddings; the model itself is untouched.

Follows `textual_inversion.py`: the placeholder (plus `<tok>_1`.. for multi-vector concepts)
is added to the tokenizer, initialised from the initializer token's embedding, and trained
with AdamW at the scaled learning rate. Instead of optimising the whole embedding matrix and
restoring every other row after each step (the recipe), we train only a `[num_vectors, dim]`
parameter that a forward hook splices into the embedding output: the same gradients for the
new rows, without AdamW moments for the ~49k frozen rows. The artifact is
`learned_embeds.safetensors` `{placeholder: tensor[num_vectors, dim]}`, which
`pipe.load_textual_inversion(path, token=placeholder)` expands to the same token names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from services.common.errors import InvalidInput
from services.registry.manifests import TI_EMBEDS_FILE
from services.training.trainers.config import TrainConfig, is_existing_token
from services.training.trainers.method import MethodTrainer
from services.training.trainers.models import Components

_F = "spec.textual_inversion."


class TextualInversionTrainer(MethodTrainer):
    kind = "TEXTUAL_INVERSION"

    def __init__(self, config: TrainConfig, comps: Components) -> None:
        super().__init__(config, comps)
        tokens = config.trigger_tokens
        tok = comps.tokenizer
        init_ids = tok.encode(config.initializer_token, add_special_tokens=False)
        if len(init_ids) != 1:
            raise InvalidInput(_F + "initializer_token", f"must be a single token; it encodes to {len(init_ids)}")
        if any(is_existing_token(tok, t) for t in tokens) or tok.add_tokens(tokens) != len(tokens):
            raise InvalidInput(_F + "placeholder_token", "already a token of the base model")
        ids: list[int] = list(tok.convert_tokens_to_ids(tokens))
        comps.text_encoder.resize_token_embeddings(len(tok), mean_resizing=False)
        embedding: Any = comps.text_encoder.get_input_embeddings()
        with torch.no_grad():
            init = embedding.weight[init_ids[0]].detach().clone()
            embedding.weight[ids] = init.to(embedding.weight.dtype)
        self.first_id = ids[0]
        if ids != list(range(self.first_id, self.first_id + len(ids))):
            raise InvalidInput(_F + "placeholder_token", "the tokenizer could not add it as new tokens")
        self.vectors = torch.nn.Parameter(init.float().repeat(len(tokens), 1).to(comps.device))
        self._hook = embedding.register_forward_hook(self._splice)

    def _splice(self, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        """Replace the embedding output at placeholder positions with the trainable vectors."""
        offset = inputs[0] - self.first_id
        mask = (offset >= 0) & (offset < self.vectors.shape[0])
        if not bool(mask.any()):
            return output
        picked = self.vectors[offset.clamp(0, self.vectors.shape[0] - 1)].to(output.dtype)
        return torch.where(mask.unsqueeze(-1), picked, output)

    @property
    def text_encoder_in_graph(self) -> bool:
        return True

    def prompt(self, text: str) -> str:
        return text.replace(self.config.placeholder_token, " ".join(self.config.trigger_tokens))

    def named_trainable(self) -> dict[str, torch.nn.Parameter]:
        return {"learned_embeds": self.vectors}

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [self.vectors], "lr": self.config.effective_learning_rate}]

    def save_artifact(self, out_dir: Path) -> dict[str, Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / TI_EMBEDS_FILE
        save_file({self.config.placeholder_token: self.vectors.detach().float().cpu().contiguous()}, str(path))
        return {TI_EMBEDS_FILE: path}
