"""Projected per-stage cost of a 124M and a 1B model on 8 GPUs, from measured FLOPs per token.

    python benchmarks/scaling_projection.py

FLOPs per token are measured, not assumed: ``torch.utils.flop_counter.FlopCounterMode`` counts one
forward of each architecture (on the meta device: no weights are allocated) at the job's sequence
length, and training steps are counted forward + backward the same way. Everything else (GPU peak,
utilisation, job size) is an assumption, stated in the output: the result is a PROJECTION, not a
measurement. Writes benchmarks/results/scaling_projection.{json,md}.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

SEQ, PAIRS, GPUS = 512, 100_000, 8
PEAK_BF16, MFU = 989e12, 0.40  # H100 SXM dense bf16 peak; an assumed model-FLOPs utilisation
MODELS = {
    "gpt2 (124M)": GPT2Config(n_positions=1024),
    "Llama 1.1B (TinyLlama shape)": LlamaConfig(hidden_size=2048, intermediate_size=5632,
                                                num_hidden_layers=22, num_attention_heads=32,
                                                num_key_value_heads=4, vocab_size=32000),
}


def flops_per_token(config, backward: bool) -> tuple[float, int]:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    ids = torch.zeros((1, SEQ), dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(input_ids=ids).logits
        if backward:
            out.float().sum().backward()
    return counter.get_total_flops() / SEQ, params


def main() -> None:
    sequences = 2 * PAIRS  # chosen + rejected
    tokens = sequences * SEQ
    rows = []
    for name, config in MODELS.items():
        fwd, params = flops_per_token(config, backward=False)
        train, _ = flops_per_token(config, backward=True)
        stages = {  # FLOPs of one pass over the job
            "SFT (1 epoch, all responses)": train * tokens,
            "reference log-prob cache": fwd * tokens,
            # LoRA on a frozen 4-bit backbone: forward + backward to the activations (~2 x forward)
            "reward model (LoRA, 1 epoch)": 2 * fwd * tokens,
            "DPO / RPO (1 epoch, π_ref cached)": train * tokens,
            "reward scoring": fwd * tokens,
        }
        for stage, flops in stages.items():
            seconds = flops / (GPUS * PEAK_BF16 * MFU)
            rows.append({"model": name, "parameters": params, "stage": stage,
                         "forward_flops_per_token": fwd, "train_flops_per_token": train,
                         "total_flops": flops, "projected_minutes_on_8_gpus": seconds / 60})
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    meta = {"label": "PROJECTION (FLOPs per token measured with FlopCounterMode; the rest assumed)",
            "sequence_length": SEQ, "pairs": PAIRS, "gpus": GPUS, "peak_bf16_flops": PEAK_BF16,
            "assumed_mfu": MFU}
    (out / "scaling_projection.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"**Projection**, not a measurement: {PAIRS:,} pairs of {SEQ} tokens, {GPUS} GPUs at "
             f"{PEAK_BF16 / 1e12:.0f} TFLOP/s bf16 peak and an assumed {MFU:.0%} utilisation; "
             "FLOPs per token measured with `FlopCounterMode`.", "",
             "| model | stage | GFLOP / token (fwd; fwd+bwd) | projected minutes on 8 GPUs |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['stage']} | {r['forward_flops_per_token'] / 1e9:.2f}; "
                     f"{r['train_flops_per_token'] / 1e9:.2f} | {r['projected_minutes_on_8_gpus']:.1f} |")
    (out / "scaling_projection.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
