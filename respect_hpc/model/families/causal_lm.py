"""Text-only causal LMs (Mistral, Llama, SmolLM2...): the feedback decoder, or a policy that reads letters
without images. A message ends with the tokenizer's ``<end_of_utterance>`` where it has one (IDEFICS2-8B's
language model), else its end-of-sequence token.
"""

from __future__ import annotations

from respect_hpc.model.families import Family

FAMILY = Family(
    name="causal-lm", model_types=("mistral", "llama"), multimodal=False,
    lora_targets={"official": r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
                  "paper": r".*\.(q_proj|k_proj|v_proj|gate_proj|up_proj|down_proj)",
                  "enhanced": r".*\.(q_proj|k_proj|v_proj|gate_proj|up_proj|down_proj)"},
    end_of_turn="<end_of_utterance>",
)
