"""Policy names: how the public logs and a round's outputs name the policies that played.

The public ReSpect logs name the initial policy ``sft``; ``b``/``t`` mark the binary or ternary decoder and
``p``/``a``/``k`` FFT, RL and KTO (``bp`` is B-FFT's deployments); ``human`` plays human-human games.
"""

SEED_POLICY = "sft"         # round 0's policy, trained on D_0 alone, where every variant starts
CONTROL_POLICY = "control"  # the seed policy as a simulated deployment deploys it every round, never retrained
PUBLIC_POLICIES = ("sft", "bp", "tp", "ba", "ta", "bk", "tk", "human")
