"""Text encoders behind one interface: prompts -> (txt (B, L, C), txt_ids (B, L, 3), y_vec (B, D)).

- `T5ClipTextEncoder`: Open-Sora 2.0's pair. T5 gives per-token features padded to 512 tokens and encoded with
  no attention mask (as upstream, so pad tokens are encoded and attended); CLIP-L gives the pooled vector (77 tokens).
- `MiniLMTextEncoder`: the embedded default's encoder (all-MiniLM-L6-v2, 384-d): token states as txt, the masked
  mean of them (sentence embedding) as y_vec.
Tokenizers are plain attributes; the modules are frozen and only run under inference.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

T5_MAX_LENGTH = 512  # Open-Sora 2.0 pads every prompt to 512 T5 tokens
MINILM_MAX_LENGTH = 32  # the embedded default's captions fit in 32 MiniLM tokens
# Tokens each encoder's `txt` has: what the MMDiT attends to beside the video.
TEXT_TOKENS = {"t5-clip": T5_MAX_LENGTH, "minilm": MINILM_MAX_LENGTH}


class TextEncoder(nn.Module):
    """Common surface: `forward(prompts) -> (txt, txt_ids, y_vec)`, `max_length`, `count_tokens`."""

    max_length: int
    tokenizer = None

    def count_tokens(self, prompt: str) -> int:
        """Tokens the prompt needs before truncation (to report truncation in the recipe)."""
        return len(self.tokenizer(prompt, truncation=False)["input_ids"])

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def _txt_ids(txt: Tensor) -> Tensor:
    return torch.zeros(*txt.shape[:2], 3, device=txt.device, dtype=txt.dtype)


class T5ClipTextEncoder(TextEncoder):
    def __init__(self, t5_tokenizer, t5_model: nn.Module, clip_tokenizer, clip_model: nn.Module,
                 t5_max_length: int = T5_MAX_LENGTH, clip_max_length: int = 77):
        super().__init__()
        self.tokenizer, self.t5 = t5_tokenizer, t5_model
        self.clip_tokenizer, self.clip = clip_tokenizer, clip_model
        self.max_length, self.clip_max_length = t5_max_length, clip_max_length
        self.requires_grad_(False).eval()

    @torch.inference_mode()
    def forward(self, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        ids = self.tokenizer(prompts, truncation=True, max_length=self.max_length, padding="max_length",
                             return_tensors="pt")["input_ids"].to(self.device)
        txt = self.t5(input_ids=ids, attention_mask=None).last_hidden_state  # (B, 512, 4096)
        clip_ids = self.clip_tokenizer(prompts, truncation=True, max_length=self.clip_max_length,
                                       padding="max_length", return_tensors="pt")["input_ids"].to(self.device)
        y_vec = self.clip(input_ids=clip_ids, attention_mask=None).pooler_output  # (B, 768)
        return txt, _txt_ids(txt), y_vec


class MiniLMTextEncoder(TextEncoder):
    def __init__(self, tokenizer, model: nn.Module, max_length: int = MINILM_MAX_LENGTH):
        super().__init__()
        self.tokenizer, self.model, self.max_length = tokenizer, model, max_length
        self.requires_grad_(False).eval()

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @torch.inference_mode()
    def forward(self, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        batch = self.tokenizer(prompts, truncation=True, max_length=self.max_length, padding="max_length",
                               return_tensors="pt").to(self.device)
        txt = self.model(**batch).last_hidden_state  # (B, L, 384)
        mask = batch["attention_mask"][..., None].to(txt.dtype)  # (B, L, 1)
        y_vec = (txt * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, 384) sentence embedding
        return txt, _txt_ids(txt), y_vec
