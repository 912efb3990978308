"""nn.Modules only: the MMDiT, the causal video VAE and the text encoders."""

from pipelines.models.mmdit import MMDiT, MMDiTConfig, build_mmdit
from pipelines.models.vae import CausalVAE, CausalVAEConfig, build_causal_vae

__all__ = ["MMDiT", "MMDiTConfig", "build_mmdit", "CausalVAE", "CausalVAEConfig", "build_causal_vae"]
