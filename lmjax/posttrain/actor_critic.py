"""PPO's trainable model: the policy (a language model) and a value network (a reward-model-shaped
trunk with a scalar head, read at every position), as one parameter tree {"policy", "value"} so a
single optimizer, train step and checkpoint cover both."""

from typing import Any

import flax.linen as nn

from lmjax.model import Transformer
from lmjax.posttrain.reward_model import RewardModel


class ActorCritic(nn.Module):
    """tokens [B, L] -> (logits [B, L, V], values [B, L]); values[t] estimates the return from the
    state that predicts token t + 1."""

    cfg: Any

    @nn.compact
    def __call__(self, tokens_BxL, positions=None, segment_ids=None, deterministic=True):
        logits_BxLxV = Transformer(self.cfg, name="policy")(tokens_BxL, positions, segment_ids, deterministic)
        values_BxL = RewardModel(self.cfg, name="value")(tokens_BxL, None, positions, segment_ids, deterministic)
        return logits_BxLxV, values_BxL
