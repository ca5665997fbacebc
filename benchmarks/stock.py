"""Configuration (a) of the benchmark: how OpenVLA-OFT runs today -- transformers' LlamaModel as the backbone
(SDPA attention, an explicit bidirectional 4-D mask, eager Python), the plain vision towers, projector and
head of the reference model. Same signature as `OpenVLAOFT.forward`; weights are SHARED with the model
(nothing is copied).

    stock = StockExecutor(policy.model)            # needs transformers
    actions, action_hidden = stock(input_ids, pixel_values, proprio, prompt_lens)
"""

from __future__ import annotations

import torch

from vla_accel.model.oft import OpenVLAOFT


def hf_llama(model: OpenVLAOFT):
    """transformers.LlamaModel over the model's own backbone tensors (assign, no copy), SDPA attention."""
    from vla_accel._compat import hide_unloadable_torchvision

    hide_unloadable_torchvision()
    from transformers import LlamaConfig, LlamaModel
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    c = model.cfg.llm
    config = LlamaConfig(vocab_size=c.vocab, hidden_size=c.hidden, intermediate_size=c.intermediate,
                         num_hidden_layers=c.layers, num_attention_heads=c.heads, num_key_value_heads=c.kv_heads,
                         rms_norm_eps=c.rms_eps, rope_theta=c.rope_theta, max_position_embeddings=c.max_positions,
                         pad_token_id=c.pad_id, use_cache=False, attention_bias=False, mlp_bias=False)
    config._attn_implementation = "sdpa"
    dev = next(model.parameters()).device
    with torch.device("meta"):
        hf = LlamaModel(config)
    missing, unexpected = hf.load_state_dict(model.llm.state_dict(), assign=True, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(f"transformers' LlamaModel does not match the backbone: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    with torch.device(dev):
        hf.rotary_emb = LlamaRotaryEmbedding(config)
    return hf.eval()


class StockExecutor:
    def __init__(self, model: OpenVLAOFT):
        self.model = model
        self.hf = hf_llama(model)

    @torch.inference_mode()
    def describe(self) -> dict:
        return {"executor": "stock-transformers"}

    def __call__(self, input_ids, pixel_values, proprio, prompt_lens=None, decisions=None):
        if decisions is not None:
            raise ValueError("the stock transformers backbone takes no pruning decisions (configuration (a) is "
                             "unpruned)")
        m = self.model
        if prompt_lens is None:
            prompt_lens = torch.full((input_ids.shape[0],), input_ids.shape[1])
        seq = m.assemble(input_ids, prompt_lens, m.encode_images(pixel_values), proprio)
        act_h = m.action_window(self.backbone(seq), seq.key_mask)
        return m.action_head(act_h).float(), act_h

    def backbone(self, seq):
        """seq: OpenVLAOFT.assemble's Sequence -> final-norm hidden states [B, S, D]."""
        B, S, _ = seq.embeds.shape
        keys = seq.key_mask
        if keys is None:
            keys = torch.ones(B, S, dtype=torch.bool, device=seq.embeds.device)
        mask = keys[:, None, None, :].expand(B, 1, S, S)  # bidirectional: every query sees every real key
        return self.hf(inputs_embeds=seq.embeds, attention_mask=mask, position_ids=seq.positions,
                       use_cache=False).last_hidden_state
