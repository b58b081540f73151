"""Names the schema (``params``) validates against and the ML core implements.

The bottom layer with ``params``: plain values, no torch. Each core module builds its table from
these names (``losses.PAIR_LOSSES``, ``reward_model.DTYPES``), so a name cannot be valid in one
place and unknown in the other.
"""

BUILTIN_TINY_GPT2 = "builtin:tiny-gpt2"  # base_model.name_or_path of the GPT-2 built from config
PAIR_LOSS_NAMES = ("sigmoid", "ipo", "hinge")  # losses.PAIR_LOSSES
RPO_DISTANCES = ("bwd_kl", "fwd_kl", "sq")  # losses.rpo_distance
REWARD_AGGREGATES = ("mean", "min", "mean_minus_std")  # reward_model.ensemble_reward
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")  # reward_model.DTYPES (the 4-bit compute dtype)
