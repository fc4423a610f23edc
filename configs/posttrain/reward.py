"""Post-training preset: reward. The model and tokenizer come from --init_from; set the data with
--config.posttrain.train_file=FILE.jsonl (and optionally --config.posttrain.eval_file)."""

from lmjax.posttrain.config import default_config


def get_config():
    c = default_config("reward")
    c.reward.center = 0.01  # keeps rewards near 0 (Bradley-Terry alone fixes only differences)
    c.optim.lr = 3e-4
    c.eval.num_samples = 0
    return c
