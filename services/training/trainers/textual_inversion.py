"""Textual Inversion: learn new token embeddings; the model itself is untouched.

Follows `textual_inversion.py` (and `textual_inversion_sdxl.py`): the placeholder (plus
`<tok>_1`.. for multi-vector concepts) is added to the tokenizer of every text encoder the
family trains TI on (`family.ti_slots`: SD 1.x its CLIP, SDXL both CLIPs, Flux CLIP-L), each
initialised from the initializer token's embedding in that encoder, and trained with AdamW at
the scaled learning rate. Instead of optimising the whole embedding matrix and restoring every
other row after each step (the recipe), we train only a `[num_vectors, dim]` parameter per
encoder that a forward hook splices into the embedding output: the same gradients for the new
rows, without AdamW moments for the ~49k frozen rows.

Artifact:
- one encoder (SD 1.x, Flux): `learned_embeds.safetensors` `{placeholder: [num_vectors, dim]}`,
  which `pipe.load_textual_inversion(path, token=placeholder)` expands to the same token names;
- SDXL: `learned_embeds.safetensors` is the A1111/ComfyUI file `{"clip_l": [n, d1], "clip_g":
  [n, d2]}` (the registry's stored SDXL layout), and each encoder's vectors are also written in
  diffusers format, `<encoder>/learned_embeds.safetensors` `{placeholder: [n, d]}`, for
  `pipe.load_textual_inversion(that_file, token=..., text_encoder=..., tokenizer=...)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from services.common.errors import FailedPrecondition, InvalidInput
from services.families import TextEncoderSlot
from services.registry.manifests import TI_EMBEDS_FILE
from services.training.trainers.config import TrainConfig, is_existing_token
from services.training.trainers.method import MethodTrainer
from services.training.trainers.models import Components

_F = "spec.textual_inversion."


class EncoderVectors:
    """The trainable vectors of one text encoder, spliced into its embedding output."""

    def __init__(self, config: TrainConfig, tokenizer: Any, encoder: Any, device: torch.device) -> None:
        tokens = config.trigger_tokens
        init_ids = tokenizer.encode(config.initializer_token, add_special_tokens=False)
        if len(init_ids) != 1:
            raise InvalidInput(_F + "initializer_token", f"must be a single token; it encodes to {len(init_ids)}")
        if any(is_existing_token(tokenizer, t) for t in tokens) or tokenizer.add_tokens(tokens) != len(tokens):
            raise InvalidInput(_F + "placeholder_token", "already a token of the base model")
        ids: list[int] = list(tokenizer.convert_tokens_to_ids(tokens))
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        embedding: Any = encoder.get_input_embeddings()
        with torch.no_grad():
            init = embedding.weight[init_ids[0]].detach().clone()
            embedding.weight[ids] = init.to(embedding.weight.dtype)
        self.first_id = ids[0]
        if ids != list(range(self.first_id, self.first_id + len(ids))):
            raise InvalidInput(_F + "placeholder_token", "the tokenizer could not add it as new tokens")
        self.vectors = torch.nn.Parameter(init.float().repeat(len(tokens), 1).to(device))
        self._hook = embedding.register_forward_hook(self._splice)

    def _splice(self, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        """Replace the embedding output at placeholder positions with the trainable vectors."""
        offset = inputs[0] - self.first_id
        mask = (offset >= 0) & (offset < self.vectors.shape[0])
        if not bool(mask.any()):
            return output
        picked = self.vectors[offset.clamp(0, self.vectors.shape[0] - 1)].to(output.dtype)
        return torch.where(mask.unsqueeze(-1), picked, output)

    def tensor(self) -> torch.Tensor:
        return self.vectors.detach().float().cpu().contiguous()


class TextualInversionTrainer(MethodTrainer):
    kind = "TEXTUAL_INVERSION"

    def __init__(self, config: TrainConfig, comps: Components) -> None:
        super().__init__(config, comps)
        self.slots: tuple[TextEncoderSlot, ...] = comps.family.ti_slots
        if not self.slots:
            raise FailedPrecondition(f"{comps.family.title} has no text encoder textual inversion can train",
                                     "spec.method")
        self.encoders = {
            slot.encoder: EncoderVectors(config, comps.tokenizers[slot.tokenizer], comps.models[slot.encoder],
                                         comps.device)
            for slot in self.slots
        }

    @property
    def text_encoder_in_graph(self) -> bool:
        return True

    @property
    def graph_text_encoders(self) -> tuple[str, ...]:
        return tuple(self.encoders)

    def prompt(self, text: str) -> str:
        return text.replace(self.config.placeholder_token, " ".join(self.config.trigger_tokens))

    def _name(self, index: int, encoder: str) -> str:
        """Checkpoint key: the first encoder's is "learned_embeds" (as SD 1.x always had)."""
        return "learned_embeds" if index == 0 else f"learned_embeds.{encoder}"

    def named_trainable(self) -> dict[str, torch.nn.Parameter]:
        return {self._name(i, name): vec.vectors for i, (name, vec) in enumerate(self.encoders.items())}

    def param_groups(self) -> list[dict[str, Any]]:
        params = [vec.vectors for vec in self.encoders.values()]
        return [{"params": params, "lr": self.config.effective_learning_rate}]

    def save_artifact(self, out_dir: Path) -> dict[str, Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        token = self.config.placeholder_token
        path = out_dir / TI_EMBEDS_FILE
        if len(self.slots) == 1:
            save_file({token: self.encoders[self.slots[0].encoder].tensor()}, str(path))
            return {TI_EMBEDS_FILE: path}
        save_file({slot.ti_key: self.encoders[slot.encoder].tensor() for slot in self.slots}, str(path))
        files = {TI_EMBEDS_FILE: path}
        for slot in self.slots:
            relative = f"{slot.encoder}/{TI_EMBEDS_FILE}"
            (out_dir / slot.encoder).mkdir(exist_ok=True)
            save_file({token: self.encoders[slot.encoder].tensor()}, str(out_dir / relative))
            files[relative] = out_dir / relative
        return files
