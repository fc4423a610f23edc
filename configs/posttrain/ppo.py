"""Post-training preset: ppo (RLHF with a KL penalty). The policy and its reference come from
--init_from (an SFT run); set --config.ppo.reward_from=<a --mode=reward workdir> and
--config.posttrain.train_file=FILE.jsonl (its prompts are used; sft and pairs files qualify)."""

from lmjax.posttrain.config import default_config


def get_config():
    c = default_config("ppo")
    c.train.update(steps=100, batch_size=16, log_every=5)  # steps: rollout batches of batch_size prompts
    c.ppo.update(max_new_tokens=16, epochs=2, minibatches=2, kl_coef=0.05)
    c.optim.update(lr=1e-5, warmup_steps=0, schedule="constant")
    c.eval.num_samples = 0
    return c
